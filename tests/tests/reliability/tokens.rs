//! Tokens: guessing them at the dispatcher and through ws-proxy, a near miss, more
//! connections per token than allowed, a token used after EndSession and after expiry, and a
//! stale token of a dead desktop whose port another user's desktop now has.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tonic::Code;
use vncdispatch_proto::v1::{EndSessionRequest, ResolveTokenRequest};
use vncdispatch_tests::reliability::attack::code;
use vncdispatch_tests::reliability::ws::{close_code, close_released, ws_from};
use vncdispatch_tests::reliability::{Log, Record};
use vncdispatch_tests::require_root_and_tigervnc;
use vncdispatch_tests::rig::{Rig, UserDesktop};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::wsproxy::WsProxyProc;

#[tokio::test(flavor = "multi_thread")]
async fn tokens() {
    require_root_and_tigervnc();
    let rec = Record::new("tokens");
    // Short lifecycle: tokens 4 s, leases 3 s (ws-proxy renews every 1 s), grace 2 s.
    let s = Rig::with_dispatcher_args(&[
        "--token-ttl",
        "4s",
        "--lease",
        "3s",
        "--idle-grace",
        "2s",
        "--sweep-interval",
        "1s",
    ])
    .await;
    let mut c = s.client().await;

    // 100,000 guesses straight at the dispatcher.
    let guesses: u64 = 100_000;
    let started = Instant::now();
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut found = 0u64;
                for _ in 0..guesses / 32 {
                    let mut b = [0u8; 30];
                    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
                    b[0] = w as u8;
                    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    let r = c
                        .resolve_token(ResolveTokenRequest {
                            token,
                            attached: false,
                        })
                        .await;
                    if r.as_ref().err().map(|e| e.code()) != Some(Code::NotFound) {
                        found += 1;
                    }
                }
                found
            })
        })
        .collect();
    let mut not_refused = 0;
    for w in workers {
        not_refused += w.await.unwrap_or(u64::MAX / 64);
    }
    let tried = guesses / 32 * 32;
    rec.bad_inputs(tried);
    rec.case(
        "100,000 guessed tokens at the dispatcher",
        &format!(
            "{tried} random well-formed tokens to ResolveToken from 32 concurrent callers ({:.0} per s)",
            tried as f64 / started.elapsed().as_secs_f64()
        ),
        "every one NotFound; lookups are by SHA-256 of the token in an index, so no comparison with a stored token leaks timing",
        &format!("{} refused, {not_refused} not", tried - not_refused),
        not_refused == 0,
    );

    // Guessing through ws-proxy is rate-limited per client IP; other clients are unaffected.
    let proxy = WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", s.dispatcher.addr),
        "--recheck-interval".into(),
        "1s".into(),
        "--max-token-failures".into(),
        "30".into(),
    ])
    .await;
    let mut statuses = BTreeMap::<String, usize>::new();
    for _ in 0..200 {
        let mut b = [0u8; 30];
        rand::Rng::fill(&mut rand::rng(), &mut b[..]);
        let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let st = match ws_from(proxy.addr, [127, 0, 0, 1], &token).await {
            Ok(_) => 101,
            Err(st) => st,
        };
        *statuses.entry(st.to_string()).or_default() += 1;
    }
    rec.bad_inputs(200);
    let UserDesktop { user, session, .. } = s.user_with_desktop("127.0.0.2").await;
    rec.session(&session);
    let other_ip = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    rec.case(
        "guessing tokens through ws-proxy",
        "200 random tokens from one client IP (limit: 30 failures per minute), then a real token from another IP",
        "403 for the first 30, then 429 without a lookup; the other client connects",
        &format!(
            "statuses {statuses:?}; other client: {}",
            other_ip.as_ref().map(|_| "connected".to_owned()).unwrap_or_else(|e| e.to_string())
        ),
        statuses.get("403") == Some(&30) && statuses.get("429") == Some(&170) && other_ip.is_ok(),
    );
    close_released(&proxy, other_ip.ok(), 0).await;

    // A token one hex digit away from a real one.
    let mut near = session.token.clone().into_bytes();
    let last = near.len() - 1;
    near[last] = if near[last] == b'0' { b'1' } else { b'0' };
    let near = String::from_utf8(near).expect("hex");
    let r = c
        .resolve_token(ResolveTokenRequest {
            token: near,
            attached: false,
        })
        .await;
    rec.bad_inputs(1);
    rec.case(
        "a near miss",
        "a real token with its last hex digit changed",
        "NotFound, like any other wrong token",
        &code(&r),
        r.as_ref().err().map(|e| e.code()) == Some(Code::NotFound),
    );

    // Per-token connection limit.
    let a = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    let b = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    let third = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    rec.bad_inputs(1);
    rec.case(
        "one token from more connections than allowed",
        "three connections with one token (limit 2)",
        "the first two relay (101), the third gets 429",
        &format!(
            "{}, {}, {}",
            a.as_ref().err().copied().unwrap_or(101),
            b.as_ref().err().copied().unwrap_or(101),
            third.as_ref().err().copied().unwrap_or(101)
        ),
        a.is_ok() && b.is_ok() && third.as_ref().err() == Some(&429),
    );
    close_released(&proxy, b.ok().into_iter().chain(third.ok()), 1).await;

    // EndSession closes the relayed connection and the token stops working.
    let mut a = a.expect("connected");
    let ended = c
        .end_session(EndSessionRequest {
            username: user.name.clone(),
        })
        .await
        .map(|r| r.into_inner().ended);
    let closed = close_code(&mut a, 10).await;
    close_released(&proxy, [a], 0).await;
    let again = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    let resolved = c
        .resolve_token(ResolveTokenRequest {
            token: session.token.clone(),
            attached: false,
        })
        .await;
    rec.bad_inputs(2);
    rec.case(
        "a token used after EndSession",
        "EndSession while a browser is connected; then the same token again",
        "the open connection closed (1008 when the recheck notices first, 1000 when the stopped Xvnc ends it first); the token refused by ws-proxy (403, even while its earlier answer is cached) and the dispatcher (NotFound)",
        &format!(
            "EndSession {} (ended: {}); close code {closed:?}; reconnect {}; ResolveToken {}",
            code(&ended),
            ended.as_ref().is_ok_and(|e| *e),
            again.as_ref().err().copied().unwrap_or(101),
            code(&resolved)
        ),
        ended.is_ok_and(|e| e)
            && matches!(closed, Some(1008 | 1000))
            && again.err() == Some(403)
            && resolved.is_err(),
    );

    // Expiry (TTL 4 s): a connection open across it keeps relaying (its lease keeps the
    // session); once it left and the lease lapsed, the token is refused.
    // The user must outlive the case: dropping it would end the desktop early.
    let UserDesktop {
        user: _user2,
        session: s2,
        ..
    } = s.user_with_desktop("127.0.0.2").await;
    rec.session(&s2);
    let mut open = ws_from(proxy.addr, [127, 0, 0, 2], &s2.token)
        .await
        .expect("connect before expiry");
    // Twice the token's TTL: still open.
    let closed = close_code(&mut open, 8).await;
    drop(open);
    // The lease (3 s) lapses without renewals.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = ws_from(proxy.addr, [127, 0, 0, 2], &s2.token).await;
    let resolved = c
        .resolve_token(ResolveTokenRequest {
            token: s2.token.clone(),
            attached: false,
        })
        .await;
    rec.bad_inputs(2);
    rec.case(
        "a token used after it expired",
        "token TTL 4 s, lease 3 s; a connection open across the expiry for twice the TTL, then closed; a new one 5 s later",
        "the open connection keeps relaying past the expiry (a desktop in use is never cut); once it left and its lease lapsed, the token is refused (403, NotFound)",
        &format!(
            "open connection closed: {closed:?} after 8 s; later connection {}; ResolveToken {}",
            after.as_ref().err().copied().unwrap_or(101),
            code(&resolved)
        ),
        closed.is_none() && after.err() == Some(403) && resolved.is_err(),
    );
    rec.scan_secrets(&[
        Log::new("dispatcher log", s.dispatcher.log()),
        Log::new("agent log", s.agent().log()),
        Log::new("ws-proxy log", proxy.log()),
    ]);
    stale_token_on_a_reused_display(&rec).await;
    crate::shares::cases(&rec).await;
    rec.finish();
}

/// A stale token whose Xvnc died, held by someone who tries it once the display (and so the
/// RFB port the token's session names) belongs to another user's desktop.
async fn stale_token_on_a_reused_display(rec: &Record) {
    use vncdispatch_proto::v1::{DispatchRequest, SessionHistoryRequest};
    use vncdispatch_tests::rig::RigOptions;
    use vncdispatch_tests::{eventually, procs};
    let first = 900 + std::process::id() % 50;
    let s = Rig::start(RigOptions {
        displays: Some((first, 1)),
        ..Default::default()
    })
    .await;
    let proxy = WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", s.dispatcher.addr),
        "--auth-proxy".into(),
    ])
    .await;
    let (alice, bob) = (TestUser::create(), TestUser::create());
    let mut c = s.client().await;
    let dispatch = |name: &str| DispatchRequest {
        username: name.to_owned(),
        remote_ip: "192.0.2.1".into(),
        ..Default::default()
    };
    let a = c
        .dispatch(dispatch(&alice.name))
        .await
        .expect("alice's desktop")
        .into_inner();
    rec.faults(1);
    for x in procs::xvnc_of(alice.uid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(x.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let gone = eventually(10, || procs::xvnc_of(alice.uid).is_empty()).await;
    // The dispatcher counts alice's display as taken until its next health poll (1 s here):
    // until then this one-display blade refuses bob as full — admission, not this case.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let b = loop {
        match c.dispatch(dispatch(&bob.name)).await {
            Err(s) if s.code() == Code::ResourceExhausted && std::time::Instant::now() < until => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            r => break r.expect("bob's desktop").into_inner(),
        }
    };
    let resolved = c
        .resolve_token(ResolveTokenRequest {
            token: a.token.clone(),
            attached: true,
        })
        .await;
    let relayed = match ws_from(proxy.addr, [127, 0, 0, 1], &a.token).await {
        Err(status) => status.to_string(),
        Ok(mut ws) => format!(
            "relayed: {:?}",
            vncdispatch_tests::reliability::ws::rfb_through_auth_proxy(&mut ws, 5).await
        ),
    };
    let reason = c
        .session_history(SessionHistoryRequest {
            username: alice.name.clone(),
            limit: 1,
        })
        .await
        .ok()
        .and_then(|h| h.into_inner().sessions.into_iter().next())
        .map(|e| e.reason)
        .unwrap_or_default();
    rec.bad_inputs(2);
    rec.case(
        "a stale token of a dead desktop, its port now another user's",
        "one display: alice's Xvnc killed, bob dispatched onto the same display and port, then alice's token to the dispatcher (as an attached re-check) and through ws-proxy",
        "NotFound and 403: a token is checked against its Xvnc (pid and start time), never against whatever listens on the port now; alice's history says xvnc_died; bob's desktop untouched",
        &format!(
            "killed: {gone}; bob on the same port: {}; ResolveToken {}; ws-proxy {relayed}; history {reason:?}; bob's Xvnc {}",
            (b.display, b.port) == (a.display, a.port),
            code(&resolved),
            procs::xvnc_of(bob.uid).len()
        ),
        gone && (b.display, b.port) == (a.display, a.port)
            && resolved.as_ref().err().map(|e| e.code()) == Some(Code::NotFound)
            && relayed == "403"
            && reason == "xvnc_died"
            && procs::xvnc_of(bob.uid).len() == 1,
    );
}
