//! The record the fault and bad-input suite (`tests/tests/reliability.rs`) keeps: every case
//! with what was done, what was expected and what happened, plus the counts the report
//! leads with. Each group writes `tests/artifacts/reliability/<group>.json`;
//! `cargo run -p vncdispatch-tests --bin reliability-report` turns them into
//! `docs/reliability.md` (scripts/test.sh does, after the tests).
use serde_json::{Value, json};
use std::sync::Mutex;

/// The counts at the head of the report.
pub const COUNTERS: [&str; 6] = [
    "bad inputs tried",
    "faults injected",
    "sessions lost",
    "sessions duplicated",
    "orphaned Xvnc",
    "secrets leaked",
];

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

    /// Remembers an issued password or token for the leak scan.
    pub fn secret(&self, s: &str) {
        if !s.is_empty() {
            self.secrets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s.to_owned());
        }
    }

    /// Scans every process's argv and environment and the given logs for the secrets
    /// remembered so far; records the case and counts what leaked.
    pub fn scan_secrets(&self, logs: &[String]) {
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
            for (i, log) in logs.iter().enumerate() {
                if log.contains(s.as_str()) {
                    leaks.push(format!("log #{i}"));
                }
            }
        }
        self.add(5, leaks.len() as u64);
        self.case(
            "secrets scan",
            &format!(
                "searched {} processes' argv and environment and {} service logs ({} lines) for the {} passwords and tokens issued in this group",
                procs.len(),
                logs.len(),
                logs.iter().map(|l| l.lines().count()).sum::<usize>(),
                secrets.len()
            ),
            "none found",
            &if leaks.is_empty() {
                "none found".to_owned()
            } else {
                leaks.join(", ")
            },
            leaks.is_empty(),
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
