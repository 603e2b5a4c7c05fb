//! The `BladeAgent` gRPC service: a thin layer over [`crate::agent::Agent`] that adds a span
//! per call and maps errors to statuses.
use crate::agent::Agent;
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

/// A span for one call: the request id the dispatcher sent (if any) and the user.
fn span<T>(rpc: &'static str, req: &Request<T>, user: &str) -> tracing::Span {
    let request_id = req
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info_span!("rpc", rpc, user, request_id, %peer)
}

fn log_err<T>(r: Result<T, crate::error::AgentError>) -> Result<T, Status> {
    r.map_err(|e| {
        tracing::warn!(error = %e, "refused");
        Status::from(e)
    })
}

#[tonic::async_trait]
impl BladeAgent for AgentService {
    async fn start_session(
        &self,
        req: Request<StartSessionRequest>,
    ) -> Result<Response<VncServer>, Status> {
        let span = span("StartSession", &req, &req.get_ref().username);
        let r = req.into_inner();
        let agent = self.agent.clone();
        async move {
            let started = std::time::Instant::now();
            let result = agent
                .start_session(&r.username, &r.password, r.geometry)
                .await;
            vncdispatch_proto::metrics::record_start(
                "vncdispatch_agent_session_starts_total",
                "vncdispatch_agent_session_start_duration_seconds",
                result.as_ref().ok().map(|s| s.reused),
                started,
            );
            log_err(result).map(Response::new)
        }
        .instrument(span)
        .await
    }

    async fn stop_session(
        &self,
        req: Request<StopSessionRequest>,
    ) -> Result<Response<StopSessionResponse>, Status> {
        let span = span("StopSession", &req, &req.get_ref().username);
        let r = req.into_inner();
        async move {
            log_err(self.agent.stop_session(&r.username).await)
                .map(|stopped| Response::new(StopSessionResponse { stopped }))
        }
        .instrument(span)
        .await
    }

    async fn list_sessions(
        &self,
        req: Request<ListVncServersRequest>,
    ) -> Result<Response<ListVncServersResponse>, Status> {
        let span = span("ListSessions", &req, &req.get_ref().username);
        let only = req.into_inner().username;
        async move {
            let servers = if only.is_empty() {
                log_err(self.agent.list())?
            } else {
                let mut found = log_err(self.agent.find(&only).await)?;
                found.iter_mut().for_each(|s| s.reused = false);
                found.into_iter().collect()
            };
            Ok(Response::new(ListVncServersResponse { servers }))
        }
        .instrument(span)
        .await
    }

    async fn health(
        &self,
        req: Request<AgentHealthRequest>,
    ) -> Result<Response<AgentHealth>, Status> {
        let _e = span("Health", &req, "").entered();
        let health = log_err(self.agent.health())?;
        metrics::gauge!("vncdispatch_agent_sessions_live").set(f64::from(health.sessions));
        Ok(Response::new(health))
    }
}
