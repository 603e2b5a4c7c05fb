//! Bad input to every RPC and CLI: hostile usernames, IPs, tokens, blade fields, passwords,
//! geometries, oversize and unknown-field messages, and the same on the command line; then
//! proof that none of it changed the store or started a desktop.
use std::collections::BTreeMap;
use tonic::Status;
use vncdispatch_proto::v1::{
    AddBladeRequest, DispatchRequest, DrainBladeRequest, EndSessionRequest, Geometry,
    ListBladesRequest, ListSessionsRequest, ListVncServersRequest, RemoveBladeRequest,
    ResolveTokenRequest, StartSessionRequest, StopSessionRequest,
};
use vncdispatch_tests::reliability::attack::{agent_sessions, cli, code, shown, store_sessions};
use vncdispatch_tests::reliability::{Log, Record};
use vncdispatch_tests::rig::Rig;
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{procs, require_root_and_tigervnc};

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
    let s = Rig::with_dispatcher_args(&[]).await;
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
                ..Default::default()
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
                view_only_password: String::new(),
                geometry: None,
            })
            .await;
        *observed.entry(format!("agent {}", code(&r))).or_default() += 1;
        let r = agent
            .stop_session(StopSessionRequest {
                username: name.clone(),
                vnc_pid: 0,
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
                ..Default::default()
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

    // Pool names become metric labels and log fields: only the pool rule's set gets through.
    let pools = [
        "GPU".to_owned(),
        "a b".into(),
        "-x".into(),
        "lab\n".into(),
        "../lab".into(),
        "x;rm -rf /".into(),
        "p".repeat(33),
        "läb".into(),
        "lab\0".into(),
        "{pool=\"x\"}".into(),
    ];
    let desktops_before = procs::xvnc_of(user.uid).len();
    let mut observed = BTreeMap::<String, usize>::new();
    for pool in &pools {
        let r = c
            .dispatch(DispatchRequest {
                username: user.name.clone(),
                remote_ip: "192.0.2.1".into(),
                pool: pool.clone(),
            })
            .await;
        *observed.entry(code(&r)).or_default() += 1;
    }
    let unknown = c
        .dispatch(DispatchRequest {
            username: user.name.clone(),
            remote_ip: "192.0.2.1".into(),
            pool: "nosuchpool".into(),
        })
        .await;
    let desktops_after = procs::xvnc_of(user.uid).len();
    rec.bad_inputs(pools.len() as u64 + 1);
    rec.case(
        "Dispatch: hostile pool names",
        "upper case, space, leading `-`, newline, `../`, shell text, 33 bytes, non-ASCII, NUL, a metric-label lookalike; then a well-formed pool no blade serves — for a real user",
        "InvalidArgument for every malformed one, FailedPrecondition naming the pools there are for the unknown one; no desktop started",
        &format!(
            "{observed:?}; unknown pool: {}{}; the user's desktops {desktops_before} → {desktops_after}",
            code(&unknown),
            unknown
                .as_ref()
                .err()
                .map(|e| format!(" ({})", e.message()))
                .unwrap_or_default()
        ),
        observed.len() == 1
            && observed.contains_key("InvalidArgument")
            && unknown
                .as_ref()
                .is_err_and(|e| e.code() == tonic::Code::FailedPrecondition && e.message().contains("pools with blades: default"))
            && desktops_after == desktops_before,
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
            .resolve_token(ResolveTokenRequest {
                token: t.clone(),
                attached: false,
            })
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
                ..Default::default()
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
                view_only_password: String::new(),
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
                view_only_password: String::new(),
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
            ..Default::default()
        })
        .await;
    let r2 = agent
        .start_session(StartSessionRequest {
            username: huge,
            password: "s3cret12".into(),
            view_only_password: String::new(),
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
        rec.session(s.get_ref());
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
        // A program run for users is named by its path, not looked up on a PATH.
        ("blade-agent", vec!["serve", "--session-command", "twm"], ""),
        ("ws-proxy", vec!["serve", "--max-per-ip", "-1"], ""),
        // A relay's timers cannot tick every 0 s (tokio's interval panics).
        ("ws-proxy", vec!["serve", "--ping-interval", "0s"], ""),
        ("ws-proxy", vec!["serve", "--config", &bad_config], ""),
        ("dispatcher", vec!["serve", "--config", &unknown_key], ""),
    ];
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for (bin, args, stdin) in &clis {
        let run = cli(bin, args, stdin);
        let (status, first) = (run.status, run.first_error);
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

    // The agent lists every desktop on this host (other tests' too): only this test's user
    // and the hostile names could be ours. A listing that fails fails the case.
    let stored = store_sessions(&s.dispatcher).await;
    let running = agent_sessions(s.agent()).await.map(|v| {
        v.into_iter()
            .filter(|v| v.username == user.name || names.contains(&v.username))
            .collect::<Vec<_>>()
    });
    let count = |r: Result<usize, Status>| {
        r.map_or_else(|e| format!("(listing failed: {e})"), |n| n.to_string())
    };
    rec.case(
        "Nothing changed",
        "after all of the above: the store's sessions and the agent's desktops",
        "none (the one valid Dispatch was ended)",
        &format!(
            "{} sessions stored, {} desktops running",
            count(stored.as_ref().map(Vec::len).map_err(Clone::clone)),
            count(running.as_ref().map(Vec::len).map_err(Clone::clone)),
        ),
        stored.is_ok_and(|v| v.is_empty()) && running.is_ok_and(|v| v.is_empty()),
    );
    rec.scan_secrets(&[
        Log::new("dispatcher log", s.dispatcher.log()),
        Log::new("agent log", s.agent().log()),
    ]);
    rec.finish();
}
