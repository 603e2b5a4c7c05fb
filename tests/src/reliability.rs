//! The record the fault and bad-input suite (`tests/tests/reliability/`) keeps: every case
//! with what was done, what was expected and what happened, plus the counts the report
//! leads with. Each group writes `tests/artifacts/reliability/<group>.json`, stamped with the
//! run (one id per run of the test binary) and the commit it ran at;
//! `cargo run -p vncdispatch-tests --bin reliability-report` turns one run's records into
//! `docs/reliability.md` and refuses a missing group or records of different runs
//! ([`report`]).
//!
//! Layout:
//! - [`Record`]: one group's cases and counts, and the secrets scan.
//! - [`attack`]: RPC and CLI helpers the groups share (status codes as the report shows them,
//!   dispatching while remembering the secrets issued, store/agent agreement).
//! - [`ws`]: WebSocket clients for the ws-proxy cases.
//! - [`stdout`]: services started with their stdout in a file, and finding where it goes.
//! - [`report`]: reading the records and writing or checking the report.
pub mod attack;
pub mod report;
pub mod stdout;
pub mod ws;

use serde_json::{Value, json};
use std::sync::{Mutex, OnceLock};
use vncdispatch_proto::v1::Session;

/// The counts at the head of the report.
pub const COUNTERS: [&str; 6] = [
    "bad inputs tried",
    "faults injected",
    "sessions lost",
    "sessions duplicated",
    "orphaned Xvnc",
    "secrets leaked",
];

/// This run: every group of one run shares it, so the report can tell a complete set of
/// records from one mixed with an older run's. `RELIABILITY_RUN` (set by scripts/test.sh)
/// spans the test binaries of one `cargo test`; without it, one binary's run.
pub fn run_id() -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| {
        if let Some(run) = std::env::var("RELIABILITY_RUN")
            .ok()
            .filter(|r| !r.is_empty() && r.len() <= 64)
        {
            return run;
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("{secs}-{}", std::process::id())
    })
}

/// The commit the repository is at (`git rev-parse HEAD`), or "unknown" without git.
pub fn commit() -> String {
    git(&["rev-parse", "HEAD"])
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// What `git ARGS` prints in the repository, if git is there and succeeds.
pub fn git(args: &[&str]) -> Option<String> {
    std::process::Command::new("git")
        .arg("-C")
        .arg(crate::repo())
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
}

/// A named piece of text the secrets scan searches: a service's log, a desktop's log, a
/// command's output.
#[derive(Debug, Clone)]
pub struct Log {
    /// What it is, as leaks are reported ("dispatcher log", "ws-proxy stdout").
    pub name: String,
    /// Its text.
    pub text: String,
    /// Whether it may be empty: a service's stdout usually is, while an empty log means its
    /// capture is broken.
    pub may_be_empty: bool,
}

impl Log {
    /// A log named `name`; the scan fails if it is empty.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Log {
        Log {
            name: name.into(),
            text: text.into(),
            may_be_empty: false,
        }
    }

    /// Output that may rightly be empty (a service's stdout), searched all the same.
    pub fn optional(name: impl Into<String>, text: impl Into<String>) -> Log {
        Log {
            may_be_empty: true,
            ..Log::new(name, text)
        }
    }
}

/// One group's record.
#[derive(Debug)]
pub struct Record {
    group: &'static str,
    cases: Mutex<Vec<Value>>,
    counts: Mutex<[u64; 6]>,
    secrets: Mutex<Vec<String>>,
}

impl Record {
    /// A new record for `group` (also the file name).
    pub fn new(group: &'static str) -> Record {
        Record {
            group,
            cases: Mutex::default(),
            counts: Mutex::default(),
            secrets: Mutex::default(),
        }
    }

    /// Records a case. Nothing panics here: every case is recorded, then [`Record::finish`]
    /// fails the test if any did not pass.
    pub fn case(&self, case: &str, done: &str, expected: &str, observed: &str, pass: bool) {
        self.cases.lock().unwrap_or_else(|p| p.into_inner()).push(json!({
            "case": case, "done": done, "expected": expected, "observed": observed, "pass": pass,
        }));
    }

    fn add(&self, i: usize, n: u64) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())[i] += n;
    }

    /// Counts bad inputs sent.
    pub fn bad_inputs(&self, n: u64) {
        self.add(0, n);
    }
    /// Counts faults injected.
    pub fn faults(&self, n: u64) {
        self.add(1, n);
    }
    /// Counts sessions lost.
    pub fn lost(&self, n: u64) {
        self.add(2, n);
    }
    /// Counts duplicated sessions.
    pub fn duplicated(&self, n: u64) {
        self.add(3, n);
    }
    /// Counts orphaned Xvnc processes.
    pub fn orphaned(&self, n: u64) {
        self.add(4, n);
    }

    /// Remembers a secret (an issued password or token, a service's shared secret) for the
    /// leak scan.
    pub fn secret(&self, s: &str) {
        let mut secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        if !s.is_empty() && !secrets.iter().any(|k| k == s) {
            secrets.push(s.to_owned());
        }
    }

    /// Remembers a session's token and password for the leak scan.
    pub fn session(&self, s: &Session) {
        self.secret(&s.token);
        self.secret(&s.password);
    }

    /// Scans every process's argv and environment and the given logs for the secrets
    /// remembered so far; records the case and counts what leaked. A scan that could not
    /// find anything fails: no secrets to look for, no logs, or a log that is empty (its
    /// capture is broken, so searching it proves nothing).
    pub fn scan_secrets(&self, logs: &[Log]) {
        let secrets = self
            .secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let procs = crate::procs::all();
        let mut leaks = Vec::new();
        for s in &secrets {
            for p in &procs {
                if crate::procs::contains(&p.cmdline, s.as_bytes())
                    || crate::procs::contains(&p.environ, s.as_bytes())
                {
                    leaks.push(format!("pid {} ({})", p.pid, p.comm));
                }
            }
            for log in logs {
                if log.text.contains(s.as_str()) {
                    leaks.push(log.name.clone());
                }
            }
        }
        self.add(5, leaks.len() as u64);
        let empty: Vec<&str> = logs
            .iter()
            .filter(|l| !l.may_be_empty && l.text.trim().is_empty())
            .map(|l| l.name.as_str())
            .collect();
        // Which logs were searched goes in the observed column: their names (users, how the
        // wrappers capture stdout) may differ from run to run, what was done may not.
        let names: Vec<&str> = logs.iter().map(|l| l.name.as_str()).collect();
        let observed = match (leaks.is_empty(), empty.is_empty()) {
            (true, true) => format!("none found in {}", names.join(", ")),
            (true, false) => format!("none found, but empty (not captured): {empty:?}"),
            (false, _) => leaks.join(", "),
        };
        self.case(
            "secrets scan",
            &format!(
                "searched {} processes' argv and environment and {} logs ({} lines) for the {} secrets issued or used in this group",
                procs.len(),
                logs.len(),
                logs.iter().map(|l| l.text.lines().count()).sum::<usize>(),
                secrets.len()
            ),
            "none found",
            &observed,
            leaks.is_empty()
                && empty.is_empty()
                && !logs.is_empty()
                && !secrets.is_empty()
                && !procs.is_empty(),
        );
    }

    /// Writes the group's file and fails if a case failed or a loss count is not zero.
    pub fn finish(self) {
        let cases = self.cases.into_inner().unwrap_or_else(|p| p.into_inner());
        let counts = self.counts.into_inner().unwrap_or_else(|p| p.into_inner());
        let dir = crate::artifact("reliability");
        std::fs::create_dir_all(&dir).expect("artifacts");
        let file = dir.join(format!("{}.json", self.group));
        let doc = json!({
            "group": self.group,
            "run": run_id(),
            "commit": commit(),
            "cases": cases,
            "counts": COUNTERS.iter().zip(counts).map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        });
        std::fs::write(&file, serde_json::to_string_pretty(&doc).expect("json")).expect("write");
        let failed: Vec<String> = cases
            .iter()
            .filter(|c| c["pass"] != json!(true))
            .map(|c| {
                format!(
                    "{}: expected {}, observed {}",
                    c["case"], c["expected"], c["observed"]
                )
            })
            .collect();
        assert!(!cases.is_empty(), "{}: no case recorded", self.group);
        assert!(
            failed.is_empty(),
            "{} failed:\n{}",
            self.group,
            failed.join("\n")
        );
        assert_eq!(
            &counts[2..],
            &[0, 0, 0, 0],
            "{}: losses counted",
            self.group
        );
    }
}
