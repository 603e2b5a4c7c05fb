//! What several groups of the fault and bad-input suite do the same way: show a call's
//! status code as the report does, run a CLI, dispatch while remembering the secrets issued,
//! list what the store and the agents hold, and compare the two. A listing that fails is an
//! error here, never an empty list: "nothing changed" must not pass because nothing answered.
use super::Record;
use crate::agent::AgentProc;
use crate::dispatcher::DispatcherProc;
use crate::users::TestUser;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Status;
use vncdispatch_proto::v1::{
    DispatchRequest, ListSessionsRequest, ListVncServersRequest, Session, SessionInfo,
    StartSessionRequest, VncServer,
};

/// The status code of a call's result, as the report shows it.
pub fn code<T>(r: &Result<T, Status>) -> String {
    match r {
        Ok(_) => "OK".to_owned(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// An error's message, or nothing for a success.
pub fn message<T>(r: &Result<T, Status>) -> String {
    r.as_ref()
        .err()
        .map(|e| e.message().to_owned())
        .unwrap_or_default()
}

/// Shows control characters and long inputs readably in the report.
pub fn shown(s: &str) -> String {
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

/// What a CLI run left: its exit code, the first non-empty line of stderr, and stdout.
#[derive(Debug, Clone)]
pub struct CliRun {
    /// Exit code (-1 when killed by a signal).
    pub status: i32,
    /// The first non-empty line of stderr (the error message, for a refusal).
    pub first_error: String,
    /// Everything it printed on stdout.
    pub stdout: String,
}

/// Runs one of the workspace's binaries with `args`, writing `stdin` to it.
pub fn cli(bin: &str, args: &[&str], stdin: &str) -> CliRun {
    let mut child = Command::new(crate::workspace_bin(bin))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(mut i) = child.stdin.take() {
        use std::io::Write;
        // A program that refuses before reading its stdin closes it: not an error here.
        let _ = i.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    CliRun {
        status: out.status.code().unwrap_or(-1),
        first_error: err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// An agent `StartSession` request for `user` with a valid password.
pub fn start(user: &str) -> StartSessionRequest {
    StartSessionRequest {
        username: user.into(),
        password: "s3cret12".into(),
        view_only_password: String::new(),
        geometry: None,
    }
}

/// Dispatch from 192.0.2.1, remembering the issued token and password for the leak scan.
pub async fn dispatch_as(rec: &Record, d: &DispatcherProc, user: &str) -> Result<Session, Status> {
    dispatch_from(rec, d, user, "192.0.2.1").await
}

/// Dispatch from `ip`, remembering the issued token and password for the leak scan.
pub async fn dispatch_from(
    rec: &Record,
    d: &DispatcherProc,
    user: &str,
    ip: &str,
) -> Result<Session, Status> {
    let r = d
        .client()
        .await
        .dispatch(DispatchRequest {
            username: user.into(),
            remote_ip: ip.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner());
    if let Ok(s) = &r {
        rec.session(s);
    }
    r
}

/// Every session the dispatcher's store holds.
pub async fn store_sessions(d: &DispatcherProc) -> Result<Vec<SessionInfo>, Status> {
    d.client()
        .await
        .list_sessions(ListSessionsRequest::default())
        .await
        .map(|r| r.into_inner().sessions)
}

/// Every desktop the agent reports running (on this host: other tests' too).
pub async fn agent_sessions(a: &AgentProc) -> Result<Vec<VncServer>, Status> {
    a.client()
        .await
        .list_sessions(ListVncServersRequest::default())
        .await
        .map(|r| r.into_inner().servers)
}

/// How the store and the agents disagree about a set of users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// Desktops running that the store does not know (orphaned Xvnc).
    pub orphaned: usize,
    /// Users with more than one Xvnc.
    pub duplicated: usize,
    /// Sessions stored whose desktop no agent runs (lost).
    pub half_stored: usize,
}

impl Agreement {
    /// True when the store and the agents agree and nobody has two desktops.
    pub fn is_clean(&self) -> bool {
        self.orphaned + self.duplicated + self.half_stored == 0
    }
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "orphaned {}, duplicated {}, half-stored {}",
            self.orphaned, self.duplicated, self.half_stored
        )
    }
}

/// Compares the store's sessions with the agents' desktops for `users`, and counts what is
/// wrong on `rec` (orphaned, duplicated, lost). Fails when a listing fails: a store or agent
/// that does not answer must not read as one that agrees.
pub async fn agreement(
    rec: &Record,
    d: &DispatcherProc,
    agents: &[&AgentProc],
    users: &[&TestUser],
) -> Result<Agreement, String> {
    // Agents list every desktop on their host, and the tests' agents share this one: look
    // only at the users in question.
    let ours: HashSet<&str> = users.iter().map(|u| u.name.as_str()).collect();
    let stored: HashSet<String> = store_sessions(d)
        .await
        .map_err(|e| format!("the store's ListSessions failed: {e}"))?
        .into_iter()
        .map(|s| s.username)
        .filter(|u| ours.contains(u.as_str()))
        .collect();
    let mut running = HashSet::new();
    for a in agents {
        for v in agent_sessions(a)
            .await
            .map_err(|e| format!("agent {}'s ListSessions failed: {e}", a.addr))?
        {
            if ours.contains(v.username.as_str()) {
                running.insert(v.username);
            }
        }
    }
    let found = Agreement {
        orphaned: running.difference(&stored).count(),
        duplicated: users
            .iter()
            .filter(|u| crate::procs::xvnc_of(u.uid).len() > 1)
            .count(),
        half_stored: stored.difference(&running).count(),
    };
    rec.orphaned(found.orphaned as u64);
    rec.duplicated(found.duplicated as u64);
    rec.lost(found.half_stored as u64);
    Ok(found)
}

/// An agreement as the report shows it: the counts, or why they could not be taken.
pub fn shown_agreement(a: &Result<Agreement, String>) -> String {
    match a {
        Ok(a) => a.to_string(),
        Err(e) => e.clone(),
    }
}

/// True when the agreement was taken and is clean.
pub fn agrees(a: &Result<Agreement, String>) -> bool {
    a.as_ref().is_ok_and(Agreement::is_clean)
}

/// The gRPC health status of the whole server at `addr`.
pub async fn health_status(addr: SocketAddr) -> String {
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

/// Polls the health status until it is `want` or `secs` pass; returns the last one seen.
pub async fn wait_health(addr: SocketAddr, want: &str, secs: u64) -> String {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = health_status(addr).await;
        if now == want || Instant::now() > until {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An executable every user can run (a fake Xvnc, a desktop session), removed on drop.
#[derive(Debug)]
pub struct Script(pub PathBuf);

impl Script {
    /// Writes `/var/tmp/vncdispatch-<name>-<pid>` running `body` under /bin/sh.
    pub fn new(name: &str, body: &str) -> Script {
        use std::os::unix::fs::PermissionsExt;
        let p = PathBuf::from(format!(
            "/var/tmp/vncdispatch-{name}-{}",
            std::process::id()
        ));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Script(p)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        // Best effort: a leftover file in /var/tmp harms nothing.
        let _ = std::fs::remove_file(&self.0);
    }
}
