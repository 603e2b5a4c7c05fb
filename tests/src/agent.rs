//! A real `blade-agent serve` process for tests, on a 127.0.0.x port with its own secret,
//! run directory and display range, so tests can run side by side.
use crate::child::{ChildProc, Ready, child_methods};
use crate::workspace_bin;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vncdispatch_proto::bearer::{BearerAuth, SharedSecret};
use vncdispatch_proto::v1::blade_agent_client::BladeAgentClient;

/// Displays handed to each test agent; ranges never overlap within a test binary.
const DISPLAYS_PER_AGENT: u32 = 16;
static NEXT_RANGE: AtomicU32 = AtomicU32::new(0);

/// An authenticated client of a test agent.
pub type AgentClient = BladeAgentClient<InterceptedService<Channel, BearerAuth>>;

/// How to start a test agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Address for both gRPC and RFB.
    pub ip: IpAddr,
    /// `fast` or `wrapper`.
    pub mode: &'static str,
    /// Extra command-line arguments.
    pub extra: Vec<String>,
    /// Use this secret file instead of a fresh one (to share it with a dispatcher).
    pub secret_file: Option<PathBuf>,
    /// The desktop session; plain twm when None.
    pub session_command: Option<PathBuf>,
    /// Display range (first, count); a fresh range of 16 when None.
    pub displays: Option<(u32, u32)>,
    /// Serve mutual TLS with these settings (the client identity should be role dispatcher).
    pub tls: Option<crate::pki::ServiceTls>,
    /// Where Xvnc listens for RFB; `ip` when None (`0.0.0.0`, the production default, makes
    /// Xvnc listen on IPv4 and IPv6 both).
    pub rfb_listen: Option<IpAddr>,
    /// Run `blade-agent` from this directory (a bench's other build); this workspace's when None.
    pub bin_dir: Option<PathBuf>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            ip: [127, 0, 0, 1].into(),
            mode: "fast",
            extra: Vec::new(),
            secret_file: None,
            session_command: None,
            displays: None,
            tls: None,
            rfb_listen: None,
            bin_dir: None,
        }
    }
}

/// A running `blade-agent serve`.
#[derive(Debug)]
pub struct AgentProc {
    /// The process; first, so it is killed before `dir` is removed.
    child: ChildProc,
    /// gRPC address.
    pub addr: SocketAddr,
    /// The shared secret callers send.
    pub secret: SharedSecret,
    /// First display of this agent's range.
    pub display_first: u32,
    /// Holds the secret file and run directory.
    pub dir: tempfile::TempDir,
    /// The TLS settings it serves with, if any.
    pub tls: Option<crate::pki::ServiceTls>,
}

impl AgentProc {
    /// Starts an agent and waits until its health service answers.
    pub async fn start(opts: AgentOptions) -> AgentProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_file = opts.secret_file.clone().unwrap_or_else(|| {
            let path = dir.path().join("secret");
            new_secret(&path);
            path
        });
        let secret = SharedSecret::from_file(&secret_file).expect("fresh secret");
        let port = free_port(opts.ip);
        let addr = SocketAddr::new(opts.ip, port);
        let (display_first, display_count) = opts.displays.unwrap_or_else(|| {
            let n = NEXT_RANGE.fetch_add(1, Ordering::Relaxed);
            (20 + DISPLAYS_PER_AGENT * n, DISPLAYS_PER_AGENT)
        });
        let run_dir: PathBuf = dir.path().join("run");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--secret-file".into(),
            secret_file.display().to_string(),
            "--rfb-listen".into(),
            opts.rfb_listen.unwrap_or(opts.ip).to_string(),
            "--mode".into(),
            opts.mode.into(),
            "--display-first".into(),
            display_first.to_string(),
            "--display-count".into(),
            display_count.to_string(),
            "--session-command".into(),
            opts.session_command
                .clone()
                .unwrap_or_else(|| "/usr/bin/twm".into())
                .display()
                .to_string(),
            "--run-dir".into(),
            run_dir.display().to_string(),
        ];
        let ready = match &opts.tls {
            Some(tls) => {
                args.extend(tls.args());
                Ready::ServingTls(addr, "", tls.client.clone())
            }
            None => Ready::Serving(addr, ""),
        };
        args.extend(opts.extra);
        let child =
            ChildProc::service_from(opts.bin_dir.as_deref(), "blade-agent", dir.path(), ready)
                .args(args)
                .start()
                .await;
        AgentProc {
            child,
            addr,
            secret,
            display_first,
            dir,
            tls: opts.tls,
        }
    }

    /// A channel to the agent without the secret (over mutual TLS as the wrapper's client
    /// identity when the agent serves TLS).
    pub async fn channel(&self) -> Channel {
        let tls = self.tls.as_ref().map(|t| &t.client);
        let scheme = if tls.is_some() { "https" } else { "http" };
        vncdispatch_proto::tls::endpoint(&format!("{scheme}://{}", self.addr), tls)
            .expect("uri")
            .connect()
            .await
            .expect("connect to agent")
    }

    /// A client sending the right secret.
    pub async fn client(&self) -> AgentClient {
        let auth = self.secret.client_auth().expect("ascii secret");
        BladeAgentClient::with_interceptor(self.channel().await, auth)
    }
}

child_methods!(AgentProc, child);

/// Writes a fresh shared secret to `path` with `blade-agent init-secret`.
pub fn new_secret(path: &std::path::Path) {
    let status = Command::new(workspace_bin("blade-agent"))
        .arg("init-secret")
        .arg(path)
        .status()
        .expect("run init-secret");
    assert!(status.success(), "init-secret {}", path.display());
}

/// A port that was free a moment ago on `ip`.
pub fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("bind ephemeral port")
        .port()
}
