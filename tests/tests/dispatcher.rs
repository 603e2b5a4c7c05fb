//! The dispatcher end to end: real dispatcher processes (embedded store or FerretDB), real
//! blade agents, real Xvnc, checked as the portal, ws-proxy and a VNC client see them.
use std::collections::{HashMap, HashSet};
use tonic::Code;
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_proto::v1::{
    AddBladeRequest, DispatchRequest, DrainBladeRequest, EndSessionRequest, ListBladesRequest,
    ListSessionsRequest, RemoveBladeRequest, ResolveTokenRequest,
};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::ferretdb::FerretDb;
use vncdispatch_tests::rfb::{self, Login};
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{eventually, procs};

async fn rig_with(agents: usize, store: Option<String>, extra: &[&str]) -> Rig {
    Rig::start(RigOptions {
        agents,
        store,
        dispatcher_extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
}

fn req(user: &str, ip: &str) -> DispatchRequest {
    DispatchRequest {
        username: user.into(),
        remote_ip: ip.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dispatch_starts_a_real_desktop_and_a_reconnect_gets_it_back() {
    let rig = rig_with(1, None, &[]).await;
    let user = TestUser::create();
    let mut c = rig.dispatcher.client().await;
    let s = c
        .dispatch(req(&user.name, "192.0.2.10"))
        .await
        .expect("Dispatch")
        .into_inner();
    assert_eq!(s.username, user.name);
    assert_eq!(
        (s.blade.as_str(), s.host.as_str(), s.port),
        ("b1", "127.0.0.1", 5900 + s.display)
    );
    assert_eq!(s.token.len(), 60);
    assert_eq!(s.password.len(), 8);
    assert!(!s.reused && s.expires_at.is_some());
    assert_eq!(
        procs::xvnc_of(user.uid)
            .iter()
            .map(|p| p.pid)
            .collect::<Vec<_>>(),
        vec![s.vnc_pid]
    );
    let addr = format!("{}:{}", s.host, s.port);
    assert!(matches!(
        rfb::login(&addr, &s.password).await.expect("login"),
        Login::Accepted(_)
    ));

    let again = c
        .dispatch(req(&user.name, "2001:db8::5"))
        .await
        .expect("reconnect")
        .into_inner();
    assert!(again.reused);
    assert_eq!(
        (&again.token, &again.password, again.vnc_pid),
        (&s.token, &s.password, s.vnc_pid)
    );
    assert_eq!(again.remote_ip, "2001:db8::5");

    let t = c
        .resolve_token(ResolveTokenRequest {
            token: s.token.clone(),
            attached: false,
        })
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(
        (t.host.as_str(), t.port, t.username.as_str()),
        ("127.0.0.1", s.port, user.name.as_str())
    );
    assert_eq!(
        (t.remote_ip.as_str(), t.password.as_str(), t.blade.as_str()),
        ("2001:db8::5", s.password.as_str(), "b1")
    );

    let listed = c
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .sessions;
    let mine = listed
        .iter()
        .find(|x| x.username == user.name)
        .expect("listed");
    assert_eq!(
        (mine.vnc_pid, mine.remote_ip.as_str()),
        (s.vnc_pid, "2001:db8::5")
    );
    let store_bytes =
        std::fs::read(rig.dispatcher.dir.path().join("dispatcher.redb")).expect("store file");
    for secret in [&s.token, &s.password] {
        assert!(
            !procs::contains(&store_bytes, secret.as_bytes()),
            "a secret is stored in the clear"
        );
    }
    assert!(
        !rig.dispatcher.log().contains(&s.token) && !rig.dispatcher.log().contains(&s.password)
    );
    assert!(!rig.agents[0].log().contains(&s.password));

    let ended = c
        .end_session(EndSessionRequest {
            username: user.name.clone(),
        })
        .await
        .expect("end")
        .into_inner();
    assert!(ended.ended);
    let gone = c
        .resolve_token(ResolveTokenRequest {
            token: s.token.clone(),
            attached: false,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(
        eventually(10, || procs::xvnc_of(user.uid).is_empty()).await,
        "EndSession left Xvnc running"
    );
}

async fn hundred_concurrent(
    clients: &[DispatcherClient<tonic::transport::Channel>],
    user: &str,
) -> HashSet<(String, u32)> {
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let user = user.to_owned();
            tokio::spawn(async move { c.dispatch(req(&user, "198.51.100.1")).await })
        })
        .collect();
    let mut seen = HashSet::new();
    for call in calls {
        let s = call.await.expect("task").expect("Dispatch").into_inner();
        seen.insert((s.token, s.vnc_pid));
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_concurrent_dispatches_for_one_user_yield_one_session() {
    let rig = rig_with(1, None, &[]).await;
    let user = TestUser::create();
    let seen = hundred_concurrent(&[rig.dispatcher.client().await], &user.name).await;
    assert_eq!(seen.len(), 1, "callers got different sessions: {seen:?}");
    assert_eq!(procs::xvnc_of(user.uid).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_dispatchers_on_one_ferretdb_yield_one_session() {
    let db = FerretDb::start().await;
    let rig = rig_with(1, Some(db.uri("vncDispatch")), &[]).await;
    let seal = rig.dispatcher.dir.path().join("seal.key");
    let second = DispatcherProc::start(DispatcherOptions {
        mongo: Some(db.uri("vncDispatch")),
        agent_secret: rig.secret.clone(),
        seal_key: Some(seal),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let clients = [rig.dispatcher.client().await, second.client().await];
    let seen = hundred_concurrent(&clients, &user.name).await;
    assert_eq!(seen.len(), 1, "callers got different sessions: {seen:?}");
    assert_eq!(procs::xvnc_of(user.uid).len(), 1);
    // Either dispatcher resolves the token.
    let token = seen.into_iter().next().expect("one").0;
    for mut c in clients {
        c.resolve_token(ResolveTokenRequest {
            token: token.clone(),
            attached: false,
        })
        .await
        .expect("resolve on both");
    }
}

async fn blade_counts(
    c: &mut DispatcherClient<tonic::transport::Channel>,
    users: &[TestUser],
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for u in users {
        let s = c
            .dispatch(req(&u.name, "192.0.2.1"))
            .await
            .expect("Dispatch")
            .into_inner();
        *counts.entry(s.blade).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_spread_evenly_over_four_agents_skipping_draining_and_dead_blades() {
    let mut rig = rig_with(4, None, &[]).await;
    let mut c = rig.dispatcher.client().await;
    let users: Vec<TestUser> = (0..40).map(|_| TestUser::create()).collect();
    let counts = blade_counts(&mut c, &users).await;
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(
        counts.values().all(|&n| n == 10),
        "40 sessions over 4 blades: {counts:?}"
    );
    for (u, host) in users.iter().zip(0..) {
        let _ = host;
        assert_eq!(procs::xvnc_of(u.uid).len(), 1);
    }
    c.drain_blade(DrainBladeRequest {
        name: "b4".into(),
        draining: true,
    })
    .await
    .expect("drain");
    let more: Vec<TestUser> = (0..6).map(|_| TestUser::create()).collect();
    let counts = blade_counts(&mut c, &more).await;
    assert!(
        !counts.contains_key("b4"),
        "a draining blade got sessions: {counts:?}"
    );
    rig.agents[2].stop();
    let last: Vec<TestUser> = (0..6).map(|_| TestUser::create()).collect();
    let counts = blade_counts(&mut c, &last).await;
    assert!(
        !counts.contains_key("b3") && !counts.contains_key("b4"),
        "{counts:?}"
    );
    assert_eq!(
        counts.values().sum::<usize>(),
        6,
        "every user still got a desktop"
    );
    let blades = c
        .list_blades(ListBladesRequest {})
        .await
        .expect("blades")
        .into_inner()
        .blades;
    let b3 = blades.iter().find(|b| b.name == "b3").expect("b3");
    assert!(!b3.healthy);
    assert!(blades.iter().find(|b| b.name == "b4").expect("b4").draining);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_xvnc_is_replaced_on_the_next_dispatch() {
    let rig = rig_with(1, None, &[]).await;
    let user = TestUser::create();
    let mut c = rig.dispatcher.client().await;
    let first = c
        .dispatch(req(&user.name, "192.0.2.1"))
        .await
        .expect("Dispatch")
        .into_inner();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.vnc_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    assert!(eventually(5, || procs::xvnc_of(user.uid).is_empty()).await);
    let second = c
        .dispatch(req(&user.name, "192.0.2.1"))
        .await
        .expect("Dispatch")
        .into_inner();
    assert!(!second.reused);
    assert_ne!(second.token, first.token);
    assert_ne!(second.vnc_pid, first.vnc_pid);
    let old = c
        .resolve_token(ResolveTokenRequest {
            token: first.token,
            attached: false,
        })
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::NotFound);
    let addr = format!("{}:{}", second.host, second.port);
    assert!(matches!(
        rfb::login(&addr, &second.password).await.expect("login"),
        Login::Accepted(_)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_not_found() {
    let rig = rig_with(1, None, &["--token-ttl", "1s", "--sweep-interval", "1h"]).await;
    let user = TestUser::create();
    let mut c = rig.dispatcher.client().await;
    let s = c
        .dispatch(req(&user.name, "192.0.2.1"))
        .await
        .expect("Dispatch")
        .into_inner();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let err = c
        .resolve_token(ResolveTokenRequest {
            token: s.token.clone(),
            attached: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let fresh = c
        .dispatch(req(&user.name, "192.0.2.1"))
        .await
        .expect("Dispatch")
        .into_inner();
    assert_ne!(fresh.token, s.token, "an expired session gets a new token");
}

async fn restart_keeps_sessions(mongo: Option<String>) {
    let mut rig = rig_with(1, mongo, &[]).await;
    let user = TestUser::create();
    let s = rig
        .dispatcher
        .client()
        .await
        .dispatch(req(&user.name, "192.0.2.1"))
        .await
        .expect("Dispatch")
        .into_inner();
    rig.dispatcher.kill();
    rig.dispatcher.restart().await;
    let mut c = rig.dispatcher.client().await;
    c.resolve_token(ResolveTokenRequest {
        token: s.token.clone(),
        attached: false,
    })
    .await
    .expect("resolve after restart");
    let again = c
        .dispatch(req(&user.name, "192.0.2.1"))
        .await
        .expect("Dispatch")
        .into_inner();
    assert!(again.reused);
    assert_eq!((again.token, again.vnc_pid), (s.token, s.vnc_pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_dispatcher_keeps_every_session_embedded() {
    restart_keeps_sessions(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_dispatcher_keeps_every_session_mongodb() {
    let db = FerretDb::start().await;
    restart_keeps_sessions(Some(db.uri("vncDispatch"))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_to_every_rpc_gets_a_clear_status_and_changes_nothing() {
    let rig = rig_with(1, None, &[]).await;
    let mut c = rig.dispatcher.client().await;
    let before_blades = c
        .list_blades(ListBladesRequest {})
        .await
        .expect("blades")
        .into_inner();
    let long = "a".repeat(300);
    for (user, ip, code) in [
        ("root", "192.0.2.1", Code::InvalidArgument),
        ("../x", "192.0.2.1", Code::InvalidArgument),
        ("a;rm -rf /", "192.0.2.1", Code::InvalidArgument),
        ("", "192.0.2.1", Code::InvalidArgument),
        ("-rf", "192.0.2.1", Code::InvalidArgument),
        (&long[..], "192.0.2.1", Code::InvalidArgument),
        ("nosuchuserhere", "192.0.2.1", Code::NotFound),
        ("alice", "999.1.1.1", Code::InvalidArgument),
        ("alice", "::1%eth0", Code::InvalidArgument),
        ("alice", "example.com", Code::InvalidArgument),
        ("alice", "", Code::InvalidArgument),
    ] {
        let err = c.dispatch(req(user, ip)).await.unwrap_err();
        assert_eq!(err.code(), code, "{user:?} {ip:?}: {}", err.message());
    }
    for token in [
        "",
        "x",
        &"0".repeat(60),
        &"Z".repeat(60),
        &"ab".repeat(31),
        "' OR 1=1 --",
    ] {
        let err = c
            .resolve_token(ResolveTokenRequest {
                token: token.into(),
                attached: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{token:?}");
        assert!(
            token.len() < 4 || !err.message().contains(token),
            "the error echoes the token"
        );
    }
    assert_eq!(
        c.end_session(EndSessionRequest {
            username: "a;id".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    assert!(
        !c.end_session(EndSessionRequest {
            username: "nobodyhere".into()
        })
        .await
        .expect("end")
        .into_inner()
        .ended
    );
    for (name, host, port) in [
        ("", "h", 0),
        ("bad name", "h", 0),
        ("-x", "h", 0),
        ("ok", "bad host!", 0),
        ("ok", "h", 70000),
    ] {
        let r = AddBladeRequest {
            name: name.into(),
            host: host.into(),
            port,
            method: 1,
            ..Default::default()
        };
        assert_eq!(
            c.add_blade(r).await.unwrap_err().code(),
            Code::InvalidArgument,
            "{name:?} {host:?} {port}"
        );
    }
    let r = AddBladeRequest {
        name: "ok".into(),
        host: "h".into(),
        port: 0,
        method: 99,
        ..Default::default()
    };
    assert_eq!(
        c.add_blade(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let err = c
        .drain_blade(DrainBladeRequest {
            name: "nope".into(),
            draining: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        !c.remove_blade(RemoveBladeRequest {
            name: "nope".into(),
            force: false
        })
        .await
        .expect("remove")
        .into_inner()
        .removed
    );
    let huge = DispatchRequest {
        username: "a".repeat(100_000),
        remote_ip: "192.0.2.1".into(),
        ..Default::default()
    };
    assert_eq!(
        c.dispatch(huge).await.unwrap_err().code(),
        Code::OutOfRange,
        "oversize message refused before decoding"
    );
    assert_eq!(
        c.list_blades(ListBladesRequest {})
            .await
            .expect("blades")
            .into_inner(),
        before_blades
    );
    assert!(
        c.list_sessions(ListSessionsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .sessions
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_a_busy_blade_needs_force() {
    let rig = rig_with(1, None, &[]).await;
    let user = TestUser::create();
    let mut c = rig.dispatcher.client().await;
    let s = c
        .dispatch(req(&user.name, "192.0.2.1"))
        .await
        .expect("Dispatch")
        .into_inner();
    let err = c
        .remove_blade(RemoveBladeRequest {
            name: "b1".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        c.remove_blade(RemoveBladeRequest {
            name: "b1".into(),
            force: true
        })
        .await
        .expect("force")
        .into_inner()
        .removed
    );
    assert_eq!(
        c.resolve_token(ResolveTokenRequest {
            token: s.token,
            attached: false
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    let err = c.dispatch(req(&user.name, "192.0.2.1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("no blades are registered"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_follows_the_store_and_the_original_data_is_served() {
    let mut db = FerretDb::start().await;
    // What the original Node service left behind: a plain token, strings for numbers.
    let raw = mongodb::Client::with_uri_str(db.uri("vncDispatch"))
        .await
        .expect("client")
        .database("vncDispatch");
    let legacy_token = "beef".repeat(15);
    raw.collection("tokenizer")
        .insert_one(mongodb::bson::doc! { "username": "olduser", "password": "oldpw123", "token": &legacy_token,
            "blade": "b1", "display": "7", "vncpid": "4242", "remoteip": "192.0.2.99" })
        .await
        .expect("seed");
    let rig = rig_with(1, Some(db.uri("vncDispatch")), &[]).await;
    let mut c = rig.dispatcher.client().await;
    let t = c
        .resolve_token(ResolveTokenRequest {
            token: legacy_token,
            attached: false,
        })
        .await
        .expect("legacy token")
        .into_inner();
    assert_eq!(
        (t.username.as_str(), t.port, t.password.as_str()),
        ("olduser", 5907, "oldpw123")
    );
    assert_eq!(
        t.host, "127.0.0.1",
        "the blade registered as b1 gives the host"
    );

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", rig.dispatcher.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status =
        |h: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>| {
            let mut h = h.clone();
            async move {
                let r = tonic_health::pb::HealthCheckRequest {
                    service: "vncdispatch.v1.Dispatcher".into(),
                };
                h.check(r)
                    .await
                    .map(|r| r.into_inner().status)
                    .unwrap_or(-1)
            }
        };
    db.stop();
    let mut down = false;
    for _ in 0..100 {
        if status(&mut health).await == 2 {
            down = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(down, "health stayed SERVING with the store down");
    let err = c.dispatch(req("someone", "192.0.2.1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    db.restart().await;
    let mut up = false;
    for _ in 0..100 {
        if status(&mut health).await == 1 {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(up, "health did not recover with the store");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_cli_drives_a_running_dispatcher() {
    let rig = rig_with(1, None, &[]).await;
    let user = TestUser::create();
    let url = format!("http://{}", rig.dispatcher.addr);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(vncdispatch_tests::workspace_bin("dispatcher"))
            .args(args)
            .env("DISPATCHER_URL", &url)
            .output()
            .expect("run dispatcher CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let agent = &rig.agents[0];
    let (ok, out, err) = cli(&[
        "blade",
        "add",
        "b2",
        "127.0.0.1",
        "--port",
        &agent.addr.port().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("added b2"));
    let (ok, out, _) = cli(&["blade", "list"]);
    assert!(
        ok && out.contains("b1") && out.contains("b2") && out.contains("active"),
        "{out}"
    );
    let (ok, out, _) = cli(&["blade", "drain", "b2"]);
    assert!(ok && out.contains("b2 is draining"), "{out}");
    let (ok, out, err) = cli(&["dispatch", &user.name, "192.0.2.8"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("username  {}", user.name)) && out.contains("blade     b1"),
        "{out}"
    );
    let (ok, out, _) = cli(&["session", "list"]);
    assert!(
        ok && out.contains(&user.name) && out.contains("192.0.2.8"),
        "{out}"
    );
    assert!(!out.contains("password"), "session list shows no secrets");
    let (ok, _, err) = cli(&["dispatch", "a;id", "192.0.2.8"]);
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("invalid username"),
        "{err}"
    );
    let (ok, _, err) = cli(&["blade", "remove", "b1"]);
    assert!(!ok && err.contains("still has 1 session"), "{err}");
    let (ok, out, _) = cli(&["session", "end", &user.name]);
    assert!(ok && out.contains("ended"), "{out}");
    let (ok, _, err) = cli(&["session", "end", &user.name]);
    assert!(!ok && err.contains("has no session"), "{err}");
    let (ok, _, err) = cli(&["--help"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli_with_bad_url(&url);
    assert!(!ok && err.contains("connecting to the dispatcher"), "{err}");
}

fn cli_with_bad_url(_url: &str) -> (bool, String, String) {
    let out = std::process::Command::new(vncdispatch_tests::workspace_bin("dispatcher"))
        .args(["blade", "list", "--dispatcher", "http://127.0.0.1:1"])
        .output()
        .expect("run dispatcher CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
