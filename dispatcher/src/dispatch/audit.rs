//! The audit trail: who dispatched, connected, shared, revoked, ended and administered what.
//!
//! Each event is logged at once as one JSON line on its own log target
//! (`vncdispatch::audit`, so an operator can route or filter it: `RUST_LOG=vncdispatch::audit=info`)
//! and queued for the store, where `dispatcher audit` reads it and the sweeper drops what is
//! older than `--audit-retention`. A background writer stores what is queued in batches — one
//! store write per batch, not per event — so auditing adds no store round trip to a Dispatch.
//! A write that fails is retried; an event the store never took is still in the log (and
//! counted in `vncdispatch_dispatcher_audit_dropped_total`). Reads flush the queue first, so
//! `dispatcher audit` shows everything this dispatcher did before it was asked.
use crate::store::{AuditEvent, Store};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Events queued at most; beyond it new ones are only logged (and counted as dropped).
const QUEUE: usize = 10_000;
/// Most events in one store write.
const BATCH: usize = 500;
/// Attempts at storing a batch before giving up on it.
const ATTEMPTS: u32 = 4;

/// The actor for what the dispatcher does by itself (its sweeper, a desktop found gone).
pub const SELF_ACTOR: &str = "dispatcher";

enum Msg {
    Event(AuditEvent),
    Flush(oneshot::Sender<()>),
}

/// Where the dispatcher's code records events.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<Msg>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("audit message")
    }
}

impl AuditLog {
    /// An audit log storing into `store`, its writer a task on the current runtime (outside
    /// one — never in the services — events are only logged).
    pub fn new(store: Arc<dyn Store>) -> Self {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return AuditLog { tx: None };
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        rt.spawn(write_loop(store, rx));
        AuditLog { tx: Some(tx) }
    }

    /// Records one event: logged now, stored soon.
    pub fn record(&self, event: AuditEvent) {
        tracing::info!(target: "vncdispatch::audit", "{}", json_line(&event));
        metrics::counter!("vncdispatch_dispatcher_audit_events_total", "kind" => event.kind.clone())
            .increment(1);
        let queued = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(Msg::Event(event)).is_ok());
        if !queued {
            metrics::counter!("vncdispatch_dispatcher_audit_dropped_total").increment(1);
            tracing::warn!(
                "audit queue full or closed: the event is in the log only (is the store slow?)"
            );
        }
    }

    /// Waits until every event recorded before the call is stored (or given up on).
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// An event at `at_ms`: `fields` as (name, value) pairs.
pub fn event(
    at_ms: i64,
    kind: &str,
    actor: &str,
    username: &str,
    fields: &[(&str, String)],
) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind: kind.to_owned(),
        actor: actor.to_owned(),
        username: username.to_owned(),
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// The event as one JSON line, its time in RFC 3339 (UTC, milliseconds) for people.
pub fn json_line(e: &AuditEvent) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(e.at_ms).unwrap_or(0));
    serde_json::json!({
        "at": humantime::format_rfc3339_millis(at).to_string(),
        "kind": e.kind,
        "actor": e.actor,
        "username": e.username,
        "fields": e.fields,
    })
    .to_string()
}

/// Most events one read returns.
pub const READ_MAX: usize = 10_000;

impl super::Dispatcher {
    /// The audit trail matching `query` (its limit 0: 100; capped at [`READ_MAX`]), oldest
    /// first, after storing what this dispatcher has queued.
    pub async fn audit_trail(
        &self,
        mut query: crate::store::AuditQuery,
    ) -> Result<Vec<AuditEvent>, crate::error::DispatchError> {
        if let Some(u) = &query.username {
            vncdispatch_proto::rules::validate_username(u)?;
        }
        query.limit = match query.limit {
            0 => 100,
            n => n.min(READ_MAX),
        };
        self.audit.flush().await;
        Ok(self.store.audit(&query).await?)
    }
}

/// Stores what is queued, a batch per write, until every sender is gone.
async fn write_loop(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Msg>) {
    let mut batch = Vec::new();
    let mut waiting = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(e) => batch.push(e),
                Msg::Flush(done) => waiting.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            store_batch(store.as_ref(), &batch).await;
            batch.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Stores one batch, retrying with a growing pause; gives up (the events stay in the log).
async fn store_batch(store: &dyn Store, batch: &[AuditEvent]) {
    let mut pause = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        match store.record_audit(batch).await {
            Ok(()) => return,
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, events = batch.len(), "storing audit events failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => {
                metrics::counter!("vncdispatch_dispatcher_audit_dropped_total")
                    .increment(batch.len() as u64);
                tracing::error!(error = %e, events = batch.len(), "audit events not stored (they are in this log)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_one_line_with_a_readable_time() {
        let e = event(
            1_800_000_000_123,
            "share",
            "portal:web1",
            "alice",
            &[("note", "line\nbreak \"quoted\"".into())],
        );
        let line = json_line(&e);
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["at"], "2027-01-15T08:00:00.123Z");
        assert_eq!(v["fields"]["note"], "line\nbreak \"quoted\"");
    }
}
