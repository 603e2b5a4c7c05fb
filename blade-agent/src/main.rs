//! The `blade-agent` command: `serve`, `cloudvnc`, `status`, `stop`, `init-secret`, and the
//! internal `session-helper`.
//!
//! `cloudvnc`, `status` and `stop` are what the dispatcher runs over SSH. Their exit code is
//! the refusal contract of [`vncdispatch_proto::refusal`]: 0 success; 10-19 the request is
//! refused on every blade (10 invalid request, 11 unknown account, 12 system account, 13 unsafe
//! home, 14 account denied by PAM); 20-29 only this blade failed (20 no free display, 21 start timeout, 22 start failed,
//! 23 agent failed); 1 any other failure; 2 bad arguments. stderr carries the message, for
//! people only.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
use anyhow::Context;
use blade_agent::agent::Agent;
use blade_agent::config::DesktopConfig;
use blade_agent::error::AgentError;
use blade_agent::helper;
use clap::{Parser, Subcommand};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use vncdispatch_proto::bearer::SharedSecret;

/// Starts users' TigerVNC desktops on this blade for the vncdispatch dispatcher.
///
/// Runs as root (it switches to each user to start their desktop). Every option can also be
/// given as the environment variable shown with it.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the BladeAgent gRPC API (what systemd runs).
    Serve {
        /// TOML file of settings keyed by these options' long names (`listen = "…"`); the
        /// command line and environment override it.
        #[arg(long, env = "BLADE_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on for gRPC.
        #[arg(long, env = "BLADE_AGENT_LISTEN", default_value = "0.0.0.0:7501")]
        listen: SocketAddr,
        /// File holding the shared secret callers must send (mode 0600; `init-secret` makes one).
        #[arg(
            long,
            env = "BLADE_AGENT_SECRET_FILE",
            default_value = "/etc/blade-agent/secret"
        )]
        secret_file: PathBuf,
        /// CA bundle (PEM) the dispatcher's client certificate must chain to. With --cert and
        /// --key, the agent serves mutual TLS 1.3 and accepts only the `dispatcher` role.
        #[arg(long, env = "BLADE_AGENT_CA")]
        ca: Option<PathBuf>,
        /// This agent's certificate (PEM), naming the host the blade is registered with
        /// (`dispatcher pki issue --role agent --host HOST`).
        #[arg(long, env = "BLADE_AGENT_CERT")]
        cert: Option<PathBuf>,
        /// This agent's private key (PEM, mode 0600).
        #[arg(long, env = "BLADE_AGENT_KEY")]
        key: Option<PathBuf>,
        /// Serve plaintext on a non-loopback --listen: anyone who reaches the port can then
        /// try the shared secret. Only on a network you trust; logged as a warning.
        #[arg(long, env = "BLADE_AGENT_INSECURE_PLAINTEXT")]
        insecure_plaintext: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (off unless set; keep it off public
        /// networks).
        #[arg(long, env = "BLADE_AGENT_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Log lines as JSON objects (for log shippers) instead of text.
        #[arg(long, env = "BLADE_AGENT_LOG_JSON")]
        log_json: bool,
        #[command(flatten)]
        desktop: DesktopConfig,
    },
    /// Drop-in for the original `cloudvnc` script, for SSH: reads the VNC password from stdin,
    /// starts (or finds) the user's desktop and prints `HOST PID DISPLAY`, then the SHA-256 of
    /// the desktop's VeNCrypt certificate when this run started it.
    ///
    /// stdin: the password on the first line; optionally the desktop's view-only password on
    /// a second line (same rules, different from the password), which `~/.vncpasswd` then
    /// holds second, as `vncpasswd -f` writes it: a VNC login with it may watch but not
    /// control. With one line (or an empty second one) the file holds the password alone. A
    /// running desktop takes the new passwords (and loses an earlier view-only one).
    ///
    /// Exit codes (also of `status` and `stop`), which the dispatcher acts on: 0 started or
    /// found.
    ///
    /// 10-19 the request is refused on every blade: 10 invalid username, password, view-only
    /// password or geometry, 11 unknown account, 12 root or system account, 13 unsafe home,
    /// 14 account denied by PAM (expired, locked).
    ///
    /// 20-29 only this blade failed, another may succeed: 20 no free display, 21 Xvnc start
    /// timed out, 22 Xvnc failed to start, 23 the agent failed (helper, OS error).
    ///
    /// 1 any other failure, 2 bad arguments.
    Cloudvnc {
        /// The account to start the desktop for.
        #[arg(long)]
        user: String,
        #[command(flatten)]
        desktop: DesktopConfig,
    },
    /// Print `HOST PID DISPLAY` of the user's running desktop, or nothing (for SSH callers).
    /// Exits as `cloudvnc` does.
    Status {
        /// The account.
        #[arg(long)]
        user: String,
        #[command(flatten)]
        desktop: DesktopConfig,
    },
    /// Stop the user's desktop; prints `stopped` or `none` (for SSH callers). Exits as
    /// `cloudvnc` does.
    Stop {
        /// The account.
        #[arg(long)]
        user: String,
        /// Stop only if the user's Xvnc has this pid (prints `none` otherwise).
        #[arg(long)]
        pid: Option<u32>,
        #[command(flatten)]
        desktop: DesktopConfig,
    },
    /// Write a new random shared secret to a file (mode 0600), for `serve` and its callers.
    InitSecret {
        /// Where to write it; an existing file is left alone.
        path: PathBuf,
    },
    /// Internal: the per-session helper the agent runs; it reads its request on stdin.
    #[command(hide = true)]
    SessionHelper {
        /// The PAM service requests will name, loaded before one comes.
        #[arg(long)]
        pam_service: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli: Cli = vncdispatch_proto::config::parse();
    match cli.command {
        Command::SessionHelper { pam_service } => helper::main(pam_service.as_deref()),
        Command::Serve {
            config,
            listen,
            metrics_listen,
            secret_file,
            ca,
            cert,
            key,
            insecure_plaintext,
            log_json,
            desktop,
        } => {
            vncdispatch_proto::serve::init_logging(log_json, "info");
            vncdispatch_proto::config::log_config_file(config.as_deref());
            let secret = match SharedSecret::from_file(&secret_file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("blade-agent: --secret-file: {e}");
                    return ExitCode::from(vncdispatch_proto::serve::EX_USAGE);
                }
            };
            let tls = match vncdispatch_proto::tls::TlsFiles::from_flags(ca, cert, key)
                .map_err(|e| e.to_string())
                .and_then(|files| {
                    vncdispatch_proto::tls::server_setup(
                        listen,
                        files.as_ref(),
                        insecure_plaintext,
                        vncdispatch_proto::roles::Role::Agent,
                    )
                }) {
                Ok(tls) => tls,
                Err(e) => {
                    eprintln!("blade-agent: {e}");
                    return ExitCode::from(vncdispatch_proto::serve::EX_USAGE);
                }
            };
            report(
                runtime().and_then(|rt| {
                    rt.block_on(serve(listen, metrics_listen, secret, tls, desktop))
                }),
            )
        }
        Command::Cloudvnc { user, desktop } => {
            vncdispatch_proto::serve::init_logging(false, "warn");
            report(runtime().and_then(|rt| rt.block_on(cloudvnc(user, desktop))))
        }
        Command::Status { user, desktop } => {
            vncdispatch_proto::serve::init_logging(false, "warn");
            report(runtime().and_then(|rt| rt.block_on(status(user, desktop))))
        }
        Command::Stop { user, pid, desktop } => {
            vncdispatch_proto::serve::init_logging(false, "warn");
            report(runtime().and_then(|rt| rt.block_on(stop(user, pid, desktop))))
        }
        Command::InitSecret { path } => report(init_secret(&path)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Prints the error, if any, and exits with its refusal kind's code (see `cloudvnc --help`
/// and [`vncdispatch_proto::refusal`]), or 1 for errors outside the contract.
fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blade-agent: {e:#}");
            match e.downcast_ref::<AgentError>() {
                Some(agent) => ExitCode::from(agent.kind().exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

async fn serve(
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    secret: SharedSecret,
    tls: Option<Arc<vncdispatch_proto::tls::rustls::ServerConfig>>,
    desktop: DesktopConfig,
) -> anyhow::Result<()> {
    vncdispatch_proto::metrics::install(metrics_listen).map_err(anyhow::Error::msg)?;
    let agent = Arc::new(Agent::new(desktop)?);
    agent.keep_spare_helper();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    // Tell systemd (Type=notify) we accept calls; a no-op when not run by systemd.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    blade_agent::server::run(
        listener,
        agent,
        secret,
        tls,
        vncdispatch_proto::serve::shutdown_signal(),
    )
    .await
}

async fn cloudvnc(user: String, desktop: DesktopConfig) -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .take(64)
        .read_to_string(&mut input)
        .context("reading the passwords from stdin")?;
    let (password, view_only) = stdin_passwords(&input);
    let agent = Arc::new(Agent::new(desktop)?);
    // Both are checked there: a bad or equal view-only password is an invalid request.
    let server = agent
        .start_session(&user, password, view_only, None)
        .await?;
    // The original's three fields, then the desktop's certificate pin when it has one (a
    // reader of the original format takes the first three).
    let pin = match server.cert_sha256.as_str() {
        "" => String::new(),
        pin => format!(" {pin}"),
    };
    println!("{} {} {}{pin}", server.host, server.vnc_pid, server.display);
    Ok(())
}

/// The password and the view-only password (empty: none) of `cloudvnc`'s stdin: a line each,
/// each without its `\n` or `\r\n`. Anything after the second line stays in the view-only
/// password, whose rules then refuse it (a newline is not printable), rather than being
/// dropped unseen.
fn stdin_passwords(input: &str) -> (&str, &str) {
    let input = input.strip_suffix('\n').unwrap_or(input);
    let input = input.strip_suffix('\r').unwrap_or(input);
    let (password, view_only) = input.split_once('\n').unwrap_or((input, ""));
    let password = password.strip_suffix('\r').unwrap_or(password);
    (password, view_only)
}

async fn status(user: String, desktop: DesktopConfig) -> anyhow::Result<()> {
    let agent = Agent::new(desktop)?;
    if let Some(server) = agent.find(&user).await? {
        println!("{} {} {}", server.host, server.vnc_pid, server.display);
    }
    Ok(())
}

async fn stop(user: String, pid: Option<u32>, desktop: DesktopConfig) -> anyhow::Result<()> {
    let agent = Agent::new(desktop)?;
    println!(
        "{}",
        if agent.stop_session(&user, pid).await? {
            "stopped"
        } else {
            "none"
        }
    );
    Ok(())
}

fn init_secret(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut bytes)
        .context("OS random number generator")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stdin_passwords;

    #[test]
    fn cloudvnc_reads_one_or_two_lines() {
        for (input, expected) in [
            ("secret1\n", ("secret1", "")),
            ("secret1", ("secret1", "")),
            ("secret1\r\n", ("secret1", "")),
            ("secret1\n\n", ("secret1", "")),
            ("secret1\nwatch12\n", ("secret1", "watch12")),
            ("secret1\r\nwatch12\r\n", ("secret1", "watch12")),
            ("secret1\nwatch12", ("secret1", "watch12")),
            // A third line is kept in the second, which validation then refuses.
            ("secret1\nwatch12\nmore\n", ("secret1", "watch12\nmore")),
        ] {
            assert_eq!(stdin_passwords(input), expected, "{input:?}");
        }
    }
}
