//! After READY on the fast path the helper stays as the desktop's supervisor, detached from
//! the agent: when the session command exits it stops Xvnc (as vncserver's `-autokill`), and
//! when Xvnc dies it ends the session's process group.
use super::start::Desktop;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

impl Desktop {
    /// Detaches from the agent's pipes and ties the session's life to Xvnc's and back.
    pub(super) fn supervise(&mut self) {
        // The agent reads until READY; from here on stdout goes nowhere so a vanished agent
        // (or SSH channel) cannot stall or kill us. Stderr is already the desktop's log.
        if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(null.as_fd());
            let _ = nix::unistd::dup2_stdin(null.as_fd());
        }
        let xvnc = Pid::from_raw(self.xvnc_pid as i32);
        let session = self.session.as_ref().map(|s| Pid::from_raw(s.id() as i32));
        loop {
            match nix::sys::wait::wait() {
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)) if pid == xvnc => {
                    if let Some(s) = session {
                        let _ = killpg(s, Signal::SIGTERM);
                    }
                    return;
                }
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))
                    if Some(pid) == session =>
                {
                    // The session ended: stop Xvnc as vncserver's -autokill would.
                    self.session = None;
                    self.stop_xvnc();
                    return;
                }
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => return,
            }
        }
    }

    /// Stops Xvnc: SIGTERM, so that it removes its X lock and socket, then SIGKILL after 5 s.
    pub(super) fn stop_xvnc(&mut self) {
        let xvnc = Pid::from_raw(self.xvnc_pid as i32);
        let _ = kill(xvnc, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(
                waitpid(xvnc, Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::StillAlive)
            ) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.xvnc.kill();
        let _ = self.xvnc.wait();
    }
}
