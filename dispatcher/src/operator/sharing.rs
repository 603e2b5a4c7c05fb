//! `dispatcher share …` and `dispatcher audit`: sharing desktops and reading the audit trail.
use super::{client, said, when};
use crate::cli::{ClientArgs, ShareCommand};
use std::time::{SystemTime, UNIX_EPOCH};
use vncdispatch_proto::v1::{
    AuditRequest, ListSharesRequest, RevokeShareRequest, ShareSessionRequest,
};

pub(crate) async fn share(c: ClientArgs, command: ShareCommand) -> anyhow::Result<()> {
    let mut client = client(&c).await?;
    match command {
        ShareCommand::Add {
            username,
            full_control,
            ttl,
            note,
        } => {
            let ttl_seconds = match ttl {
                Some(t) => u32::try_from(t.as_secs())
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--ttl: at least 1s (at most the dispatcher's --max-share-ttl)"
                        )
                    })?,
                None => 0,
            };
            let s = client
                .share_session(ShareSessionRequest {
                    username,
                    full_control,
                    ttl_seconds,
                    note,
                })
                .await
                .map_err(said)?
                .into_inner();
            println!("share:    {}", s.id);
            println!("owner:    {}", s.owner);
            println!(
                "rights:   {}",
                if s.view_only {
                    "view-only"
                } else {
                    "full control"
                }
            );
            println!("expires:  {}", when(s.expires_at.as_ref()));
            println!("token:    {}", s.token);
            println!(
                "viewer:   https://WS-PROXY/vnc.html?path=websockify%3Ftoken%3D{} (a ws-proxy with --auth-proxy)",
                s.token
            );
        }
        ShareCommand::List { username } => {
            let shares = client
                .list_shares(ListSharesRequest {
                    username: username.unwrap_or_default(),
                })
                .await
                .map_err(said)?
                .into_inner()
                .shares;
            println!(
                "{:<16} {:<24} {:<12} {:<20} {:<28} NOTE",
                "SHARE", "OWNER", "RIGHTS", "EXPIRES", "BY"
            );
            for s in shares {
                println!(
                    "{:<16} {:<24} {:<12} {:<20} {:<28} {}",
                    s.id,
                    s.owner,
                    if s.view_only { "view-only" } else { "control" },
                    when(s.expires_at.as_ref()),
                    s.created_by,
                    s.note
                );
            }
        }
        ShareCommand::Revoke { id } => {
            let revoked = client
                .revoke_share(RevokeShareRequest { id: id.clone() })
                .await
                .map_err(said)?
                .into_inner()
                .revoked;
            anyhow::ensure!(revoked, "no live share {id}");
            println!("revoked share {id}");
        }
    }
    Ok(())
}

pub(crate) async fn audit(
    c: ClientArgs,
    user: Option<String>,
    since: Option<SystemTime>,
    limit: u32,
    json: bool,
) -> anyhow::Result<()> {
    let since = since.map(|t| {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        prost_types::Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    });
    let events = client(&c)
        .await?
        .audit(AuditRequest {
            username: user.unwrap_or_default(),
            since,
            limit,
        })
        .await
        .map_err(said)?
        .into_inner()
        .events;
    if !json {
        println!(
            "{:<20} {:<14} {:<28} {:<20} DETAILS",
            "AT", "EVENT", "BY", "USER"
        );
    }
    for e in events {
        let fields: std::collections::BTreeMap<_, _> = e.fields.into_iter().collect();
        if json {
            let at = e.at.as_ref().map_or(0, dispatcher::dispatch::millis);
            println!(
                "{}",
                dispatcher::dispatch::audit::json_line(&dispatcher::store::AuditEvent {
                    at_ms: at,
                    kind: e.kind,
                    actor: e.actor,
                    username: e.username,
                    fields,
                })
            );
            continue;
        }
        let details: Vec<String> = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            // Quoted when a value could pass for more fields or lines.
            .map(|(k, v)| {
                if v.chars()
                    .all(|c| c.is_alphanumeric() || "._:-/".contains(c))
                {
                    format!("{k}={v}")
                } else {
                    format!("{k}={v:?}")
                }
            })
            .collect();
        println!(
            "{:<20} {:<14} {:<28} {:<20} {}",
            when(e.at.as_ref()),
            e.kind,
            e.actor,
            if e.username.is_empty() {
                "-"
            } else {
                &e.username
            },
            details.join(" ")
        );
    }
    Ok(())
}
