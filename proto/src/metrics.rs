//! Prometheus metrics: every service records through the `metrics` facade and, when given
//! `--metrics-listen`, serves them at `http://ADDR/metrics` with `metrics-exporter-prometheus`
//! (a separate listener, so the public ports never expose them).
//!
//! Series every gRPC service has (from [`GrpcMetricsLayer`]):
//! `vncdispatch_grpc_requests_total{method,code}` and
//! `vncdispatch_grpc_request_duration_seconds{method}`; and from the bearer check,
//! `vncdispatch_auth_refusals_total{reason}`.
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::codegen::http;

/// Latency buckets (seconds) for every `*_seconds` histogram: 0.5 ms to 30 s, covering a cached
/// token lookup up to a slow desktop start.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the recorder and the `/metrics` endpoint on `listen`; without it, recording is a
/// no-op. Call from inside the Tokio runtime.
pub fn install(listen: Option<SocketAddr>) -> Result<(), String> {
    let Some(addr) = listen else {
        return Ok(());
    };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("serving metrics on {addr}: {e}"))?;
    metrics::describe_counter!(
        "vncdispatch_grpc_requests_total",
        "gRPC calls served, by method and status code"
    );
    metrics::describe_histogram!(
        "vncdispatch_grpc_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to answer a gRPC call, by method"
    );
    metrics::describe_counter!(
        "vncdispatch_auth_refusals_total",
        "Calls or connections refused before reaching the service, by reason"
    );
    metrics::describe_gauge!(
        "vncdispatch_tls_certificate_not_after_seconds",
        "When this service's TLS certificate expires (Unix seconds), by file"
    );
    // Certificates loaded before the exporter existed.
    for (file, not_after) in certificates()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        certificate_gauge(file, *not_after);
    }
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

/// The certificates this process loaded: file → not-after (Unix seconds).
fn certificates() -> &'static std::sync::Mutex<Vec<(String, i64)>> {
    static CERTS: std::sync::OnceLock<std::sync::Mutex<Vec<(String, i64)>>> =
        std::sync::OnceLock::new();
    CERTS.get_or_init(Default::default)
}

fn certificate_gauge(file: &str, not_after: i64) {
    metrics::gauge!("vncdispatch_tls_certificate_not_after_seconds", "file" => file.to_owned())
        .set(not_after as f64);
}

/// Records when the certificate loaded from `file` expires, for
/// `vncdispatch_tls_certificate_not_after_seconds` (an alert can warn weeks ahead).
pub fn note_certificate(
    file: &std::path::Path,
    cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return;
    };
    let not_after = parsed.validity().not_after.timestamp();
    let file = file.display().to_string();
    certificate_gauge(&file, not_after);
    let mut known = certificates().lock().unwrap_or_else(|p| p.into_inner());
    known.retain(|(f, _)| *f != file);
    known.push((file, not_after));
}

/// Counts a call or connection refused before it reached the service.
pub fn auth_refusal(reason: &'static str) {
    metrics::counter!("vncdispatch_auth_refusals_total", "reason" => reason).increment(1);
}

/// Counts a session start by result (`started`, `reused`, `failed`) in `counter` and its
/// latency in `histogram`: the dispatcher's Dispatch and the agent's StartSession both report
/// this way.
pub fn record_start(
    counter: &'static str,
    histogram: &'static str,
    reused: Option<bool>,
    started: Instant,
) {
    let result = match reused {
        Some(true) => "reused",
        Some(false) => "started",
        None => "failed",
    };
    metrics::counter!(counter, "result" => result).increment(1);
    metrics::histogram!(histogram, "result" => result).record(started.elapsed().as_secs_f64());
}

/// Counts and times every gRPC call by method (the request path) and status code.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics(inner)
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S>(S);

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The path names the method (`/vncdispatch.v1.Dispatcher/Dispatch`); anything else is
        // one label value so a scanner cannot grow the series without bound.
        let path = req.uri().path();
        let method = if path.starts_with("/vncdispatch.v1.") || path.starts_with("/grpc.") {
            path.to_owned()
        } else {
            "other".to_owned()
        };
        let start = Instant::now();
        let fut = self.0.call(req);
        Box::pin(async move {
            let res = fut.await;
            // Errors come as trailers-only responses (status in the headers); a success
            // carries its status in the trailers, which this layer does not wait for.
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(|c| format!("{:?}", tonic::Code::from_i32(c)))
                    .unwrap_or_else(|| "Ok".to_owned()),
                Err(_) => "TransportError".to_owned(),
            };
            metrics::histogram!("vncdispatch_grpc_request_duration_seconds", "method" => method.clone())
                .record(start.elapsed().as_secs_f64());
            metrics::counter!("vncdispatch_grpc_requests_total", "method" => method, "code" => code)
                .increment(1);
            res
        })
    }
}
