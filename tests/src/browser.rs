//! A real headless Chromium driven over the DevTools protocol: open a page, evaluate
//! JavaScript in it, take a screenshot.
use anyhow::{Context, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium with one page open.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// A GET to Chromium's DevTools HTTP endpoint; it keeps connections open, so the body is
/// read by its Content-Length.
async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let read = async {
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&raw);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok());
                if len.is_some_and(|len| body.len() >= len) {
                    break;
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("DevTools HTTP timed out")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

impl Browser {
    /// Starts Chromium on `url` and attaches to its page.
    pub async fn open(url: &str) -> anyhow::Result<Browser> {
        Self::open_with(url, &[]).await
    }

    /// Like [`Browser::open`], with extra Chromium flags.
    pub async fn open_with(url: &str, flags: &[&str]) -> anyhow::Result<Browser> {
        let profile = tempfile::tempdir()?;
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(flags)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromium (scripts/install-deps.sh installs it)")?;
        let port_file = profile.path().join("DevToolsActivePort");
        let mut port = None;
        for _ in 0..300 {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next()?.parse::<u16>().ok())
            {
                port = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let port = port.context("chromium did not open its DevTools port")?;
        let mut page_ws = None;
        for _ in 0..100 {
            let list: Value =
                serde_json::from_str(&http_get(port, "/json/list").await?).unwrap_or(Value::Null);
            page_ws = list.as_array().and_then(|a| {
                a.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            });
            if page_ws.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let page_ws = page_ws.context("no page target in chromium")?;
        let (ws, _) = tokio_tungstenite::connect_async(page_ws.as_str())
            .await
            .context("attaching to the page")?;
        Ok(Browser {
            child,
            ws,
            next_id: 0,
            _profile: profile,
        })
    }

    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.ws
            .send(Message::Text(
                json!({ "id": id, "method": method, "params": params })
                    .to_string()
                    .into(),
            ))
            .await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .context("DevTools timed out")?;
            let Some(Ok(Message::Text(text))) = msg else {
                bail!("DevTools connection ended")
            };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting promises) and returns its value.
    pub async fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` until it is `true` or `secs` pass.
    pub async fn wait_for(&mut self, expr: &str, secs: u64) -> anyhow::Result<bool> {
        for _ in 0..secs * 10 {
            match self.eval(expr).await {
                Ok(Value::Bool(true)) => return Ok(true),
                Ok(_) => {}
                // The page is between documents (still loading, or reloading): not yet.
                Err(e) if e.to_string().contains("execution context") => {}
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(false)
    }

    /// Saves a PNG screenshot of the page to `path`; returns its size in bytes.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<usize> {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().context("no screenshot data")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, &data)?;
        Ok(data.len())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// JavaScript: how many distinct colours a sample of noVNC's canvas holds. A canvas that
/// received the remote desktop has several (root window, window frames, text); an empty or
/// failed one has at most one.
pub const CANVAS_COLOURS: &str = r#"(() => {
  const c = document.querySelector('#noVNC_container canvas') || document.querySelector('canvas');
  if (!c || c.width < 100) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < d.length; i += 4 * 13) { if (d[i+3] > 0) seen.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]); }
  return seen.size;
})()"#;

/// Opens `url` (a noVNC page) and asserts what a user would see: noVNC connected, a painted
/// canvas, and a screenshot (saved to `shot`) that is not blank. `log` supplies the relevant
/// service log for the failure message.
pub async fn assert_shows_desktop(
    url: &str,
    shot: &Path,
    flags: &[&str],
    log: &dyn Fn() -> String,
) {
    let mut b = Browser::open_with(url, flags).await.expect("chromium");
    let connected = b
        .wait_for(
            "document.documentElement.classList.contains('noVNC_connected')",
            30,
        )
        .await
        .expect("eval");
    assert!(connected, "noVNC did not connect; log:\n{}", log());
    let painted = b
        .wait_for(&format!("{CANVAS_COLOURS} >= 3"), 20)
        .await
        .expect("eval");
    let size = b.screenshot(shot).await.expect("screenshot");
    assert!(painted, "the desktop never appeared on noVNC's canvas");
    assert!(size > 5_000, "screenshot of {size} bytes looks blank");
}
