//! A real headless Chromium driven over the DevTools protocol (CDP) with `chromiumoxide`: open
//! pages, run JavaScript, type into fields key by key, press keys, save screenshots.
//!
//! Chromium runs with its own temporary `HOME` and profile, so a CA can be trusted for it alone
//! with NSS `certutil`, the way an operator trusts the CA from `lb certs generate` on a desktop.
//! Certificate errors are not ignored: a page over `https://` loads only if that CA is trusted.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{BrowserConfig, handler::Handler};
use futures_util::StreamExt;
use serde_json::Value;
use tempfile::TempDir;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use testkit::process::{READY_WITHIN, system_bin};
use testkit::wait::eventually;

/// Chromium's flags beyond headless, no sandbox, the profile and the window size (which the
/// builder adds): nothing in the background, no QUIC, nothing but what the test asks for.
const FLAGS: [&str; 7] = [
    "disable-gpu",
    "disable-quic",
    "no-first-run",
    "disable-background-networking",
    "disable-component-update",
    "disable-sync",
    "disable-dev-shm-usage",
];

/// How long one step (open a page, evaluate, type, press, screenshot) may take: a promise
/// that never settles in a page would otherwise hang the test.
const STEP_WITHIN: Duration = Duration::from_secs(30);

/// A running headless Chromium and the DevTools connection to it; Chromium is killed when
/// this is dropped.
pub struct Browser {
    browser: chromiumoxide::Browser,
    /// Drives the DevTools connection: every command's reply and every event goes through it.
    handler: JoinHandle<()>,
    /// `HOME` (with the NSS database) and the profile; removed after Chromium is gone.
    _home: TempDir,
}

/// One open tab.
pub struct Page {
    page: chromiumoxide::Page,
}

impl Browser {
    /// Starts Chromium headless, trusting `ca_file` (PEM) for TLS.
    pub async fn launch(ca_file: &Path) -> Result<Browser> {
        let chromium = system_bin("chromium", "chromium")?;
        let home = trusting_home(ca_file).await?;
        let config = BrowserConfig::builder()
            .chrome_executable(chromium)
            .disable_default_args()
            .args(FLAGS)
            .arg(("remote-debugging-address", "127.0.0.1"))
            .no_sandbox()
            .user_data_dir(home.path().join("profile"))
            .env("HOME", home.path().to_string_lossy())
            .window_size(800, 600)
            .viewport(None)
            .respect_https_errors()
            .launch_timeout(READY_WITHIN)
            .build()
            .map_err(|e| anyhow!("chromium configuration: {e}"))?;
        let (browser, handler) = chromiumoxide::Browser::launch(config)
            .await
            .context("cannot start chromium")?;
        Ok(Browser {
            browser,
            handler: tokio::spawn(drive(handler)),
            _home: home,
        })
    }

    /// Opens a new tab at `url`.
    pub async fn open(&self, url: &str) -> Result<Page> {
        let page = bounded(&format!("opening {url}"), self.browser.new_page(url)).await?;
        Ok(Page { page })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromiumoxide starts Chromium with kill_on_drop; the connection's task goes with it.
        self.handler.abort();
    }
}

impl Page {
    /// Evaluates a JavaScript expression in the page and returns its value (a promise is
    /// awaited).
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        let what = format!("evaluating {expression:?}");
        let result = bounded(&what, self.page.evaluate_expression(expression)).await?;
        Ok(result.value().cloned().unwrap_or(Value::Null))
    }

    /// Polls `expression` until it is `true`, at most `within`.
    pub async fn wait_for(&self, expression: &str, within: Duration) -> Result<()> {
        // A page still loading has no document yet: an error counts as "not yet".
        eventually(&format!("`{expression}`"), within, || async {
            Ok(self.eval(expression).await? == Value::Bool(true))
        })
        .await
    }

    /// Focuses the element with this id and types `text` into it, key by key.
    pub async fn type_into(&self, id: &str, text: &str) -> Result<()> {
        // Focus, not `Element::click`: a click first waits for an IntersectionObserver, which
        // never reports in a tab that is not in front (page 1 once page 2 is open).
        let typing = async {
            let element = self.page.find_element(format!("#{id}")).await?;
            element.focus().await?.type_str(text).await?;
            Ok(())
        };
        bounded(&format!("typing into #{id}"), typing).await
    }

    /// Presses and releases Enter in the focused element.
    pub async fn press_enter(&self) -> Result<()> {
        let pressing = async {
            let focused = self.page.find_element(":focus").await?;
            focused.press_key("Enter").await?;
            Ok(())
        };
        bounded("pressing Enter in the focused element", pressing).await
    }

    /// Saves a PNG screenshot of the page.
    pub async fn screenshot(&self, path: &Path) -> Result<PathBuf> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let png = ScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .build();
        let what = format!("saving a screenshot to {}", path.display());
        bounded(&what, self.page.save_screenshot(png, path)).await?;
        Ok(path.to_path_buf())
    }
}

/// Runs one DevTools step, at most [`STEP_WITHIN`]; errors name `what` was being done.
async fn bounded<T>(
    what: &str,
    step: impl Future<Output = chromiumoxide::error::Result<T>>,
) -> Result<T> {
    match timeout(STEP_WITHIN, step).await {
        Ok(done) => done.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no answer within {STEP_WITHIN:?}"),
    }
}

/// A temporary `HOME` whose NSS database (`~/.pki/nssdb`, where Chromium on Linux looks)
/// trusts `ca_file` to identify servers.
async fn trusting_home(ca_file: &Path) -> Result<TempDir> {
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
    Ok(home)
}

/// Runs the DevTools connection until it ends (Chromium gone) or fails.
async fn drive(mut handler: Handler) {
    while let Some(event) = handler.next().await {
        if let Err(e) = event {
            eprintln!("chromium DevTools connection: {e}");
            break;
        }
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
