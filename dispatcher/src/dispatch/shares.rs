//! Sharing a desktop: a token for someone else's browser, view-only unless full control is
//! asked for.
//!
//! View-only is Xvnc's to enforce, not ours: every desktop is started with a second,
//! view-only password in its password file, and a view-only share's token resolves to that
//! password — with it Xvnc grants no keyboard, pointer, clipboard or resize rights and keeps
//! the connection shared, whatever the client sends. ws-proxy in auth-proxy mode logs in with
//! it, so the viewer never sees any password.
//!
//! A share is stored by its token's SHA-256 and bound to the session it was made for: it stops
//! resolving at its expiry, when revoked, or when that session ends (a later desktop of the
//! same user is not shared by it). ws-proxy re-checks open connections, so a revoked or
//! expired share's viewer is closed within its re-check interval. A viewer renews no lease:
//! watching does not keep a desktop alive.
use super::{Dispatcher, Target, timestamp};
use crate::error::DispatchError;
use crate::secrets;
use crate::store::ShareRecord;
use std::time::Duration;
use vncdispatch_proto::rules::validate_username;

/// A share as made: the record, and the token only its maker is told.
pub struct Grant {
    /// The stored share.
    pub share: ShareRecord,
    /// The viewer's token (stored only hashed).
    pub token: String,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("share", &self.share)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Most live shares one desktop may have: a portal bug or a hostile portal cannot grow the
/// share table (scanned at every sweep) without bound.
pub const SHARES_PER_SESSION: usize = 20;

/// Longest note kept with a share.
const NOTE_MAX: usize = 200;

/// A note a person can read in a listing: letters, digits, spaces and ASCII punctuation,
/// bounded — nothing that moves or hides text (controls, bidi overrides, zero widths).
fn check_note(note: &str) -> Result<(), DispatchError> {
    let readable = |c: char| c.is_alphanumeric() || c == ' ' || c.is_ascii_punctuation();
    if note.chars().count() > NOTE_MAX || !note.chars().all(readable) {
        return Err(DispatchError::BadArgument(format!(
            "note: at most {NOTE_MAX} letters, digits, spaces and ASCII punctuation"
        )));
    }
    Ok(())
}

/// Whether `id` has the form of a share's id (16 hex digits, as [`Dispatcher::share`] makes
/// them).
pub fn is_share_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The protobuf message for a share (the token only when given: at its making).
pub fn share_msg(s: ShareRecord, token: String) -> vncdispatch_proto::v1::Share {
    vncdispatch_proto::v1::Share {
        id: s.id,
        token,
        owner: s.owner,
        view_only: s.view_only,
        created_by: s.created_by,
        created_at: Some(timestamp(s.created_at_ms)),
        expires_at: Some(timestamp(s.expires_at_ms)),
        note: s.note,
    }
}

impl Dispatcher {
    /// Shares `owner`'s running desktop for `ttl` (None: the default), made by `actor`.
    pub async fn share(
        &self,
        owner: &str,
        full_control: bool,
        ttl: Option<Duration>,
        note: &str,
        actor: &str,
    ) -> Result<Grant, DispatchError> {
        validate_username(owner)?;
        check_note(note)?;
        let ttl = ttl.unwrap_or(self.cfg.share_ttl);
        if ttl > self.cfg.max_share_ttl {
            return Err(DispatchError::BadArgument(format!(
                "ttl: at most {} (the dispatcher's --max-share-ttl)",
                humantime::format_duration(self.cfg.max_share_ttl)
            )));
        }
        let no_desktop = || DispatchError::NoSession(owner.to_owned());
        let rec = self
            .store
            .get_session(owner)
            .await?
            .filter(|r| r.is_ready() && !r.is_due(self.now_ms()))
            .ok_or_else(no_desktop)?;
        // Rows of the original service have no token hash to bind a share to.
        if rec.token_hash.is_empty() || (!full_control && rec.view_password.is_none()) {
            return Err(DispatchError::NotShareable(owner.to_owned()));
        }
        if !self.alive_cached(&rec).await {
            return Err(no_desktop());
        }
        // This session's live shares (the session was just read: no second read).
        let now = self.now_ms();
        let live = self
            .store
            .list_shares(Some(owner))
            .await?
            .into_iter()
            .filter(|s| s.expires_at_ms > now && s.session_token_hash == rec.token_hash)
            .count();
        if live >= SHARES_PER_SESSION {
            return Err(DispatchError::TooManyShares(owner.to_owned()));
        }
        let token = secrets::new_token().map_err(DispatchError::Secret)?;
        let id = secrets::new_token().map_err(DispatchError::Secret)?[..16].to_owned();
        let share = ShareRecord {
            id,
            token_hash: secrets::token_hash(&token),
            owner: owner.to_owned(),
            session_token_hash: rec.token_hash.clone(),
            view_only: !full_control,
            created_by: actor.to_owned(),
            note: note.to_owned(),
            created_at_ms: now,
            expires_at_ms: now + ttl.as_millis() as i64,
        };
        self.store.put_share(&share).await?;
        self.record(
            "share",
            actor,
            owner,
            &[
                ("share", share.id.clone()),
                ("view_only", share.view_only.to_string()),
                ("expires_in", humantime::format_duration(ttl).to_string()),
                ("note", share.note.clone()),
                ("blade", rec.blade.clone()),
            ],
        );
        Ok(Grant { share, token })
    }

    /// Revokes the share `id`; false if there was none.
    pub async fn revoke_share(&self, id: &str, actor: &str) -> Result<bool, DispatchError> {
        if !is_share_id(id) {
            return Err(DispatchError::BadArgument(
                "share id: 16 hex digits, as ShareSession and ListShares give it".into(),
            ));
        }
        let Some(gone) = self.store.remove_share(id).await? else {
            return Ok(false);
        };
        // One that had already expired is removed all the same, but was no longer live.
        if gone.expires_at_ms <= self.now_ms() {
            return Ok(false);
        }
        tracing::info!(share = %gone.id, owner = %gone.owner, "share revoked");
        self.record(
            "revoke_share",
            actor,
            &gone.owner,
            &[
                ("share", gone.id.clone()),
                ("view_only", gone.view_only.to_string()),
            ],
        );
        Ok(true)
    }

    /// Live shares, oldest first: everyone's or one user's — not expired, and of a session
    /// that still runs (one whose end could not remove its shares is not listed either).
    pub async fn shares(&self, owner: Option<&str>) -> Result<Vec<ShareRecord>, DispatchError> {
        let sessions: std::collections::HashSet<(String, String)> = match owner {
            Some(o) => {
                validate_username(o)?;
                self.store
                    .get_session(o)
                    .await?
                    .into_iter()
                    .collect::<Vec<_>>()
            }
            None => self.store.list_sessions().await?.into_iter().collect(),
        }
        .into_iter()
        .filter(|r| r.is_ready())
        .map(|r| (r.username, r.token_hash))
        .collect();
        let now = self.now_ms();
        let mut live = self.store.list_shares(owner).await?;
        live.retain(|s| {
            s.expires_at_ms > now
                && sessions.contains(&(s.owner.clone(), s.session_token_hash.clone()))
        });
        Ok(live)
    }

    /// Where a share's token leads, if `hash` is a live share's: the owner's desktop as long
    /// as it is the session the share was made for, with the password for the share's rights.
    pub(super) async fn resolve_share(&self, hash: &str) -> Result<Target, DispatchError> {
        let share = self
            .store
            .find_share(hash)
            .await?
            .ok_or(DispatchError::UnknownToken)?;
        let now = self.now_ms();
        if share.expires_at_ms <= now {
            return Err(DispatchError::UnknownToken);
        }
        let mut rec = self
            .store
            .get_session(&share.owner)
            .await?
            .filter(|r| r.is_ready() && !r.is_due(now) && r.token_hash == share.session_token_hash)
            .ok_or(DispatchError::UnknownToken)?;
        if !self.alive_cached(&rec).await {
            return Err(DispatchError::UnknownToken);
        }
        self.fill_host(&mut rec).await?;
        let password = if share.view_only {
            let sealed = rec
                .view_password
                .as_ref()
                .ok_or(DispatchError::UnknownToken)?;
            self.open_secret(&share.owner, sealed)?
        } else {
            self.reveal(&rec)?.1
        };
        Ok(Target {
            host: rec.host,
            port: rec.port,
            username: rec.username,
            remote_ip: rec.remote_ip,
            expires_at: Some(timestamp(share.expires_at_ms)),
            blade: rec.blade,
            password,
            cert_sha256: rec.cert_sha256,
            lease_until: None,
            view_only: share.view_only,
            share_id: share.id,
        })
    }

    /// Ends the shares of a session that ended; returns how many there were.
    pub(super) async fn end_shares(&self, owner: &str, session_token_hash: &str) -> usize {
        if session_token_hash.is_empty() {
            return 0; // a legacy row: never shared
        }
        match self.store.remove_shares_of(owner, session_token_hash).await {
            Ok(gone) => gone.len(),
            Err(e) => {
                // They resolve no more anyway (bound to the ended session); the sweeper's
                // expiry pass removes them later.
                tracing::warn!(error = %e, user = owner, "could not remove the ended session's shares");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::setup;
    use super::SHARES_PER_SESSION;
    use crate::error::DispatchError;
    use crate::store::EndReason;
    use std::time::Duration;

    fn gone(r: Result<super::Target, DispatchError>) -> bool {
        matches!(r, Err(DispatchError::UnknownToken))
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_leads_to_its_session_until_it_expires_is_revoked_or_the_session_ends() {
        let (d, _rec, _dir) = setup(&["b1"], Duration::from_secs(3600)).await;
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        let ttl = Some(Duration::from_secs(60));
        let view = d.share("u", false, ttl, "", "portal:p").await.unwrap();
        let t = d.resolve(&view.token, true).await.unwrap();
        let owner = d.resolve(&s.token, false).await.unwrap();
        assert!(t.view_only && t.share_id == view.share.id && t.lease_until.is_none());
        assert_ne!(
            t.password, owner.password,
            "a view-only share gets the view-only password"
        );
        let control = d.share("u", true, ttl, "", "admin:a").await.unwrap();
        assert_eq!(
            d.resolve(&control.token, false).await.unwrap().password,
            owner.password
        );
        // Listed while live, without anything secret in the record.
        assert_eq!(d.shares(Some("u")).await.unwrap().len(), 2);

        assert!(d.revoke_share(&control.share.id, "portal:p").await.unwrap());
        assert!(gone(d.resolve(&control.token, false).await));
        assert!(!d.revoke_share(&control.share.id, "portal:p").await.unwrap());

        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(gone(d.resolve(&view.token, false).await), "expired");
        assert!(d.shares(None).await.unwrap().is_empty());

        let kept = d.share("u", false, None, "", "portal:p").await.unwrap();
        assert!(d.end("u", EndReason::Portal, "portal:p").await.unwrap());
        d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        assert!(
            gone(d.resolve(&kept.token, false).await),
            "not the user's next desktop"
        );
        assert!(d.shares(Some("u")).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn bad_shares_are_refused() {
        let (d, _rec, _dir) = setup(&["b1"], Duration::from_secs(3600)).await;
        assert!(matches!(
            d.share("nobody", false, None, "", "p").await,
            Err(DispatchError::NoSession(_))
        ));
        d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        for note in ["a\nb", "\u{202e}evil", &"x".repeat(201)] {
            assert!(matches!(
                d.share("u", false, None, note, "p").await,
                Err(DispatchError::BadArgument(_))
            ));
        }
        let long = Some(Duration::from_secs(25 * 3600));
        assert!(matches!(
            d.share("u", false, long, "", "p").await,
            Err(DispatchError::BadArgument(_))
        ));
        for _ in 0..SHARES_PER_SESSION {
            d.share("u", false, None, "ticket #1: ok", "p")
                .await
                .unwrap();
        }
        assert!(matches!(
            d.share("u", false, None, "", "p").await,
            Err(DispatchError::TooManyShares(_))
        ));
    }
}
