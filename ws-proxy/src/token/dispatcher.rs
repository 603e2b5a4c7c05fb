//! Tokens resolved by the dispatcher's `ResolveToken`, cached briefly: a positive answer for a
//! few seconds (a page reload opens several connections), a negative one for a second (so a
//! flood of guesses costs the dispatcher little). Only well-formed tokens are asked about.
use super::{Target, TokenError, TokenSource};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vncdispatch_proto::bearer::BearerAuth;
use vncdispatch_proto::rules::validate_token;
use vncdispatch_proto::v1::ResolveTokenRequest;
use vncdispatch_proto::v1::dispatcher_client::DispatcherClient;

/// Most cache entries kept; beyond it the cache is cleared (it refills from the dispatcher).
const CACHE_MAX: usize = 10_000;

/// Resolves through a dispatcher.
#[derive(Debug)]
pub struct DispatcherTokens {
    client: DispatcherClient<InterceptedService<Channel, BearerAuth>>,
    positive_ttl: Duration,
    negative_ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Option<Target>)>>,
}

impl DispatcherTokens {
    /// A source asking the dispatcher at `url` (connected lazily), over mutual TLS as `tls`
    /// (role proxy) when given.
    pub fn new(
        url: &str,
        auth: BearerAuth,
        tls: Option<&vncdispatch_proto::tls::Credentials>,
        positive_ttl: Duration,
        negative_ttl: Duration,
    ) -> Result<Self, String> {
        // With TLS the dispatcher must prove a certificate naming role dispatcher.
        let channel = vncdispatch_proto::tls::dial(
            url,
            tls,
            vncdispatch_proto::roles::Role::Dispatcher,
            |e| {
                e.connect_timeout(Duration::from_secs(3))
                    .timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
            },
        )
        .map_err(|e| format!("dispatcher URL {url}: {e}"))?
        .lazy();
        Ok(DispatcherTokens {
            client: DispatcherClient::with_interceptor(channel, auth),
            positive_ttl,
            negative_ttl,
            cache: Mutex::default(),
        })
    }

    async fn ask(&self, token: &str, attached: bool) -> Result<Target, TokenError> {
        let reply = self
            .client
            .clone()
            .resolve_token(ResolveTokenRequest {
                token: token.to_owned(),
                attached,
            })
            .await;
        let outcome = match reply {
            Ok(r) => {
                let t = r.into_inner();
                Ok(Target {
                    host: t.host,
                    port: u16::try_from(t.port)
                        .map_err(|_| TokenError::Unavailable(format!("bad port {}", t.port)))?,
                    username: t.username,
                    remote_ip: t.remote_ip,
                    expires_at: t.expires_at.as_ref().and_then(system_time),
                    password: t.password,
                    cert_sha256: t.cert_sha256,
                    lease_until: t.lease_until.as_ref().and_then(system_time),
                    view_only: t.view_only,
                    share_id: t.share_id,
                })
            }
            Err(s) if s.code() == Code::NotFound || s.code() == Code::InvalidArgument => {
                Err(TokenError::Unknown)
            }
            Err(s) => {
                return Err(TokenError::Unavailable(format!(
                    "dispatcher: {}: {}",
                    s.code(),
                    s.message()
                )));
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            token.to_owned(),
            (Instant::now(), outcome.as_ref().ok().cloned()),
        );
        outcome
    }
}

/// A protobuf timestamp as a system time (None if out of range).
fn system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::new(
        u64::try_from(t.seconds).ok()?,
        u32::try_from(t.nanos).ok()?,
    ))
}

#[async_trait::async_trait]
impl TokenSource for DispatcherTokens {
    async fn resolve(&self, token: &str) -> Result<Target, TokenError> {
        validate_token(token).map_err(|_| TokenError::Unknown)?;
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned();
        if let Some((at, entry)) = cached {
            let ttl = if entry.is_some() {
                self.positive_ttl
            } else {
                self.negative_ttl
            };
            if at.elapsed() < ttl {
                let target = entry.ok_or(TokenError::Unknown)?;
                if target.expires_at.is_some_and(|e| e <= SystemTime::now()) {
                    return Err(TokenError::Unknown);
                }
                return Ok(target);
            }
        }
        self.ask(token, false).await
    }

    /// Asked as attached: ws-proxy re-checks only for a client it relays (or is about to),
    /// and the answer renews the session's lease.
    async fn recheck(&self, token: &str) -> Result<Target, TokenError> {
        validate_token(token).map_err(|_| TokenError::Unknown)?;
        self.ask(token, true).await
    }

    /// Sent in the background, bounded: a slow dispatcher never holds a relay up, and a
    /// report it missed is still in this proxy's log.
    fn report(&self, event: vncdispatch_proto::v1::ConnectionEvent) {
        let mut client = self.client.clone();
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                client.record_connection(event),
            )
            .await;
            match sent {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => {
                    tracing::warn!(code = ?s.code(), error = s.message(), "the dispatcher refused a connection report for the audit trail")
                }
                Err(_) => tracing::warn!("connection report for the audit trail timed out"),
            }
        });
    }
}
