//! The usual test rig: agents and a dispatcher sharing a fresh secret, each agent registered
//! as blade `b1`, `b2`, ….
use crate::agent::{AgentOptions, AgentProc, new_secret};
use crate::dispatcher::{DispatcherOptions, DispatcherProc};
use std::path::PathBuf;

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
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            agents: 1,
            store: None,
            dispatcher_extra: Vec::new(),
            session_command: None,
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
    _dir: tempfile::TempDir,
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
                    ..Default::default()
                })
                .await,
            );
        }
        let dispatcher = DispatcherProc::start(DispatcherOptions {
            mongo: opts.store,
            agent_secret: secret.clone(),
            extra: opts.dispatcher_extra,
            ..Default::default()
        })
        .await;
        for (i, a) in agents.iter().enumerate() {
            dispatcher.add_agent(&format!("b{}", i + 1), a).await;
        }
        Rig {
            agents,
            dispatcher,
            secret,
            _dir: dir,
        }
    }

    /// The first agent.
    pub fn agent(&self) -> &AgentProc {
        &self.agents[0]
    }
}
