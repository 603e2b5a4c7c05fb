//! Autobahn|Testsuite's fuzzingclient against a real ws-proxy in front of a TCP echo target.
//!
//! Every case must be OK, NON-STRICT or INFORMATIONAL, except the ones listed in
//! `tests/autobahn/expected-refusals.txt`, which must end exactly as listed there (text frames
//! refused with 1003, as websockify does). The reports are written to
//! `tests/artifacts/autobahn/`; the result kept in the repo is `docs/autobahn.md`, and this
//! test fails if any case's class, behaviour or close behaviour, or the count of a class, no
//! longer matches it.
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vncdispatch_tests::wsproxy::WsProxyProc;

fn repo() -> PathBuf {
    vncdispatch_tests::repo()
}

/// An echo target that answers each burst in one write: a message ws-proxy wrote at once
/// comes back as one read, so the echo is one WebSocket message again.
async fn coalescing_echo() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    let mut len = n;
                    // Gather the rest of the burst: the relay writes a message with one
                    // write_all, which loopback may deliver in pieces.
                    while len < buf.len() {
                        match tokio::time::timeout(
                            Duration::from_millis(20),
                            s.read(&mut buf[len..]),
                        )
                        .await
                        {
                            Ok(Ok(m)) if m > 0 => len += m,
                            _ => break,
                        }
                    }
                    if s.write_all(&buf[..len]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// `CASE CODE` lines; code `None` means ws-proxy must not close the connection itself.
fn expected_refusals() -> BTreeMap<String, Option<u64>> {
    let text = std::fs::read_to_string(repo().join("tests/autobahn/expected-refusals.txt"))
        .expect("expected-refusals.txt");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (case, code) = l.split_once(' ').expect("CASE CODE");
            let code = match code.trim() {
                "-" => None,
                c => Some(c.parse().expect("close code")),
            };
            (case.to_string(), code)
        })
        .collect()
}

/// What one case did: its class (pass, or refused as listed), and Autobahn's verdicts on its
/// behaviour and on its close behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    class: String,
    behavior: String,
    close: String,
}

impl Outcome {
    fn new(class: &str, behavior: &str, close: &str) -> Outcome {
        Outcome {
            class: class.into(),
            behavior: behavior.into(),
            close: close.into(),
        }
    }
}

/// The kept result: each case's row of the `| case | class | behavior | close behavior |` table
/// in docs/autobahn.md, and the per-class counts listed above it (`- pass: N cases`).
fn committed() -> (BTreeMap<String, Outcome>, BTreeMap<String, usize>) {
    let text = std::fs::read_to_string(repo().join("docs/autobahn.md")).expect("docs/autobahn.md");
    let rows = text.lines().filter_map(table_row).collect();
    let counts = text
        .lines()
        .filter_map(|l| {
            let (class, n) = l.strip_prefix("- ")?.split_once(": ")?;
            Some((class.to_string(), n.strip_suffix(" cases")?.parse().ok()?))
        })
        .collect();
    (rows, counts)
}

/// A `| 1.2.3 | class | behavior | close behavior |` line as the case and its outcome.
fn table_row(line: &str) -> Option<(String, Outcome)> {
    let cols: Vec<&str> = line.split('|').map(str::trim).collect();
    let [_, case, class, behavior, close, _] = cols.as_slice() else {
        return None;
    };
    let is_case = case.chars().next().is_some_and(|c| c.is_ascii_digit());
    is_case.then(|| (case.to_string(), Outcome::new(class, behavior, close)))
}

/// Where this run's outcomes and class counts differ from the kept ones.
fn differences(rows: &[(String, Outcome)], counts: &BTreeMap<String, usize>) -> Vec<String> {
    let regenerate = "regenerate it from tests/artifacts/autobahn/summary.md";
    let (kept, kept_counts) = committed();
    let mut problems = Vec::new();
    for (id, o) in rows {
        if kept.get(id) != Some(o) {
            problems.push(format!(
                "{id}: {} / {} / close {}, docs/autobahn.md says {:?} ({regenerate})",
                o.class,
                o.behavior,
                o.close,
                kept.get(id)
            ));
        }
    }
    if kept.len() != rows.len() {
        problems.push(format!(
            "docs/autobahn.md lists {} cases, this run {}",
            kept.len(),
            rows.len()
        ));
    }
    if &kept_counts != counts {
        problems.push(format!(
            "docs/autobahn.md counts {kept_counts:?}, this run {counts:?} ({regenerate})"
        ));
    }
    problems
}

fn case_order(id: &str) -> Vec<u32> {
    id.split('.').filter_map(|p| p.parse().ok()).collect()
}

#[tokio::test]
async fn autobahn_fuzzingclient_against_ws_proxy() {
    let wstest = std::env::var("WSTEST").unwrap_or_else(|_| "/usr/local/bin/wstest".into());
    assert!(
        Path::new(&wstest).exists(),
        "{wstest} is missing: run scripts/install-autobahn.sh (scripts/test.sh does)"
    );
    let echo = coalescing_echo().await;
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("fuzz: 127.0.0.1:{echo}\n")).expect("tokens");
    let proxy = WsProxyProc::start(&[
        "--token-file".into(),
        tokens.display().to_string(),
        "--web".into(),
        "/usr/share/novnc".into(),
        // The suite runs its cases one after another on fresh connections.
        "--max-per-token".into(),
        "8".into(),
    ])
    .await;

    let out = repo().join("tests/artifacts/autobahn");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("artifacts");
    let mut spec: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/autobahn/fuzzingclient.json")).expect("spec"),
    )
    .expect("spec json");
    spec["outdir"] = out.display().to_string().into();
    spec["servers"] = serde_json::json!([{
        "agent": "ws-proxy",
        "url": format!("ws://{}/websockify?token=fuzz", proxy.addr),
    }]);
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("write spec");
    let run = tokio::process::Command::new(&wstest)
        .args(["-m", "fuzzingclient", "-s"])
        .arg(&spec_path)
        .current_dir(dir.path())
        .output()
        .await
        .expect("run wstest");
    assert!(
        run.status.success(),
        "wstest failed: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );

    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).expect("index.json"))
            .expect("index json");
    let cases = index["ws-proxy"].as_object().expect("ws-proxy results");
    assert!(cases.len() > 200, "only {} cases ran", cases.len());
    let refusals = expected_refusals();
    let mut problems = Vec::new();
    let mut rows = Vec::new();
    let mut ids: Vec<&String> = cases.keys().collect();
    ids.sort_by_key(|id| case_order(id));
    for id in ids {
        let c = &cases[id];
        let behavior = c["behavior"].as_str().unwrap_or("?");
        let close = c["behaviorClose"].as_str().unwrap_or("?");
        let class = match refusals.get(id) {
            Some(expected) => {
                let report: Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join(c["reportfile"].as_str().unwrap_or("")))
                        .unwrap_or_default(),
                )
                .unwrap_or(Value::Null);
                let ok = match expected {
                    Some(code) => {
                        report["remoteCloseCode"].as_u64() == Some(*code)
                            && report["closedByMe"] == Value::Bool(false)
                    }
                    None => report["closedByMe"] == Value::Bool(true),
                };
                if !ok {
                    problems.push(format!(
                        "{id}: expected refusal {expected:?}, got remoteCloseCode {} closedByMe {}",
                        report["remoteCloseCode"], report["closedByMe"]
                    ));
                }
                "refused as listed"
            }
            None => {
                let pass = ["OK", "NON-STRICT", "INFORMATIONAL"];
                // A case that sends a text message before its real test gets the 1003 text
                // refusal first: the behaviour passes, only the close code differs.
                let text_refused =
                    close == "WRONG CODE" && c["remoteCloseCode"].as_u64() == Some(1003);
                if !pass.contains(&behavior) || !(pass.contains(&close) || text_refused) {
                    problems.push(format!("{id}: {behavior} / close {close}"));
                }
                "pass"
            }
        };
        rows.push((id.clone(), Outcome::new(class, behavior, close)));
    }
    for id in refusals.keys() {
        if !cases.contains_key(id) {
            problems.push(format!("{id}: listed as a refusal but did not run"));
        }
    }

    // The summary as this run saw it, for docs/autobahn.md.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut table =
        String::from("| case | class | behavior | close behavior |\n|---|---|---|---|\n");
    for (id, o) in &rows {
        *counts.entry(o.class.clone()).or_default() += 1;
        table.push_str(&format!(
            "| {id} | {} | {} | {} |\n",
            o.class, o.behavior, o.close
        ));
    }
    let mut md = String::new();
    for (class, n) in &counts {
        md.push_str(&format!("- {class}: {n} cases\n"));
    }
    md.push('\n');
    md.push_str(&table);
    std::fs::write(out.join("summary.md"), &md).expect("summary");

    // Every case must have done exactly what the kept result says: class, behaviour and close
    // behaviour, so a case that turns NON-STRICT or WRONG CODE is caught, not only a failure.
    problems.extend(differences(&rows, &counts));
    assert!(
        problems.is_empty(),
        "Autobahn problems (reports in {}):\n{}\nws-proxy log:\n{}",
        out.display(),
        problems.join("\n"),
        proxy
            .log()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
