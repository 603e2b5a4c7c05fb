//! A stand-in dispatcher for ws-proxy: every `ResolveToken` is answered with one fixed
//! [`v1::Target`], whatever the token, so a test or bench decides where ws-proxy goes (a tap,
//! a stand-in VNC server) and with which password and certificate pin. The other methods
//! answer UNIMPLEMENTED (ws-proxy never calls them), except `RecordConnection`, which ws-proxy
//! sends for the audit trail: taken and dropped.
use tokio::net::TcpListener;
use vncdispatch_proto::v1;

/// Answers `ResolveToken` with `target`.
#[derive(Debug, Clone)]
pub struct Front {
    /// What every token resolves to.
    pub target: v1::Target,
}

type Res<T> = Result<tonic::Response<T>, tonic::Status>;
type Req<T> = tonic::Request<T>;

fn unimplemented<T>() -> Res<T> {
    Err(tonic::Status::unimplemented(
        "a stand-in dispatcher: ResolveToken only",
    ))
}

#[tonic::async_trait]
impl v1::dispatcher_server::Dispatcher for Front {
    async fn dispatch(&self, _: Req<v1::DispatchRequest>) -> Res<v1::Session> {
        unimplemented()
    }
    async fn resolve_token(&self, _: Req<v1::ResolveTokenRequest>) -> Res<v1::Target> {
        Ok(tonic::Response::new(self.target.clone()))
    }
    async fn end_session(&self, _: Req<v1::EndSessionRequest>) -> Res<v1::EndSessionResponse> {
        unimplemented()
    }
    async fn list_sessions(
        &self,
        _: Req<v1::ListSessionsRequest>,
    ) -> Res<v1::ListSessionsResponse> {
        unimplemented()
    }
    async fn session_history(
        &self,
        _: Req<v1::SessionHistoryRequest>,
    ) -> Res<v1::SessionHistoryResponse> {
        unimplemented()
    }
    async fn add_blade(&self, _: Req<v1::AddBladeRequest>) -> Res<v1::Blade> {
        unimplemented()
    }
    async fn list_blades(&self, _: Req<v1::ListBladesRequest>) -> Res<v1::ListBladesResponse> {
        unimplemented()
    }
    async fn drain_blade(&self, _: Req<v1::DrainBladeRequest>) -> Res<v1::Blade> {
        unimplemented()
    }
    async fn remove_blade(&self, _: Req<v1::RemoveBladeRequest>) -> Res<v1::RemoveBladeResponse> {
        unimplemented()
    }
    async fn share_session(&self, _: Req<v1::ShareSessionRequest>) -> Res<v1::Share> {
        unimplemented()
    }
    async fn revoke_share(&self, _: Req<v1::RevokeShareRequest>) -> Res<v1::RevokeShareResponse> {
        unimplemented()
    }
    async fn list_shares(&self, _: Req<v1::ListSharesRequest>) -> Res<v1::ListSharesResponse> {
        unimplemented()
    }
    async fn audit(&self, _: Req<v1::AuditRequest>) -> Res<v1::AuditResponse> {
        unimplemented()
    }
    async fn record_connection(
        &self,
        _: Req<v1::ConnectionEvent>,
    ) -> Res<v1::RecordConnectionResponse> {
        Ok(tonic::Response::new(v1::RecordConnectionResponse {}))
    }
}

/// Serves `front` over plaintext gRPC on a 127.0.0.1 port, in a task of the current runtime;
/// its URL (`http://127.0.0.1:PORT`), for ws-proxy's `--dispatcher`.
pub async fn serve(front: Front) -> std::io::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::dispatcher_server::DispatcherServer::new(front))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    Ok(format!("http://{addr}"))
}
