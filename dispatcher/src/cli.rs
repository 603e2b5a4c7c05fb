//! The `dispatcher` command line (part of the binary, not the library): `serve` with every
//! setting as a flag, an environment variable and a config-file key, and the client commands
//! operators and portals use against a running dispatcher. Doc comments here are `--help`.
use clap::{Args, Parser, Subcommand};
use dispatcher::dispatch::Policy;
use dispatcher::store::Method;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// vncdispatch dispatcher: hands out desktops on a pool of blades.
///
/// `serve` runs the service; the other commands are clients of a running dispatcher. Every
/// option can also be set through the environment variable shown with it.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Serve the Dispatcher gRPC API.
    Serve(Box<ServeArgs>),
    /// Get USER's desktop (as the portal does): prints the session.
    Dispatch {
        #[command(flatten)]
        client: ClientArgs,
        /// The portal user.
        username: String,
        /// The browser's IP address.
        remote_ip: String,
        /// The pool a new desktop goes to [default: `default`]; a running desktop is returned
        /// whatever its pool.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Manage blades.
    Blade {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: BladeCommand,
    },
    /// Manage sessions.
    Session {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// Share a user's running desktop with someone else (view-only unless --full-control),
    /// list and revoke shares.
    ///
    /// A share is a token for ws-proxy (`/vnc.html?path=websockify?token=TOKEN`) that opens
    /// the owner's desktop. View-only is enforced by Xvnc itself: the viewer can watch but not
    /// type, point, paste or resize, whatever its client sends. A share ends at its --ttl, when
    /// revoked (an open viewer is closed within ws-proxy's --recheck-interval), or with the
    /// session. Everything is in the audit trail (`dispatcher audit`).
    Share {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ShareCommand,
    },
    /// The audit trail: who dispatched, connected, shared, revoked, ended and administered
    /// what, oldest first.
    Audit {
        #[command(flatten)]
        client: ClientArgs,
        /// Only events concerning this user.
        #[arg(long)]
        user: Option<String>,
        /// Only events since this: a duration back from now (`2h`, `7d`) or an RFC 3339 time
        /// (`2026-11-27T09:00:00Z`).
        #[arg(long, value_parser = parse_since)]
        since: Option<std::time::SystemTime>,
        /// At most this many, the newest (up to 10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make a CA and certificates for mutual TLS between the services.
    ///
    /// Every gRPC hop is mutual TLS 1.3: each service gets `--ca` (this CA's ca.pem),
    /// `--cert` and `--key`. A certificate names one role: portal (Dispatch, EndSession),
    /// proxy (ResolveToken), admin (everything on the dispatcher), dispatcher (the only caller
    /// agents accept) or agent. An operator's own CA works as well: put the role in a URI
    /// SAN `urn:vncdispatch:role:<role>`.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PkiCommand {
    /// Make a CA: DIR/ca.pem (give to every service as --ca) and DIR/ca.key (0600; keep it
    /// off the servers once everything is issued). Never overwrites.
    Init {
        /// Directory for the CA and the certificates issued from it.
        #[arg(long, default_value = "/etc/vncdispatch/pki")]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "vncdispatch CA")]
        name: String,
    },
    /// Issue DIR/NAME.pem and DIR/NAME.key (0600) for one service or client.
    ///
    /// Servers need every host name or address their clients dial as --host: the dispatcher
    /// its own, an agent the host the blade is registered with.
    Issue {
        /// Directory holding the CA (from `pki init`).
        #[arg(long, default_value = "/etc/vncdispatch/pki")]
        dir: PathBuf,
        /// What the certificate may do.
        #[arg(long, value_enum)]
        role: vncdispatch_proto::roles::Role,
        /// File name and CN, e.g. dispatcher, blade-7, portal, proxy, admin.
        #[arg(long)]
        name: String,
        /// A host name or IP address it is valid for (repeat for several).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days it is valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BladeCommand {
    /// Register a blade (or update the one of that name).
    Add {
        /// Unique name.
        name: String,
        /// Host or address of the blade.
        host: String,
        /// Agent gRPC port, or SSH port with --method ssh [default: the dispatcher's
        /// --agent-port (7501), or 22 for SSH].
        #[arg(long)]
        port: Option<u32>,
        /// How to start sessions there.
        #[arg(long, value_enum, default_value = "agent")]
        method: MethodArg,
        /// The pool the blade serves; Dispatch places a new desktop on the blades of the pool
        /// it asks for [default: the blade's pool so far; `default` for a new blade].
        #[arg(long)]
        pool: Option<String>,
        /// Most desktops placed there; 0 for no cap. An agent blade never takes more than its
        /// displays; an SSH blade has no other limit [default: the blade's cap so far; none
        /// for a new blade].
        #[arg(long)]
        max_sessions: Option<u32>,
    },
    /// List blades with pool, state, health, capacity and placement score.
    List,
    /// Stop giving the blade new sessions (existing ones stay).
    Drain {
        /// Blade name.
        name: String,
        /// Put it back into rotation instead.
        #[arg(long)]
        undo: bool,
    },
    /// Forget a blade.
    Remove {
        /// Blade name.
        name: String,
        /// Also end its sessions.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SessionCommand {
    /// List sessions.
    List {
        /// Only this blade's.
        #[arg(long, default_value = "")]
        blade: String,
    },
    /// End USER's session: revoke the token and stop the desktop.
    End {
        /// The user.
        username: String,
    },
    /// Ended sessions, newest first, and why each ended: portal, operator, token_expired
    /// (no client came), no_client (idle grace passed), max_age, blade_removed, xvnc_died,
    /// start_failed.
    History {
        /// Only this user's.
        username: Option<String>,
        /// At most this many (up to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ShareCommand {
    /// Share USER's running desktop: prints the share's id, its token (shown only now) and,
    /// for viewers without ws-proxy's --auth-proxy, the password that goes with it.
    Add {
        /// The user whose desktop to share.
        username: String,
        /// Let the viewer type, point and paste (default: view-only).
        #[arg(long)]
        full_control: bool,
        /// How long the share lasts [default: the dispatcher's --share-ttl, 1h].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// A note for listings and the audit trail (e.g. a ticket number).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// List live shares.
    List {
        /// Only this user's desktop's.
        username: Option<String>,
    },
    /// Revoke a share by its id: new connections are refused, open ones closed.
    Revoke {
        /// The share's id (from `share add` or `share list`).
        id: String,
    },
}

/// `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(s: &str) -> Result<std::time::SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(s) {
        return std::time::SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{s} ago is before the epoch"));
    }
    humantime::parse_rfc3339_weak(s).map_err(|_| {
        format!("{s:?}: a duration (2h, 7d) or an RFC 3339 time (2026-11-27T09:00:00Z)")
    })
}

/// Where sessions are stored, as `--store` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreArg {
    /// The embedded store's file.
    File(PathBuf),
    /// A MongoDB (or FerretDB) URI.
    Mongo(String),
}

/// A file path, or a `mongodb://` / `mongodb+srv://` URI; anything that looks like a URI of
/// another kind (a typo such as `mongo://` or `mongodb:/`) is refused rather than taken for a
/// file name.
pub(crate) fn parse_store(s: &str) -> Result<StoreArg, String> {
    if s.starts_with("mongodb://") || s.starts_with("mongodb+srv://") {
        return Ok(StoreArg::Mongo(s.to_owned()));
    }
    let scheme_like = s.split_once(':').is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && !scheme.contains('/')
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    });
    if s.is_empty() || scheme_like {
        return Err(format!(
            "{s:?} is neither a file path nor a MongoDB URI: give a path for the embedded store (e.g. /var/lib/vncdispatch/dispatcher.redb) or mongodb://HOST[:PORT]/vncDispatch"
        ));
    }
    Ok(StoreArg::File(PathBuf::from(s)))
}

/// The client options (`ClientArgs`), which the subcommands take, may also come before the
/// subcommand (`dispatcher --dispatcher URL blade list`): they are moved after it, where
/// clap expects them. Everything else stays where it is.
pub(crate) fn hoist_client_options(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let original = args.clone();
    const WITH_VALUE: [&str; 5] = ["--dispatcher", "--secret-file", "--ca", "--cert", "--key"];
    let mut out: Vec<std::ffi::OsString> = Vec::with_capacity(args.len());
    let mut hoisted = Vec::new();
    let mut it = args.into_iter();
    if let Some(program) = it.next() {
        out.push(program);
    }
    while let Some(a) = it.next() {
        let text = a.to_string_lossy().into_owned();
        let name = text.split_once('=').map_or(text.as_str(), |(n, _)| n);
        if WITH_VALUE.contains(&name) {
            let inline = text.contains('=');
            hoisted.push(a);
            if !inline && let Some(v) = it.next() {
                hoisted.push(v);
            }
            continue;
        }
        // The first word that is not an option is the subcommand: the rest follows it.
        out.push(a);
        if !text.starts_with('-') {
            // Only the client commands take these; anything else (serve, pki, help, or a
            // value mistaken for a command) gets the arguments as they were, for clap to judge.
            if !["dispatch", "blade", "session", "share", "audit"].contains(&text.as_str()) {
                return original;
            }
            out.append(&mut hoisted);
            break;
        }
    }
    out.extend(hoisted);
    out.extend(it);
    out
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum MethodArg {
    Agent,
    Ssh,
}

#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    /// Dispatcher address.
    #[arg(
        long,
        global = true,
        env = "DISPATCHER_URL",
        default_value = "http://127.0.0.1:7500"
    )]
    pub(crate) dispatcher: String,
    /// Secret file, if the dispatcher requires one (--api-secret-file).
    #[arg(long, global = true, env = "DISPATCHER_API_SECRET_FILE")]
    pub(crate) secret_file: Option<PathBuf>,
    /// CA bundle (PEM) the dispatcher's certificate must chain to; with --cert and --key the
    /// call is mutual TLS (then --dispatcher is https://HOST:PORT).
    #[arg(long, global = true, env = "DISPATCHER_CLIENT_CA")]
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate (PEM) naming the role the command needs: admin for blades and
    /// listings, portal or admin for dispatch and ending sessions.
    #[arg(long, global = true, env = "DISPATCHER_CLIENT_CERT")]
    pub(crate) cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, mode 0600).
    #[arg(long, global = true, env = "DISPATCHER_CLIENT_KEY")]
    pub(crate) key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// TOML file of settings keyed by these options' long names (`listen = "…"`); the
    /// command line and environment override it.
    #[arg(long, env = "DISPATCHER_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Address to listen on for gRPC.
    #[arg(long, env = "DISPATCHER_LISTEN", default_value = "0.0.0.0:7500")]
    pub(crate) listen: SocketAddr,
    /// Also serve the original deployment's HTTP route, `GET /vncdispatch/USER/REMOTE_IP`
    /// (answering the original's JSON document), on this address: for portals written for
    /// the original. The same rules as Dispatch: mutual TLS with role portal or admin when
    /// --ca/--cert/--key are given (HTTP/1.1 over TLS), and --api-secret-file's secret as
    /// `Authorization: Bearer` when set. Without TLS it serves only on loopback (or with
    /// --insecure-plaintext) and only with --api-secret-file. Off unless given.
    #[arg(long, env = "DISPATCHER_HTTP_LISTEN")]
    pub(crate) http_listen: Option<SocketAddr>,
    /// Session store: a file path for the embedded store (one dispatcher), or
    /// mongodb://HOST[:PORT]/vncDispatch (or mongodb+srv://…) for several.
    #[arg(
        long,
        env = "DISPATCHER_STORE",
        default_value = "/var/lib/vncdispatch/dispatcher.redb",
        value_parser = parse_store
    )]
    pub(crate) store: StoreArg,
    /// Key sealing stored tokens and passwords (64 hex chars, 0600). Created when missing;
    /// dispatchers sharing a MongoDB store must share it. Default: next to the embedded store,
    /// or /var/lib/vncdispatch/seal.key.
    #[arg(long, env = "DISPATCHER_SEAL_KEY_FILE")]
    pub(crate) seal_key_file: Option<PathBuf>,
    /// Shared secret of the blade agents (0600 file).
    #[arg(
        long,
        env = "DISPATCHER_AGENT_SECRET_FILE",
        default_value = "/etc/vncdispatch/agent-secret"
    )]
    pub(crate) agent_secret_file: PathBuf,
    /// Require this shared secret from the dispatcher's own callers (portal, ws-proxy, CLI).
    #[arg(long, env = "DISPATCHER_API_SECRET_FILE")]
    pub(crate) api_secret_file: Option<PathBuf>,
    /// CA bundle (PEM) every peer's certificate must chain to. With --cert and --key the
    /// dispatcher serves mutual TLS 1.3 (callers need a role: portal, proxy or admin) and
    /// reaches agents over mutual TLS, verifying each agent's certificate for the host its
    /// blade is registered with.
    #[arg(long, env = "DISPATCHER_CA")]
    pub(crate) ca: Option<PathBuf>,
    /// The dispatcher's certificate (PEM): role dispatcher, valid for the host names callers
    /// dial (`dispatcher pki issue --role dispatcher --host …`).
    #[arg(long, env = "DISPATCHER_CERT")]
    pub(crate) cert: Option<PathBuf>,
    /// The dispatcher's private key (PEM, mode 0600).
    #[arg(long, env = "DISPATCHER_KEY")]
    pub(crate) key: Option<PathBuf>,
    /// Without --ca/--cert/--key: serve plaintext on a non-loopback --listen, and call agents
    /// that are not on loopback in clear (their secret and users' passwords then cross the
    /// network). Anyone who reaches the port can take any user's desktop. Only on a network
    /// you trust; logged as a warning.
    #[arg(long, env = "DISPATCHER_INSECURE_PLAINTEXT")]
    pub(crate) insecure_plaintext: bool,
    /// How long a token resolves for a new connection after the user's latest Dispatch. A
    /// relay already open is not cut at this time (ws-proxy's re-checks renew a lease), and
    /// while a client is attached the token keeps resolving for new connections too — so a
    /// dropped browser can come back; see --lease, --idle-grace, --max-age.
    #[arg(long, env = "DISPATCHER_TOKEN_TTL", default_value = "12h", value_parser = humantime::parse_duration)]
    pub(crate) token_ttl: Duration,
    /// How long a desktop lives after its last client (browser through ws-proxy) left, before
    /// the sweeper stops it (reason no_client). While a client is attached a desktop is never
    /// stopped; a desktop no client ever reached is stopped when its token expires.
    #[arg(long, env = "DISPATCHER_IDLE_GRACE", default_value = "4h", value_parser = humantime::parse_duration)]
    pub(crate) idle_grace: Duration,
    /// Stop desktops this old even with a client attached (reason max_age); unset: never —
    /// then an open browser tab (or anyone holding the URL while it is open) keeps a desktop
    /// for as long as it stays connected.
    #[arg(long, env = "DISPATCHER_MAX_AGE", value_parser = humantime::parse_duration)]
    pub(crate) max_age: Option<Duration>,
    /// How long one renewal of a client's lease holds. ws-proxy renews at its
    /// --recheck-interval (default 30s), which must be comfortably shorter (ws-proxy warns
    /// when it is not). A desktop is stopped about last renewal + lease + --idle-grace (+ up
    /// to --sweep-interval) after its last client left.
    #[arg(long, env = "DISPATCHER_LEASE", default_value = "90s", value_parser = humantime::parse_duration)]
    pub(crate) lease: Duration,
    /// How long a share (ShareSession, `dispatcher share`) lasts when its maker names no time.
    #[arg(long, env = "DISPATCHER_SHARE_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) share_ttl: Duration,
    /// The longest a share may be made for (a share also ends with its session).
    #[arg(long, env = "DISPATCHER_MAX_SHARE_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub(crate) max_share_ttl: Duration,
    /// How long the audit trail is kept in the store (`dispatcher audit`); older events are
    /// dropped hourly. The JSON lines on the log target `vncdispatch::audit` are the log's to
    /// keep.
    #[arg(long, env = "DISPATCHER_AUDIT_RETENTION", default_value = "90d", value_parser = humantime::parse_duration)]
    pub(crate) audit_retention: Duration,
    /// Blade choice for new sessions: `score` places each on the blade with the lowest
    /// placement score (desktops, load per CPU, memory in use, each as a share of the blade's
    /// own size); `round-robin` is the original's rotation. Either way a full blade gets none.
    #[arg(long, env = "DISPATCHER_POLICY", value_enum, default_value = "score")]
    pub(crate) policy: Policy,
    /// Longest a desktop start may take on one blade before the next is tried.
    #[arg(long, env = "DISPATCHER_LAUNCH_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub(crate) launch_timeout: Duration,
    /// How often blades' health is checked.
    #[arg(long, env = "DISPATCHER_HEALTH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) health_interval: Duration,
    /// How often expired sessions are removed (and their desktops stopped).
    #[arg(long, env = "DISPATCHER_SWEEP_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) sweep_interval: Duration,
    /// Default blade-agent port.
    #[arg(long, env = "DISPATCHER_AGENT_PORT", default_value_t = 7501)]
    pub(crate) agent_port: u16,
    /// How blades listed by the original deployment (MongoDB blade_list) are reached.
    #[arg(
        long,
        env = "DISPATCHER_LEGACY_BLADE_METHOD",
        value_enum,
        default_value = "ssh"
    )]
    pub(crate) legacy_blade_method: MethodArg,
    /// SSH private key for SSH blades.
    #[arg(long, env = "DISPATCHER_SSH_KEY")]
    pub(crate) ssh_key: Option<PathBuf>,
    /// known_hosts file with every SSH blade's host key (unknown keys are refused).
    #[arg(long, env = "DISPATCHER_SSH_KNOWN_HOSTS")]
    pub(crate) ssh_known_hosts: Option<PathBuf>,
    /// Remote account for SSH blades.
    #[arg(long, env = "DISPATCHER_SSH_USER", default_value = "root")]
    pub(crate) ssh_user: String,
    /// blade-agent program on SSH blades.
    #[arg(long, env = "DISPATCHER_SSH_PROGRAM", default_value = "blade-agent")]
    pub(crate) ssh_program: String,
    /// Extra options for `blade-agent cloudvnc|status|stop` on SSH blades (space-separated,
    /// shell-safe words), e.g. "--rfb-listen 10.0.0.5".
    #[arg(
        long,
        env = "DISPATCHER_SSH_AGENT_ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub(crate) ssh_agent_args: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set; keep it off public
    /// networks).
    #[arg(long, env = "DISPATCHER_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Log lines as JSON objects.
    #[arg(long, env = "DISPATCHER_LOG_JSON")]
    pub(crate) log_json: bool,
}

/// The store's launch method for a `--method`/`--legacy-blade-method` value.
pub(crate) fn method(m: MethodArg) -> Method {
    match m {
        MethodArg::Agent => Method::Agent,
        MethodArg::Ssh => Method::Ssh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn args(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn client_options_before_the_subcommand_move_after_it() {
        assert_eq!(
            hoist_client_options(args("dispatcher --dispatcher https://d:7500 blade list")),
            args("dispatcher blade --dispatcher https://d:7500 list")
        );
        assert_eq!(
            hoist_client_options(args("dispatcher --ca=ca.pem --key k session history alice")),
            args("dispatcher session --ca=ca.pem --key k history alice")
        );
        // Already after it, or no client options: unchanged.
        for unchanged in [
            "dispatcher blade list --dispatcher http://x",
            "dispatcher serve --listen 127.0.0.1:1",
            "dispatcher --version",
            // Not a client command: left for clap (serve's own --ca, help, a missing value).
            "dispatcher --ca ca.pem serve",
            "dispatcher --dispatcher http://x help blade",
            "dispatcher --dispatcher blade list",
        ] {
            assert_eq!(hoist_client_options(args(unchanged)), args(unchanged));
        }
        let parsed = Cli::try_parse_from(hoist_client_options(args(
            "dispatcher --dispatcher https://d:7500 blade list",
        )))
        .expect("parses");
        match parsed.command {
            Command::Blade { client, .. } => assert_eq!(client.dispatcher, "https://d:7500"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn store_is_a_path_or_a_mongodb_uri_and_nothing_else() {
        assert_eq!(
            parse_store("/var/lib/x.redb"),
            Ok(StoreArg::File("/var/lib/x.redb".into()))
        );
        assert_eq!(parse_store("x.redb"), Ok(StoreArg::File("x.redb".into())));
        assert_eq!(
            parse_store("mongodb://db:27017/vncDispatch"),
            Ok(StoreArg::Mongo("mongodb://db:27017/vncDispatch".into()))
        );
        for typo in [
            "mongo://db/x",
            "mongodb:/db/x",
            "mongodb:db",
            "redis://x",
            "",
        ] {
            assert!(parse_store(typo).is_err(), "{typo:?} was accepted");
        }
    }
}
