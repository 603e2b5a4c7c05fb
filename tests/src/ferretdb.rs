//! A real FerretDB v1 server (the MongoDB wire protocol over SQLite) for tests: built by
//! `scripts/install-deps.sh` into /usr/local/bin/ferretdb, run on a free 127.0.0.1 port with
//! its own data directory, killed on drop.
use crate::agent::free_port;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running FerretDB.
#[derive(Debug)]
pub struct FerretDb {
    child: Option<Child>,
    /// `mongodb://127.0.0.1:PORT/`.
    pub uri_base: String,
    port: u16,
    /// Its metrics/debug HTTP port (default 8088 would clash between instances).
    debug_port: u16,
    dir: tempfile::TempDir,
}

impl FerretDb {
    /// Starts FerretDB and waits until it accepts connections.
    pub async fn start() -> FerretDb {
        let bin = std::env::var("FERRETDB").unwrap_or_else(|_| "/usr/local/bin/ferretdb".into());
        assert!(
            std::path::Path::new(&bin).is_file(),
            "{bin} missing: run scripts/install-deps.sh"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port([127, 0, 0, 1].into());
        let debug_port = free_port([127, 0, 0, 1].into());
        let mut db = FerretDb {
            child: None,
            uri_base: format!("mongodb://127.0.0.1:{port}/"),
            port,
            debug_port,
            dir,
        };
        db.spawn(&bin).await;
        db
    }

    async fn spawn(&mut self, bin: &str) {
        let log = std::fs::File::create(self.dir.path().join("ferretdb.log")).expect("log");
        let child = Command::new(bin)
            .arg("--handler=sqlite")
            .arg(format!("--sqlite-url=file:{}/", self.dir.path().display()))
            .arg(format!("--listen-addr=127.0.0.1:{}", self.port))
            .arg(format!("--debug-addr=127.0.0.1:{}", self.debug_port))
            .args([
                "--telemetry=disable",
                "--log-level=warn",
                "--state-dir",
                &self.dir.path().display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferretdb");
        self.child = Some(child);
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = std::fs::read_to_string(self.dir.path().join("ferretdb.log")).unwrap_or_default();
        panic!("ferretdb did not start on port {}:\n{log}", self.port);
    }

    /// A URI for database `db`.
    pub fn uri(&self, db: &str) -> String {
        format!("{}{db}", self.uri_base)
    }

    /// Stops the server (data stays) — for store-down tests.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop();
        let bin = std::env::var("FERRETDB").unwrap_or_else(|_| "/usr/local/bin/ferretdb".into());
        self.spawn(&bin).await;
    }
}

impl Drop for FerretDb {
    fn drop(&mut self) {
        self.stop();
    }
}
