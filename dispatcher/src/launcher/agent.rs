//! The default launcher: gRPC to each blade's `blade-agent serve`.
//!
//! A failed call is judged by the refusal contract ([`vncdispatch_proto::refusal`]): the
//! `ErrorInfo` kind the agent attaches says whether the request is refused everywhere
//! ([`LaunchError::Refused`], the agent's status passed on) or only this blade failed
//! ([`LaunchError::Blade`], try the next). An agent that predates the contract sends no kind;
//! then the status code decides, as it did before.
use super::{BladeLoad, LaunchError, Launched, Launcher, Passwords};
use crate::store::BladeRecord;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vncdispatch_proto::bearer::BearerAuth;
use vncdispatch_proto::refusal::{self, Scope};
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::tls::{self, Credentials};
use vncdispatch_proto::v1::blade_agent_client::BladeAgentClient;
use vncdispatch_proto::v1::{
    AgentHealthRequest, ListVncServersRequest, StartSessionRequest, StopSessionRequest,
};

type Client = BladeAgentClient<InterceptedService<Channel, BearerAuth>>;

/// Talks to blade agents, one lazily connected HTTP/2 channel per agent address.
#[derive(Debug)]
pub struct AgentLauncher {
    auth: BearerAuth,
    /// The dispatcher's identity for mutual TLS to agents; None: plaintext (loopback or
    /// --insecure-plaintext only).
    tls: Option<Credentials>,
    /// Without `tls`, whether agents off loopback may be reached in clear
    /// (`--insecure-plaintext`): otherwise the secret and passwords never leave this host
    /// unencrypted.
    plaintext_off_loopback: bool,
    /// Per-call deadline for starts (stops, checks and health use a shorter one).
    start_timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
}

impl AgentLauncher {
    /// A launcher sending `auth` to every agent, over mutual TLS with `tls`: an agent must
    /// then present a certificate from the CA valid for its blade's registered host before
    /// anything (the secret, a password) is sent.
    /// Without `tls`, only agents on loopback are called, unless `plaintext_off_loopback`.
    pub fn new(
        auth: BearerAuth,
        start_timeout: Duration,
        tls: Option<Credentials>,
        plaintext_off_loopback: bool,
    ) -> Self {
        AgentLauncher {
            auth,
            tls,
            plaintext_off_loopback,
            start_timeout,
            channels: Mutex::default(),
        }
    }

    fn client(&self, blade: &BladeRecord) -> Result<Client, LaunchError> {
        if self.tls.is_none() && !self.plaintext_off_loopback && !tls::is_loopback_host(&blade.host)
        {
            return Err(LaunchError::Blade(format!(
                "blade {}: not sending the agent secret in clear to {}, which is not loopback; \
                 give the dispatcher --ca, --cert and --key (mutual TLS to agents), or \
                 --insecure-plaintext on a network you trust",
                blade.name, blade.host
            )));
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let addr = format!("{scheme}://{}:{}", bracket(&blade.host), blade.port);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(&addr) {
            Some(c) => c.clone(),
            None => {
                // With TLS the agent must prove a certificate for the blade's registered host
                // that names role agent: another role's key for that name is not an agent.
                let c = tls::dial(&addr, self.tls.as_ref(), Role::Agent, |e| {
                    e.connect_timeout(Duration::from_secs(3))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(30))
                        .keep_alive_while_idle(true)
                })
                .map_err(|e| LaunchError::Blade(format!("bad agent address {addr}: {e}")))?
                .lazy();
                channels.insert(addr, c.clone());
                c
            }
        };
        Ok(BladeAgentClient::with_interceptor(
            channel,
            self.auth.clone(),
        ))
    }
}

/// IPv6 literals need brackets in a URI.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// What a failed call means for the dispatch, from the status's refusal kind, or its code
/// when an older agent sent no kind ([`refusal::scope_of_status`]); never from its message.
fn classify(blade: &BladeRecord, status: tonic::Status) -> LaunchError {
    match refusal::scope_of_status(&status) {
        Scope::Request => LaunchError::Refused(status),
        Scope::Blade if status.code() == Code::Unauthenticated => LaunchError::Blade(format!(
            "blade {} refused our agent secret (check --agent-secret-file)",
            blade.name
        )),
        Scope::Blade
            if refusal::RefusalKind::from_status(&status)
                == Some(refusal::RefusalKind::NoFreeDisplay) =>
        {
            LaunchError::Full(format!("blade {}: {}", blade.name, status.message()))
        }
        Scope::Blade => LaunchError::Blade(format!(
            "blade {}: {}: {}{}",
            blade.name,
            status.code(),
            status.message(),
            tls::causes(&status)
        )),
    }
}

fn with_deadline<T>(msg: T, timeout: Duration, request_id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    if let Ok(v) = request_id.parse() {
        req.metadata_mut().insert("x-request-id", v);
    }
    req
}

#[async_trait::async_trait]
impl Launcher for AgentLauncher {
    async fn start(
        &self,
        blade: &BladeRecord,
        username: &str,
        passwords: &Passwords,
        request_id: &str,
    ) -> Result<Launched, LaunchError> {
        let msg = StartSessionRequest {
            username: username.into(),
            password: passwords.full.clone(),
            view_only_password: passwords.view_only.clone(),
            geometry: None,
        };
        let server = self
            .client(blade)?
            .start_session(with_deadline(msg, self.start_timeout, request_id))
            .await
            .map_err(|s| classify(blade, s))?
            .into_inner();
        Ok(Launched {
            host: server.host,
            display: server.display,
            port: server.port,
            vnc_pid: server.vnc_pid,
            cert_sha256: server.cert_sha256,
            view_only: server.view_only,
        })
    }

    async fn stop(
        &self,
        blade: &BladeRecord,
        username: &str,
        vnc_pid: Option<u32>,
    ) -> Result<bool, LaunchError> {
        let msg = StopSessionRequest {
            username: username.into(),
            vnc_pid: vnc_pid.unwrap_or(0),
        };
        let r = self
            .client(blade)?
            .stop_session(with_deadline(msg, Duration::from_secs(10), ""))
            .await;
        Ok(r.map_err(|s| classify(blade, s))?.into_inner().stopped)
    }

    async fn is_alive(
        &self,
        blade: &BladeRecord,
        username: &str,
        vnc_pid: u32,
    ) -> Result<bool, LaunchError> {
        let msg = ListVncServersRequest {
            username: username.into(),
        };
        let r = self
            .client(blade)?
            .list_sessions(with_deadline(msg, Duration::from_secs(3), ""))
            .await;
        let servers = r.map_err(|s| classify(blade, s))?.into_inner().servers;
        Ok(servers
            .iter()
            .any(|s| s.username == username && s.vnc_pid == vnc_pid))
    }

    async fn health(&self, blade: &BladeRecord) -> Result<BladeLoad, LaunchError> {
        let r = self
            .client(blade)?
            .health(with_deadline(
                AgentHealthRequest {},
                Duration::from_secs(3),
                "",
            ))
            .await;
        let h = r.map_err(|s| classify(blade, s))?.into_inner();
        Ok(BladeLoad {
            sessions: h.sessions,
            vnc_pids: h.vnc_pids,
            free_displays: h.free_displays,
            starting: h.starting,
            load1: h.load1,
            cpus: h.cpus,
            mem_available: h.mem_available_bytes,
            mem_total: h.mem_total_bytes,
            reported: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Method;
    use vncdispatch_proto::refusal::RefusalKind;

    fn blade() -> BladeRecord {
        BladeRecord {
            name: "b1".into(),
            host: "10.0.0.5".into(),
            port: 7501,
            method: Method::Agent,
            draining: false,
            pool: "default".into(),
            max_sessions: 0,
        }
    }

    #[test]
    fn each_kind_decides_by_itself_and_keeps_the_agents_status() {
        for kind in RefusalKind::ALL {
            let sent = refusal::status(kind, format!("agent says {kind:?}"));
            match (classify(&blade(), sent), kind.scope()) {
                (LaunchError::Refused(s), Scope::Request) => {
                    assert_eq!(s.code(), kind.code());
                    assert_eq!(s.message(), format!("agent says {kind:?}"));
                }
                // No free display is the blade's too, told apart for admission.
                (LaunchError::Blade(why) | LaunchError::Full(why), Scope::Blade) => {
                    assert!(why.starts_with("blade b1: "), "{why}");
                    assert!(why.ends_with(&format!("agent says {kind:?}")), "{why}");
                }
                (other, scope) => panic!("{kind:?} ({scope:?}) became {other:?}"),
            }
        }
    }

    #[test]
    fn the_kind_wins_over_the_message_and_an_old_agent_is_judged_by_its_code() {
        // Message text that once meant "refuse" decides nothing now.
        let reworded = refusal::status(RefusalKind::NoFreeDisplay, "no account named \"x\"");
        assert!(matches!(classify(&blade(), reworded), LaunchError::Full(_)));
        let old = tonic::Status::not_found("whatever an old agent said");
        assert!(matches!(
            classify(&blade(), old),
            LaunchError::Refused(s) if s.code() == Code::NotFound
        ));
        let old = tonic::Status::resource_exhausted("no free display");
        assert!(matches!(classify(&blade(), old), LaunchError::Blade(_)));
        match classify(&blade(), tonic::Status::unauthenticated("bad secret")) {
            LaunchError::Blade(why) => assert!(why.contains("--agent-secret-file"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
