//! Session start to port-ready, four ways, side by side (issue: blade-agent foundation):
//!
//! - bare Xtigervnc: the floor — the server alone, started as the user, no session.
//!
//! "Port-ready" is the RFB banner arriving, for all four.
//! - agent fast path: StartSession over gRPC to a real `blade-agent serve` (PAM account and
//!   session stages, helper, password file, X cookie, Xtigervnc, session command), timed
//!   until the call returns; and the same with `--no-pam`, to show what PAM costs.
//! - agent wrapper mode: the same through TigerVNC's `vncserver` Perl wrapper.
//! - the original way: `su - USER -c "vncserver ..."`, as the original cloudvnc script did,
//!   timed until the RFB port answers.
//!
//! Each way starts and stops a desktop `BENCH_STARTS` times (default 20) and prints p50/p95.
//! Run: `cargo bench -p vncdispatch-tests --bench session_start` (as root).
use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vncdispatch_proto::v1::{StartSessionRequest, StopSessionRequest};
use vncdispatch_tests::agent::{AgentOptions, AgentProc};
use vncdispatch_tests::users::TestUser;
use vncdispatch_tests::{procs, require_root_and_tigervnc};

const DISPLAY: u32 = 90;

fn main() -> anyhow::Result<()> {
    require_root_and_tigervnc();
    let n: usize = std::env::var("BENCH_STARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Runtime::new()?;
    let user = TestUser::create();
    let rows = vec![
        ("bare Xtigervnc (floor)", measure(n, || bare_xvnc(&user))?),
        (
            "agent fast path (PAM)",
            rt.block_on(agent_starts(&user, "fast", &[], n))?,
        ),
        (
            "agent fast path, --no-pam",
            rt.block_on(agent_starts(&user, "fast", &["--no-pam"], n))?,
        ),
        (
            "agent vncserver wrapper",
            rt.block_on(agent_starts(&user, "wrapper", &[], n))?,
        ),
        (
            "original: su - USER -c vncserver",
            measure(n, || original(&user))?,
        ),
    ];
    println!("\nsession start to port-ready, {n} starts each (ms)");
    println!("{:<34} {:>8} {:>8} {:>8}", "way", "p50", "p95", "max");
    for (name, mut samples) in rows {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let p = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize)
                .saturating_sub(1)
                .min(samples.len() - 1)]
        };
        println!(
            "{name:<34} {:>8.1} {:>8.1} {:>8.1}",
            ms(p(0.50)),
            ms(p(0.95)),
            ms(p(1.0))
        );
    }
    Ok(())
}

fn measure(
    n: usize,
    mut once: impl FnMut() -> anyhow::Result<Duration>,
) -> anyhow::Result<Vec<Duration>> {
    (0..n).map(|_| once()).collect()
}

/// Ready means the server answers with its RFB banner: Xvnc listens within a few ms but only
/// answers once it has finished starting (keymap compiled and so on), which is what a viewer
/// waits for too.
fn port_ready(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(100))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut banner = [0u8; 12];
    s.read_exact(&mut banner).is_ok() && banner.starts_with(b"RFB ")
}

fn wait_port(port: u16, since: Instant) -> anyhow::Result<Duration> {
    while !port_ready(port) {
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(30),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(since.elapsed())
}

fn kill_all(user: &TestUser) {
    let _ = Command::new("pkill")
        .args(["-KILL", "-u", &user.uid.to_string()])
        .status();
    while !procs::of_uid(user.uid).is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(format!("/tmp/.X{DISPLAY}-lock"));
    let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{DISPLAY}"));
}

fn bare_xvnc(user: &TestUser) -> anyhow::Result<Duration> {
    kill_all(user);
    let port = 5900 + DISPLAY as u16;
    let since = Instant::now();
    let mut child = Command::new("setpriv")
        .args([
            "--reuid",
            &user.uid.to_string(),
            "--regid",
            &user.uid.to_string(),
            "--clear-groups",
        ])
        .args([
            "/usr/bin/Xtigervnc",
            &format!(":{DISPLAY}"),
            "-rfbport",
            &port.to_string(),
        ])
        .args([
            "-interface",
            "127.0.0.1",
            "-SecurityTypes",
            "None",
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let t = wait_port(port, since);
    let _ = child.kill();
    let _ = child.wait();
    t
}

fn original(user: &TestUser) -> anyhow::Result<Duration> {
    kill_all(user);
    let vnc = user.home.join(".vnc");
    std::fs::create_dir_all(&vnc)?;
    std::fs::write(
        vnc.join("passwd"),
        vncdispatch_proto::vncauth::obfuscate(b"bench123"),
    )?;
    std::fs::set_permissions(
        vnc.join("passwd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    Command::new("chown")
        .args(["-R", &format!("{0}:{0}", user.name)])
        .arg(&vnc)
        .status()?;
    let port = 5900 + DISPLAY as u16;
    let since = Instant::now();
    let status = Command::new("su")
        .args(["-", &user.name, "-c"])
        .arg(format!(
            "vncserver :{DISPLAY} -localhost=no -geometry 1280x800 -xstartup /usr/bin/twm"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "su vncserver failed: {status}");
    wait_port(port, since)
}

async fn agent_starts(
    user: &TestUser,
    mode: &'static str,
    extra: &[&str],
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    kill_all(user);
    let agent = AgentProc::start(AgentOptions {
        mode,
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await;
    let mut client = agent.client().await;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let req = StartSessionRequest {
            username: user.name.clone(),
            password: "bench123".into(),
            geometry: None,
        };
        let since = Instant::now();
        let server = client.start_session(req).await?.into_inner();
        samples.push(since.elapsed());
        anyhow::ensure!(!server.reused, "expected a fresh start");
        client
            .stop_session(StopSessionRequest {
                username: user.name.clone(),
                vnc_pid: 0,
            })
            .await?;
        kill_all(user);
    }
    Ok(samples)
}
