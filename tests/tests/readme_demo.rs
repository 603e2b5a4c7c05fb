//! The README's first command, run as a newcomer would (with prebuilt binaries): it prints a
//! URL, the URL shows the desktop in a real browser, and Ctrl-C stops everything it started.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use vncdispatch_tests::agent::free_port;
use vncdispatch_tests::browser::{Browser, CANVAS_COLOURS};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{eventually, procs, require_root_and_tigervnc, workspace_bin};

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_command_prints_a_url_that_shows_the_desktop() {
    require_root_and_tigervnc();
    let user = TestUser::create();
    let state = tempfile::tempdir().expect("dir");
    let localhost = [127, 0, 0, 1].into();
    let (web, agent, dispatcher) = (
        free_port(localhost),
        free_port(localhost),
        free_port(localhost),
    );
    let bin_dir = workspace_bin("dispatcher")
        .parent()
        .expect("bin dir")
        .to_owned();
    // As from a terminal: SIGINT at its default, even when this test runs under a shell or
    // job runner that ignores it (bash cannot trap a signal ignored when it started).
    let mut demo = Command::new("env")
        .args(["--default-signal=INT", "bash"])
        .arg(vncdispatch_tests::repo().join("scripts/demo.sh"))
        .env("BIN_DIR", &bin_dir)
        .env("DEMO_USER", &user.name)
        .env("DEMO_STATE", state.path())
        .env("DEMO_PORT", web.to_string())
        .env("AGENT_PORT", agent.to_string())
        .env("DISPATCHER_PORT", dispatcher.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run scripts/demo.sh");
    let stdout = demo.stdout.take().expect("stdout");
    // Read on to the end, as a terminal would: a reader that went away after the URL would
    // make the demo's next line fail with SIGPIPE and end the demo.
    let (found, url) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let mut found = Some(found);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim().starts_with("http://")
                && let Some(tx) = found.take()
            {
                let _ = tx.send(line.trim().to_owned());
            }
        }
    });
    let url = url.await.expect("the demo printed no URL");
    assert!(
        url.contains("vnc.html?autoconnect=1") && !url.contains("password="),
        "{url}"
    );
    let mut b = Browser::open(&url).await.expect("chromium");
    let connected = b
        .wait_for(
            "document.documentElement.classList.contains('noVNC_connected')",
            30,
        )
        .await
        .expect("eval");
    // On failure, what the demo's services said, for whoever reads the CI log.
    let logs = || {
        ["blade-agent.log", "dispatcher.log", "ws-proxy.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(state.path().join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {f}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(connected, "noVNC did not connect to {url}\n{}", logs());
    assert!(
        b.wait_for(&format!("{CANVAS_COLOURS} >= 3"), 20)
            .await
            .expect("eval")
    );
    let shot =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts/readme-demo.png");
    b.screenshot(&shot).await.expect("screenshot");
    drop(b);
    assert_eq!(procs::xvnc_of(user.uid).len(), 1);
    // The demo's gRPC hops are mutual TLS with certificates it made: plaintext gets nothing.
    assert!(state.path().join("pki/ca.pem").is_file(), "no demo CA");
    for port in [agent, dispatcher] {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            !vncdispatch_tests::serving_now(addr, "").await,
            "port {port} answers plaintext gRPC"
        );
    }
    let ws_log = std::fs::read_to_string(state.path().join("ws-proxy.log")).unwrap_or_default();
    assert!(
        ws_log.contains("logged in over VeNCrypt"),
        "the demo's desktop hop is not VeNCrypt:\n{ws_log}"
    );
    // Ctrl-C.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = tokio::task::spawn_blocking(move || demo.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(status.code(), Some(130), "Ctrl-C ends the demo with 130");
    assert!(
        eventually(10, || procs::xvnc_of(user.uid).is_empty()).await,
        "the demo desktop outlived Ctrl-C"
    );
    for port in [web, agent, dispatcher] {
        let gone = eventually(10, || {
            std::net::TcpStream::connect_timeout(
                &([127, 0, 0, 1], port).into(),
                Duration::from_millis(100),
            )
            .is_err()
        })
        .await;
        assert!(gone, "port {port} still open after Ctrl-C");
    }
}
