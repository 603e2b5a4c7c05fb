//! The deployment files, checked without a Docker engine or a booted systemd:
//! docker-compose.yml with compose-go (what `docker compose config` runs), the Dockerfile with
//! hadolint, and the systemd units with `systemd-analyze verify` (any complaint fails). Each
//! checker is also shown a broken file, so a checker that passes everything fails the test.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vncdispatch_tests::workspace_bin;

fn repo() -> PathBuf {
    vncdispatch_tests::repo()
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/install-deps.sh installs it)"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn compose_check(file: &Path) -> Output {
    output(Command::new("/usr/local/bin/vncdispatch-compose-check").arg(file))
}

#[test]
fn docker_compose_file_is_valid() {
    let out = compose_check(&repo().join("docker-compose.yml"));
    assert!(out.status.success(), "{}", text(&out));
    for service in ["dispatcher", "blade", "ws-proxy", "mongo"] {
        assert!(text(&out).contains(service), "no {service}: {}", text(&out));
    }
    // The checker is not a rubber stamp: a dangling dependency and an unknown key fail.
    let good = std::fs::read_to_string(repo().join("docker-compose.yml")).expect("compose");
    let dir = tempfile::tempdir().expect("dir");
    for (what, bad) in [
        (
            "dangling depends_on",
            good.replace(
                "mongo: { condition: service_healthy }",
                "mongodb: { condition: service_healthy }",
            ),
        ),
        (
            "unknown key",
            good.replace("    hostname: blade", "    hostnme: blade"),
        ),
    ] {
        assert_ne!(bad, good, "{what}: the edit did not apply");
        let f = dir.path().join("docker-compose.yml");
        std::fs::write(&f, bad).expect("write");
        assert!(
            !compose_check(&f).status.success(),
            "{what} passed the check"
        );
    }
}

fn hadolint(file: &Path) -> Output {
    output(
        Command::new("/opt/vncdispatch/test-venv/bin/hadolint")
            .arg("--config")
            .arg(repo().join(".hadolint.yaml"))
            .arg(file),
    )
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = hadolint(&repo().join("Dockerfile"));
    assert!(out.status.success(), "{}", text(&out));
    let dir = tempfile::tempdir().expect("dir");
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, "FROM debian\nRUN cd /tmp && apt-get install curl\n").expect("write");
    assert!(!hadolint(&bad).status.success(), "a bad Dockerfile passed");
}

/// `systemd-analyze verify` on a copy of `unit` whose binaries point into this build (the
/// verifier insists they exist); returns what it printed.
fn verify_unit(unit: &str, dir: &Path) -> String {
    let bin_dir = workspace_bin("dispatcher")
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    let copy = dir.join(Path::new(unit).file_name().expect("name"));
    let text_in = std::fs::read_to_string(repo().join(unit))
        .expect("unit")
        .replace("/usr/local/bin", &bin_dir);
    std::fs::write(&copy, text_in).expect("write");
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&copy));
    // It exits 0 on unknown keys and the like; anything it says is a finding.
    let said = text(&out);
    if out.status.success() {
        said
    } else {
        format!("exit {}: {said}", out.status)
    }
}

#[test]
fn systemd_units_verify_cleanly() {
    let dir = tempfile::tempdir().expect("dir");
    for unit in [
        "deploy/systemd/dispatcher.service",
        "deploy/systemd/blade-agent.service",
        "deploy/systemd/ws-proxy.service",
    ] {
        let said = verify_unit(unit, dir.path());
        assert!(said.trim().is_empty(), "{unit}: {said}");
        let body = std::fs::read_to_string(repo().join(unit)).expect("unit");
        for must in ["Type=notify", "Restart=on-failure", "NoNewPrivileges=yes"] {
            assert!(body.contains(must), "{unit} lacks {must}");
        }
    }
    let bad = dir.path().join("broken.service");
    std::fs::write(&bad, "[Service]\nTyp=notify\nExecStart=/bin/true\n").expect("write");
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&bad));
    assert!(!text(&out).trim().is_empty(), "a misspelt key passed");
}
