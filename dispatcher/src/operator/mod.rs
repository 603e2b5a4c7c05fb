//! The client commands (part of the binary, not the library): `dispatch`, `blade …` and
//! `session …` call a running dispatcher over gRPC, as a portal or operator would, and print
//! what it answered; a status becomes a one-line error naming its code.
use crate::ConfigError;
use crate::cli::{BladeCommand, ClientArgs, MethodArg, SessionCommand};
use anyhow::Context;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vncdispatch_proto::bearer::{BearerAuth, SharedSecret};
use vncdispatch_proto::roles::Role;
use vncdispatch_proto::tls::{self, Credentials, TlsFiles};
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;
use vncdispatch_proto::v1::{
    AddBladeRequest, DispatchRequest, DrainBladeRequest, EndSessionRequest, LaunchMethod,
    ListBladesRequest, ListSessionsRequest, RemoveBladeRequest, SessionHistoryRequest,
};

/// A dispatcher client carrying the API secret, if one was given.
pub(crate) mod sharing;

type Client = DispatcherClient<InterceptedService<Channel, BearerAuth>>;

/// Connects to `--dispatcher`, with the secret from `--secret-file` if given.
async fn client(c: &ClientArgs) -> anyhow::Result<Client> {
    let auth = match &c.secret_file {
        Some(p) => SharedSecret::from_file(p)
            .map_err(ConfigError)?
            .client_auth()
            .map_err(ConfigError)?,
        None => BearerAuth::none(),
    };
    let tls = match TlsFiles::from_flags(c.ca.clone(), c.cert.clone(), c.key.clone())
        .map_err(|e| ConfigError(e.to_string()))?
    {
        Some(files) => Some(Credentials::load(&files).map_err(|e| ConfigError(e.to_string()))?),
        None => None,
    };
    // With TLS the server must prove a certificate naming role dispatcher, not merely one
    // for its host name.
    let channel = tls::dial(&c.dispatcher, tls.as_ref(), Role::Dispatcher, |e| {
        e.connect_timeout(Duration::from_secs(5))
    })
    .map_err(|e| ConfigError(format!("--dispatcher {}: {e}", c.dispatcher)))?
    .connect()
    .await
    .with_context(|| format!("connecting to the dispatcher at {}", c.dispatcher))?;
    Ok(DispatcherClient::with_interceptor(channel, auth))
}

/// Turns a gRPC status into a one-line error for people, with the causes of a transport
/// failure (an unreachable dispatcher, a certificate it would not accept, or one of ours).
fn said(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}{}", s.code(), s.message(), tls::causes(&s))
}

pub(crate) async fn dispatch(
    c: ClientArgs,
    username: String,
    remote_ip: String,
    pool: Option<String>,
) -> anyhow::Result<()> {
    let s = client(&c)
        .await?
        .dispatch(DispatchRequest {
            username,
            remote_ip,
            pool: pool.unwrap_or_default(),
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

pub(crate) async fn blade(c: ClientArgs, command: BladeCommand) -> anyhow::Result<()> {
    let mut client = client(&c).await?;
    match command {
        BladeCommand::Add {
            name,
            host,
            port,
            method,
            pool,
            max_sessions,
        } => {
            let method = match method {
                MethodArg::Agent => LaunchMethod::Agent,
                MethodArg::Ssh => LaunchMethod::Ssh,
            } as i32;
            let b = client
                .add_blade(AddBladeRequest {
                    name,
                    host,
                    // 0 asks the dispatcher for the method's default port.
                    port: port.unwrap_or(0),
                    method,
                    pool,
                    max_sessions,
                })
                .await
                .map_err(said)?
                .into_inner();
            let cap = match b.max_sessions {
                0 => String::new(),
                n => format!(", at most {n} desktops"),
            };
            println!(
                "added {} ({}:{}) to pool {}{cap}",
                b.name, b.host, b.port, b.pool
            );
        }
        BladeCommand::List => {
            let blades = client
                .list_blades(ListBladesRequest {})
                .await
                .map_err(said)?
                .into_inner()
                .blades;
            println!(
                "{:<20} {:<12} {:<24} {:>6} {:<6} {:<9} {:<6} {:>8} {:>5} {:>5} {:>6} {:>5} {:>7} {:>6}",
                "NAME",
                "POOL",
                "HOST",
                "PORT",
                "METHOD",
                "STATE",
                "HEALTH",
                "SESSIONS",
                "MAX",
                "FREE",
                "LOAD",
                "CPUS",
                "MEM_GB",
                "SCORE"
            );
            for b in blades {
                let method = if b.method == LaunchMethod::Ssh as i32 {
                    "ssh"
                } else {
                    "agent"
                };
                let state = if b.draining { "draining" } else { "active" };
                let health = if b.healthy { "ok" } else { "down" };
                let max = match b.max_sessions {
                    0 => "-".to_owned(),
                    n => n.to_string(),
                };
                // SSH blades report no figures: shown as `-`.
                let (free, cpus, mem) = if b.cpus == 0 {
                    ("-".to_owned(), "-".to_owned(), "-".to_owned())
                } else {
                    (
                        b.free_displays.to_string(),
                        b.cpus.to_string(),
                        format!("{:.1}", b.mem_available_bytes as f64 / 1e9),
                    )
                };
                println!(
                    "{:<20} {:<12} {:<24} {:>6} {:<6} {:<9} {:<6} {:>8} {:>5} {:>5} {:>6.2} {:>5} {:>7} {:>6.2}",
                    b.name,
                    b.pool,
                    b.host,
                    b.port,
                    method,
                    state,
                    health,
                    b.sessions,
                    max,
                    free,
                    b.load1,
                    cpus,
                    mem,
                    b.score
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

/// A timestamp in RFC 3339 (UTC, seconds), or `-`.
fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| u64::try_from(t.seconds).ok())
        .map(|s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

pub(crate) async fn session(c: ClientArgs, command: SessionCommand) -> anyhow::Result<()> {
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
                "{:<24} {:<20} {:>7} {:>6} {:>8} {:<8} {:<20} {:<40}",
                "USER", "BLADE", "DISPLAY", "PORT", "PID", "CLIENT", "STOPS AT", "REMOTE IP"
            );
            for s in sessions {
                println!(
                    "{:<24} {:<20} {:>7} {:>6} {:>8} {:<8} {:<20} {:<40}",
                    s.username,
                    s.blade,
                    s.display,
                    s.port,
                    s.vnc_pid,
                    if s.attached { "attached" } else { "-" },
                    when(s.stops_at.as_ref()),
                    s.remote_ip
                );
            }
        }
        SessionCommand::History { username, limit } => {
            let ended = client
                .session_history(SessionHistoryRequest {
                    username: username.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(said)?
                .into_inner()
                .sessions;
            println!(
                "{:<20} {:<24} {:<20} {:>7} {:>8} {:<14} DETAIL",
                "ENDED", "USER", "BLADE", "DISPLAY", "PID", "REASON"
            );
            for e in ended {
                println!(
                    "{:<20} {:<24} {:<20} {:>7} {:>8} {:<14} {}",
                    when(e.ended_at.as_ref()),
                    e.username,
                    e.blade,
                    e.display,
                    e.vnc_pid,
                    e.reason,
                    e.detail
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
