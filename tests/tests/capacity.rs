//! Capacity, admission and pools with real agents and real Xvnc: blades of 2, 4 and 8
//! displays (the last capped at 6 desktops) fill by the placement score until the pool is
//! full, the next user is told so, and a desktop ended makes room at once; pools keep new
//! desktops to their blades.
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Code;
use vncdispatch_proto::v1::{AddBladeRequest, DispatchRequest, EndSessionRequest, Session};
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{require_root_and_tigervnc, workspace_bin};

/// A rig with no agents of its own (the test dispatcher checks health every second).
async fn rig() -> Rig {
    Rig::start(RigOptions {
        agents: 0,
        ..Default::default()
    })
    .await
}

/// An agent on `127.0.0.{last}` with `displays` displays from `:first`, registered as blade
/// `name`. The ranges are this file's own, far from the other tests' (which start at :20): a
/// display another test's X server still holds would be a display short here.
async fn blade(
    rig: &Rig,
    name: &str,
    last: u8,
    (first, displays): (u32, u32),
    pool: &str,
    max_sessions: u32,
) -> AgentProc {
    let agent = AgentProc::start(AgentOptions {
        ip: [127, 0, 0, last].into(),
        secret_file: Some(rig.secret.clone()),
        displays: Some((first, displays)),
        ..Default::default()
    })
    .await;
    rig.client()
        .await
        .add_blade(AddBladeRequest {
            name: name.into(),
            host: agent.addr.ip().to_string(),
            port: u32::from(agent.addr.port()),
            method: 1,
            pool: Some(pool.into()),
            max_sessions: Some(max_sessions),
        })
        .await
        .expect("AddBlade");
    agent
}

async fn dispatch(rig: &Rig, user: &str, pool: &str) -> Result<Session, tonic::Status> {
    rig.client()
        .await
        .dispatch(DispatchRequest {
            username: user.into(),
            remote_ip: "192.0.2.1".into(),
            pool: pool.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Waits until the dispatcher has every blade's figures (an agent's report names its CPUs).
async fn reported(rig: &Rig, blades: usize) {
    for _ in 0..150 {
        let listed = rig
            .client()
            .await
            .list_blades(vncdispatch_proto::v1::ListBladesRequest {})
            .await;
        if listed.is_ok_and(|r| {
            let b = r.into_inner().blades;
            b.len() == blades && b.iter().all(|b| b.cpus > 0)
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the dispatcher never saw every blade's figures");
}

#[tokio::test(flavor = "multi_thread")]
async fn desktops_fill_blades_by_the_score_until_the_pool_is_full() {
    require_root_and_tigervnc();
    let rig = rig().await;
    let _agents = [
        blade(&rig, "b2", 2, (400, 2), "", 0).await,
        blade(&rig, "b4", 3, (410, 4), "", 0).await,
        blade(&rig, "b8", 4, (420, 8), "", 6).await,
    ];
    reported(&rig, 3).await;
    let users: Vec<TestUser> = (0..13).map(|_| TestUser::create()).collect();
    let mut per_blade = BTreeMap::<String, usize>::new();
    let mut at_six = BTreeMap::new();
    let mut sessions = Vec::new();
    for (i, u) in users[..12].iter().enumerate() {
        let s = dispatch(&rig, &u.name, "")
            .await
            .unwrap_or_else(|e| panic!("user {i}: {e}"));
        *per_blade.entry(s.blade.clone()).or_default() += 1;
        sessions.push(s);
        if i == 5 {
            at_six = per_blade.clone();
        }
    }
    // Halfway, each blade is about half full — 1 of 2, 2 of 4, 3 of 6 by desktops alone; the
    // load and memory terms, read a moment apart, may move one between the bigger two — where
    // a count-based policy would give 2, 2, 2 and fill the small blade first.
    assert!(
        at_six.get("b2") == Some(&1) && at_six.get("b8").is_some_and(|n| *n >= 2),
        "{at_six:?}"
    );
    assert_eq!(
        per_blade.values().copied().collect::<Vec<_>>(),
        [2, 4, 6],
        "{per_blade:?}"
    );
    // The pool is full: the 13th user is told so, with what an operator can act on.
    let full = dispatch(&rig, &users[12].name, "").await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().contains("pool `default`") && full.message().contains("12 of 12 desktops"),
        "{}",
        full.message()
    );
    // One desktop ended: its room is used by the next Dispatch, without waiting for a report.
    let ended = sessions
        .iter()
        .find(|s| s.blade == "b8")
        .expect("a desktop on b8");
    rig.client()
        .await
        .end_session(EndSessionRequest {
            username: ended.username.clone(),
        })
        .await
        .expect("EndSession");
    let fits = dispatch(&rig, &users[12].name, "")
        .await
        .expect("Dispatch after a desktop ended");
    assert_eq!(fits.blade, "b8");
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_keep_new_desktops_to_their_blades() {
    require_root_and_tigervnc();
    let rig = rig().await;
    let _agents = [
        blade(&rig, "lab1", 5, (430, 4), "lab", 0).await,
        blade(&rig, "std1", 6, (440, 4), "", 0).await,
    ];
    reported(&rig, 2).await;
    let users: Vec<TestUser> = (0..5).map(|_| TestUser::create()).collect();
    for u in &users[..2] {
        assert_eq!(
            dispatch(&rig, &u.name, "lab").await.expect("lab").blade,
            "lab1"
        );
    }
    for u in &users[2..4] {
        assert_eq!(
            dispatch(&rig, &u.name, "").await.expect("default").blade,
            "std1"
        );
    }
    let none = dispatch(&rig, &users[4].name, "gpu").await.unwrap_err();
    assert_eq!(none.code(), Code::FailedPrecondition, "{none:?}");
    assert!(
        none.message()
            .contains("no blade serves pool `gpu` (pools with blades: default, lab)"),
        "{}",
        none.message()
    );
    // A running desktop is returned whatever pool is asked.
    let again = dispatch(&rig, &users[2].name, "lab")
        .await
        .expect("reconnect");
    assert!(again.reused && again.blade == "std1", "{again:?}");
    // The operator sees the pools.
    let out = std::process::Command::new(workspace_bin("dispatcher"))
        .args(["blade", "list"])
        .env("DISPATCHER_URL", format!("http://{}", rig.dispatcher.addr))
        .output()
        .expect("dispatcher blade list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let pool_of = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_owned)
    };
    assert_eq!(
        (pool_of("lab1").as_deref(), pool_of("std1").as_deref()),
        (Some("lab"), Some("default")),
        "{text}"
    );
}
