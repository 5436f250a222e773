//! Child processes under test: spawn a binary of the workspace (or a system one), wait for its
//! readiness lines on stdout, keep its logs (stderr) to wait on, signal it by PID, and make sure
//! it dies with the test.
//!
//! Readiness is a line, never a sleep: our binaries print `listening <kind> <addr>` once a
//! listener is bound; `redis-server` prints `Ready to accept connections`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

use crate::logs::Log;

/// How long a process may take to print its readiness lines.
pub const READY_WITHIN: Duration = Duration::from_secs(30);
/// How many of its last stdout lines an error about a process that never got ready quotes.
const LAST_LINES: usize = 20;

/// Path of a binary built from this workspace (`app`, `lb`, `bench`): next to the running
/// executable (a binary such as `bench` in `target/<profile>/`) or one directory up from it (a
/// test binary in `target/<profile>/deps/`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("unexpected executable path {}", exe.display()))?;
    if dir.join(name).is_file() {
        return Ok(dir.join(name));
    }
    let dir = dir
        .parent()
        .ok_or_else(|| anyhow!("unexpected executable path {}", exe.display()))?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first with `cargo build -p {name}` (`cargo test --workspace` does)",
            path.display()
        );
    }
    Ok(path)
}

/// Path of a system program, or an error with the exact line that installs it.
pub fn system_bin(name: &str, package: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/bin", "/sbin"] {
        let path = PathBuf::from(dir).join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!(
        "{name} not found: run `apt-get install -y {package}` (tests/run, the README's test \
         command, installs every package the tests need)"
    )
}

/// What a process prints when it is ready.
pub enum Ready<'a> {
    /// Our binaries: one `listening <kind> <addr>` line for each of these kinds.
    Listening(&'a [&'a str]),
    /// Any line containing this text (third-party servers).
    Line(&'a str),
}

/// The last lines a child printed, for an error message; empty when it printed none.
fn quote(lines: &VecDeque<String>) -> String {
    if lines.is_empty() {
        return "; it printed nothing on stdout".to_string();
    }
    let mut out = format!("; its last {} lines on stdout:", lines.len());
    for line in lines {
        out.push_str("\n  ");
        out.push_str(line);
    }
    out
}

/// A running child process, killed when dropped.
pub struct Proc {
    name: String,
    child: Child,
    listening: HashMap<String, SocketAddr>,
    log: Log,
}

impl Proc {
    /// Spawns `cmd` (stdout piped for the readiness lines, stderr kept as its [`Log`] and shown
    /// with the test's output) and waits until it is ready.
    pub async fn spawn(name: &str, mut cmd: Command, ready: Ready<'_>) -> Result<Proc> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: no stdout"))?;
        let log = match child.stderr.take() {
            Some(stderr) => Log::capture(name, stderr),
            None => bail!("{name}: no stderr"),
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut listening = HashMap::new();
        let mut last = VecDeque::with_capacity(LAST_LINES);
        let wait = async {
            while let Some(line) = lines.next_line().await? {
                if last.len() == LAST_LINES {
                    last.pop_front();
                }
                last.push_back(line.clone());
                match &ready {
                    Ready::Line(text) if line.contains(text) => return Ok(()),
                    Ready::Line(_) => {}
                    Ready::Listening(kinds) => {
                        let mut words = line.split_whitespace();
                        if let (Some("listening"), Some(kind), Some(addr)) =
                            (words.next(), words.next(), words.next())
                        {
                            let addr: SocketAddr = addr
                                .parse()
                                .with_context(|| format!("{name}: bad readiness line {line:?}"))?;
                            listening.insert(kind.to_string(), addr);
                        }
                        if kinds.iter().all(|k| listening.contains_key(*k)) {
                            return Ok(());
                        }
                    }
                }
            }
            Err(anyhow!("{name} closed stdout before it was ready"))
        };
        let waited = timeout(READY_WITHIN, wait).await;
        let printed = quote(&last);
        match waited {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let status = child.try_wait().ok().flatten();
                bail!("{e:#} (exit status: {status:?}){printed}");
            }
            Err(_) => bail!("{name} was not ready within {READY_WITHIN:?}{printed}"),
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Proc {
            name: name.to_string(),
            child,
            listening,
            log,
        })
    }

    /// The address of the listener of this kind, as printed by the process.
    pub fn addr(&self, kind: &str) -> SocketAddr {
        match self.listening.get(kind) {
            Some(addr) => *addr,
            None => panic!("{} printed no `listening {kind}` line", self.name),
        }
    }

    /// What it logged (its stderr), to wait on.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The process id, while the process has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `HUP`, `KILL`, ...) to this process by PID.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("{} has already exited", self.name))?;
        let status = std::process::Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -s {signal} {pid} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit by itself, at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        timeout(within, self.child.wait())
            .await
            .map_err(|_| anyhow!("{} did not exit within {within:?}", self.name))?
            .context("wait failed")
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM and waits, at most `within`, for the process to finish its shutdown.
    pub async fn terminate(&mut self, within: Duration) -> Result<ExitStatus> {
        self.signal("TERM")?;
        self.wait_exit(within).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of spawning `sh -c script` as `name`, waiting for a line it never prints.
    async fn never_ready(name: &str, script: &str) -> String {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let err = Proc::spawn(name, cmd, Ready::Line("never printed"))
            .await
            .err()
            .unwrap();
        format!("{err:#}")
    }

    #[tokio::test]
    async fn a_child_that_ends_before_it_is_ready_is_quoted() {
        let text = never_ready("counter", "seq 30; exit 3").await;
        assert!(
            text.contains("counter closed stdout before it was ready"),
            "{text}"
        );
        assert!(text.contains("last 20 lines"), "{text}");
        let last_twenty: String = (11..=30).map(|n| format!("\n  {n}")).collect();
        assert!(text.ends_with(&last_twenty), "{text}");

        let text = never_ready("silent", "exit 0").await;
        assert!(text.contains("printed nothing"), "{text}");
    }
}
