//! The `BladeAgent` gRPC service: a thin layer over [`crate::agent::Agent`] that runs each call
//! in a span (`#[tracing::instrument]`) and maps errors to statuses — with their refusal kind,
//! see [`crate::error`].
use crate::agent::Agent;
use crate::error::AgentError;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use vncdispatch_proto::v1::blade_agent_server::BladeAgent;
use vncdispatch_proto::v1::{
    AgentHealth, AgentHealthRequest, ListVncServersRequest, ListVncServersResponse,
    StartSessionRequest, StopSessionRequest, StopSessionResponse, VncServer,
};

/// The service handed to tonic.
#[derive(Debug, Clone)]
pub struct AgentService {
    agent: Arc<Agent>,
}

impl AgentService {
    /// Wraps the domain object.
    pub fn new(agent: Arc<Agent>) -> Self {
        AgentService { agent }
    }
}

/// The request id the dispatcher sent with a call, or `-`: it ties the agent's log lines to
/// the dispatcher's for one Dispatch.
fn request_id<T>(req: &Request<T>) -> &str {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// The caller's address, for the span.
fn peer<T>(req: &Request<T>) -> String {
    req.remote_addr().map(|a| a.to_string()).unwrap_or_default()
}

fn log_err<T>(r: Result<T, crate::error::AgentError>) -> Result<T, Status> {
    r.map_err(|e| {
        tracing::warn!(error = %e, "refused");
        Status::from(e)
    })
}

// Each call runs in one `rpc` span carrying the method, the user, the dispatcher's request id
// and the peer (never the password: `skip_all` keeps the request out of the span).
#[tonic::async_trait]
impl BladeAgent for AgentService {
    #[tracing::instrument(
        name = "rpc",
        skip_all,
        fields(
            rpc = "StartSession",
            user = req.get_ref().username.as_str(),
            request_id = request_id(&req),
            peer = %peer(&req),
        )
    )]
    async fn start_session(
        &self,
        req: Request<StartSessionRequest>,
    ) -> Result<Response<VncServer>, Status> {
        let r = req.into_inner();
        let started = std::time::Instant::now();
        // A caller that gives up (deadline, a dispatcher killed mid-call) does not cut the
        // start short: it finishes under the user's lock and is undone (see start_session).
        let result = self
            .agent
            .start_session(&r.username, &r.password, &r.view_only_password, r.geometry)
            .await;
        vncdispatch_proto::metrics::record_start(
            "vncdispatch_agent_session_starts_total",
            "vncdispatch_agent_session_start_duration_seconds",
            result.as_ref().ok().map(|s| s.reused),
            started,
        );
        // Written with the rest, or the start failed: a success with one means it is in.
        let view_only = !r.view_only_password.is_empty();
        log_err(result).map(|mut server| {
            server.view_only = view_only;
            Response::new(server)
        })
    }

    #[tracing::instrument(
        name = "rpc",
        skip_all,
        fields(
            rpc = "StopSession",
            user = req.get_ref().username.as_str(),
            request_id = request_id(&req),
            peer = %peer(&req),
        )
    )]
    async fn stop_session(
        &self,
        req: Request<StopSessionRequest>,
    ) -> Result<Response<StopSessionResponse>, Status> {
        let r = req.into_inner();
        let agent = self.agent.clone();
        let span = tracing::Span::current();
        let result = tokio::spawn(
            async move {
                let expect = (r.vnc_pid != 0).then_some(r.vnc_pid);
                agent.stop_session(&r.username, expect).await
            }
            .instrument(span),
        )
        .await
        .unwrap_or_else(|e| {
            Err(AgentError::io(
                "stop task",
                std::io::Error::other(e.to_string()),
            ))
        });
        log_err(result).map(|stopped| Response::new(StopSessionResponse { stopped }))
    }

    #[tracing::instrument(
        name = "rpc",
        skip_all,
        fields(
            rpc = "ListSessions",
            user = req.get_ref().username.as_str(),
            request_id = request_id(&req),
            peer = %peer(&req),
        )
    )]
    async fn list_sessions(
        &self,
        req: Request<ListVncServersRequest>,
    ) -> Result<Response<ListVncServersResponse>, Status> {
        let only = req.into_inner().username;
        let servers = if only.is_empty() {
            log_err(self.agent.list().await)?
        } else {
            let mut found = log_err(self.agent.find(&only).await)?;
            found.iter_mut().for_each(|s| s.reused = false);
            found.into_iter().collect()
        };
        Ok(Response::new(ListVncServersResponse { servers }))
    }

    #[tracing::instrument(
        name = "rpc",
        skip_all,
        fields(
            rpc = "Health",
            user = "",
            request_id = request_id(&_req),
            peer = %peer(&_req),
        )
    )]
    async fn health(
        &self,
        _req: Request<AgentHealthRequest>,
    ) -> Result<Response<AgentHealth>, Status> {
        let health = log_err(self.agent.health().await)?;
        metrics::gauge!("vncdispatch_agent_sessions_live").set(f64::from(health.sessions));
        Ok(Response::new(health))
    }
}
