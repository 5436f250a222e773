//! A real headless Chromium driven over the DevTools protocol (CDP) on a WebSocket: open pages,
//! run JavaScript, type text, press keys, save screenshots.
//!
//! Chromium runs with its own temporary `HOME` and profile, so a CA can be trusted for it alone
//! with NSS `certutil`, the way an operator trusts the CA from `lb certs generate` on a desktop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::process::{READY_WITHIN, system_bin};

/// A running headless Chromium and the DevTools connection to it.
pub struct Browser {
    _child: Child,
    _home: TempDir,
    cdp: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

/// One open tab, addressed by its CDP session.
pub struct Page {
    session: String,
}

impl Browser {
    /// Starts Chromium headless, trusting `ca_file` (PEM) for TLS.
    pub async fn launch(ca_file: &Path) -> Result<Browser> {
        let chromium = system_bin("chromium", "chromium")?;
        let certutil = system_bin("certutil", "libnss3-tools")?;
        let home = tempfile::tempdir().context("cannot create a browser home")?;
        let nssdb = home.path().join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb)?;
        let db = format!("sql:{}", nssdb.display());
        run(Command::new(&certutil).args(["-N", "-d", &db, "--empty-password"])).await?;
        run(Command::new(&certutil)
            .args(["-A", "-d", &db, "-t", "C,,", "-n", "scaleout-test-ca", "-i"])
            .arg(ca_file))
        .await?;

        let mut child = Command::new(chromium)
            .env("HOME", home.path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=800,600",
            ])
            .arg(format!(
                "--user-data-dir={}",
                home.path().join("profile").display()
            ))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start chromium")?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let url = timeout(READY_WITHIN, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return Ok(url.trim().to_string());
                }
            }
            Err(anyhow!("chromium exited before DevTools was listening"))
        })
        .await
        .map_err(|_| anyhow!("chromium did not start within {READY_WITHIN:?}"))??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (cdp, _) = tokio_tungstenite::connect_async(&url)
            .await
            .with_context(|| format!("cannot connect to DevTools at {url}"))?;
        Ok(Browser {
            _child: child,
            _home: home,
            cdp,
            next_id: 0,
        })
    }

    /// Sends one CDP command and returns its result, skipping events in between.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.cdp.send(Message::text(msg.to_string())).await?;
        let reply = async {
            while let Some(frame) = self.cdp.next().await {
                if let Message::Text(text) = frame? {
                    let v: Value = serde_json::from_str(text.as_str())?;
                    if v["id"] == json!(id) {
                        if let Some(err) = v.get("error") {
                            bail!("{method} failed: {err}");
                        }
                        return Ok(v["result"].clone());
                    }
                }
            }
            Err(anyhow!("DevTools connection closed"))
        };
        timeout(Duration::from_secs(30), reply)
            .await
            .map_err(|_| anyhow!("{method}: no reply"))?
    }

    /// Opens a new tab at `url`.
    pub async fn open(&mut self, url: &str) -> Result<Page> {
        let target = self
            .call(None, "Target.createTarget", json!({ "url": url }))
            .await?;
        let target_id = target["targetId"].clone();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id"))?
            .to_string();
        Ok(Page { session })
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub async fn eval(&mut self, page: &Page, expression: &str) -> Result<Value> {
        let result = self
            .call(
                Some(&page.session),
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(ex) = result.get("exceptionDetails") {
            bail!("JavaScript error in {expression:?}: {ex}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expression` until it is `true`, at most `within`.
    pub async fn wait_for(
        &mut self,
        page: &Page,
        expression: &str,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            // A page still loading has no document yet: treat errors as "not yet".
            if let Ok(Value::Bool(true)) = self.eval(page, expression).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("`{expression}` not true within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Focuses the element with this id and types `text` into it as keyboard input.
    pub async fn type_into(&mut self, page: &Page, id: &str, text: &str) -> Result<()> {
        self.eval(page, &format!("document.getElementById({id:?}).focus()"))
            .await?;
        self.call(
            Some(&page.session),
            "Input.insertText",
            json!({ "text": text }),
        )
        .await?;
        Ok(())
    }

    /// Presses and releases Enter in the focused element.
    pub async fn press_enter(&mut self, page: &Page) -> Result<()> {
        for kind in ["keyDown", "keyUp"] {
            let mut params = json!({
                "type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13
            });
            if kind == "keyDown" {
                params["text"] = json!("\r");
            }
            self.call(Some(&page.session), "Input.dispatchKeyEvent", params)
                .await?;
        }
        Ok(())
    }

    /// Saves a PNG screenshot of the page.
    pub async fn screenshot(&mut self, page: &Page, path: &Path) -> Result<PathBuf> {
        let shot = self
            .call(
                Some(&page.session),
                "Page.captureScreenshot",
                json!({ "format": "png" }),
            )
            .await?;
        let data = shot["data"]
            .as_str()
            .ok_or_else(|| anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path.to_path_buf())
    }
}

async fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().await.context("cannot run certutil")?;
    if !out.status.success() {
        bail!(
            "certutil failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
