//! A session's life: Dispatch (claim the user's slot → reuse a live session, or launch one on
//! the first blade that can), the clean-up of a start that answered after we gave up on its
//! blade, and the end of a session (revoke the token, stop the desktop).
//!
//! One session per user rests on the store's claim (see [`crate::store`]): the winner
//! launches and completes; the others wait, up to the claim's deadline, then take over. A
//! blade's refusal ([`LaunchError::Refused`]: unknown or system account, unsafe home) ends the
//! Dispatch; a blade's failure ([`LaunchError::Blade`] or a timeout) moves on to the next blade.
use super::audit::SELF_ACTOR;
use super::{Dispatcher, Session};
use crate::error::DispatchError;
use crate::launcher::{LaunchError, Launcher};
use crate::secrets;
use crate::store::{BladeRecord, Claim, ClaimOutcome, EndReason, SessionRecord, StoredSecret};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use vncdispatch_proto::rules::{parse_remote_ip, validate_pool, validate_username};

impl Dispatcher {
    /// Returns the user's live session or starts one in the default pool.
    pub async fn dispatch(
        self: &Arc<Self>,
        username: &str,
        remote_ip: &str,
        request_id: &str,
    ) -> Result<Session, DispatchError> {
        self.dispatch_in(username, remote_ip, "", request_id).await
    }

    /// Returns the user's live session (whatever pool it is in) or starts one on a blade of
    /// `pool` (empty: the default pool).
    pub async fn dispatch_in(
        self: &Arc<Self>,
        username: &str,
        remote_ip: &str,
        pool: &str,
        request_id: &str,
    ) -> Result<Session, DispatchError> {
        validate_username(username)?;
        let remote_ip = parse_remote_ip(remote_ip)?.to_string();
        let pool = validate_pool(pool)?.to_owned();
        // Wait out another Dispatch's claim, up to its expiry: a claim left by a dispatcher
        // that died mid-launch then lapses and this call takes over (adopting any desktop
        // the dead one had started) instead of failing.
        let give_up = tokio::time::Instant::now() + self.claim_ttl() + Duration::from_secs(2);
        loop {
            let now = self.now_ms();
            let claim = Claim {
                id: secrets::new_token().map_err(DispatchError::Secret)?,
                expires_at_ms: now + self.claim_ttl().as_millis() as i64,
            };
            match self.store.claim(username, &claim, now).await? {
                ClaimOutcome::Won => {
                    // The launch runs to its end in a task of its own: a caller that goes
                    // away (deadline, disconnect) must not strand the claim or a desktop.
                    let (me, user, ip, pool, id) = (
                        self.clone(),
                        username.to_owned(),
                        remote_ip.clone(),
                        pool.clone(),
                        request_id.to_owned(),
                    );
                    let launch = tokio::spawn(
                        async move { me.start_new(&user, &ip, &pool, &claim, &id).await }
                            .instrument(tracing::Span::current()),
                    );
                    return launch.await.unwrap_or_else(|e| {
                        Err(DispatchError::NoBlade(format!(
                            "the launch task failed: {e}"
                        )))
                    });
                }
                ClaimOutcome::Existing(rec) => {
                    if let Some(session) = self.reuse(*rec, &remote_ip, now).await? {
                        return Ok(session);
                    }
                }
                ClaimOutcome::Pending => {
                    if tokio::time::Instant::now() >= give_up {
                        return Err(DispatchError::Busy(username.to_owned()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Returns the existing session if it is still good (recording the new IP), or drops it
    /// and returns None so the caller starts a new one.
    async fn reuse(
        &self,
        mut rec: SessionRecord,
        remote_ip: &str,
        now: i64,
    ) -> Result<Option<Session>, DispatchError> {
        self.fill_host(&mut rec).await?;
        let (token, password) = self.reveal(&rec)?;
        let hash = secrets::token_hash(&token);
        if rec.is_due(now) {
            // Past its stop deadline, not yet swept: end it as the sweeper would.
            let reason = self.due_reason(&rec, now);
            if let Some(gone) = self
                .end_if_current(&rec, &hash, reason, "found due at a Dispatch")
                .await?
            {
                self.stop_desktop(&gone).await;
            }
            return Ok(None);
        }
        if !self.alive(&rec).await {
            tracing::warn!(user = %rec.username, blade = %rec.blade, pid = rec.vnc_pid, "desktop is gone; starting a new one");
            self.end_if_current(&rec, &hash, EndReason::XvncDied, "found gone at a Dispatch")
                .await?;
            return Ok(None);
        }
        // Write only when something changed enough to matter: reconnects stay read-only.
        let expires = now + self.ttl_ms();
        let stale_expiry = rec
            .expires_at_ms
            .is_none_or(|e| expires - e > self.ttl_ms() / 20);
        let rec = if rec.remote_ip != remote_ip || stale_expiry || rec.token_hash.is_empty() {
            let stops = self.stops_at(rec.created_at_ms, expires, rec.lease_until_ms);
            match self
                .store
                .touch(&rec.username, &hash, remote_ip, expires, stops)
                .await?
            {
                Some(mut updated) => {
                    self.fill_host(&mut updated).await?;
                    updated
                }
                None => return Ok(None), // replaced or ended meanwhile: look again
            }
        } else {
            rec
        };
        Ok(Some(self.session(&rec, token, password, true)))
    }

    /// Rows the original wrote name a blade but no host: the blade's host it is (its name, as
    /// the original's blade names were host names, if it is not registered).
    pub(super) async fn fill_host(&self, rec: &mut SessionRecord) -> Result<(), DispatchError> {
        if rec.host.is_empty() {
            let blade = self.blade_named(&rec.blade).await?;
            rec.host = blade.map(|b| b.host).unwrap_or_else(|| rec.blade.clone());
        }
        Ok(())
    }

    /// Whether the record's Xvnc still runs, as its blade says; when the blade cannot tell,
    /// yes (see below).
    pub(super) async fn alive(&self, rec: &SessionRecord) -> bool {
        let blade = match self.blade_named(&rec.blade).await {
            Ok(Some(b)) => b,
            Ok(None) => return false,
            Err(_) => return true, // cannot tell; the store error surfaces elsewhere
        };
        // No launcher for the blade's method here (an SSH blade without --ssh-key): cannot
        // tell, so keep it, as below.
        let Ok(launcher) = self.launchers.get(blade.method) else {
            return true;
        };
        match launcher.is_alive(&blade, &rec.username, rec.vnc_pid).await {
            Ok(alive) => alive,
            // Cannot tell (blade busy or briefly unreachable): keep the session. Replacing it
            // would revoke the token of a browser that may well be connected right now; if
            // the desktop really is gone, the next Dispatch that reaches the blade finds out.
            Err(e) => {
                tracing::warn!(blade = %blade.name, error = %e, "cannot check the desktop; keeping the session");
                true
            }
        }
    }

    /// Launches under our claim; on failure the claim is released so others need not wait it
    /// out.
    async fn start_new(
        &self,
        username: &str,
        remote_ip: &str,
        pool: &str,
        claim: &Claim,
        request_id: &str,
    ) -> Result<Session, DispatchError> {
        // The claim is renewed while the launch runs (blades tried one after another may
        // take longer than one claim), so no waiting Dispatch takes it over meanwhile.
        let renewal = {
            let (store, user, id, every, ttl, clock) = (
                self.store.clone(),
                username.to_owned(),
                claim.id.clone(),
                self.claim_ttl() / 3,
                self.claim_ttl().as_millis() as i64,
                self.clock.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match store.renew_claim(&user, &id, clock.now_ms() + ttl).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => tracing::warn!(error = %e, "could not renew the claim"),
                    }
                }
            })
        };
        let result = self
            .launch(username, remote_ip, pool, claim, request_id)
            .await;
        renewal.abort();
        if let Err(e) = &result {
            if let Err(e) = self.store.abandon(username, &claim.id).await {
                tracing::warn!(error = %e, "could not release the claim; it expires by itself");
            }
            if matches!(e, DispatchError::NoBlade(_)) {
                let failed = SessionRecord {
                    username: username.to_owned(),
                    created_at_ms: 0,
                    ..Default::default()
                };
                self.ended(&failed, EndReason::StartFailed, e.to_string(), SELF_ACTOR)
                    .await;
            }
        }
        result
    }

    /// Takes blades of `pool` one after another, best first, until one starts the desktop,
    /// then stores the session.
    async fn launch(
        &self,
        username: &str,
        remote_ip: &str,
        pool: &str,
        claim: &Claim,
        request_id: &str,
    ) -> Result<Session, DispatchError> {
        let mut walk = self.placement(pool).await?;
        let token = secrets::new_token().map_err(DispatchError::Secret)?;
        let passwords = secrets::new_passwords().map_err(DispatchError::Secret)?;
        let password = passwords.full.clone();
        // Sealed before any desktop starts: a failure here must not leave one running.
        let sealed_token = self
            .seal
            .seal(username, &token)
            .map_err(DispatchError::Secret)?;
        let sealed_password = self
            .seal
            .seal(username, &password)
            .map_err(DispatchError::Secret)?;
        let sealed_view = self
            .seal
            .seal(username, &passwords.view_only)
            .map_err(DispatchError::Secret)?;
        let mut failures = Vec::new();
        let mut full = 0;
        // Each blade is taken when the one before it failed, so it is the best by what
        // that failure taught (a blade found down or full has left the usable ones).
        while let Some((blade, reservation)) = self.take_blade(&mut walk) {
            let launcher = match self.launchers.get(blade.method) {
                Ok(l) => l,
                Err(e) => {
                    failures.push(format!("{}: {e}", blade.name));
                    continue;
                }
            };
            let started = tokio::time::timeout(
                self.cfg.launch_timeout,
                launcher.start(&blade, username, &passwords, request_id),
            )
            .await;
            // Counted until it gave a desktop; a start that timed out may still give one, so
            // its clean-up holds the reservation; a failed one is released here.
            let late = match &started {
                Ok(Ok(l)) => {
                    reservation.started(l.vnc_pid);
                    None
                }
                Ok(Err(_)) => None,
                Err(_) => Some(reservation),
            };
            let launched = match started {
                Ok(Ok(l)) => l,
                Ok(Err(LaunchError::Refused(status))) => {
                    return Err(DispatchError::Refused(status));
                }
                Ok(Err(LaunchError::Full(why))) => {
                    // Full, not broken: health stays; the poller sees its room come back.
                    metrics::counter!("vncdispatch_dispatcher_session_start_failures_total", "blade" => blade.name.clone(), "reason" => "full").increment(1);
                    tracing::info!(blade = %blade.name, %why, "blade is full; trying the next");
                    self.mark_full(&blade.name);
                    full += 1;
                    failures.push(why);
                    continue;
                }
                Ok(Err(LaunchError::Blade(why))) => {
                    metrics::counter!("vncdispatch_dispatcher_session_start_failures_total", "blade" => blade.name.clone(), "reason" => "blade_error").increment(1);
                    tracing::warn!(blade = %blade.name, %why, "blade could not start the desktop; trying the next");
                    self.mark(&blade.name, false, None);
                    failures.push(why);
                    continue;
                }
                Err(_) => {
                    metrics::counter!("vncdispatch_dispatcher_session_start_failures_total", "blade" => blade.name.clone(), "reason" => "timeout").increment(1);
                    self.clean_up_late_start(launcher.clone(), blade.clone(), username, late);
                    let why = format!(
                        "{}: no answer within {:?}",
                        blade.name, self.cfg.launch_timeout
                    );
                    tracing::warn!(blade = %blade.name, "start timed out; trying the next blade");
                    self.mark(&blade.name, false, None);
                    failures.push(why);
                    continue;
                }
            };
            metrics::counter!("vncdispatch_dispatcher_sessions_started_total", "blade" => blade.name.clone())
                .increment(1);
            let now = self.now_ms();
            let rec = SessionRecord {
                username: username.to_owned(),
                claim: None,
                token_hash: secrets::token_hash(&token),
                token: StoredSecret::Sealed(sealed_token.clone()),
                password: StoredSecret::Sealed(sealed_password.clone()),
                blade: blade.name.clone(),
                // Where ws-proxy connects is the blade as registered, never what the agent
                // reports: a compromised agent must not point relays elsewhere.
                host: blade.host.clone(),
                display: launched.display,
                port: launched.port,
                vnc_pid: launched.vnc_pid,
                remote_ip: remote_ip.to_owned(),
                created_at_ms: now,
                expires_at_ms: Some(now + self.ttl_ms()),
                cert_sha256: launched.cert_sha256,
                lease_until_ms: None,
                stops_at_ms: Some(self.stops_at(now, now + self.ttl_ms(), None)),
                view_password: launched
                    .view_only
                    .then(|| StoredSecret::Sealed(sealed_view.clone())),
            };
            if let Err(e) = self.store.complete(&rec, &claim.id).await {
                // The claim was taken over and the winner adopted this very desktop (same
                // blade, same Xvnc): it is in use, leave it.
                if let Ok(Some(stored)) = self.store.get_session(username).await
                    && stored.is_ready()
                    && stored.blade == blade.name
                    && stored.vnc_pid == launched.vnc_pid
                {
                    return Err(e.into());
                }
                self.freed(&blade.name, launched.vnc_pid);
                // A desktop no session points at would run on unseen: stop it.
                tracing::error!(blade = %blade.name, error = %e, "could not store the session; stopping the desktop just started");
                if let Err(stop) = launcher
                    .stop(&blade, username, Some(launched.vnc_pid))
                    .await
                {
                    tracing::warn!(blade = %blade.name, error = %stop, "could not stop it either; the blade's sweep will");
                }
                return Err(e.into());
            }
            tracing::info!(blade = %rec.blade, display = rec.display, pid = rec.vnc_pid, "session started");
            return Ok(self.session(&rec, token, password, false));
        }
        // Every blade tried was full — or none was left to try, concurrent calls having
        // filled the pool since it was looked at: either way, out of room.
        if full == walk.tried() {
            return Err(self.no_capacity(pool));
        }
        Err(DispatchError::NoBlade(format!(
            "no blade could start a desktop for {username:?}: {}",
            failures.join("; ")
        )))
    }

    /// A blade that did not answer a start in time may still carry it out when it recovers
    /// (a stopped or overloaded agent works through its queue), leaving a desktop no session
    /// points at. After a grace period, and while the user's session (if any) is elsewhere,
    /// ask that blade to stop the user's desktop; retried for a few minutes in the background.
    fn clean_up_late_start(
        &self,
        launcher: Arc<dyn Launcher>,
        blade: BladeRecord,
        username: &str,
        reservation: Option<super::placement::Reservation>,
    ) {
        let (store, username, grace) = (
            self.store.clone(),
            username.to_owned(),
            self.cfg.launch_timeout,
        );
        tokio::spawn(async move {
            // The blade's room stays counted until this ends (on every return below).
            let _reservation = reservation;
            for attempt in 0..8u32 {
                tokio::time::sleep(grace.max(Duration::from_secs(1)) * (attempt + 1)).await;
                match store.get_session(&username).await {
                    // The user's session is on that blade after all: the desktop is in use.
                    Ok(Some(rec)) if rec.is_ready() && rec.blade == blade.name => return,
                    // Another Dispatch is under way and may pick that blade; look again later.
                    Ok(Some(rec)) if !rec.is_ready() => continue,
                    // The session is elsewhere — but if this blade sees its very desktop (two
                    // agents on one host), a stop by user here would end it: leave it.
                    Ok(Some(rec)) => {
                        if launcher
                            .is_alive(&blade, &username, rec.vnc_pid)
                            .await
                            .unwrap_or(true)
                        {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => continue,
                }
                match launcher.stop(&blade, &username, None).await {
                    Ok(stopped) => {
                        if stopped {
                            tracing::info!(blade = %blade.name, user = %username, "stopped a desktop started after its Dispatch had given up on the blade");
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(blade = %blade.name, error = %e, "late-start cleanup: blade still unreachable");
                    }
                }
            }
        });
    }

    /// A Dispatch as the services serve it (gRPC, the HTTP route): [`Dispatcher::dispatch_in`],
    /// counted and timed in the Dispatch metrics and, when it succeeds, recorded in the audit
    /// trail as done by `actor` over `via`.
    pub async fn dispatch_as(
        self: &Arc<Self>,
        (username, remote_ip, pool): (&str, &str, &str),
        request_id: &str,
        actor: &str,
        via: &str,
    ) -> Result<Session, DispatchError> {
        let started = std::time::Instant::now();
        let result = self
            .dispatch_in(username, remote_ip, pool, request_id)
            .await;
        vncdispatch_proto::metrics::record_start(
            "vncdispatch_dispatcher_dispatches_total",
            "vncdispatch_dispatcher_dispatch_duration_seconds",
            result.as_ref().ok().map(|s| s.reused),
            started,
        );
        if let Ok(s) = &result {
            self.record_dispatch(s, pool, actor, via);
        }
        result
    }

    /// Records a successful Dispatch by `actor` in the audit trail.
    fn record_dispatch(&self, s: &Session, pool: &str, actor: &str, via: &str) {
        self.record(
            "dispatch",
            actor,
            &s.username,
            &[
                ("reused", s.reused.to_string()),
                ("blade", s.blade.clone()),
                ("display", s.display.to_string()),
                ("remote_ip", s.remote_ip.clone()),
                ("pool", pool.to_owned()),
                ("via", via.to_owned()),
            ],
        );
    }

    /// Revokes the user's token and stops the desktop; false if there was no session.
    /// `reason` says what kind of caller asked (the portal or an operator), `actor` who.
    pub async fn end(
        &self,
        username: &str,
        reason: EndReason,
        actor: &str,
    ) -> Result<bool, DispatchError> {
        validate_username(username)?;
        let Some(rec) = self.store.delete_session(username, None).await? else {
            return Ok(false);
        };
        self.ended(&rec, reason, String::new(), actor).await;
        self.stop_desktop(&rec).await;
        Ok(true)
    }

    /// Asks the record's blade to stop its desktop; a failure is logged, not returned (the
    /// token is already revoked).
    pub(super) async fn stop_desktop(&self, rec: &SessionRecord) {
        let Ok(Some(blade)) = self.blade_named(&rec.blade).await else {
            return;
        };
        let Ok(launcher) = self.launchers.get(blade.method) else {
            return;
        };
        // By pid: the stop is for this record's desktop, never a newer one of the user's.
        let pid = (rec.vnc_pid != 0).then_some(rec.vnc_pid);
        match launcher.stop(&blade, &rec.username, pid).await {
            // Its room is used at the next Dispatch, not at the next health report.
            Ok(true) => self.freed(&blade.name, rec.vnc_pid),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(blade = %blade.name, user = %rec.username, error = %e, "could not stop the desktop; the token is revoked anyway");
            }
        }
    }
}

/// The stored hash, or for a legacy row (no hash yet) the one computed from its token.
pub(super) fn rec_hash(rec: &SessionRecord, computed: &str) -> String {
    if rec.token_hash.is_empty() {
        computed.to_owned()
    } else {
        rec.token_hash.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::setup;
    use crate::error::DispatchError;
    use crate::store::{Claim, ClaimOutcome};
    use std::time::Duration;
    use tokio::time::Instant;

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(flavor = "multi_thread")]
    async fn a_refusal_is_not_retried_elsewhere_and_stores_nothing() {
        let (d, rec, _dir) = setup(&["b1", "b2"], HOUR).await;
        let err = d.dispatch("refuse", "192.0.2.1", "t").await.unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);
        assert!(rec.starts.lock().unwrap().is_empty());
        assert!(
            d.store().get_session("refuse").await.unwrap().is_none(),
            "the claim was released"
        );
    }

    // Reconnects write only when the expiry would move by more than a twentieth of the TTL.
    #[tokio::test(start_paused = true)]
    async fn a_reconnect_keeps_the_token_and_extends_expiry_only_when_it_matters() {
        let (d, rec, _dir) = setup(&["b1"], HOUR).await;
        let first = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        let soon = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        assert!(soon.reused && soon.token == first.token);
        assert_eq!(soon.expires_at, first.expires_at, "a minute in: no write");
        tokio::time::advance(Duration::from_secs(600)).await;
        let later = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        assert!(later.reused && later.token == first.token);
        let (was, now) = (
            first.expires_at.unwrap().seconds,
            later.expires_at.unwrap().seconds,
        );
        assert!(
            (660..=661).contains(&(now - was)),
            "eleven minutes in, the expiry moved by {}s",
            now - was
        );
        assert_eq!(rec.starts.lock().unwrap().get("b1"), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_session_is_replaced_on_the_next_dispatch() {
        let (d, rec, _dir) = setup(&["b1"], HOUR).await;
        let old = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        tokio::time::advance(HOUR + Duration::from_secs(1)).await;
        let new = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        assert!(!new.reused);
        assert_ne!(new.token, old.token, "an expired session gets a new token");
        assert!(matches!(
            d.resolve(&old.token, false).await,
            Err(DispatchError::UnknownToken)
        ));
        assert!(d.resolve(&new.token, false).await.is_ok());
        assert_eq!(rec.starts.lock().unwrap().get("b1"), Some(&2));
    }

    // A dispatcher that died mid-launch leaves its claim behind: the next Dispatch waits for
    // the claim's deadline (on the dispatcher's clock), then takes the slot over.
    #[tokio::test(start_paused = true)]
    async fn a_dead_dispatchers_claim_is_taken_over_at_its_deadline() {
        let (d, rec, _dir) = setup(&["b1"], HOUR).await;
        let now = d.now_ms();
        let dead = Claim {
            id: "dead".into(),
            expires_at_ms: now + 3_000,
        };
        assert_eq!(
            d.store().claim("u", &dead, now).await.unwrap(),
            ClaimOutcome::Won
        );
        let started = Instant::now();
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        let waited = started.elapsed();
        assert!(
            (Duration::from_secs(3)..Duration::from_secs(4)).contains(&waited),
            "took over after {waited:?}"
        );
        assert!(!s.reused);
        assert_eq!(rec.starts.lock().unwrap().get("b1"), Some(&1));
    }

    // A claim that outlives every reasonable launch: give up with UNAVAILABLE after the claim
    // TTL (launch timeout + 10 s) and 2 s more, rather than wait for ever.
    #[tokio::test(start_paused = true)]
    async fn a_claim_held_past_the_launch_window_makes_dispatch_busy() {
        let (d, rec, _dir) = setup(&["b1"], HOUR).await;
        let now = d.now_ms();
        let stuck = Claim {
            id: "stuck".into(),
            expires_at_ms: now + 3_600_000,
        };
        d.store().claim("u", &stuck, now).await.unwrap();
        let started = Instant::now();
        let err = d.dispatch("u", "192.0.2.1", "t").await.unwrap_err();
        let waited = started.elapsed();
        assert!(
            matches!(err, DispatchError::Busy(ref u) if u == "u"),
            "{err}"
        );
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        assert!(
            (Duration::from_secs(17)..Duration::from_secs(18)).contains(&waited),
            "gave up after {waited:?}"
        );
        assert!(rec.starts.lock().unwrap().is_empty());
    }

    // Three hung blades take 15 s of launch timeouts, as long as a claim lives: the claim is
    // renewed meanwhile, so a second Dispatch waits instead of taking over and starting a
    // second desktop; both get the one desktop the fourth blade started.
    #[tokio::test(start_paused = true)]
    async fn a_long_launch_keeps_its_claim_and_a_concurrent_dispatch_waits_for_it() {
        let (d, rec, _dir) = setup(&["slow1", "slow2", "slow3", "b4"], HOUR).await;
        let first = {
            let d = d.clone();
            tokio::spawn(async move { d.dispatch("u", "192.0.2.1", "t").await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        let first = first.await.unwrap().unwrap();
        assert_eq!((first.blade.as_str(), second.blade.as_str()), ("b4", "b4"));
        assert_eq!(first.token, second.token);
        assert!(second.reused);
        assert_eq!(rec.starts.lock().unwrap().get("b4"), Some(&1));
        assert!(
            rec.alive
                .lock()
                .unwrap()
                .iter()
                .any(|(b, u, _)| b == "b4" && u == "u")
        );
    }

    // A caller that goes away mid-launch strands nothing: the launch finishes in its own task
    // and stores the session, which the next Dispatch gets at once.
    #[tokio::test(start_paused = true)]
    async fn a_cancelled_dispatch_leaves_a_session_not_a_stuck_claim() {
        // Round-robin starts at the second blade here: a hung one.
        let (d, rec, _dir) = setup(&["b1", "slow2", "b3"], HOUR).await;
        let cancelled =
            tokio::time::timeout(Duration::from_secs(1), d.dispatch("u", "192.0.2.1", "t")).await;
        assert!(cancelled.is_err(), "the first caller gave up");
        tokio::time::sleep(Duration::from_secs(6)).await;
        let started = Instant::now();
        let s = d.dispatch("u", "192.0.2.1", "t").await.unwrap();
        assert!(s.reused, "the abandoned launch's session was stored");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited {:?}",
            started.elapsed()
        );
        assert_eq!(rec.starts.lock().unwrap().get("b3"), Some(&1));
    }

    // A blade that does not answer a start in time is left for the next one; once the grace
    // period (the launch timeout) has passed, the dispatcher asks it to stop whatever desktop
    // it may have started late for that user — and not before.
    #[tokio::test(start_paused = true)]
    async fn a_start_that_timed_out_is_cleaned_up_on_its_blade_after_the_grace_period() {
        let (d, rec, _dir) = setup(&["slow1", "b2"], HOUR).await;
        // Round-robin tries slow1 first for one of two users.
        let started = Instant::now();
        let (a, b) = (
            d.dispatch("ua", "192.0.2.1", "t").await.unwrap(),
            d.dispatch("ub", "192.0.2.1", "t").await.unwrap(),
        );
        assert_eq!((a.blade.as_str(), b.blade.as_str()), ("b2", "b2"));
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "one start waited out the launch timeout"
        );
        assert!(
            rec.stops.lock().unwrap().is_empty(),
            "no clean-up before grace"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        let stops = rec.stops.lock().unwrap().clone();
        assert_eq!(stops.len(), 1, "{stops:?}");
        assert_eq!(
            stops[0].0, "slow1",
            "only the blade that timed out: {stops:?}"
        );
        assert!(["ua", "ub"].contains(&stops[0].1.as_str()), "{stops:?}");
        // The session on b2 was left alone.
        let user = &stops[0].1;
        assert!(
            d.resolve(if user == "ua" { &a.token } else { &b.token }, false)
                .await
                .is_ok()
        );
    }
}
