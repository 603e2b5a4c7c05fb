//! Distributed faults: a blade's agent down or frozen during Dispatch, the dispatcher killed
//! in the middle of many calls, the store (FerretDB) stopped under traffic, the embedded
//! store's disk full. Afterwards the store and the agents must agree: no desktop orphaned,
//! none doubled, no session lost.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};
use tonic::Status;
use vncdispatch_proto::v1::DispatchRequest;
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::ferretdb::FerretDb;
use vncdispatch_tests::reliability::attack::{
    agreement, agrees, code, dispatch_as, shown_agreement,
};
use vncdispatch_tests::reliability::{Log, Record};
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{eventually, procs, require_root_and_tigervnc};

#[tokio::test(flavor = "multi_thread")]
async fn distributed() {
    require_root_and_tigervnc();
    let rec = Record::new("distributed");
    let mut rig = Rig::start(RigOptions {
        agents: 2,
        dispatcher_extra: vec!["--launch-timeout".into(), "3s".into()],
        ..Default::default()
    })
    .await;
    blades_and_dispatcher(&rec, &mut rig).await;
    let agent = AgentProc::start(AgentOptions {
        ip: [127, 0, 0, 4].into(),
        secret_file: Some(rig.secret.clone()),
        ..Default::default()
    })
    .await;
    store_outage(&rec, &rig.secret, &agent).await;
    disk_full(&rec, &rig.secret, &agent).await;
    rec.finish();
}

/// Agents down and frozen during Dispatch, and the dispatcher killed mid-Dispatch: the rig's
/// two agents are blades b1 (127.0.0.2) and b2 (127.0.0.3).
async fn blades_and_dispatcher(rec: &Record, rig: &mut Rig) {
    let users: Vec<TestUser> = (0..6).map(|_| TestUser::create()).collect();

    // An agent down: every new user lands on the other blade, nothing half-stored.
    rig.agents[0].stop();
    rec.faults(1);
    let mut blades = Vec::new();
    for u in &users[..4] {
        let r = dispatch_as(rec, &rig.dispatcher, &u.name).await;
        blades.push(
            r.map(|s| s.blade)
                .unwrap_or_else(|e| format!("{:?}", e.code())),
        );
    }
    rig.agents[0].restart().await;
    let (d, agents) = (&rig.dispatcher, [&rig.agents[0], &rig.agents[1]]);
    let agreed = agreement(rec, d, &agents, &users.iter().collect::<Vec<_>>()).await;
    rec.case(
        "a blade's agent down during Dispatch",
        "agent b1 stopped; 4 users dispatched",
        "all on b2; store and agents agree",
        &format!("blades {blades:?}; {}", shown_agreement(&agreed)),
        blades.iter().all(|b| b == "b2") && agrees(&agreed),
    );

    // An agent hanging (SIGSTOP): the Dispatch times out on it and uses the next blade; once
    // the agent resumes, the desktop it starts late is stopped again.
    let a2_pid = rig.agents[1].pid().expect("agent pid");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a2_pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    );
    rec.faults(1);
    let mut outcomes = Vec::new();
    let started = Instant::now();
    for u in &users[4..6] {
        let r = dispatch_as(rec, d, &u.name).await;
        outcomes.push(
            r.map(|s| s.blade)
                .unwrap_or_else(|e| format!("{:?}: {}", e.code(), e.message())),
        );
    }
    let took = started.elapsed();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a2_pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    );
    let all: Vec<&TestUser> = users.iter().collect();
    // A second for b2 to act on what reached it while frozen: a start it then runs for a
    // caller long gone must have begun before "one Xvnc each" can mean it was stopped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = eventually(30, || {
        users[4..6].iter().all(|u| procs::xvnc_of(u.uid).len() == 1)
    })
    .await;
    let agreed = agreement(rec, d, &agents, &all).await;
    rec.case(
        "a blade's agent hanging during Dispatch",
        "agent b2 frozen with SIGSTOP (launch timeout 3 s); 2 users dispatched; agent resumed",
        "both served by b1 after at most one timeout each; any desktop b2 starts late is stopped; store and agents agree",
        &format!(
            "blades {outcomes:?} in {:.1} s; one Xvnc each after resume: {settled}; {}",
            took.as_secs_f64(),
            shown_agreement(&agreed)
        ),
        outcomes.iter().all(|b| b == "b1") && settled && agrees(&agreed),
    );

    // The dispatcher killed (SIGKILL) in the middle of many Dispatch calls, then restarted.
    let crowd: Vec<TestUser> = (0..12).map(|_| TestUser::create()).collect();
    let addr = rig.dispatcher.addr;
    let calls: Vec<_> = crowd
        .iter()
        .map(|u| {
            let name = u.name.clone();
            tokio::spawn(async move {
                let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .expect("uri")
                    .connect()
                    .await
                else {
                    return;
                };
                // Cut short by the kill: what it did shows in the agreement after.
                let _ = DispatcherClient::new(ch)
                    .dispatch(DispatchRequest {
                        username: name,
                        remote_ip: "192.0.2.1".into(),
                        ..Default::default()
                    })
                    .await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(60)).await;
    rig.dispatcher.kill();
    rec.faults(1);
    for c in calls {
        let _ = c.await;
    }
    // Back with the default launch timeout: the 3 s the hang case needs is shorter than a
    // start takes while a dozen starts the dead dispatcher began finish on two cores, and a
    // start that times out on both blades would be refused (this case is about recovery).
    rig.dispatcher.set_option("--launch-timeout", "20s");
    rig.dispatcher.restart().await;
    let (d, agents) = (&rig.dispatcher, [&rig.agents[0], &rig.agents[1]]);
    let mut again = BTreeMap::<String, usize>::new();
    let mut refused = Vec::new();
    for u in &crowd {
        let r = dispatch_as(rec, d, &u.name).await;
        *again.entry(code(&r)).or_default() += 1;
        if let Err(e) = r {
            refused.push(format!("{}: {}", u.name, e.message()));
        }
    }
    let all: Vec<&TestUser> = users.iter().chain(crowd.iter()).collect();
    let agreed = agreement(rec, d, &agents, &all).await;
    rec.case(
        "dispatcher SIGKILL mid-Dispatch, then restart",
        "12 concurrent Dispatch calls, SIGKILL to the dispatcher 60 ms in, restart (launch timeout 20 s), Dispatch each user again",
        "every user gets one session; store and agents agree (desktops started before the kill are adopted, not doubled)",
        &format!("{again:?} {refused:?}; {}", shown_agreement(&agreed)),
        again.get("OK") == Some(&crowd.len()) && agrees(&agreed),
    );
    caller_gives_up(rec, &rig.secret).await;
    rec.scan_secrets(&[
        Log::new("dispatcher log", d.log()),
        Log::new("agent b1 log", agents[0].log()),
        Log::new("agent b2 log", agents[1].log()),
    ]);
}

/// StartSession callers that give up while the desktop starts (as a dispatcher does at its
/// launch deadline or when killed): the session helper goes on to start Xvnc. The agent
/// finishes that start under the user's lock; a second start for the user waits for it and
/// takes that desktop, and a desktop nobody asks for again is stopped (nobody got its
/// password).
/// The agent's Xvnc is a wrapper that waits 1 s before it runs Xtigervnc, so the calls are
/// surely dropped (once the user's first process shows) well before the desktop is ready.
async fn caller_gives_up(rec: &Record, secret: &Path) {
    use vncdispatch_proto::v1::{StartSessionRequest, StopSessionRequest};
    let dir = tempfile::tempdir().expect("dir");
    // Named as the real one: the agent finds desktops by that process name.
    let slow_xvnc = vncdispatch_tests::user_script(
        dir.path(),
        "Xtigervnc",
        "sleep 1\nexec /usr/bin/Xtigervnc \"$@\"",
    );
    // Records each session start: the desktop handed over starts one, the one undone none.
    let agent = AgentProc::start(AgentOptions {
        secret_file: Some(secret.to_owned()),
        session_command: Some(vncdispatch_tests::counting_session(dir.path()).into()),
        extra: vec!["--xvnc".into(), slow_xvnc],
        ..Default::default()
    })
    .await;
    let (left, retried) = (TestUser::create(), TestUser::create());
    let sessions = |u: &TestUser| vncdispatch_tests::session_starts(&u.home).len();
    let start = |name: &str| StartSessionRequest {
        username: name.to_owned(),
        password: "gaveup12".into(),
        view_only_password: String::new(),
        geometry: None,
    };
    // What the agent did with a user's given-up start (its span names the user).
    let log_lines = |u: &TestUser, what: &str| {
        agent
            .log()
            .lines()
            .filter(|l| l.contains(what) && l.contains(&format!("\"{}\"", u.name)))
            .count()
    };
    let (undo, hand_over) = (
        "the caller went away while its desktop started; stopping it",
        "the caller went away while its desktop started; leaving it to the call waiting",
    );
    let mut a = agent.client().await;
    rec.faults(2);
    let mut answered_first = Vec::new();
    for u in [&left, &retried] {
        let mut gone = a.clone();
        let call = gone.start_session(start(&u.name));
        let under_way = async {
            while procs::of_uid(u.uid).is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        // Dropping the call resets its stream, as a client's deadline or death does.
        tokio::select! {
            r = call => answered_first.push(format!("{}: {}", u.name, code(&r))),
            _ = under_way => {}
        }
    }
    // The retry waits for the given-up start and takes its desktop; the stop finds none left.
    let again = a
        .start_session(start(&retried.name))
        .await
        .map(|r| r.into_inner());
    let stopped = a
        .stop_session(StopSessionRequest {
            username: left.name.clone(),
            vnc_pid: 0,
        })
        .await
        .map(|r| r.into_inner().stopped);
    let retried_xvnc: Vec<u32> = procs::xvnc_of(retried.uid).iter().map(|p| p.pid).collect();
    let left_xvnc = procs::xvnc_of(left.uid).len();
    // The desktop handed over lets its session start a moment after the retry's answer (a
    // wrong "no" would stop it instead): looked at again once that has had time.
    let handed_session = vncdispatch_tests::eventually(5, || sessions(&retried) >= 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still: Vec<u32> = procs::xvnc_of(retried.uid).iter().map(|p| p.pid).collect();
    let (retried_sessions, left_sessions) = (sessions(&retried), sessions(&left));
    let (left_undone, retried_undone, handed) = (
        log_lines(&left, undo),
        log_lines(&retried, undo),
        log_lines(&retried, hand_over),
    );
    rec.case(
        "a StartSession caller that gives up mid-start",
        "two users' StartSession calls dropped once the session helper runs as the user; one user asks again at once, the other never does",
        "the start nobody asks for again is undone, its session command never started; the other goes to the retry waiting for it (not stopped and started again): that user has one desktop, the one the retry reported, still running with one session started after the answer; the other has none and there was nothing left to stop",
        &format!(
            "answered before the drop: {answered_first:?}; undone: {left_undone} (asked again: {retried_undone}); left to the retry: {handed}; retry {}: Xvnc pids {retried_xvnc:?}, {still:?} later, sessions started {retried_sessions} (seen: {handed_session}); other user: stop found one {stopped:?}, Xvnc {left_xvnc}, sessions started {left_sessions}",
            again.as_ref().map(|s| s.vnc_pid.to_string()).unwrap_or_else(|e| format!("{:?}", e.code())),
        ),
        answered_first.is_empty()
            && left_undone == 1
            && retried_undone == 0
            && handed == 1
            && again.as_ref().is_ok_and(|s| retried_xvnc == [s.vnc_pid] && still == [s.vnc_pid])
            && retried_sessions == 1
            && left_sessions == 0
            && matches!(stopped, Ok(false))
            && left_xvnc == 0,
    );
}

/// A dispatcher on `store` (a `mongodb://` URI or a redb file) with `agent` as blade b1.
async fn dispatcher_on(store: String, secret: &Path, agent: &AgentProc) -> DispatcherProc {
    let d = DispatcherProc::start(DispatcherOptions {
        // `mongo` is the --store value, whichever store it names.
        mongo: Some(store),
        agent_secret: secret.to_owned(),
        ..Default::default()
    })
    .await;
    d.add_agent("b1", agent).await;
    d
}

/// Dispatches each user once (set-up: a failure fails the test) and keeps their tokens.
async fn tokens_of(
    rec: &Record,
    d: &DispatcherProc,
    users: &[TestUser],
) -> HashMap<String, String> {
    let mut tokens = HashMap::new();
    for u in users {
        let s = dispatch_as(rec, d, &u.name)
            .await
            .unwrap_or_else(|e| panic!("Dispatch for {} before the fault: {e}", u.name));
        tokens.insert(u.name.clone(), s.token);
    }
    tokens
}

/// The phases of the store outage, in order, as the traffic loops tell their calls apart.
const PHASES: [&str; 4] = ["before", "down", "restarting", "back"];

/// The store (FerretDB) stopped for longer than the driver's 5 s server selection, under
/// Dispatch traffic, then started again. Each call is counted by the phase it started in,
/// so the case shows the outage was felt (calls failed while the store was down) and that
/// everything recovered (every call after the restart settled succeeded).
async fn store_outage(rec: &Record, secret: &Path, agent: &AgentProc) {
    let mut db = FerretDb::start().await;
    let dm = dispatcher_on(db.uri("vncDispatch"), secret, agent).await;
    let users: Vec<TestUser> = (0..8).map(|_| TestUser::create()).collect();
    let first = tokens_of(rec, &dm, &users).await;
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU8::new(0));
    let addr = dm.addr;
    let traffic: Vec<_> = users
        .iter()
        .map(|u| {
            let (name, stop, phase) = (u.name.clone(), stop.clone(), phase.clone());
            tokio::spawn(async move {
                let mut codes = BTreeMap::<(u8, String), usize>::new();
                while !stop.load(Ordering::Relaxed) {
                    let started_in = phase.load(Ordering::Relaxed);
                    let r = match tonic::transport::Channel::from_shared(format!("http://{addr}"))
                        .expect("uri")
                        .connect()
                        .await
                    {
                        Ok(ch) => DispatcherClient::new(ch)
                            .dispatch(DispatchRequest {
                                username: name.clone(),
                                remote_ip: "192.0.2.1".into(),
                                ..Default::default()
                            })
                            .await
                            .map(|_| ()),
                        Err(_) => Err(Status::unavailable("connect")),
                    };
                    *codes.entry((started_in, code(&r))).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                codes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    phase.store(1, Ordering::Relaxed);
    db.stop();
    rec.faults(1);
    tokio::time::sleep(Duration::from_millis(6500)).await;
    db.restart().await;
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    phase.store(3, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut codes = vec![BTreeMap::<String, usize>::new(); PHASES.len()];
    for t in traffic {
        let seen = t.await.expect("traffic loop");
        for ((p, k), v) in seen {
            *codes[usize::from(p)].entry(k).or_default() += v;
        }
    }
    let mut lost = 0;
    for u in &users {
        match dispatch_as(rec, &dm, &u.name).await {
            Ok(s) if Some(&s.token) == first.get(&u.name) => {}
            _ => lost += 1,
        }
    }
    rec.lost(lost as u64);
    let all: Vec<&TestUser> = users.iter().collect();
    let agreed = agreement(rec, &dm, &[agent], &all).await;
    let count = |p: usize, k: &str| codes[p].get(k).copied().unwrap_or(0);
    let total = |p: usize| codes[p].values().sum::<usize>();
    let felt =
        total(1) > count(1, "OK") && codes[1].keys().all(|k| k == "OK" || k == "Unavailable");
    let recovered = count(3, "OK") >= users.len() && total(3) == count(3, "OK");
    rec.case(
        "the store (FerretDB) stopped and restarted under traffic",
        "8 users calling Dispatch in a loop; FerretDB stopped for 6.5 s (longer than the driver's 5 s server selection), then started again",
        "the outage is felt: calls started while it is down fail with Unavailable (or wait and succeed once it is back); full recovery: every call started once it settled after the restart succeeds, every user keeps the session they had; store and agent agree",
        &format!(
            "calls by the phase they started in: {}; sessions kept {}/{}; {}",
            PHASES
                .iter()
                .zip(&codes)
                .map(|(p, c)| format!("{p} {c:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            users.len() - lost,
            users.len(),
            shown_agreement(&agreed)
        ),
        count(0, "OK") > 0 && felt && recovered && lost == 0 && agrees(&agreed),
    );
    rec.scan_secrets(&[
        Log::new("dispatcher log", dm.log()),
        Log::new("agent log", agent.log()),
    ]);
}

/// The embedded store's disk fills up under a dispatcher, then space returns.
async fn disk_full(rec: &Record, secret: &Path, agent: &AgentProc) {
    let mnt = tempfile::tempdir().expect("mount point");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mount tmpfs");
    let store = mnt.path().join("dispatcher.redb");
    let mut df = dispatcher_on(store.display().to_string(), secret, agent).await;
    let users: Vec<TestUser> = (0..7).map(|_| TestUser::create()).collect();
    let mut tokens = tokens_of(rec, &df, &users[..2]).await;
    let filler = mnt.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    rec.faults(1);
    // redb has room inside its file for a few commits: new users are taken (and must be kept)
    // until a commit needs the file to grow.
    let (mut taken, mut refused) = (0, None);
    for u in &users[2..6] {
        match dispatch_as(rec, &df, &u.name).await {
            Ok(s) => {
                taken += 1;
                tokens.insert(u.name.clone(), s.token);
            }
            Err(e) => {
                refused = Some((u, e));
                break;
            }
        }
    }
    let full_message = refused
        .as_ref()
        .map(|(_, e)| format!("{:?}: {}", e.code(), e.message()))
        .unwrap_or_default();
    let reconnect = dispatch_as(rec, &df, &users[0].name).await;
    let no_desktop_left = match &refused {
        Some((u, _)) => eventually(10, || procs::xvnc_of(u.uid).is_empty()).await,
        None => false,
    };
    let _ = std::fs::remove_file(&filler);
    let after = dispatch_as(rec, &df, &users[6].name).await;
    if let Ok(s) = &after {
        tokens.insert(users[6].name.clone(), s.token.clone());
    }
    df.restart().await;
    let mut kept = 0;
    for (name, token) in &tokens {
        if dispatch_as(rec, &df, name)
            .await
            .is_ok_and(|s| &s.token == token)
        {
            kept += 1;
        }
    }
    rec.lost((tokens.len() - kept) as u64);
    rec.case(
        "disk full under the embedded store",
        "redb file on a 6 MiB tmpfs filled with dd; Dispatch new users until the store refuses one (at most 4), reconnect an old one; free the space; Dispatch; restart the dispatcher",
        "users taken while full keep their sessions; the one refused gets a clear error and no desktop left running; reconnects still work; after space returns everything works and every stored session survives the restart",
        &format!(
            "taken while full: {taken}; refused: {full_message}; reconnect while full: {}; their desktop stopped: {no_desktop_left}; after: {}; sessions intact after restart {kept}/{}",
            code(&reconnect),
            code(&after),
            tokens.len()
        ),
        refused.is_some()
            && !full_message.is_empty()
            && reconnect.is_ok()
            && no_desktop_left
            && after.is_ok()
            && kept == tokens.len(),
    );
    rec.scan_secrets(&[Log::new("dispatcher log", df.log())]);
    drop(df);
    // Lazy, so a process still holding the mount cannot fail the test; nothing is left in it.
    let _ = Command::new("umount").arg("-l").arg(mnt.path()).status();
}
