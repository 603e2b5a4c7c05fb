//! Display and process faults on a blade: a stale X lock and socket, every display taken, an
//! Xvnc that fails or never listens, a desktop rejected after READY while its server runs, an
//! Xvnc killed mid-session, the helper kept waiting for the next start killed, the agent
//! stopped and restarted under running desktops, and the agent killed as its start answer
//! leaves.
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::Code;
use vncdispatch_proto::v1::{ResolveTokenRequest, StopSessionRequest};
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::reliability::attack::{
    Script, agent_sessions, code, dispatch_as, message, start, wait_health,
};
use vncdispatch_tests::reliability::{Log, Record};
use vncdispatch_tests::rig::{Rig, UserDesktop};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{eventually, procs, require_root_and_tigervnc};

#[tokio::test(flavor = "multi_thread")]
async fn display_process() {
    require_root_and_tigervnc();
    let rec = Record::new("display_process");

    // Stale X lock file and socket of a dead server on the first display of the range.
    let first = 700 + (std::process::id() % 50) * 4;
    let agent = AgentProc::start(AgentOptions {
        displays: Some((first, 2)),
        ..Default::default()
    })
    .await;
    let lock = PathBuf::from(format!("/tmp/.X{first}-lock"));
    let sock = PathBuf::from(format!("/tmp/.X11-unix/X{first}"));
    std::fs::write(&lock, "    999999\n").expect("lock");
    let _ = std::fs::remove_file(&sock);
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("socket"));
    let user = TestUser::create();
    let mut c = agent.client().await;
    let r = c.start_session(start(&user.name)).await;
    rec.faults(1);
    let display = r.as_ref().map(|s| s.get_ref().display).unwrap_or(0);
    rec.case(
        "stale X lock file and socket",
        &format!("/tmp/.X{first}-lock naming a dead pid and a dead /tmp/.X11-unix/X{first} socket, on a 2-display range"),
        "the desktop starts (on the stale display or the next)",
        &format!("{} on :{display}", code(&r)),
        r.is_ok() && (display == first || display == first + 1),
    );

    // All displays taken: the next user gets a clear error, health says NOT_SERVING until a
    // display is free again.
    // On the way, the helper the agent keeps started ahead for the next call is killed: that
    // start runs on a helper of its own, and another waits after it.
    let agent_pid = agent.pid().unwrap_or(0);
    // Started a moment after the last call's answer.
    eventually(5, || procs::waiting_helpers(agent_pid).len() == 1).await;
    let waiting = procs::waiting_helpers(agent_pid);
    for h in &waiting {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(h.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    rec.faults(1);
    let second = TestUser::create();
    let r2 = c.start_session(start(&second.name)).await;
    let refilled = eventually(5, || procs::waiting_helpers(agent_pid).len() == 1).await;
    rec.case(
        "the helper waiting for the next start killed",
        "SIGKILL to the session helper the agent keeps started ahead (root, knowing no user yet), then a start",
        "the start runs on a helper of its own; one helper waits again after it",
        &format!(
            "waiting before: {}; start {}; one waiting after: {refilled}",
            waiting.len(),
            code(&r2)
        ),
        waiting.len() == 1 && r2.is_ok() && refilled,
    );
    let third = TestUser::create();
    let r3 = c.start_session(start(&third.name)).await;
    let full = wait_health(agent.addr, "NotServing", 10).await;
    let _ = c
        .stop_session(StopSessionRequest {
            username: user.name.clone(),
            vnc_pid: 0,
        })
        .await;
    let freed = wait_health(agent.addr, "Serving", 10).await;
    rec.faults(1);
    rec.case(
        "all displays in the range taken",
        "a third user on a blade with 2 displays, both in use; then one freed",
        "ResourceExhausted with a message; health NOT_SERVING while full, SERVING once a display is free",
        &format!(
            "second {}, third {}: {}; health while full {full}, after {freed}",
            code(&r2),
            code(&r3),
            r3.as_ref().err().map(|e| e.message()).unwrap_or_default()
        ),
        r2.is_ok()
            && r3.as_ref().err().map(|e| e.code()) == Some(Code::ResourceExhausted)
            && full == "NotServing"
            && freed == "Serving",
    );
    let _ = c
        .stop_session(StopSessionRequest {
            username: second.name.clone(),
            vnc_pid: 0,
        })
        .await;
    drop(agent);

    // Xvnc that fails at once, and one that never listens.
    for (what, body, expected_code) in [
        (
            "Xvnc that fails to start",
            "echo 'no screens found' >&2; exit 1",
            None,
        ),
        (
            "Xvnc that never binds its port",
            "exec sleep 600",
            Some(Code::DeadlineExceeded),
        ),
    ] {
        let fake = Script::new(
            if expected_code.is_some() {
                "hang"
            } else {
                "fail"
            },
            body,
        );
        let agent = AgentProc::start(AgentOptions {
            extra: vec![
                "--xvnc".into(),
                fake.0.display().to_string(),
                "--start-timeout".into(),
                "2s".into(),
            ],
            ..Default::default()
        })
        .await;
        let user = TestUser::create();
        let started = Instant::now();
        let r = agent.client().await.start_session(start(&user.name)).await;
        let took = started.elapsed();
        rec.faults(1);
        let left = eventually(5, || procs::of_uid(user.uid).is_empty()).await;
        let message = message(&r);
        rec.case(
            what,
            &format!(
                "agent with --xvnc pointing at a script that does `{body}`, --start-timeout 2s"
            ),
            "a clear error within the timeout; nothing of the user's left running",
            &format!(
                "{} after {:.1} s: {message}; user's processes gone: {left}",
                code(&r),
                took.as_secs_f64()
            ),
            r.is_err()
                && expected_code.is_none_or(|c| r.as_ref().err().map(|e| e.code()) == Some(c))
                && took < Duration::from_secs(15)
                && left,
        );
    }

    // A desktop the agent rejects after READY while its "Xvnc" still runs: the listener check
    // finds no Xvnc of the user's behind the port (here a program that answers the banner but
    // is not an Xvnc by /proc), so the port counts as someone else's. Its session command
    // waits for the agent, and must not start; the server must not be left running.
    let not_xvnc = Script::new(
        "not-xvnc",
        r#"exec python3 -c '
import os, socket, sys
a = sys.argv[1:]
port = int(a[a.index("-rfbport") + 1])
host = a[a.index("-interface") + 1] if "-interface" in a else "0.0.0.0"
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(8)
os.write(0, a[0].lstrip(":").encode() + b"\n")
while True:
    c, _ = s.accept()
    c.sendall(b"RFB 003.008\n")
    c.close()
' "$@""#,
    );
    let dir = tempfile::tempdir().expect("dir");
    let agent = AgentProc::start(AgentOptions {
        extra: vec!["--xvnc".into(), not_xvnc.0.display().to_string()],
        session_command: Some(vncdispatch_tests::counting_session(dir.path()).into()),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let r = agent.client().await.start_session(start(&user.name)).await;
    rec.faults(1);
    let left = eventually(5, || procs::of_uid(user.uid).is_empty()).await;
    // Late starts would show after the helper's own wait for the agent (10 s) at most; a
    // start on its way shows within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sessions = vncdispatch_tests::session_starts(&user.home).len();
    let rejected = agent.log().matches("trying another display").count();
    let message = message(&r);
    rec.case(
        "desktop rejected after READY while its server runs",
        "--xvnc is a program that binds its -rfbport, writes its -displayfd line and answers RFB banners, but is not an Xvnc to /proc: the agent's listener check takes the port for someone else's, on every display it tries; the session command records each start",
        "refused, naming the port's holder; no session command started for any rejected desktop (the helper holds it until the agent says go, and the agent says no); nothing of the user's left running",
        &format!(
            "{}: {message}; rejections after READY: {rejected}; session commands started: {sessions}; user's processes gone: {left}",
            code(&r)
        ),
        // Every display tried but the last (the agent's 3 attempts) logs a rejection.
        r.is_err() && message.contains("taken by another program") && rejected == 2 && sessions == 0 && left,
    );
    drop(agent);

    // Xvnc crash mid-session: the next Dispatch notices and starts a new one.
    let s = Rig::with_dispatcher_args(&[]).await;
    let UserDesktop {
        user,
        client: mut d,
        session: first,
    } = s.user_with_desktop("192.0.2.1").await;
    rec.session(&first);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.vnc_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    rec.faults(1);
    let gone = eventually(5, || procs::xvnc_of(user.uid).is_empty()).await;
    let second = dispatch_as(&rec, &s.dispatcher, &user.name)
        .await
        .expect("Dispatch");
    let old = d
        .resolve_token(ResolveTokenRequest {
            token: first.token.clone(),
            attached: false,
        })
        .await;
    let xvnc = procs::xvnc_of(user.uid).len();
    rec.duplicated(xvnc.saturating_sub(1) as u64);
    rec.case(
        "Xvnc killed mid-session",
        "SIGKILL to the user's Xvnc, then Dispatch again",
        "reaped; a new desktop (new pid, new token); the old token refused; one Xvnc",
        &format!(
            "reaped: {gone}; new pid {} (was {}), reused={}, old token {}; {xvnc} Xvnc",
            second.vnc_pid,
            first.vnc_pid,
            second.reused,
            code(&old)
        ),
        gone && second.vnc_pid != first.vnc_pid
            && !second.reused
            && second.token != first.token
            && old.as_ref().err().map(|e| e.code()) == Some(Code::NotFound)
            && xvnc == 1,
    );

    // Agent stopped (SIGTERM) with desktops running, then restarted: re-adopted, none doubled.
    let mut s = s;
    let other = TestUser::create();
    let other_first = dispatch_as(&rec, &s.dispatcher, &other.name)
        .await
        .expect("Dispatch");
    let agent_pid = s.agents[0].pid().unwrap_or(0);
    eventually(5, || procs::waiting_helpers(agent_pid).len() == 1).await;
    let spare: Vec<u32> = procs::waiting_helpers(agent_pid)
        .iter()
        .map(|h| h.pid)
        .collect();
    s.agents[0].stop();
    rec.faults(1);
    // The helper the agent kept waiting exits with it, on its closed stdin: no root process
    // is left behind.
    let spare_gone = eventually(5, || procs::all().iter().all(|p| !spare.contains(&p.pid))).await;
    rec.case(
        "agent stopped: the helper it kept waiting",
        "the agent stopped (SIGTERM) while a session helper waits, started ahead, for its next call",
        "the waiting helper exits with it (its stdin closed); nothing of the agent's runs as root after",
        &format!("waiting helpers {spare:?}; gone after the stop: {spare_gone}"),
        spare.len() == 1 && spare_gone,
    );
    let survived = procs::xvnc_of(user.uid).len() == 1 && procs::xvnc_of(other.uid).len() == 1;
    s.agents[0].restart().await;
    // A listing that fails fails the case, with its error shown.
    let adopted = agent_sessions(s.agent())
        .await
        .map(|v| v.into_iter().map(|v| v.vnc_pid).collect::<HashSet<u32>>());
    let again = dispatch_as(&rec, &s.dispatcher, &user.name)
        .await
        .expect("Dispatch");
    let dup = procs::xvnc_of(user.uid).len() + procs::xvnc_of(other.uid).len();
    rec.duplicated(dup.saturating_sub(2) as u64);
    rec.lost(u64::from(again.token != second.token));
    rec.case(
        "agent SIGTERM with desktops running, then restart",
        "two users' desktops running; systemctl-style stop of the agent, start again, Dispatch again",
        "desktops keep running while the agent is down; re-adopted after (same pids); Dispatch returns the same session; no duplicates",
        &format!(
            "survived: {survived}; adopted pids {} (expected {} and {}); same session again: {}; {dup} Xvnc for 2 users",
            adopted
                .as_ref()
                .map_or_else(|e| format!("unknown (agent ListSessions failed: {e})"), |a| format!("{a:?}")),
            second.vnc_pid,
            other_first.vnc_pid,
            again.token == second.token && again.reused
        ),
        survived
            && adopted
                .as_ref()
                .is_ok_and(|a| a.contains(&second.vnc_pid) && a.contains(&other_first.vnc_pid))
            && again.token == second.token
            && dup == 2,
    );

    // The agent killed as a start's answer leaves it: the helper holds the desktop's session
    // command until the agent closes its stdin, a moment after its answer.
    let mut quick = AgentProc::start(AgentOptions::default()).await;
    let gated = TestUser::create();
    let answered = quick.client().await.start_session(start(&gated.name)).await;
    quick.kill();
    let killed = Instant::now();
    rec.faults(1);
    let session_up = eventually(10, || {
        procs::of_uid(gated.uid).iter().any(|p| p.comm == "twm")
    })
    .await;
    // Well before the helper's own 10 s limit: it heard the agent's end close.
    let after = killed.elapsed();
    let xvnc = procs::xvnc_of(gated.uid).len();
    let quick_log = quick.log();
    rec.case(
        "agent killed as its start answer leaves",
        "SIGKILL to the agent as soon as StartSession answers, before it lets the helper start the session command (5 ms after an answer)",
        "the helper sees its stdin close with the agent and starts the session anyway, within 5 s (not at its own 10 s limit): twm runs in the desktop, its Xvnc keeps running",
        &format!(
            "answer: {}; session command running: {session_up}, {} ms after the kill; {xvnc} Xvnc for the user",
            answered.as_ref().map_or_else(|e| format!("{:?}", e.code()), |_| "READY".into()),
            after.as_millis()
        ),
        answered.is_ok() && session_up && after < Duration::from_secs(5) && xvnc == 1,
    );
    rec.scan_secrets(&[
        Log::new("dispatcher log", s.dispatcher.log()),
        Log::new("agent log", s.agent().log()),
        Log::new("agent log (killed as it answered)", quick_log),
    ]);
    rec.finish();
}
