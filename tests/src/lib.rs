//! Support for the integration tests and benches: they start the real programs (built by
//! cargo in the same target directory) on 127.0.0.1 ports, create throwaway user accounts,
//! and talk to the services as their real clients would.
//!
//! Layout:
//! - [`users`]: test accounts created with `useradd -m`, removed (with their processes) on drop.
//! - [`child`]: one child process (spawn, log, readiness, stop, kill, restart, kill on drop),
//!   which every process wrapper below runs on.
//! - [`agent`]: a `blade-agent serve` process with its own secret, display range and port.
//! - [`bench`]: how the relay benches measure throughput, round trips and connection opens.
//! - [`browser`]: headless Chromium over the DevTools protocol (page state, screenshots).
//! - [`dispatcher`]: a `dispatcher serve` process on the embedded store or FerretDB.
//! - [`front`]: a stand-in dispatcher answering every ResolveToken with one fixed target.
//! - [`ferretdb`]: a real FerretDB (MongoDB wire protocol) on a 127.0.0.1 port, SQLite-backed.
//! - [`rfb`]: a minimal RFB client: version, VNC authentication, SecurityResult, ServerInit;
//!   and a browser's side of the "None" handshake ws-proxy presents in auth-proxy mode.
//! - [`vnc_echo`]: a stand-in VNC server (VNC auth or VeNCrypt X509Vnc) that echoes after
//!   the login.
//! - [`sshd`]: a real OpenSSH sshd with generated keys, for the SSH launcher.
//! - [`wsproxy`]: a `ws-proxy serve` process, and the demo desktop session.
//! - [`pki`]: a throwaway CA (the product's own `pki`) and TLS settings for the wrappers.
//! - [`procs`]: what /proc says about a user's processes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
pub mod agent;
pub mod bench;
pub mod browser;
pub mod child;
pub mod desktop;
pub mod dispatcher;
pub mod ferretdb;
pub mod front;
pub mod original_route;
pub mod pki;
pub mod procs;
pub mod reliability;
pub mod rfb;
pub mod rig;
pub mod scale;
pub mod sshd;
pub mod users;
pub mod vnc_echo;
pub mod wsproxy;

use std::path::PathBuf;

/// The repository this test runs in. Read at run time (cargo sets CARGO_MANIFEST_DIR for
/// tests too): with a shared target directory, a binary built in another clone of the same
/// sources is reused, and the compile-time path would point into that clone.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// Where tests keep what they produce for people to look at (screenshots, reports).
pub fn artifact(name: &str) -> PathBuf {
    repo().join("tests/artifacts").join(name)
}

/// Path of a binary of this workspace, next to the test executable's `deps/` directory — or
/// in `VNCDISPATCH_BIN_DIR` when set, so a bench can run another build (the one before a
/// change) under the same measurements.
pub fn workspace_bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("VNCDISPATCH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            exe.parent()
                .and_then(|d| d.parent())
                .expect("target dir")
                .to_owned()
        }
    };
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// An executable `/bin/sh` script `dir/name` running `body`, in a directory every user may
/// enter (the agent runs it for desktop users, or as them); its path, as an argument.
pub fn user_script(dir: &std::path::Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.display().to_string()
}

/// A session command (in `dir`) that notes each start, its `$DISPLAY` a line of
/// `~/.session-starts`, then runs twm: for counting which desktops started their session.
pub fn counting_session(dir: &std::path::Path) -> String {
    user_script(
        dir,
        "counting-session",
        "echo \"$DISPLAY\" >> \"$HOME/.session-starts\"\nexec /usr/bin/twm",
    )
}

/// The displays a [`counting_session`] started on for the user whose home is `home`, in order.
pub fn session_starts(home: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(home.join(".session-starts"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// True when running as root with TigerVNC installed: the integration tests need both.
/// Without them the test fails (it does not skip): CI must run them.
pub fn require_root_and_tigervnc() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "integration tests run as root (they create users)"
    );
    assert!(
        std::path::Path::new("/usr/bin/Xtigervnc").is_file(),
        "Xtigervnc missing: run scripts/install-deps.sh"
    );
}

/// Polls `f` every 20 ms until it returns true or `secs` seconds pass; returns the last result.
/// For waiting on processes to come and go, never to assert on speed.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until the gRPC server at `addr` reports `service` SERVING ("" for the server as a
/// whole); false after `secs` seconds.
pub async fn wait_serving(addr: std::net::SocketAddr, service: &str, secs: u64) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if serving_now(addr, service).await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// One health check: true if the gRPC server at `addr` answers that `service` is SERVING.
pub async fn serving_now(addr: std::net::SocketAddr, service: &str) -> bool {
    serving_now_as(addr, service, None).await
}

/// [`serving_now`], over mutual TLS with `tls` when given.
pub async fn serving_now_as(
    addr: std::net::SocketAddr,
    service: &str,
    tls: Option<&vncdispatch_proto::tls::Credentials>,
) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let scheme = if tls.is_some() { "https" } else { "http" };
    let Ok(endpoint) = vncdispatch_proto::tls::endpoint(&format!("{scheme}://{addr}"), tls) else {
        return false;
    };
    let Ok(ch) = endpoint.connect().await else {
        return false;
    };
    let req = HealthCheckRequest {
        service: service.into(),
    };
    matches!(HealthClient::new(ch).check(req).await, Ok(r) if r.get_ref().status == 1)
}

/// A TCP echo server on 127.0.0.1 (a stand-in relay target); returns its port.
pub async fn echo_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            // An accept error (EMFILE under load) must not end the server.
            let Ok((mut s, _)) = l.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}
