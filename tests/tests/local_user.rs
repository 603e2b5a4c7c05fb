//! The fault suite's `local_user` group: a desktop user on the blade against the root agent
//! (issue 13). Real unprivileged accounts set traps in the shared /tmp, squat RFB ports on
//! IPv4 and IPv6, run fake X servers, flood the agent through a helper, and have their
//! accounts expired or limited through PAM; a real agent with real Xvnc must not be turned
//! against anyone. Each case is recorded for docs/reliability.md.
//!
//! A binary of its own, its cases one after another: the first takes /tmp/.X11-unix away
//! from root for a while, which no other desktop on this machine should see (cargo runs test
//! binaries one at a time).
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vncdispatch_proto::refusal::RefusalKind;
use vncdispatch_proto::v1::{AgentHealthRequest, StartSessionRequest, StopSessionRequest};
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::reliability::Record;
use vncdispatch_tests::require_root_and_tigervnc;
use vncdispatch_tests::users::TestUser;

/// `sh -c script` as `user`, in the background.
fn as_user(user: &TestUser, script: &str) -> std::process::Child {
    let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(user.uid))
        .ok()
        .flatten()
        .map(|u| u.gid.as_raw())
        .expect("user's gid");
    Command::new("/bin/sh")
        .args(["-c", script])
        .current_dir(&user.home)
        .uid(user.uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn as user")
}

/// Runs `script` as `user` to its end; true if it succeeded.
fn as_user_done(user: &TestUser, script: &str) -> bool {
    as_user(user, script)
        .wait()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn start(user: &str) -> StartSessionRequest {
    StartSessionRequest {
        username: user.into(),
        password: "trapped1".into(),
        view_only_password: String::new(),
        geometry: None,
    }
}

fn stop(user: &str) -> StopSessionRequest {
    StopSessionRequest {
        username: user.into(),
        vnc_pid: 0,
    }
}

/// A /proc/PID/status field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(u64::MAX)
}

/// A display range of `n` for one case, away from other binaries' ranges, cleared of the
/// lock files that Xvnc killed by earlier tests left (the agent would clear them itself; a
/// user setting a trap could not).
fn range(case: u32, n: u32) -> (u32, u32) {
    let first = 600 + (std::process::id() % 20) * 40 + case * 5;
    for d in first..first + n {
        let _ = std::fs::remove_file(format!("/tmp/.X{d}-lock"));
        let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{d}"));
    }
    (first, n)
}

#[tokio::test(flavor = "multi_thread")]
async fn local_user() {
    require_root_and_tigervnc();
    let rec = Record::new("local_user");
    x11_unix_swapped_for_a_symlink(&rec).await;
    trapped_lock_files(&rec).await;
    fake_x_servers_on_every_display(&rec).await;
    x_server_behind_the_agents_back(&rec).await;
    hanging_up_to_blacklist_an_address(&rec).await;
    squatted_ports(&rec).await;
    squatter_racing_the_helper(&rec).await;
    fifo_as_the_password_file(&rec).await;
    flooding_helper(&rec).await;
    helper_writing_to_stderr(&rec).await;
    helper_a_user_could_replace(&rec).await;
    expired_account(&rec).await;
    limits_from_pam(&rec).await;
    pam_tightened_while_a_helper_waits(&rec).await;
    rec.finish();
}

async fn x11_unix_swapped_for_a_symlink(rec: &Record) {
    // A root-owned file the attacker wants: 0600, root's.
    let target = std::path::PathBuf::from(format!("/tmp/vd-root-target-{}", std::process::id()));
    std::fs::write(&target, "root's\n").expect("target");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // The attacker takes /tmp/.X11-unix (gone at boot, or removed by a cleaner) and keeps
    // swapping their own directory for a symlink to the target.
    let _ = std::fs::remove_dir_all("/tmp/.X11-unix");
    let attacker = TestUser::create();
    let script = format!(
        "while :; do mkdir /tmp/.X11-unix 2>/dev/null; rmdir /tmp/.X11-unix 2>/dev/null; \
         ln -s {t} /tmp/.X11-unix 2>/dev/null; rm -f /tmp/.X11-unix 2>/dev/null; \
         mkdir /tmp/.X11-unix 2>/dev/null; done",
        t = target.display()
    );
    // Three swappers, to hit the window between any check and any use as often as possible.
    let mut swappers: Vec<_> = (0..3).map(|_| as_user(&attacker, &script)).collect();
    let agent = AgentProc::start(AgentOptions {
        displays: Some(range(0, 5)),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let mut started = 0;
    for _ in 0..50 {
        if client.start_session(start(&user.name)).await.is_ok() {
            started += 1;
        }
        let _ = client.stop_session(stop(&user.name)).await;
    }
    for s in &mut swappers {
        let _ = s.kill();
        let _ = s.wait();
    }
    // What the agent moved aside (the attacker's directories and links).
    if let Ok(dir) = std::fs::read_dir("/tmp") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(".X11-unix.foreign-")
            {
                let p = e.path();
                let _ = std::fs::remove_dir(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
    }
    let meta = std::fs::metadata(&target).expect("target");
    let text = std::fs::read_to_string(&target).expect("target");
    let _ = std::fs::remove_file(&target);
    // A link the attacker made inside the directory while it was root's.
    if let Some(name) = target.file_name() {
        let _ = std::fs::remove_file(std::path::Path::new("/tmp/.X11-unix").join(name));
    }
    // Leave /tmp/.X11-unix as the agent keeps it, for whatever runs next.
    let _ = std::fs::remove_file("/tmp/.X11-unix");
    let _ = client.start_session(start(&user.name)).await;
    let _ = client.stop_session(stop(&user.name)).await;
    let dir = std::fs::symlink_metadata("/tmp/.X11-unix").expect("X11-unix");
    let kept = dir.is_dir() && dir.uid() == 0 && dir.mode() & 0o7777 == 0o1777;
    let untouched =
        (meta.uid(), meta.gid(), meta.mode() & 0o7777, text.as_str()) == (0, 0, 0o600, "root's\n");
    rec.faults(50);
    rec.case(
        "/tmp/.X11-unix swapped for a symlink in a loop",
        "a user takes /tmp/.X11-unix and three loops swap it for a symlink to a root-owned 0600 file while the agent starts and stops a desktop 50 times",
        "the root-owned file keeps owner, mode and content; desktops still start; /tmp/.X11-unix ends root's with mode 1777",
        &format!(
            "{started}/50 desktops started; target owner {}:{} mode {:o}, content {}; /tmp/.X11-unix root's 1777: {kept}",
            meta.uid(),
            meta.gid(),
            meta.mode() & 0o7777,
            if text == "root's\n" {
                "unchanged"
            } else {
                "CHANGED"
            }
        ),
        started > 0 && untouched && kept,
    );
}

async fn trapped_lock_files(rec: &Record) {
    let (first, count) = range(1, 5);
    let attacker = TestUser::create();
    let lock = |n: u32| format!("/tmp/.X{}-lock", first + n);
    let traps = [
        format!("mkfifo {}", lock(0)),
        format!("ln -s /dev/zero {}", lock(1)),
        format!("head -c 1048576 /dev/zero > {}", lock(2)),
        format!("echo '      1' > {}", lock(3)),
    ];
    let set = as_user_done(&attacker, &traps.join(" && "));
    let agent = AgentProc::start(AgentOptions {
        displays: Some((first, count)),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    // Health, polled all along: it must never wait on a trap.
    let mut poller = agent.client().await;
    let polling = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let t = Instant::now();
            let ok = tokio::time::timeout(
                Duration::from_secs(5),
                poller.health(AgentHealthRequest::default()),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            worst = worst.max(if ok { t.elapsed() } else { Duration::MAX });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worst
    });
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        client.start_session(start(&user.name)),
    )
    .await;
    let worst = polling.await.unwrap_or(Duration::MAX);
    // The desktop's own lock file may now be one of these paths; a trap is what is not.
    let is_trap = |p: &String| {
        std::fs::symlink_metadata(p).is_ok_and(|m| {
            !m.file_type().is_file()
                || m.len() > 64
                || std::fs::read_to_string(p).is_ok_and(|t| t.trim() == "1")
        })
    };
    let left: Vec<String> = (0..4).map(lock).filter(is_trap).collect();
    for p in (0..4).map(lock) {
        let _ = std::fs::remove_file(p);
    }
    let rss = agent
        .pid()
        .map(|p| status_kib(p, "VmRSS:"))
        .unwrap_or(u64::MAX);
    let display = match &got {
        Ok(Ok(s)) => format!("desktop on :{}", s.get_ref().display - first),
        Ok(Err(e)) => format!("refused: {e:?}"),
        Err(_) => "StartSession hung".into(),
    };
    let _ = client.stop_session(stop(&user.name)).await;
    rec.faults(4);
    rec.case(
        "X lock files as traps: FIFO, symlink to /dev/zero, 1 MiB, naming pid 1",
        "a user plants /tmp/.X<n>-lock as a FIFO, a symlink to /dev/zero, a 1 MiB file and a file naming pid 1 on four of a five-display range; another user's desktop starts while Health is polled every 50 ms",
        "the desktop starts (the traps are removed, no X server wrote them); Health answers within 1 s throughout; agent RSS stays small",
        &format!(
            "{display} (range offset); slowest Health {worst:?}; traps left {}; agent RSS {rss} KiB; traps set {set}",
            left.len()
        ),
        set && matches!(got, Ok(Ok(_)))
            && worst < Duration::from_secs(1)
            && left.is_empty()
            && rss < 200 * 1024,
    );
}

async fn fake_x_servers_on_every_display(rec: &Record) {
    let (first, count) = range(2, 3);
    let attacker = TestUser::create();
    // A shell script named Xtigervnc: its comm is Xtigervnc, its arguments name the display,
    // and it writes the display's lock file with its own pid, as an X server does.
    let fake = attacker.home.join("Xtigervnc");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"     $$\" > /tmp/.X${1#:}-lock\nwhile :; do sleep 1; done\n",
    )
    .expect("fake");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut fakes: Vec<_> = (0..count)
        .map(|i| {
            let child = as_user(
                &attacker,
                &format!("exec {} :{}", fake.display(), first + i),
            );
            std::thread::sleep(Duration::from_millis(100));
            child
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let agent = AgentProc::start(AgentOptions {
        displays: Some((first, count)),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let got = client.start_session(start(&user.name)).await;
    let alive = fakes
        .iter_mut()
        .filter_map(|c| c.try_wait().ok())
        .filter(Option::is_none)
        .count();
    for c in &mut fakes {
        let _ = c.kill();
        let _ = c.wait();
    }
    for i in 0..count {
        let _ = std::fs::remove_file(format!("/tmp/.X{}-lock", first + i));
    }
    let _ = client.stop_session(stop(&user.name)).await;
    let warned = agent.log().contains("second X server");
    rec.faults(u64::from(count));
    rec.case(
        "fake Xtigervnc on every display",
        "a user runs a script named Xtigervnc with its own X lock file on each of a three-display range; another user asks for a desktop",
        "the desktop starts: a user keeps one X server in the agent's range (the oldest), the others are stopped and logged",
        &format!(
            "{}; the attacker's fakes still running {alive}/{count}; logged: {warned}",
            match &got {
                Ok(s) => format!("desktop on :{}", s.get_ref().display - first),
                Err(e) => format!("refused: {e:?}"),
            }
        ),
        got.is_ok() && alive == 1 && warned,
    );
}

/// An X server a user starts in the agent's range behind its back, after its last full scan
/// of /proc: Health learns of it within `--rescan-interval` (it checks only the desktops it
/// knows in between), and choosing a display — which still reads /proc — never hands that
/// display to another user meanwhile.
async fn x_server_behind_the_agents_back(rec: &Record) {
    let (first, count) = range(10, 2);
    let agent = AgentProc::start(AgentOptions {
        displays: Some((first, count)),
        extra: vec!["--rescan-interval".into(), "2s".into()],
        ..Default::default()
    })
    .await;
    let mut client = agent.client().await;
    let sessions = async || {
        client
            .clone()
            .health(AgentHealthRequest::default())
            .await
            .map_or(u32::MAX, |h| h.into_inner().sessions)
    };
    let before = sessions().await;
    // A script named Xtigervnc with a display and a password file on its command line: what
    // the agent takes for a desktop of this user.
    let attacker = TestUser::create();
    let fake = attacker.home.join("Xtigervnc");
    std::fs::write(&fake, "#!/bin/sh\nwhile :; do sleep 1; done\n").expect("fake");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut server = as_user(
        &attacker,
        &format!(
            "exec {} :{first} -rfbauth {}/.vncpasswd",
            fake.display(),
            attacker.home.display()
        ),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let soon = sessions().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = sessions().await;
    let user = TestUser::create();
    let got = client.start_session(start(&user.name)).await;
    let display = got.as_ref().ok().map(|s| s.get_ref().display);
    let left_alone = matches!(server.try_wait(), Ok(None));
    let _ = client.stop_session(stop(&user.name)).await;
    let _ = server.kill();
    let _ = server.wait();
    rec.case(
        "an X server started behind the agent's back",
        "with --rescan-interval 2s, a user starts a script named Xtigervnc on the first of a two-display range (with -rfbauth, as a desktop has) after the agent's last scan; Health is read at once and after 2.5 s; another user asks for a desktop",
        "Health counts it within the rescan interval; the other user's desktop gets the other display; the user's server is left running (it is their only one)",
        &format!(
            "Health sessions: {before} before, {soon} at once, {later} after 2.5 s; other user's desktop {}; the user's server still running: {left_alone}",
            match display {
                Some(d) => format!("on :{}", d - first),
                None => format!("refused: {:?}", got.err()),
            }
        ),
        later == before.saturating_add(1) && display == Some(first + 1) && left_alone,
    );
}

/// A desktop user hangs up on a neighbour's desktop again and again from the blade itself:
/// the address the agent's readiness check, and a ws-proxy on the same host, connect from.
/// TigerVNC counts each connection that ends before a login as a failure and, after five,
/// refuses that address for a while ("Too many security failures"): the owner, reaching the
/// desktop from there, would be locked out.
async fn hanging_up_to_blacklist_an_address(rec: &Record) {
    let (first, count) = range(11, 2);
    let agent = AgentProc::start(AgentOptions {
        displays: Some((first, count)),
        ..Default::default()
    })
    .await;
    let mut client = agent.client().await;
    let owner = TestUser::create();
    let port = client
        .start_session(start(&owner.name))
        .await
        .ok()
        .map(|s| s.into_inner().port as u16);
    let attacker = TestUser::create();
    let hangups = port.is_some_and(|p| {
        let script = attacker.home.join("hangup.py");
        std::fs::write(
            &script,
            format!(
                "import socket\nfor i in range(12):\n    s = socket.create_connection(('127.0.0.1', {p}))\n    s.recv(12)\n    s.close()\n"
            ),
        )
        .expect("script");
        as_user_done(&attacker, &format!("exec python3 {}", script.display()))
    });
    let after = port.and_then(|p| banner(([127, 0, 0, 1], p).into()));
    let _ = client.stop_session(stop(&owner.name)).await;
    rec.case(
        "hanging up on a neighbour's desktop to have an address blacklisted",
        "a second user on the blade connects to the first user's desktop from 127.0.0.1 twelve times, reads its banner and hangs up before any login (ws-proxy on the same host, and the agent's own readiness check, connect from there)",
        "the desktop still greets 127.0.0.1 with RFB 003.008: the agent starts Xvnc with its blacklist off (-UseBlacklist=0), so no one can lock a neighbour out; the password is random, and guessing it costs a connection a try all the same",
        &format!("desktop on port {port:?}; hang-ups done: {hangups}; then 127.0.0.1 is greeted with {after:?}"),
        hangups && after.as_deref() == Some("RFB 003.008"),
    );
}

/// The first line a listener on `addr` sends, if any.
fn banner(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut b = [0u8; 12];
    s.read_exact(&mut b).ok()?;
    Some(String::from_utf8_lossy(&b).trim_end().to_owned())
}

/// A Python squatter as `user`: listens on the given ports (IPv4 `0.0.0.0`, or IPv6 `::`
/// with IPV6_V6ONLY) and greets every client with a fake RFB banner, `RFB 003.003`.
fn squatter(user: &TestUser, v4: &[u16], v6: &[u16]) -> std::process::Child {
    let script = format!(
        r#"
import socket, threading
def serve(s):
    while True:
        c, _ = s.accept(); c.sendall(b"RFB 003.003\n"); c.close()
for fam, ports in ((socket.AF_INET, {v4:?}), (socket.AF_INET6, {v6:?})):
    for p in ports:
        s = socket.socket(fam)
        if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("0.0.0.0" if fam == socket.AF_INET else "::", p)); s.listen(16)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
open("squatting", "w").close()
threading.Event().wait()
"#
    );
    let path = user.home.join("squat.py");
    std::fs::write(&path, script).expect("squatter");
    as_user(
        user,
        &format!("rm -f squatting; exec python3 {}", path.display()),
    )
}

/// Waits (up to 5 s) for the attacker's script to drop its `marker` file: it is listening.
fn marked(attacker: &TestUser, marker: &str) -> bool {
    (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        attacker.home.join(marker).exists()
    })
}

/// An agent whose desktops listen on any address, IPv4 and IPv6: the production default.
async fn any_address_agent(displays: (u32, u32)) -> AgentProc {
    AgentProc::start(AgentOptions {
        displays: Some(displays),
        rfb_listen: Some([0, 0, 0, 0].into()),
        ..Default::default()
    })
    .await
}

/// Whether the desktop at `port` is the real one on both families (Xvnc's banner is
/// `RFB 003.008`; the squatters say `RFB 003.003`).
fn real_banners(port: u16) -> (Option<String>, Option<String>) {
    (
        banner(([127, 0, 0, 1], port).into()),
        banner((std::net::Ipv6Addr::LOCALHOST, port).into()),
    )
}

async fn squatted_ports(rec: &Record) {
    let (first, count) = range(3, 3);
    let attacker = TestUser::create();
    let (p0, p1) = ((5900 + first) as u16, (5901 + first) as u16);
    let mut squat = squatter(&attacker, &[p0], &[p1]);
    let ready = marked(&attacker, "squatting");
    let agent = any_address_agent((first, count)).await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let got = client.start_session(start(&user.name)).await;
    let (v4, v6) = match &got {
        Ok(s) => real_banners(s.get_ref().port as u16),
        Err(_) => (None, None),
    };
    let _ = squat.kill();
    let _ = squat.wait();
    let _ = client.stop_session(stop(&user.name)).await;
    let real = |b: &Option<String>| b.as_deref() == Some("RFB 003.008");
    rec.faults(2);
    rec.case(
        "RFB ports squatted on IPv4 and on IPv6 (V6ONLY)",
        "before a desktop starts (agent listening on any address), a user listens on 0.0.0.0 at the first display's port and on [::] with IPV6_V6ONLY at the second's, each answering with a fake RFB banner",
        "the desktop is READY on a port no one else listens on: both 127.0.0.1 and [::1] reach the real Xvnc",
        &format!(
            "{}; banner on 127.0.0.1: {v4:?}, on [::1]: {v6:?}; squatter listening: {ready}",
            match &got {
                Ok(s) => format!("desktop on :{}", s.get_ref().display - first),
                Err(e) => format!("refused: {e:?}"),
            }
        ),
        ready && got.is_ok() && real(&v4) && real(&v6),
    );
}

async fn squatter_racing_the_helper(rec: &Record) {
    let (first, count) = range(4, 5);
    let attacker = TestUser::create();
    // Watches /proc for Xvnc (or a helper naming its port) and binds that port on both
    // families at once.
    let script = attacker.home.join("race.py");
    std::fs::write(
        &script,
        r#"
import os, socket, threading
held = {}
def serve(s):
    while True:
        try:
            c, _ = s.accept(); c.sendall(b"RFB 003.003\n"); c.close()
        except OSError:
            return
open("racing", "w").close()
while True:
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            args = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
        except OSError:
            continue
        # The port shows in Xvnc's arguments from its exec on (the helper gets its request
        # on stdin, so its own arguments no longer name it).
        flag = next((f for f in (b"-rfbport", b"--port") if f in args[:-1]), None)
        if flag is None: continue
        try:
            port = int(args[args.index(flag) + 1])
        except ValueError:
            continue
        if port in held: continue
        held[port] = []
        for fam, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
            try:
                s = socket.socket(fam)
                if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr, port)); s.listen(16); held[port].append(s)
                threading.Thread(target=serve, args=(s,), daemon=True).start()
            except OSError:
                pass
"#,
    )
    .expect("racer");
    let mut racer = as_user(&attacker, &format!("exec python3 {}", script.display()));
    let ready = marked(&attacker, "racing");
    // A session command that notes each start: a desktop the agent rejected (its listener
    // check found the squatter beside Xvnc) is not meant to start its session; counted.
    let dir = tempfile::tempdir().expect("dir");
    let counting = vncdispatch_tests::counting_session(dir.path());
    let agent = AgentProc::start(AgentOptions {
        displays: Some((first, count)),
        rfb_listen: Some([0, 0, 0, 0].into()),
        session_command: Some(counting.clone().into()),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let sessions = || vncdispatch_tests::session_starts(&user.home).len();
    let mut client = agent.client().await;
    let (mut ready_real, mut refused, mut fooled) = (0, 0, 0);
    // The displays of the desktops reported READY, as their session commands see $DISPLAY.
    let mut ready_on = Vec::new();
    let mut why = String::new();
    for _ in 0..5 {
        match client.start_session(start(&user.name)).await {
            Ok(s) => {
                let (v4, v6) = real_banners(s.get_ref().port as u16);
                if v4.as_deref() == Some("RFB 003.008") && v6.as_deref() == Some("RFB 003.008") {
                    ready_real += 1;
                    ready_on.push(format!(":{}", s.get_ref().display));
                    // Its session starts a moment after the answer; wait for it before the stop.
                    if !vncdispatch_tests::eventually(5, || sessions() >= ready_real).await {
                        why = format!("no session command started for READY desktop {ready_real}");
                    }
                } else {
                    fooled += 1;
                }
            }
            Err(e) => {
                refused += 1;
                why = format!("{:?}: {}", e.code(), e.message());
            }
        }
        let _ = client.stop_session(stop(&user.name)).await;
    }
    let _ = racer.kill();
    let _ = racer.wait();
    // Rejected after READY: the listener check found the squatter beside a running Xvnc, or
    // Xvnc gone (its port taken); logged for every attempt that went on to another display.
    let rejected = agent.log().matches("trying another display").count()
        + agent
            .log()
            .matches("RFB port not the desktop's alone")
            .count();
    let started = sessions();
    let mut started_on = vncdispatch_tests::session_starts(&user.home);
    started_on.sort();
    ready_on.sort();
    // Not only as many: on the same displays (a missing start cannot hide a rejected one's).
    let same_displays = started_on == ready_on;
    let started_on = started_on.join(" ");

    // The counter itself works: a desktop on displays the racer never held starts one session.
    let control_agent = AgentProc::start(AgentOptions {
        displays: Some(range(13, 1)),
        session_command: Some(counting.clone().into()),
        ..Default::default()
    })
    .await;
    let mut control_client = control_agent.client().await;
    let control = match control_client.start_session(start(&user.name)).await {
        Ok(_) => vncdispatch_tests::eventually(5, || sessions() == started + 1).await,
        Err(e) => {
            why = format!("{why}; the control start failed: {}", e.message());
            false
        }
    };
    let _ = control_client.stop_session(stop(&user.name)).await;
    rec.faults(5);
    rec.case(
        "a squatter racing the helper for its port",
        "a user watches /proc for the desktop's Xvnc and binds its -rfbport on [::] (V6ONLY) and 0.0.0.0 the moment it appears, before Xvnc can, answering with a fake RFB banner; five desktops are started and stopped",
        "no desktop is ever reported READY where the squatter answers: each is READY with the real Xvnc on both families, or refused with an error that names the uid holding the ports; at least one display rejected after READY; one session command started per READY desktop, on its display, and none for a rejected one (its helper waits for the agent's word, and the agent says no), the counter shown to work on displays the racer never held",
        &format!(
            "READY with the real Xvnc {ready_real}, refused {refused}, READY at the squatter {fooled}; rejections after READY logged: {rejected}; session commands started: {started} (on {started_on:?}; READY desktops on {:?}); a desktop on displays the racer never held started its session: {control}; racer watching: {ready}; last refusal: {why}",
            ready_on.join(" ")
        ),
        ready
            && fooled == 0
            && ready_real + refused == 5
            && rejected >= 1
            && started == ready_real
            && same_displays
            && control
            && (refused == 0 || why.contains(&format!("uid {}", attacker.uid))),
    );
}

async fn fifo_as_the_password_file(rec: &Record) {
    let agent = AgentProc::start(AgentOptions {
        displays: Some(range(5, 2)),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let fifo = user.home.join(".vncpasswd");
    let set = as_user_done(&user, &format!("mkfifo {}", fifo.display()));
    let asked = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(8),
        agent.client().await.start_session(start(&user.name)),
    )
    .await;
    let took = asked.elapsed();
    let xvnc = vncdispatch_tests::procs::xvnc_of(user.uid).len();
    let code = match &got {
        Ok(Ok(_)) => "OK".to_owned(),
        Ok(Err(e)) => format!("{:?}", e.code()),
        Err(_) => "hung".into(),
    };
    rec.bad_inputs(1);
    rec.case(
        "~/.vncpasswd is a FIFO",
        "the user makes ~/.vncpasswd a FIFO and asks for a desktop",
        "PermissionDenied at once (the helper opens it without blocking); no Xvnc",
        &format!("{code} after {} ms; Xvnc running {xvnc}", took.as_millis()),
        set && code == "PermissionDenied" && xvnc == 0 && took < Duration::from_secs(5),
    );
}

async fn flooding_helper(rec: &Record) {
    // What a user who ptraces their own helper could make it say: 100 MiB, no newline.
    let dir = tempfile::tempdir().expect("dir");
    let helper = vncdispatch_tests::user_script(
        dir.path(),
        "flooding-helper",
        // It reads a byte of its request, not to its end: the agent keeps the helper's stdin
        // open after a start's request.
        "head -c 1 >/dev/null\nhead -c 104857600 /dev/zero | tr '\\0' A",
    );
    let agent = AgentProc::start(AgentOptions {
        displays: Some(range(6, 2)),
        extra: vec!["--helper".into(), helper],
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        agent.client().await.start_session(start(&user.name)),
    )
    .await;
    // Peak RSS: a flood read whole and freed would leave the current RSS low.
    let hwm = agent
        .pid()
        .map(|p| status_kib(p, "VmHWM:"))
        .unwrap_or(u64::MAX);
    let cut = matches!(&got, Ok(Err(e)) if e.message().contains("unexpected answer"));
    rec.bad_inputs(1);
    rec.case(
        "a helper that answers 100 MiB without a newline",
        "the session helper (as a user who ptraces their own helper could make it) writes 100 MiB of 'A' and no newline",
        "refused as an unexpected answer after 4 KiB; agent peak RSS under 64 MiB",
        &format!(
            "{}; agent peak RSS {hwm} KiB",
            match &got {
                Ok(Ok(_)) => "accepted".to_owned(),
                Ok(Err(e)) => format!("{:?}, cut off: {cut}", e.code()),
                Err(_) => "hung".into(),
            }
        ),
        cut && hwm < 64 * 1024,
    );
}

async fn helper_writing_to_stderr(rec: &Record) {
    // The real helper, after a forged log line on stderr: a user controls their helper.
    let dir = tempfile::tempdir().expect("dir");
    let real = vncdispatch_tests::workspace_bin("blade-agent");
    let helper = vncdispatch_tests::user_script(
        dir.path(),
        "chatty-helper",
        &format!(
            "echo 'ERROR blade_agent: FORGED-BY-USER rm -rf /' >&2\nexec {} \"$@\"",
            real.display()
        ),
    );
    let agent = AgentProc::start(AgentOptions {
        displays: Some(range(7, 2)),
        extra: vec!["--helper".into(), helper],
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let got = client.start_session(start(&user.name)).await;
    let _ = client.stop_session(stop(&user.name)).await;
    let forged = agent.log().contains("FORGED-BY-USER");
    rec.bad_inputs(1);
    rec.case(
        "a helper writing forged lines to stderr",
        "the session helper writes a fake ERROR line to stderr, then starts the desktop",
        "the line is not in the agent's log (the helper has no stderr until it logs into the desktop's own log); the desktop starts",
        &format!(
            "desktop {}; forged line in the agent's log: {forged}",
            if got.is_ok() { "started" } else { "refused" }
        ),
        got.is_ok() && !forged,
    );
}

async fn helper_a_user_could_replace(rec: &Record) {
    // The helper starts as root: one in a user's home would be that user's root shell.
    let user = TestUser::create();
    let helper = user.home.join("blade-agent");
    std::fs::copy(vncdispatch_tests::workspace_bin("blade-agent"), &helper).expect("copy");
    let set = as_user_done(
        &user,
        &format!("true > /dev/null; test -w {}", user.home.display()),
    );
    let out = Command::new(vncdispatch_tests::workspace_bin("blade-agent"))
        .args(["cloudvnc", "--user", &user.name, "--helper"])
        .arg(&helper)
        .stdin(Stdio::null())
        .output()
        .expect("run cloudvnc");
    let err = String::from_utf8_lossy(&out.stderr);
    let refused = out.status.code() == Some(23) && err.contains("refusing the session helper");
    rec.bad_inputs(1);
    rec.case(
        "a session helper in a directory a user can write",
        "the agent is configured with --helper pointing into a desktop user's home",
        "the agent refuses to run (exit 23) naming the path: the helper starts as root",
        &format!(
            "exit {:?}: {}; user can write there: {set}",
            out.status.code(),
            err.trim()
        ),
        set && refused,
    );
}

async fn expired_account(rec: &Record) {
    let agent = AgentProc::start(AgentOptions {
        displays: Some(range(8, 2)),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    user.expire();
    let got = agent.client().await.start_session(start(&user.name)).await;
    let xvnc = vncdispatch_tests::procs::xvnc_of(user.uid).len();
    let (code, kind, message) = match &got {
        Ok(_) => ("OK".to_owned(), None, String::new()),
        Err(e) => (
            format!("{:?}", e.code()),
            RefusalKind::from_status(e),
            e.message().to_owned(),
        ),
    };
    rec.case(
        "an expired account (chage -E 0)",
        "an administrator expires the account with chage -E 0; a desktop is asked for it",
        "PermissionDenied, reason ACCOUNT_DENIED, with PAM's message; no Xvnc",
        &format!("{code} {kind:?}: {message}; Xvnc running {xvnc}"),
        code == "PermissionDenied"
            && kind == Some(RefusalKind::AccountDenied)
            && message.contains("expired")
            && xvnc == 0,
    );
}

async fn limits_from_pam(rec: &Record) {
    let agent = AgentProc::start(AgentOptions {
        displays: Some(range(9, 2)),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let _limit = user.limit("nofile", 777);
    let mut client = agent.client().await;
    let got = client.start_session(start(&user.name)).await;
    let line = got
        .as_ref()
        .ok()
        .and_then(|s| std::fs::read_to_string(format!("/proc/{}/limits", s.get_ref().vnc_pid)).ok())
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default();
    let _ = client.stop_session(stop(&user.name)).await;
    rec.case(
        "a limit from /etc/security/limits.d",
        "an administrator sets nofile 777 for the user in /etc/security/limits.d; the user's desktop starts",
        "the Xvnc's /proc/PID/limits shows 777 open files, soft and hard (pam_limits ran in the session stage)",
        &format!(
            "desktop {}; {line}",
            if got.is_ok() { "started" } else { "refused" }
        ),
        line == "Max open files 777 777 files",
    );
}

async fn pam_tightened_while_a_helper_waits(rec: &Record) {
    // The agent's PAM service, a file of this case's own: first what the agent ships.
    let service = format!("vdt-pam-{}", std::process::id());
    let file = std::path::PathBuf::from("/etc/pam.d").join(&service);
    // Removed however the case ends.
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(file.clone());
    let shipped = std::fs::read_to_string("/etc/pam.d/vncdispatch").expect("the shipped PAM file");
    std::fs::write(&file, shipped).expect("PAM file");
    let agent = AgentProc::start(AgentOptions {
        displays: Some(range(12, 2)),
        extra: vec!["--pam-service".into(), service.clone()],
        ..Default::default()
    })
    .await;
    let agent_pid = agent.pid().unwrap_or(0);
    let waiting = vncdispatch_tests::eventually(5, || {
        vncdispatch_tests::procs::waiting_helpers(agent_pid).len() == 1
    })
    .await;
    // The administrator shuts desktops out while that helper waits with the old file loaded.
    std::fs::write(
        &file,
        "account requisite pam_deny.so\nsession required pam_permit.so\n",
    )
    .expect("PAM file");
    let user = TestUser::create();
    let got = agent.client().await.start_session(start(&user.name)).await;
    let xvnc = vncdispatch_tests::procs::xvnc_of(user.uid).len();
    let (code, kind) = match &got {
        Ok(_) => ("OK".to_owned(), None),
        Err(e) => (format!("{:?}", e.code()), RefusalKind::from_status(e)),
    };
    rec.case(
        "PAM tightened while a helper waits",
        "an administrator replaces the agent's PAM service with one denying every account while a session helper waits, started ahead with the old one loaded; then a desktop is asked for",
        "PermissionDenied, reason ACCOUNT_DENIED: the waiting helper is not used, the new rule applies; no Xvnc",
        &format!("a helper waiting before: {waiting}; {code} {kind:?}; Xvnc running {xvnc}"),
        waiting
            && code == "PermissionDenied"
            && kind == Some(RefusalKind::AccountDenied)
            && xvnc == 0,
    );
}
