//! Field rules shared by every service.
//!
//! Each check returns a [`FieldError`] whose text names the field and says what is wrong, so the
//! services can hand it straight to the caller as an INVALID_ARGUMENT message. Checks never echo
//! secrets (passwords, tokens) back.
use std::net::IpAddr;

/// Longest username accepted; the Linux `utmp` limit and what `useradd` allows by default.
pub const USERNAME_MAX: usize = 32;
/// VNC authentication uses only the first 8 bytes of a password (RFC 6143 §7.2.2).
pub const PASSWORD_MAX: usize = 8;
/// What `vncpasswd` itself insists on.
pub const PASSWORD_MIN: usize = 6;
/// Session tokens are 30 random bytes, hex-encoded.
pub const TOKEN_BYTES: usize = 30;
/// Hex length of a session token.
pub const TOKEN_HEX_LEN: usize = TOKEN_BYTES * 2;

/// Why a field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// The username is empty, too long or has characters outside the portable set.
    #[error("invalid username {shown}: {why}")]
    Username {
        /// The name, quoted and escaped so control characters are visible but harmless in logs.
        shown: String,
        /// What rule it breaks.
        why: &'static str,
    },
    /// The VNC password breaks a rule (its value is never included).
    #[error("invalid password: {0}")]
    Password(&'static str),
    /// The view-only VNC password breaks a rule of [`validate_password`] or equals the
    /// password (its value is never included).
    #[error("invalid view_only_password: {0}")]
    ViewOnlyPassword(&'static str),
    /// The remote IP is not a plain IPv4 or IPv6 address.
    #[error("invalid remote_ip {shown}: {why}")]
    RemoteIp {
        /// The value, quoted and escaped.
        shown: String,
        /// What rule it breaks.
        why: &'static str,
    },
    /// The token is not 60 lowercase hex characters (its value is never included).
    #[error("invalid token: {0}")]
    Token(&'static str),
    /// A blade name breaks [`validate_blade_name`]'s rule.
    #[error("invalid blade name {shown}: use 1-64 of A-Z a-z 0-9 . _ -")]
    BladeName {
        /// The name, quoted and escaped.
        shown: String,
    },
    /// A pool name breaks [`validate_pool`]'s rule.
    #[error("invalid pool {shown}: use 1-32 of a-z 0-9 _ -, not starting with -")]
    Pool {
        /// The name, quoted and escaped.
        shown: String,
    },
    /// A blade host is neither an IP address nor a DNS name.
    #[error("invalid blade host {shown}: not an IP address or host name")]
    BladeHost {
        /// The host, quoted and escaped.
        shown: String,
    },
}

/// Quotes a user-supplied value for an error message: at most 40 characters, escaped.
fn shown(value: &str) -> String {
    let cut: String = value.chars().take(40).collect();
    let more = if cut.len() < value.len() { "…" } else { "" };
    format!("{:?}{more}", cut)
}

/// Checks a username against the POSIX portable user name rules, tightened for safety:
/// 1 to 32 bytes of `[A-Za-z0-9._-]`, starting with a letter or `_`. That keeps out path
/// separators, `..`, shell metacharacters, whitespace, NUL, a leading `-` (option injection)
/// and Unicode look-alikes. Whether the account exists and is not a system account is the
/// blade's question, not a syntax rule.
pub fn validate_username(name: &str) -> Result<(), FieldError> {
    let err = |why| FieldError::Username {
        shown: shown(name),
        why,
    };
    let first = name
        .bytes()
        .next()
        .ok_or_else(|| err("must not be empty"))?;
    if name.len() > USERNAME_MAX {
        return Err(err("longer than 32 bytes"));
    }
    if !(first.is_ascii_alphabetic() || first == b'_') {
        return Err(err("must start with a letter or '_'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(err(
            "only ASCII letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

/// Checks a VNC password: 6 to 8 printable ASCII characters. Longer passwords are refused
/// rather than silently cut; NUL would make two passwords equal (rfbauth pads with NUL); a
/// newline cannot pass through `vncpasswd -f` or the `cloudvnc` stdin line; and noVNC turns
/// characters into bytes by code point, so non-ASCII never matches what the browser sends.
pub fn validate_password(password: &str) -> Result<(), FieldError> {
    if password.len() < PASSWORD_MIN {
        return Err(FieldError::Password("must be at least 6 bytes"));
    }
    if password.len() > PASSWORD_MAX {
        return Err(FieldError::Password(
            "VNC uses at most 8 bytes; longer passwords are refused",
        ));
    }
    if password.bytes().any(|b| b == 0) {
        return Err(FieldError::Password("must not contain NUL"));
    }
    if !password.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(FieldError::Password(
            "must be printable ASCII (noVNC sends code points, not UTF-8)",
        ));
    }
    Ok(())
}

/// Checks a desktop's view-only VNC password, the second entry of its rfbauth file: empty
/// means none; otherwise the rules of [`validate_password`], and it must differ from
/// `password` (Xvnc checks the full password first, so an equal one would grant full control).
pub fn validate_view_only_password(view_only: &str, password: &str) -> Result<(), FieldError> {
    if view_only.is_empty() {
        return Ok(());
    }
    validate_password(view_only).map_err(|e| match e {
        FieldError::Password(why) => FieldError::ViewOnlyPassword(why),
        other => other,
    })?;
    if view_only == password {
        return Err(FieldError::ViewOnlyPassword(
            "must differ from the password",
        ));
    }
    Ok(())
}

/// Parses a remote IP: a plain IPv4 or IPv6 address, without zone id, port or brackets.
pub fn parse_remote_ip(value: &str) -> Result<IpAddr, FieldError> {
    let err = |why| FieldError::RemoteIp {
        shown: shown(value),
        why,
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.contains('%') {
        return Err(err("zone ids are not allowed"));
    }
    value
        .parse::<IpAddr>()
        .map_err(|_| err("not an IPv4 or IPv6 address"))
}

/// Checks a token's shape (60 lowercase hex characters) before any lookup, so junk never
/// reaches a store.
pub fn validate_token(token: &str) -> Result<(), FieldError> {
    if token.len() != TOKEN_HEX_LEN {
        return Err(FieldError::Token("must be 60 hex characters"));
    }
    if !token
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(FieldError::Token("must be lowercase hex"));
    }
    Ok(())
}

/// Longest blade name accepted.
pub const BLADE_NAME_MAX: usize = 64;

/// Checks a blade name: 1 to 64 bytes of `[A-Za-z0-9._-]`, not starting with `-`. Blade names
/// appear in metrics labels, logs and the original deployment's `blade_list`, and are the
/// host name of blades the original registered, so they keep to a host-name-like set.
pub fn validate_blade_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= BLADE_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        // Quoted whole, as the dispatcher always did (requests are size-capped).
        Err(FieldError::BladeName {
            shown: format!("{name:?}"),
        })
    }
}

/// The pool of blades and requests that name none.
pub const DEFAULT_POOL: &str = "default";

/// Checks a pool name and gives the pool meant: empty is [`DEFAULT_POOL`], else 1 to 32 bytes
/// of `[a-z0-9_-]`, not starting with `-` (pool names are metric labels and CLI words).
pub fn validate_pool(pool: &str) -> Result<&str, FieldError> {
    if pool.is_empty() {
        return Ok(DEFAULT_POOL);
    }
    let ok = pool.len() <= 32
        && !pool.starts_with('-')
        && pool
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(pool)
    } else {
        Err(FieldError::Pool { shown: shown(pool) })
    }
}

/// Checks a blade host: an IP address, or a DNS name of labels of `[A-Za-z0-9-]` (each 1-63
/// bytes, 253 in all) not starting with `-` — nothing a connect string or a command line could
/// read as an option or a second argument.
pub fn validate_blade_host(host: &str) -> Result<(), FieldError> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('-')
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(FieldError::BladeHost {
            shown: format!("{host:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools() {
        assert_eq!(validate_pool(""), Ok(DEFAULT_POOL));
        for ok in ["default", "gpu", "lab-2", "a_b", &"p".repeat(32)] {
            assert_eq!(validate_pool(ok), Ok(ok), "{ok}");
        }
        for bad in ["GPU", "a b", "-x", "x;", "pool\n", &"p".repeat(33), "ü"] {
            assert!(validate_pool(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usernames() {
        for ok in [
            "alice",
            "a",
            "_svc",
            "first.last",
            "user-1",
            "A_b.c-d",
            &"a".repeat(32),
        ] {
            assert_eq!(validate_username(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a;id",
            "a;rm -rf /",
            "-rf",
            ".hidden",
            "a b",
            "a\nb",
            "a\0b",
            "ａlice",
            "a/b",
            "a$",
            "1abc",
            "émile",
            &"a".repeat(33),
            &"a".repeat(300),
        ] {
            assert!(validate_username(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn username_error_is_escaped_and_short() {
        let e = validate_username(&format!("a\n{}", "b".repeat(300)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\\n"), "{e}");
        assert!(e.len() < 150, "{e}");
    }

    #[test]
    fn passwords() {
        for ok in ["secret", "12345678", "a b;c'd"] {
            assert_eq!(validate_password(ok), Ok(()));
        }
        for bad in ["", "12345", "123456789", "abc\0def"] {
            assert!(validate_password(bad).is_err());
        }
        assert!(
            !validate_password("topsecret1")
                .unwrap_err()
                .to_string()
                .contains("topsecret")
        );
    }

    #[test]
    fn view_only_passwords() {
        assert_eq!(validate_view_only_password("", "secret1"), Ok(()));
        assert_eq!(validate_view_only_password("watch123", "secret1"), Ok(()));
        for bad in ["12345", "123456789", "abc\0def", "caf\u{e9}12"] {
            assert!(
                matches!(
                    validate_view_only_password(bad, "secret1"),
                    Err(FieldError::ViewOnlyPassword(_))
                ),
                "{bad:?}"
            );
        }
        let same = validate_view_only_password("secret1", "secret1").unwrap_err();
        assert_eq!(
            same.to_string(),
            "invalid view_only_password: must differ from the password"
        );
        assert!(
            !validate_view_only_password("topsecret1", "x")
                .unwrap_err()
                .to_string()
                .contains("topsecret")
        );
    }

    #[test]
    fn remote_ips() {
        assert!(parse_remote_ip("192.0.2.1").is_ok());
        assert!(parse_remote_ip("2001:db8::1").is_ok());
        for bad in [
            "",
            "999.1.1.1",
            "::1%eth0",
            "example.com",
            "1.2.3.4:80",
            "[::1]",
            " 1.2.3.4",
        ] {
            assert!(parse_remote_ip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens() {
        assert!(validate_token(&"ab".repeat(30)).is_ok());
        assert!(validate_token(&"AB".repeat(30)).is_err());
        assert!(validate_token(&"ab".repeat(31)).is_err());
        assert!(validate_token(&"zz".repeat(30)).is_err());
    }

    #[test]
    fn blade_names() {
        for ok in ["b1", "blade-1.example", "B_2", &"a".repeat(64)] {
            assert_eq!(validate_blade_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-b",
            "b 1",
            "b/1",
            "b;1",
            "blade\n",
            "émile",
            &"a".repeat(65),
        ] {
            assert!(validate_blade_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            validate_blade_name("a b").unwrap_err().to_string(),
            "invalid blade name \"a b\": use 1-64 of A-Z a-z 0-9 . _ -"
        );
    }

    #[test]
    fn blade_hosts() {
        for ok in [
            "10.0.0.5",
            "::1",
            "2001:db8::7",
            "blade1",
            "blade-1.example.org",
            &format!("{}.b", "a".repeat(63)),
        ] {
            assert_eq!(validate_blade_host(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-oProxyCommand=x",
            "a..b",
            ".a",
            "a.",
            "a b",
            "a_b",
            "host:22",
            "[::1]",
            &format!("{}.b", "a".repeat(64)),
            // 254 bytes of valid labels: too long as a whole.
            &format!("{}ab", "a.".repeat(126)),
        ] {
            assert!(validate_blade_host(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            validate_blade_host("a b").unwrap_err().to_string(),
            "invalid blade host \"a b\": not an IP address or host name"
        );
    }
}
