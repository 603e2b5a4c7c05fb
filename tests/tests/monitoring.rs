//! The operators' monitoring files: `deploy/prometheus/vncdispatch-rules.yml` passes
//! `promtool check rules`, `deploy/grafana/vncdispatch.json` is a dashboard Grafana imports,
//! and every metric either names is one the services export. Each check is also shown a
//! broken file, so a check that passes everything fails the test.
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn repo() -> std::path::PathBuf {
    vncdispatch_tests::repo()
}

fn promtool(rules: &Path) -> (bool, String) {
    let out = Command::new("/usr/local/bin/promtool")
        .args(["check", "rules"])
        .arg(rules)
        .output()
        .unwrap_or_else(|e| panic!("promtool: {e} (scripts/install-deps.sh installs it)"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every `vncdispatch_…` name in `text`, histogram series suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("vncdispatch_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        out.insert(base.to_owned());
    }
    out
}

/// The metric names the services record: the string literals in their sources' metric calls.
fn exported() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for krate in ["blade-agent", "dispatcher", "ws-proxy", "proto"] {
        let mut stack = vec![repo().join(krate).join("src")];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).expect("src").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).expect("source");
                    for line in text.lines().filter(|l| {
                        ["counter!(", "gauge!(", "histogram!(", "\"vncdispatch_"]
                            .iter()
                            .any(|m| l.contains(m))
                            && !l.trim_start().starts_with("//")
                    }) {
                        out.extend(
                            metric_names(line)
                                .into_iter()
                                .filter(|n| line.contains(&format!("\"{n}\""))),
                        );
                    }
                }
            }
        }
    }
    out
}

#[test]
fn alert_rules_pass_promtool_and_a_broken_rule_does_not() {
    let rules = repo().join("deploy/prometheus/vncdispatch-rules.yml");
    let (ok, said) = promtool(&rules);
    assert!(ok, "{said}");
    assert!(said.contains("SUCCESS"), "{said}");
    let good = std::fs::read_to_string(&rules).expect("rules");
    let bad = good.replacen(
        "expr: vncdispatch_dispatcher_blade_healthy == 0",
        "expr: vncdispatch_dispatcher_blade_healthy ==",
        1,
    );
    assert_ne!(bad, good, "the edit did not apply");
    let dir = tempfile::tempdir().expect("dir");
    let f = dir.path().join("rules.yml");
    std::fs::write(&f, bad).expect("write");
    assert!(
        !promtool(&f).0,
        "a rule with a broken expression passed promtool"
    );
}

#[test]
fn the_dashboard_and_rules_name_only_metrics_the_services_export() {
    let exported = exported();
    assert!(
        exported.contains("vncdispatch_dispatcher_dispatches_total")
            && exported.contains("vncdispatch_wsproxy_relayed_bytes_total"),
        "the source scan found too little: {exported:?}"
    );
    let dashboard_text =
        std::fs::read_to_string(repo().join("deploy/grafana/vncdispatch.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for p in panels {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {} has no query",
            p["title"]
        );
    }
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/vncdispatch-rules.yml"))
        .expect("rules");
    for (file, text) in [("dashboard", &dashboard_text), ("rules", &rules)] {
        let unknown: Vec<String> = metric_names(text)
            .into_iter()
            .filter(|n| !exported.contains(n))
            .collect();
        assert!(
            unknown.is_empty(),
            "the {file} names metrics no service exports: {unknown:?}"
        );
    }
    // And the check can fail.
    assert!(!exported.contains("vncdispatch_no_such_metric_total"));
    assert!(
        metric_names("rate(vncdispatch_no_such_metric_total[5m])")
            .contains("vncdispatch_no_such_metric_total")
    );
}
