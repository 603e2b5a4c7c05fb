//! A real `dispatcher serve` process for tests, on a 127.0.0.1 port, with the embedded store
//! in its own directory or a MongoDB (FerretDB) URI.
use crate::agent::{AgentProc, free_port};
use crate::workspace_bin;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use tonic::transport::Channel;
use vncdispatch_proto::v1::AddBladeRequest;
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;

/// How to start a test dispatcher.
#[derive(Debug, Clone, Default)]
pub struct DispatcherOptions {
    /// `mongodb://…` URI; the embedded store in the test directory when None.
    pub mongo: Option<String>,
    /// Agents' shared secret file (required).
    pub agent_secret: PathBuf,
    /// Seal key file; one in the test directory when None.
    pub seal_key: Option<PathBuf>,
    /// Extra arguments for `dispatcher serve`.
    pub extra: Vec<String>,
}

/// A running dispatcher.
#[derive(Debug)]
pub struct DispatcherProc {
    child: Option<Child>,
    args: Vec<String>,
    /// gRPC address.
    pub addr: SocketAddr,
    /// Test directory (store, seal key, log).
    pub dir: tempfile::TempDir,
}

impl DispatcherProc {
    /// Starts a dispatcher and waits until it is SERVING.
    pub async fn start(opts: DispatcherOptions) -> DispatcherProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port([127, 0, 0, 1].into())).into();
        let store = opts
            .mongo
            .clone()
            .unwrap_or_else(|| dir.path().join("dispatcher.redb").display().to_string());
        let seal = opts
            .seal_key
            .clone()
            .unwrap_or_else(|| dir.path().join("seal.key"));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--store".into(),
            store,
            "--seal-key-file".into(),
            seal.display().to_string(),
            "--agent-secret-file".into(),
            opts.agent_secret.display().to_string(),
            "--health-interval".into(),
            "1s".into(),
        ];
        args.extend(opts.extra);
        let mut d = DispatcherProc {
            child: None,
            args,
            addr,
            dir,
        };
        d.spawn().await;
        d
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("dispatcher.log"))
            .expect("log");
        let child = Command::new(workspace_bin("dispatcher"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dispatcher");
        self.child = Some(child);
        if !crate::wait_serving(self.addr, "vncdispatch.v1.Dispatcher", 6).await {
            panic!(
                "dispatcher did not come up on {}; log:\n{}",
                self.addr,
                self.log()
            );
        }
    }

    /// The dispatcher's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dispatcher.log")).unwrap_or_default()
    }

    /// A client.
    pub async fn client(&self) -> DispatcherClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect dispatcher");
        DispatcherClient::new(ch)
    }

    /// Registers `agent` as blade `name`.
    pub async fn add_agent(&self, name: &str, agent: &AgentProc) {
        let req = AddBladeRequest {
            name: name.into(),
            host: agent.addr.ip().to_string(),
            port: u32::from(agent.addr.port()),
            method: 1,
        };
        self.client().await.add_blade(req).await.expect("AddBlade");
    }

    /// Stops with SIGTERM and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    /// Kills with SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts again with the same settings and store.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for DispatcherProc {
    fn drop(&mut self) {
        self.kill();
    }
}
