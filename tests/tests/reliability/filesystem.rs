//! Filesystem attacks on the agent: a user's `~/.vncpasswd`, `~/.vnc` or home swapped for a
//! link to root's files, missing, unwritable or someone else's, and a file flipped between
//! check and use while desktops start. Nothing outside the user's rights may change.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vncdispatch_proto::v1::StopSessionRequest;
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::reliability::Record;
use vncdispatch_tests::reliability::attack::{code, message, start};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{procs, require_root_and_tigervnc};

/// A root-owned file (mode 0644) next to the users' homes, so hard links to it are possible.
fn root_file(user: &TestUser, tag: &str) -> PathBuf {
    let p = user
        .home
        .parent()
        .expect("home has a parent")
        .join(format!("reliability-{tag}-{}", std::process::id()));
    std::fs::write(&p, b"root's precious file\n").expect("write root file");
    p
}

fn untouched(p: &Path) -> bool {
    std::fs::read(p).ok().as_deref() == Some(&b"root's precious file\n"[..])
}

/// Sets up an attack in a user's home; returns the path whose contents must not change.
type Prepare = Box<dyn Fn(&TestUser) -> PathBuf>;

#[tokio::test(flavor = "multi_thread")]
async fn filesystem() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    require_root_and_tigervnc();
    let rec = Record::new("filesystem");
    let agent = AgentProc::start(AgentOptions::default()).await;
    let mut c = agent.client().await;
    let other = TestUser::create();

    // Each attack: prepare the user's home, try to start, check the outcome and that nothing
    // outside the user's rights changed.
    let attacks: Vec<(&str, &str, Prepare)> = vec![
        (
            "~/.vncpasswd is a symlink to a root-owned file",
            "PermissionDenied; the target unchanged",
            Box::new(|u| {
                let t = root_file(u, "symlink");
                symlink(&t, u.home.join(".vncpasswd")).expect("symlink");
                t
            }),
        ),
        (
            "~/.vncpasswd is a hard link to a root-owned file",
            "PermissionDenied; the target unchanged",
            Box::new(|u| {
                let t = root_file(u, "hardlink");
                std::fs::hard_link(&t, u.home.join(".vncpasswd")).expect("hard link");
                t
            }),
        ),
        (
            "~/.vnc is a symlink to a root-owned directory",
            "PermissionDenied; nothing written there",
            Box::new(|u| {
                let t = root_file(u, "vncdir");
                let d = t.with_extension("d");
                std::fs::create_dir_all(&d).expect("dir");
                symlink(&d, u.home.join(".vnc")).expect("symlink");
                d
            }),
        ),
        (
            "~ itself is a symlink to a root-owned directory",
            "refused; nothing written there",
            Box::new(|u| {
                let t = root_file(u, "home");
                let d = t.with_extension("d");
                std::fs::create_dir_all(&d).expect("dir");
                let real = u.home.with_extension("real");
                std::fs::rename(&u.home, &real).expect("move home");
                symlink(&d, &u.home).expect("symlink home");
                d
            }),
        ),
        (
            "home directory missing",
            "refused with a message; no home created by root",
            Box::new(|u| {
                std::fs::remove_dir_all(&u.home).expect("rm home");
                u.home.clone()
            }),
        ),
        (
            "home not writable by its owner (0555)",
            "refused with a message",
            Box::new(|u| {
                std::fs::set_permissions(&u.home, std::fs::Permissions::from_mode(0o555))
                    .expect("chmod");
                u.home.clone()
            }),
        ),
    ];
    for (what, expected, prepare) in attacks {
        let user = TestUser::create();
        let target = prepare(&user);
        let r = c.start_session(start(&user.name)).await;
        rec.faults(1);
        let message = message(&r);
        let (unchanged, detail) = match what {
            w if w.contains("root-owned file") => (untouched(&target), "target unchanged"),
            w if w.contains("directory") && !w.contains("missing") => (
                std::fs::read_dir(&target).map(|d| d.count()).unwrap_or(0) == 0,
                "directory still empty",
            ),
            w if w.contains("missing") => (!target.exists(), "home still absent"),
            _ => (
                !target.join(".vncpasswd").exists(),
                "no ~/.vncpasswd written",
            ),
        };
        let no_xvnc = procs::xvnc_of(user.uid).is_empty();
        rec.case(
            what,
            "StartSession for that user",
            expected,
            &format!(
                "{}: {message}; {detail}: {unchanged}; no Xvnc: {no_xvnc}",
                code(&r)
            ),
            r.is_err() && !message.is_empty() && unchanged && no_xvnc,
        );
        if let Some(real) = Some(user.home.with_extension("real")).filter(|p| p.exists()) {
            let _ = std::fs::remove_file(&user.home);
            let _ = std::fs::rename(real, &user.home);
        }
        let _ = std::fs::remove_file(target.with_extension(""));
        let _ = std::fs::remove_dir_all(target.with_extension("d"));
        if what.contains("root-owned file") {
            let _ = std::fs::remove_file(&target);
        }
    }

    // Home owned by another user: the agent must not write into someone else's directory.
    let user = TestUser::create();
    nix::unistd::chown(
        &user.home,
        Some(nix::unistd::Uid::from_raw(other.uid)),
        None,
    )
    .expect("chown");
    let r = c.start_session(start(&user.name)).await;
    rec.faults(1);
    let wrote = user.home.join(".vncpasswd").exists();
    rec.case(
        "home owned by another user",
        "StartSession for a user whose home belongs to someone else",
        "refused; nothing written into that home",
        &format!(
            "{}: {}; ~/.vncpasswd written: {wrote}",
            code(&r),
            r.as_ref().err().map(|e| e.message()).unwrap_or_default()
        ),
        r.is_err() && !wrote,
    );

    // The file swapped between check and use: a thread flips ~/.vncpasswd between a regular
    // file and a symlink to a root-owned file while desktops are started and stopped.
    let user = TestUser::create();
    let target = root_file(&user, "race");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, link, target) = (stop.clone(), user.home.join(".vncpasswd"), target.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::remove_file(&link);
                let _ = symlink(&target, &link);
                let _ = std::fs::remove_file(&link);
                let _ = std::fs::write(&link, b"x");
                flips += 1;
            }
            flips
        })
    };
    let mut outcomes = BTreeMap::<String, usize>::new();
    for _ in 0..15 {
        let r = c.start_session(start(&user.name)).await;
        *outcomes.entry(code(&r)).or_default() += 1;
        let _ = c
            .stop_session(StopSessionRequest {
                username: user.name.clone(),
                vnc_pid: 0,
            })
            .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.join().unwrap_or(0);
    rec.faults(1);
    let unchanged = untouched(&target);
    rec.case(
        "~/.vncpasswd swapped between check and use",
        &format!(
            "15 starts and stops while another thread swapped ~/.vncpasswd between a file and a symlink to a root-owned file {flips} times"
        ),
        "each start succeeds or is refused; the root-owned file never changes",
        &format!("{outcomes:?}; target unchanged: {unchanged}"),
        unchanged
            && outcomes
                .keys()
                .all(|k| ["OK", "PermissionDenied", "FailedPrecondition"].contains(&k.as_str())),
    );
    let _ = std::fs::remove_file(&target);
    rec.finish();
}
