//! vncdispatch's own desktop viewer page (`web/` in this crate, built into the binary) over the
//! noVNC library served from the web directory (`core/`, `vendor/` and `package.json` only;
//! npm's `@novnc/novnc` ships only the library, no page).
//!
//! The page answers at `/` and `/vnc.html`, the URL portals already build, and takes
//! noVNC's query options; it is sent with a Content-Security-Policy that lets it load scripts
//! and open WebSockets only on this server, and be framed only by this server and the
//! `--allowed-origin`s (which may open its WebSocket anyway).
use std::path::Path;

/// Where the install scripts put the pinned noVNC release (`scripts/install-deps.sh`).
pub const NOVNC_DIR: &str = "/usr/local/share/vncdispatch/novnc";
/// Debian's `novnc` package (1.3.0 on Debian 12): the fallback when the above is missing.
pub const DEBIAN_NOVNC_DIR: &str = "/usr/share/novnc";

/// One built-in file: its content type and body.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// The Content-Type header.
    pub content_type: &'static str,
    /// The file itself.
    pub body: &'static str,
    /// Whether this is the page (which gets the Content-Security-Policy).
    pub page: bool,
}

/// The built-in file at `path`, if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    let (content_type, body, page) = match path {
        "/" | "/vnc.html" => (
            "text/html; charset=utf-8",
            include_str!("../web/vnc.html"),
            true,
        ),
        "/vncdispatch/viewer.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../web/viewer.js"),
            false,
        ),
        "/vncdispatch/viewer.css" => (
            "text/css; charset=utf-8",
            include_str!("../web/viewer.css"),
            false,
        ),
        _ => return None,
    };
    Some(Asset {
        content_type,
        body,
        page,
    })
}

/// Whether `path` (as requested, not decoded) is a file of noVNC's library the page loads:
/// `core/` and `vendor/` scripts and `package.json`. Nothing percent-encoded (the library's
/// names need none, and a decoded `%2e` must not make another file of this one).
pub fn library_file(path: &str) -> bool {
    !path.contains('%')
        && !path.split('/').any(|seg| seg == "..")
        && (path == "/package.json"
            || ((path.starts_with("/core/") || path.starts_with("/vendor/"))
                && path.ends_with(".js")))
}

/// The page's Content-Security-Policy: everything from this server only (noVNC's decoders
/// make blob: and data: images), and framed only by this server and `allowed_origins`.
pub fn content_security_policy(allowed_origins: &[String]) -> String {
    let ancestors = if allowed_origins.iter().any(|o| o == "*") {
        "*".to_owned()
    } else {
        std::iter::once("'self'")
            .chain(
                allowed_origins
                    .iter()
                    // ws-proxy refuses to start on any other; a library caller's is left out.
                    .filter(|o| crate::upgrade::checks::allowed_origin(o).is_ok())
                    .map(String::as_str),
            )
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; \
         style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
         frame-ancestors {ancestors}"
    )
}

/// The noVNC version in `dir` (its package.json, as npm ships it), if it says one.
pub fn novnc_version(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("package.json")).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    doc.get("version")?.as_str().map(str::to_owned)
}

/// The web directory to serve when none is given: the pinned release, else Debian's package.
pub fn default_web_dir() -> Option<&'static Path> {
    [NOVNC_DIR, DEBIAN_NOVNC_DIR]
        .into_iter()
        .map(Path::new)
        .find(|d| d.join("core").join("rfb.js").is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_answers_where_portals_point() {
        for p in ["/", "/vnc.html"] {
            let a = asset(p).expect("page");
            assert!(a.page && a.body.contains("vncdispatch/viewer.js"));
        }
        assert!(!asset("/vncdispatch/viewer.js").expect("js").page);
        assert!(asset("/vnc_lite.html").is_none() && asset("/core/rfb.js").is_none());
    }

    #[test]
    fn only_the_library_is_served_from_the_directory() {
        for ok in [
            "/core/rfb.js",
            "/vendor/pako/lib/zlib/inflate.js",
            "/package.json",
        ] {
            assert!(library_file(ok), "{ok}");
        }
        for bad in [
            "/vnc_lite.html",
            "/vnc%2Ehtml",
            "/core/%2e%2e/vnc_lite.html",
            "/core/../vnc_lite.html",
            "/app/ui.js",
            "/core/",
            "/.installed",
            "/core/rfb.js.map",
        ] {
            assert!(!library_file(bad), "{bad}");
        }
    }

    #[test]
    fn the_page_is_framed_only_by_allowed_origins() {
        let csp = content_security_policy(&[]);
        assert!(csp.ends_with("frame-ancestors 'self'"), "{csp}");
        let csp = content_security_policy(&["https://portal.example".into()]);
        assert!(
            csp.ends_with("frame-ancestors 'self' https://portal.example"),
            "{csp}"
        );
        // A value that would add a directive is left out, not pasted in.
        let csp = content_security_policy(&["https://a.example; script-src *".into()]);
        assert!(csp.ends_with("frame-ancestors 'self'"), "{csp}");
        assert_eq!(
            content_security_policy(&["*".into()]).rsplit("; ").next(),
            Some("frame-ancestors *")
        );
    }

    #[test]
    fn the_version_comes_from_package_json() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(novnc_version(dir.path()), None);
        std::fs::write(dir.path().join("package.json"), r#"{"version":"1.7.0"}"#).expect("write");
        assert_eq!(novnc_version(dir.path()).as_deref(), Some("1.7.0"));
    }
}
