//! `blade-agent serve`: the gRPC server around [`Agent`].
use crate::agent::Agent;
use crate::service::AgentService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use vncdispatch_proto::bearer::SharedSecret;
use vncdispatch_proto::serve;
use vncdispatch_proto::v1::blade_agent_server::BladeAgentServer;

/// Serves the agent on an already-bound listener until `shutdown` resolves: mutual TLS with
/// `tls` (callers must present the `dispatcher` role), else plaintext. Health is SERVING
/// only while a desktop could be started (Xvnc binary there, a display free).
pub async fn run(
    listener: TcpListener,
    agent: Arc<Agent>,
    secret: SharedSecret,
    tls: Option<Arc<vncdispatch_proto::tls::rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Readiness follows what a start needs, re-checked while serving: the Xvnc binary and a
    // free display. A dispatcher polling Health then stops sending users to a full blade.
    let watcher = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let why_not = if !agent.config().xvnc.is_file() {
                    Some(format!(
                        "Xvnc binary {} missing",
                        agent.config().xvnc.display()
                    ))
                } else {
                    match agent.health().await {
                        Ok(h) if h.free_displays == 0 => Some("no free display".to_owned()),
                        Ok(_) => None,
                        Err(e) => Some(e.to_string()),
                    }
                };
                let ready = why_not.is_none();
                if last != Some(ready) {
                    match &why_not {
                        Some(why) => tracing::error!(%why, "reporting NOT_SERVING"),
                        None => tracing::info!("reporting SERVING"),
                    }
                    let status = if ready {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    health.set_service_status("", status).await;
                    health
                        .set_service_status("vncdispatch.v1.BladeAgent", status)
                        .await;
                    last = Some(ready);
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    let agent_for_exit = agent.clone();
    let service = BladeAgentServer::new(AgentService::new(agent))
        .max_decoding_message_size(serve::MAX_REQUEST_BYTES);
    let authed = InterceptedService::new(service, move |req| secret.check(req));
    tracing::info!(addr = %listener.local_addr()?, "blade-agent serving");
    let router = serve::server(Duration::from_secs(60), tls.is_some())
        .add_service(health_service)
        .add_service(serve::reflection()?)
        .add_service(authed);
    serve::serve(router, listener, tls, shutdown).await?;
    watcher.abort();
    let within = agent_for_exit.config().start_timeout + Duration::from_secs(10);
    agent_for_exit.finish_starts(within).await;
    tracing::info!("blade-agent stopped; desktops keep running");
    Ok(())
}
