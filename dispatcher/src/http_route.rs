//! The original deployment's HTTP route, for portals written against it: `GET
//! /vncdispatch/:username/:remoteip` answers the original's tokenizer document as JSON —
//! `username`, `password`, `token`, `blade`, `display`, `vncpid`, `remoteip` — so such a
//! portal moves over by changing only its base URL.
//!
//! Optional (`--http-listen`), on a listener of its own, and never a way around Dispatch's
//! rules: the request goes through the same domain call (the same validation), over the same
//! TLS with the same role check (portal or admin, from the client certificate), and with the
//! same API secret (`Authorization: Bearer`) when one is configured. Errors are HTTP statuses
//! with a JSON body `{"error": "…", "code": "INVALID_ARGUMENT"}`.
use crate::dispatch::Dispatcher;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use vncdispatch_proto::bearer::SharedSecret;
use vncdispatch_proto::tls::rustls::ServerConfig;
use vncdispatch_proto::tls::rustls::pki_types::CertificateDer;

/// The gRPC method whose rules (role table, secret) this route follows.
const AS_RPC: &str = "/vncdispatch.v1.Dispatcher/Dispatch";
/// Longest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Most connections open at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 512;
/// Longest one request may take (as the gRPC server's timeout).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// How long a shutdown waits for requests under way.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// What every request is checked and served with.
#[derive(Debug)]
struct Route {
    dispatcher: Arc<Dispatcher>,
    api_secret: Option<SharedSecret>,
    tls: bool,
    /// Requests under way, which a shutdown waits for.
    busy: tokio::sync::watch::Sender<usize>,
}

/// Serves the route on `listener` until `shutdown`, then waits (up to 30 s) for requests
/// under way: over mutual TLS with `tls` (the dispatcher's own server configuration, speaking
/// HTTP/1.1), else plaintext (loopback, or the operator's `--insecure-plaintext`).
pub async fn run(
    listener: TcpListener,
    dispatcher: Arc<Dispatcher>,
    api_secret: Option<SharedSecret>,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "original HTTP route serving");
    let route = Arc::new(Route {
        dispatcher,
        api_secret,
        tls: tls.is_some(),
        busy: tokio::sync::watch::Sender::new(0),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let accept = async {
        match tls {
            Some(cfg) => {
                let mut incoming =
                    std::pin::pin!(vncdispatch_proto::tls::tls_incoming(listener, cfg));
                while let Some(conn) = incoming.next().await {
                    let Ok(stream) = conn else { continue };
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first().cloned());
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        return;
                    };
                    spawn_connection(stream, cert, route.clone(), slot);
                }
            }
            None => loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                match listener.accept().await {
                    Ok((tcp, _)) => spawn_connection(tcp, None, route.clone(), slot),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            },
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
    // No new connections; requests under way get to finish (their launches would go on
    // anyway, in tasks of their own) so their callers get an answer.
    let mut busy = route.busy.subscribe();
    let drained = tokio::time::timeout(DRAIN, busy.wait_for(|n| *n == 0)).await;
    if drained.is_err() {
        tracing::warn!("the HTTP route stopped with requests still under way");
    }
    Ok(())
}

fn spawn_connection<S>(
    stream: S,
    cert: Option<CertificateDer<'static>>,
    route: Arc<Route>,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _slot = slot;
        let service = hyper::service::service_fn(move |req| {
            let (route, cert) = (route.clone(), cert.clone());
            async move { Ok::<_, std::convert::Infallible>(route.serve(req, cert.as_ref()).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            .header_read_timeout(std::time::Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service);
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTP connection ended");
        }
    });
}

impl Route {
    async fn serve(
        &self,
        req: Request<Incoming>,
        cert: Option<&CertificateDer<'static>>,
    ) -> Response<Full<Bytes>> {
        let count = |code: &str| {
            metrics::counter!("vncdispatch_dispatcher_http_requests_total", "code" => code.to_owned())
                .increment(1);
        };
        // Checked before anything else: a POST must never reach Dispatch.
        if req.method() != Method::GET {
            count("InvalidArgument");
            let mut r = json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "only GET is served here", "code": "INVALID_ARGUMENT" }),
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET"),
            );
            return r;
        }
        let _busy = Busy::new(&self.busy);
        let answer = match tokio::time::timeout(REQUEST_TIMEOUT, self.answer(&req, cert)).await {
            Ok(a) => a,
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "the request took too long",
            )),
        };
        count(&match &answer {
            Ok(_) => "OK".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        });
        match answer {
            Ok(doc) => json(StatusCode::OK, doc),
            Err(s) => json(
                http_status(s.code()),
                serde_json::json!({
                    "error": s.message(),
                    "code": grpc_name(s.code()),
                }),
            ),
        }
    }

    async fn answer(
        &self,
        req: &Request<Incoming>,
        cert: Option<&CertificateDer<'static>>,
    ) -> Result<serde_json::Value, tonic::Status> {
        let Some((username, remote_ip)) = req
            .uri()
            .path()
            .strip_prefix("/vncdispatch/")
            .and_then(|rest| rest.split_once('/'))
            .filter(|(u, ip)| !u.is_empty() && !ip.is_empty() && !ip.contains('/'))
        else {
            return Err(tonic::Status::not_found(
                "no such route: use GET /vncdispatch/USERNAME/REMOTE_IP",
            ));
        };
        // The same rules as the Dispatch RPC: the role table, then the API secret.
        let actor = match (self.tls, cert) {
            (true, cert) => {
                let role = vncdispatch_proto::roles::authorize(AS_RPC, cert)?;
                let name = cert
                    .map(vncdispatch_proto::roles::name_of)
                    .unwrap_or_default();
                vncdispatch_proto::roles::Identity { role, name }.to_string()
            }
            (false, _) => crate::service::PLAINTEXT_ACTOR.to_owned(),
        };
        if let Some(secret) = &self.api_secret {
            let mut probe = tonic::Request::new(());
            if let Some(v) = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| tonic::metadata::MetadataValue::try_from(v.as_bytes()).ok())
            {
                probe.metadata_mut().insert("authorization", v);
            }
            secret.check(probe)?;
        }
        let id = crate::service::request_id_of(
            req.headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
        );
        let span = tracing::info_span!("http Dispatch", user = %username, request_id = %id);
        // Counted, logged and audited as the gRPC Dispatch is, so dashboards and alerts see both.
        let s = tracing::Instrument::instrument(
            self.dispatcher
                .dispatch_as((username, remote_ip, ""), &id, &actor, "http"),
            span,
        )
        .await
        .map_err(crate::service::status)?;
        Ok(serde_json::json!({
            "username": s.username,
            "password": s.password,
            "token": s.token,
            "blade": s.blade,
            "display": s.display,
            "vncpid": s.vnc_pid,
            "remoteip": s.remote_ip,
        }))
    }
}

/// Counts a request under way until dropped (also when its client goes away mid-request).
struct Busy<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> Busy<'a> {
    fn new(count: &'a tokio::sync::watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Busy(count)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// The HTTP status a portal can act on for a gRPC code.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        PermissionDenied => StatusCode::FORBIDDEN,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted | FailedPrecondition => StatusCode::CONFLICT,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The code's name as gRPC spells it (`INVALID_ARGUMENT`).
fn grpc_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_statuses_a_portal_understands() {
        assert_eq!(
            http_status(tonic::Code::InvalidArgument),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(tonic::Code::PermissionDenied),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            http_status(tonic::Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(grpc_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(grpc_name(tonic::Code::NotFound), "NOT_FOUND");
    }
}
