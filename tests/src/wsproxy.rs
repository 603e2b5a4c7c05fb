//! A real `ws-proxy serve` process for tests, and the demo desktop session it shows.
use crate::agent::free_port;
use crate::child::{ChildProc, Ready, child_methods};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A running ws-proxy.
#[derive(Debug)]
pub struct WsProxyProc {
    /// The process; first, so it is killed before `_dir` (its log) is removed.
    child: ChildProc,
    /// Its address.
    pub addr: SocketAddr,
    /// Holds the log while the proxy lives.
    _dir: tempfile::TempDir,
}

impl WsProxyProc {
    /// Starts `ws-proxy serve` with `args` (token source and options) and waits for its port.
    pub async fn start(args: &[String]) -> WsProxyProc {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port([127, 0, 0, 1].into())).into();
        Self::start_at(addr, args).await
    }

    /// Starts `ws-proxy serve` on `addr` (a restart on the same port).
    pub async fn start_at(addr: SocketAddr, args: &[String]) -> WsProxyProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = ChildProc::service("ws-proxy", dir.path(), Ready::Listening(addr))
            .args(["serve", "--listen", &addr.to_string()])
            .args(args)
            // Its default drain (--drain-timeout) lasts 30 s; stop() must not cut it short.
            .grace(Duration::from_secs(35))
            .start()
            .await;
        WsProxyProc {
            child,
            addr,
            _dir: dir,
        }
    }
}

child_methods!(WsProxyProc, child);

/// `deploy/demo-session` copied where every test user can run it.
pub fn demo_session() -> PathBuf {
    let src = crate::repo().join("deploy/demo-session");
    let dst = PathBuf::from(format!(
        "/var/tmp/vncdispatch-demo-session-{}",
        std::process::id()
    ));
    if !dst.exists() {
        std::fs::copy(&src, &dst).expect("copy demo session");
        std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    dst
}
