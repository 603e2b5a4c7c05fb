//! The dispatcher's SSH launcher against a real OpenSSH sshd: `blade-agent cloudvnc` run over
//! SSH starts a real Xvnc; an unknown or changed host key is refused; and every refusal kind
//! of the shared contract leads to the same decision over SSH as over gRPC.
use dispatcher::error::DispatchError;
use dispatcher::launcher::agent::AgentLauncher;
use dispatcher::launcher::ssh::{SshConfig, SshLauncher};
use dispatcher::launcher::{LaunchError, Launched, Launcher, Passwords};
use dispatcher::store::{BladeRecord, Method};
use std::collections::HashSet;
use std::os::unix::fs::symlink;
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic::Code;
use vncdispatch_proto::refusal::{RefusalKind, Scope};
use vncdispatch_proto::v1::{
    AddBladeRequest, DispatchRequest, EndSessionRequest, LaunchMethod, ResolveTokenRequest,
    StartSessionRequest,
};
use vncdispatch_tests::agent::{AgentOptions, AgentProc, new_secret};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::rfb::{self, Login};
use vncdispatch_tests::sshd::Sshd;
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{eventually, procs, require_root_and_tigervnc, workspace_bin};

async fn dispatcher(
    sshd: &Sshd,
    known_hosts: &std::path::Path,
    dir: &std::path::Path,
) -> DispatcherProc {
    let secret = dir.join("agent-secret");
    if !secret.exists() {
        new_secret(&secret);
    }
    let agent_args = format!(
        "--rfb-listen 127.0.0.1 --session-command /usr/bin/twm --display-first 400 --display-count 20 --run-dir {}",
        dir.join("run").display()
    );
    let d = DispatcherProc::start(DispatcherOptions {
        agent_secret: secret,
        extra: vec![
            "--ssh-key".into(),
            sshd.client_key.display().to_string(),
            "--ssh-known-hosts".into(),
            known_hosts.display().to_string(),
            "--ssh-program".into(),
            workspace_bin("blade-agent").display().to_string(),
            format!("--ssh-agent-args={agent_args}"),
        ],
        ..Default::default()
    })
    .await;
    let blade = AddBladeRequest {
        name: "sshblade".into(),
        host: "127.0.0.1".into(),
        port: u32::from(sshd.port),
        method: LaunchMethod::Ssh as i32,
        ..Default::default()
    };
    d.client().await.add_blade(blade).await.expect("AddBlade");
    d
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_launcher_starts_checks_and_stops_a_real_desktop() {
    require_root_and_tigervnc();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dispatcher(&sshd, &sshd.known_hosts, dir.path()).await;
    let user = TestUser::create();
    let mut c = d.client().await;
    let req = DispatchRequest {
        username: user.name.clone(),
        remote_ip: "192.0.2.3".into(),
        ..Default::default()
    };
    let s = match c.dispatch(req.clone()).await {
        Ok(s) => s.into_inner(),
        Err(e) => panic!(
            "{e:?}\ndispatcher log:\n{}\nsshd log:\n{}",
            d.log(),
            sshd.log()
        ),
    };
    assert_eq!(
        (s.blade.as_str(), s.host.as_str()),
        ("sshblade", "127.0.0.1")
    );
    assert!(s.display >= 400);
    assert_eq!(
        procs::xvnc_of(user.uid)
            .iter()
            .map(|p| p.pid)
            .collect::<Vec<_>>(),
        vec![s.vnc_pid]
    );
    let addr = format!("127.0.0.1:{}", s.port);
    assert!(matches!(
        rfb::login(&addr, &s.password).await.expect("login"),
        Login::Accepted(_)
    ));
    // cloudvnc read the view-only password from its second stdin line: ~/.vncpasswd holds
    // the password, then the view-only one (`vncpasswd -f`'s 16-byte format).
    let rfbauth = std::fs::read(user.home.join(".vncpasswd")).expect("~/.vncpasswd");
    assert_eq!(rfbauth.len(), 16, "no view-only password written");
    assert_eq!(
        rfbauth[..8],
        vncdispatch_proto::vncauth::obfuscate(s.password.as_bytes())
    );
    assert_ne!(rfbauth[8..], rfbauth[..8]);
    // The reconnect's liveness check runs `blade-agent status` over SSH.
    let again = c.dispatch(req).await.expect("reconnect").into_inner();
    assert!(again.reused && again.token == s.token);
    c.resolve_token(ResolveTokenRequest {
        token: s.token.clone(),
        attached: false,
    })
    .await
    .expect("resolve");
    assert!(
        c.end_session(EndSessionRequest {
            username: user.name.clone()
        })
        .await
        .expect("end")
        .into_inner()
        .ended
    );
    assert!(
        eventually(10, || procs::xvnc_of(user.uid).is_empty()).await,
        "stop over SSH left Xvnc running"
    );
    for p in procs::all() {
        assert!(
            !procs::contains(&p.cmdline, s.password.as_bytes()),
            "password in argv of {}",
            p.comm
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_launcher_refuses_a_wrong_host_key() {
    require_root_and_tigervnc();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dispatcher(&sshd, &sshd.wrong_known_hosts, dir.path()).await;
    let user = TestUser::create();
    let req = DispatchRequest {
        username: user.name.clone(),
        remote_ip: "192.0.2.3".into(),
        ..Default::default()
    };
    let err = d.client().await.dispatch(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("does NOT match"),
        "{}",
        err.message()
    );
    assert!(procs::xvnc_of(user.uid).is_empty());
    assert!(
        !sshd.log().contains("Accepted publickey"),
        "authenticated to a server with the wrong key"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_launcher_refuses_an_unknown_host() {
    require_root_and_tigervnc();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().expect("dir");
    // The blade's real key, but listed for other hosts only: no entry for 127.0.0.1:PORT.
    let real = std::fs::read_to_string(&sshd.known_hosts).expect("known_hosts");
    let key = real.split_once(' ').expect("HOST KEY line").1;
    let unknown = dir.path().join("unknown_known_hosts");
    std::fs::write(
        &unknown,
        format!("[127.0.0.1]:{} {key}otherblade {key}", sshd.port + 1),
    )
    .expect("write known_hosts");
    let d = dispatcher(&sshd, &unknown, dir.path()).await;
    let user = TestUser::create();
    let req = DispatchRequest {
        username: user.name.clone(),
        remote_ip: "192.0.2.3".into(),
        ..Default::default()
    };
    let err = d.client().await.dispatch(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("is not in") && err.message().contains("ssh-keyscan"),
        "not refused as an unknown host: {}",
        err.message()
    );
    assert!(procs::xvnc_of(user.uid).is_empty());
    assert!(
        !sshd.log().contains("Accepted publickey"),
        "authenticated to a host that is not in known_hosts"
    );
    assert!(
        !user.home.join(".vncpasswd").exists(),
        "a refused host ran the agent"
    );
}

/// One way to make the agent refuse, set up the same for `serve` (gRPC) and `cloudvnc` (SSH).
struct Case {
    kind: RefusalKind,
    username: String,
    password: &'static str,
    /// Desktop options beyond the ones every test agent gets.
    args: Vec<String>,
    /// (first, count) of the display range; the agent's own fresh range when None.
    displays: Option<(u32, u32)>,
}

/// What the dispatcher makes of a launcher's answer: refuse or try the next blade, and the
/// status code its caller would see.
fn decision(r: Result<Launched, LaunchError>) -> (Scope, Code, String) {
    let e = match r {
        Ok(l) => panic!("started a desktop: {l:?}"),
        Err(e) => e,
    };
    let scope = match &e {
        LaunchError::Refused(_) => Scope::Request,
        LaunchError::Blade(_) | LaunchError::Full(_) => Scope::Blade,
    };
    let status = tonic::Status::from(DispatchError::from(e));
    (scope, status.code(), status.message().to_owned())
}

fn blade(name: &str, port: u16, method: Method) -> BladeRecord {
    BladeRecord {
        name: name.into(),
        host: "127.0.0.1".into(),
        port,
        method,
        draining: false,
        pool: "default".into(),
        max_sessions: 0,
    }
}

/// `blade-agent cloudvnc` run here, as the SSH launcher runs it there: its exit code.
fn cloudvnc_exit(args: &[String], user: &str, password: &str) -> i32 {
    let mut child = Command::new(workspace_bin("blade-agent"))
        .args(["cloudvnc", "--user", user])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cloudvnc");
    std::io::Write::write_all(
        &mut child.stdin.take().expect("stdin"),
        format!("{password}\n").as_bytes(),
    )
    .expect("password");
    child.wait().expect("cloudvnc").code().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_kind_gets_the_same_decision_over_grpc_and_ssh() {
    require_root_and_tigervnc();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let user = TestUser::create();
    let unsafe_user = TestUser::create();
    let expired = TestUser::create();
    expired.expire();
    let target = dir.path().join("not-the-users");
    std::fs::write(&target, b"keep me\n").expect("write");
    symlink(&target, unsafe_user.home.join(".vncpasswd")).expect("symlink");
    let slow_xvnc = vncdispatch_tests::user_script(dir.path(), "slow-xvnc", "exec sleep 30");
    // A range of one display whose RFB port (5900 + display) this test holds: none is free.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let full_display = u32::from(taken.local_addr().expect("addr").port()) - 5900;
    let case = |kind, username: &str, password, args: &[&str]| Case {
        kind,
        username: username.to_owned(),
        password,
        args: args.iter().map(|a| a.to_string()).collect(),
        displays: None,
    };
    let cases = vec![
        // The dispatcher never sends a bad password; a broken caller could.
        case(RefusalKind::InvalidRequest, &user.name, "x", &[]),
        case(
            RefusalKind::UnknownAccount,
            "nosuchuserhere",
            "secret12",
            &[],
        ),
        case(RefusalKind::SystemAccount, "daemon", "secret12", &[]),
        case(RefusalKind::UnsafeHome, &unsafe_user.name, "secret12", &[]),
        case(RefusalKind::AccountDenied, &expired.name, "secret12", &[]),
        Case {
            displays: Some((full_display, 1)),
            ..case(RefusalKind::NoFreeDisplay, &user.name, "secret12", &[])
        },
        case(
            RefusalKind::StartTimeout,
            &user.name,
            "secret12",
            &["--xvnc", &slow_xvnc, "--start-timeout", "300ms"],
        ),
        case(
            RefusalKind::StartFailed,
            &user.name,
            "secret12",
            &["--xvnc", "/bin/false"],
        ),
        case(
            RefusalKind::AgentFailed,
            &user.name,
            "secret12",
            // Root's and runnable, but no helper: it answers nothing.
            &["--helper", "/bin/false"],
        ),
    ];
    let covered: HashSet<RefusalKind> = cases.iter().map(|c| c.kind).collect();
    assert_eq!(
        covered,
        RefusalKind::ALL.into_iter().collect(),
        "every kind needs a case"
    );
    for c in &cases {
        let agent = AgentProc::start(AgentOptions {
            extra: c.args.clone(),
            displays: c.displays,
            ..Default::default()
        })
        .await;
        let (first, count) = c.displays.unwrap_or((agent.display_first, 16));
        let run_dir = dir.path().join(format!("run-{:?}", c.kind));
        let mut args: Vec<String> = [
            "--rfb-listen",
            "127.0.0.1",
            "--session-command",
            "/usr/bin/twm",
            "--display-first",
            &first.to_string(),
            "--display-count",
            &count.to_string(),
            "--run-dir",
            &run_dir.display().to_string(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(c.args.iter().cloned());

        // The agent's own answers: the kind in the gRPC detail, the kind's exit code.
        let direct = agent
            .client()
            .await
            .start_session(StartSessionRequest {
                username: c.username.clone(),
                password: c.password.into(),
                view_only_password: String::new(),
                geometry: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            RefusalKind::from_status(&direct),
            Some(c.kind),
            "gRPC: {direct:?}"
        );
        assert_eq!(direct.code(), c.kind.code());
        assert_eq!(
            cloudvnc_exit(&args, &c.username, c.password),
            i32::from(c.kind.exit_code()),
            "cloudvnc exit code for {:?}",
            c.kind
        );

        // What each launcher makes of it.
        let passwords = Passwords {
            full: c.password.to_owned(),
            view_only: "v1ewonly".to_owned(),
        };
        let auth = agent.secret.client_auth().expect("ascii secret");
        let grpc = AgentLauncher::new(auth, Duration::from_secs(20), None, false)
            .start(
                &blade("grpcblade", agent.addr.port(), Method::Agent),
                &c.username,
                &passwords,
                "refusal-test",
            )
            .await;
        let ssh = SshLauncher::new(SshConfig {
            user: "root".into(),
            key: sshd.client_key.clone(),
            known_hosts: sshd.known_hosts.clone(),
            remote_program: workspace_bin("blade-agent").display().to_string(),
            remote_args: args,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
        })
        .expect("SSH launcher")
        .start(
            &blade("sshblade", sshd.port, Method::Ssh),
            &c.username,
            &passwords,
            "refusal-test",
        )
        .await;
        let (grpc, ssh) = (decision(grpc), decision(ssh));
        // A blade without a free display is capacity (RESOURCE_EXHAUSTED once every blade
        // says so); any other blade failure leaves the caller UNAVAILABLE.
        let expected_code = match c.kind.scope() {
            Scope::Request => c.kind.code(),
            Scope::Blade if c.kind == RefusalKind::NoFreeDisplay => Code::ResourceExhausted,
            Scope::Blade => Code::Unavailable,
        };
        assert_eq!(
            (grpc.0, grpc.1),
            (c.kind.scope(), expected_code),
            "{:?} over gRPC: {}",
            c.kind,
            grpc.2
        );
        assert_eq!(
            (ssh.0, ssh.1),
            (c.kind.scope(), expected_code),
            "{:?} over SSH: {}\nsshd log:\n{}",
            c.kind,
            ssh.2,
            sshd.log()
        );
        if c.kind.scope() == Scope::Request {
            // A refusal reaches the caller with the agent's own message either way.
            assert!(
                ssh.2.ends_with(&grpc.2),
                "{:?}: {} / {}",
                c.kind,
                grpc.2,
                ssh.2
            );
        }
    }
    drop(taken);
    assert_eq!(std::fs::read(&target).expect("read"), b"keep me\n");
    assert!(procs::xvnc_of(user.uid).is_empty() && procs::xvnc_of(unsafe_user.uid).is_empty());
}
