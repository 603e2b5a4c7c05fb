//! websockify's token files: a file, or a directory of files, with lines `token: host:port`
//! (`#` starts a comment). Re-read when a file's modification time changes, checked at most
//! once a second, so edits take effect without a restart.
use super::{Target, TokenError, TokenSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// A websockify token file or directory.
#[derive(Debug)]
pub struct FileTokens {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    tokens: HashMap<String, (String, u16)>,
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
    checked: Option<Instant>,
}

impl FileTokens {
    /// Reads `path` now (so a bad path fails at start, clearly).
    pub fn open(path: &Path) -> Result<Self, String> {
        let me = FileTokens {
            path: path.to_owned(),
            state: Mutex::default(),
        };
        let mut state = State::default();
        me.reload(&mut state)?;
        *me.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        Ok(me)
    }

    fn files(&self) -> Result<Vec<PathBuf>, String> {
        if self.path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)
                .map_err(|e| format!("token directory {}: {e}", self.path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            Ok(files)
        } else {
            Ok(vec![self.path.clone()])
        }
    }

    fn stamps(&self) -> Result<Vec<(PathBuf, Option<SystemTime>)>, String> {
        Ok(self
            .files()?
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
                (p, m)
            })
            .collect())
    }

    fn reload(&self, state: &mut State) -> Result<(), String> {
        let stamps = self.stamps()?;
        let mut tokens = HashMap::new();
        for (file, _) in &stamps {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("token file {}: {e}", file.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                match parse_line(line) {
                    Some((token, host, port)) => {
                        tokens.insert(token, (host, port));
                    }
                    None => {
                        tracing::warn!(file = %file.display(), line = n + 1, "ignoring a malformed token line")
                    }
                }
            }
        }
        state.tokens = tokens;
        state.stamps = stamps;
        state.checked = Some(Instant::now());
        Ok(())
    }
}

/// `token: host:port` (IPv6 hosts in brackets).
fn parse_line(line: &str) -> Option<(String, String, u16)> {
    let (token, target) = line.split_once(':')?;
    let (token, target) = (token.trim(), target.trim());
    let (host, port) = target.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if token.is_empty() || host.is_empty() {
        return None;
    }
    Some((token.to_owned(), host.to_owned(), port.parse().ok()?))
}

#[async_trait::async_trait]
impl TokenSource for FileTokens {
    async fn resolve(&self, token: &str) -> Result<Target, TokenError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .checked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            let changed = self.stamps().map(|s| s != state.stamps).unwrap_or(true);
            if changed {
                if let Err(e) = self.reload(&mut state) {
                    return Err(TokenError::Unavailable(e));
                }
                tracing::info!(tokens = state.tokens.len(), "token file reloaded");
            }
            state.checked = Some(Instant::now());
        }
        let (host, port) = state
            .tokens
            .get(token)
            .cloned()
            .ok_or(TokenError::Unknown)?;
        Ok(Target {
            host,
            port,
            username: String::new(),
            remote_ip: String::new(),
            expires_at: None,
            password: String::new(),
            cert_sha256: String::new(),
            lease_until: None,
            view_only: false,
            share_id: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_websockify_format_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(
            &f,
            "# comment\nabc: 127.0.0.1:5901\nv6: [::1]:5902  # trailing\nbad line\n",
        )
        .unwrap();
        let src = FileTokens::open(dir.path()).unwrap();
        let t = src.resolve("abc").await.unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 5901));
        assert_eq!(src.resolve("v6").await.unwrap().host, "::1");
        assert!(matches!(
            src.resolve("nope").await,
            Err(TokenError::Unknown)
        ));
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(&f, "new: 10.0.0.1:5999\n").unwrap();
        assert_eq!(src.resolve("new").await.unwrap().port, 5999);
        assert!(matches!(src.resolve("abc").await, Err(TokenError::Unknown)));
    }
}
