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

/// Serves the agent on an already-bound listener until `shutdown` resolves. Health is SERVING
/// only while the Xvnc binary is there to start desktops with.
pub async fn run(
    listener: TcpListener,
    agent: Arc<Agent>,
    secret: SharedSecret,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = agent.config().xvnc.is_file();
    let status = if ready {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health
        .set_service_status("vncdispatch.v1.BladeAgent", status)
        .await;
    if !ready {
        tracing::error!(xvnc = %agent.config().xvnc.display(), "Xvnc binary missing: reporting NOT_SERVING");
    }
    let service = BladeAgentServer::new(AgentService::new(agent))
        .max_decoding_message_size(serve::MAX_REQUEST_BYTES);
    let authed = InterceptedService::new(service, move |req| secret.check(req));
    tracing::info!(addr = %listener.local_addr()?, "blade-agent serving");
    serve::server(Duration::from_secs(60))
        .add_service(health_service)
        .add_service(serve::reflection()?)
        .add_service(authed)
        .serve_with_incoming_shutdown(serve::incoming(listener), shutdown)
        .await?;
    tracing::info!("blade-agent stopped; desktops keep running");
    Ok(())
}
