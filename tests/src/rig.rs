//! The usual test rig: agents and a dispatcher sharing a fresh secret, each agent registered
//! as blade `b1`, `b2`, …; optionally a dispatcher that requires an API secret from its
//! callers. [`Rig::user_with_desktop`] is the preamble most dispatch tests share: a
//! throwaway user, a client, and that user's desktop dispatched.
use crate::agent::{AgentOptions, AgentProc, new_secret};
use crate::dispatcher::{DispatcherOptions, DispatcherProc};
use crate::users::TestUser;
use std::path::PathBuf;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vncdispatch_proto::bearer::{BearerAuth, SharedSecret};
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_proto::v1::{AddBladeRequest, DispatchRequest, Session};

/// A dispatcher client that sends the rig's API secret (or nothing, when there is none).
pub type Client = DispatcherClient<InterceptedService<Channel, BearerAuth>>;

/// What to start.
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// How many agents: one on 127.0.0.1, or several on 127.0.0.2, .3, ….
    pub agents: usize,
    /// The dispatcher's `--store` when not the embedded default (a `mongodb://` URI).
    pub store: Option<String>,
    /// Extra `dispatcher serve` arguments.
    pub dispatcher_extra: Vec<String>,
    /// The agents' desktop session (plain twm when None).
    pub session_command: Option<PathBuf>,
    /// Make the dispatcher require an API secret (`--api-secret-file`) from its callers; the
    /// rig's [`Rig::client`] sends it.
    pub api_secret: bool,
    /// The agents' display range (first, count), when not the tests' default.
    pub displays: Option<(u32, u32)>,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            agents: 1,
            store: None,
            dispatcher_extra: Vec::new(),
            session_command: None,
            api_secret: false,
            displays: None,
        }
    }
}

/// Running agents and dispatcher.
#[derive(Debug)]
pub struct Rig {
    /// The agents, blade `b1` first.
    pub agents: Vec<AgentProc>,
    /// The dispatcher.
    pub dispatcher: DispatcherProc,
    /// The agents' shared secret file.
    pub secret: PathBuf,
    /// The dispatcher's API secret file, when it requires one.
    pub api_secret: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// A throwaway user whose desktop the rig dispatched, and the client that asked for it.
#[derive(Debug)]
pub struct UserDesktop {
    /// The user (removed, with their processes, on drop).
    pub user: TestUser,
    /// The client that dispatched (with the API secret, if the rig has one).
    pub client: Client,
    /// What Dispatch returned.
    pub session: Session,
}

impl Rig {
    /// Starts everything; panics (failing the test) if anything does not come up.
    pub async fn start(opts: RigOptions) -> Rig {
        crate::require_root_and_tigervnc();
        let dir = tempfile::tempdir().expect("dir");
        let secret = dir.path().join("agent-secret");
        new_secret(&secret);
        let mut agents = Vec::new();
        for i in 0..opts.agents {
            let ip = if opts.agents == 1 {
                [127, 0, 0, 1]
            } else {
                [127, 0, 0, 2 + i as u8]
            };
            agents.push(
                AgentProc::start(AgentOptions {
                    ip: ip.into(),
                    secret_file: Some(secret.clone()),
                    session_command: opts.session_command.clone(),
                    displays: opts.displays,
                    ..Default::default()
                })
                .await,
            );
        }
        let mut extra = opts.dispatcher_extra;
        let api_secret = opts.api_secret.then(|| {
            let path = dir.path().join("api-secret");
            new_secret(&path);
            extra.extend(["--api-secret-file".into(), path.display().to_string()]);
            path
        });
        let dispatcher = DispatcherProc::start(DispatcherOptions {
            mongo: opts.store,
            agent_secret: secret.clone(),
            extra,
            ..Default::default()
        })
        .await;
        let rig = Rig {
            agents,
            dispatcher,
            secret,
            api_secret,
            _dir: dir,
        };
        let mut c = rig.client().await;
        for (i, a) in rig.agents.iter().enumerate() {
            c.add_blade(AddBladeRequest {
                name: format!("b{}", i + 1),
                host: a.addr.ip().to_string(),
                port: u32::from(a.addr.port()),
                method: 1,
                ..Default::default()
            })
            .await
            .expect("AddBlade");
        }
        rig
    }

    /// One agent and a dispatcher started with `extra` arguments.
    pub async fn with_dispatcher_args(extra: &[&str]) -> Rig {
        Rig::start(RigOptions {
            dispatcher_extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    /// The first agent.
    pub fn agent(&self) -> &AgentProc {
        &self.agents[0]
    }

    /// A dispatcher client, sending the API secret when the dispatcher requires one.
    pub async fn client(&self) -> Client {
        let auth = match &self.api_secret {
            Some(path) => SharedSecret::from_file(path)
                .and_then(|s| s.client_auth())
                .expect("the rig's API secret"),
            None => BearerAuth::none(),
        };
        let ch = Channel::from_shared(format!("http://{}", self.dispatcher.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect dispatcher");
        DispatcherClient::with_interceptor(ch, auth)
    }

    /// `Dispatch(user, remote_ip)` on a fresh client.
    pub async fn dispatch(&self, user: &str, remote_ip: &str) -> Result<Session, Status> {
        self.client()
            .await
            .dispatch(DispatchRequest {
                username: user.into(),
                remote_ip: remote_ip.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// A new throwaway user, a client, and the user's desktop dispatched from `remote_ip`;
    /// panics (failing the test) if Dispatch fails, as any set-up step would.
    pub async fn user_with_desktop(&self, remote_ip: &str) -> UserDesktop {
        let user = TestUser::create();
        let mut client = self.client().await;
        let session = client
            .dispatch(DispatchRequest {
                username: user.name.clone(),
                remote_ip: remote_ip.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("Dispatch for {}: {e}", user.name))
            .into_inner();
        UserDesktop {
            user,
            client,
            session,
        }
    }
}
