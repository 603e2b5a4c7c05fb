//! A real OpenSSH sshd for tests, on a free 127.0.0.1 port, with generated host and client
//! keys and its own configuration (root login by key only). The known_hosts files it writes
//! hold its real host key, or a different key to prove a mismatch is refused.
use crate::agent::free_port;
use crate::child::{ChildProc, Ready, child_methods};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running sshd.
#[derive(Debug)]
pub struct Sshd {
    /// The process; first, so it is killed before `_dir` (keys, config) is removed.
    child: ChildProc,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Private key the client authenticates with.
    pub client_key: PathBuf,
    /// known_hosts with the server's real host key.
    pub known_hosts: PathBuf,
    /// known_hosts with some other key for the same host and port.
    pub wrong_known_hosts: PathBuf,
    /// Holds the keys, the configuration and the log while sshd lives.
    _dir: tempfile::TempDir,
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(ok.success());
}

fn known_hosts(path: &Path, port: u16, pubkey: &Path) {
    let key = std::fs::read_to_string(pubkey).expect("pub key");
    let key: Vec<&str> = key.split_whitespace().take(2).collect();
    std::fs::write(path, format!("[127.0.0.1]:{port} {}\n", key.join(" "))).expect("known_hosts");
}

impl Sshd {
    /// Starts sshd and waits for its banner.
    pub async fn start() -> Sshd {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for k in ["host_key", "client_key", "other_key"] {
            keygen(&d.join(k));
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))
            .expect("authorized_keys");
        let port = free_port([127, 0, 0, 1].into());
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile none\nAuthorizedKeysFile {ak}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nLogLevel VERBOSE\n",
            hk = d.join("host_key").display(),
            ak = d.join("authorized_keys").display()
        );
        std::fs::write(d.join("sshd_config"), config).expect("config");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        known_hosts(&d.join("known_hosts"), port, &d.join("host_key.pub"));
        known_hosts(&d.join("wrong_known_hosts"), port, &d.join("other_key.pub"));
        let child = ChildProc::new(
            "/usr/sbin/sshd",
            d.join("sshd.log"),
            Ready::Listening(([127, 0, 0, 1], port).into()),
        )
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .start()
        .await;
        Sshd {
            child,
            port,
            client_key: d.join("client_key"),
            known_hosts: d.join("known_hosts"),
            wrong_known_hosts: d.join("wrong_known_hosts"),
            _dir: dir,
        }
    }
}

child_methods!(Sshd, child);
