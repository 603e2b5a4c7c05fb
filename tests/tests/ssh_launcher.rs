//! The dispatcher's SSH launcher against a real OpenSSH sshd: `blade-agent cloudvnc` run over
//! SSH starts a real Xvnc; an unknown or changed host key is refused.
use tonic::Code;
use vncdispatch_proto::v1::{
    AddBladeRequest, DispatchRequest, EndSessionRequest, LaunchMethod, ResolveTokenRequest,
};
use vncdispatch_tests::agent::new_secret;
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
    // The reconnect's liveness check runs `blade-agent status` over SSH.
    let again = c.dispatch(req).await.expect("reconnect").into_inner();
    assert!(again.reused && again.token == s.token);
    c.resolve_token(ResolveTokenRequest {
        token: s.token.clone(),
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
