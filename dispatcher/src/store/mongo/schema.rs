//! The original deployment's document shapes, mapped to and from our records: `config`'s
//! blade entries and `tokenizer` rows. Rows the original wrote are read as they are — numbers
//! as int32, int64, double or strings, secrets in clear, no host — so an existing database is
//! served without migration; rows we write keep its field names and add ours beside them
//! (see the module docs of [`super`]).
use super::LegacyBlades;
use crate::store::{BladeRecord, Claim, Method, SessionRecord, StoredSecret};
use mongodb::bson::{Bson, DateTime, Document, doc};
use vncdispatch_proto::rules::DEFAULT_POOL;

/// The blades of the `config` document in `blade_list` order: our details where we stored
/// them, else the legacy defaults (the original's blade names were host names).
pub(super) fn blades_of(config: &Document, legacy: &LegacyBlades) -> Vec<BladeRecord> {
    let names: Vec<String> = config
        .get_array("blade_list")
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let details: Vec<BladeRecord> = config
        .get_array("blades")
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_document().and_then(blade_from_doc))
                .collect()
        })
        .unwrap_or_default();
    names
        .into_iter()
        .map(|name| {
            details
                .iter()
                .find(|b| b.name == name)
                .cloned()
                .unwrap_or_else(|| BladeRecord {
                    host: name.clone(),
                    name,
                    port: legacy.port,
                    method: legacy.method,
                    draining: false,
                    pool: DEFAULT_POOL.to_owned(),
                    max_sessions: 0,
                })
        })
        .collect()
}

/// A blade as an entry of `config.blades`.
pub(super) fn blade_to_doc(b: &BladeRecord) -> Document {
    let method = match b.method {
        Method::Agent => "agent",
        Method::Ssh => "ssh",
    };
    doc! {
        "name": &b.name, "host": &b.host, "port": i32::from(b.port), "method": method,
        "draining": b.draining, "pool": &b.pool, "max_sessions": i64::from(b.max_sessions),
    }
}

/// A `config.blades` entry, or None if it lacks a field we need.
pub(super) fn blade_from_doc(d: &Document) -> Option<BladeRecord> {
    Some(BladeRecord {
        name: d.get_str("name").ok()?.to_owned(),
        host: d.get_str("host").ok()?.to_owned(),
        port: u16::try_from(int_of(d.get("port"))?).ok()?,
        method: if d.get_str("method").ok()? == "ssh" {
            Method::Ssh
        } else {
            Method::Agent
        },
        draining: d.get_bool("draining").unwrap_or(false),
        // Entries stored before pools and caps have neither.
        pool: d
            .get_str("pool")
            .map_or_else(|_| DEFAULT_POOL.to_owned(), str::to_owned),
        max_sessions: int_of(d.get("max_sessions"))
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    })
}

/// Numbers in rows the original wrote may be int32, int64, double or strings.
pub(super) fn int_of(v: Option<&Bson>) -> Option<i64> {
    match v? {
        Bson::Int32(i) => Some(i64::from(*i)),
        Bson::Int64(i) => Some(*i),
        Bson::Double(f) if f.fract() == 0.0 => Some(*f as i64),
        Bson::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A time as Unix milliseconds: a BSON date (ours) or a number.
fn time_of(v: Option<&Bson>) -> Option<i64> {
    match v? {
        Bson::DateTime(t) => Some(t.timestamp_millis()),
        other => int_of(Some(other)),
    }
}

/// A string field; numbers the original stored for it are turned into text.
fn str_of(d: &Document, key: &str) -> String {
    match d.get(key) {
        Some(Bson::String(s)) => s.clone(),
        Some(other @ (Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_))) => int_of(Some(other))
            .map(|i| i.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// Our sealed field if present, else the original's plain one.
fn secret_of(d: &Document, sealed: &str, plain: &str) -> StoredSecret {
    match d.get_str(sealed) {
        Ok(s) => StoredSecret::Sealed(s.to_owned()),
        Err(_) => StoredSecret::Plain(str_of(d, plain)),
    }
}

/// A `tokenizer` row as a record, filling what the original did not store.
pub(super) fn record_from_doc(d: &Document) -> SessionRecord {
    let display = int_of(d.get("display"))
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0);
    // Rows the original wrote have no host: the dispatcher takes it from the blade.
    let blade = str_of(d, "blade");
    let host = str_of(d, "host");
    SessionRecord {
        username: str_of(d, "username"),
        claim: d.get_str("claim_id").ok().map(|id| Claim {
            id: id.to_owned(),
            expires_at_ms: time_of(d.get("claim_expires")).unwrap_or(0),
        }),
        token_hash: str_of(d, "token_hash"),
        token: secret_of(d, "token_sealed", "token"),
        password: secret_of(d, "password_sealed", "password"),
        blade,
        host,
        display,
        port: int_of(d.get("port"))
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(5900 + display),
        vnc_pid: int_of(d.get("vncpid"))
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0),
        remote_ip: str_of(d, "remoteip"),
        created_at_ms: time_of(d.get("created_at")).unwrap_or(0),
        expires_at_ms: time_of(d.get("expires_at")),
        cert_sha256: str_of(d, "cert_sha256"),
        lease_until_ms: time_of(d.get("lease_until")),
        stops_at_ms: time_of(d.get("stops_at")),
        view_password: d
            .get_str("view_password_sealed")
            .ok()
            .map(|v| StoredSecret::Sealed(v.to_owned())),
    }
}

/// A record as a `tokenizer` row in the original's field names plus ours.
pub(super) fn record_to_doc(r: &SessionRecord) -> Document {
    let mut d = doc! {
        "username": &r.username,
        "blade": &r.blade,
        "display": r.display as i32,
        "vncpid": r.vnc_pid as i32,
        "remoteip": &r.remote_ip,
        "token_hash": &r.token_hash,
        "host": &r.host,
        "port": r.port as i32,
        "created_at": DateTime::from_millis(r.created_at_ms),
        "cert_sha256": &r.cert_sha256,
    };
    for (secret, sealed, plain) in [
        (&r.token, "token_sealed", "token"),
        (&r.password, "password_sealed", "password"),
    ] {
        match secret {
            StoredSecret::Sealed(s) => d.insert(sealed, s),
            StoredSecret::Plain(s) => d.insert(plain, s),
        };
    }
    // Only ever sealed (the original had no view-only password), so only sealed is kept.
    if let Some(StoredSecret::Sealed(v)) = &r.view_password {
        d.insert("view_password_sealed", v);
    }
    for (key, at) in [
        ("expires_at", r.expires_at_ms),
        ("lease_until", r.lease_until_ms),
        ("stops_at", r.stops_at_ms),
    ] {
        if let Some(t) = at {
            d.insert(key, DateTime::from_millis(t));
        }
    }
    if let Some(c) = &r.claim {
        d.insert("claim_id", &c.id);
        d.insert("claim_expires", DateTime::from_millis(c.expires_at_ms));
    }
    d
}

/// Filter for a ready row of `username` whose token hash is `hash` — or a legacy row that has
/// no hash yet (the caller computed `hash` from its plain token).
pub(super) fn ready_with_hash(username: &str, hash: &str) -> Document {
    doc! {
        "username": username,
        "claim_id": { "$exists": false },
        "$or": [ { "token_hash": hash }, { "token_hash": { "$exists": false } }, { "token_hash": "" } ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rows_the_original_wrote() {
        let d = doc! { "username": "alice", "password": "abcd1234", "token": "t0k", "blade": "blade1",
        "display": "3", "vncpid": 1234.0, "remoteip": "192.0.2.1" };
        let r = record_from_doc(&d);
        assert_eq!((r.display, r.port, r.vnc_pid), (3, 5903, 1234));
        assert_eq!(r.host, "", "filled in from the blade by the dispatcher");
        assert_eq!(r.token, StoredSecret::Plain("t0k".into()));
        assert_eq!(r.password, StoredSecret::Plain("abcd1234".into()));
        assert!(r.is_ready() && r.expires_at_ms.is_none());
    }

    #[test]
    fn record_round_trips() {
        let r = SessionRecord {
            username: "bob".into(),
            token_hash: "h".into(),
            token: StoredSecret::Sealed("s1".into()),
            password: StoredSecret::Sealed("s2".into()),
            blade: "b".into(),
            host: "127.0.0.2".into(),
            display: 4,
            port: 5904,
            vnc_pid: 99,
            remote_ip: "::1".into(),
            created_at_ms: 5,
            expires_at_ms: Some(10),
            claim: None,
            cert_sha256: "ab".repeat(32),
            lease_until_ms: Some(8),
            stops_at_ms: Some(12),
            view_password: Some(StoredSecret::Sealed("s3".into())),
        };
        assert_eq!(record_from_doc(&record_to_doc(&r)), r);
    }

    #[test]
    fn blades_keep_the_original_order_with_legacy_defaults_for_the_unregistered() {
        let ours = blade_to_doc(&BladeRecord {
            name: "b2".into(),
            host: "10.0.0.2".into(),
            port: 7501,
            method: Method::Agent,
            draining: true,
            pool: "lab".into(),
            max_sessions: 12,
        });
        let config = doc! { "blade_list": ["b1", "b2"], "num_of_blades": 2, "blades": [ours] };
        let legacy = LegacyBlades {
            method: Method::Ssh,
            port: 22,
        };
        let blades = blades_of(&config, &legacy);
        assert_eq!(
            blades
                .iter()
                .map(|b| (
                    b.name.as_str(),
                    b.host.as_str(),
                    b.port,
                    b.method,
                    b.draining
                ))
                .collect::<Vec<_>>(),
            [
                ("b1", "b1", 22, Method::Ssh, false),
                ("b2", "10.0.0.2", 7501, Method::Agent, true)
            ]
        );
        // Pools and caps round-trip; the original's blades are in the default pool, uncapped.
        assert_eq!(
            (blades[0].pool.as_str(), blades[0].max_sessions),
            ("default", 0)
        );
        assert_eq!(
            (blades[1].pool.as_str(), blades[1].max_sessions),
            ("lab", 12)
        );
    }
}
