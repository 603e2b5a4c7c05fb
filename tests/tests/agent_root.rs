//! The root agent against a local desktop user who sets traps in the shared /tmp (issue 13,
//! findings 1 and 2): a user-owned `/tmp/.X11-unix` swapped for a symlink to a root-owned file
//! while desktops start, and X lock files that are a FIFO or a symlink to /dev/zero.
//!
//! A binary of its own, its tests one at a time: the first one takes /tmp/.X11-unix away from
//! root for a while, which no other desktop on this machine should see.
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vncdispatch_proto::v1::{AgentHealthRequest, StartSessionRequest, StopSessionRequest};
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::require_root_and_tigervnc;
use vncdispatch_tests::users::TestUser;

/// One test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `sh -c script` as `user`, in the background.
fn as_user(user: &TestUser, script: &str) -> std::process::Child {
    let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(user.uid))
        .ok()
        .flatten()
        .map(|u| u.gid.as_raw())
        .expect("user's gid");
    Command::new("/bin/sh")
        .args(["-c", script])
        .uid(user.uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn as user")
}

fn start(user: &str) -> StartSessionRequest {
    StartSessionRequest {
        username: user.into(),
        password: "trapped1".into(),
        geometry: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_swapped_x11_unix_never_makes_root_chown_or_chmod_another_file() {
    require_root_and_tigervnc();
    let _serial = SERIAL.lock().await;
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
    let agent = AgentProc::start(AgentOptions::default()).await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let mut started = 0;
    for _ in 0..50 {
        if client.start_session(start(&user.name)).await.is_ok() {
            started += 1;
        }
        let _ = client
            .stop_session(StopSessionRequest {
                username: user.name.clone(),
            })
            .await;
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
    // Leave /tmp/.X11-unix as the agent keeps it, for whatever runs next.
    let _ = std::fs::remove_file("/tmp/.X11-unix");
    let _ = client.start_session(start(&user.name)).await;
    assert!(started > 0, "no desktop started while the attacker raced");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777, text.as_str()),
        (0, 0, 0o600, "root's\n"),
        "the root-owned file was changed through the swapped /tmp/.X11-unix"
    );
    let dir = std::fs::symlink_metadata("/tmp/.X11-unix").expect("X11-unix");
    assert!(
        dir.is_dir() && dir.uid() == 0 && dir.mode() & 0o7777 == 0o1777,
        "the agent did not leave /tmp/.X11-unix root's with 1777"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifo_and_dev_zero_lock_files_neither_hang_nor_bloat_the_agent() {
    require_root_and_tigervnc();
    let _serial = SERIAL.lock().await;
    let first = 600 + std::process::id() % 50 * 3;
    let attacker = TestUser::create();
    let (fifo, zero) = (
        format!("/tmp/.X{first}-lock"),
        format!("/tmp/.X{}-lock", first + 1),
    );
    let mut trap = as_user(
        &attacker,
        &format!("mkfifo {fifo} && ln -s /dev/zero {zero}"),
    );
    assert!(
        trap.wait().expect("traps").success(),
        "could not set the traps"
    );
    let agent = AgentProc::start(AgentOptions {
        displays: Some((first, 3)),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let asked = Instant::now();
    let server = tokio::time::timeout(
        Duration::from_secs(20),
        client.start_session(start(&user.name)),
    )
    .await
    .expect("StartSession hung on a trapped lock file")
    .expect("StartSession")
    .into_inner();
    assert_eq!(
        server.display,
        first + 2,
        "the desktop should skip both trapped displays"
    );
    let health_took = {
        let t = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(1),
            client.health(AgentHealthRequest::default()),
        )
        .await
        .expect("Health took over 1 s")
        .expect("Health");
        t.elapsed()
    };
    let pid = agent.pid().expect("agent pid");
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    for p in [&fifo, &zero] {
        let _ = std::fs::remove_file(p);
    }
    assert!(
        rss_kib < 200 * 1024,
        "agent RSS {rss_kib} KiB after the traps ({:?} to start, {health_took:?} health)",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_planted_as_the_password_file_is_refused_at_once() {
    require_root_and_tigervnc();
    let _serial = SERIAL.lock().await;
    let agent = AgentProc::start(AgentOptions::default()).await;
    let user = TestUser::create();
    let fifo = user.home.join(".vncpasswd");
    let mut trap = as_user(&user, &format!("mkfifo {}", fifo.display()));
    assert!(trap.wait().expect("mkfifo").success());
    let asked = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(8),
        agent.client().await.start_session(start(&user.name)),
    )
    .await
    .expect("StartSession waited on the FIFO");
    let took = asked.elapsed();
    let status = got.expect_err("a FIFO password file was accepted");
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{status:?} after {took:?}"
    );
    assert!(
        vncdispatch_tests::procs::xvnc_of(user.uid).is_empty(),
        "a desktop started"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_helper_that_floods_its_answer_is_cut_off_with_the_agent_memory_flat() {
    require_root_and_tigervnc();
    let _serial = SERIAL.lock().await;
    // What a user who ptraces their own helper could make it say: 100 MiB, no newline.
    let dir = tempfile::tempdir().expect("dir");
    let helper = dir.path().join("flooding-helper");
    std::fs::write(
        &helper,
        "#!/bin/sh\ncat >/dev/null\nhead -c 104857600 /dev/zero | tr '\\0' A\n",
    )
    .expect("helper");
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let agent = AgentProc::start(AgentOptions {
        extra: vec!["--helper".into(), helper.display().to_string()],
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        agent.client().await.start_session(start(&user.name)),
    )
    .await
    .expect("StartSession hung on a flooding helper");
    let err = got.expect_err("a flood was taken for an answer");
    // The helper ran and its answer was cut off, not refused before it ran.
    assert!(err.message().contains("unexpected answer"), "{err:?}");
    let pid = agent.pid().expect("agent pid");
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(u64::MAX);
    assert!(
        rss_kib < 64 * 1024,
        "agent peak RSS {rss_kib} KiB during the flood (VmHWM: a flood read whole and freed leaves RSS low)"
    );
}
