//! A real `ws-proxy serve` process for tests, and the demo desktop session it shows.
use crate::agent::free_port;
use crate::workspace_bin;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running ws-proxy.
#[derive(Debug)]
pub struct WsProxyProc {
    child: Option<Child>,
    /// Its address.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
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
        let log = std::fs::File::create(dir.path().join("ws-proxy.log")).expect("log");
        let child = Command::new(workspace_bin("ws-proxy"))
            .args(["serve", "--listen", &addr.to_string()])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ws-proxy");
        let p = WsProxyProc {
            child: Some(child),
            addr,
            dir,
        };
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("ws-proxy did not start: {}", p.log());
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ws-proxy.log")).unwrap_or_default()
    }

    /// Sends SIGTERM (graceful drain) and returns the child to wait on.
    pub fn terminate(&mut self) -> Option<Child> {
        let c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        Some(c)
    }
}

impl Drop for WsProxyProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

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
