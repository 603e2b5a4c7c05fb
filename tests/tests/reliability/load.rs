//! Concurrency under load: many clients dispatching over many users on four agents while
//! the dispatcher restarts; afterwards every user has exactly one session and one desktop.
//! `RELIABILITY_SOAK=1` runs the long form.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vncdispatch_proto::v1::DispatchRequest;
use vncdispatch_tests::agent::{AgentOptions, AgentProc, new_secret};
use vncdispatch_tests::dispatcher::{DispatcherOptions, DispatcherProc};
use vncdispatch_tests::reliability::attack::{Script, agent_sessions, code, store_sessions};
use vncdispatch_tests::reliability::{Log, Record};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{procs, require_root_and_tigervnc};

/// A call's result for the tally. A graceful restart's GOAWAY can reach a call the client
/// had just sent: h2 reports it as a connection error (reason NO_ERROR, "not a result of an
/// error"), which tonic maps to Internal with an "h2 protocol error" message; the server never
/// saw that call, so it counts as the restart's, not as a dispatcher failure. Any other
/// Internal — one the dispatcher itself answered — is shown with its message and fails the case.
fn classify<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Err(s) if s.code() == tonic::Code::Internal => {
            if s.message().contains("not a result of an error")
                || s.message().starts_with("h2 protocol error")
            {
                "GoAway".to_owned()
            } else {
                format!("Internal: {}", s.message())
            }
        }
        _ => code(r),
    }
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
    let idle = Script::new("idle-session", "exec sleep 3600");
    let mut agents = Vec::new();
    for i in 0..4u8 {
        agents.push(
            AgentProc::start(AgentOptions {
                ip: [127, 0, 0, 10 + i].into(),
                secret_file: Some(secret.clone()),
                session_command: Some(idle.0.clone()),
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
                            ..Default::default()
                        })
                        .await;
                    *codes.entry(classify(&r)).or_default() += 1;
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

    // A listing that fails fails the case (its error is shown), rather than reading as empty.
    let mut failed_listings = Vec::new();
    let stored = store_sessions(&d).await.unwrap_or_else(|e| {
        failed_listings.push(format!("the store's ListSessions: {e}"));
        Vec::new()
    });
    let stored_users: HashSet<String> = stored.iter().map(|s| s.username.clone()).collect();
    // The agents share this machine, so each sees every desktop in /proc (other tests' too):
    // count each (user, pid) of this test's users once.
    let ours: HashSet<&str> = users.iter().map(|u| u.name.as_str()).collect();
    let mut running = HashSet::new();
    for a in &agents {
        match agent_sessions(a).await {
            Ok(servers) => running.extend(
                servers
                    .into_iter()
                    .filter(|v| ours.contains(v.username.as_str()))
                    .map(|v| (v.username, v.vnc_pid)),
            ),
            Err(e) => failed_listings.push(format!("agent {}'s ListSessions: {e}", a.addr)),
        }
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
        "calls fail only while the dispatcher is down (Unavailable, Cancelled, or the restart's GOAWAY reaching a call just sent); at the end every user has exactly one session, store and agents agree, one Xvnc per user, no token changed",
        &format!(
            "calls by result {codes:?}; {} sessions stored, {} desktops on the agents, users with one Xvnc {}/{}; orphaned {orphaned}, duplicated {duplicated}, lost {lost}{}",
            stored.len(),
            running.len(),
            xvnc_per_user.iter().filter(|n| **n == 1).count(),
            n_users,
            if failed_listings.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", failed_listings.join("; "))
            }
        ),
        failed_listings.is_empty()
            && stored_users.len() == n_users
            && running_set == stored_users
            && xvnc_per_user.iter().all(|n| *n == 1)
            && orphaned + duplicated + lost == 0
            && codes
                .keys()
                .all(|k| ["OK", "Unavailable", "Cancelled", "GoAway"].contains(&k.as_str()))
            && codes.get("OK").copied().unwrap_or(0) * 2 >= total,
    );
    let mut logs = vec![Log::new("dispatcher log", d.log())];
    logs.extend(
        agents
            .iter()
            .enumerate()
            .map(|(i, a)| Log::new(format!("agent b{i} log"), a.log())),
    );
    rec.scan_secrets(&logs);
    rec.finish();
}
