//! The SSH launcher: runs `blade-agent cloudvnc --user USER` on the blade over SSH (russh), the
//! password on stdin, and reads `HOST PID DISPLAY` back — the original's way of reaching blades,
//! without its shell strings and `su`. The blade's host key must be in the configured
//! known_hosts file: an unknown or changed key is refused, never trusted on first use.
//!
//! The remote command's exit code is the refusal contract ([`vncdispatch_proto::refusal`],
//! also in `blade-agent cloudvnc --help`): 10-19 refuse the request with the kind's status
//! code, anything else non-zero fails only this blade. Its stderr is the message and decides
//! nothing. An agent from before the contract exits 1 for every failure, so with it every
//! refusal fails the blade and the caller hears UNAVAILABLE with the agent's message.
use super::{BladeLoad, LaunchError, Launched, Launcher, Passwords};
use crate::store::BladeRecord;
use russh::ChannelMsg;
use russh::client::{self, AuthResult, Handle};
use russh::keys::PrivateKeyWithHashAlg;
use russh::keys::PublicKeyOrCertificate;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Status;
use vncdispatch_proto::refusal::{self, Scope};
use vncdispatch_proto::vencrypt::CertPin;

/// How to reach blades over SSH.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Remote account (root, as the original used; the agent needs it to switch users).
    pub user: String,
    /// Private key file.
    pub key: PathBuf,
    /// known_hosts file holding each blade's host key.
    pub known_hosts: PathBuf,
    /// The blade-agent program on the blade.
    pub remote_program: String,
    /// Desktop options passed to its `cloudvnc`, `status` and `stop` (e.g. `--rfb-listen`).
    /// Every word must be shell-safe: sshd hands the command line to the remote shell.
    pub remote_args: Vec<String>,
    /// Connect and handshake deadline.
    pub connect_timeout: Duration,
    /// Deadline for the whole remote command.
    pub command_timeout: Duration,
}

/// Words that pass through a remote `sh -c` unchanged.
pub fn shell_safe(word: &str) -> bool {
    !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._=:,+-@%".contains(&b))
}

/// Launches over SSH.
#[derive(Debug)]
pub struct SshLauncher {
    cfg: SshConfig,
    key: Arc<russh::keys::PrivateKey>,
}

impl SshLauncher {
    /// Loads the private key and checks the remote command.
    pub fn new(cfg: SshConfig) -> Result<Self, String> {
        let words = std::iter::once(&cfg.remote_program).chain(&cfg.remote_args);
        if let Some(bad) = words.into_iter().find(|w| !shell_safe(w)) {
            return Err(format!("SSH remote command word {bad:?} is not shell-safe"));
        }
        let key = russh::keys::load_secret_key(&cfg.key, None)
            .map_err(|e| format!("SSH key {}: {e}", cfg.key.display()))?;
        Ok(SshLauncher {
            cfg,
            key: Arc::new(key),
        })
    }

    async fn connect(&self, blade: &BladeRecord) -> Result<Handle<HostKeyCheck>, LaunchError> {
        let verdict = Arc::new(Mutex::new(None));
        let check = HostKeyCheck {
            host: blade.host.clone(),
            port: blade.port,
            known_hosts: self.cfg.known_hosts.clone(),
            verdict: verdict.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(self.cfg.command_timeout),
            ..Default::default()
        });
        let fail =
            |what: String| LaunchError::Blade(format!("blade {} over SSH: {what}", blade.name));
        let connect = client::connect(config, (blade.host.as_str(), blade.port), check);
        let mut handle = match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
            Err(_) => {
                return Err(fail(format!(
                    "no SSH handshake within {:?}",
                    self.cfg.connect_timeout
                )));
            }
            Ok(Err(e)) => {
                let why = verdict.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(fail(why.unwrap_or_else(|| e.to_string())));
            }
            Ok(Ok(h)) => h,
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| fail(e.to_string()))?
            .flatten();
        let auth = handle
            .authenticate_publickey(
                &self.cfg.user,
                PrivateKeyWithHashAlg::new(self.key.clone(), hash),
            )
            .await
            .map_err(|e| fail(e.to_string()))?;
        match auth {
            AuthResult::Success => Ok(handle),
            AuthResult::Failure { .. } => Err(fail(format!(
                "key {} not accepted for {}",
                self.cfg.key.display(),
                self.cfg.user
            ))),
        }
    }

    /// Runs `PROGRAM SUBCOMMAND [--user USER] ARGS…` on the blade, feeding `stdin`; returns
    /// (exit status, stdout, stderr).
    async fn run(
        &self,
        blade: &BladeRecord,
        subcommand: &[&str],
        stdin: &[u8],
    ) -> Result<(u32, String, String), LaunchError> {
        let work = async {
            let handle = self.connect(blade).await?;
            let fail =
                |e: russh::Error| LaunchError::Blade(format!("blade {} over SSH: {e}", blade.name));
            let mut channel = handle.channel_open_session().await.map_err(fail)?;
            let mut words = vec![self.cfg.remote_program.clone()];
            words.extend(subcommand.iter().map(|a| a.to_string()));
            if subcommand.len() > 1 {
                words.extend(self.cfg.remote_args.iter().cloned());
            }
            channel.exec(true, words.join(" ")).await.map_err(fail)?;
            channel.data(stdin).await.map_err(fail)?;
            channel.eof().await.map_err(fail)?;
            let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), None);
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } if out.len() < 64 * 1024 => {
                        out.extend_from_slice(&data)
                    }
                    ChannelMsg::ExtendedData { data, .. } if err.len() < 64 * 1024 => {
                        err.extend_from_slice(&data)
                    }
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    _ => {}
                }
            }
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
            let status = status.ok_or_else(|| {
                LaunchError::Blade(format!(
                    "blade {}: remote command ended without an exit status",
                    blade.name
                ))
            })?;
            Ok((
                status,
                String::from_utf8_lossy(&out).into_owned(),
                String::from_utf8_lossy(&err).into_owned(),
            ))
        };
        tokio::time::timeout(self.cfg.command_timeout, work)
            .await
            .map_err(|_| {
                LaunchError::Blade(format!(
                    "blade {}: SSH command took over {:?}",
                    blade.name, self.cfg.command_timeout
                ))
            })?
    }
}

/// What a failed remote command means for the dispatch, from its exit code alone (the
/// contract's table in [`refusal`]); stderr only becomes the message. A refusal gets its
/// kind's status code, as the agent would answer over gRPC; any code outside the table (an
/// old agent's 1, a missing program's 127) fails only this blade.
fn classify(blade: &BladeRecord, exit_status: u32, stderr: &str) -> LaunchError {
    let msg = stderr.trim().trim_start_matches("blade-agent: ").to_owned();
    match refusal::scope_of_exit(exit_status) {
        (Scope::Request, Some(kind)) => LaunchError::Refused(Status::new(kind.code(), msg)),
        (_, Some(refusal::RefusalKind::NoFreeDisplay)) => {
            LaunchError::Full(format!("blade {}: {msg}", blade.name))
        }
        _ => LaunchError::Blade(format!("blade {}: {msg}", blade.name)),
    }
}

#[async_trait::async_trait]
impl Launcher for SshLauncher {
    async fn start(
        &self,
        blade: &BladeRecord,
        username: &str,
        passwords: &Passwords,
        _request_id: &str,
    ) -> Result<Launched, LaunchError> {
        // The username passed the shared rules, so it is shell-safe too.
        let (status, out, err) = self
            .run(
                blade,
                &["cloudvnc", "--user", username],
                // cloudvnc reads the full password, then the view-only one, a line each.
                format!("{}\n{}\n", passwords.full, passwords.view_only).as_bytes(),
            )
            .await?;
        if status != 0 {
            return Err(classify(blade, status, &err));
        }
        let line = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let fields: Vec<&str> = line.split_whitespace().collect();
        // `HOST PID DISPLAY`, then the desktop's certificate pin from agents that make one.
        let (fields, pin) = match fields.as_slice() {
            [rest @ .., pin] if rest.len() == 3 => (rest, CertPin::from_hex(pin).ok()),
            all => (all, None),
        };
        let parsed = match fields {
            [host, pid, display] => pid
                .parse::<u32>()
                .ok()
                .zip(display.parse::<u32>().ok())
                .map(|(p, d)| (host.to_string(), p, d)),
            _ => None,
        };
        let (host, vnc_pid, display) = parsed.ok_or_else(|| {
            LaunchError::Blade(format!(
                "blade {}: expected `HOST PID DISPLAY [PIN]`, got {:?}",
                blade.name,
                line.chars().take(80).collect::<String>()
            ))
        })?;
        Ok(Launched {
            host,
            display,
            port: 5900 + display,
            vnc_pid,
            cert_sha256: pin.map(|p| p.to_hex()).unwrap_or_default(),
            // An older cloudvnc refuses two stdin lines (exit 10): a success took both.
            view_only: true,
        })
    }

    async fn stop(
        &self,
        blade: &BladeRecord,
        username: &str,
        vnc_pid: Option<u32>,
    ) -> Result<bool, LaunchError> {
        let pid = vnc_pid.map(|p| p.to_string());
        let mut args = vec!["stop", "--user", username];
        if let Some(p) = &pid {
            args.extend(["--pid", p]);
        }
        let (mut status, mut out, mut err) = self.run(blade, &args, b"").await?;
        if status == 2 && pid.is_some() {
            // A blade-agent from before `--pid` (a usage error): stop by user, as it knows how.
            (status, out, err) = self.run(blade, &["stop", "--user", username], b"").await?;
        }
        if status != 0 {
            return Err(classify(blade, status, &err));
        }
        Ok(out.trim() == "stopped")
    }

    async fn is_alive(
        &self,
        blade: &BladeRecord,
        username: &str,
        vnc_pid: u32,
    ) -> Result<bool, LaunchError> {
        let (status, out, err) = self
            .run(blade, &["status", "--user", username], b"")
            .await?;
        if status != 0 {
            return Err(classify(blade, status, &err));
        }
        Ok(out
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
            == Some(vnc_pid))
    }

    async fn health(&self, blade: &BladeRecord) -> Result<BladeLoad, LaunchError> {
        // Being let in and finding blade-agent is what matters for SSH blades.
        let (status, _, err) = self.run(blade, &["--version"], b"").await?;
        if status != 0 {
            return Err(LaunchError::Blade(format!(
                "blade {}: {}",
                blade.name,
                err.trim()
            )));
        }
        Ok(BladeLoad::default())
    }
}

/// Checks the server's host key against known_hosts; the reason for a refusal is kept so the
/// error names it.
struct HostKeyCheck {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    verdict: Arc<Mutex<Option<String>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                "the blade offered a host certificate; only known_hosts keys are trusted".into(),
            );
            return Ok(false);
        };
        let result =
            russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts);
        let why = match result {
            Ok(true) => return Ok(true),
            Ok(false) => format!(
                "host key of {}:{} is not in {} (add it: ssh-keyscan -p {} {} >> {})",
                self.host,
                self.port,
                self.known_hosts.display(),
                self.port,
                self.host,
                self.known_hosts.display()
            ),
            Err(russh::keys::Error::KeyChanged { line }) => format!(
                "host key of {}:{} does NOT match line {line} of {} — refusing (possible man-in-the-middle)",
                self.host,
                self.port,
                self.known_hosts.display()
            ),
            Err(e) => format!("reading {}: {e}", self.known_hosts.display()),
        };
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Method;
    use tonic::Code;
    use vncdispatch_proto::refusal::RefusalKind;

    fn blade() -> BladeRecord {
        BladeRecord {
            name: "s1".into(),
            host: "10.0.0.6".into(),
            port: 22,
            method: Method::Ssh,
            draining: false,
            pool: "default".into(),
            max_sessions: 0,
        }
    }

    #[test]
    fn each_exit_code_of_the_contract_decides_as_its_kind() {
        for kind in RefusalKind::ALL {
            let stderr = format!("blade-agent: agent says {kind:?}\n");
            match (
                classify(&blade(), u32::from(kind.exit_code()), &stderr),
                kind.scope(),
            ) {
                (LaunchError::Refused(s), Scope::Request) => {
                    assert_eq!(s.code(), kind.code(), "{kind:?}");
                    assert_eq!(s.message(), format!("agent says {kind:?}"));
                }
                (LaunchError::Blade(why) | LaunchError::Full(why), Scope::Blade) => {
                    assert_eq!(why, format!("blade s1: agent says {kind:?}"));
                }
                (other, scope) => panic!("{kind:?} ({scope:?}) became {other:?}"),
            }
        }
    }

    #[test]
    fn stderr_text_decides_nothing_and_other_exit_codes_fail_the_blade() {
        // What the old text matching refused on, under codes outside the table.
        for text in [
            "no account named \"x\" on this blade",
            "invalid username \"a;b\": ...",
            "refusing to set up a desktop for \"x\": ...",
        ] {
            for exit in [1, 2, 127, 255] {
                assert!(
                    matches!(classify(&blade(), exit, text), LaunchError::Blade(_)),
                    "{exit} {text}"
                );
            }
        }
        // And a refusal code refuses whatever the text says.
        let code = u32::from(RefusalKind::UnknownAccount.exit_code());
        assert!(matches!(
            classify(&blade(), code, "Xvnc failed"),
            LaunchError::Refused(s) if s.code() == Code::NotFound
        ));
    }

    #[test]
    fn shell_safe_words() {
        assert!(shell_safe("--rfb-listen=127.0.0.1"));
        assert!(shell_safe("/usr/local/bin/blade-agent"));
        for bad in ["", "a b", "a;b", "$(id)", "a'b", "a\nb", "`x`"] {
            assert!(!shell_safe(bad), "{bad:?}");
        }
    }
}
