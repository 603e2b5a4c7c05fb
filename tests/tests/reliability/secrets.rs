//! Secrets: every path a secret travels is taken, and proven taken — Dispatch and a reconnect,
//! a browser through ws-proxy's auth proxy all the way to the desktop, ResolveToken, the
//! operator's CLI — against a dispatcher that requires an API secret; then the issued tokens
//! and passwords and the agent and API secrets are searched for in every process's argv and
//! environment, every service's log and stdout, each desktop's Xvnc log and the CLI's output.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use vncdispatch_proto::v1::{EndSessionRequest, ResolveTokenRequest};
use vncdispatch_tests::reliability::attack::cli;
use vncdispatch_tests::reliability::stdout::{service_pid, stdout_file, with_stdout_to};
use vncdispatch_tests::reliability::ws::{rfb_through_auth_proxy, ws_from};
use vncdispatch_tests::reliability::{Log, Record};
use vncdispatch_tests::require_root_and_tigervnc;
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::wsproxy::WsProxyProc;

#[tokio::test(flavor = "multi_thread")]
async fn secrets() {
    require_root_and_tigervnc();
    let rec = Record::new("secrets");
    let dir = tempfile::tempdir().expect("dir");
    // Whatever the services print on stdout lands here (unless their wrapper already sends
    // it to a file), so it can be searched.
    let (s, proxy) = with_stdout_to(&dir.path().join("services-stdout"), || async {
        let s = Rig::start(RigOptions {
            api_secret: true,
            ..Default::default()
        })
        .await;
        let api = s.api_secret.clone().expect("the rig's API secret");
        let proxy = WsProxyProc::start(&[
            "--dispatcher".into(),
            format!("http://{}", s.dispatcher.addr),
            "--dispatcher-secret-file".into(),
            api.display().to_string(),
            "--auth-proxy".into(),
        ])
        .await;
        (s, proxy)
    });
    let api_secret = s.api_secret.clone().expect("the rig's API secret");
    // The shared secrets travel on every call between the services: they must not leak.
    for f in [&s.secret, &api_secret] {
        rec.secret(std::fs::read_to_string(f).expect("secret file").trim());
    }

    let users: Vec<TestUser> = (0..3).map(|_| TestUser::create()).collect();
    let mut c = s.client().await;
    let (mut dispatched, mut relayed, mut resolved) = (0, 0, 0);
    let mut problems = Vec::new();
    let mut desktops = BTreeSet::new();
    for u in &users {
        for ip in ["192.0.2.1", "192.0.2.2"] {
            let session = match s.dispatch(&u.name, ip).await {
                Ok(session) => session,
                Err(e) => {
                    problems.push(format!("Dispatch {} from {ip}: {e}", u.name));
                    continue;
                }
            };
            rec.session(&session);
            dispatched += 1;
            // A browser through the auth proxy: ws-proxy logs in with the session's password
            // and the browser reaches the desktop without it.
            match ws_from(proxy.addr, [127, 0, 0, 1], &session.token).await {
                Ok(mut ws) => match rfb_through_auth_proxy(&mut ws, 10).await {
                    Ok(init) => {
                        relayed += 1;
                        desktops.insert(init);
                    }
                    Err(e) => problems.push(format!("relay for {}: {e}", u.name)),
                },
                Err(status) => {
                    problems.push(format!("relay for {}: ws-proxy answered {status}", u.name))
                }
            }
            // ResolveToken as ws-proxy calls it: the password travels in the answer.
            match c
                .resolve_token(ResolveTokenRequest {
                    token: session.token.clone(),
                    attached: false,
                })
                .await
                .map(|r| r.into_inner())
            {
                Ok(t) if t.username == u.name && t.port == session.port => resolved += 1,
                Ok(t) => problems.push(format!(
                    "ResolveToken for {} answered {} port {}",
                    u.name, t.username, t.port
                )),
                Err(e) => problems.push(format!("ResolveToken for {}: {e}", u.name)),
            }
        }
    }

    // The CLI prints sessions to its caller (that is its job), but no token or password.
    let list = cli(
        "dispatcher",
        &[
            "session",
            "list",
            "--dispatcher",
            &format!("http://{}", s.dispatcher.addr),
            "--secret-file",
            &api_secret.display().to_string(),
        ],
        "",
    );
    let listed = users
        .iter()
        .filter(|u| list.stdout.contains(&u.name))
        .count();

    let mut logs = vec![
        Log::new("dispatcher log", s.dispatcher.log()),
        Log::new("agent log", s.agent().log()),
        Log::new("ws-proxy log", proxy.log()),
        Log::new("`dispatcher session list` output", list.stdout.clone()),
    ];
    let mut xvnc_logs = 0;
    for u in &users {
        for e in std::fs::read_dir(u.home.join(".vnc"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                match std::fs::read_to_string(e.path()) {
                    Ok(text) => {
                        xvnc_logs += 1;
                        logs.push(Log::new(format!("{}'s Xvnc log", u.name), text));
                    }
                    Err(err) => problems.push(format!("{}: {err}", e.path().display())),
                }
            }
        }
    }
    // Each service's stdout must be a file the scan reads: found through /proc, so what is
    // searched is what the process really writes to.
    let mut stdout_files = BTreeMap::<PathBuf, Vec<&str>>::new();
    let mut uncaptured = Vec::new();
    for (name, addr) in [
        ("dispatcher", s.dispatcher.addr),
        ("blade-agent", s.agent().addr),
        ("ws-proxy", proxy.addr),
    ] {
        match service_pid(name, addr).and_then(stdout_file) {
            Some(f) => stdout_files.entry(f).or_default().push(name),
            None => uncaptured.push(name),
        }
    }
    for (file, names) in &stdout_files {
        match std::fs::read_to_string(file) {
            Ok(text) => logs.push(Log::optional(
                format!("stdout of {}", names.join(", ")),
                text,
            )),
            Err(e) => problems.push(format!("{}: {e}", file.display())),
        }
    }
    let calls = 2 * users.len();
    rec.case(
        "what was exercised",
        "3 users × 2 Dispatch calls (new session, then a reconnect from a new IP) to a dispatcher requiring an API secret; a browser connection each through ws-proxy in auth-proxy mode to the desktop; ResolveToken; `dispatcher session list`",
        "every call works and is proven: each relay reaches the desktop's ServerInit without the browser knowing the password, each ResolveToken names the user, the CLI lists every user; logs found to search: the 3 services' logs, the CLI's output, each user's Xvnc log, and the files the services' stdout goes to",
        &format!(
            "Dispatch {dispatched}/{calls}, relayed to the desktop {relayed}/{calls} ({desktops:?}), ResolveToken {resolved}/{calls}; session list exit {}, listing {listed}/{} users; {} logs to search: 3 service logs, CLI output, {xvnc_logs} Xvnc logs, {} stdout files (uncaptured stdout: {uncaptured:?}){}",
            list.status,
            users.len(),
            logs.len(),
            stdout_files.len(),
            if problems.is_empty() {
                String::new()
            } else {
                format!("; problems: {}", problems.join("; "))
            }
        ),
        dispatched == calls
            && relayed == calls
            && resolved == calls
            && list.status == 0
            && listed == users.len()
            && xvnc_logs == users.len()
            && uncaptured.is_empty()
            && !stdout_files.is_empty()
            && problems.is_empty(),
    );
    rec.scan_secrets(&logs);
    for u in &users {
        // Clean-up only: dropping the users removes whatever is left.
        let _ = c
            .end_session(EndSessionRequest {
                username: u.name.clone(),
            })
            .await;
    }
    rec.finish();
}
