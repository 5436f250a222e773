//! An outside opinion of lb's TLS: testssl.sh (Debian package `testssl.sh`, binary `testssl`)
//! scans lb on 127.0.0.1 and its JSON findings are checked: TLS 1.2 and 1.3 offered and nothing
//! older, every offered cipher suite AEAD with ephemeral ECDH key exchange, not vulnerable to
//! Heartbleed, CCS injection or client-initiated renegotiation, and no finding of severity
//! MEDIUM or worse (nor a WARN, which would mean the scan itself went wrong).
//!
//! The checks run are `-p` (protocols), `-E` (the cipher suites of each protocol, tried one by
//! one: the proof of "AEAD with forward secrecy only"), `-H`, `-I`, `-R` (the vulnerabilities
//! that depend on the implementation rather than on the protocols and suites offered; the rest
//! of `-U` is ruled out by `-p` and `-E`: no SSLv3, no CBC, no RSA key transport, no RC4, no
//! 3DES, no export or DH suites). The full `-U -S -s -f` set takes minutes on two cores, this
//! one about half a minute. The scan stays offline: the target is an IP address, `--nodns none`
//! makes no DNS lookups, and without `--phone-out` nothing fetches CRLs or OCSP.

use std::time::Duration;

use crate::support::*;

/// How long the scan may take before the test fails.
const SCAN_LIMIT: Duration = Duration::from_secs(240);

/// The install line for a machine without testssl.
const INSTALL: &str = "apt-get install -y testssl.sh";

/// One finding of testssl's flat JSON output.
#[derive(Debug, serde::Deserialize)]
struct Finding {
    id: String,
    severity: String,
    finding: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_tls12_and_13_aead_with_forward_secrecy_and_nothing_medium_or_worse() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let target = lb.addrs().https.to_string();
    let out = TempDir::new("testssl");
    let json = out.path().join("findings.json");
    let scan = tokio::process::Command::new("testssl")
        .args([
            "--quiet",
            "--warnings",
            "off",
            "--color",
            "0",
            "--nodns",
            "none",
            "--jsonfile",
        ])
        .arg(&json)
        .args(["-p", "-E", "-H", "-I", "-R"])
        .arg(&target)
        .current_dir(out.path())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(SCAN_LIMIT, scan).await {
        Err(_) => panic!("testssl took longer than {SCAN_LIMIT:?}"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("testssl is not installed; install it with: {INSTALL}")
        }
        Ok(result) => result.expect("run testssl"),
    };
    let report = String::from_utf8_lossy(&output.stdout);
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no JSON from testssl ({e}); it printed:\n{report}"));
    let findings: Vec<Finding> = serde_json::from_str(&text).expect("testssl JSON");
    let by_id = |id: &str| {
        findings
            .iter()
            .find(|f| f.id == id)
            .unwrap_or_else(|| panic!("no {id} finding in:\n{report}"))
    };

    let bad: Vec<_> = findings
        .iter()
        .filter(|f| matches!(f.severity.as_str(), "MEDIUM" | "HIGH" | "CRITICAL" | "WARN"))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}\n{report}");

    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert_eq!(by_id(old).finding, "not offered", "{old}");
    }
    for current in ["TLS1_2", "TLS1_3"] {
        assert!(
            by_id(current).finding.starts_with("offered"),
            "{current}: {:?}",
            by_id(current).finding
        );
    }

    // One finding per offered suite: `cipher-tls1_2_xc02b` with the suite's line from the table
    // (hexcode, OpenSSL name, key exchange, encryption, bits, IANA name).
    let suites: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.id.starts_with("cipher-") && f.id.contains('_'))
        .collect();
    for protocol in ["tls1_2", "tls1_3"] {
        assert!(
            suites
                .iter()
                .any(|f| f.id.starts_with(&format!("cipher-{protocol}_"))),
            "no {protocol} suite found:\n{report}"
        );
    }
    for suite in &suites {
        let line = &suite.finding;
        assert!(
            suite.id.starts_with("cipher-tls1_2_") || suite.id.starts_with("cipher-tls1_3_"),
            "a suite of another protocol: {line}"
        );
        assert!(line.contains(" ECDH "), "no ephemeral ECDH: {line}");
        assert!(
            ["AESGCM", "ChaCha20", "AESCCM"]
                .iter()
                .any(|aead| line.contains(aead)),
            "not AEAD: {line}"
        );
    }

    for id in ["heartbleed", "CCS", "secure_client_renego"] {
        assert!(
            by_id(id).finding.starts_with("not vulnerable"),
            "{id}: {:?}",
            by_id(id).finding
        );
    }
    lb.shutdown().await;
}
