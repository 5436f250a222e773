//! Binary upgrade of the real binary (SIGUSR2): the new process takes the https, redirect and
//! admin listeners over while a client keeps connecting (not one connection refused or
//! failed), tunnels opened before it keep echoing on the old process until the upgrade grace
//! and are cut after it, the old process then exits, new connections are served by the new
//! one (its pid in `/stats`, its `MAINPID=` to systemd's notify socket), and a session ticket
//! the old process issued resumes on the new one. A handover that fails (a bad configuration;
//! a missing handover socket) leaves the old process serving.
// Test code: an unwrap that fails is a failing test, with its location.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::support::*;
use testkit::http::http_get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixDatagram;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Tunnels opened before the upgrade.
const TUNNELS: usize = 8;

/// Clients connecting in parallel during the upgrade.
const CLIENTS: usize = 4;

/// Most connections each of them opens.
const MAX_CONNECTS: usize = 2000;

/// The next message lb sent to the notify socket.
async fn next_notify(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = within("a notify message", socket.recv(&mut buf))
        .await
        .expect("receive a notify message");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The pid in a `READY=1` notification.
fn ready_pid(message: &str) -> u32 {
    assert!(message.contains("READY=1"), "{message:?}");
    message
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {message:?}"))
}

/// Waits for the first line lb (or its successor) logged that contains `text`; returns it.
async fn wait_for_log(lb: &LbProcess, text: &str) -> String {
    match lb.log.wait_for(text, DEADLINE).await {
        Ok(line) => line,
        Err(e) => panic!("{e:#}"),
    }
}

/// The pid of the process answering on the admin listener.
async fn admin_pid(admin: SocketAddr) -> u32 {
    let answer = http_get(admin, "/stats").await.unwrap().text();
    let at = answer.find("\"pid\":").expect("pid in /stats") + "\"pid\":".len();
    answer[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a pid")
}

/// One new TLS connection with one request answered 200; the error otherwise.
async fn one_connect(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> Result<(), String> {
    let mut tls = tls_connect_with(config, addr, "localhost")
        .await
        .map_err(|e| format!("connect/handshake: {e}"))?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("answer: {:?}", String::from_utf8_lossy(&answer)))
    }
}

/// [`CLIENTS`] clients connecting again and again in the background (one request per
/// connection), counting what succeeded and keeping every failure.
struct ConnectLoop {
    ok: Arc<AtomicUsize>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl ConnectLoop {
    fn start(pki: &Pki, addr: SocketAddr) -> ConnectLoop {
        let ok = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let config = pki.client_config();
        let tasks = (0..CLIENTS)
            .map(|_| {
                let (counted, stopped) = (Arc::clone(&ok), stop.clone());
                let config = Arc::clone(&config);
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    for _ in 0..MAX_CONNECTS {
                        if stopped.is_cancelled() {
                            break;
                        }
                        let connect = one_connect(Arc::clone(&config), addr);
                        match within("one connection", connect).await {
                            Ok(()) => {
                                counted.fetch_add(1, Relaxed);
                            }
                            Err(e) => failures.push(e),
                        }
                    }
                    failures
                })
            })
            .collect();
        ConnectLoop { ok, stop, tasks }
    }

    fn ok(&self) -> usize {
        self.ok.load(Relaxed)
    }

    /// Waits until `more` further connections have succeeded.
    async fn wait_for(&self, more: usize) {
        let target = self.ok() + more;
        wait_until("connections served", || self.ok() >= target).await;
    }

    /// Stops it; every failure it saw.
    async fn finish(self) -> Vec<String> {
        self.stop.cancel();
        let mut failures = Vec::new();
        for task in self.tasks {
            let seen = within("a connect loop ends", task).await;
            failures.extend(seen.expect("connect loop"));
        }
        failures
    }
}

/// A process this test caused to start (the successor), stopped by its pid when dropped.
struct Successor(u32);

impl Successor {
    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.0.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.0);
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}

/// Starts `lb run --config PATH` with a notify socket; the process, its notify socket and its
/// pid (from its first notification).
async fn start_notifying(path: &Path, dir: &Path, expect: usize) -> (LbProcess, UnixDatagram, u32) {
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let lb = LbProcess::start_with_env(
        &["run", "--config", path.to_str().unwrap()],
        expect,
        &[("NOTIFY_SOCKET", &notify_path)],
    )
    .await;
    let pid = ready_pid(&next_notify(&notify).await);
    assert_eq!(Some(pid), lb.child.id());
    (lb, notify, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_the_listeners_over_without_a_failed_connect_and_tunnels_last_the_grace() {
    const GRACE: std::time::Duration = std::time::Duration::from_secs(5);
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&pki, &[&backend]);
    config.admin = true;
    config.redirect = true;
    config.timeouts = format!("upgrade_grace = \"{}s\"\n", GRACE.as_secs());
    let path = pki.dir.path().join("lb.toml");
    config.write(&path);
    let (mut old, notify, old_pid) = start_notifying(&path, pki.dir.path(), 3).await;
    let (https, redirect, admin) = (old.addr("https"), old.addr("redirect"), old.addr("admin"));
    assert_eq!(admin_pid(admin).await, old_pid);

    // A session from the old process, and tunnels through it.
    let resuming = resuming_client(&pki, &rustls::version::TLS13);
    let first = handshake_kind_of_one_request(Arc::clone(&resuming), https).await;
    assert_eq!(first, Some(rustls::HandshakeKind::Full));
    let mut tunnels = Vec::with_capacity(TUNNELS);
    for i in 0..TUNNELS {
        let mut ws = ws_connect(&pki, https, "/ws").await;
        ws_echo(&mut ws, Message::text(format!("tunnel {i} before"))).await;
        tunnels.push(ws);
    }
    let client = ConnectLoop::start(&pki, https);
    client.wait_for(10).await;

    old.signal("USR2");
    let signalled = std::time::Instant::now();
    let new_pid = ready_pid(&next_notify(&notify).await);
    let successor = Successor(new_pid);
    assert_ne!(new_pid, old_pid);
    let line = wait_for_log(&old, "upgrade complete").await;
    assert!(line.contains(&format!("new_pid={new_pid}")), "{line}");

    // The old process accepts nothing now: every new connection is the new process's.
    client.wait_for(20).await;
    assert_eq!(admin_pid(admin).await, new_pid);
    assert_eq!(http_get(redirect, "/x").await.unwrap().status, 301);
    let resumed = handshake_kind_of_one_request(resuming, https).await;
    assert_eq!(resumed, Some(rustls::HandshakeKind::Resumed));
    for (i, ws) in tunnels.iter_mut().enumerate() {
        ws_echo(ws, Message::text(format!("tunnel {i} after"))).await;
    }
    let served = client.ok();
    let failures = client.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed connects: {failures:?}",
        failures.len()
    );
    assert!(served >= 30, "{served}");

    // After the grace the old process cuts what is left and exits.
    let status = within("the old process exits after the grace", old.child.wait())
        .await
        .expect("wait for the old process");
    assert!(status.success(), "{status}");
    for ws in &mut tunnels {
        assert_eq!(ws_end(ws).await, WsEnd::Cut);
    }
    // The grace is counted from the handover, which came after the signal.
    let lasted = signalled.elapsed();
    assert!(
        lasted >= GRACE,
        "tunnels cut after {lasted:?}, before the {GRACE:?} grace"
    );
    wait_until("the backend saw the tunnels end", || backend.ws_open() == 0).await;
    let mut fresh = ws_connect(&pki, https, "/ws").await;
    ws_echo(&mut fresh, Message::text("through the new process")).await;
    drop(fresh);

    successor.signal("TERM");
    assert_eq!(next_notify(&notify).await, "STOPPING=1\n");
    wait_until("the new process stops listening", || {
        std::net::TcpStream::connect(https).is_err()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handover_leaves_the_old_process_serving() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&pki, &[&backend]);
    config.admin = true;
    config.timeouts = "upgrade_grace = \"3s\"\n".into();
    let path = pki.dir.path().join("lb.toml");
    config.write(&path);
    let (mut old, notify, old_pid) = start_notifying(&path, pki.dir.path(), 2).await;
    let (https, admin) = (old.addr("https"), old.addr("admin"));
    let mut tunnel = ws_connect(&pki, https, "/ws").await;

    // The new binary finds its configuration invalid: it says why and exits 64.
    let mut bad = config.clone();
    bad.policy = "random".into();
    bad.write(&path);
    old.signal("USR2");
    let error = wait_for_log(&old, "balance.policy").await;
    assert!(error.contains(path.to_str().unwrap()), "{error}");
    let failed = wait_for_log(&old, "upgrade failed").await;
    assert!(failed.contains("exit status: 64"), "{failed}");
    assert_eq!(admin_pid(admin).await, old_pid);
    assert_eq!(https_get(&pki, https, "/").await.status, 200);
    ws_echo(&mut tunnel, Message::text("still open")).await;
    assert!(old.child.try_wait().unwrap().is_none());

    // A process told to take over from a socket that is not there exits 1, saying so.
    let missing = pki.dir.path().join("no-such.sock");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["run", "--config", path.to_str().unwrap()])
        .env("LB_TAKEOVER_FROM", &missing)
        .output()
        .expect("run lb");
    // The file is still the bad one: the configuration is judged first.
    assert_eq!(out.status.code(), Some(64));
    config.write(&path);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["run", "--config", path.to_str().unwrap()])
        .env("LB_TAKEOVER_FROM", &missing)
        .output()
        .expect("run lb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "lb: upgrade: could not reach the running lb at {}",
            missing.display()
        )),
        "{stderr}"
    );
    assert_eq!(admin_pid(admin).await, old_pid);

    // With the file fixed, the next SIGUSR2 succeeds.
    old.signal("USR2");
    let new_pid = ready_pid(&next_notify(&notify).await);
    let successor = Successor(new_pid);
    wait_for_log(&old, "upgrade complete").await;
    assert_eq!(admin_pid(admin).await, new_pid);
    ws_echo(&mut tunnel, Message::text("still on the old process")).await;
    let status = within("the old process exits", old.child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    successor.signal("TERM");
    assert_eq!(next_notify(&notify).await, "STOPPING=1\n");
}
