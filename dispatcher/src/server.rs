//! `dispatcher serve`: the gRPC server, the store-health watcher, the blade-health poller and
//! the expiry sweeper, all stopping with the server.
use crate::dispatch::Dispatcher;
use crate::service::DispatcherService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use vncdispatch_proto::bearer::SharedSecret;
use vncdispatch_proto::serve;
use vncdispatch_proto::v1::dispatcher_server::DispatcherServer;

/// Background intervals.
#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    /// Blade health checks.
    pub health: Duration,
    /// Expired-session sweeps.
    pub sweep: Duration,
}

/// Serves until `shutdown` resolves: mutual TLS with roles when `tls`, else plaintext. With
/// `api_secret`, every Dispatcher call must carry it too.
pub async fn run(
    listener: TcpListener,
    dispatcher: Arc<Dispatcher>,
    api_secret: Option<SharedSecret>,
    tls: Option<Arc<vncdispatch_proto::tls::rustls::ServerConfig>>,
    intervals: Intervals,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let background = tokio::spawn(background(dispatcher.clone(), health, intervals));
    let service = DispatcherServer::new(DispatcherService::new(dispatcher))
        .max_decoding_message_size(serve::MAX_REQUEST_BYTES);
    tracing::info!(addr = %listener.local_addr()?, "dispatcher serving");
    let router = serve::server(Duration::from_secs(120), tls.is_some())
        .add_service(health_service)
        .add_service(serve::reflection()?);
    let router = match api_secret {
        Some(secret) => router.add_service(tonic::service::interceptor::InterceptedService::new(
            service,
            move |req| secret.check(req),
        )),
        None => router.add_service(service),
    };
    let served = serve::serve(router, listener, tls, shutdown).await;
    background.abort();
    served?;
    tracing::info!("dispatcher stopped");
    Ok(())
}

/// Keeps health honest (NOT_SERVING while the store is unreachable), polls blades, sweeps —
/// three independent loops, so a slow store cannot delay the health report.
async fn background(
    d: Arc<Dispatcher>,
    health: tonic_health::server::HealthReporter,
    every: Intervals,
) {
    let store_watch = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut serving = None;
        loop {
            tick.tick().await;
            let ok = tokio::time::timeout(Duration::from_secs(3), d.store().ping())
                .await
                .is_ok_and(|r| r.is_ok());
            if serving != Some(ok) {
                let status = if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                if ok {
                    tracing::info!("store reachable: SERVING");
                } else {
                    tracing::error!("store unreachable: NOT_SERVING");
                }
                health.set_service_status("", status).await;
                health
                    .set_service_status("vncdispatch.v1.Dispatcher", status)
                    .await;
                serving = Some(ok);
            }
        }
    };
    let blade_watch = async {
        let mut tick = tokio::time::interval(every.health);
        loop {
            tick.tick().await;
            d.check_blades().await;
        }
    };
    let blade_list = async {
        let mut tick = tokio::time::interval(crate::dispatch::BLADE_LIST_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            d.refresh_blades().await;
        }
    };
    let sweeper = async {
        let mut tick = tokio::time::interval(every.sweep);
        loop {
            tick.tick().await;
            if let Err(e) = d.sweep().await {
                tracing::warn!(error = %e, "expiry sweep failed");
            }
        }
    };
    tokio::join!(store_watch, blade_watch, blade_list, sweeper);
}
