//! The `dispatcher` command: `serve`, and client commands for operators and portals
//! (`dispatch`, `blade …`, `session …`) that call a running dispatcher over gRPC.
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dispatcher::dispatch::{DispatchConfig, Dispatcher, Launchers, Policy};
use dispatcher::launcher::agent::AgentLauncher;
use dispatcher::launcher::ssh::{SshConfig, SshLauncher};
use dispatcher::seal::SealKey;
use dispatcher::server::Intervals;
use dispatcher::store::embedded::EmbeddedStore;
use dispatcher::store::mongo::{LegacyBlades, MongoStore};
use dispatcher::store::{Method, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vncdispatch_proto::bearer::{BearerAuth, SharedSecret};
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_proto::v1::{
    AddBladeRequest, DispatchRequest, DrainBladeRequest, EndSessionRequest, LaunchMethod,
    ListBladesRequest, ListSessionsRequest, RemoveBladeRequest,
};

/// vncdispatch dispatcher: hands out desktops on a pool of blades.
///
/// `serve` runs the service; the other commands are clients of a running dispatcher. Every
/// option can also be set through the environment variable shown with it.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
}

#[derive(Debug, Subcommand)]
enum BladeCommand {
    /// Register a blade (or update the one of that name).
    Add {
        /// Unique name.
        name: String,
        /// Host or address of the blade.
        host: String,
        /// Agent gRPC port (default 7501) or SSH port (default 22).
        #[arg(long, default_value_t = 0)]
        port: u32,
        /// How to start sessions there.
        #[arg(long, value_enum, default_value = "agent")]
        method: MethodArg,
    },
    /// List blades with state, health and session counts.
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
enum SessionCommand {
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
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Agent,
    Ssh,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// Dispatcher address.
    #[arg(
        long,
        global = true,
        env = "DISPATCHER_URL",
        default_value = "http://127.0.0.1:7500"
    )]
    dispatcher: String,
    /// Secret file, if the dispatcher requires one (--api-secret-file).
    #[arg(long, global = true, env = "DISPATCHER_API_SECRET_FILE")]
    secret_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML file of settings keyed by these options' long names (`listen = "…"`); the
    /// command line and environment override it.
    #[arg(long, env = "DISPATCHER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on for gRPC.
    #[arg(long, env = "DISPATCHER_LISTEN", default_value = "0.0.0.0:7500")]
    listen: SocketAddr,
    /// Session store: a file path for the embedded store, or mongodb://HOST[:PORT]/vncDispatch.
    #[arg(
        long,
        env = "DISPATCHER_STORE",
        default_value = "/var/lib/vncdispatch/dispatcher.redb"
    )]
    store: String,
    /// Key sealing stored tokens and passwords (64 hex chars, 0600). Created when missing;
    /// dispatchers sharing a MongoDB store must share it. Default: next to the embedded store,
    /// or /var/lib/vncdispatch/seal.key.
    #[arg(long, env = "DISPATCHER_SEAL_KEY_FILE")]
    seal_key_file: Option<PathBuf>,
    /// Shared secret of the blade agents (0600 file).
    #[arg(
        long,
        env = "DISPATCHER_AGENT_SECRET_FILE",
        default_value = "/etc/vncdispatch/agent-secret"
    )]
    agent_secret_file: PathBuf,
    /// Require this shared secret from the dispatcher's own callers (portal, ws-proxy, CLI).
    #[arg(long, env = "DISPATCHER_API_SECRET_FILE")]
    api_secret_file: Option<PathBuf>,
    /// How long a token resolves after the user's latest Dispatch.
    #[arg(long, env = "DISPATCHER_TOKEN_TTL", default_value = "12h", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
    /// Blade choice for new sessions.
    #[arg(
        long,
        env = "DISPATCHER_POLICY",
        value_enum,
        default_value = "round-robin"
    )]
    policy: Policy,
    /// Longest a desktop start may take on one blade before the next is tried.
    #[arg(long, env = "DISPATCHER_LAUNCH_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    launch_timeout: Duration,
    /// How often blades' health is checked.
    #[arg(long, env = "DISPATCHER_HEALTH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// How often expired sessions are removed (and their desktops stopped).
    #[arg(long, env = "DISPATCHER_SWEEP_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    sweep_interval: Duration,
    /// Default blade-agent port.
    #[arg(long, env = "DISPATCHER_AGENT_PORT", default_value_t = 7501)]
    agent_port: u16,
    /// How blades listed by the original deployment (MongoDB blade_list) are reached.
    #[arg(
        long,
        env = "DISPATCHER_LEGACY_BLADE_METHOD",
        value_enum,
        default_value = "ssh"
    )]
    legacy_blade_method: MethodArg,
    /// SSH private key for SSH blades.
    #[arg(long, env = "DISPATCHER_SSH_KEY")]
    ssh_key: Option<PathBuf>,
    /// known_hosts file with every SSH blade's host key (unknown keys are refused).
    #[arg(long, env = "DISPATCHER_SSH_KNOWN_HOSTS")]
    ssh_known_hosts: Option<PathBuf>,
    /// Remote account for SSH blades.
    #[arg(long, env = "DISPATCHER_SSH_USER", default_value = "root")]
    ssh_user: String,
    /// blade-agent program on SSH blades.
    #[arg(long, env = "DISPATCHER_SSH_PROGRAM", default_value = "blade-agent")]
    ssh_program: String,
    /// Extra options for `blade-agent cloudvnc|status|stop` on SSH blades (space-separated,
    /// shell-safe words), e.g. "--rfb-listen 10.0.0.5".
    #[arg(
        long,
        env = "DISPATCHER_SSH_AGENT_ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    ssh_agent_args: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set; keep it off public
    /// networks).
    #[arg(long, env = "DISPATCHER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log lines as JSON objects.
    #[arg(long, env = "DISPATCHER_LOG_JSON")]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli: Cli = vncdispatch_proto::config::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dispatcher: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => {
            vncdispatch_proto::serve::init_logging(args.log_json, "info");
            vncdispatch_proto::config::log_config_file(args.config.as_deref());
            rt.block_on(serve(*args))
        }
        Command::Dispatch {
            client,
            username,
            remote_ip,
        } => rt.block_on(dispatch(client, username, remote_ip)),
        Command::Blade { client, command } => rt.block_on(blade(client, command)),
        Command::Session { client, command } => rt.block_on(session(client, command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("dispatcher: {e:#}");
            ExitCode::from(vncdispatch_proto::serve::EX_USAGE)
        }
        Err(e) => {
            eprintln!("dispatcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A configuration problem (exit code 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

fn method(m: MethodArg) -> Method {
    match m {
        MethodArg::Agent => Method::Agent,
        MethodArg::Ssh => Method::Ssh,
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    vncdispatch_proto::metrics::install(a.metrics_listen).map_err(anyhow::Error::msg)?;
    let config = |key: &str, e: String| ConfigError(format!("{key}: {e}"));
    let agent_secret = SharedSecret::from_file(&a.agent_secret_file)
        .map_err(|e| config("--agent-secret-file", e))?;
    let api_secret = match &a.api_secret_file {
        Some(p) => Some(SharedSecret::from_file(p).map_err(|e| config("--api-secret-file", e))?),
        None => None,
    };
    let mongo = a.store.starts_with("mongodb://") || a.store.starts_with("mongodb+srv://");
    let seal_path = a.seal_key_file.clone().unwrap_or_else(|| match mongo {
        true => PathBuf::from("/var/lib/vncdispatch/seal.key"),
        false => PathBuf::from(&a.store).with_file_name("seal.key"),
    });
    let seal = SealKey::load(&seal_path, true).map_err(|e| config("--seal-key-file", e))?;
    let store: Arc<dyn Store> = if mongo {
        let legacy = LegacyBlades {
            method: method(a.legacy_blade_method),
            port: match a.legacy_blade_method {
                MethodArg::Agent => a.agent_port,
                MethodArg::Ssh => 22,
            },
        };
        Arc::new(
            MongoStore::connect(&a.store, legacy)
                .await
                .context("--store")?,
        )
    } else {
        Arc::new(EmbeddedStore::open(std::path::Path::new(&a.store)).context("--store")?)
    };
    let store: Arc<dyn Store> = Arc::new(dispatcher::store::timed::Timed(store));
    let ssh = match (&a.ssh_key, &a.ssh_known_hosts) {
        (Some(key), Some(known_hosts)) => {
            let cfg = SshConfig {
                user: a.ssh_user.clone(),
                key: key.clone(),
                known_hosts: known_hosts.clone(),
                remote_program: a.ssh_program.clone(),
                remote_args: a
                    .ssh_agent_args
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
                connect_timeout: Duration::from_secs(5),
                command_timeout: a.launch_timeout,
            };
            Some(
                Arc::new(SshLauncher::new(cfg).map_err(|e| config("--ssh-key", e))?)
                    as Arc<dyn dispatcher::launcher::Launcher>,
            )
        }
        (None, None) => None,
        _ => {
            return Err(
                config("--ssh-key/--ssh-known-hosts", "give both or neither".into()).into(),
            );
        }
    };
    let auth = agent_secret
        .client_auth()
        .map_err(|e| config("--agent-secret-file", e))?;
    let launchers = Launchers {
        agent: Arc::new(AgentLauncher::new(auth, a.launch_timeout)),
        ssh,
    };
    let cfg = DispatchConfig {
        token_ttl: a.token_ttl,
        policy: a.policy,
        launch_timeout: a.launch_timeout,
        agent_port: a.agent_port,
    };
    let d = Arc::new(Dispatcher::new(store, launchers, seal, cfg));
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    let intervals = Intervals {
        health: a.health_interval,
        sweep: a.sweep_interval,
    };
    dispatcher::server::run(
        listener,
        d,
        api_secret,
        intervals,
        vncdispatch_proto::serve::shutdown_signal(),
    )
    .await
}

type Client = DispatcherClient<InterceptedService<Channel, BearerAuth>>;

async fn client(c: &ClientArgs) -> anyhow::Result<Client> {
    let auth = match &c.secret_file {
        Some(p) => SharedSecret::from_file(p)
            .map_err(ConfigError)?
            .client_auth()
            .map_err(ConfigError)?,
        None => BearerAuth::none(),
    };
    let channel = Channel::from_shared(c.dispatcher.clone())
        .map_err(|e| ConfigError(format!("--dispatcher {}: {e}", c.dispatcher)))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the dispatcher at {}", c.dispatcher))?;
    Ok(DispatcherClient::with_interceptor(channel, auth))
}

/// Turns a gRPC status into a one-line error for people.
fn said(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn dispatch(c: ClientArgs, username: String, remote_ip: String) -> anyhow::Result<()> {
    let s = client(&c)
        .await?
        .dispatch(DispatchRequest {
            username,
            remote_ip,
        })
        .await
        .map_err(said)?
        .into_inner();
    println!(
        "username  {}\nblade     {}\nhost      {}\ndisplay   {}\nport      {}\nvnc_pid   {}\nremote_ip {}\nreused    {}\ntoken     {}\npassword  {}",
        s.username,
        s.blade,
        s.host,
        s.display,
        s.port,
        s.vnc_pid,
        s.remote_ip,
        s.reused,
        s.token,
        s.password
    );
    Ok(())
}

async fn blade(c: ClientArgs, command: BladeCommand) -> anyhow::Result<()> {
    let mut client = client(&c).await?;
    match command {
        BladeCommand::Add {
            name,
            host,
            port,
            method,
        } => {
            let method = match method {
                MethodArg::Agent => LaunchMethod::Agent,
                MethodArg::Ssh => LaunchMethod::Ssh,
            } as i32;
            let b = client
                .add_blade(AddBladeRequest {
                    name,
                    host,
                    port,
                    method,
                })
                .await
                .map_err(said)?
                .into_inner();
            println!("added {} ({}:{})", b.name, b.host, b.port);
        }
        BladeCommand::List => {
            let blades = client
                .list_blades(ListBladesRequest {})
                .await
                .map_err(said)?
                .into_inner()
                .blades;
            println!(
                "{:<20} {:<24} {:>6} {:<6} {:<9} {:<8} {:>8} {:>6}",
                "NAME", "HOST", "PORT", "METHOD", "STATE", "HEALTH", "SESSIONS", "LOAD"
            );
            for b in blades {
                let method = if b.method == LaunchMethod::Ssh as i32 {
                    "ssh"
                } else {
                    "agent"
                };
                let state = if b.draining { "draining" } else { "active" };
                let health = if b.healthy { "ok" } else { "down" };
                println!(
                    "{:<20} {:<24} {:>6} {:<6} {:<9} {:<8} {:>8} {:>6.2}",
                    b.name, b.host, b.port, method, state, health, b.sessions, b.load1
                );
            }
        }
        BladeCommand::Drain { name, undo } => {
            let b = client
                .drain_blade(DrainBladeRequest {
                    name,
                    draining: !undo,
                })
                .await
                .map_err(said)?
                .into_inner();
            println!(
                "{} is {}",
                b.name,
                if b.draining { "draining" } else { "active" }
            );
        }
        BladeCommand::Remove { name, force } => {
            let removed = client
                .remove_blade(RemoveBladeRequest {
                    name: name.clone(),
                    force,
                })
                .await
                .map_err(said)?
                .into_inner()
                .removed;
            anyhow::ensure!(removed, "no blade named {name:?}");
            println!("removed {name}");
        }
    }
    Ok(())
}

async fn session(c: ClientArgs, command: SessionCommand) -> anyhow::Result<()> {
    let mut client = client(&c).await?;
    match command {
        SessionCommand::List { blade } => {
            let sessions = client
                .list_sessions(ListSessionsRequest { blade })
                .await
                .map_err(said)?
                .into_inner()
                .sessions;
            println!(
                "{:<24} {:<20} {:>7} {:>6} {:>8} {:<40}",
                "USER", "BLADE", "DISPLAY", "PORT", "PID", "REMOTE IP"
            );
            for s in sessions {
                println!(
                    "{:<24} {:<20} {:>7} {:>6} {:>8} {:<40}",
                    s.username, s.blade, s.display, s.port, s.vnc_pid, s.remote_ip
                );
            }
        }
        SessionCommand::End { username } => {
            let ended = client
                .end_session(EndSessionRequest {
                    username: username.clone(),
                })
                .await
                .map_err(said)?
                .into_inner()
                .ended;
            anyhow::ensure!(ended, "{username} has no session");
            println!("ended {username}'s session");
        }
    }
    Ok(())
}
