//! Shares under attack (part of the tokens group): a view-only viewer's hand-crafted client
//! trying to take over or knock the owner off, a share's token kept after its session ended,
//! and hostile share requests and connection reports.
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;
use vncdispatch_proto::v1::{
    ConnectionEvent, DispatchRequest, EndSessionRequest, ListSharesRequest, ResolveTokenRequest,
    RevokeShareRequest, ShareSessionRequest,
};
use vncdispatch_tests::desktop::{pointer, pointer_reaches, screen_size};
use vncdispatch_tests::reliability::Record;
use vncdispatch_tests::reliability::attack::code;
use vncdispatch_tests::reliability::ws::{close_code, ws_from};
use vncdispatch_tests::rfb::none_login_as;
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::wsproxy::WsProxyProc;

fn view_only(user: &str) -> ShareSessionRequest {
    ShareSessionRequest {
        username: user.to_owned(),
        ..Default::default()
    }
}

fn pointer_event(x: u16, y: u16) -> Vec<u8> {
    let mut ev = vec![5u8, 0];
    ev.extend_from_slice(&x.to_be_bytes());
    ev.extend_from_slice(&y.to_be_bytes());
    ev
}

/// The shares cases, recorded into `rec`.
pub(crate) async fn cases(rec: &Record) {
    let first = 960 + std::process::id() % 20;
    let s = Rig::start(RigOptions {
        displays: Some((first, 4)),
        ..Default::default()
    })
    .await;
    let proxy = WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", s.dispatcher.addr),
        "--auth-proxy".into(),
        "--recheck-interval".into(),
        "1s".into(),
    ])
    .await;
    hostile_viewer(rec, &s, &proxy).await;
    without_auth_proxy(rec, &s).await;
    kept_after_the_session(rec, &s, &proxy).await;
    hostile_requests(rec, &s).await;
}

/// A view-only share's viewer, with its own RFB client: asks Xvnc to disconnect everyone
/// else (ClientInit not shared), to resize the screen, to set the clipboard, and moves and
/// types.
async fn hostile_viewer(rec: &Record, s: &Rig, proxy: &WsProxyProc) {
    let d = s.user_with_desktop("127.0.0.1").await;
    let (user, display) = (&d.user, d.session.display);
    let mut c = d.client.clone();
    let mut owner = ws_from(proxy.addr, [127, 0, 0, 1], &d.session.token)
        .await
        .expect("the owner's connection");
    none_login_as(&mut owner, true).await.expect("owner login");
    owner
        .send(Message::Binary(pointer_event(50, 60).into()))
        .await
        .expect("owner points");
    let start = pointer_reaches(user, display, (50, 60)).await;
    let size_before = screen_size(user, display);
    let share = c
        .share_session(view_only(&user.name))
        .await
        .expect("share")
        .into_inner();
    let mut viewer = ws_from(proxy.addr, [127, 0, 0, 1], &share.token)
        .await
        .expect("the viewer's connection");
    let login = none_login_as(&mut viewer, false).await;
    let mut setdesktopsize = vec![251u8, 0, 0x02, 0x80, 0x01, 0xe0, 1, 0];
    setdesktopsize.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x80, 0x01, 0xe0, 0, 0, 0, 0]);
    let mut cut = vec![6u8, 0, 0, 0, 0, 0, 0, 5];
    cut.extend_from_slice(b"pwned");
    for msg in [
        setdesktopsize,
        cut,
        pointer_event(700, 500),
        vec![4, 1, 0, 0, 0, 0, 0xff, 0x0d],
        vec![4, 0, 0, 0, 0, 0, 0xff, 0x0d],
    ] {
        let _ = viewer.send(Message::Binary(msg.into())).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = pointer(user, display);
    let size_after = screen_size(user, display);
    let owner_closed = close_code(&mut owner, 1).await;
    rec.bad_inputs(5);
    rec.case(
        "a view-only viewer's hand-crafted client",
        "through ws-proxy --auth-proxy with a view-only share's token: ClientInit asking for exclusive access (shared = 0), SetDesktopSize 640x480, ClientCutText, a PointerEvent and Enter",
        "the viewer gets the desktop but changes nothing: the owner stays connected, the pointer stays, the screen keeps its size (Xvnc refuses them: ws-proxy logged the viewer in with the view-only password)",
        &format!(
            "viewer login {}; pointer {start:?} → {after:?}; screen {size_before} → {size_after}; owner's connection {}",
            if login.is_ok() { "ok" } else { "failed" },
            owner_closed.map_or("still open".into(), |c| format!("closed ({c})"))
        ),
        login.is_ok()
            && start == (50, 60)
            && after == start
            && size_after == size_before
            && owner_closed.is_none(),
    );

    // Full control is a separate grant, but not to knock the owner off: Xvnc would disconnect
    // everyone else for a full-control login asking for exclusive access, so ws-proxy sends
    // a share's ClientInit as shared.
    let control = c
        .share_session(ShareSessionRequest {
            full_control: true,
            ..view_only(&user.name)
        })
        .await
        .expect("full-control share")
        .into_inner();
    let mut helper = ws_from(proxy.addr, [127, 0, 0, 1], &control.token)
        .await
        .expect("the helper's connection");
    let login = none_login_as(&mut helper, false).await;
    helper
        .send(Message::Binary(pointer_event(20, 30).into()))
        .await
        .expect("helper points");
    let moved = pointer_reaches(user, display, (20, 30)).await;
    let owner_closed = close_code(&mut owner, 2).await;
    rec.bad_inputs(1);
    rec.case(
        "a full-control viewer asking for exclusive access",
        "through ws-proxy --auth-proxy with a full-control share's token: ClientInit with shared = 0 (which makes Xvnc disconnect every other client of a full-control login), then a PointerEvent",
        "the viewer controls the desktop (the pointer moves) and the owner stays connected: ws-proxy forwards a share's ClientInit as shared",
        &format!(
            "viewer login {}; pointer {moved:?}; owner's connection {}",
            if login.is_ok() { "ok" } else { "failed" },
            owner_closed.map_or("still open".into(), |c| format!("closed ({c})"))
        ),
        login.is_ok() && moved == (20, 30) && owner_closed.is_none(),
    );
}

/// A share's token at a ws-proxy that would hand the viewer the VNC handshake (no
/// --auth-proxy), and at one binding tokens to the owner's IP.
async fn without_auth_proxy(rec: &Record, s: &Rig) {
    let d = s.user_with_desktop("127.0.0.1").await;
    let mut c = d.client.clone();
    let share = c
        .share_session(view_only(&d.user.name))
        .await
        .expect("share")
        .into_inner();
    let plain = WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", s.dispatcher.addr),
    ])
    .await;
    let refused = ws_from(plain.addr, [127, 0, 0, 1], &share.token)
        .await
        .err()
        .unwrap_or(101);
    let owner_ok = ws_from(plain.addr, [127, 0, 0, 1], &d.session.token)
        .await
        .is_ok();
    let bound = WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", s.dispatcher.addr),
        "--auth-proxy".into(),
        "--bind-token-to-ip".into(),
    ])
    .await;
    let mut viewer = ws_from(bound.addr, [127, 0, 0, 9], &share.token).await;
    let viewer_in = match &mut viewer {
        Ok(ws) => none_login_as(ws, true).await.is_ok(),
        Err(_) => false,
    };
    let owner_elsewhere = ws_from(bound.addr, [127, 0, 0, 9], &d.session.token)
        .await
        .err()
        .unwrap_or(101);
    rec.bad_inputs(2);
    rec.case(
        "a share's token at a ws-proxy without --auth-proxy",
        "a view-only share's token at a ws-proxy that relays the VNC handshake to the browser; then at one with --auth-proxy --bind-token-to-ip, from another address than the owner's",
        "403 share_needs_auth_proxy (the viewer would need a VNC password that outlives the share) while the owner's token works there; with auth-proxy the viewer gets in from anywhere (a share is not bound to the owner's IP) and the owner's token from that address is 403",
        &format!(
            "without auth-proxy: share {refused}, owner {}; bound: viewer {}, owner from elsewhere {owner_elsewhere}",
            if owner_ok { "relayed" } else { "refused" },
            if viewer_in { "in" } else { "refused" }
        ),
        refused == 403 && owner_ok && viewer_in && owner_elsewhere == 403,
    );
}

/// A share's token kept after its session ended and the user got a new desktop.
async fn kept_after_the_session(rec: &Record, s: &Rig, proxy: &WsProxyProc) {
    let d = s.user_with_desktop("127.0.0.1").await;
    let mut c = d.client.clone();
    let share = c
        .share_session(view_only(&d.user.name))
        .await
        .expect("share")
        .into_inner();
    c.end_session(EndSessionRequest {
        username: d.user.name.clone(),
    })
    .await
    .expect("end");
    let again = c
        .dispatch(DispatchRequest {
            username: d.user.name.clone(),
            remote_ip: "127.0.0.1".into(),
            ..Default::default()
        })
        .await
        .expect("a new desktop")
        .into_inner();
    let resolved = c
        .resolve_token(ResolveTokenRequest {
            token: share.token.clone(),
            attached: false,
        })
        .await;
    let relayed = ws_from(proxy.addr, [127, 0, 0, 1], &share.token)
        .await
        .err()
        .unwrap_or(101);
    let listed = c
        .list_shares(ListSharesRequest {
            username: d.user.name.clone(),
        })
        .await
        .map(|r| r.into_inner().shares.len());
    rec.bad_inputs(2);
    rec.case(
        "a share's token after its session ended",
        "a view-only share made, the session ended, the user dispatched again (a new desktop), then the old share's token at the dispatcher and through ws-proxy",
        "NotFound and 403: a share belongs to the session it was made for, never to the user's next desktop; no shares listed",
        &format!(
            "new desktop pid {} (was {}); ResolveToken {}; ws-proxy {relayed}; shares listed {listed:?}",
            again.vnc_pid,
            d.session.vnc_pid,
            code(&resolved)
        ),
        resolved.as_ref().err().map(|e| e.code()) == Some(Code::NotFound)
            && relayed == 403
            && listed.ok() == Some(0)
            && again.vnc_pid != d.session.vnc_pid,
    );
}

/// Share requests and connection reports no caller should get through.
async fn hostile_requests(rec: &Record, s: &Rig) {
    let d = s.user_with_desktop("127.0.0.1").await;
    let mut c = d.client.clone();
    let share = |username: &str, ttl_seconds: u32, note: &str| ShareSessionRequest {
        username: username.to_owned(),
        full_control: false,
        ttl_seconds,
        note: note.to_owned(),
    };
    let mut seen = Vec::new();
    for (what, req) in [
        ("no desktop", share("nobody-here", 0, "")),
        ("bad user", share("../root", 0, "")),
        ("ttl 30 days", share(&d.user.name, 30 * 86_400, "")),
        (
            "note with a newline",
            share(&d.user.name, 0, "a\nforged audit line"),
        ),
        (
            "note of 300 characters",
            share(&d.user.name, 0, &"x".repeat(300)),
        ),
    ] {
        seen.push((what, code(&c.share_session(req).await)));
    }
    for (what, id) in [
        ("revoke a non-hex id", "zzzzzzzzzzzzzzzz"),
        ("revoke an unknown id", "0123456789abcdef"),
    ] {
        let r = c.revoke_share(RevokeShareRequest { id: id.into() }).await;
        let got = match r {
            Ok(r) if !r.get_ref().revoked => "not revoked".to_owned(),
            other => code(&other),
        };
        seen.push((what, got));
    }
    let report = |client_ip: &str, share_id: &str| ConnectionEvent {
        kind: 1,
        username: d.user.name.clone(),
        share_id: share_id.into(),
        client_ip: client_ip.into(),
        ..Default::default()
    };
    for (what, ev) in [
        ("report with a bad IP", report("not-an-ip", "")),
        ("report with a bad share id", report("192.0.2.1", "../../x")),
    ] {
        seen.push((what, code(&c.record_connection(ev).await)));
    }
    let expected = [
        ("no desktop", "NotFound"),
        ("bad user", "InvalidArgument"),
        ("ttl 30 days", "InvalidArgument"),
        ("note with a newline", "InvalidArgument"),
        ("note of 300 characters", "InvalidArgument"),
        ("revoke a non-hex id", "InvalidArgument"),
        ("revoke an unknown id", "not revoked"),
        ("report with a bad IP", "InvalidArgument"),
        ("report with a bad share id", "InvalidArgument"),
    ];
    let pass = seen
        .iter()
        .zip(expected)
        .all(|((w, got), (ew, want))| *w == ew && got == want);
    rec.bad_inputs(seen.len() as u64);
    rec.case(
        "hostile share requests and connection reports",
        "ShareSession for a user without a desktop, a bad name, 30 days, a note with a newline (a forged audit line) and one of 300 characters; RevokeShare with a non-hex and an unknown id; RecordConnection with a bad IP and a bad share id",
        "NotFound for no desktop, InvalidArgument for the rest (each message says the rule), an unknown id is simply not revoked",
        &seen
            .iter()
            .map(|(w, g)| format!("{w}: {g}"))
            .collect::<Vec<_>>()
            .join("; "),
        pass,
    );
}
