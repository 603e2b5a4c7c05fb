//! The fault and bad-input suite: tries what an attacker or a bad day would, against the real
//! processes, and records each case (what was done, expected, observed) for
//! docs/reliability.md (see `vncdispatch_tests::reliability`). Every case must pass, and the
//! counts of sessions lost or duplicated, orphaned Xvnc and leaked secrets must be zero.
//!
//! `RELIABILITY_SOAK=1` makes the load case longer; its short form runs every time.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Status};
use vncdispatch_proto::v1::{
    AddBladeRequest, DispatchRequest, DrainBladeRequest, EndSessionRequest, Geometry,
    ListBladesRequest, ListSessionsRequest, ListVncServersRequest, RemoveBladeRequest,
    ResolveTokenRequest, StartSessionRequest, StopSessionRequest,
};
use vncdispatch_tests::agent::{AgentOptions, AgentProc, new_secret};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::ferretdb::FerretDb;
use vncdispatch_tests::reliability::Record;
use vncdispatch_tests::rig::{Rig, RigOptions};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::wsproxy::WsProxyProc;
use vncdispatch_tests::{eventually, procs, require_root_and_tigervnc, workspace_bin};

/// The status code of a call's result, as the report shows it.
fn code<T>(r: &Result<T, Status>) -> String {
    match r {
        Ok(_) => "OK".to_owned(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// Shows control characters and long inputs readably in the report.
fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(40)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().count() > 40 {
        out.push_str(&format!("… ({} bytes)", s.len()));
    }
    format!("\"{out}\"")
}

/// Names no account can have, plus real system accounts: each must be refused.
fn hostile_usernames() -> Vec<String> {
    [
        "root",
        "daemon",
        "nobody",
        "../x",
        "..",
        "a;rm -rf /",
        "$(id)",
        "`id`",
        "a|b",
        "a b",
        "a\nb",
        "a\0b",
        "-rf",
        "--help",
        "a/b",
        "~root",
        "",
        "\u{430}lice",
        "\u{ff41}lice",
        "ALICE\u{200b}",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["x".repeat(33), "é".repeat(20)])
    .collect()
}

async fn stack(extra_dispatcher: &[&str]) -> Rig {
    Rig::start(RigOptions {
        dispatcher_extra: extra_dispatcher.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
}

async fn store_sessions(d: &DispatcherProc) -> Vec<vncdispatch_proto::v1::SessionInfo> {
    d.client()
        .await
        .list_sessions(ListSessionsRequest::default())
        .await
        .map(|r| r.into_inner().sessions)
        .unwrap_or_default()
}

async fn agent_sessions(a: &AgentProc) -> Vec<vncdispatch_proto::v1::VncServer> {
    a.client()
        .await
        .list_sessions(ListVncServersRequest::default())
        .await
        .map(|r| r.into_inner().servers)
        .unwrap_or_default()
}

/// Runs a CLI and reports (exit code, first line of stderr).
fn cli(bin: &str, args: &[&str], stdin: &str) -> (i32, String) {
    let mut child = Command::new(workspace_bin(bin))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(mut i) = child.stdin.take() {
        use std::io::Write;
        let _ = i.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_owned();
    (out.status.code().unwrap_or(-1), first)
}

/// A message with an extra field the contract does not have (tag 99).
#[derive(Clone, PartialEq, prost::Message)]
struct DispatchRequestPlus {
    #[prost(string, tag = "1")]
    username: String,
    #[prost(string, tag = "2")]
    remote_ip: String,
    #[prost(string, tag = "99")]
    from_the_future: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input() {
    require_root_and_tigervnc();
    let rec = Record::new("bad_input");
    let s = stack(&[]).await;
    let mut c = s.dispatcher.client().await;
    let mut agent = s.agent().client().await;
    let user = TestUser::create();

    let names = hostile_usernames();
    let mut observed = BTreeMap::<String, Vec<String>>::new();
    for name in &names {
        let r = c
            .dispatch(DispatchRequest {
                username: name.clone(),
                remote_ip: "192.0.2.1".into(),
            })
            .await;
        observed.entry(code(&r)).or_default().push(shown(name));
    }
    rec.bad_inputs(names.len() as u64);
    rec.case(
        "Dispatch: hostile usernames",
        &format!(
            "{} usernames: shell metacharacters, newline, NUL, leading `-`, `..`, 33 bytes, Unicode look-alikes, zero-width space, root/daemon/nobody",
            names.len()
        ),
        "InvalidArgument for every one",
        &format!("{observed:?}"),
        observed.len() == 1 && observed.contains_key("InvalidArgument"),
    );

    let mut observed = BTreeMap::<String, usize>::new();
    for name in &names {
        let r = c
            .end_session(EndSessionRequest {
                username: name.clone(),
            })
            .await;
        *observed.entry(code(&r)).or_default() += 1;
        let r = agent
            .start_session(StartSessionRequest {
                username: name.clone(),
                password: "s3cret12".into(),
                geometry: None,
            })
            .await;
        *observed.entry(format!("agent {}", code(&r))).or_default() += 1;
        let r = agent
            .stop_session(StopSessionRequest {
                username: name.clone(),
            })
            .await;
        *observed
            .entry(format!("agent stop {}", code(&r)))
            .or_default() += 1;
    }
    rec.bad_inputs(3 * names.len() as u64);
    let store_ok = observed.get("OK").copied().unwrap_or(0);
    rec.case(
        "EndSession, agent StartSession and StopSession: hostile usernames",
        "the same usernames to each",
        "InvalidArgument everywhere, except EndSession of the well-formed root/daemon/nobody: OK with ended=false (they never have a session; the dispatcher cannot see a blade's accounts)",
        &format!("{observed:?}"),
        store_ok == 3
            && observed
                .iter()
                .all(|(k, _)| k == "OK" || k.ends_with("InvalidArgument")),
    );

    let ips = [
        "999.1.1.1",
        "::1%eth0",
        "fe80::1%lo",
        "example.com",
        "",
        "1.2.3",
        "127.0.0.1:80",
        " 1.2.3.4",
        "0x7f.0.0.1",
        "1.2.3.4\n",
    ];
    let mut observed = BTreeMap::<String, usize>::new();
    for ip in ips {
        let r = c
            .dispatch(DispatchRequest {
                username: user.name.clone(),
                remote_ip: ip.into(),
            })
            .await;
        *observed.entry(code(&r)).or_default() += 1;
    }
    rec.bad_inputs(ips.len() as u64);
    rec.case(
        "Dispatch: bad remote IPs",
        "`999.1.1.1`, `::1%eth0`, `fe80::1%lo`, a host name, empty, `1.2.3`, with a port, leading space, hex octets, trailing newline — for a real user",
        "InvalidArgument for every one, no desktop started",
        &format!("{observed:?}"),
        observed.len() == 1 && observed.contains_key("InvalidArgument"),
    );

    let tokens = [
        String::new(),
        "z".repeat(60),
        "a".repeat(59),
        "a".repeat(61),
        "A".repeat(60),
        "../../etc/passwd".into(),
        "a".repeat(60),
        format!("{}\n", "b".repeat(60)),
    ];
    let mut observed = BTreeMap::<String, usize>::new();
    for t in &tokens {
        let r = c
            .resolve_token(ResolveTokenRequest { token: t.clone() })
            .await;
        *observed.entry(code(&r)).or_default() += 1;
    }
    rec.bad_inputs(tokens.len() as u64);
    rec.case(
        "ResolveToken: malformed and unknown tokens",
        "empty, non-hex, 59 and 61 digits, upper case, a path, a well-formed unknown one, trailing newline",
        "NotFound for every one (malformed and unknown are not told apart)",
        &format!("{observed:?}"),
        observed.len() == 1 && observed.contains_key("NotFound"),
    );

    let blades: Vec<(String, String, u32, i32)> = vec![
        (String::new(), "h".into(), 7501, 1),
        ("../x".into(), "h".into(), 7501, 1),
        ("a b".into(), "h".into(), 7501, 1),
        ("x".repeat(100), "h".into(), 7501, 1),
        ("ok1".into(), String::new(), 7501, 1),
        ("ok2".into(), "a;rm -rf /".into(), 7501, 1),
        ("ok3".into(), "-oProxyCommand=id".into(), 22, 2),
        ("ok4".into(), "h\nx".into(), 7501, 1),
        ("ok5".into(), "h".into(), 70000, 1),
        ("ok6".into(), "h".into(), 7501, 99),
    ];
    let mut observed = BTreeMap::<String, usize>::new();
    for (name, host, port, method) in &blades {
        let r = c
            .add_blade(AddBladeRequest {
                name: name.clone(),
                host: host.clone(),
                port: *port,
                method: *method,
            })
            .await;
        *observed.entry(code(&r)).or_default() += 1;
    }
    for name in ["nosuch", "../x"] {
        let r = c
            .drain_blade(DrainBladeRequest {
                name: name.into(),
                draining: true,
            })
            .await;
        *observed.entry(format!("drain {}", code(&r))).or_default() += 1;
        let r = c
            .remove_blade(RemoveBladeRequest {
                name: name.into(),
                force: true,
            })
            .await;
        *observed.entry(format!("remove {}", code(&r))).or_default() += 1;
    }
    rec.bad_inputs(blades.len() as u64 + 4);
    let listed: Vec<String> = c
        .list_blades(ListBladesRequest::default())
        .await
        .map(|r| r.into_inner().blades.into_iter().map(|b| b.name).collect())
        .unwrap_or_default();
    rec.case(
        "Blade admin: bad names, hosts, ports, methods; unknown blades",
        "AddBlade with an empty, traversing, spaced or 100-byte name, an empty host, shell and option injection in the host, a newline, port 70000, method 99; Drain/Remove of unknown names",
        "InvalidArgument for AddBlade and the malformed name; Drain NotFound and Remove OK (removed=false) for the unknown one; blade list unchanged",
        &format!("{observed:?}; blades now {listed:?}"),
        observed.get("InvalidArgument") == Some(&10)
            && observed.get("drain NotFound") == Some(&1)
            && observed.get("drain InvalidArgument") == Some(&1)
            && observed.get("remove OK") == Some(&1)
            && observed.get("remove InvalidArgument") == Some(&1)
            && listed == ["b1"],
    );

    // The list calls' filters.
    let mut observed = BTreeMap::<String, usize>::new();
    for bad in ["../x", "a b", "a;rm -rf /", "\0"] {
        let r = c
            .list_sessions(ListSessionsRequest { blade: bad.into() })
            .await;
        *observed
            .entry(format!("ListSessions {}", code(&r)))
            .or_default() += 1;
        let r = agent
            .list_sessions(ListVncServersRequest {
                username: bad.into(),
            })
            .await;
        *observed
            .entry(format!("agent ListSessions {}", code(&r)))
            .or_default() += 1;
    }
    rec.bad_inputs(8);
    rec.case(
        "List filters: malformed blade and user names",
        "ListSessions with blade `../x`, `a b`, shell text, NUL; the agent's ListSessions with the same as username",
        "InvalidArgument",
        &format!("{observed:?}"),
        observed.keys().all(|k| k.ends_with("InvalidArgument")),
    );

    let passwords = ["", "12345", "123456789", "pass\0wd", "pässwd", "pass\nwd"];
    let mut observed = BTreeMap::<String, usize>::new();
    for p in passwords {
        let r = agent
            .start_session(StartSessionRequest {
                username: user.name.clone(),
                password: p.into(),
                geometry: None,
            })
            .await;
        *observed.entry(code(&r)).or_default() += 1;
    }
    for (w, h) in [(0, 0), (100_000, 100_000), (1, 5000)] {
        let r = agent
            .start_session(StartSessionRequest {
                username: user.name.clone(),
                password: "s3cret12".into(),
                geometry: Some(Geometry {
                    width: w,
                    height: h,
                }),
            })
            .await;
        *observed.entry(code(&r)).or_default() += 1;
    }
    rec.bad_inputs(passwords.len() as u64 + 3);
    rec.case(
        "Agent StartSession: bad passwords and geometries",
        "empty, 5 and 9 characters, NUL, non-ASCII, newline; 0x0, 100000x100000, 1x5000 — for a real user",
        "InvalidArgument for every one, no desktop",
        &format!("{observed:?}"),
        observed.len() == 1 && observed.contains_key("InvalidArgument"),
    );

    let huge = "u".repeat(100 * 1024);
    let r1 = c
        .dispatch(DispatchRequest {
            username: huge.clone(),
            remote_ip: "192.0.2.1".into(),
        })
        .await;
    let r2 = agent
        .start_session(StartSessionRequest {
            username: huge,
            password: "s3cret12".into(),
            geometry: None,
        })
        .await;
    rec.bad_inputs(2);
    let big = |r: &str| r == "OutOfRange" || r == "ResourceExhausted";
    rec.case(
        "Oversize gRPC messages",
        "Dispatch and agent StartSession with a 100 KiB username (the limit is 64 KiB)",
        "refused before decoding (OutOfRange or ResourceExhausted)",
        &format!("dispatcher {}, agent {}", code(&r1), code(&r2)),
        big(&code(&r1)) && big(&code(&r2)),
    );

    // Unknown fields are skipped (proto3): a newer portal talking to this dispatcher works.
    let mut raw = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(format!("http://{}", s.dispatcher.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect"),
    );
    raw.ready().await.expect("ready");
    let r: Result<tonic::Response<vncdispatch_proto::v1::Session>, Status> = raw
        .unary(
            tonic::Request::new(DispatchRequestPlus {
                username: user.name.clone(),
                remote_ip: "192.0.2.1".into(),
                from_the_future: "ignored".into(),
            }),
            "/vncdispatch.v1.Dispatcher/Dispatch".parse().expect("path"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    rec.bad_inputs(1);
    let session_user = r.as_ref().map(|s| s.get_ref().username.clone()).ok();
    if let Ok(s) = &r {
        rec.secret(&s.get_ref().token);
        rec.secret(&s.get_ref().password);
    }
    rec.case(
        "Unknown fields",
        "Dispatch carrying an extra field (tag 99) the contract does not define",
        "ignored: the call works as without it",
        &format!("{} for {:?}", code(&r), session_user),
        r.is_ok() && session_user.as_deref() == Some(user.name.as_str()),
    );
    let _ = c
        .end_session(EndSessionRequest {
            username: user.name.clone(),
        })
        .await;

    let url = format!("http://{}", s.dispatcher.addr);
    let config_dir = tempfile::tempdir().expect("dir");
    let bad_config = config_dir.path().join("ws-proxy.toml");
    std::fs::write(&bad_config, "max-per-ip = \"lots\"\n").expect("write");
    let bad_config = bad_config.display().to_string();
    let unknown_key = config_dir.path().join("dispatcher.toml");
    std::fs::write(&unknown_key, "lisen = \"0.0.0.0:7500\"\n").expect("write");
    let unknown_key = unknown_key.display().to_string();
    let clis: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "dispatcher",
            vec!["dispatch", "a;rm -rf /", "192.0.2.1", "--dispatcher", &url],
            "",
        ),
        (
            "dispatcher",
            vec!["dispatch", "alice", "999.1.1.1", "--dispatcher", &url],
            "",
        ),
        (
            "dispatcher",
            vec!["blade", "add", "../x", "h", "--dispatcher", &url],
            "",
        ),
        (
            "dispatcher",
            vec!["serve", "--listen", "not-an-address"],
            "",
        ),
        (
            "blade-agent",
            vec!["cloudvnc", "--user", "root"],
            "s3cret12\n",
        ),
        (
            "blade-agent",
            vec!["cloudvnc", "--user", "../x"],
            "s3cret12\n",
        ),
        ("blade-agent", vec!["cloudvnc", "--user", &user.name], "\n"),
        ("ws-proxy", vec!["serve", "--max-per-ip", "-1"], ""),
        ("ws-proxy", vec!["serve", "--config", &bad_config], ""),
        ("dispatcher", vec!["serve", "--config", &unknown_key], ""),
    ];
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for (bin, args, stdin) in &clis {
        let (status, first) = cli(bin, args, stdin);
        rows.push(format!("{bin} {} → exit {status}", args[..2].join(" ")));
        let names_key = !args.contains(&"--config") || first.contains("key `");
        if status == 0 || first.is_empty() || first.contains("panicked") || !names_key {
            failures.push(format!("{bin} {args:?}: exit {status}, {first:?}"));
        }
    }
    rec.bad_inputs(clis.len() as u64);
    rec.case(
        "CLI: the same bad input on the command line",
        &rows.join("; "),
        "non-zero exit with a one-line error saying what was wrong (for a config file: the file and the key), no panic",
        &if failures.is_empty() {
            "all refused with a message".to_owned()
        } else {
            failures.join("; ")
        },
        failures.is_empty(),
    );

    let stored = store_sessions(&s.dispatcher).await;
    // The agent lists every desktop on this host (other tests' too): only this test's user
    // and the hostile names could be ours.
    let running: Vec<_> = agent_sessions(s.agent())
        .await
        .into_iter()
        .filter(|v| v.username == user.name || names.contains(&v.username))
        .collect();
    rec.case(
        "Nothing changed",
        "after all of the above: the store's sessions and the agent's desktops",
        "none (the one valid Dispatch was ended)",
        &format!(
            "{} sessions stored, {} desktops running",
            stored.len(),
            running.len()
        ),
        stored.is_empty() && running.is_empty(),
    );
    rec.scan_secrets(&[s.dispatcher.log(), s.agent().log()]);
    rec.finish();
}

/// A root-owned file (mode 0644) next to the users' homes, so hard links to it are possible.
fn root_file(user: &TestUser, tag: &str) -> PathBuf {
    let p = user
        .home
        .parent()
        .expect("home has a parent")
        .join(format!("reliability-{tag}-{}", std::process::id()));
    std::fs::write(&p, b"root's precious file\n").expect("write root file");
    p
}

fn untouched(p: &Path) -> bool {
    std::fs::read(p).ok().as_deref() == Some(&b"root's precious file\n"[..])
}

fn start(user: &str) -> StartSessionRequest {
    StartSessionRequest {
        username: user.into(),
        password: "s3cret12".into(),
        geometry: None,
    }
}

/// Sets up an attack in a user's home; returns the path whose contents must not change.
type Prepare = Box<dyn Fn(&TestUser) -> PathBuf>;

#[tokio::test(flavor = "multi_thread")]
async fn filesystem() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    require_root_and_tigervnc();
    let rec = Record::new("filesystem");
    let agent = AgentProc::start(AgentOptions::default()).await;
    let mut c = agent.client().await;
    let other = TestUser::create();

    // Each attack: prepare the user's home, try to start, check the outcome and that nothing
    // outside the user's rights changed.
    let attacks: Vec<(&str, &str, Prepare)> = vec![
        (
            "~/.vncpasswd is a symlink to a root-owned file",
            "PermissionDenied; the target unchanged",
            Box::new(|u| {
                let t = root_file(u, "symlink");
                symlink(&t, u.home.join(".vncpasswd")).expect("symlink");
                t
            }),
        ),
        (
            "~/.vncpasswd is a hard link to a root-owned file",
            "PermissionDenied; the target unchanged",
            Box::new(|u| {
                let t = root_file(u, "hardlink");
                std::fs::hard_link(&t, u.home.join(".vncpasswd")).expect("hard link");
                t
            }),
        ),
        (
            "~/.vnc is a symlink to a root-owned directory",
            "PermissionDenied; nothing written there",
            Box::new(|u| {
                let t = root_file(u, "vncdir");
                let d = t.with_extension("d");
                std::fs::create_dir_all(&d).expect("dir");
                symlink(&d, u.home.join(".vnc")).expect("symlink");
                d
            }),
        ),
        (
            "~ itself is a symlink to a root-owned directory",
            "refused; nothing written there",
            Box::new(|u| {
                let t = root_file(u, "home");
                let d = t.with_extension("d");
                std::fs::create_dir_all(&d).expect("dir");
                let real = u.home.with_extension("real");
                std::fs::rename(&u.home, &real).expect("move home");
                symlink(&d, &u.home).expect("symlink home");
                d
            }),
        ),
        (
            "home directory missing",
            "refused with a message; no home created by root",
            Box::new(|u| {
                std::fs::remove_dir_all(&u.home).expect("rm home");
                u.home.clone()
            }),
        ),
        (
            "home not writable by its owner (0555)",
            "refused with a message",
            Box::new(|u| {
                std::fs::set_permissions(&u.home, std::fs::Permissions::from_mode(0o555))
                    .expect("chmod");
                u.home.clone()
            }),
        ),
    ];
    for (what, expected, prepare) in attacks {
        let user = TestUser::create();
        let target = prepare(&user);
        let r = c.start_session(start(&user.name)).await;
        rec.faults(1);
        let message = r
            .as_ref()
            .err()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        let (unchanged, detail) = match what {
            w if w.contains("root-owned file") => (untouched(&target), "target unchanged"),
            w if w.contains("directory") && !w.contains("missing") => (
                std::fs::read_dir(&target).map(|d| d.count()).unwrap_or(0) == 0,
                "directory still empty",
            ),
            w if w.contains("missing") => (!target.exists(), "home still absent"),
            _ => (
                !target.join(".vncpasswd").exists(),
                "no ~/.vncpasswd written",
            ),
        };
        let no_xvnc = procs::xvnc_of(user.uid).is_empty();
        rec.case(
            what,
            "StartSession for that user",
            expected,
            &format!(
                "{}: {message}; {detail}: {unchanged}; no Xvnc: {no_xvnc}",
                code(&r)
            ),
            r.is_err() && !message.is_empty() && unchanged && no_xvnc,
        );
        if let Some(real) = Some(user.home.with_extension("real")).filter(|p| p.exists()) {
            let _ = std::fs::remove_file(&user.home);
            let _ = std::fs::rename(real, &user.home);
        }
        let _ = std::fs::remove_file(target.with_extension(""));
        let _ = std::fs::remove_dir_all(target.with_extension("d"));
        if what.contains("root-owned file") {
            let _ = std::fs::remove_file(&target);
        }
    }

    // Home owned by another user: the agent must not write into someone else's directory.
    let user = TestUser::create();
    nix::unistd::chown(
        &user.home,
        Some(nix::unistd::Uid::from_raw(other.uid)),
        None,
    )
    .expect("chown");
    let r = c.start_session(start(&user.name)).await;
    rec.faults(1);
    let wrote = user.home.join(".vncpasswd").exists();
    rec.case(
        "home owned by another user",
        "StartSession for a user whose home belongs to someone else",
        "refused; nothing written into that home",
        &format!(
            "{}: {}; ~/.vncpasswd written: {wrote}",
            code(&r),
            r.as_ref().err().map(|e| e.message()).unwrap_or_default()
        ),
        r.is_err() && !wrote,
    );

    // The file swapped between check and use: a thread flips ~/.vncpasswd between a regular
    // file and a symlink to a root-owned file while desktops are started and stopped.
    let user = TestUser::create();
    let target = root_file(&user, "race");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, link, target) = (stop.clone(), user.home.join(".vncpasswd"), target.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::remove_file(&link);
                let _ = symlink(&target, &link);
                let _ = std::fs::remove_file(&link);
                let _ = std::fs::write(&link, b"x");
                flips += 1;
            }
            flips
        })
    };
    let mut outcomes = BTreeMap::<String, usize>::new();
    for _ in 0..15 {
        let r = c.start_session(start(&user.name)).await;
        *outcomes.entry(code(&r)).or_default() += 1;
        let _ = c
            .stop_session(StopSessionRequest {
                username: user.name.clone(),
            })
            .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.join().unwrap_or(0);
    rec.faults(1);
    let unchanged = untouched(&target);
    rec.case(
        "~/.vncpasswd swapped between check and use",
        &format!(
            "15 starts and stops while another thread swapped ~/.vncpasswd between a file and a symlink to a root-owned file {flips} times"
        ),
        "each start succeeds or is refused; the root-owned file never changes",
        &format!("{outcomes:?}; target unchanged: {unchanged}"),
        unchanged
            && outcomes
                .keys()
                .all(|k| ["OK", "PermissionDenied", "FailedPrecondition"].contains(&k.as_str())),
    );
    let _ = std::fs::remove_file(&target);
    rec.finish();
}

/// The gRPC health status of the whole server at `addr`.
async fn health_status(addr: SocketAddr) -> String {
    use tonic_health::pb::health_client::HealthClient;
    let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
    else {
        return "unreachable".into();
    };
    match HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
    {
        Ok(r) => format!("{:?}", r.into_inner().status()),
        Err(e) => format!("{:?}", e.code()),
    }
}

async fn wait_health(addr: SocketAddr, want: &str, secs: u64) -> String {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = health_status(addr).await;
        if now == want || Instant::now() > until {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An executable every user can run, for fake Xvnc binaries.
fn script(name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = PathBuf::from(format!(
        "/var/tmp/vncdispatch-{name}-{}",
        std::process::id()
    ));
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

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
    let second = TestUser::create();
    let r2 = c.start_session(start(&second.name)).await;
    let third = TestUser::create();
    let r3 = c.start_session(start(&third.name)).await;
    let full = wait_health(agent.addr, "NotServing", 10).await;
    let _ = c
        .stop_session(StopSessionRequest {
            username: user.name.clone(),
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
        let fake = script(
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
                fake.display().to_string(),
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
        let message = r
            .as_ref()
            .err()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
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
        let _ = std::fs::remove_file(fake);
    }

    // Xvnc crash mid-session: the next Dispatch notices and starts a new one.
    let s = stack(&[]).await;
    let mut d = s.dispatcher.client().await;
    let user = TestUser::create();
    let first = dispatch_as(&rec, &s.dispatcher, &user.name)
        .await
        .expect("Dispatch");
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
    s.agents[0].stop();
    rec.faults(1);
    let survived = procs::xvnc_of(user.uid).len() == 1 && procs::xvnc_of(other.uid).len() == 1;
    s.agents[0].restart().await;
    let adopted: HashSet<u32> = agent_sessions(s.agent())
        .await
        .into_iter()
        .map(|v| v.vnc_pid)
        .collect();
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
            "survived: {survived}; adopted pids {adopted:?} (expected {} and {}); same session again: {}; {dup} Xvnc for 2 users",
            second.vnc_pid,
            other_first.vnc_pid,
            again.token == second.token && again.reused
        ),
        survived
            && adopted.contains(&second.vnc_pid)
            && adopted.contains(&other_first.vnc_pid)
            && again.token == second.token
            && dup == 2,
    );
    rec.scan_secrets(&[s.dispatcher.log(), s.agent().log()]);
    rec.finish();
}

/// Users whose sessions the store and the agents disagree about, and users with more than
/// one Xvnc: (orphaned desktops, duplicated, half-stored sessions).
async fn agreement(
    d: &DispatcherProc,
    agents: &[&AgentProc],
    users: &[&TestUser],
) -> (usize, usize, usize) {
    let stored: HashSet<String> = store_sessions(d)
        .await
        .into_iter()
        .map(|s| s.username)
        .collect();
    // Agents list every desktop on their host, and the tests' agents share this one: look
    // only at the users in question.
    let ours: HashSet<&str> = users.iter().map(|u| u.name.as_str()).collect();
    let stored: HashSet<String> = stored
        .into_iter()
        .filter(|u| ours.contains(u.as_str()))
        .collect();
    let mut running = HashSet::new();
    for a in agents {
        for v in agent_sessions(a).await {
            if ours.contains(v.username.as_str()) {
                running.insert(v.username);
            }
        }
    }
    let orphaned = running.difference(&stored).count();
    let half_stored = stored.difference(&running).count();
    let duplicated = users
        .iter()
        .filter(|u| procs::xvnc_of(u.uid).len() > 1)
        .count();
    (orphaned, duplicated, half_stored)
}

/// Dispatch from 192.0.2.1, remembering the issued token and password for the leak scan.
async fn dispatch_as(
    rec: &Record,
    d: &DispatcherProc,
    user: &str,
) -> Result<vncdispatch_proto::v1::Session, Status> {
    dispatch_from(rec, d, user, "192.0.2.1").await
}

/// Dispatch from `ip`, remembering the issued token and password for the leak scan.
async fn dispatch_from(
    rec: &Record,
    d: &DispatcherProc,
    user: &str,
    ip: &str,
) -> Result<vncdispatch_proto::v1::Session, Status> {
    let r = d
        .client()
        .await
        .dispatch(DispatchRequest {
            username: user.into(),
            remote_ip: ip.into(),
        })
        .await
        .map(|r| r.into_inner());
    if let Ok(s) = &r {
        rec.secret(&s.token);
        rec.secret(&s.password);
    }
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn distributed() {
    require_root_and_tigervnc();
    let rec = Record::new("distributed");
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("agent-secret");
    new_secret(&secret);
    let agent_at = |ip: [u8; 4]| {
        AgentProc::start(AgentOptions {
            ip: ip.into(),
            secret_file: Some(secret.clone()),
            ..Default::default()
        })
    };
    let mut a1 = agent_at([127, 0, 0, 2]).await;
    let a2 = agent_at([127, 0, 0, 3]).await;
    let d = DispatcherProc::start(DispatcherOptions {
        agent_secret: secret.clone(),
        extra: vec!["--launch-timeout".into(), "3s".into()],
        ..Default::default()
    })
    .await;
    d.add_agent("b1", &a1).await;
    d.add_agent("b2", &a2).await;
    let users: Vec<TestUser> = (0..6).map(|_| TestUser::create()).collect();

    // An agent down: every new user lands on the other blade, nothing half-stored.
    a1.stop();
    rec.faults(1);
    let mut blades = Vec::new();
    for u in &users[..4] {
        let r = dispatch_as(&rec, &d, &u.name).await;
        blades.push(
            r.map(|s| s.blade)
                .unwrap_or_else(|e| format!("{:?}", e.code())),
        );
    }
    a1.restart().await;
    let (orphaned, duplicated, half) =
        agreement(&d, &[&a1, &a2], &users.iter().collect::<Vec<_>>()).await;
    rec.orphaned(orphaned as u64);
    rec.duplicated(duplicated as u64);
    rec.lost(half as u64);
    rec.case(
        "a blade's agent down during Dispatch",
        "agent b1 stopped; 4 users dispatched",
        "all on b2; store and agents agree",
        &format!(
            "blades {blades:?}; orphaned {orphaned}, duplicated {duplicated}, half-stored {half}"
        ),
        blades.iter().all(|b| b == "b2") && orphaned + duplicated + half == 0,
    );

    // An agent hanging (SIGSTOP): the Dispatch times out on it and uses the next blade; once
    // the agent resumes, the desktop it starts late is stopped again.
    let a2_pid = a2.pid().expect("agent pid");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a2_pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    );
    rec.faults(1);
    let mut outcomes = Vec::new();
    let started = Instant::now();
    for u in &users[4..6] {
        let r = dispatch_as(&rec, &d, &u.name).await;
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
    let settled = eventually(30, || {
        users[4..6].iter().all(|u| procs::xvnc_of(u.uid).len() == 1)
    })
    .await;
    let (orphaned, duplicated, half) = agreement(&d, &[&a1, &a2], &all).await;
    rec.orphaned(orphaned as u64);
    rec.duplicated(duplicated as u64);
    rec.lost(half as u64);
    rec.case(
        "a blade's agent hanging during Dispatch",
        "agent b2 frozen with SIGSTOP (launch timeout 3 s); 2 users dispatched; agent resumed",
        "both served by b1 after at most one timeout each; any desktop b2 starts late is stopped; store and agents agree",
        &format!(
            "blades {outcomes:?} in {:.1} s; one Xvnc each after resume: {settled}; orphaned {orphaned}, duplicated {duplicated}, half-stored {half}",
            took.as_secs_f64()
        ),
        outcomes.iter().all(|b| b == "b1") && settled && orphaned + duplicated + half == 0,
    );

    // The dispatcher killed (SIGKILL) in the middle of many Dispatch calls, then restarted.
    let mut d = d;
    let crowd: Vec<TestUser> = (0..12).map(|_| TestUser::create()).collect();
    let addr = d.addr;
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
                let _ = vncdispatch_proto::v1::dispatcher_client::DispatcherClient::new(ch)
                    .dispatch(DispatchRequest {
                        username: name,
                        remote_ip: "192.0.2.1".into(),
                    })
                    .await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(60)).await;
    d.kill();
    rec.faults(1);
    for c in calls {
        let _ = c.await;
    }
    d.restart().await;
    let mut again = BTreeMap::<String, usize>::new();
    for u in &crowd {
        let r = dispatch_as(&rec, &d, &u.name).await;
        *again.entry(code(&r)).or_default() += 1;
    }
    let all: Vec<&TestUser> = users.iter().chain(crowd.iter()).collect();
    let (orphaned, duplicated, half) = agreement(&d, &[&a1, &a2], &all).await;
    rec.orphaned(orphaned as u64);
    rec.duplicated(duplicated as u64);
    rec.lost(half as u64);
    rec.case(
        "dispatcher SIGKILL mid-Dispatch, then restart",
        "12 concurrent Dispatch calls, SIGKILL to the dispatcher 60 ms in, restart, Dispatch each user again",
        "every user gets one session; store and agents agree (desktops started before the kill are adopted, not doubled)",
        &format!("{again:?}; orphaned {orphaned}, duplicated {duplicated}, half-stored {half}"),
        again.get("OK") == Some(&crowd.len()) && orphaned + duplicated + half == 0,
    );
    rec.scan_secrets(&[d.log(), a1.log(), a2.log()]);
    drop(crowd);
    drop(users);

    // The store (FerretDB) stopped and restarted under traffic.
    let mut db = FerretDb::start().await;
    let agent = agent_at([127, 0, 0, 4]).await;
    let dm = DispatcherProc::start(DispatcherOptions {
        mongo: Some(db.uri("vncDispatch")),
        agent_secret: secret.clone(),
        ..Default::default()
    })
    .await;
    dm.add_agent("b1", &agent).await;
    let users: Vec<TestUser> = (0..8).map(|_| TestUser::create()).collect();
    let mut first = HashMap::new();
    for u in &users {
        let s = dispatch_as(&rec, &dm, &u.name)
            .await
            .expect("Dispatch before the outage");
        first.insert(u.name.clone(), s.token);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = dm.addr;
    let traffic: Vec<_> = users
        .iter()
        .map(|u| {
            let (name, stop) = (u.name.clone(), stop.clone());
            tokio::spawn(async move {
                let mut codes = BTreeMap::<String, usize>::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = match tonic::transport::Channel::from_shared(format!("http://{addr}"))
                        .expect("uri")
                        .connect()
                        .await
                    {
                        Ok(ch) => {
                            vncdispatch_proto::v1::dispatcher_client::DispatcherClient::new(ch)
                                .dispatch(DispatchRequest {
                                    username: name.clone(),
                                    remote_ip: "192.0.2.1".into(),
                                })
                                .await
                                .map(|_| ())
                        }
                        Err(_) => Err(Status::unavailable("connect")),
                    };
                    *codes.entry(code(&r)).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                codes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.stop();
    rec.faults(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.restart().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes = BTreeMap::<String, usize>::new();
    for t in traffic {
        for (k, v) in t.await.unwrap_or_default() {
            *codes.entry(k).or_default() += v;
        }
    }
    let mut lost = 0;
    for u in &users {
        match dispatch_as(&rec, &dm, &u.name).await {
            Ok(s) if Some(&s.token) == first.get(&u.name) => {}
            _ => lost += 1,
        }
    }
    let all: Vec<&TestUser> = users.iter().collect();
    let (orphaned, duplicated, half) = agreement(&dm, &[&agent], &all).await;
    rec.orphaned(orphaned as u64);
    rec.duplicated(duplicated as u64);
    rec.lost((lost + half) as u64);
    rec.case(
        "the store (FerretDB) stopped and restarted under traffic",
        "8 users calling Dispatch in a loop; FerretDB stopped for 2 s, then started again",
        "calls wait (the driver retries) or fail with Unavailable while it is down; full recovery after: every user keeps the session they had; store and agent agree",
        &format!("calls by result {codes:?}; sessions kept {}/{}; orphaned {orphaned}, duplicated {duplicated}, half-stored {half}", users.len() - lost, users.len()),
        codes.contains_key("OK") && lost == 0 && orphaned + duplicated + half == 0,
    );
    rec.scan_secrets(&[dm.log(), agent.log()]);
    drop(users);

    // The embedded store's disk fills up.
    let mnt = tempfile::tempdir().expect("mount point");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mount tmpfs");
    let store = mnt.path().join("dispatcher.redb");
    let mut df = DispatcherProc::start(DispatcherOptions {
        // `mongo` is the --store value: here a file on the small tmpfs.
        mongo: Some(store.display().to_string()),
        agent_secret: secret.clone(),
        ..Default::default()
    })
    .await;
    df.add_agent("b1", &agent).await;
    let users: Vec<TestUser> = (0..4).map(|_| TestUser::create()).collect();
    let mut tokens = HashMap::new();
    for u in &users[..2] {
        let s = dispatch_as(&rec, &df, &u.name)
            .await
            .expect("Dispatch before the disk fills");
        tokens.insert(u.name.clone(), s.token);
    }
    let filler = mnt.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    rec.faults(1);
    let full = dispatch_as(&rec, &df, &users[2].name).await;
    let full_message = full
        .as_ref()
        .err()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    let reconnect = dispatch_as(&rec, &df, &users[0].name).await;
    let no_desktop_left = eventually(10, || procs::xvnc_of(users[2].uid).is_empty()).await;
    let _ = std::fs::remove_file(&filler);
    let after = dispatch_as(&rec, &df, &users[3].name).await;
    if let Ok(s) = &after {
        tokens.insert(users[3].name.clone(), s.token.clone());
    }
    df.restart().await;
    let mut kept = 0;
    for (name, token) in &tokens {
        if dispatch_as(&rec, &df, name)
            .await
            .is_ok_and(|s| &s.token == token)
        {
            kept += 1;
        }
    }
    rec.lost((tokens.len() - kept) as u64);
    rec.case(
        "disk full under the embedded store",
        "redb file on a 6 MiB tmpfs filled with dd; Dispatch a new user, reconnect an old one; free the space; Dispatch; restart the dispatcher",
        "a clear error for the new user and no desktop left running for them; reconnects still work; after space returns everything works and every stored session survives the restart",
        &format!(
            "new user while full: {} ({full_message}); reconnect while full: {}; their desktop stopped: {no_desktop_left}; after: {}; sessions intact after restart {kept}/{}",
            code(&full),
            code(&reconnect),
            code(&after),
            tokens.len()
        ),
        full.is_err()
            && !full_message.is_empty()
            && reconnect.is_ok()
            && no_desktop_left
            && after.is_ok()
            && kept == tokens.len(),
    );
    rec.scan_secrets(&[df.log()]);
    drop(df);
    let _ = Command::new("umount").arg("-l").arg(mnt.path()).status();
    rec.finish();
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens `ws://proxy/websockify?token=T` from `from` (a loopback address); the HTTP status
/// of a refusal on error.
async fn ws_from(proxy: SocketAddr, from: [u8; 4], token: &str) -> Result<Ws, u16> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|_| 0u16)?;
    sock.bind(SocketAddr::from((from, 0))).map_err(|_| 0u16)?;
    let tcp = sock.connect(proxy).await.map_err(|_| 0u16)?;
    let url = format!("ws://{proxy}/websockify?token={token}");
    match tokio_tungstenite::client_async(url, tcp).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(_) => Err(1),
    }
}

/// Reads until the server closes; the close code (0 if the connection just ended).
async fn close_code<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, secs: u64) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Close(f)))) => {
                return Some(f.map(|f| u16::from(f.code)).unwrap_or(0));
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => return Some(0),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens() {
    require_root_and_tigervnc();
    let rec = Record::new("tokens");
    let s = stack(&["--token-ttl", "4s"]).await;
    let mut c = s.dispatcher.client().await;

    // 100,000 guesses straight at the dispatcher.
    let guesses: u64 = 100_000;
    let started = Instant::now();
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut found = 0u64;
                for _ in 0..guesses / 32 {
                    let mut b = [0u8; 30];
                    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
                    b[0] = w as u8;
                    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    let r = c.resolve_token(ResolveTokenRequest { token }).await;
                    if r.as_ref().err().map(|e| e.code()) != Some(Code::NotFound) {
                        found += 1;
                    }
                }
                found
            })
        })
        .collect();
    let mut not_refused = 0;
    for w in workers {
        not_refused += w.await.unwrap_or(u64::MAX / 64);
    }
    let tried = guesses / 32 * 32;
    rec.bad_inputs(tried);
    rec.case(
        "100,000 guessed tokens at the dispatcher",
        &format!(
            "{tried} random well-formed tokens to ResolveToken from 32 concurrent callers ({:.0} per s)",
            tried as f64 / started.elapsed().as_secs_f64()
        ),
        "every one NotFound; lookups are by SHA-256 of the token in an index, so no comparison with a stored token leaks timing",
        &format!("{} refused, {not_refused} not", tried - not_refused),
        not_refused == 0,
    );

    // Guessing through ws-proxy is rate-limited per client IP; other clients are unaffected.
    let proxy = WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", s.dispatcher.addr),
        "--recheck-interval".into(),
        "1s".into(),
        "--max-token-failures".into(),
        "30".into(),
    ])
    .await;
    let mut statuses = BTreeMap::<String, usize>::new();
    for _ in 0..200 {
        let mut b = [0u8; 30];
        rand::Rng::fill(&mut rand::rng(), &mut b[..]);
        let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let st = match ws_from(proxy.addr, [127, 0, 0, 1], &token).await {
            Ok(_) => 101,
            Err(st) => st,
        };
        *statuses.entry(st.to_string()).or_default() += 1;
    }
    rec.bad_inputs(200);
    let user = TestUser::create();
    let session = dispatch_from(&rec, &s.dispatcher, &user.name, "127.0.0.2")
        .await
        .expect("Dispatch");
    let other_ip = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    rec.case(
        "guessing tokens through ws-proxy",
        "200 random tokens from one client IP (limit: 30 failures per minute), then a real token from another IP",
        "403 for the first 30, then 429 without a lookup; the other client connects",
        &format!(
            "statuses {statuses:?}; other client: {}",
            other_ip.as_ref().map(|_| "connected".to_owned()).unwrap_or_else(|e| e.to_string())
        ),
        statuses.get("403") == Some(&30) && statuses.get("429") == Some(&170) && other_ip.is_ok(),
    );
    drop(other_ip);

    // A token one hex digit away from a real one.
    let mut near = session.token.clone().into_bytes();
    let last = near.len() - 1;
    near[last] = if near[last] == b'0' { b'1' } else { b'0' };
    let near = String::from_utf8(near).expect("hex");
    let r = c.resolve_token(ResolveTokenRequest { token: near }).await;
    rec.bad_inputs(1);
    rec.case(
        "a near miss",
        "a real token with its last hex digit changed",
        "NotFound, like any other wrong token",
        &code(&r),
        r.as_ref().err().map(|e| e.code()) == Some(Code::NotFound),
    );

    // Per-token connection limit.
    let a = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    let b = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    let third = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    rec.bad_inputs(1);
    rec.case(
        "one token from more connections than allowed",
        "three connections with one token (limit 2)",
        "the first two relay, the third gets 429",
        &format!(
            "{}, {}, {}",
            a.is_ok(),
            b.is_ok(),
            third.as_ref().err().copied().unwrap_or(101)
        ),
        a.is_ok() && b.is_ok() && third.err() == Some(429),
    );
    drop(b);

    // EndSession closes the relayed connection and the token stops working.
    let mut a = a.expect("connected");
    let _ = c
        .end_session(EndSessionRequest {
            username: user.name.clone(),
        })
        .await;
    let closed = close_code(&mut a, 10).await;
    let again = ws_from(proxy.addr, [127, 0, 0, 2], &session.token).await;
    let resolved = c
        .resolve_token(ResolveTokenRequest {
            token: session.token.clone(),
        })
        .await;
    rec.bad_inputs(2);
    rec.case(
        "a token used after EndSession",
        "EndSession while a browser is connected; then the same token again",
        "the open connection closed (1008 when the recheck notices first, 1000 when the stopped Xvnc ends it first); the token refused by ws-proxy (403, even while its earlier answer is cached) and the dispatcher (NotFound)",
        &format!(
            "close code {closed:?}; reconnect {}; ResolveToken {}",
            again.as_ref().err().copied().unwrap_or(101),
            code(&resolved)
        ),
        matches!(closed, Some(1008 | 1000)) && again.err() == Some(403) && resolved.is_err(),
    );

    // Expiry (TTL 4 s): the open connection is closed and the token refused.
    let user2 = TestUser::create();
    let s2 = dispatch_from(&rec, &s.dispatcher, &user2.name, "127.0.0.2")
        .await
        .expect("Dispatch");
    let mut open = ws_from(proxy.addr, [127, 0, 0, 2], &s2.token)
        .await
        .expect("connect before expiry");
    let closed = close_code(&mut open, 10).await;
    let after = ws_from(proxy.addr, [127, 0, 0, 2], &s2.token).await;
    let resolved = c
        .resolve_token(ResolveTokenRequest {
            token: s2.token.clone(),
        })
        .await;
    rec.bad_inputs(2);
    rec.case(
        "a token used after it expired",
        "token TTL 4 s; a connection open across the expiry, then a new one",
        "the open connection closed at expiry (1008); the token refused (403, NotFound)",
        &format!(
            "close code {closed:?}; after expiry {}; ResolveToken {}",
            after.as_ref().err().copied().unwrap_or(101),
            code(&resolved)
        ),
        closed == Some(1008) && after.err() == Some(403) && resolved.is_err(),
    );
    rec.scan_secrets(&[s.dispatcher.log(), s.agent().log(), proxy.log()]);
    rec.finish();
}

/// Sends "ping" and waits up to 2 s for it to come back through the echo target.
async fn echo_once<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    if ws
        .send(Message::Binary(b"ping".to_vec().into()))
        .await
        .is_err()
    {
        return false;
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => return &b[..] == b"ping",
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            _ => return false,
        }
    }
}

/// Sends `req` on a fresh connection and returns everything the server sends back within
/// `secs` (until it closes), and how long that took.
async fn raw_exchange(addr: SocketAddr, req: &[u8], secs: u64) -> (String, Duration) {
    let started = Instant::now();
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return ("connect failed".into(), started.elapsed());
    };
    let _ = s.write_all(req).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// A WebSocket upgrade done by hand, leaving the raw stream for frame-level abuse.
async fn raw_ws(addr: SocketAddr, token: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /websockify?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Waits for the peer to close; returns (bytes read, time until EOF or `secs`).
async fn until_eof(s: &mut tokio::net::TcpStream, secs: u64) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut out)).await;
    (out, r.ok().map(|_| started.elapsed()))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A VNC-server stand-in that writes `junk` endlessly (or once) to whoever connects, and
/// counts what it managed to send.
async fn flood_server(chunk: Vec<u8>, forever: bool) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (chunk, counter) = (chunk.clone(), counter.clone());
            tokio::spawn(async move {
                loop {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    if !forever {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                }
            });
        }
    });
    (port, sent)
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let rec = Record::new("websocket");
    let echo = vncdispatch_tests::echo_server().await;
    let (flood, flood_sent) = flood_server(vec![0x5a; 64 * 1024], true).await;
    let mut junk = vec![0u8; 4096];
    rand::Rng::fill(&mut rand::rng(), &mut junk[..]);
    let (junk_port, _) = flood_server(junk, false).await;
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("echo: 127.0.0.1:{echo}\nflood: 127.0.0.1:{flood}\njunk: 127.0.0.1:{junk_port}\n"),
    )
    .expect("tokens");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "--token-file".to_string(),
            tokens.display().to_string(),
            "--handshake-timeout".into(),
            "2s".into(),
            "--ping-interval".into(),
            "1s".into(),
            "--idle-timeout".into(),
            "3s".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let proxy = WsProxyProc::start(&args(&[])).await;
    let strict = WsProxyProc::start(&args(&["--require-origin"])).await;

    // Origins.
    let with_origin = |p: &WsProxyProc, origin: Option<&str>| {
        let mut req = format!("ws://{}/websockify?token=echo", p.addr)
            .into_client_request()
            .expect("request");
        if let Some(o) = origin {
            req.headers_mut()
                .insert("origin", o.parse().expect("origin"));
        }
        req
    };
    let status = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(_) => 0,
    };
    let own = format!("http://{}", proxy.addr);
    let cases = [
        (
            "wrong Origin",
            status(
                tokio_tungstenite::connect_async(with_origin(&proxy, Some("https://evil.example")))
                    .await,
            ),
            403,
        ),
        (
            "Origin `null`",
            status(tokio_tungstenite::connect_async(with_origin(&proxy, Some("null"))).await),
            403,
        ),
        (
            "same Origin",
            status(tokio_tungstenite::connect_async(with_origin(&proxy, Some(&own))).await),
            101,
        ),
        (
            "no Origin, default",
            status(tokio_tungstenite::connect_async(with_origin(&proxy, None)).await),
            101,
        ),
        (
            "no Origin, --require-origin",
            status(tokio_tungstenite::connect_async(with_origin(&strict, None)).await),
            403,
        ),
    ];
    rec.bad_inputs(3);
    rec.case(
        "cross-site WebSocket hijacking (Origin)",
        "upgrade requests with a foreign Origin, `null`, the proxy's own, none (default: allowed, as non-browser clients send none; with --require-origin: refused)",
        "403 for foreign and `null`; 101 for the proxy's own",
        &cases.iter().map(|(w, got, _)| format!("{w}: {got}")).collect::<Vec<_>>().join(", "),
        cases.iter().all(|(_, got, want)| got == want),
    );

    // Paths that try to make the file server redirect off-site or escape its directory.
    let mut bad = Vec::new();
    for path in [
        "//evil.com/%2F..",
        "//evil.com/",
        "/%2Fevil.com",
        "/..%2F..%2Fetc/passwd",
        "/app/..%2F..%2Fetc/passwd",
    ] {
        let (r, _) = raw_exchange(
            proxy.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            5,
        )
        .await;
        if r.to_ascii_lowercase().contains("\r\nlocation:") || r.contains("root:") {
            bad.push(format!("{path}: {:.60}", r));
        }
    }
    rec.bad_inputs(5);
    rec.case(
        "`//evil.com` and traversal paths",
        "GET //evil.com/%2F.., //evil.com/, /%2Fevil.com, encoded ../ paths",
        "no Location header, nothing outside the noVNC directory",
        &if bad.is_empty() {
            "404/400 for all, no redirect".to_owned()
        } else {
            bad.join("; ")
        },
        bad.is_empty(),
    );

    // 8 MB of headers and a slow-drip handshake.
    let mut huge = b"GET /websockify?token=echo HTTP/1.1\r\nHost: x\r\nX-Junk: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 8 << 20));
    let (r, took) = raw_exchange(proxy.addr, &huge, 10).await;
    rec.bad_inputs(1);
    rec.case(
        "8 MB of request headers",
        "one header of 8 MiB",
        "refused (431) or cut off, promptly",
        &format!(
            "{:?} after {:.1} s",
            r.lines().next().unwrap_or("connection closed"),
            took.as_secs_f64()
        ),
        (r.is_empty() || r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"))
            && took < Duration::from_secs(9),
    );
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let drip = b"GET /websockify?token=echo HTTP/1.1\r\nHost: x\r\n";
    let mut cut = None;
    for b in drip.iter().cycle().take(200) {
        if s.write_all(&[*b]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
        {
            cut = Some(started.elapsed());
            break;
        }
    }
    rec.faults(1);
    rec.case(
        "slow-drip handshake (slowloris)",
        "request head sent one byte per 50 ms (handshake timeout 2 s)",
        "connection closed at the timeout",
        &format!(
            "closed after {:?}",
            cut.map(|d| format!("{:.1} s", d.as_secs_f64()))
        ),
        cut.is_some_and(|d| d < Duration::from_secs(6)),
    );

    // A close the client never answers; a client that never answers pings.
    let mut s = raw_ws(proxy.addr, "echo").await;
    // A masked text frame "x": ws-proxy refuses text with a close frame, then waits for ours.
    s.write_all(&[0x81, 0x81, 1, 2, 3, 4, b'x' ^ 1])
        .await
        .expect("frame");
    let (got, eof) = until_eof(&mut s, 10).await;
    rec.faults(1);
    rec.case(
        "a close frame never answered",
        "text frame (refused with close 1003), then silence: no close reply, no reads",
        "the proxy sends its close and drops the connection after its 2 s wait",
        &format!(
            "close frame sent: {}; dropped after {:?}",
            got.first() == Some(&0x88),
            eof.map(|d| format!("{:.1} s", d.as_secs_f64()))
        ),
        got.first() == Some(&0x88) && eof.is_some_and(|d| d < Duration::from_secs(6)),
    );
    let mut s = raw_ws(proxy.addr, "echo").await;
    let (got, eof) = until_eof(&mut s, 15).await;
    let pings = got.windows(1).filter(|w| w[0] == 0x89).count();
    rec.faults(1);
    rec.case(
        "no pong",
        "a client that completes the handshake and then never answers (ping every 1 s, idle timeout 3 s)",
        "pinged, then closed at the idle timeout",
        &format!("{pings} pings seen; closed after {:?}", eof.map(|d| format!("{:.1} s", d.as_secs_f64()))),
        pings >= 1 && eof.is_some_and(|d| d < Duration::from_secs(10)),
    );

    // A slow reader in front of a VNC server that floods: backpressure, not buffering.
    let pid = proxy.pid().expect("proxy pid");
    let before = rss_kib(pid);
    let s = raw_ws(proxy.addr, "flood").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = rss_kib(pid);
    let flooded = flood_sent.load(std::sync::atomic::Ordering::Relaxed);
    drop(s);
    rec.faults(1);
    rec.case(
        "a slow reader",
        "a browser that reads nothing for 4 s while its VNC server writes as fast as it can",
        "the VNC server is held back (it gets to write little more than the socket buffers); ws-proxy's memory stays flat",
        &format!(
            "VNC server wrote {:.1} MiB in 4 s; ws-proxy RSS {} → {} KiB",
            flooded as f64 / (1 << 20) as f64,
            before,
            during
        ),
        flooded < 64 << 20 && during < before + 32 * 1024,
    );

    // Oversize and malformed frames.
    let (mut ws, _) = tokio_tungstenite::connect_async(with_origin(&proxy, None))
        .await
        .expect("connect");
    let _ = ws.send(Message::Binary(vec![0u8; 2 << 20].into())).await;
    let big = close_code(&mut ws, 10).await;
    let mut s = raw_ws(proxy.addr, "echo").await;
    s.write_all(&[0xff; 64]).await.expect("garbage");
    let (got, eof) = until_eof(&mut s, 10).await;
    let code = (got.len() >= 4 && got[0] == 0x88).then(|| u16::from_be_bytes([got[2], got[3]]));
    rec.bad_inputs(2);
    rec.case(
        "oversize and malformed frames",
        "a 2 MiB message (limit 1 MiB); 64 bytes of 0xFF after the handshake (reserved bits and opcode)",
        "close 1009 for the first, 1002 for the second; connection dropped",
        &format!("oversize: close {big:?}; garbage: close {code:?}, dropped: {}", eof.is_some()),
        big == Some(1009) && code == Some(1002) && eof.is_some(),
    );

    // Restart under load: SIGTERM drains (open relays go on, new connections are refused,
    // the rest are closed with 1001 at the deadline); clients reconnect to the new process.
    let drain_args = args(&["--drain-timeout", "3s", "--max-per-token", "10"]);
    let mut old = WsProxyProc::start(&drain_args).await;
    let addr = old.addr;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let (ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/websockify?token=echo"))
                .await
                .expect("connect");
        clients.push(ws);
    }
    let child = old.terminate().expect("running");
    rec.faults(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut during = 0;
    for ws in clients.iter_mut() {
        if echo_once(ws).await {
            during += 1;
        }
    }
    let refused_new =
        tokio_tungstenite::connect_async(format!("ws://{addr}/websockify?token=echo"))
            .await
            .is_err();
    let mut closes = Vec::new();
    for ws in clients.iter_mut() {
        closes.push(close_code(ws, 8).await);
    }
    let exited = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait().map(|s| s.success()).unwrap_or(false)
    })
    .await
    .unwrap_or(false);
    let new = WsProxyProc::start_at(addr, &drain_args).await;
    let mut back = 0;
    for _ in 0..5 {
        if let Ok((mut ws, _)) =
            tokio_tungstenite::connect_async(format!("ws://{}/websockify?token=echo", new.addr))
                .await
            && echo_once(&mut ws).await
        {
            back += 1;
        }
    }
    rec.case(
        "ws-proxy restarted under load",
        "5 relayed connections; SIGTERM with a 3 s drain; a new process on the same port; the clients reconnect",
        "open relays keep working during the drain; new connections refused; the rest closed with 1001 at the deadline; clean exit; all 5 reconnect",
        &format!(
            "echoed during drain {during}/5; new connection refused: {refused_new}; close codes {closes:?}; exited cleanly: {exited}; reconnected {back}/5"
        ),
        during == 5
            && refused_new
            && closes.iter().all(|c| *c == Some(1001))
            && exited
            && back == 5,
    );

    // A "VNC server" that answers with junk.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/websockify?token=junk", proxy.addr))
            .await
            .expect("connect");
    use futures_util::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let relayed = matches!(first, Ok(Some(Ok(Message::Binary(ref b)))) if !b.is_empty());
    let still_serving = tokio_tungstenite::connect_async(with_origin(&proxy, None))
        .await
        .is_ok();
    rec.faults(1);
    rec.case(
        "a VNC server that sends junk",
        "the target answers with 4 KiB of random bytes instead of an RFB banner",
        "relayed as bytes (parsing is the client's job in passthrough); ws-proxy unaffected",
        &format!("relayed: {relayed}; still serving others: {still_serving}"),
        relayed && still_serving,
    );
    rec.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn load() {
    require_root_and_tigervnc();
    let rec = Record::new("load");
    let soak = std::env::var_os("RELIABILITY_SOAK").is_some();
    let (clients, calls, n_users) = (100usize, if soak { 1000 } else { 100 }, 200usize);
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("agent-secret");
    new_secret(&secret);
    let idle = script("idle-session", "exec sleep 3600");
    let mut agents = Vec::new();
    for i in 0..4u8 {
        agents.push(
            AgentProc::start(AgentOptions {
                ip: [127, 0, 0, 10 + i].into(),
                secret_file: Some(secret.clone()),
                session_command: Some(idle.clone()),
                displays: Some((1000 + u32::from(i) * 60, 60)),
                extra: vec!["--geometry".into(), "640x480".into()],
                ..Default::default()
            })
            .await,
        );
    }
    let mut d = DispatcherProc::start(DispatcherOptions {
        agent_secret: secret.clone(),
        ..Default::default()
    })
    .await;
    for (i, a) in agents.iter().enumerate() {
        d.add_agent(&format!("b{i}"), a).await;
    }
    let users: Arc<Vec<TestUser>> = Arc::new((0..n_users).map(|_| TestUser::create()).collect());

    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first_token: Arc<std::sync::Mutex<HashMap<String, String>>> = Arc::default();
    let changed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let addr = d.addr;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (users, done, first_token, changed) = (
                users.clone(),
                done.clone(),
                first_token.clone(),
                changed.clone(),
            );
            tokio::spawn(async move {
                let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .expect("uri")
                    .connect_lazy();
                let mut c = vncdispatch_proto::v1::dispatcher_client::DispatcherClient::new(ch);
                let mut codes = BTreeMap::<String, usize>::new();
                let mut secrets = Vec::new();
                for i in 0..calls {
                    let u = &users[(client * 7 + i * 13) % users.len()];
                    let r = c
                        .dispatch(DispatchRequest {
                            username: u.name.clone(),
                            remote_ip: "192.0.2.1".into(),
                        })
                        .await;
                    *codes.entry(code(&r)).or_default() += 1;
                    if let Ok(s) = r {
                        let s = s.into_inner();
                        let mut first = first_token.lock().unwrap_or_else(|p| p.into_inner());
                        match first.get(&u.name) {
                            None => {
                                secrets.push(s.token.clone());
                                secrets.push(s.password.clone());
                                first.insert(u.name.clone(), s.token);
                            }
                            Some(t) if *t != s.token => {
                                changed
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(u.name.clone());
                            }
                            Some(_) => {}
                        }
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                (codes, secrets)
            })
        })
        .collect();
    // Restart the dispatcher once the calls are half done.
    let total = clients * calls;
    while done.load(std::sync::atomic::Ordering::Relaxed) < total / 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.restart().await;
    rec.faults(1);
    let mut codes = BTreeMap::<String, usize>::new();
    for t in tasks {
        let (c, secrets) = t.await.expect("client task");
        for (k, v) in c {
            *codes.entry(k).or_default() += v;
        }
        for s in secrets {
            rec.secret(&s);
        }
    }
    let took = started.elapsed();

    let stored = store_sessions(&d).await;
    let stored_users: HashSet<String> = stored.iter().map(|s| s.username.clone()).collect();
    // The agents share this machine, so each sees every desktop in /proc (other tests' too):
    // count each (user, pid) of this test's users once.
    let ours: HashSet<&str> = users.iter().map(|u| u.name.as_str()).collect();
    let mut running = HashSet::new();
    for a in &agents {
        running.extend(
            agent_sessions(a)
                .await
                .into_iter()
                .filter(|v| ours.contains(v.username.as_str()))
                .map(|v| (v.username, v.vnc_pid)),
        );
    }
    let running_set: HashSet<String> = running.iter().map(|(u, _)| u.clone()).collect();
    let xvnc_per_user: Vec<usize> = users.iter().map(|u| procs::xvnc_of(u.uid).len()).collect();
    let orphaned = running_set.difference(&stored_users).count();
    let duplicated = xvnc_per_user.iter().filter(|n| **n > 1).count()
        + (running.len() - running_set.len())
        + (stored.len() - stored_users.len());
    let changed: HashSet<String> = changed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    let lost = changed.len() + stored_users.difference(&running_set).count();
    rec.orphaned(orphaned as u64);
    rec.duplicated(duplicated as u64);
    rec.lost(lost as u64);
    rec.case(
        "many clients, many users, a dispatcher restart",
        &format!(
            "{clients} clients × {calls} Dispatch calls ({total} in all, {:.0} s) across {n_users} users on 4 agents; the dispatcher restarted (SIGTERM, start) half-way{}",
            took.as_secs_f64(),
            if soak { "" } else { " (short form; RELIABILITY_SOAK=1 runs 1,000 calls per client)" }
        ),
        "calls fail only while the dispatcher is down (Unavailable, Cancelled); at the end every user has exactly one session, store and agents agree, one Xvnc per user, no token changed",
        &format!(
            "calls by result {codes:?}; {} sessions stored, {} desktops on the agents, users with one Xvnc {}/{}; orphaned {orphaned}, duplicated {duplicated}, lost {lost}",
            stored.len(),
            running.len(),
            xvnc_per_user.iter().filter(|n| **n == 1).count(),
            n_users
        ),
        stored_users.len() == n_users
            && running_set == stored_users
            && xvnc_per_user.iter().all(|n| *n == 1)
            && orphaned + duplicated + lost == 0
            && codes
                .keys()
                .all(|k| ["OK", "Unavailable", "Cancelled"].contains(&k.as_str()))
            && codes.get("OK").copied().unwrap_or(0) * 2 >= total,
    );
    let mut logs = vec![d.log()];
    logs.extend(agents.iter().map(|a| a.log()));
    rec.scan_secrets(&logs);
    let _ = std::fs::remove_file(idle);
    rec.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets() {
    require_root_and_tigervnc();
    let rec = Record::new("secrets");
    let s = stack(&[]).await;
    let proxy = WsProxyProc::start(&[
        "--dispatcher".into(),
        format!("http://{}", s.dispatcher.addr),
        "--auth-proxy".into(),
    ])
    .await;
    let users: Vec<TestUser> = (0..3).map(|_| TestUser::create()).collect();
    let mut c = s.dispatcher.client().await;
    for u in &users {
        for ip in ["192.0.2.1", "192.0.2.2"] {
            let r = dispatch_from(&rec, &s.dispatcher, &u.name, ip)
                .await
                .expect("Dispatch");
            // A browser connection through the auth proxy, and a ResolveToken as ws-proxy does.
            if let Ok(mut ws) = ws_from(proxy.addr, [127, 0, 0, 1], &r.token).await {
                use futures_util::StreamExt;
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
            }
            let _ = c
                .resolve_token(ResolveTokenRequest {
                    token: r.token.clone(),
                })
                .await;
        }
    }
    // The CLI prints the session to its caller (that is its job), but must not leave the
    // secrets anywhere else: run it, then scan.
    let (status, _) = cli(
        "dispatcher",
        &[
            "session",
            "list",
            "--dispatcher",
            &format!("http://{}", s.dispatcher.addr),
        ],
        "",
    );
    let mut logs = vec![s.dispatcher.log(), s.agent().log(), proxy.log()];
    for u in &users {
        for e in std::fs::read_dir(u.home.join(".vnc"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                logs.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    rec.case(
        "what was exercised",
        "3 users × 2 Dispatch calls (new session, then a reconnect from a new IP), a relayed connection each through ws-proxy in auth-proxy mode, ResolveToken, `dispatcher session list`",
        "all work",
        &format!("session list exit {status}; {} logs collected (dispatcher, agent, ws-proxy, each user's Xvnc logs)", logs.len()),
        status == 0,
    );
    rec.scan_secrets(&logs);
    for u in &users {
        let _ = c
            .end_session(EndSessionRequest {
                username: u.name.clone(),
            })
            .await;
    }
    rec.finish();
}
