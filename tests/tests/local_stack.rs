//! The newcomer's experiment, as the README's quick start has it: `deploy/local/up` brings the
//! stack up (run as it is, on ephemeral ports and a temporary state folder, with the binaries
//! already built), a page in headless Chromium is connected through `lb`, and the app that page
//! is on is restarted with `deploy/local/up restart APP`. The page carries on through the other
//! app: it shows one status line for the outage, "back: nothing missed", and every message once,
//! including those sent while it was away. Stopping `up` (SIGTERM, as Ctrl-C) stops every part
//! it started.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use tempfile::TempDir;
use testkit::process::{Proc, Ready, workspace_bin};
use testkit::redis::free_port;
use testkit::wait::eventually;
use tests::browser::{Browser, Page};
use tests::client::ChatClient;
use tests::stack::lb_backends;
use tokio::process::Command;

const WITHIN: Duration = Duration::from_secs(20);
/// The line `deploy/local/up` prints last once every part is ready.
const UP: &str = "Ctrl-C stops everything.";

/// `deploy/local/up` running in its own process group, with its state in a temporary folder.
struct LocalStack {
    up: Proc,
    /// The process group `up` leads: what is left of it is killed if the test fails midway.
    group: u32,
    run: TempDir,
    bin: PathBuf,
    redis_port: u16,
}

impl LocalStack {
    async fn start() -> Result<LocalStack> {
        let run = tempfile::tempdir().context("cannot create the state folder")?;
        let bin = workspace_bin("app")?
            .parent()
            .ok_or_else(|| anyhow!("the app binary has no folder"))?
            .to_path_buf();
        let redis_port = free_port()?;
        let mut cmd = Command::new(script());
        env(&mut cmd, run.path(), &bin, redis_port);
        cmd.process_group(0);
        let up = Proc::spawn("deploy/local/up", cmd, Ready::Line(UP)).await?;
        let group = up
            .pid()
            .ok_or_else(|| anyhow!("deploy/local/up exited at once"))?;
        Ok(LocalStack {
            up,
            group,
            run,
            bin,
            redis_port,
        })
    }

    /// The address a part printed in its `listening KIND ADDR` line (in `run/NAME.out`).
    fn listening(&self, part: &str, kind: &str) -> Result<SocketAddr> {
        let path = self.run.path().join(format!("{part}.out"));
        let out = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let prefix = format!("listening {kind} ");
        let addr = out
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .ok_or_else(|| anyhow!("{} has no `{prefix}ADDR` line", path.display()))?;
        addr.parse()
            .with_context(|| format!("bad address in {}", path.display()))
    }

    /// The PID in `run/NAME.pid`.
    fn pid(&self, part: &str) -> Result<u32> {
        let path = self.run.path().join(format!("{part}.pid"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("bad PID in {}", path.display()))
    }

    /// `deploy/local/up restart PART`: its output, once the part is ready again.
    async fn restart(&self, part: &str) -> Result<String> {
        let mut cmd = Command::new(script());
        env(&mut cmd, self.run.path(), &self.bin, self.redis_port);
        cmd.args(["restart", part]).kill_on_drop(true);
        let out = tokio::time::timeout(WITHIN, cmd.output())
            .await
            .map_err(|_| anyhow!("deploy/local/up restart {part}: no end within {WITHIN:?}"))?
            .context("cannot run deploy/local/up restart")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "deploy/local/up restart {part} failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        // After a clean stop the group is empty and this finds nothing.
        let _ = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.group)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/up")
}

/// Every port ephemeral (Redis: one that was free, since it takes 0 as "no TCP"), the state in
/// `run`, the binaries of this build.
fn env(cmd: &mut Command, run: &Path, bin: &Path, redis_port: u16) {
    cmd.env("SCALEOUT_RUN", run)
        .env("SCALEOUT_BIN", bin)
        .env("SCALEOUT_REDIS_PORT", redis_port.to_string());
    for port in ["HTTPS", "REDIRECT", "ADMIN", "APP1", "APP2"] {
        cmd.env(format!("SCALEOUT_{port}_PORT"), "0");
    }
}

/// Which app (`app1` or `app2`) holds the page's one WebSocket tunnel, as `lb` reports it.
async fn app_of_the_page(stack: &LocalStack) -> Result<&'static str> {
    let admin = stack.listening("lb", "admin")?;
    let apps = [
        ("app1", stack.listening("app1", "http")?),
        ("app2", stack.listening("app2", "http")?),
    ];
    let found = Mutex::new(None);
    eventually("the page's tunnel through lb", WITHIN, || async {
        let backends = lb_backends(admin).await?;
        let busy: Vec<_> = backends.iter().filter(|b| b.tunnels_active > 0).collect();
        let [one] = busy.as_slice() else {
            return Ok(false);
        };
        ensure!(
            one.tunnels_active == 1,
            "{} tunnels for one page",
            one.tunnels_active
        );
        let app = apps
            .iter()
            .find(|(_, addr)| one.name == addr.to_string())
            .map(|(name, _)| *name)
            .ok_or_else(|| anyhow!("lb's backend {} is neither app", one.name))?;
        *found.lock().unwrap_or_else(PoisonError::into_inner) = Some(app);
        Ok(true)
    })
    .await?;
    found
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .ok_or_else(|| anyhow!("no tunnel found"))
}

/// Sends `content` and waits until the server has published it (the sender gets it back).
async fn publish(client: &mut ChatClient, content: &str) -> Result<()> {
    client.send("bob", content).await?;
    let echo = client.recv().await?;
    ensure!(echo["content"] == content, "unexpected frame {echo}");
    Ok(())
}

fn shows(text: &str) -> String {
    format!("document.getElementById('messages').textContent.includes({text:?})")
}

/// The page's list as `kind:text` items joined by `|`: `message:CONTENT`, `status:TEXT`,
/// `note:TEXT` or `error:TEXT`.
async fn list(page: &Page) -> Result<String> {
    let value = page
        .eval(
            "Array.from(document.querySelectorAll('#messages li')).map(function (li) { \
               var content = li.querySelector('.content'); \
               if (content) { return 'message:' + content.textContent; } \
               return li.className.split(' ')[0] + ':' + li.textContent; \
             }).join('|')",
        )
        .await?;
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the list is not text: {value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_carries_on_while_its_app_is_restarted_by_the_local_stack() -> Result<()> {
    let mut stack = LocalStack::start().await?;
    let parts: Vec<u32> = ["redis", "app1", "app2", "lb"]
        .iter()
        .map(|part| stack.pid(part))
        .collect::<Result<_>>()?;
    let https = stack.listening("lb", "https")?;
    let browser = Browser::launch(&stack.run.path().join("certs/ca.crt")).await?;
    let page = browser
        .open(&format!("https://localhost:{}/", https.port()))
        .await?;
    let connected = "document.getElementById('state').dataset.state === 'connected'";
    page.wait_for(connected, WITHIN).await?;

    let dies = app_of_the_page(&stack).await?;
    let lives = if dies == "app1" { "app2" } else { "app1" };
    // The sender is attached to the other app directly, so it outlives the page's app.
    let survivor = format!("ws://{}/ws", stack.listening(lives, "http")?);
    let mut sender = ChatClient::connect(&survivor, None).await?;
    publish(&mut sender, "before").await?;
    page.wait_for(&shows("before"), WITHIN).await?;

    // The restart drains the app (its clients get 1001 at the end of its grace) and starts it
    // again on its port; meanwhile the page says it is reconnecting, and misses nothing sent.
    let before = stack.pid(dies)?;
    let away = async {
        page.wait_for(
            "document.querySelectorAll('#messages li.status').length > 0",
            WITHIN,
        )
        .await?;
        for i in 1..=3 {
            publish(&mut sender, &format!("away-{i}")).await?;
        }
        anyhow::Ok(())
    };
    let (said, away) = tokio::join!(stack.restart(dies), away);
    let said = said?;
    away?;
    ensure!(
        said.starts_with(&format!("{dies}: restarted, listening on")),
        "deploy/local/up restart {dies} said: {said}"
    );
    ensure!(
        stack.pid(dies)? != before,
        "{dies} has the PID it had before the restart"
    );

    page.wait_for(connected, WITHIN).await?;
    page.wait_for(&shows("away-3"), WITHIN).await?;
    publish(&mut sender, "after").await?;
    page.wait_for(&shows("after"), WITHIN).await?;
    page.wait_for(
        "document.querySelector('#messages li.status').textContent.indexOf('back:') === 0",
        WITHIN,
    )
    .await?;
    let shown = list(&page).await?;
    let messages: Vec<&str> = shown
        .split('|')
        .filter_map(|item| item.strip_prefix("message:"))
        .collect();
    assert_eq!(
        messages,
        ["before", "away-1", "away-2", "away-3", "after"],
        "the page shows: {shown}"
    );
    let others: Vec<&str> = shown
        .split('|')
        .filter(|item| !item.starts_with("message:"))
        .collect();
    let [status] = others.as_slice() else {
        bail!("expected one status line for the outage, the page shows: {shown}");
    };
    ensure!(
        status.starts_with("status:back: nothing missed"),
        "the outage ended with {status:?}; the page shows: {shown}"
    );

    // The stack stops as on Ctrl-C, and takes every part with it.
    let restarted_app = stack.pid(dies)?;
    stack.up.terminate(WITHIN).await?;
    let mut left = Vec::new();
    for pid in parts.iter().copied().chain([restarted_app]) {
        if Path::new(&format!("/proc/{pid}")).exists() {
            left.push(pid);
        }
    }
    ensure!(left.is_empty(), "still running after up stopped: {left:?}");
    ensure!(
        !stack.run.path().join("up.pid").exists(),
        "up.pid left behind"
    );
    drop(browser);
    Ok(())
}
