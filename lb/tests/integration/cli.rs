//! The real `lb` binary: `lb check` exit codes and messages, `lb certs generate` files, modes
//! (whatever the umask), overwrite protection and trust instructions, and quick mode serving from
//! flags alone.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use crate::support::*;

fn lb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run lb")
}

/// `lb` run with a strict umask (077), as a hardened account or service unit has: the modes
/// of the files it writes must not depend on it.
fn lb_under_strict_umask(args: &[&str]) -> Output {
    Command::new("sh")
        .args([
            "-c",
            "umask 077 && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_lb"),
        ])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run lb through sh")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn check_accepts_a_valid_file() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let path = pki.dir.path().join("lb.toml");
    TestConfig::new(&pki, &[&backend]).write(&path);
    let out = lb(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("configuration is valid"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn check_accepts_the_shipped_example_once_its_certificate_exists() {
    // config/lb.toml names ../run/certs/server.pem; give it one in a copy of the layout.
    let root = TempDir::new("example");
    std::fs::create_dir_all(root.path().join("config")).unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/lb.toml");
    let copy = root.path().join("config/lb.toml");
    std::fs::copy(example, &copy).unwrap();
    let generated = lb(&[
        "certs",
        "generate",
        "--out",
        root.path().join("run/certs").to_str().unwrap(),
    ]);
    assert_eq!(generated.status.code(), Some(0), "{}", stderr(&generated));
    let out = lb(&["check", "--config", copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn check_names_file_key_and_reason_and_exits_64() {
    let dir = TempDir::new("check");
    let cases: &[(&str, &str)] = &[
        (
            "[timeouts]\ntunnel_idle = \"forever\"\n",
            "timeouts.tunnel_idle: \"forever\" is not a duration",
        ),
        (
            "[limits]\nmax_header_bytes = 10\n",
            "limits.max_header_bytes: 10 is out of range",
        ),
        (
            "[listen]\nhttps = \"443\"\n",
            "listen.https: \"443\" is not an IP:port address",
        ),
        (
            "[timeouts]\ntunel_idle = \"1h\"\n",
            "unknown field `tunel_idle`",
        ),
        ("", "certificates: at least one certificate is required"),
    ];
    // Valid except for the case's key: the certificate is not read, as validation fails first.
    let base = "[[certificates]]\npem = \"site.pem\"\n[[backends]]\naddr = \"127.0.0.1:9\"\n";
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        let text = if text.is_empty() {
            String::new()
        } else {
            format!("{base}{text}")
        };
        std::fs::write(&path, &text).unwrap();
        let out = lb(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{text:?}");
        let err = stderr(&out);
        assert!(err.contains(path.to_str().unwrap()), "{text:?}: {err}");
        assert!(err.contains(expected), "{text:?}: {err}");
    }
    let out = lb(&["check", "--config", "/nonexistent/lb.toml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("/nonexistent/lb.toml: could not read"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn check_reports_an_unloadable_certificate() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let path = pki.dir.path().join("lb.toml");
    let mut config = TestConfig::new(&pki, &[&backend]);
    let mut check = |cert: &std::path::Path, key: &std::path::Path| {
        config.certificates = format!("[[certificates]]\ncert = {cert:?}\nkey = {key:?}\n");
        config.write(&path);
        let out = lb(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64));
        stderr(&out)
    };
    // The key field names a file without a key: the error names that field.
    let err = check(&pki.cert, &pki.cert);
    assert!(err.contains("certificates[0].key"), "{err}");
    assert!(err.contains("no private key found"), "{err}");
    // The cert field names a file without a certificate.
    let err = check(&pki.key, &pki.key);
    assert!(err.contains("certificates[0].cert"), "{err}");
    assert!(err.contains("no certificate found"), "{err}");
}

#[test]
fn certs_generate_writes_private_keys_refuses_to_overwrite_and_explains_trust() {
    let dir = TempDir::new("generate");
    let out_dir = dir.path().join("certs");
    let out_dir = out_dir.to_str().unwrap();
    let out = lb_under_strict_umask(&[
        "certs",
        "generate",
        "--out",
        out_dir,
        "--host",
        "chat.example.test",
        "--host",
        "10.0.0.5",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for hint in [
        "ca.crt",
        "--cacert",
        "update-ca-certificates",
        "certutil",
        "server.pem",
    ] {
        assert!(text.contains(hint), "missing {hint}: {text}");
    }
    for (file, mode) in [
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
        ("server.crt", 0o644),
        ("server.key", 0o600),
        ("server.pem", 0o600),
    ] {
        let meta = std::fs::metadata(format!("{out_dir}/{file}")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let chain = certs::load_combined(format!("{out_dir}/server.pem").as_ref()).unwrap();
    assert_eq!(chain.dns_names(), vec!["chat.example.test"]);
    let key_before = std::fs::read(format!("{out_dir}/server.key")).unwrap();

    let again = lb(&["certs", "generate", "--out", out_dir]);
    assert_eq!(again.status.code(), Some(64));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(
        std::fs::read(format!("{out_dir}/server.key")).unwrap(),
        key_before
    );

    let forced = lb(&["certs", "generate", "--out", out_dir, "--force"]);
    assert_eq!(forced.status.code(), Some(0), "{}", stderr(&forced));
    assert_ne!(
        std::fs::read(format!("{out_dir}/server.key")).unwrap(),
        key_before
    );

    let bad = lb(&[
        "certs", "generate", "--out", out_dir, "--force", "--host", "bad host",
    ]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(stderr(&bad).contains("bad host"), "{}", stderr(&bad));
}

#[tokio::test]
async fn quick_mode_serves_from_flags_alone_and_drains_on_sigterm() {
    let pki = Pki::local();
    let backends = TestBackend::start_many(2).await;
    let mut lb = LbProcess::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backends[0].addr().to_string(),
            "--backend",
            &backends[1].addr().to_string(),
            "--cert",
            pki.cert.to_str().unwrap(),
            "--key",
            pki.key.to_str().unwrap(),
        ],
        1,
    )
    .await;
    assert_eq!(lb.listening.len(), 1);
    let addr = lb.addr("https");
    let mut conn = HttpsConn::open(&pki, addr).await;
    let first = conn.get("/").await;
    let second = conn.get("/").await;
    assert_eq!(first.status, 200);
    assert_ne!(
        first.text(),
        second.text(),
        "round-robin over both backends"
    );
    drop(conn);
    lb.signal("TERM");
    let status = within("exit after SIGTERM", lb.child.wait()).await.unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn flags_override_the_file_and_missing_pieces_exit_64() {
    let pki = Pki::local();
    let in_file = TestBackend::start("in-file").await;
    let on_flag = TestBackend::start("on-flag").await;
    let path = pki.dir.path().join("lb.toml");
    let mut config = TestConfig::new(&pki, &[&in_file]);
    config.admin = true;
    config.write(&path);
    let running = LbProcess::start(
        &[
            "run",
            "--config",
            path.to_str().unwrap(),
            "--backend",
            &on_flag.addr().to_string(),
        ],
        2,
    )
    .await;
    let res = https_get(&pki, running.addr("https"), "/").await;
    assert_eq!(res.backend(), Some("on-flag"));
    assert!(in_file.requests().is_empty());
    drop(running);

    let out = lb(&[
        "--listen",
        "127.0.0.1:0",
        "--pem",
        pki.pem.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("<command line>: backends:"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_busy_listen_address_exits_1_and_a_missing_certificate_exits_64() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let backend_addr = backend.addr().to_string();
    let pem = pki.pem.to_str().unwrap();
    let out = lb(&[
        "--listen",
        &busy_addr,
        "--backend",
        &backend_addr,
        "--pem",
        pem,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("could not listen on {busy_addr} (listen.https)")),
        "{}",
        stderr(&out)
    );
    let out = lb(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend_addr,
        "--pem",
        "/nonexistent/site.pem",
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("certificates[0].pem"),
        "{}",
        stderr(&out)
    );
}
