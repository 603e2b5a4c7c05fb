//! Sharing a desktop (issue 15), end to end with real parts: an agent starting a real Xvnc,
//! a dispatcher over mutual TLS, ws-proxy in auth-proxy mode, RFB clients playing browsers,
//! and `xdotool` reading the desktop's pointer as its user.
//!
//! A view-only share's viewer sees the framebuffer, yet its pointer and key events change
//! nothing — Xvnc itself refuses them (ws-proxy logged it in with the view-only password) —
//! while the owner's and a full-control viewer's move the pointer. A revoked share's open
//! viewer is closed at ws-proxy's next re-check and its token refused; ending the session ends
//! its shares. Every action is in `dispatcher audit` once, naming the identity that did it.
use futures_util::SinkExt;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::tls::{Credentials, TlsFiles};
use vncdispatch_proto::v1;
use vncdispatch_tests::agent::{AgentOptions, AgentProc, new_secret};
use vncdispatch_tests::desktop::{pointer, pointer_reaches};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::pki::TestPki;
use vncdispatch_tests::reliability::ws::close_code;
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::wsproxy::WsProxyProc;
use vncdispatch_tests::{require_root_and_tigervnc, rfb, workspace_bin};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A browser through ws-proxy's auth proxy: the "None" handshake, then ServerInit.
async fn browser(proxy: std::net::SocketAddr, token: &str) -> Result<Ws, String> {
    let url = format!("ws://{proxy}/websockify?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    rfb::none_login(&mut ws).await?;
    Ok(ws)
}

/// Sends a PointerEvent (no button) to (x, y) and a KeyEvent (press and release of `a`).
async fn point_and_type(ws: &mut Ws, x: u16, y: u16) {
    let mut pointer = vec![5u8, 0];
    pointer.extend_from_slice(&x.to_be_bytes());
    pointer.extend_from_slice(&y.to_be_bytes());
    ws.send(Message::Binary(pointer.into()))
        .await
        .expect("send pointer");
    for down in [1u8, 0] {
        let key = vec![4u8, down, 0, 0, 0, 0, 0, b'a'];
        ws.send(Message::Binary(key.into()))
            .await
            .expect("send key");
    }
}

/// Asks for the whole screen and reads until a FramebufferUpdate's first bytes arrive.
async fn sees_the_screen(ws: &mut Ws) -> Result<(), String> {
    use futures_util::StreamExt;
    let request = [3u8, 0, 0, 0, 0, 0, 0, 64, 0, 64];
    ws.send(Message::Binary(request.to_vec().into()))
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    // 64x64 pixels at 4 bytes: a FramebufferUpdate (type 0) of at least 16 KiB.
    while got.len() < 64 * 64 * 4 {
        match tokio::time::timeout_at(until, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => got.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => return Err(format!("{} bytes, then {other:?}", got.len())),
        }
    }
    if got[0] != 0 {
        return Err(format!(
            "message type {} first, not a FramebufferUpdate",
            got[0]
        ));
    }
    Ok(())
}

fn tls_flags(files: &TlsFiles) -> Vec<String> {
    [
        ("--ca", &files.ca),
        ("--cert", &files.cert),
        ("--key", &files.key),
    ]
    .into_iter()
    .flat_map(|(n, p)| [n.to_owned(), p.display().to_string()])
    .collect()
}

/// `dispatcher audit [--user USER] --json` as the operator `admin-ops`: the events, oldest
/// first.
fn audit(d: &DispatcherProc, admin: &TlsFiles, user: Option<&str>) -> Vec<Value> {
    let out = Command::new(workspace_bin("dispatcher"))
        .args(["audit", "--json", "--limit", "1000"])
        .args(user.map(|u| ["--user", u]).into_iter().flatten())
        .args(["--dispatcher", &format!("https://{}", d.addr)])
        .args(tls_flags(admin))
        .output()
        .expect("run dispatcher audit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// How many events of each (kind, actor) there are.
fn tally(events: &[Value]) -> BTreeMap<(String, String), usize> {
    let mut t = BTreeMap::new();
    for e in events {
        let key = (
            e["kind"].as_str().unwrap_or("").to_owned(),
            e["actor"].as_str().unwrap_or("").to_owned(),
        );
        *t.entry(key).or_default() += 1;
    }
    t
}

fn key(kind: &str, actor: &str) -> (String, String) {
    (kind.to_owned(), actor.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_only_viewer_cannot_move_the_pointer_and_every_action_is_audited() {
    require_root_and_tigervnc();
    assert!(
        Path::new("/usr/bin/xdotool").exists(),
        "xdotool is missing: run scripts/install-deps.sh"
    );
    let dir = tempfile::tempdir().expect("dir");
    let agent_secret = dir.path().join("agent-secret");
    new_secret(&agent_secret);
    let pki = TestPki::new();
    let agent = AgentProc::start(AgentOptions {
        ip: [127, 0, 0, 2].into(),
        secret_file: Some(agent_secret.clone()),
        tls: Some(pki.service(Role::Agent, "127.0.0.2", Role::Dispatcher)),
        displays: Some((460, 4)),
        ..Default::default()
    })
    .await;
    let d = DispatcherProc::start(DispatcherOptions {
        agent_secret,
        tls: Some(pki.service(Role::Dispatcher, "127.0.0.1", Role::Admin)),
        ..Default::default()
    })
    .await;
    d.add_agent("b1", &agent).await;
    let (portal_files, admin_files, proxy_files) = (
        pki.named(Role::Portal, "portal-web1", &[]),
        pki.named(Role::Admin, "admin-ops", &[]),
        pki.named(Role::Proxy, "proxy-edge1", &[]),
    );
    let creds = |f: &TlsFiles| Credentials::load(f).expect("credentials");
    let mut portal = d.client_as(Some(&creds(&portal_files))).await;
    let mut admin = d.client_as(Some(&creds(&admin_files))).await;
    let mut proxy_args = vec![
        "--dispatcher".to_owned(),
        format!("https://{}", d.addr),
        "--auth-proxy".into(),
        "--recheck-interval".into(),
        "1s".into(),
    ];
    proxy_args.extend(tls_flags(&proxy_files));
    let proxy = WsProxyProc::start(&proxy_args).await;

    let user = TestUser::create();
    let s = portal
        .dispatch(v1::DispatchRequest {
            username: user.name.clone(),
            remote_ip: "127.0.0.1".into(),
            ..Default::default()
        })
        .await
        .expect("dispatch")
        .into_inner();

    // The owner points: the desktop's pointer moves.
    let mut owner = browser(proxy.addr, &s.token)
        .await
        .expect("the owner's desktop");
    point_and_type(&mut owner, 100, 100).await;
    assert_eq!(
        pointer_reaches(&user, s.display, (100, 100)).await,
        (100, 100)
    );

    // A view-only share, made by the portal: the viewer sees the screen, but its pointer
    // and keys change nothing.
    let share_req = |full_control| v1::ShareSessionRequest {
        username: user.name.clone(),
        full_control,
        ttl_seconds: 600,
        note: "helpdesk ticket 4711".into(),
    };
    let view = portal
        .share_session(share_req(false))
        .await
        .expect("ShareSession")
        .into_inner();
    assert!(
        view.view_only && view.token.len() == 60 && view.id.len() == 16,
        "{view:?}"
    );
    assert_ne!(view.token, s.token);
    let mut viewer = browser(proxy.addr, &view.token)
        .await
        .expect("the view-only viewer gets in");
    sees_the_screen(&mut viewer)
        .await
        .expect("the viewer sees the desktop");
    point_and_type(&mut viewer, 600, 400).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pointer(&user, s.display),
        (100, 100),
        "a view-only viewer moved the pointer"
    );
    // The owner still drives it.
    point_and_type(&mut owner, 200, 150).await;
    assert_eq!(
        pointer_reaches(&user, s.display, (200, 150)).await,
        (200, 150)
    );

    // An administrator's shadowing with full control: a share issued as admin.
    let control = admin
        .share_session(share_req(true))
        .await
        .expect("ShareSession as admin")
        .into_inner();
    assert!(!control.view_only);
    let mut helper = browser(proxy.addr, &control.token)
        .await
        .expect("the full-control viewer gets in");
    point_and_type(&mut helper, 300, 200).await;
    assert_eq!(
        pointer_reaches(&user, s.display, (300, 200)).await,
        (300, 200)
    );

    // Listed without tokens, with who made them.
    let listed = portal
        .list_shares(v1::ListSharesRequest {
            username: user.name.clone(),
        })
        .await
        .expect("ListShares")
        .into_inner()
        .shares;
    let makers: Vec<(&str, &str, bool)> = listed
        .iter()
        .map(|s| (s.id.as_str(), s.created_by.as_str(), s.token.is_empty()))
        .collect();
    assert_eq!(
        makers,
        [
            (view.id.as_str(), "portal:portal-web1", true),
            (control.id.as_str(), "admin:admin-ops", true)
        ]
    );

    // Revoked: the open viewer is closed at the next re-check (1 s), the token refused.
    let revoked = portal
        .revoke_share(v1::RevokeShareRequest {
            id: view.id.clone(),
        })
        .await
        .expect("RevokeShare")
        .into_inner();
    assert!(revoked.revoked);
    assert!(
        close_code(&mut viewer, 5).await.is_some(),
        "the revoked viewer is still connected"
    );
    let again = browser(proxy.addr, &view.token).await;
    assert!(
        again.as_ref().is_err_and(|e| e.contains("403")),
        "a revoked share's token: {:?}",
        again.map(|_| ())
    );

    // The session ends: so do its shares and their viewers.
    portal
        .end_session(v1::EndSessionRequest {
            username: user.name.clone(),
        })
        .await
        .expect("EndSession");
    assert!(
        close_code(&mut helper, 5).await.is_some(),
        "a viewer outlived the session"
    );
    let left = admin
        .list_shares(v1::ListSharesRequest::default())
        .await
        .expect("ListShares")
        .into_inner()
        .shares;
    assert!(
        left.iter().all(|s| s.owner != user.name),
        "shares outlived the session: {left:?}"
    );
    let _ = close_code(&mut owner, 5).await;

    // The audit trail: every action once, by who did it. ws-proxy reports disconnects as the
    // relays end, so those are waited for.
    let mut events = audit(&d, &admin_files, Some(&user.name));
    for _ in 0..50 {
        if tally(&events).get(&key("disconnect", "proxy:proxy-edge1")) == Some(&3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        events = audit(&d, &admin_files, Some(&user.name));
    }
    let t = tally(&events);
    let expected: BTreeMap<(String, String), usize> = [
        (key("dispatch", "portal:portal-web1"), 1),
        (key("share", "portal:portal-web1"), 1),
        (key("share", "admin:admin-ops"), 1),
        (key("revoke_share", "portal:portal-web1"), 1),
        (key("session_end", "portal:portal-web1"), 1),
        (key("connect", "proxy:proxy-edge1"), 3),
        (key("disconnect", "proxy:proxy-edge1"), 3),
    ]
    .into_iter()
    .collect();
    assert_eq!(t, expected, "{events:#?}");
    let field = |kind: &str, name: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["fields"][name].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(
        field("connect", "token_kind"),
        ["owner", "share_view_only", "share_full_control"]
    );
    assert_eq!(field("share", "note"), ["helpdesk ticket 4711"; 2]);
    assert_eq!(field("session_end", "reason"), ["portal"]);
    assert_eq!(field("session_end", "shares_ended"), ["1"]);
    // The revoked viewer's relay ended at a re-check: the share's end. (The others ended with
    // the session: their desktop stopped, or a re-check found it gone first.)
    let revoked_viewer: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "disconnect" && e["fields"]["share"] == view.id.as_str())
        .collect();
    assert_eq!(revoked_viewer.len(), 1, "{events:#?}");
    assert_eq!(revoked_viewer[0]["fields"]["reason"], "share_ended");
    assert!(
        field("disconnect", "bytes_down")
            .iter()
            .all(|b| b.parse::<u64>().is_ok_and(|n| n > 0)),
        "{events:#?}"
    );
    // The operator's registration of the blade is there too, with no user and the admin who
    // did it (the test wrapper's own admin certificate).
    let everyone = audit(&d, &admin_files, None);
    let blade_adds: Vec<&Value> = everyone
        .iter()
        .filter(|e| e["kind"] == "blade_add")
        .collect();
    assert_eq!(blade_adds.len(), 1, "{everyone:#?}");
    assert_eq!(blade_adds[0]["fields"]["blade"], "b1");
    assert!(
        blade_adds[0]["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("admin:admin-")),
        "{everyone:#?}"
    );
    assert!(
        field("connect", "client_ip")
            .iter()
            .all(|ip| ip == "127.0.0.1"),
        "{events:#?}"
    );
}
