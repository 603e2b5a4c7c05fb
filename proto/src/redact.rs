//! Debug output for messages that carry secrets: passwords are never shown and tokens only by
//! their first 8 characters, enough to correlate log lines, too little to use.
use crate::v1::{ResolveTokenRequest, Session, Share, StartSessionRequest, Target};
use std::fmt;

/// A token shortened for logs.
pub fn token_prefix(token: &str) -> &str {
    token.get(..8).unwrap_or("")
}

impl fmt::Debug for StartSessionRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartSessionRequest")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field(
                "view_only_password",
                &if self.view_only_password.is_empty() {
                    "<none>"
                } else {
                    "<redacted>"
                },
            )
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("username", &self.username)
            .field("token", &format_args!("{}…", token_prefix(&self.token)))
            .field("password", &"<redacted>")
            .field("blade", &self.blade)
            .field("host", &self.host)
            .field("display", &self.display)
            .field("port", &self.port)
            .field("vnc_pid", &self.vnc_pid)
            .field("remote_ip", &self.remote_ip)
            .field("reused", &self.reused)
            .finish()
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("remote_ip", &self.remote_ip)
            .field("blade", &self.blade)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("id", &self.id)
            .field("token", &format_args!("{}…", token_prefix(&self.token)))
            .field("owner", &self.owner)
            .field("view_only", &self.view_only)
            .field("created_by", &self.created_by)
            .field("note", &self.note)
            .finish()
    }
}

impl fmt::Debug for ResolveTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolveTokenRequest")
            .field("token", &format_args!("{}…", token_prefix(&self.token)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug() {
        let s = Session {
            token: "0123456789abcdef".repeat(4),
            password: "hunter22".into(),
            ..Default::default()
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter22") && !shown.contains("89abcdef0123"),
            "{shown}"
        );
        let r = StartSessionRequest {
            password: "hunter22".into(),
            view_only_password: "watcher9".into(),
            ..Default::default()
        };
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("hunter22") && !shown.contains("watcher9"),
            "{shown}"
        );
        assert!(
            shown.contains("view_only_password: \"<redacted>\""),
            "{shown}"
        );
    }
}
