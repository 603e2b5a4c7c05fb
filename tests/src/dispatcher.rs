//! A real `dispatcher serve` process for tests, on a 127.0.0.1 port, with the embedded store
//! in its own directory or a MongoDB (FerretDB) URI.
use crate::agent::{AgentProc, free_port};
use crate::child::{ChildProc, Ready, child_methods};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
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
    /// Serve mutual TLS with these settings (the client identity should be role admin, which
    /// the wrapper's own calls need).
    pub tls: Option<crate::pki::ServiceTls>,
    /// Run `dispatcher` from this directory (a bench's other build); this workspace's when None.
    pub bin_dir: Option<PathBuf>,
}

/// A running dispatcher.
#[derive(Debug)]
pub struct DispatcherProc {
    /// The process; first, so it is killed before `dir` (its store) is removed.
    child: ChildProc,
    /// gRPC address.
    pub addr: SocketAddr,
    /// Test directory (store, seal key, log).
    pub dir: tempfile::TempDir,
    /// The TLS settings it serves with, if any.
    pub tls: Option<crate::pki::ServiceTls>,
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
        ];
        // Tests poll blades every second unless they say otherwise.
        if !opts.extra.iter().any(|a| a == "--health-interval") {
            args.extend(["--health-interval".into(), "1s".into()]);
        }
        let ready = match &opts.tls {
            Some(tls) => {
                args.extend(tls.args());
                Ready::ServingTls(addr, "vncdispatch.v1.Dispatcher", tls.client.clone())
            }
            None => Ready::Serving(addr, "vncdispatch.v1.Dispatcher"),
        };
        args.extend(opts.extra);
        let child =
            ChildProc::service_from(opts.bin_dir.as_deref(), "dispatcher", dir.path(), ready)
                .args(args)
                .ready_within(Duration::from_secs(6))
                .start()
                .await;
        DispatcherProc {
            child,
            addr,
            dir,
            tls: opts.tls,
        }
    }

    /// A client (over mutual TLS as the wrapper's admin identity when the dispatcher serves
    /// TLS).
    pub async fn client(&self) -> DispatcherClient<Channel> {
        self.client_as(self.tls.as_ref().map(|t| &t.client)).await
    }

    /// A client presenting `tls` (None: plaintext).
    pub async fn client_as(
        &self,
        tls: Option<&vncdispatch_proto::tls::Credentials>,
    ) -> DispatcherClient<Channel> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ch = vncdispatch_proto::tls::endpoint(&format!("{scheme}://{}", self.addr), tls)
            .expect("uri")
            .connect()
            .await
            .expect("connect dispatcher");
        DispatcherClient::new(ch)
    }

    /// Sets a `dispatcher serve` option for its next restart (see [`ChildProc::set_option`]).
    pub fn set_option(&mut self, flag: &str, value: &str) {
        self.child.set_option(flag, value);
    }

    /// Registers `agent` as blade `name`.
    pub async fn add_agent(&self, name: &str, agent: &AgentProc) {
        let req = AddBladeRequest {
            name: name.into(),
            host: agent.addr.ip().to_string(),
            port: u32::from(agent.addr.port()),
            method: 1,
            ..Default::default()
        };
        self.client().await.add_blade(req).await.expect("AddBlade");
    }
}

child_methods!(DispatcherProc, child);
