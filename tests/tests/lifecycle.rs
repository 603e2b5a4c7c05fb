//! Sessions that never lose work (issue 14), with real processes: a desktop in use through
//! two ws-proxy replicas outlives its token many times over and is stopped only after its
//! last client left and the idle grace passed ("no client" in the history). (A stale token of
//! a dead desktop is a case of the fault suite's tokens group.)
use futures_util::SinkExt;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use vncdispatch_proto::v1::{DispatchRequest, ListSessionsRequest, SessionHistoryRequest};
use vncdispatch_tests::agent::{AgentOptions, AgentProc, new_secret};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::reliability::ws::{Ws, close_code, rfb_through_auth_proxy, ws_from};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::wsproxy::WsProxyProc;
use vncdispatch_tests::{eventually, procs, require_root_and_tigervnc};

/// A dispatcher with short lifecycle settings (token 5 s, lease 3 s, grace 4 s, sweep 1 s)
/// over one agent with `displays`.
async fn rig(displays: Option<(u32, u32)>) -> (AgentProc, DispatcherProc, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("agent-secret");
    new_secret(&secret);
    let agent = AgentProc::start(AgentOptions {
        secret_file: Some(secret.clone()),
        displays,
        ..Default::default()
    })
    .await;
    let d = DispatcherProc::start(DispatcherOptions {
        agent_secret: secret,
        extra: [
            "--token-ttl",
            "5s",
            "--lease",
            "3s",
            "--idle-grace",
            "4s",
            "--sweep-interval",
            "1s",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await;
    d.add_agent("b1", &agent).await;
    (agent, d, dir)
}

/// ws-proxy in auth-proxy mode before `d`, re-checking (and so renewing leases) every second.
async fn proxy(d: &DispatcherProc) -> WsProxyProc {
    WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", d.addr),
        "--auth-proxy".into(),
        "--recheck-interval".into(),
        "1s".into(),
    ])
    .await
}

/// A browser through `proxy` to the desktop, past the RFB handshake.
async fn browser(proxy: &WsProxyProc, token: &str) -> Ws {
    let mut ws = ws_from(proxy.addr, [127, 0, 0, 1], token)
        .await
        .expect("ws-proxy accepts the token");
    rfb_through_auth_proxy(&mut ws, 10)
        .await
        .expect("through to the desktop");
    ws
}

/// An incremental FramebufferUpdateRequest for a corner: what a viewer in use sends.
fn update_request() -> Message {
    Message::Binary(vec![3, 1, 0, 0, 0, 0, 0, 16, 0, 16].into())
}

/// Keeps both browsers busy for `secs`, draining what the desktop sends; false if either
/// connection closed meanwhile.
async fn busy(clients: &mut [&mut Ws], secs: u64) -> bool {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        for ws in clients.iter_mut() {
            if ws.send(update_request()).await.is_err() {
                return false;
            }
            // Drain for a moment; a close here means the relay was cut.
            if close_code(ws, 0).await.is_some() {
                return false;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    true
}

/// The user's ended sessions, newest first, as an operator's SessionHistory shows them.
async fn history(
    c: &mut vncdispatch_proto::v1::dispatcher_client::DispatcherClient<tonic::transport::Channel>,
    user: &str,
) -> Vec<vncdispatch_proto::v1::EndedSession> {
    c.session_history(SessionHistoryRequest {
        username: user.to_owned(),
        limit: 10,
    })
    .await
    .expect("history")
    .into_inner()
    .sessions
}

#[tokio::test(flavor = "multi_thread")]
async fn a_desktop_in_use_outlives_its_token_and_stops_after_the_last_client_left() {
    require_root_and_tigervnc();
    let (_agent, d, _dir) = rig(None).await;
    let (p1, p2) = (proxy(&d).await, proxy(&d).await);
    let user = TestUser::create();
    let mut c = d.client().await;
    let s = c
        .dispatch(DispatchRequest {
            username: user.name.clone(),
            remote_ip: "192.0.2.1".into(),
            ..Default::default()
        })
        .await
        .expect("dispatch")
        .into_inner();
    assert!(
        s.stops_at.is_some(),
        "the portal is told when the desktop stops"
    );
    let mut a = browser(&p1, &s.token).await;
    let mut b = browser(&p2, &s.token).await;
    // Three times the token's TTL, busy on both replicas.
    assert!(
        busy(&mut [&mut a, &mut b], 15).await,
        "a relay was cut while in use"
    );
    assert_eq!(
        procs::xvnc_of(user.uid).len(),
        1,
        "the desktop was stopped in use"
    );
    let listed = c
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert!(
        listed.iter().any(|l| l.username == user.name && l.attached),
        "listed as attached: {listed:?}"
    );
    // One client leaves; the other keeps the desktop for longer than lease + grace.
    drop(a);
    assert!(busy(&mut [&mut b], 10).await, "the remaining relay was cut");
    assert_eq!(
        procs::xvnc_of(user.uid).len(),
        1,
        "stopped while a client on the other replica was attached"
    );
    // The last client leaves: after the lease (3 s) and the grace (4 s) the sweeper stops it.
    let left = Instant::now();
    drop(b);
    assert!(
        eventually(30, || procs::xvnc_of(user.uid).is_empty()).await,
        "the idle desktop was never stopped"
    );
    let after = left.elapsed();
    assert!(
        // Renewed once less than half the lease (3 s) is left: at least ~1 s of it remains
        // when the client leaves, then the grace (4 s).
        after >= Duration::from_secs(5),
        "stopped {after:?} after the last client left"
    );
    let history = history(&mut c, &user.name).await;
    assert_eq!(
        history.first().map(|e| e.reason.as_str()),
        Some("no_client"),
        "{history:?}; dispatcher log:\n{}",
        d.log()
    );
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("session ended") && l.contains("no_client")),
        "no log line says why the session ended"
    );
}
