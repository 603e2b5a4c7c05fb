//! The sharing and audit RPCs and ws-proxy's connection reports: request checks and message
//! shapes around [`crate::dispatch::shares`] and [`crate::dispatch::audit`].
use super::{printable, status};
use crate::dispatch::Dispatcher;
use crate::dispatch::shares::{is_share_id, share_msg};
use crate::error::DispatchError;
use crate::store::AuditQuery;
use std::time::Duration;
use tonic::{Response, Status};
use vncdispatch_proto::v1::connection_event::Kind;
use vncdispatch_proto::v1::{
    AuditEntry, AuditRequest, AuditResponse, ConnectionEvent, ListSharesRequest,
    ListSharesResponse, RecordConnectionResponse, Share, ShareSessionRequest,
};

/// ShareSession: the share with its token (the only time it is shown).
pub(super) async fn share(
    d: &Dispatcher,
    actor: String,
    r: ShareSessionRequest,
) -> Result<Response<Share>, Status> {
    let ttl = (r.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(r.ttl_seconds)));
    let grant = d
        .share(&r.username, r.full_control, ttl, &r.note, &actor)
        .await
        .map_err(status)?;
    tracing::info!(share = %grant.share.id, view_only = grant.share.view_only, %actor, "desktop shared");
    Ok(Response::new(share_msg(grant.share, grant.token)))
}

/// ListShares: live shares without tokens or passwords.
pub(super) async fn list(
    d: &Dispatcher,
    r: ListSharesRequest,
) -> Result<Response<ListSharesResponse>, Status> {
    let owner = (!r.username.is_empty()).then_some(r.username.as_str());
    let shares = d.shares(owner).await.map_err(status)?;
    Ok(Response::new(ListSharesResponse {
        shares: shares
            .into_iter()
            .map(|s| share_msg(s, String::new()))
            .collect(),
    }))
}

/// Audit: the trail, oldest first.
pub(super) async fn audit(
    d: &Dispatcher,
    r: AuditRequest,
) -> Result<Response<AuditResponse>, Status> {
    let query = AuditQuery {
        username: (!r.username.is_empty()).then_some(r.username),
        since_ms: r.since.as_ref().map(crate::dispatch::millis),
        limit: r.limit as usize,
    };
    let events = d.audit_trail(query).await.map_err(status)?;
    Ok(Response::new(AuditResponse {
        events: events
            .into_iter()
            .map(|e| AuditEntry {
                at: Some(crate::dispatch::timestamp(e.at_ms)),
                kind: e.kind,
                actor: e.actor,
                username: e.username,
                fields: e.fields.into_iter().collect(),
            })
            .collect(),
    }))
}

/// Most connection reports one proxy identity may send a second (two per relayed connection:
/// 500 connections opened and closed a second). Beyond it they are refused, so a compromised
/// proxy cannot flood the audit queue and crowd out everyone else's events.
pub(super) const REPORTS_PER_SECOND: u32 = 1000;

/// Connection reports counted per proxy identity, for the current second.
#[derive(Debug, Default)]
pub(super) struct ReportBudget(std::sync::Mutex<std::collections::HashMap<String, (u64, u32)>>);

impl ReportBudget {
    /// Counts one report of `actor`'s; false when it is over this second's budget.
    fn take(&self, actor: &str) -> bool {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 1000 {
            m.clear(); // identities come from the CA: a handful; never grow without bound
        }
        let e = m.entry(actor.to_owned()).or_insert((second, 0));
        if e.0 != second {
            *e = (second, 0);
        }
        e.1 += 1;
        e.1 <= REPORTS_PER_SECOND
    }
}

/// RecordConnection: ws-proxy's report of a browser connecting or leaving, recorded as the
/// proxy reports it (the actor names the proxy) once its fields pass the rules.
pub(super) fn connection(
    d: &Dispatcher,
    budget: &ReportBudget,
    actor: String,
    e: ConnectionEvent,
) -> Result<Response<RecordConnectionResponse>, Status> {
    if !budget.take(&actor) {
        metrics::counter!("vncdispatch_dispatcher_audit_dropped_total").increment(1);
        return Err(Status::resource_exhausted(format!(
            "over {REPORTS_PER_SECOND} connection reports a second from {actor}; this one is not recorded"
        )));
    }
    let kind = match Kind::try_from(e.kind) {
        Ok(Kind::Connected) => "connect",
        Ok(Kind::Disconnected) => "disconnect",
        _ => return Err(status(bad("kind: CONNECTED or DISCONNECTED"))),
    };
    vncdispatch_proto::rules::validate_username(&e.username).map_err(|e| status(e.into()))?;
    if !e.share_id.is_empty() && !is_share_id(&e.share_id) {
        return Err(status(bad("share_id: empty or 16 hex digits")));
    }
    let client: std::net::IpAddr = e
        .client_ip
        .parse()
        .map_err(|_| status(bad("client_ip: an IPv4 or IPv6 address")))?;
    if !printable(&e.connection_id, 64) || !printable(&e.reason, 32) {
        return Err(status(bad(
            "connection_id: at most 64, reason: at most 32 printable ASCII characters",
        )));
    }
    let token_kind = match (e.share_id.is_empty(), e.view_only) {
        (true, _) => "owner",
        (false, true) => "share_view_only",
        (false, false) => "share_full_control",
    };
    let mut fields = vec![
        ("token_kind", token_kind.to_owned()),
        ("client_ip", client.to_string()),
        ("connection", e.connection_id),
    ];
    if !e.share_id.is_empty() {
        fields.push(("share", e.share_id));
    }
    if kind == "disconnect" {
        fields.extend([
            ("bytes_up", e.bytes_up.to_string()),
            ("bytes_down", e.bytes_down.to_string()),
            ("duration_ms", e.duration_ms.to_string()),
            ("reason", e.reason),
        ]);
    }
    d.record(kind, &actor, &e.username, &fields);
    Ok(Response::new(RecordConnectionResponse {}))
}

fn bad(why: &str) -> DispatchError {
    DispatchError::BadArgument(why.to_owned())
}
