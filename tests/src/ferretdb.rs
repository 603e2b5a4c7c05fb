//! A real FerretDB v1 server (the MongoDB wire protocol over SQLite) for tests: built by
//! `scripts/install-deps.sh` into /usr/local/bin/ferretdb, run on a free 127.0.0.1 port with
//! its own data directory, killed on drop.
use crate::agent::free_port;
use crate::child::{ChildProc, Ready};

/// A running FerretDB.
#[derive(Debug)]
pub struct FerretDb {
    /// The process; first, so it is killed before `_dir` (its data) is removed.
    child: ChildProc,
    /// `mongodb://127.0.0.1:PORT/`.
    pub uri_base: String,
    /// Holds the SQLite data, the state and the log, across restarts.
    _dir: tempfile::TempDir,
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
        let data = dir.path().display().to_string();
        let port = free_port([127, 0, 0, 1].into());
        let child = ChildProc::new(
            bin,
            dir.path().join("ferretdb.log"),
            Ready::Listening(([127, 0, 0, 1], port).into()),
        )
        .args([
            "--handler=sqlite".to_string(),
            format!("--sqlite-url=file:{data}/"),
            format!("--listen-addr=127.0.0.1:{port}"),
            // No metrics/debug HTTP listener: a second port picked ahead could be taken by
            // any outgoing connection's ephemeral port before FerretDB binds it (it then
            // exits: seen in CI), and the default 8088 would clash between instances.
            "--debug-addr=-".into(),
            "--telemetry=disable".into(),
            "--log-level=warn".into(),
            "--state-dir".into(),
            data,
        ])
        .start()
        .await;
        FerretDb {
            child,
            uri_base: format!("mongodb://127.0.0.1:{port}/"),
            _dir: dir,
        }
    }

    /// A URI for database `db`.
    pub fn uri(&self, db: &str) -> String {
        format!("{}{db}", self.uri_base)
    }

    /// Stops the server at once (SIGKILL: an outage, as a crash would cause; the data stays)
    /// — for store-down tests.
    pub fn stop(&mut self) {
        self.child.kill();
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.child.kill();
        self.child.spawn().await;
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }
}
