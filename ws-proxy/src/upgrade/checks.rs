//! The checks of an upgrade request that need no lookup: plain functions of the request's
//! method, query string, headers and peer address, so each hostile shape of a request can be
//! tried here without a server.
//!
//! They read headers the way the proxy always has, and the tests pin that down: where a header
//! may appear more than once, the first Origin, Host and X-Forwarded-For count, while
//! every Cookie and Sec-WebSocket-Protocol header is read; a value that is not visible ASCII
//! reads as absent.
use super::Refusal;
use hyper::Method;
use hyper::header::{self, HeaderMap, HeaderValue};
use std::net::{IpAddr, SocketAddr};

/// A first header value as text; absent when missing or not visible ASCII.
fn first(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// An RFC 6455 opening handshake: `GET`, `Sec-WebSocket-Version: 13`, `upgrade` among the
/// `Connection` tokens and a `Sec-WebSocket-Key`, which is returned for the 101's
/// `Sec-WebSocket-Accept`. Anything else: [`Refusal::NOT_WEBSOCKET`] (400 `bad_request`).
pub fn handshake(method: &Method, headers: &HeaderMap) -> Result<HeaderValue, Refusal> {
    let key = headers.get("sec-websocket-key").cloned();
    let version_ok = headers
        .get("sec-websocket-version")
        .is_some_and(|v| v == "13");
    let connection_upgrade = first(headers, header::CONNECTION).is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    match (key, version_ok, connection_upgrade, method == Method::GET) {
        (Some(key), true, true, true) => Ok(key),
        _ => Err(Refusal::NOT_WEBSOCKET),
    }
}

/// The client's IP: the peer's, or the last X-Forwarded-For hop when the peer is one of the
/// `trusted` proxies (that hop is the address the proxy itself saw; earlier ones are whatever
/// the client wrote). A hop that is not a bare IP address leaves the peer's. Never refuses.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if trusted.contains(&peer.ip())
        && let Some(ip) = first(headers, "x-forwarded-for")
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    peer.ip()
}

/// Cross-site WebSocket hijacking (nova's CVE-2015-0259): the Origin must be the proxy's own
/// (its `host[:port]` equal to Host, any scheme, ASCII case ignored) or on the `allowed` list
/// (exactly, case ignored; `*` allows any). No Origin means no browser: allowed unless
/// `require_origin`. `null` and anything without `://` match no Host. Refused:
/// [`Refusal::ORIGIN`] (403 `origin`).
pub fn origin(
    headers: &HeaderMap,
    allowed: &[String],
    require_origin: bool,
) -> Result<(), Refusal> {
    let ok = match first(headers, header::ORIGIN) {
        None => !require_origin,
        Some(origin)
            if allowed
                .iter()
                .any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) =>
        {
            true
        }
        Some(origin) => {
            let host = first(headers, header::HOST).unwrap_or("");
            let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
            !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
        }
    };
    if ok { Ok(()) } else { Err(Refusal::ORIGIN) }
}

/// Checks an `--allowed-origin` value: `*`, or `scheme://host[:port]` as browsers send it in
/// Origin (http or https, no path, no trailing slash) — a value of another form would never
/// match, and the viewer page's CSP names these origins.
pub fn allowed_origin(value: &str) -> Result<(), String> {
    if value == "*" {
        return Ok(());
    }
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| format!("{value:?}: an origin starts with https:// or http://"))?;
    let ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?}: an origin is scheme://host[:port], with no path, slash or other characters (e.g. https://portal.example.org)"
        ))
    }
}

/// The subprotocol to answer with. websockify only echoes `binary`, so `binary` is chosen
/// when offered, and a client that offers none gets none (noVNC offers none); offers without
/// `binary` (an empty one included): [`Refusal::SUBPROTOCOL`] (400 `bad_request`).
pub fn subprotocol(headers: &HeaderMap) -> Result<Option<&'static str>, Refusal> {
    let offered: Vec<&str> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    match (offered.is_empty(), offered.contains(&"binary")) {
        (true, _) => Ok(None),
        (false, true) => Ok(Some("binary")),
        (false, false) => Err(Refusal::SUBPROTOCOL),
    }
}

/// The token: the first `token=` of the query string (as noVNC's `path=websockify?token=…`
/// sends it, taken as it is, not percent-decoded), else the first `token` cookie of any
/// Cookie header. Names match exactly (`TOKEN=` is not one). An empty token is still a token
/// (the lookup refuses it); none at all: [`Refusal::MISSING_TOKEN`] (400 `missing_token`).
pub fn token(query: Option<&str>, headers: &HeaderMap) -> Result<String, Refusal> {
    let from_query = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    let from_cookie = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix("token="))
    };
    from_query
        .or_else(from_cookie)
        .map(str::to_owned)
        .ok_or(Refusal::MISSING_TOKEN)
}

/// With `bind_to_ip`, a token is good only from the remote IP recorded at Dispatch (compared
/// as addresses, so `2001:db8::1` and `2001:0db8:0::1` are one; an empty or unparsable record —
/// token files have none — matches no client). Refused: [`Refusal::WRONG_IP`] (403
/// `wrong_ip`).
pub fn ip_binding(bind_to_ip: bool, recorded: &str, client: IpAddr) -> Result<(), Refusal> {
    if bind_to_ip && recorded.parse::<IpAddr>().ok() != Some(client) {
        return Err(Refusal::WRONG_IP);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_origins_are_checked_at_start() {
        for ok in [
            "*",
            "https://portal.example.org",
            "http://127.0.0.1:8080",
            "https://[::1]:443",
        ] {
            assert_eq!(allowed_origin(ok), Ok(()), "{ok}");
        }
        for bad in [
            "portal.example.org",
            "https://x/",
            "https://x/path",
            "https://a; script-src *",
            "ftp://x",
            "https://",
        ] {
            assert!(allowed_origin(bad).is_err(), "{bad}");
        }
    }

    /// Headers in order; a name given twice is appended, as a client sending both would.
    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn ws_headers(extra: &[(&'static str, &'static [u8])]) -> HeaderMap {
        let mut pairs: Vec<(&'static str, &[u8])> = vec![
            ("connection", b"Upgrade"),
            ("upgrade", b"websocket"),
            ("sec-websocket-version", b"13"),
            ("sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        pairs.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        pairs.extend_from_slice(extra);
        headers(&pairs)
    }

    #[test]
    fn handshake_needs_get_version_13_connection_upgrade_and_a_key() {
        let key = handshake(&Method::GET, &ws_headers(&[])).unwrap();
        assert_eq!(key, "dGhlIHNhbXBsZSBub25jZQ==");
        // Connection lists more than one token (Firefox: `keep-alive, Upgrade`), any case.
        let h = ws_headers(&[("connection", b"keep-alive, UPGRADE")]);
        assert!(handshake(&Method::GET, &h).is_ok());
        for (what, method, h) in [
            ("POST", Method::POST, ws_headers(&[])),
            (
                "version 8",
                Method::GET,
                ws_headers(&[("sec-websocket-version", b"8")]),
            ),
            (
                "no upgrade token",
                Method::GET,
                ws_headers(&[("connection", b"keep-alive")]),
            ),
            (
                "upgrade only inside a token",
                Method::GET,
                ws_headers(&[("connection", b"upgrades")]),
            ),
            (
                "non-ASCII Connection",
                Method::GET,
                ws_headers(&[("connection", b"upgrade\xff")]),
            ),
        ] {
            assert_eq!(
                handshake(&method, &h),
                Err(Refusal::NOT_WEBSOCKET),
                "{what}"
            );
        }
        let mut no_key = ws_headers(&[]);
        no_key.remove("sec-websocket-key");
        assert_eq!(
            handshake(&Method::GET, &no_key),
            Err(Refusal::NOT_WEBSOCKET)
        );
        assert_eq!(Refusal::NOT_WEBSOCKET.status.as_u16(), 400);
        assert_eq!(Refusal::NOT_WEBSOCKET.reason, "bad_request");
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://portal.example.com".to_string()];
        let check =
            |pairs: &[(&'static str, &[u8])], require| origin(&headers(pairs), &allowed, require);
        let host: (&'static str, &[u8]) = ("host", b"proxy:6080");
        assert_eq!(
            check(&[host, ("origin", b"http://proxy:6080")], false),
            Ok(())
        );
        assert_eq!(
            check(&[host, ("origin", b"https://portal.example.com")], false),
            Ok(())
        );
        assert_eq!(check(&[host], false), Ok(()), "no Origin: not a browser");
        assert_eq!(check(&[host], true), Err(Refusal::ORIGIN));
        // Case is ignored in the allow-list and in the host; the scheme is not compared.
        assert_eq!(
            check(&[host, ("origin", b"HTTPS://Portal.Example.COM")], false),
            Ok(())
        );
        assert_eq!(
            check(&[host, ("origin", b"HTTP://PROXY:6080")], false),
            Ok(())
        );
        assert_eq!(
            check(&[host, ("origin", b"https://proxy:6080")], false),
            Ok(())
        );
        // IPv6 hosts compare with their brackets and port.
        let v6: (&'static str, &[u8]) = ("host", b"[::1]:6080");
        assert_eq!(
            check(&[v6, ("origin", b"http://[::1]:6080")], false),
            Ok(())
        );
        assert_eq!(
            check(&[v6, ("origin", b"http://[::2]:6080")], false),
            Err(Refusal::ORIGIN)
        );
        for evil in [
            &b"http://evil.example"[..],
            b"http://proxy:6080.evil.example",
            b"http://evil.example/proxy:6080",
            b"http://proxy", // another port is another origin
            b"http://proxy:6081",
            b"http://proxy:6080/", // an Origin has no path
            b"null",               // sandboxed frames, file:// pages, some redirects
            b"proxy:6080",         // no scheme
            b"",
            b"https://portal.example.com.evil.example",
            b"https://portal.example.com:443", // the allow-list is exact
        ] {
            assert_eq!(
                check(&[host, ("origin", evil)], false),
                Err(Refusal::ORIGIN),
                "{}",
                String::from_utf8_lossy(evil)
            );
        }
        // Without a Host nothing is same-origin, not even an empty Origin.
        assert_eq!(
            check(&[("origin", b"http://")], false),
            Err(Refusal::ORIGIN)
        );
        assert_eq!(
            check(&[("origin", b"http://proxy:6080")], false),
            Err(Refusal::ORIGIN)
        );
        // Two Origin headers: the first counts. Browsers send one; whoever sends two is not a
        // browser and could as well have sent none.
        assert_eq!(
            check(
                &[
                    host,
                    ("origin", b"http://evil.example"),
                    ("origin", b"http://proxy:6080")
                ],
                false
            ),
            Err(Refusal::ORIGIN)
        );
        // Two Host headers: the first counts.
        assert_eq!(
            check(
                &[
                    ("host", b"evil.example"),
                    host,
                    ("origin", b"http://proxy:6080")
                ],
                false
            ),
            Err(Refusal::ORIGIN)
        );
        // A non-ASCII Origin reads as none: browsers serialise origins in ASCII (punycode).
        assert_eq!(check(&[host, ("origin", b"http://\xe9vil")], false), Ok(()));
        assert_eq!(
            check(&[host, ("origin", b"http://\xe9vil")], true),
            Err(Refusal::ORIGIN)
        );
        // `*` allows any Origin, even `null`.
        let any = vec!["*".to_string()];
        assert_eq!(
            origin(&headers(&[host, ("origin", b"null")]), &any, true),
            Ok(())
        );
        assert_eq!(Refusal::ORIGIN.status.as_u16(), 403);
        assert_eq!(Refusal::ORIGIN.reason, "origin");
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpAddr> = vec![[10, 0, 0, 1].into(), "fd00::1".parse().unwrap()];
        let ip = |peer: &str, pairs: &[(&'static str, &[u8])]| {
            client_ip(peer.parse().unwrap(), &headers(pairs), &trusted)
        };
        let ip_of = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff: (&'static str, &[u8]) = ("x-forwarded-for", b"198.51.100.7, 192.0.2.9");
        // The last hop is what the trusted proxy saw; the first is what the client claimed.
        assert_eq!(ip("10.0.0.1:1", &[xff]), ip_of("192.0.2.9"));
        // Spoofed by a client that is not a trusted proxy: ignored.
        assert_eq!(ip("10.0.0.2:1", &[xff]), ip_of("10.0.0.2"));
        assert_eq!(ip("[2001:db8::5]:1", &[xff]), ip_of("2001:db8::5"));
        // A trusted proxy that sends none, or garbage, or a hop with a port: the peer.
        assert_eq!(ip("10.0.0.1:1", &[]), ip_of("10.0.0.1"));
        for odd in [
            &b"unknown"[..],
            b"192.0.2.9:4711",
            b"[2001:db8::9]",
            b"",
            b"192.0.2.9,",
            b"192.0.2.\xff",
        ] {
            assert_eq!(
                ip("10.0.0.1:1", &[("x-forwarded-for", odd)]),
                ip_of("10.0.0.1"),
                "{}",
                String::from_utf8_lossy(odd)
            );
        }
        // IPv6 proxies and hops; spaces around the hop do not matter.
        assert_eq!(
            ip(
                "[fd00::1]:443",
                &[("x-forwarded-for", b"192.0.2.1,  2001:db8::9 ")]
            ),
            ip_of("2001:db8::9")
        );
        // Two X-Forwarded-For headers: the first counts.
        assert_eq!(
            ip(
                "10.0.0.1:1",
                &[
                    ("x-forwarded-for", b"192.0.2.1"),
                    ("x-forwarded-for", b"192.0.2.2")
                ]
            ),
            ip_of("192.0.2.1")
        );
        // A trusted address must match exactly: the IPv4-mapped form is another peer.
        assert_eq!(ip("[::ffff:10.0.0.1]:1", &[xff]), ip_of("::ffff:10.0.0.1"));
    }

    #[test]
    fn subprotocols() {
        assert_eq!(subprotocol(&headers(&[])), Ok(None));
        let offer = |v: &'static [u8]| subprotocol(&headers(&[("sec-websocket-protocol", v)]));
        assert_eq!(offer(b"binary"), Ok(Some("binary")));
        assert_eq!(offer(b"base64, binary"), Ok(Some("binary")));
        assert_eq!(offer(b"base64"), Err(Refusal::SUBPROTOCOL));
        assert_eq!(
            offer(b"Binary"),
            Err(Refusal::SUBPROTOCOL),
            "names are case-sensitive"
        );
        assert_eq!(
            offer(b""),
            Err(Refusal::SUBPROTOCOL),
            "an empty offer is an offer"
        );
        // Offers spread over several headers all count.
        let two = headers(&[
            ("sec-websocket-protocol", b"base64"),
            ("sec-websocket-protocol", b"binary"),
        ]);
        assert_eq!(subprotocol(&two), Ok(Some("binary")));
        assert_eq!(Refusal::SUBPROTOCOL.status.as_u16(), 400);
        assert_eq!(Refusal::SUBPROTOCOL.reason, "bad_request");
    }

    #[test]
    fn tokens_from_query_then_cookie() {
        let none = HeaderMap::new();
        assert_eq!(token(Some("token=abc"), &none).as_deref(), Ok("abc"));
        assert_eq!(
            token(Some("x=1&token=abc&y=2"), &none).as_deref(),
            Ok("abc")
        );
        assert_eq!(
            token(Some("token=a&token=b"), &none).as_deref(),
            Ok("a"),
            "the first wins"
        );
        assert_eq!(
            token(Some("token=a%20b"), &none).as_deref(),
            Ok("a%20b"),
            "not decoded"
        );
        assert_eq!(
            token(Some("token="), &none).as_deref(),
            Ok(""),
            "empty: the lookup refuses"
        );
        for missing in [
            None,
            Some(""),
            Some("TOKEN=abc"),
            Some("xtoken=abc"),
            Some("token"),
        ] {
            assert_eq!(
                token(missing, &none),
                Err(Refusal::MISSING_TOKEN),
                "{missing:?}"
            );
        }
        let cookies = headers(&[
            ("cookie", b"theme=dark; token=fromcookie"),
            ("cookie", b"token=second"),
        ]);
        assert_eq!(token(None, &cookies).as_deref(), Ok("fromcookie"));
        assert_eq!(
            token(Some("token=q"), &cookies).as_deref(),
            Ok("q"),
            "the query wins"
        );
        assert_eq!(
            token(Some("other=1"), &cookies).as_deref(),
            Ok("fromcookie")
        );
        // A cookie header that is not ASCII is skipped, not fatal.
        let odd = headers(&[("cookie", b"token=\xff"), ("cookie", b"token=ok")]);
        assert_eq!(token(None, &odd).as_deref(), Ok("ok"));
        let no_token = headers(&[("cookie", b"mytoken=x; Token=y")]);
        assert_eq!(token(None, &no_token), Err(Refusal::MISSING_TOKEN));
        assert_eq!(Refusal::MISSING_TOKEN.status.as_u16(), 400);
        assert_eq!(Refusal::MISSING_TOKEN.reason, "missing_token");
    }

    #[test]
    fn ip_binding_compares_addresses() {
        let client: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_binding(true, "2001:0db8:0::1", client), Ok(()));
        assert_eq!(
            ip_binding(true, "2001:db8::2", client),
            Err(Refusal::WRONG_IP)
        );
        let v4: IpAddr = [192, 0, 2, 50].into();
        assert_eq!(ip_binding(true, "192.0.2.50", v4), Ok(()));
        for recorded in [
            "",
            "garbage",
            " 192.0.2.50",
            "::ffff:192.0.2.50",
            "192.0.2.5",
        ] {
            assert_eq!(
                ip_binding(true, recorded, v4),
                Err(Refusal::WRONG_IP),
                "{recorded:?}"
            );
            assert_eq!(ip_binding(false, recorded, v4), Ok(()), "off: {recorded:?}");
        }
        assert_eq!(Refusal::WRONG_IP.status.as_u16(), 403);
        assert_eq!(Refusal::WRONG_IP.reason, "wrong_ip");
    }
}
