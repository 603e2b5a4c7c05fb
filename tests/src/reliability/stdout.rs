//! Services' stdout, for the secrets scan. The process wrappers may leave a service's stdout
//! inherited from the test binary, where nothing can read it back; [`with_stdout_to`] starts
//! services so that whatever they print lands in a file instead, without touching the
//! wrappers or the rest of the test binary, and [`stdout_file`] says where a running
//! process's stdout actually goes, so a scan can prove it searched it.
//!
//! How: a thread of its own unshares its file-descriptor table (`unshare(CLONE_FILES)`),
//! points its fd 1 at the file and starts the services there, on a runtime of its own.
//! Children inherit the fd table of the thread that spawns them, so their stdout is the
//! file; every other thread's fd 1, and libtest's output, stay as they were.
use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Runs `start` (which starts services and returns their handles) with fd 1 pointing at
/// `file` (created or truncated) for every process it spawns. Blocks the calling thread
/// until `start` is done, so call it from a multi-thread runtime.
pub fn with_stdout_to<T, F>(file: &Path, start: impl FnOnce() -> F + Send) -> T
where
    F: Future<Output = T>,
    T: Send,
{
    let out =
        std::fs::File::create(file).unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
    let run = move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES)
            .expect("unshare the thread's file descriptors");
        // Only this thread's fd table changes (it was unshared above).
        nix::unistd::dup2_stdout(out.as_fd()).expect("point fd 1 at the file");
        drop(out);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(start())
    };
    tokio::task::block_in_place(|| {
        std::thread::scope(|s| match s.spawn(run).join() {
            Ok(started) => started,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    })
}

/// The regular file process `pid`'s stdout is written to; None when it is anything else (a
/// pipe or terminal shared with the test runner) or the process is gone.
pub fn stdout_file(pid: u32) -> Option<PathBuf> {
    let link = format!("/proc/{pid}/fd/1");
    let meta = std::fs::metadata(&link).ok()?;
    if !meta.is_file() {
        return None;
    }
    std::fs::read_link(&link).ok()
}

/// The pid of the running service `comm` (as /proc shows its name) started with `addr` on
/// its command line (its `--listen`), so two services of one kind are told apart.
pub fn service_pid(comm: &str, addr: std::net::SocketAddr) -> Option<u32> {
    let addr = addr.to_string();
    crate::procs::all()
        .into_iter()
        .find(|p| p.comm == comm && crate::procs::contains(&p.cmdline, addr.as_bytes()))
        .map(|p| p.pid)
}
