//! The `Dispatcher` gRPC service: a thin layer over [`crate::dispatch::Dispatcher`] with a span
//! per call (request id, user) and errors mapped to statuses.
//!
//! Each RPC's span comes from `#[tracing::instrument]`, named for the RPC and carrying only
//! what identifies the call: user, remote IP, request id, blade — and of a token only its
//! prefix, never the whole token or a password (`skip_all` keeps the request out of spans).
//! Sharing, the audit trail and ws-proxy's connection reports are in `sharing.rs`.
use crate::dispatch::Dispatcher;
use crate::error::DispatchError;
use crate::store::{EndReason, Method};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use vncdispatch_proto::redact::token_prefix;
use vncdispatch_proto::v1::EndedSession as EndedSessionMsg;
use vncdispatch_proto::v1::dispatcher_server::Dispatcher as DispatcherRpc;
use vncdispatch_proto::v1::{
    AddBladeRequest, AuditRequest, AuditResponse, Blade, ConnectionEvent, DispatchRequest,
    DrainBladeRequest, EndSessionRequest, EndSessionResponse, LaunchMethod, ListBladesRequest,
    ListBladesResponse, ListSessionsRequest, ListSessionsResponse, ListSharesRequest,
    ListSharesResponse, RecordConnectionResponse, RemoveBladeRequest, RemoveBladeResponse,
    ResolveTokenRequest, RevokeShareRequest, RevokeShareResponse, Session, SessionHistoryRequest,
    SessionHistoryResponse, Share, ShareSessionRequest, Target,
};

mod sharing;

/// The actor the audit trail names for calls to a server without TLS (loopback, or the
/// operator's explicit `--insecure-plaintext`): there is no certificate to name anyone.
pub const PLAINTEXT_ACTOR: &str = "plaintext";

/// Who made the call, for the audit trail: `role:certificate name`, or [`PLAINTEXT_ACTOR`].
fn actor<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<vncdispatch_proto::roles::Identity>()
        .map_or_else(|| PLAINTEXT_ACTOR.to_owned(), ToString::to_string)
}

/// The service handed to tonic.
#[derive(Debug, Clone)]
pub struct DispatcherService {
    inner: Arc<Dispatcher>,
    /// Connection reports taken per proxy identity this second.
    reports: Arc<sharing::ReportBudget>,
}

impl DispatcherService {
    /// Wraps the domain object.
    pub fn new(inner: Arc<Dispatcher>) -> Self {
        DispatcherService {
            inner,
            reports: Arc::default(),
        }
    }
}

/// The caller's request id (`x-request-id`), or a fresh one; it follows the call to the agent.
fn request_id<T>(req: &Request<T>) -> String {
    request_id_of(
        req.metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
    )
}

/// A caller's request id if it is a sane one (≤ 64 printable ASCII), else a fresh one.
pub(crate) fn request_id_of(given: Option<&str>) -> String {
    given
        .filter(|v| printable(v, 64))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            crate::secrets::new_token()
                .map(|t| t[..16].to_owned())
                .unwrap_or_default()
        })
}

/// At most `max` bytes of printable ASCII without spaces: what a caller-chosen id or code may
/// be before it goes into a log line or the audit trail.
pub(crate) fn printable(s: &str, max: usize) -> bool {
    s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The status for a failed call, logged: failures as warnings, refusals as information.
pub(crate) fn status(e: DispatchError) -> Status {
    let s = Status::from(e);
    if s.code() == tonic::Code::Internal || s.code() == tonic::Code::Unavailable {
        tracing::warn!(code = ?s.code(), error = s.message(), "request failed");
    } else {
        tracing::info!(code = ?s.code(), error = s.message(), "request refused");
    }
    s
}

fn ended_msg(e: crate::store::EndedSession) -> EndedSessionMsg {
    EndedSessionMsg {
        username: e.username,
        blade: e.blade,
        display: e.display,
        vnc_pid: e.vnc_pid,
        started_at: (e.created_at_ms > 0).then(|| crate::dispatch::timestamp(e.created_at_ms)),
        ended_at: Some(crate::dispatch::timestamp(e.ended_at_ms)),
        reason: e.reason.as_str().to_owned(),
        detail: e.detail,
    }
}

fn method_of(m: i32) -> Result<Method, Status> {
    match LaunchMethod::try_from(m) {
        Ok(LaunchMethod::Unspecified | LaunchMethod::Agent) => Ok(Method::Agent),
        Ok(LaunchMethod::Ssh) => Ok(Method::Ssh),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown launch method {m}"
        ))),
    }
}

fn blade_msg(
    b: crate::store::BladeRecord,
    health: Option<crate::dispatch::BladeHealth>,
    sessions: usize,
) -> Blade {
    let score = crate::dispatch::capacity::score(&b, health.as_ref());
    let load = health.as_ref().map(|h| &h.load);
    Blade {
        name: b.name,
        host: b.host,
        port: u32::from(b.port),
        method: match b.method {
            Method::Agent => LaunchMethod::Agent,
            Method::Ssh => LaunchMethod::Ssh,
        } as i32,
        draining: b.draining,
        healthy: health.as_ref().is_none_or(|h| h.healthy),
        sessions: sessions as u32,
        load1: load.map_or(0.0, |l| l.load1),
        free_displays: load.filter(|l| l.reported).map_or(0, |l| l.free_displays),
        cpus: load.map_or(0, |l| l.cpus),
        mem_available_bytes: load.map_or(0, |l| l.mem_available),
        score,
        pool: b.pool,
        max_sessions: b.max_sessions,
    }
}

#[tonic::async_trait]
impl DispatcherRpc for DispatcherService {
    #[tracing::instrument(
        name = "Dispatch",
        skip_all,
        fields(
            user = %req.get_ref().username,
            remote_ip = %req.get_ref().remote_ip,
            pool = ?req.get_ref().pool,
            request_id = tracing::field::Empty,
        )
    )]
    async fn dispatch(&self, req: Request<DispatchRequest>) -> Result<Response<Session>, Status> {
        // Recorded, not computed in the attribute: a missing id is made up once, and the same
        // one goes to the log and to the agent.
        let id = request_id(&req);
        tracing::Span::current().record("request_id", tracing::field::display(&id));
        let actor = actor(&req);
        let r = req.into_inner();
        let s = self
            .inner
            .dispatch_as((&r.username, &r.remote_ip, &r.pool), &id, &actor, "grpc")
            .await
            .map_err(status)?;
        // Reconnects are routine; new sessions are what an operator wants to see.
        if s.reused {
            tracing::debug!(blade = %s.blade, token = token_prefix(&s.token), "reconnected");
        } else {
            tracing::info!(blade = %s.blade, display = s.display, token = token_prefix(&s.token), "dispatched");
        }
        Ok(Response::new(s))
    }

    #[tracing::instrument(
        name = "ResolveToken",
        level = "debug",
        skip_all,
        fields(token = token_prefix(&req.get_ref().token))
    )]
    async fn resolve_token(
        &self,
        req: Request<ResolveTokenRequest>,
    ) -> Result<Response<Target>, Status> {
        let r = req.into_inner();
        let result = self.inner.resolve(&r.token, r.attached).await;
        if let Err(crate::error::DispatchError::UnknownToken) = &result {
            metrics::counter!("vncdispatch_auth_refusals_total", "reason" => "unknown_token")
                .increment(1);
        }
        result.map(Response::new).map_err(status)
    }

    #[tracing::instrument(name = "EndSession", skip_all, fields(user = %req.get_ref().username))]
    async fn end_session(
        &self,
        req: Request<EndSessionRequest>,
    ) -> Result<Response<EndSessionResponse>, Status> {
        // Who asked, from the certificate's role: an operator's CLI, or the portal (also on a
        // plaintext loopback server, which has no roles).
        let reason = match req.extensions().get::<vncdispatch_proto::roles::Role>() {
            Some(vncdispatch_proto::roles::Role::Admin) => EndReason::Operator,
            _ => EndReason::Portal,
        };
        let actor = actor(&req);
        let user = req.into_inner().username;
        let ended = self
            .inner
            .end(&user, reason, &actor)
            .await
            .map_err(status)?;
        Ok(Response::new(EndSessionResponse { ended }))
    }

    async fn session_history(
        &self,
        req: Request<SessionHistoryRequest>,
    ) -> Result<Response<SessionHistoryResponse>, Status> {
        let r = req.into_inner();
        let user = (!r.username.is_empty()).then_some(r.username.as_str());
        let ended = self
            .inner
            .history(user, r.limit as usize)
            .await
            .map_err(status)?;
        Ok(Response::new(SessionHistoryResponse {
            sessions: ended.into_iter().map(ended_msg).collect(),
        }))
    }

    // Listings get no span of their own (as before): they are frequent and carry no subject.
    async fn list_sessions(
        &self,
        req: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let blade = req.into_inner().blade;
        let sessions = self.inner.list(&blade).await.map_err(status)?;
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    #[tracing::instrument(
        name = "AddBlade",
        skip_all,
        fields(blade = %req.get_ref().name, host = %req.get_ref().host)
    )]
    async fn add_blade(&self, req: Request<AddBladeRequest>) -> Result<Response<Blade>, Status> {
        let actor = actor(&req);
        let r = req.into_inner();
        let b = self
            .inner
            .add_blade(
                &r.name,
                &r.host,
                r.port,
                method_of(r.method)?,
                r.pool.as_deref(),
                r.max_sessions,
            )
            .await
            .map_err(status)?;
        tracing::info!(port = b.port, method = ?b.method, pool = %b.pool, max_sessions = b.max_sessions, "blade registered");
        self.inner.record(
            "blade_add",
            &actor,
            "",
            &[
                ("blade", b.name.clone()),
                ("host", b.host.clone()),
                ("port", b.port.to_string()),
                ("pool", b.pool.clone()),
                ("max_sessions", b.max_sessions.to_string()),
            ],
        );
        Ok(Response::new(blade_msg(b, None, 0)))
    }

    async fn list_blades(
        &self,
        _req: Request<ListBladesRequest>,
    ) -> Result<Response<ListBladesResponse>, Status> {
        let blades = self.inner.blades().await.map_err(status)?;
        Ok(Response::new(ListBladesResponse {
            blades: blades
                .into_iter()
                .map(|(b, h, n)| blade_msg(b, h, n))
                .collect(),
        }))
    }

    #[tracing::instrument(
        name = "DrainBlade",
        skip_all,
        fields(blade = %req.get_ref().name, draining = req.get_ref().draining)
    )]
    async fn drain_blade(
        &self,
        req: Request<DrainBladeRequest>,
    ) -> Result<Response<Blade>, Status> {
        let actor = actor(&req);
        let r = req.into_inner();
        let b = self
            .inner
            .drain(&r.name, r.draining)
            .await
            .map_err(status)?;
        tracing::info!("blade drain state set");
        self.inner.record(
            "blade_drain",
            &actor,
            "",
            &[
                ("blade", b.name.clone()),
                ("draining", b.draining.to_string()),
            ],
        );
        Ok(Response::new(blade_msg(b, None, 0)))
    }

    #[tracing::instrument(
        name = "RemoveBlade",
        skip_all,
        fields(blade = %req.get_ref().name, force = req.get_ref().force)
    )]
    async fn remove_blade(
        &self,
        req: Request<RemoveBladeRequest>,
    ) -> Result<Response<RemoveBladeResponse>, Status> {
        let actor = actor(&req);
        let r = req.into_inner();
        let removed = self
            .inner
            .remove_blade(&r.name, r.force, &actor)
            .await
            .map_err(status)?;
        if removed {
            self.inner.record(
                "blade_remove",
                &actor,
                "",
                &[("blade", r.name), ("force", r.force.to_string())],
            );
        }
        Ok(Response::new(RemoveBladeResponse { removed }))
    }

    #[tracing::instrument(name = "ShareSession", skip_all, fields(user = %req.get_ref().username))]
    async fn share_session(
        &self,
        req: Request<ShareSessionRequest>,
    ) -> Result<Response<Share>, Status> {
        sharing::share(&self.inner, actor(&req), req.into_inner()).await
    }

    // The id is logged once it passed the rules (see `revoke_share`), never before.
    #[tracing::instrument(name = "RevokeShare", skip_all)]
    async fn revoke_share(
        &self,
        req: Request<RevokeShareRequest>,
    ) -> Result<Response<RevokeShareResponse>, Status> {
        let actor = actor(&req);
        let revoked = self
            .inner
            .revoke_share(&req.into_inner().id, &actor)
            .await
            .map_err(status)?;
        Ok(Response::new(RevokeShareResponse { revoked }))
    }

    async fn list_shares(
        &self,
        req: Request<ListSharesRequest>,
    ) -> Result<Response<ListSharesResponse>, Status> {
        sharing::list(&self.inner, req.into_inner()).await
    }

    async fn audit(&self, req: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        sharing::audit(&self.inner, req.into_inner()).await
    }

    #[tracing::instrument(name = "RecordConnection", level = "debug", skip_all)]
    async fn record_connection(
        &self,
        req: Request<ConnectionEvent>,
    ) -> Result<Response<RecordConnectionResponse>, Status> {
        sharing::connection(&self.inner, &self.reports, actor(&req), req.into_inner())
    }
}
