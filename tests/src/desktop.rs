//! Looking into a running desktop as its user, the way any X client would: where the pointer
//! is and how big the screen is (`xdotool`, which `scripts/install-deps.sh` installs).
use crate::users::TestUser;
use std::process::Command;
use std::time::Duration;

/// Runs `xdotool ARGS` as `user` on `display`; its output.
fn xdotool(user: &TestUser, display: u32, args: &[&str]) -> String {
    let out = Command::new("runuser")
        .args(["-u", &user.name, "--", "env"])
        .arg(format!("DISPLAY=:{display}"))
        .arg(format!(
            "XAUTHORITY={}",
            user.home
                .join(format!(".vnc/Xauthority-{display}"))
                .display()
        ))
        .arg("xdotool")
        .args(args)
        .output()
        .expect("run xdotool (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "xdotool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where the desktop's pointer is.
pub fn pointer(user: &TestUser, display: u32) -> (u32, u32) {
    let text = xdotool(user, display, &["getmouselocation"]);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("xdotool said {text:?}"))
    };
    (field("x:"), field("y:"))
}

/// Waits (up to 5 s) for the pointer to be at `at`; where it is at the end.
pub async fn pointer_reaches(user: &TestUser, display: u32, at: (u32, u32)) -> (u32, u32) {
    for _ in 0..50 {
        if pointer(user, display) == at {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pointer(user, display)
}

/// The screen's size, "WIDTHxHEIGHT".
pub fn screen_size(user: &TestUser, display: u32) -> String {
    xdotool(user, display, &["getdisplaygeometry"])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("x")
}
