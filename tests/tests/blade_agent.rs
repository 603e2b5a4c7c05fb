//! blade-agent against the real TigerVNC: each test starts a real `blade-agent serve`, creates
//! a real user, and checks what a VNC client, /proc and the file system see.
use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, symlink};
use std::process::{Command, Stdio};
use tonic::Code;
use vncdispatch_proto::refusal::RefusalKind;
use vncdispatch_proto::v1::blade_agent_client::BladeAgentClient;
use vncdispatch_proto::v1::{
    AgentHealthRequest, Geometry, ListVncServersRequest, StartSessionRequest, StopSessionRequest,
    VncServer,
};
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::rfb::{self, Login};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{eventually, procs, require_root_and_tigervnc, workspace_bin};

fn start_req(user: &str, password: &str) -> StartSessionRequest {
    StartSessionRequest {
        username: user.into(),
        password: password.into(),
        view_only_password: String::new(),
        geometry: None,
    }
}

/// A start with a view-only password too.
fn start_req_view(user: &str, password: &str, view_only: &str) -> StartSessionRequest {
    StartSessionRequest {
        view_only_password: view_only.into(),
        ..start_req(user, password)
    }
}

/// What `vncpasswd -f` writes for these passwords: each obfuscated, 8 bytes apiece.
fn rfbauth(passwords: &[&str]) -> Vec<u8> {
    passwords
        .iter()
        .flat_map(|p| vncdispatch_proto::vncauth::obfuscate(p.as_bytes()))
        .collect()
}

/// The password file an Xvnc checks: its `-rfbauth` argument (`~/.vncpasswd` on the fast
/// path), or `-PasswordFile` (vncserver's private copy, in wrapper mode).
fn rfbauth_of(pid: u32) -> std::path::PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("Xvnc cmdline");
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-rfbauth" || arg == b"-PasswordFile" {
            let path = args.next().expect("-rfbauth value");
            return std::path::PathBuf::from(String::from_utf8_lossy(path).into_owned());
        }
    }
    panic!(
        "Xvnc {pid} has no -rfbauth or -PasswordFile: {}",
        String::from_utf8_lossy(&cmdline)
    );
}

/// Whether a VNC-authentication login with `password` gets in.
async fn logs_in(addr: &str, password: &str) -> bool {
    match rfb::login(addr, password).await.expect("RFB login") {
        Login::Accepted(_) => true,
        Login::Refused(_) => false,
    }
}

/// A VNC-authentication login through ServerInit that stays open, asking for an exclusive
/// (non-shared) session when `shared` is false.
async fn hold_login(addr: &str, password: &str, shared: bool) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf[..12]).await.expect("ProtocolVersion");
    s.write_all(b"RFB 003.008\n").await.expect("version");
    let n = s.read_u8().await.expect("security types");
    let mut types = vec![0u8; usize::from(n)];
    s.read_exact(&mut types).await.expect("types");
    assert!(types.contains(&2), "no VNC auth in {types:?}");
    s.write_u8(2).await.expect("choose VNC auth");
    s.read_exact(&mut buf).await.expect("challenge");
    let response = vncdispatch_proto::vncauth::challenge_response(password.as_bytes(), &buf);
    s.write_all(&response).await.expect("response");
    assert_eq!(
        s.read_u32().await.expect("SecurityResult"),
        0,
        "login refused"
    );
    s.write_u8(u8::from(shared)).await.expect("ClientInit");
    let mut init = [0u8; 24];
    s.read_exact(&mut init).await.expect("ServerInit");
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    let mut name = vec![0u8; name_len.min(4096) as usize];
    s.read_exact(&mut name).await.expect("desktop name");
    s
}

/// Whether the server still serves a held connection: what earlier requests brought is
/// drained without meeting the end of the stream, and a FramebufferUpdateRequest gets an
/// answer.
async fn still_served(s: &mut tokio::net::TcpStream) -> bool {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return false,
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    let request = [3u8, 0, 0, 0, 0, 0, 0, 16, 0, 16];
    if s.write_all(&request).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    )
}

async fn agent() -> AgentProc {
    require_root_and_tigervnc();
    AgentProc::start(AgentOptions::default()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn rfb_login_succeeds_with_the_right_password_only() {
    let agent = agent().await;
    let user = TestUser::create();
    let geometry = Some(Geometry {
        width: 1024,
        height: 768,
    });
    let req = StartSessionRequest {
        username: user.name.clone(),
        password: "Corr3ct!".into(),
        view_only_password: String::new(),
        geometry,
    };
    let server = agent
        .client()
        .await
        .start_session(req)
        .await
        .expect("StartSession")
        .into_inner();
    assert_eq!(server.username, user.name);
    assert_eq!(server.host, "127.0.0.1");
    assert_eq!(server.port, 5900 + server.display);
    assert!(!server.reused);
    let addr = format!("{}:{}", server.host, server.port);
    match rfb::login(&addr, "Corr3ct!").await.expect("RFB login") {
        Login::Accepted(init) => {
            assert_eq!((init.width, init.height), (1024, 768));
            assert!(
                init.name.contains(&user.name),
                "desktop name {:?}",
                init.name
            );
        }
        Login::Refused(why) => panic!("right password refused: {why}"),
    }
    assert!(matches!(
        rfb::login(&addr, "Wrong123").await.expect("RFB login"),
        Login::Refused(_)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn vncpasswd_file_matches_vncpasswd_f_and_a_new_password_takes_effect() {
    let agent = agent().await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let mut pid = None;
    for password in ["abcdef", "12345678", "p a s s", "Zz9!~`'\"", "$(id);x"] {
        let server = client
            .start_session(start_req(&user.name, password))
            .await
            .expect("start")
            .into_inner();
        // The same server throughout: a second StartSession rewrites the password only.
        assert_eq!(*pid.get_or_insert(server.vnc_pid), server.vnc_pid);
        let path = user.home.join(".vncpasswd");
        let written = std::fs::read(&path).expect("~/.vncpasswd");
        let mut vncpasswd = Command::new("vncpasswd")
            .arg("-f")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run vncpasswd -f");
        std::io::Write::write_all(
            &mut vncpasswd.stdin.take().expect("stdin"),
            password.as_bytes(),
        )
        .expect("write");
        let expected = vncpasswd
            .wait_with_output()
            .expect("vncpasswd output")
            .stdout;
        assert_eq!(written, expected, "password {password:?}");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o600));
        let addr = format!("{}:{}", server.host, server.port);
        assert!(
            matches!(
                rfb::login(&addr, password).await.expect("login"),
                Login::Accepted(_)
            ),
            "{password:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinked_vncpasswd_is_refused_and_its_target_untouched() {
    let agent = agent().await;
    let user = TestUser::create();
    let target = tempfile::NamedTempFile::new().expect("root-owned file");
    std::fs::write(target.path(), b"root's precious file\n").expect("write");
    symlink(target.path(), user.home.join(".vncpasswd")).expect("symlink");
    let err = agent
        .client()
        .await
        .start_session(start_req(&user.name, "secret1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        RefusalKind::from_status(&err),
        Some(RefusalKind::UnsafeHome)
    );
    assert!(
        err.message().contains(".vncpasswd is a symlink"),
        "{}",
        err.message()
    );
    assert_eq!(
        std::fs::read(target.path()).expect("read"),
        b"root's precious file\n"
    );
    assert!(procs::xvnc_of(user.uid).is_empty(), "an Xvnc was started");
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinked_vnc_dir_is_refused() {
    let agent = agent().await;
    let user = TestUser::create();
    let elsewhere = tempfile::tempdir().expect("dir");
    symlink(elsewhere.path(), user.home.join(".vnc")).expect("symlink");
    let err = agent
        .client()
        .await
        .start_session(start_req(&user.name, "secret1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        std::fs::read_dir(elsewhere.path())
            .expect("ls")
            .next()
            .is_none(),
        "wrote through the symlink"
    );
    assert!(procs::xvnc_of(user.uid).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_usernames_and_passwords_are_refused_and_start_nothing() {
    let agent = agent().await;
    let mut client = agent.client().await;
    let long = "a".repeat(300);
    let (invalid, system) = (RefusalKind::InvalidRequest, RefusalKind::SystemAccount);
    let cases: &[(&str, &str, Code, RefusalKind)] = &[
        ("root", "secret1", Code::InvalidArgument, system),
        ("daemon", "secret1", Code::InvalidArgument, system),
        ("nobody", "secret1", Code::InvalidArgument, system),
        ("../x", "secret1", Code::InvalidArgument, invalid),
        ("a;id", "secret1", Code::InvalidArgument, invalid),
        ("a;rm -rf /", "secret1", Code::InvalidArgument, invalid),
        ("", "secret1", Code::InvalidArgument, invalid),
        ("-rf", "secret1", Code::InvalidArgument, invalid),
        ("a\nb", "secret1", Code::InvalidArgument, invalid),
        (&long, "secret1", Code::InvalidArgument, invalid),
        (
            "nosuchuserhere",
            "secret1",
            Code::NotFound,
            RefusalKind::UnknownAccount,
        ),
    ];
    for (name, password, code, kind) in cases {
        let err = client
            .start_session(start_req(name, password))
            .await
            .unwrap_err();
        assert_eq!(err.code(), *code, "{name:?}: {}", err.message());
        assert_eq!(RefusalKind::from_status(&err), Some(*kind), "{name:?}");
        assert!(!err.message().is_empty());
        let err = client
            .stop_session(StopSessionRequest {
                username: name.to_string(),
                vnc_pid: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), *code, "stop {name:?}: {}", err.message());
        assert_eq!(RefusalKind::from_status(&err), Some(*kind), "stop {name:?}");
    }
    let user = TestUser::create();
    for bad in ["", "short", "ninechars", "nul\0byte"] {
        let err = client
            .start_session(start_req(&user.name, bad))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            !err.message().contains(bad) || bad.is_empty() || bad == "short",
            "{}",
            err.message()
        );
    }
    let geometry = Some(Geometry {
        width: 100_000,
        height: 10,
    });
    let req = StartSessionRequest {
        username: user.name.clone(),
        password: "secret1".into(),
        view_only_password: String::new(),
        geometry,
    };
    assert_eq!(
        client.start_session(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert!(
        !user.home.join(".vncpasswd").exists(),
        "a refused call wrote the password file"
    );
    let system_xvnc = procs::all()
        .into_iter()
        .filter(|p| p.comm == "Xtigervnc" && p.uid < 1000)
        .count();
    assert_eq!(system_xvnc, 0, "an Xvnc runs as a system account");
    assert!(
        procs::xvnc_of(user.uid).is_empty(),
        "bad input started an Xvnc"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn xvnc_runs_as_the_user_and_no_process_holds_the_password() {
    let agent = agent().await;
    let user = TestUser::create();
    let password = "S3cr#t!x";
    let server = agent
        .client()
        .await
        .start_session(start_req(&user.name, password))
        .await
        .expect("start")
        .into_inner();
    let xvnc = procs::all()
        .into_iter()
        .find(|p| p.pid == server.vnc_pid)
        .expect("Xvnc process");
    assert_eq!(xvnc.comm, "Xtigervnc");
    assert_eq!(xvnc.uid, user.uid);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", server.vnc_pid)).expect("status");
    let ids = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>())
    };
    assert!(
        ids("Uid:")
            .expect("Uid")
            .iter()
            .all(|u| *u == user.uid.to_string()),
        "{status}"
    );
    assert!(
        !ids("Groups:").unwrap_or_default().contains(&"0"),
        "Xvnc kept root's group"
    );
    let mut checked = 0;
    for p in procs::all() {
        checked += 1;
        for (what, bytes) in [("cmdline", &p.cmdline), ("environ", &p.environ)] {
            assert!(
                !procs::contains(bytes, password.as_bytes()),
                "password in {what} of {} ({})",
                p.pid,
                p.comm
            );
        }
    }
    assert!(checked > 3);
    let log = agent.log();
    assert!(!log.contains(password), "password in the agent's log");
    // The session command (twm) runs as the user with the display and a private X cookie.
    assert!(
        eventually(10, || procs::of_uid(user.uid)
            .iter()
            .any(|p| p.comm == "twm"))
        .await,
        "session command not running"
    );
    // /proc/PID/environ reads empty for a moment around exec, so look until it is there.
    let display = format!("DISPLAY=:{}\0", server.display);
    let session_env_ok = || {
        procs::of_uid(user.uid).iter().any(|p| {
            p.comm == "twm"
                && procs::contains(&p.environ, display.as_bytes())
                && procs::contains(&p.environ, b"XAUTHORITY=")
        })
    };
    assert!(
        eventually(10, session_env_ok).await,
        "twm runs without {display:?} and XAUTHORITY"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_concurrent_starts_for_one_user_yield_one_xvnc() {
    let agent = agent().await;
    let user = TestUser::create();
    let client = agent.client().await;
    let calls = (0..20).map(|_| {
        let mut c = client.clone();
        let name = user.name.clone();
        tokio::spawn(async move { c.start_session(start_req(&name, "same-pw1")).await })
    });
    let mut pids = HashSet::new();
    let mut fresh = 0;
    for call in calls {
        let server = call
            .await
            .expect("task")
            .expect("StartSession")
            .into_inner();
        pids.insert((server.vnc_pid, server.display));
        fresh += usize::from(!server.reused);
    }
    assert_eq!(pids.len(), 1, "different servers: {pids:?}");
    assert_eq!(fresh, 1, "exactly one call starts the server");
    assert_eq!(procs::xvnc_of(user.uid).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_ends_xvnc_and_the_session() {
    let agent = agent().await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let server = client
        .start_session(start_req(&user.name, "secret1"))
        .await
        .expect("start")
        .into_inner();
    assert!(
        eventually(10, || procs::of_uid(user.uid)
            .iter()
            .any(|p| p.comm == "twm"))
        .await
    );
    // A stop that names another Xvnc (a stale record's) leaves this desktop alone.
    let stale = client
        .stop_session(StopSessionRequest {
            username: user.name.clone(),
            vnc_pid: server.vnc_pid + 1,
        })
        .await
        .expect("stop");
    assert!(!stale.into_inner().stopped, "stopped another pid's desktop");
    assert_eq!(procs::xvnc_of(user.uid).len(), 1);
    let stop = client
        .stop_session(StopSessionRequest {
            username: user.name.clone(),
            vnc_pid: server.vnc_pid,
        })
        .await
        .expect("stop");
    assert!(stop.into_inner().stopped);
    assert!(
        eventually(10, || procs::of_uid(user.uid).is_empty()).await,
        "left running: {:?}",
        procs::of_uid(user.uid)
            .iter()
            .map(|p| &p.comm)
            .collect::<Vec<_>>()
    );
    let list = client
        .list_sessions(ListVncServersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(list.servers.iter().all(|s| s.vnc_pid != server.vnc_pid));
    let again = client
        .stop_session(StopSessionRequest {
            username: user.name.clone(),
            vnc_pid: 0,
        })
        .await
        .expect("stop");
    assert!(!again.into_inner().stopped, "nothing left to stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_xvnc_vanishes_from_the_list_and_a_new_start_replaces_it() {
    let agent = agent().await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    let first = client
        .start_session(start_req(&user.name, "secret1"))
        .await
        .expect("start")
        .into_inner();
    let listed = client
        .list_sessions(ListVncServersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed
            .servers
            .iter()
            .any(|s| s.vnc_pid == first.vnc_pid && s.username == user.name)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.vnc_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill Xvnc");
    assert!(eventually(5, || procs::xvnc_of(user.uid).is_empty()).await);
    let listed = client
        .list_sessions(ListVncServersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.servers.iter().all(|s| s.username != user.name),
        "{listed:?}"
    );
    let second = client
        .start_session(start_req(&user.name, "secret2"))
        .await
        .expect("restart")
        .into_inner();
    assert_ne!(second.vnc_pid, first.vnc_pid);
    assert!(!second.reused);
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_agent_readopts_running_desktops() {
    let mut agent = agent().await;
    let user = TestUser::create();
    let first = agent
        .client()
        .await
        .start_session(start_req(&user.name, "secret1"))
        .await
        .expect("start")
        .into_inner();
    agent.restart().await;
    let mut client = agent.client().await;
    let listed = client
        .list_sessions(ListVncServersRequest::default())
        .await
        .expect("list")
        .into_inner();
    let found = listed
        .servers
        .iter()
        .find(|s| s.username == user.name)
        .expect("re-adopted");
    assert_eq!(
        (found.vnc_pid, found.display, found.port),
        (first.vnc_pid, first.display, first.port)
    );
    let again = client
        .start_session(start_req(&user.name, "secret2"))
        .await
        .expect("start")
        .into_inner();
    assert!(again.reused);
    assert_eq!(again.vnc_pid, first.vnc_pid);
    assert_eq!(procs::xvnc_of(user.uid).len(), 1);
    let addr = format!("{}:{}", again.host, again.port);
    assert!(matches!(
        rfb::login(&addr, "secret2").await.expect("login"),
        Login::Accepted(_)
    ));
    let health = client
        .health(AgentHealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert!(health.sessions >= 1 && health.mem_total_bytes > 0 && health.free_displays < 16);
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_the_secret_are_refused() {
    let agent = agent().await;
    let user = TestUser::create();
    let mut anonymous = BladeAgentClient::new(agent.channel().await);
    let err = anonymous
        .start_session(start_req(&user.name, "secret1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        anonymous
            .list_sessions(ListVncServersRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let forged = agent.channel().await;
    let mut forged = BladeAgentClient::with_interceptor(forged, |mut req: tonic::Request<()>| {
        req.metadata_mut().insert(
            "authorization",
            "Bearer 0000000000000000000000000000000000000000"
                .parse()
                .expect("ascii"),
        );
        Ok(req)
    });
    assert_eq!(
        forged
            .start_session(start_req(&user.name, "secret1"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert!(procs::xvnc_of(user.uid).is_empty());
    assert!(!user.home.join(".vncpasswd").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn wrapper_mode_starts_a_working_desktop_through_vncserver() {
    require_root_and_tigervnc();
    let agent = AgentProc::start(AgentOptions {
        mode: "wrapper",
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let server = agent
        .client()
        .await
        .start_session(start_req(&user.name, "wrapper1"))
        .await
        .expect("start")
        .into_inner();
    let xvnc = procs::xvnc_of(user.uid);
    assert_eq!(xvnc.len(), 1);
    assert_eq!(xvnc[0].pid, server.vnc_pid);
    let addr = format!("{}:{}", server.host, server.port);
    assert!(matches!(
        rfb::login(&addr, "wrapper1").await.expect("login"),
        Login::Accepted(_)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn cloudvnc_prints_host_pid_display_and_fails_clearly() {
    require_root_and_tigervnc();
    let user = TestUser::create();
    let run_dir = tempfile::tempdir().expect("dir");
    let cloudvnc = |name: &str, password: &str| {
        let mut child = Command::new(workspace_bin("blade-agent"))
            .args([
                "cloudvnc",
                "--user",
                name,
                "--rfb-listen",
                "127.0.0.1",
                "--display-first",
                "300",
            ])
            .args(["--session-command", "/usr/bin/twm", "--run-dir"])
            .arg(run_dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cloudvnc");
        std::io::Write::write_all(
            &mut child.stdin.take().expect("stdin"),
            format!("{password}\n").as_bytes(),
        )
        .expect("stdin");
        child.wait_with_output().expect("cloudvnc output")
    };
    let out = cloudvnc(&user.name, "cloudpw1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).expect("utf-8");
    // The original's `HOST PID DISPLAY`, then the desktop's certificate pin.
    let fields: Vec<&str> = line.trim_end().split(' ').collect();
    assert_eq!(fields.len(), 4, "{line:?}");
    assert_eq!(fields[0], "127.0.0.1");
    assert!(
        vncdispatch_proto::vencrypt::CertPin::from_hex(fields[3]).is_ok(),
        "{line:?}"
    );
    let pid: u32 = fields[1].parse().expect("pid");
    let display: u32 = fields[2].parse().expect("display");
    assert!(display >= 300);
    assert_eq!(
        procs::xvnc_of(user.uid)
            .iter()
            .map(|p| p.pid)
            .collect::<Vec<_>>(),
        vec![pid]
    );
    let addr = format!("127.0.0.1:{}", 5900 + display);
    assert!(matches!(
        rfb::login(&addr, "cloudpw1").await.expect("login"),
        Login::Accepted(_)
    ));
    // Run again: the running desktop is found, not duplicated. A new process knows no pin
    // for a desktop an earlier one started (the dispatcher keeps the one it stored).
    // With a second stdin line, the view-only password: ~/.vncpasswd then holds both.
    let out = cloudvnc(&user.name, "cloudpw2\ncloudvw2");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        fields[..3].join(" ")
    );
    assert_eq!(
        std::fs::read(user.home.join(".vncpasswd")).expect("~/.vncpasswd"),
        rfbauth(&["cloudpw2", "cloudvw2"])
    );
    assert!(matches!(
        rfb::login(&addr, "cloudvw2").await.expect("login"),
        Login::Accepted(_)
    ));
    // Failures exit with their refusal kind's code (`cloudvnc --help`), which the SSH
    // launcher acts on; the message is for people.
    for (name, password, needle, kind) in [
        (
            "root",
            "cloudpw1",
            "root and system accounts are refused",
            RefusalKind::SystemAccount,
        ),
        (
            "a;id",
            "cloudpw1",
            "invalid username",
            RefusalKind::InvalidRequest,
        ),
        (&user.name[..], "x", "password", RefusalKind::InvalidRequest),
        (
            &user.name[..],
            "cloudpw3\ncloudpw3",
            "invalid view_only_password: must differ",
            RefusalKind::InvalidRequest,
        ),
        (
            &user.name[..],
            "cloudpw3\nview\nmore",
            "invalid view_only_password",
            RefusalKind::InvalidRequest,
        ),
        (
            "nosuchuserhere",
            "cloudpw1",
            "no account named",
            RefusalKind::UnknownAccount,
        ),
    ] {
        let out = cloudvnc(name, password);
        assert_eq!(
            out.status.code(),
            Some(i32::from(kind.exit_code())),
            "{name}"
        );
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{name}: {err}"
        );
    }
}

/// Logs in over VeNCrypt X509Vnc with the pin the agent reported; Ok when ServerInit came.
async fn vencrypt_login(server: &VncServer, password: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pin = vncdispatch_proto::vencrypt::CertPin::from_hex(&server.cert_sha256)?;
    let tcp = tokio::net::TcpStream::connect((server.host.as_str(), server.port as u16))
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        vncdispatch_proto::vencrypt::login(tcp, password, pin),
    )
    .await
    .map_err(|_| "timed out".to_owned())??;
    tls.write_all(&[1]).await.map_err(|e| e.to_string())?;
    let mut init = [0u8; 24];
    tls.read_exact(&mut init).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn desktops_offer_vencrypt_with_a_fresh_pinned_certificate_per_desktop() {
    for mode in ["fast", "wrapper"] {
        require_root_and_tigervnc();
        let agent = AgentProc::start(AgentOptions {
            mode,
            ..Default::default()
        })
        .await;
        let (a, b) = (TestUser::create(), TestUser::create());
        let mut client = agent.client().await;
        let sa = client
            .start_session(start_req(&a.name, "tlsPass1"))
            .await
            .expect("start a")
            .into_inner();
        let sb = client
            .start_session(start_req(&b.name, "tlsPass2"))
            .await
            .expect("start b")
            .into_inner();
        assert_eq!(sa.cert_sha256.len(), 64, "{mode}: pin {:?}", sa.cert_sha256);
        assert_ne!(
            sa.cert_sha256, sb.cert_sha256,
            "{mode}: desktops share a key"
        );
        vencrypt_login(&sa, "tlsPass1").await.expect("pinned login");
        // Another desktop's pin does not open this one; nor does a wrong password.
        let crossed = VncServer {
            cert_sha256: sb.cert_sha256.clone(),
            ..sa.clone()
        };
        let err = vencrypt_login(&crossed, "tlsPass1")
            .await
            .expect_err("wrong pin");
        assert!(err.contains("pin"), "{mode}: {err}");
        assert!(vencrypt_login(&sa, "wrongPw1").await.is_err(), "{mode}");
        // The key is the user's, private, in ~/.vnc.
        let key = a.home.join(format!(".vnc/x509-{}.key", sa.display));
        let meta = std::fs::metadata(&key).expect("key file");
        assert_eq!((meta.uid(), meta.mode() & 0o777), (a.uid, 0o600), "{mode}");
        // Plain VNC auth still works for browsers connecting without auth-proxy.
        let addr = format!("{}:{}", sa.host, sa.port);
        assert!(matches!(
            rfb::login(&addr, "tlsPass1").await.expect("login"),
            Login::Accepted(_)
        ));
        // A second start returns the running desktop with the same pin.
        let again = client
            .start_session(start_req(&a.name, "tlsPass3"))
            .await
            .expect("again")
            .into_inner();
        assert!(again.reused);
        assert_eq!(again.cert_sha256, sa.cert_sha256, "{mode}");
        vencrypt_login(&again, "tlsPass3")
            .await
            .expect("new password over TLS");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_only_password_logs_in_beside_the_full_one_and_follows_a_reuse() {
    for mode in ["fast", "wrapper"] {
        require_root_and_tigervnc();
        let agent = AgentProc::start(AgentOptions {
            mode,
            ..Default::default()
        })
        .await;
        let user = TestUser::create();
        let mut client = agent.client().await;
        let server = client
            .start_session(start_req_view(&user.name, "Full1234", "View5678"))
            .await
            .expect("start")
            .into_inner();
        assert!(!server.reused);
        let addr = format!("{}:{}", server.host, server.port);
        assert!(logs_in(&addr, "Full1234").await, "{mode}: full password");
        assert!(
            logs_in(&addr, "View5678").await,
            "{mode}: view-only password"
        );
        assert!(!logs_in(&addr, "Wrong123").await, "{mode}: wrong password");
        // ~/.vncpasswd holds both, as `vncpasswd -f` would write them; so does the file Xvnc
        // reads, when that is a copy (wrapper mode).
        let path = user.home.join(".vncpasswd");
        let written = std::fs::read(&path).expect("~/.vncpasswd");
        assert_eq!(written.len(), 16, "{mode}");
        assert_eq!(written, rfbauth(&["Full1234", "View5678"]), "{mode}");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o600));
        let read_by_xvnc = rfbauth_of(server.vnc_pid);
        assert_eq!(
            std::fs::read(&read_by_xvnc).expect("Xvnc's rfbauth"),
            written,
            "{mode}: {}",
            read_by_xvnc.display()
        );

        // Xvnc forces a view-only login to share the desktop: asking for it exclusively does
        // not disconnect the full-control viewer, as a full-control exclusive login does.
        let mut full = hold_login(&addr, "Full1234", true).await;
        let mut viewer = hold_login(&addr, "View5678", false).await;
        assert!(still_served(&mut viewer).await, "{mode}: view-only viewer");
        assert!(
            still_served(&mut full).await,
            "{mode}: an exclusive view-only login disconnected the full viewer"
        );
        let mut exclusive = hold_login(&addr, "Full1234", false).await;
        assert!(still_served(&mut exclusive).await, "{mode}");
        assert!(
            !still_served(&mut full).await,
            "{mode}: an exclusive full login left the others connected (the check above proves nothing)"
        );
        drop((full, viewer, exclusive));

        // A reuse with new passwords rewrites both: the old ones no longer log in.
        let again = client
            .start_session(start_req_view(&user.name, "Full9999", "View0000"))
            .await
            .expect("reuse")
            .into_inner();
        assert!(again.reused && again.vnc_pid == server.vnc_pid, "{mode}");
        assert_eq!(
            std::fs::read(&path).expect("~/.vncpasswd"),
            rfbauth(&["Full9999", "View0000"]),
            "{mode}"
        );
        assert_eq!(
            std::fs::read(&read_by_xvnc).expect("Xvnc's rfbauth"),
            rfbauth(&["Full9999", "View0000"]),
            "{mode}"
        );
        assert!(
            logs_in(&addr, "Full9999").await,
            "{mode}: new full password"
        );
        assert!(logs_in(&addr, "View0000").await, "{mode}: new view-only");
        assert!(!logs_in(&addr, "View5678").await, "{mode}: old view-only");
        assert!(!logs_in(&addr, "Full1234").await, "{mode}: old full");

        // A reuse without one (an older dispatcher) leaves the password alone in the file.
        client
            .start_session(start_req(&user.name, "Only1234"))
            .await
            .expect("reuse without a view-only password");
        assert_eq!(
            std::fs::read(&path).expect("~/.vncpasswd"),
            rfbauth(&["Only1234"]),
            "{mode}"
        );
        assert!(
            !logs_in(&addr, "View0000").await,
            "{mode}: dropped view-only"
        );
        assert!(logs_in(&addr, "Only1234").await, "{mode}");
        let log = agent.log();
        for secret in ["View5678", "View0000"] {
            assert!(
                !log.contains(secret),
                "{mode}: view-only password in the log"
            );
        }
        for p in procs::all() {
            assert!(
                !procs::contains(&p.cmdline, b"View0000"),
                "view-only password in argv of {}",
                p.comm
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn equal_or_bad_view_only_passwords_are_refused_and_start_nothing() {
    let agent = agent().await;
    let user = TestUser::create();
    let mut client = agent.client().await;
    for (view_only, needle) in [
        ("Same1234", "must differ from the password"),
        ("short", "at least 6 bytes"),
        ("ninechars", "at most 8 bytes"),
        ("nul\0byte", "NUL"),
        ("caf\u{e9}12", "printable ASCII"),
    ] {
        let err = client
            .start_session(start_req_view(&user.name, "Same1234", view_only))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{view_only:?}: {err:?}");
        assert_eq!(
            RefusalKind::from_status(&err),
            Some(RefusalKind::InvalidRequest),
            "{view_only:?}"
        );
        assert!(
            err.message().contains("view_only_password") && err.message().contains(needle),
            "{view_only:?}: {}",
            err.message()
        );
        assert!(!err.message().contains("Same1234"), "{}", err.message());
    }
    assert!(
        !user.home.join(".vncpasswd").exists(),
        "a refused call wrote the password file"
    );
    assert!(procs::xvnc_of(user.uid).is_empty(), "an Xvnc was started");
}

/// The session command starts after READY (so that its start does not hold up the answer),
/// but one the user cannot run still fails the start, with the reason, and leaves no Xvnc:
/// a file only root may run, a directory (which `access(X_OK)` alone would pass), and a
/// script whose interpreter is missing.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_command_the_user_cannot_run_fails_the_start_and_leaves_no_xvnc() {
    use std::os::unix::fs::PermissionsExt;
    require_root_and_tigervnc();
    let dir = tempfile::tempdir().unwrap();
    let root_only = vncdispatch_tests::user_script(dir.path(), "root-only-session", "exec twm");
    // Root's alone: the user may read the directory but not run the file.
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o700)).unwrap();
    let a_dir = dir.path().join("a-directory");
    std::fs::create_dir(&a_dir).unwrap();
    std::fs::set_permissions(&a_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let no_interpreter = dir.path().join("no-interpreter");
    std::fs::write(&no_interpreter, "#!/nonexistent/sh\nexec twm\n").unwrap();
    std::fs::set_permissions(&no_interpreter, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (command, why) in [
        (std::path::PathBuf::from(&root_only), "Permission denied"),
        (a_dir, "is not a file"),
        (no_interpreter, "its interpreter /nonexistent/sh"),
    ] {
        let agent = AgentProc::start(AgentOptions {
            session_command: Some(command.clone()),
            ..Default::default()
        })
        .await;
        let user = TestUser::create();
        let err = agent
            .client()
            .await
            .start_session(start_req(&user.name, "sess-pw1"))
            .await
            .expect_err("a session command the user cannot run must fail the start");
        let message = err.message();
        assert!(
            message.contains("cannot run session command")
                && message.contains(&command.display().to_string())
                && message.contains(why),
            "unclear error for {command:?}: {err:?}"
        );
        assert!(
            procs::xvnc_of(user.uid).is_empty(),
            "an Xvnc was left running for {command:?}"
        );
    }
}

/// What only exec can tell (here: the program held open for writing, ETXTBSY) shows after
/// READY, as the session command starts after the answer: the desktop is stopped, and the
/// agent's log says why with the display, not only the user's ~/.vnc log.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_command_that_fails_at_exec_is_logged_by_the_agent_and_its_desktop_stopped() {
    use std::os::unix::fs::PermissionsExt;
    require_root_and_tigervnc();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let busy = dir.path().join("busy-session");
    std::fs::copy("/usr/bin/twm", &busy).unwrap();
    std::fs::set_permissions(&busy, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Open for writing while the desktop starts: exec refuses it ("Text file busy").
    let _writer = std::fs::OpenOptions::new().write(true).open(&busy).unwrap();
    let agent = AgentProc::start(AgentOptions {
        session_command: Some(busy.clone()),
        ..Default::default()
    })
    .await;
    let user = TestUser::create();
    let started = agent
        .client()
        .await
        .start_session(start_req(&user.name, "sess-pw1"))
        .await
        .expect("READY: exec's refusal comes after the answer")
        .into_inner();
    let logged = vncdispatch_tests::eventually(10, || {
        agent.log().lines().any(|l| {
            l.contains("session command did not start")
                && l.contains(&format!("display={}", started.display))
                && l.contains("Text file busy")
        })
    })
    .await;
    assert!(logged, "no warning in the agent's log:\n{}", agent.log());
    assert!(
        vncdispatch_tests::eventually(5, || procs::xvnc_of(user.uid).is_empty()).await,
        "the desktop whose session could not start is still running"
    );
}
