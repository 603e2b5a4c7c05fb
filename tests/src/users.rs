//! Throwaway accounts for tests: `useradd -m`, and on drop every process of the account is
//! killed and the account removed with its home.
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// useradd/userdel take /etc/passwd's lock; running them one at a time avoids lock errors.
static ACCOUNTS: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A test account.
#[derive(Debug)]
pub struct TestUser {
    /// Login name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its home directory.
    pub home: std::path::PathBuf,
}

impl TestUser {
    /// Creates a fresh account named `vdt<pid>x<n>` with a home directory.
    pub fn create() -> TestUser {
        let name = format!(
            "vdt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let _g = ACCOUNTS.lock().unwrap_or_else(|p| p.into_inner());
        let status = Command::new("useradd")
            .args(["-m", "-s", "/bin/sh", &name])
            .status()
            .expect("run useradd");
        assert!(status.success(), "useradd {name} failed");
        let user = nix::unistd::User::from_name(&name)
            .expect("getpwnam")
            .expect("user just created");
        TestUser {
            name,
            uid: user.uid.as_raw(),
            home: user.dir,
        }
    }
}

impl TestUser {
    /// Expires the account (`chage -E 0`), as an administrator would to lock someone out.
    pub fn expire(&self) {
        let status = Command::new("chage")
            .args(["-E", "0", &self.name])
            .status()
            .expect("run chage");
        assert!(status.success(), "chage -E 0 {} failed", self.name);
    }

    /// Sets a pam_limits limit (soft and hard) for this user in /etc/security/limits.d, as an
    /// administrator would; removed when the returned guard drops.
    pub fn limit(&self, item: &str, value: u64) -> LimitFile {
        let path = std::path::PathBuf::from(format!(
            "/etc/security/limits.d/vncdispatch-test-{}.conf",
            self.name
        ));
        std::fs::write(
            &path,
            format!(
                "{u} soft {item} {value}\n{u} hard {item} {value}\n",
                u = self.name
            ),
        )
        .expect("write limits.d file");
        LimitFile(path)
    }
}

/// A limits.d file, removed on drop.
#[derive(Debug)]
pub struct LimitFile(std::path::PathBuf);

impl Drop for LimitFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _g = ACCOUNTS.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..50 {
            let _ = Command::new("pkill")
                .args(["-KILL", "-u", &self.uid.to_string()])
                .status();
            if crate::procs::of_uid(self.uid).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = Command::new("userdel")
            .args(["-r", "-f", &self.name])
            .output();
    }
}
