//! Writes docs/reliability.md from the fault and bad-input suite's records
//! (tests/artifacts/reliability/*.json, written by `cargo test --test reliability`).
//!
//! `reliability-report` refuses (exit 1) records that are not one complete run at the
//! current commit, and exits 1 after writing a report with a failing case.
//! `reliability-report --check` also compares the new report with the one it replaces (the
//! committed file: `git show HEAD:docs/reliability.md`, or the file on disk without git) and
//! exits 1 when a case was added, removed, renamed or reworded, or its
//! result changed — run-to-run numbers and observations aside. It writes the new file either
//! way, so `git diff docs/reliability.md` shows the change to commit if it was intended.
use std::process::ExitCode;
use vncdispatch_tests::reliability::{self, commit, report};

fn main() -> ExitCode {
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!(
                "reliability-report: unknown argument {other:?}; usage: reliability-report [--check]"
            );
            return ExitCode::from(2);
        }
    };
    let dir = vncdispatch_tests::artifact("reliability");
    let records = match report::load(&dir, &commit()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reliability-report: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (markdown, passed, cases) = report::render(&records);
    let target = vncdispatch_tests::repo().join("docs/reliability.md");
    let before = committed(&target);
    if let Err(e) = std::fs::write(&target, &markdown) {
        eprintln!("reliability-report: writing {}: {e}", target.display());
        return ExitCode::FAILURE;
    }
    println!(
        "wrote {} from run {} ({passed}/{cases} cases pass)",
        target.display(),
        records.run
    );
    let mut ok = passed == cases;
    if !ok {
        eprintln!("reliability-report: {} cases fail", cases - passed);
    }
    if check {
        let diff = report::differences(&before, &markdown);
        if !diff.is_empty() {
            eprintln!(
                "reliability-report --check: the suite's cases differ from the committed {} \
                 (digits aside); commit the regenerated file if the change is intended:\n{}",
                target.display(),
                diff.join("\n")
            );
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The committed report: HEAD's version, so a second local run compares with the same file as
/// the first; the file on disk when git cannot say.
fn committed(target: &std::path::Path) -> String {
    reliability::git(&["show", "HEAD:docs/reliability.md"])
        .unwrap_or_else(|| std::fs::read_to_string(target).unwrap_or_default())
}
