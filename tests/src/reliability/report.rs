//! docs/reliability.md from the suite's records, and the check that the committed report
//! still describes what the suite does.
//!
//! How it goes:
//! 1. [`load`] reads one record per group from `tests/artifacts/reliability/` and refuses the
//!    set unless every group is there, all come from one run of the test binary (same run
//!    id) and that run was at the commit the repository is at now. A group whose test
//!    panicked before writing its record leaves the previous run's file behind: that shows
//!    as a mixed set, never as a report that quietly mixes two runs.
//! 2. [`render`] writes the markdown: counts, then a table per group.
//! 3. [`differences`] compares two reports by their [`shape`]: the group headings, and per case
//!    its name, what was done, what was expected and whether it passed, with every run of
//!    digits replaced by `#`. Timings, counts, pids, user names and the run id vary from run
//!    to run and are ignored; a case renamed, added, removed, reworded or failing is not.
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// The groups in the order the report shows them, with their headings.
pub const GROUPS: [(&str, &str); 10] = [
    ("bad_input", "Bad input to every RPC and CLI"),
    ("filesystem", "Filesystem attacks on the agent"),
    ("display_process", "Display and process faults"),
    ("distributed", "Distributed faults"),
    ("tokens", "Tokens"),
    ("websocket", "WebSocket abuse"),
    ("load", "Concurrency under load"),
    ("secrets", "Secrets"),
    (
        "attacks",
        "Attacks on identities and encryption (mutual TLS, roles, VeNCrypt)",
    ),
    (
        "local_user",
        "A local desktop user against the root agent (traps, squatting, PAM)",
    ),
];

/// One run's records, one per group in [`GROUPS`] order.
#[derive(Debug, Clone)]
pub struct Records {
    /// The run they all come from.
    pub run: String,
    /// The commit that run was at.
    pub commit: String,
    /// The groups' documents.
    pub groups: Vec<Value>,
}

/// Reads every group's record from `dir` and checks they form one current run: refuses a
/// missing or unreadable group, records of more than one run, and a run at a commit other
/// than `head` (stale).
pub fn load(dir: &Path, head: &str) -> Result<Records, String> {
    let mut groups = Vec::new();
    let mut missing = Vec::new();
    for (group, _) in GROUPS {
        let path = dir.join(format!("{group}.json"));
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let doc: Value = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: not a record: {e}", path.display()))?;
                groups.push(doc);
            }
            Err(e) => missing.push(format!("{} ({e})", path.display())),
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "missing records, so the suite did not run every group: {}; run `cargo test -p vncdispatch-tests --test reliability` in full",
            missing.join(", ")
        ));
    }
    from_docs(groups, head)
}

/// The checks of [`load`] on documents already read, in [`GROUPS`] order.
pub fn from_docs(groups: Vec<Value>, head: &str) -> Result<Records, String> {
    let field = |d: &Value, k: &str| d[k].as_str().unwrap_or("none").to_owned();
    for ((group, _), doc) in GROUPS.iter().zip(&groups) {
        if doc["group"].as_str() != Some(group) {
            return Err(format!(
                "the record for {group} names group {}",
                doc["group"]
            ));
        }
    }
    let Some(first) = groups.first() else {
        return Err("no records".into());
    };
    let (run, commit) = (field(first, "run"), field(first, "commit"));
    let mixed: Vec<String> = groups
        .iter()
        .map(|d| format!("{}: run {}", field(d, "group"), field(d, "run")))
        .collect();
    if groups.iter().any(|d| field(d, "run") != run) || run == "none" {
        return Err(format!(
            "the records come from different runs of the suite (a group failed to finish, or was run alone): {}; run the whole suite again",
            mixed.join(", ")
        ));
    }
    if commit != head {
        return Err(format!(
            "the records are stale: run {run} was at commit {commit}, the repository is at {head}; run the suite again"
        ));
    }
    Ok(Records {
        run,
        commit,
        groups,
    })
}

fn cell(v: &Value) -> String {
    v.as_str()
        .unwrap_or_default()
        .replace('|', "\\|")
        .replace('\n', " ")
}

/// The report's markdown, and how many cases (passed, in all).
pub fn render(r: &Records) -> (String, usize, usize) {
    let mut totals = [0u64; 6];
    let mut body = String::new();
    let (mut cases, mut passed) = (0, 0);
    for ((_, heading), doc) in GROUPS.iter().zip(&r.groups) {
        for (i, k) in super::COUNTERS.iter().enumerate() {
            totals[i] += doc["counts"][*k].as_u64().unwrap_or(0);
        }
        // Writing to a String cannot fail.
        let _ = writeln!(body, "\n## {heading}\n");
        body.push_str("| case | what was done | expected | observed | result |\n");
        body.push_str("|---|---|---|---|---|\n");
        for c in doc["cases"].as_array().into_iter().flatten() {
            let pass = c["pass"] == Value::Bool(true);
            cases += 1;
            passed += usize::from(pass);
            let _ = writeln!(
                body,
                "| {} | {} | {} | {} | {} |",
                cell(&c["case"]),
                cell(&c["done"]),
                cell(&c["expected"]),
                cell(&c["observed"]),
                if pass { "pass" } else { "**FAIL**" }
            );
        }
    }
    let mut out = String::from(
        "# Reliability: faults and bad input\n\n\
         Regenerated by the suite: `cargo test -p vncdispatch-tests --test reliability` runs every \
         case below against the real processes (dispatcher, blade-agent with real Xvnc, ws-proxy, \
         FerretDB, Chromium-free WebSocket clients) and records it; \
         `cargo run -p vncdispatch-tests --bin reliability-report` writes this file, and with \
         `--check` (as `scripts/test.sh` runs it on every CI run) also fails when the cases, \
         what they do, what they expect or their results differ from the committed file.\n\n",
    );
    let _ = writeln!(out, "Run `{}` at commit `{}`.\n", r.run, r.commit);
    let _ = writeln!(out, "**{passed} of {cases} cases pass.**\n");
    out.push_str("| count | value |\n|---|---|\n");
    for (k, v) in super::COUNTERS.iter().zip(totals) {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    out.push_str(&body);
    (out, passed, cases)
}

/// Every run of ASCII digits replaced by `#`.
pub fn without_digits(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// A table row's cells (`\|` inside a cell is not a separator).
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let (mut out, mut cur) = (Vec::new(), String::new());
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cur.push('|');
                chars.next();
            }
            '|' => out.push(std::mem::take(&mut cur).trim().to_owned()),
            c => cur.push(c),
        }
    }
    out.push(cur.trim().to_owned());
    out
}

/// What must not change between runs: headings, counter names, and per case its name, what
/// was done, what was expected and the result, digits normalised. The observed column and
/// the run and commit line are left out.
pub fn shape(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in markdown.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            out.push(format!("## {h}"));
        } else if line.starts_with('|') && !line.starts_with("|---") {
            let c = cells(line);
            match c.as_slice() {
                [case, done, expected, _observed, result] if case != "case" => {
                    out.push(without_digits(&format!(
                        "{case} | {done} | {expected} | {result}"
                    )));
                }
                [count, _value] if count != "count" => out.push(format!("count: {count}")),
                _ => {}
            }
        }
    }
    out
}

/// How `fresh` differs from `committed` in shape; empty when only run-to-run numbers and
/// observations differ.
pub fn differences(committed: &str, fresh: &str) -> Vec<String> {
    let (old, new) = (shape(committed), shape(fresh));
    let mut out = Vec::new();
    for line in &old {
        if !new.contains(line) {
            out.push(format!("- {line}"));
        }
    }
    for line in &new {
        if !old.contains(line) {
            out.push(format!("+ {line}"));
        }
    }
    if out.is_empty() && old != new {
        out.push("the same cases in a different order".into());
    }
    if new.is_empty() {
        out.push("the regenerated report has no cases".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn docs(run: &str, commit: &str, pass: bool, case: &str) -> Vec<Value> {
        GROUPS
            .iter()
            .map(|(g, _)| {
                json!({
                    "group": g, "run": run, "commit": commit,
                    "cases": [{"case": case, "done": "3 calls in 1.5 s", "expected": "OK | fine",
                               "observed": format!("{g}: 42 pids"), "pass": pass}],
                    "counts": {"bad inputs tried": 3},
                })
            })
            .collect()
    }

    fn report(run: &str, pass: bool, case: &str) -> String {
        render(&from_docs(docs(run, "abc", pass, case), "abc").expect("records")).0
    }

    #[test]
    fn one_current_run_is_accepted_and_counted() {
        let r = from_docs(docs("1-2", "abc", true, "x"), "abc").expect("records");
        let (md, passed, all) = render(&r);
        let n = GROUPS.len();
        assert_eq!((passed, all), (n, n));
        assert!(
            md.contains(&format!("| bad inputs tried | {} |", 3 * n)),
            "{md}"
        );
        assert!(md.contains("Run `1-2` at commit `abc`"), "{md}");
    }

    #[test]
    fn mixed_stale_and_misnamed_records_are_refused() {
        let mut mixed = docs("1-2", "abc", true, "x");
        mixed[3]["run"] = json!("0-9");
        let e = from_docs(mixed, "abc").expect_err("mixed");
        assert!(
            e.contains("different runs") && e.contains("distributed: run 0-9"),
            "{e}"
        );
        let e = from_docs(docs("1-2", "old", true, "x"), "abc").expect_err("stale");
        assert!(e.contains("stale"), "{e}");
        let mut unstamped = docs("1-2", "abc", true, "x");
        for d in &mut unstamped {
            if let Some(o) = d.as_object_mut() {
                o.remove("run");
            }
        }
        assert!(from_docs(unstamped, "abc").is_err());
        let mut swapped = docs("1-2", "abc", true, "x");
        swapped.swap(0, 1);
        assert!(from_docs(swapped, "abc").is_err());
    }

    #[test]
    fn a_missing_group_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        for d in docs("1-2", "abc", true, "x").iter().skip(1) {
            let path = dir
                .path()
                .join(format!("{}.json", d["group"].as_str().expect("group")));
            std::fs::write(path, d.to_string()).expect("write");
        }
        let e = load(dir.path(), "abc").expect_err("missing");
        assert!(e.contains("bad_input.json"), "{e}");
        let first = &docs("1-2", "abc", true, "x")[0];
        std::fs::write(dir.path().join("bad_input.json"), first.to_string()).expect("write");
        assert!(load(dir.path(), "abc").is_ok());
    }

    #[test]
    fn only_numbers_observations_and_the_run_may_differ() {
        let a = report("1-2", true, "case 1");
        let b = report("77-88", true, "case 1").replace("1.5 s", "22.75 s");
        assert!(differences(&a, &b).is_empty(), "{:?}", differences(&a, &b));
        // The table cell's escaped `|` is part of the text, not a column.
        assert!(
            shape(&a).iter().any(|l| l.contains("OK | fine")),
            "{:?}",
            shape(&a)
        );
    }

    #[test]
    fn a_renamed_failing_or_missing_case_is_a_difference() {
        let a = report("1-2", true, "case one");
        assert!(!differences(&a, &report("1-2", true, "case two")).is_empty());
        assert!(!differences(&a, &report("1-2", false, "case one")).is_empty());
        let without_secrets = a.split("\n## Secrets").next().unwrap_or_default();
        assert!(!differences(&a, without_secrets).is_empty());
        assert!(!differences(&a, "").is_empty());
    }
}
