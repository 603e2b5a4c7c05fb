//! The `dispatcher` command: `serve`, and client commands for operators and portals
//! (`dispatch`, `blade …`, `session …`) that call a running dispatcher over gRPC.
//!
//! Layout: `cli.rs` defines the command line, `operator.rs` the client commands; this file
//! starts the runtime, runs `serve` (config → store, launchers, dispatcher → bind → serve) and
//! maps errors to exit codes.
#![forbid(unsafe_code)]

mod cli;
mod operator;

use anyhow::Context;
use cli::{Cli, Command, MethodArg, PkiCommand, ServeArgs, StoreArg, method};
use dispatcher::dispatch::{DispatchConfig, Dispatcher, Launchers};
use dispatcher::launcher::agent::AgentLauncher;
use dispatcher::launcher::ssh::{SshConfig, SshLauncher};
use dispatcher::seal::SealKey;
use dispatcher::server::Intervals;
use dispatcher::store::Store;
use dispatcher::store::embedded::EmbeddedStore;
use dispatcher::store::mongo::{LegacyBlades, MongoStore};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use vncdispatch_proto::bearer::SharedSecret;
use vncdispatch_proto::tls::{self, Credentials, TlsFiles};

fn main() -> ExitCode {
    // Client options may come before the subcommand too.
    let cli: Cli = vncdispatch_proto::config::try_parse_from(cli::hoist_client_options(
        std::env::args_os().collect(),
    ))
    .unwrap_or_else(|e| e.exit());
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
            // One descriptor per client connection (portal, ws-proxies, agents' channels).
            vncdispatch_proto::serve::raise_open_files_limit(1);
            rt.block_on(serve(*args))
        }
        Command::Dispatch {
            client,
            username,
            remote_ip,
            pool,
        } => rt.block_on(operator::dispatch(client, username, remote_ip, pool)),
        Command::Blade { client, command } => rt.block_on(operator::blade(client, command)),
        Command::Session { client, command } => rt.block_on(operator::session(client, command)),
        Command::Share { client, command } => {
            rt.block_on(operator::sharing::share(client, command))
        }
        Command::Audit {
            client,
            user,
            since,
            limit,
            json,
        } => rt.block_on(operator::sharing::audit(client, user, since, limit, json)),
        Command::Pki { command } => pki(command),
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

/// `dispatcher pki init|issue`: prints what it wrote and what to do with it.
fn pki(command: PkiCommand) -> anyhow::Result<()> {
    use vncdispatch_proto::pki;
    match command {
        PkiCommand::Init { dir, name } => {
            let ca = pki::init_ca(&dir, &name, pki::CA_VALIDITY)?;
            println!(
                "wrote {} (give it to every service as --ca) and {} (0600; keep it safe)",
                ca.display(),
                dir.join("ca.key").display()
            );
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            hosts,
            days,
        } => {
            let req = pki::IssueRequest {
                name,
                role,
                hosts,
                valid_for: Duration::from_secs(u64::from(days) * 24 * 3600),
            };
            let (cert, key) = pki::issue(&dir, &req)?;
            println!(
                "wrote {} and {} (role {role}): use them as --cert and --key",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}

/// A configuration problem (exit code 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    vncdispatch_proto::metrics::install(a.metrics_listen).map_err(anyhow::Error::msg)?;
    let config = |key: &str, e: String| ConfigError(format!("{key}: {e}"));
    let agent_secret = SharedSecret::from_file(&a.agent_secret_file)
        .map_err(|e| config("--agent-secret-file", e))?;
    let api_secret = match &a.api_secret_file {
        Some(p) => Some(SharedSecret::from_file(p).map_err(|e| config("--api-secret-file", e))?),
        None => None,
    };
    let seal_path = a.seal_key_file.clone().unwrap_or_else(|| match &a.store {
        StoreArg::Mongo(_) => PathBuf::from("/var/lib/vncdispatch/seal.key"),
        StoreArg::File(path) => path.with_file_name("seal.key"),
    });
    let seal = SealKey::load(&seal_path, true).map_err(|e| config("--seal-key-file", e))?;
    let store: Arc<dyn Store> = match &a.store {
        StoreArg::Mongo(uri) => {
            let legacy = LegacyBlades {
                method: method(a.legacy_blade_method),
                port: match a.legacy_blade_method {
                    MethodArg::Agent => a.agent_port,
                    MethodArg::Ssh => 22,
                },
            };
            Arc::new(MongoStore::connect(uri, legacy).await.context("--store")?)
        }
        StoreArg::File(path) => Arc::new(EmbeddedStore::open(path).context("--store")?),
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
    let tls_files = TlsFiles::from_flags(a.ca.clone(), a.cert.clone(), a.key.clone())
        .map_err(|e| ConfigError(e.to_string()))?;
    let server_tls = tls::server_setup(
        a.listen,
        tls_files.as_ref(),
        a.insecure_plaintext,
        vncdispatch_proto::roles::Role::Dispatcher,
    )
    .map_err(ConfigError)?;
    // The same identity (role dispatcher) is what the agents see; without it only agents on
    // loopback are called (in clear), or any with --insecure-plaintext.
    let agent_tls = match &tls_files {
        Some(files) => Some(Credentials::load(files).map_err(|e| ConfigError(e.to_string()))?),
        None => None,
    };
    let launchers = Launchers {
        agent: Arc::new(AgentLauncher::new(
            auth,
            a.launch_timeout,
            agent_tls,
            a.insecure_plaintext,
        )),
        ssh,
    };
    let cfg = DispatchConfig {
        token_ttl: a.token_ttl,
        policy: a.policy,
        launch_timeout: a.launch_timeout,
        agent_port: a.agent_port,
        idle_grace: a.idle_grace,
        max_age: a.max_age,
        lease: a.lease,
        share_ttl: a.share_ttl,
        max_share_ttl: a.max_share_ttl,
        audit_retention: a.audit_retention,
    };
    if cfg.share_ttl > cfg.max_share_ttl {
        return Err(config(
            "--share-ttl",
            "is longer than --max-share-ttl: every share made without a --ttl would be refused"
                .into(),
        )
        .into());
    }
    let d = Arc::new(Dispatcher::new(store, launchers, seal, cfg));
    let audited = d.clone();
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    // The original's HTTP route, when asked for: the same TLS rules as the gRPC listener.
    let http = match a.http_listen {
        Some(addr) => {
            // The gRPC listener's TLS, already loaded and checked; only the address is new.
            vncdispatch_proto::serve::check_listen(addr, tls_files.is_some(), a.insecure_plaintext)
                .map_err(|e| config("--http-listen", e))?;
            // A GET that hands out a password must not be reachable by any page a browser on
            // this host loads (SSRF, DNS rebinding): without TLS it needs the API secret.
            if server_tls.is_none() && api_secret.is_none() {
                return Err(config(
                    "--http-listen",
                    "without --ca/--cert/--key the HTTP route needs --api-secret-file (portals then send Authorization: Bearer SECRET)".into(),
                )
                .into());
            }
            // The route speaks HTTP/1.1: offer that, not gRPC's h2, in the TLS handshake.
            let tls = server_tls.as_ref().map(|cfg| {
                let mut cfg = (**cfg).clone();
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(cfg)
            });
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            Some((l, tls))
        }
        None => None,
    };
    // One shutdown signal for both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        vncdispatch_proto::serve::shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http_task = http.map(|(l, tls)| {
        let (d, secret, rx) = (d.clone(), api_secret.clone(), stopped.clone());
        tokio::spawn(async move {
            if let Err(e) = dispatcher::http_route::run(l, d, secret, tls, until_stopped(rx)).await
            {
                tracing::error!(error = %e, "the HTTP route stopped");
            }
        })
    });
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    let intervals = Intervals {
        health: a.health_interval,
        sweep: a.sweep_interval,
    };
    let served = dispatcher::server::run(
        listener,
        d,
        api_secret,
        server_tls,
        intervals,
        until_stopped(stopped),
    )
    .await;
    // The HTTP route drains its requests too before the process ends.
    if let Some(task) = http_task {
        let _ = task.await;
    }
    // What the last calls recorded reaches the store before the process ends.
    audited.flush_audit().await;
    served
}
