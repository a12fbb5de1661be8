//! The built-in mock gateway behind `bulkcall sandbox`, `bulkcall demo` and the tests.
//!
//! It owns a small axum server that imitates the payer gateway: an OAuth 2.0
//! client-credentials token endpoint (JSON body as Optum has it, form body or
//! HTTP Basic as RFC 6749 has it) and three sample APIs (eligibility v3, claim
//! status v2, professional claim submission v3) that require a bearer token it
//! issued, the `environment: sandbox` header, and a plausible request body,
//! and answer mock data in the real gateway's shape. An asynchronous claim
//! submission ([`ASYNC_SUBMISSION_PATH`]) answers `202 Accepted` with a
//! `Location` to poll ([`ASYNC_STATUS_PATH`]) and the claim's outcome later. Faults (slow or failing
//! token requests, latency, revoked tokens) can be injected through
//! [`SandboxConfig`] and observed through [`Stats`] and [`RecordedCall`].
//! Every value it answers is synthetic; no request can make it panic.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Bytes, to_bytes};
use axum::extract::{Request, State};
use axum::http::header::{ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod arrival;

/// Path of the token endpoint, the same as the real gateway's.
pub const TOKEN_PATH: &str = "/apip/auth/sntl/v1/token";

/// Largest request body read from an API call; larger ones get 413.
const MAX_API_BODY: usize = 4 << 20;
/// Largest token request body read; larger ones get 400 `invalid_request`.
const MAX_TOKEN_BODY: usize = 64 << 10;
/// Tokens are forgotten this long after they expire (then they count as unknown),
/// so a long-running sandbox fed by a client that fetches a token per call stays small.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Expired tokens are pruned every this many issued tokens.
const PRUNE_EVERY: u64 = 4096;

/// The asynchronous professional claim submission: answered `202 Accepted`
/// with a `Location` under [`ASYNC_STATUS_PATH`] and a `Retry-After`.
pub const ASYNC_SUBMISSION_PATH: &str = "/medicalnetwork/professionalclaims/v3/async/submission";
/// Where an asynchronous claim's status is polled: `GET {ASYNC_STATUS_PATH}/{id}`.
pub const ASYNC_STATUS_PATH: &str = "/medicalnetwork/professionalclaims/v3/async/status";

/// How the sandbox behaves; [`Default`] is a well-behaved gateway.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub client_id: String,
    pub client_secret: SecretString,
    /// Lifetime of issued tokens (default 3600 s).
    pub token_lifetime: Duration,
    /// Answer `"expires_in": "3600"` instead of `3600`, as some gateways do.
    pub expires_in_as_string: bool,
    /// Delay before answering a token request.
    pub token_delay: Duration,
    /// The first N token requests answer 503 `temporarily_unavailable`.
    pub fail_token_requests: u32,
    /// Token requests after the first N are refused with 401
    /// `invalid_client`, as when a secret is rotated while a run goes on.
    pub reject_credentials_after: Option<u64>,
    /// Added before answering every API call.
    pub latency: Duration,
    /// API calls without `environment: sandbox` get 400.
    pub require_environment_header: bool,
    /// Keep every API call received (see [`Sandbox::recorded`]).
    pub record: bool,
    /// Revoke every token issued so far this long after the start.
    pub revoke_after: Option<Duration>,
    /// Faults injected into API calls, decided per row key.
    pub faults: Faults,
    /// The client's registered public keys: token requests with a client
    /// assertion (`private_key_jwt`) are verified against them.
    pub jwks: Option<jsonwebtoken::jwk::JwkSet>,
    /// Root certificates (PEM) a client certificate must chain to: over TLS
    /// ([`Sandbox::start_tls`]) the handshake then requires one, and a token
    /// request with the client id alone (`tls_client_auth`) is accepted.
    pub client_ca: Option<Vec<u8>>,
    /// Asynchronous claims: how many polls of a claim's status answer 202
    /// before the one with its outcome (default 2).
    pub async_polls: u32,
    /// The `Retry-After` of a 202 (submission or poll), in whole seconds (default 1 s).
    pub async_retry_after: Duration,
    /// How many asynchronous claims are kept (default 200,000; about 210 bytes
    /// each: the RSS growth measured over 200,000 claims inserted in the map);
    /// past it the oldest are forgotten and their polls answer 404.
    pub async_capacity: usize,
    /// Asynchronous claims: the origin (`scheme://host:port`) of the status
    /// `Location`, instead of the one the client used: a gateway pointing
    /// polls elsewhere, which a client must not follow with its token.
    pub async_location_origin: Option<String>,
}

/// Faults for testing retries, decided by the call's row key (its
/// `controlNumber`) so every run of the same rows meets the same faults.
/// Shares are fractions of keys; together they may not exceed 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Keys whose first `transient_attempts` calls answer 500.
    pub server_errors: f64,
    /// Keys whose first `transient_attempts` calls answer 429 with Retry-After.
    pub throttles: f64,
    /// Keys whose first `transient_attempts` calls answer 503 with Retry-After.
    pub unavailable: f64,
    /// Keys whose first `transient_attempts` calls lose their connection
    /// mid-answer, after the call was processed.
    pub resets: f64,
    /// Keys whose first `transient_attempts` calls are answered after `slow_delay`.
    pub slow: f64,
    pub slow_delay: Duration,
    /// Keys always answered 400.
    pub bad_requests: f64,
    /// Keys always answered 500.
    pub broken: f64,
    /// How many calls of a transient key fail before it succeeds.
    pub transient_attempts: u32,
    /// The Retry-After of a 429 or 503, in seconds or (`retry_after_date`) as an HTTP date.
    pub retry_after: Duration,
    pub retry_after_date: bool,
    /// A server-side limit in calls per second; calls over it get 429 (0 = none).
    /// Counted in whole seconds from the sandbox's start by when each call
    /// arrived: the kernel's receive time of its bytes where that is known
    /// (HTTP/1.x on Linux, see `sandbox/arrival.rs`), else the handler's clock.
    pub rate_limit: u32,
    /// Changes which keys get which fault.
    pub seed: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            server_errors: 0.0,
            throttles: 0.0,
            unavailable: 0.0,
            resets: 0.0,
            slow: 0.0,
            slow_delay: Duration::from_secs(5),
            bad_requests: 0.0,
            broken: 0.0,
            transient_attempts: 1,
            retry_after: Duration::from_secs(1),
            retry_after_date: false,
            rate_limit: 0,
            seed: 0,
        }
    }
}

/// The fault a key meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    ServerError,
    Throttle,
    Reset,
    Slow,
    BadRequest,
    Broken,
    Unavailable,
}

impl Faults {
    fn any(&self) -> bool {
        *self != Faults { seed: self.seed, ..Faults::default() }
    }

    /// The fault `key` meets, if any: deterministic for a key and seed.
    pub fn fault_for(&self, key: &str) -> Option<Fault> {
        // FNV-1a: stable across builds, so a key's fault can be documented.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ self.seed;
        for b in key.bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        // Finish with murmur3's mixer: FNV alone spreads similar keys badly.
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        hash ^= hash >> 33;
        let mut point = (hash >> 11) as f64 / (1u64 << 53) as f64;
        for (share, fault) in [
            (self.bad_requests, Fault::BadRequest),
            (self.broken, Fault::Broken),
            (self.server_errors, Fault::ServerError),
            (self.throttles, Fault::Throttle),
            (self.resets, Fault::Reset),
            (self.slow, Fault::Slow),
            (self.unavailable, Fault::Unavailable),
        ] {
            if point < share {
                return Some(fault);
            }
            point -= share;
        }
        None
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            client_id: "sandbox-client".into(),
            client_secret: SecretString::from("sandbox-secret"),
            token_lifetime: Duration::from_secs(3600),
            expires_in_as_string: false,
            token_delay: Duration::ZERO,
            fail_token_requests: 0,
            reject_credentials_after: None,
            latency: Duration::ZERO,
            require_environment_header: true,
            record: false,
            revoke_after: None,
            faults: Faults::default(),
            jwks: None,
            client_ca: None,
            async_polls: 2,
            async_retry_after: Duration::from_secs(1),
            async_capacity: 200_000,
            async_location_origin: None,
        }
    }
}

/// What the sandbox has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Every POST to the token endpoint, failed ones included.
    pub token_requests: u64,
    pub tokens_issued: u64,
    /// Every call to a sample API, whatever the answer.
    pub api_calls: u64,
    /// 401 answers from the sample APIs.
    pub unauthorized: u64,
    /// Calls with a token this sandbox issued that had expired or was revoked.
    pub expired_token_calls: u64,
    /// Calls with no token or one this sandbox never issued.
    pub unknown_token_calls: u64,
    /// Asynchronous claims accepted (answered 202), polls not counted.
    pub async_submissions: u64,
    /// Every call to the asynchronous status path, whatever the answer
    /// (also counted in `api_calls`).
    pub polls: u64,
}

/// One API call as received, with the status it was answered.
#[derive(Debug, Clone)]
pub struct RecordedCall {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lower-case names, in the order received (repeated names grouped).
    pub headers: Vec<(String, String)>,
    /// `Null` if the body was empty or not JSON.
    pub body: Value,
    pub status: u16,
    /// When the call arrived, measured from the sandbox's start: on Linux,
    /// over HTTP/1.x, when the kernel received its bytes (not when the
    /// sandbox's runtime got to them); else when its handler ran.
    pub at: Duration,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
}

impl RecordedCall {
    /// The value of a header (name in lower case), if the call had it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A running sandbox; dropping it without [`Sandbox::shutdown`] also stops the server.
pub struct Sandbox {
    addr: SocketAddr,
    /// Served over TLS (`https://`).
    tls: bool,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Sandbox {
    /// Binds `addr` (port 0 = ephemeral) and serves in a background tokio task.
    pub async fn start(config: SandboxConfig, addr: SocketAddr) -> std::io::Result<Sandbox> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(listener, shared.clone(), async {
            // A dropped sender stops the server too.
            let _ = stopped.await;
        }));
        Ok(Sandbox { addr, tls: false, shared, stop, task })
    }

    /// Like [`Sandbox::start`], over TLS with the PEM certificate chain and
    /// key given, offering HTTP/2 and HTTP/1.1 (ALPN) as gateways do.
    pub async fn start_tls(
        config: SandboxConfig,
        addr: SocketAddr,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> std::io::Result<Sandbox> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let invalid = |e: &dyn std::fmt::Display| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string());
        let chain = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| invalid(&e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid(&e))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&e))?;
        // With client_ca, a handshake without a certificate it vouches for fails.
        let builder = match &config.client_ca {
            Some(pem) => {
                let mut roots = tokio_rustls::rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots.add(cert.map_err(|e| invalid(&e))?).map_err(|e| invalid(&e))?;
                }
                let verifier = tokio_rustls::rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| invalid(&e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut tls = builder.with_single_cert(chain, key).map_err(|e| invalid(&e))?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        enable_timestamps(&listener);
        let shared = Arc::new(Shared::new(config));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let service = hyper_util::service::TowerToHyperService::new(router(shared.clone()).layer(axum::Extension(Tls)));
        let task = tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    accepted = listener.accept() => accepted?.0,
                    _ = &mut stopped => return Ok(()),
                };
                let (acceptor, service) = (acceptor.clone(), service.clone());
                tokio::spawn(async move {
                    // Stamped under rustls: the TLS records' receive times.
                    let (tcp, cell) = arrival::Stamped::new(tcp);
                    let Ok(stream) = acceptor.accept(tcp).await else { return };
                    let service = arrival::Stamp { inner: service, cell };
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                });
            }
        });
        Ok(Sandbox { addr, tls: true, shared, stop, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT` (`https` over TLS), with loopback in place of an unspecified bind address.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            ip if !ip.is_unspecified() => ip,
            ip if ip.is_ipv4() => Ipv4Addr::LOCALHOST.into(),
            _ => Ipv6Addr::LOCALHOST.into(),
        };
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", SocketAddr::new(ip, self.addr.port()))
    }

    pub fn token_url(&self) -> String {
        self.base_url() + TOKEN_PATH
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Every API call received so far (empty unless `record` was set).
    pub fn recorded(&self) -> Vec<RecordedCall> {
        self.shared
            .recorded
            .as_ref()
            .map(|calls| calls.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .unwrap_or_default()
    }

    /// The sandbox's start, which `RecordedCall::at` and token request
    /// times are measured from.
    pub fn started(&self) -> std::time::Instant {
        self.shared.started.into_std()
    }

    /// When each token request arrived, measured from the sandbox's start.
    pub fn token_request_times(&self) -> Vec<Duration> {
        self.shared.token_times.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Why each client assertion refused so far was refused.
    pub fn refused_assertions(&self) -> Vec<String> {
        self.shared.refused_assertions.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every token issued so far is rejected with 401 from now on.
    pub fn revoke_all_tokens(&self) {
        self.shared.revoke_all();
    }

    /// Stops accepting connections, lets calls in flight finish and waits for the server task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!("sandbox server stopped with an error: {err}"),
            Err(err) => tracing::warn!("sandbox server task failed: {err}"),
        }
    }
}

/// Serve on an existing listener until `shutdown` resolves (used by the `bulkcall sandbox` command).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: SandboxConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run(listener, Arc::new(Shared::new(config)), shutdown).await
}

/// Asks the kernel to stamp what the listener's connections receive
/// (they inherit it), from before the first is accepted: see [`arrival`].
fn enable_timestamps(listener: &tokio::net::TcpListener) {
    if let Err(err) = arrival::enable(listener) {
        tracing::debug!("cannot enable receive timestamps: {err}; arrivals are stamped by the handler");
    }
}

/// Serves plain HTTP (1.1, or h2c) as `axum::serve` with graceful shutdown
/// does, each connection through [`arrival::Stamped`] so that a request
/// carries when its bytes arrived.
async fn run(
    mut listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use tokio::sync::watch;
    enable_timestamps(&listener);
    if let Some(after) = shared.config.revoke_after {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            shared.revoke_all();
        });
    }
    let service = hyper_util::service::TowerToHyperService::new(router(shared));
    // Closed when `shutdown` resolves: stop accepting, and let each
    // connection finish the call in flight.
    let (signal_tx, signal_rx) = watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(signal_rx);
    });
    // Closed when every connection task has ended.
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let tcp = tokio::select! {
            // Retries what accept(2) can fail with, as `axum::serve` does.
            (tcp, _) = axum::serve::Listener::accept(&mut listener) => tcp,
            _ = signal_tx.closed() => break,
        };
        // Small answers to many concurrent keep-alive clients: don't let Nagle hold them back.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::trace!("cannot set TCP_NODELAY: {err}");
        }
        let (tcp, cell) = arrival::Stamped::new(tcp);
        let service = arrival::Stamp { inner: service.clone(), cell };
        let (signal_tx, close_rx) = (signal_tx.clone(), close_rx.clone());
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let mut conn = std::pin::pin!(builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service));
            let mut signalled = std::pin::pin!(signal_tx.closed());
            let mut shutting_down = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(err) = result {
                            tracing::trace!("failed to serve a connection: {err:#}");
                        }
                        break;
                    }
                    _ = &mut signalled, if !shutting_down => {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
    Ok(())
}

/// How many seconds back the server-side rate limit counts calls by arrival.
const RATE_SECONDS: usize = 16;

/// When `req` arrived: the kernel's receive time of its bytes, where the
/// connection could tell (see [`arrival`]), else now, by the handler's clock.
fn arrived(req: &Request) -> Instant {
    req.extensions().get::<arrival::Arrived>().map_or_else(Instant::now, |at| Instant::from_std(at.0))
}

/// Answers a validated JSON object, or the field errors that made it invalid.
type ApiFn = fn(&Value) -> Result<Value, Vec<Value>>;

const APIS: [(&str, ApiFn); 3] = [
    ("/medicalnetwork/eligibility/v3", eligibility),
    ("/medicalnetwork/claimstatus/v2", claim_status),
    ("/medicalnetwork/professionalclaims/v3/submission", professional_claim),
];

fn router(shared: Arc<Shared>) -> Router {
    let router = Router::new()
        .route(TOKEN_PATH, post(token))
        .route("/_sandbox/stats", get(|State(s): State<Arc<Shared>>| async move { axum::Json(s.stats()) }))
        .route(
            "/_sandbox/revoke",
            post(|State(s): State<Arc<Shared>>| async move {
                s.revoke_all();
                StatusCode::NO_CONTENT
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|State(s): State<Arc<Shared>>, req: Request| no_such_api(s, req));
    let router = router
        .route(
            ASYNC_SUBMISSION_PATH,
            any(|State(s): State<Arc<Shared>>, req: Request| api_call(s, req, Api::AsyncClaim)),
        )
        .route(
            &format!("{ASYNC_STATUS_PATH}/{{id}}"),
            any(|State(s): State<Arc<Shared>>, req: Request| poll_call(s, req)),
        );
    APIS.into_iter()
        .fold(router, |router, (path, answer)| {
            router
                .route(path, any(move |State(s): State<Arc<Shared>>, req: Request| api_call(s, req, Api::Sync(answer))))
        })
        .with_state(shared)
}

/// State shared by every connection task; counters are atomics and the token
/// table a read-mostly lock so that 64 concurrent clients don't serialize.
struct Shared {
    config: SandboxConfig,
    /// Issued tokens: read on every API call, written once per token request.
    tokens: RwLock<HashMap<String, Issued>>,
    /// Bumped by a revocation: tokens issued in an earlier epoch are rejected.
    /// This makes revoking O(1) and keeps revoked tokens recognisable as ours.
    epoch: AtomicU64,
    /// Token requests still to fail with 503 (`fail_token_requests` counting down).
    failures_left: AtomicU32,
    counters: Counters,
    /// Only allocated when `record` is set, so the hot path takes no lock otherwise.
    recorded: Option<Mutex<Vec<RecordedCall>>>,
    started: Instant,
    /// Arrival of each token request since `started`; token requests are rare.
    token_times: Mutex<Vec<Duration>>,
    /// Calls seen per row key, for transient faults (only used with faults).
    attempts: Mutex<HashMap<String, u32>>,
    /// The server-side rate limit's count of calls in each of the last
    /// [`RATE_SECONDS`] seconds (second, count), at `second % RATE_SECONDS`:
    /// calls are counted by arrival, and one that arrived in an earlier
    /// second may be handled after one of a later second.
    rate_window: Mutex<[(u64, u32); RATE_SECONDS]>,
    /// Every client assertion's `jti` seen, so none is accepted twice.
    jtis: Mutex<std::collections::HashSet<String>>,
    /// Why each refused client assertion was refused, in order.
    refused_assertions: Mutex<Vec<String>>,
    /// Asynchronous claims submitted and not yet forgotten.
    claims: Mutex<AsyncClaims>,
}

/// Asynchronous claims by id. Ids are given in order, so the oldest claim
/// kept is the smallest id and bounding the map needs no second index.
#[derive(Default)]
struct AsyncClaims {
    next: u64,
    oldest: u64,
    by_id: HashMap<u64, AsyncClaim>,
}

/// What a claim's final answer needs: its identifiers and its outcome,
/// not the request (a few hundred bytes per claim instead of its body).
struct AsyncClaim {
    control_number: Box<str>,
    /// The request's values to echo, as compact JSON text (smaller than a `Value`).
    trading_partner: Box<str>,
    patient_control_number: Option<Box<str>>,
    /// The payer rejects it (see [`rejected`]), decided on submission.
    rejected: bool,
    /// Polls still to answer 202.
    polls_left: u32,
    /// Polls answered so far (202s and the final ones).
    polls: u32,
}

struct Issued {
    expires_at: Instant,
    epoch: u64,
}

#[derive(Default)]
struct Counters {
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    api_calls: AtomicU64,
    unauthorized: AtomicU64,
    expired_token_calls: AtomicU64,
    unknown_token_calls: AtomicU64,
    async_submissions: AtomicU64,
    polls: AtomicU64,
}

/// Why a bearer token was refused.
enum Refused {
    Unknown(&'static str),
    Expired(&'static str),
}

impl Shared {
    /// Keeps a call as received, when recording.
    fn record(&self, parts: &Parts, body: Value, status: StatusCode, at: Duration) {
        let Some(recorded) = &self.recorded else { return };
        let call = RecordedCall {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
                .collect(),
            body,
            status: status.as_u16(),
            at,
            version: format!("{:?}", parts.version),
        };
        recorded.lock().unwrap_or_else(PoisonError::into_inner).push(call);
    }

    fn new(config: SandboxConfig) -> Self {
        Self {
            failures_left: AtomicU32::new(config.fail_token_requests),
            recorded: config.record.then(Mutex::default),
            config,
            tokens: RwLock::default(),
            epoch: AtomicU64::new(0),
            counters: Counters::default(),
            started: Instant::now(),
            token_times: Mutex::default(),
            attempts: Mutex::default(),
            rate_window: Mutex::default(),
            jtis: Mutex::default(),
            refused_assertions: Mutex::default(),
            claims: Mutex::default(),
        }
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            token_requests: c.token_requests.load(Relaxed),
            tokens_issued: c.tokens_issued.load(Relaxed),
            api_calls: c.api_calls.load(Relaxed),
            unauthorized: c.unauthorized.load(Relaxed),
            expired_token_calls: c.expired_token_calls.load(Relaxed),
            unknown_token_calls: c.unknown_token_calls.load(Relaxed),
            async_submissions: c.async_submissions.load(Relaxed),
            polls: c.polls.load(Relaxed),
        }
    }

    fn revoke_all(&self) {
        self.epoch.fetch_add(1, Relaxed);
    }

    /// True while `fail_token_requests` failures are still owed.
    fn take_failure(&self) -> bool {
        self.failures_left.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok()
    }

    fn issue_token(&self) -> String {
        let token = URL_SAFE_NO_PAD.encode(rand::rng().random::<[u8; 32]>());
        let now = Instant::now();
        let issued = Issued { expires_at: now + self.config.token_lifetime, epoch: self.epoch.load(Relaxed) };
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        tokens.insert(token.clone(), issued);
        if self.counters.tokens_issued.fetch_add(1, Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            tokens.retain(|_, t| now < t.expires_at + FORGET_AFTER);
        }
        token
    }

    /// Checks the call's token as of `arrived`, as a gateway checks it on
    /// arrival, before any latency.
    fn check_bearer(&self, headers: &HeaderMap, arrived: Instant) -> Result<(), Refused> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(Refused::Unknown("missing bearer token"))?;
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        let issued = tokens.get(token).ok_or(Refused::Unknown("token was not issued by this sandbox"))?;
        if issued.epoch != self.epoch.load(Relaxed) {
            Err(Refused::Expired("token was revoked"))
        } else if arrived >= issued.expires_at {
            Err(Refused::Expired("token expired"))
        } else {
            Ok(())
        }
    }

    /// Client authentication; Basic credentials are form-encoded before base64
    /// (RFC 6749 §2.3.1) but many clients skip that, so both forms are accepted.
    fn client_matches(&self, id: &str, secret: &str, maybe_form_encoded: bool) -> bool {
        let expected = (self.config.client_id.as_bytes(), self.config.client_secret.expose_secret().as_bytes());
        let matches = |id: &str, secret: &str| ct_eq(id.as_bytes(), expected.0) & ct_eq(secret.as_bytes(), expected.1);
        matches(id, secret) || (maybe_form_encoded && matches(&form_decode(id), &form_decode(secret)))
    }
}

impl Shared {
    /// Checks a client assertion (RFC 7523, SMART Backend Services): its
    /// type, a signature by a registered key (by `kid`), `aud` the token URL
    /// as the client reached it, `iss` = `sub` = the client id, `exp` in the
    /// future and at most five minutes after `iat`, a `jti` never seen.
    fn verify_assertion(&self, parts: &Parts, params: &HashMap<String, String>, assertion: &str) -> Result<(), String> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation};
        crate::key::install_crypto();
        let Some(jwks) = &self.config.jwks else {
            return Err("this sandbox has no registered keys (start it with --jwks FILE)".into());
        };
        if params.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err("client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into());
        }
        let header = jsonwebtoken::decode_header(assertion).map_err(|e| format!("the assertion's header: {e}"))?;
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::ES256 | Algorithm::ES384
        ) {
            return Err(format!("alg {:?} is not accepted", header.alg));
        }
        let kid = header.kid.as_deref().ok_or("the assertion's header has no kid")?;
        let jwk = jwks.find(kid).ok_or_else(|| format!("no registered key has kid `{kid}`"))?;
        if let Some(alg) = jwk.common.key_algorithm
            && alg.to_string() != format!("{:?}", header.alg)
        {
            return Err(format!("key `{kid}` is registered for {alg}, the assertion is {:?}", header.alg));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key `{kid}`: {e}"))?;
        let host = parts.headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
        let scheme = if parts.extensions.get::<Tls>().is_some() { "https" } else { "http" };
        let audience = format!("{scheme}://{host}{TOKEN_PATH}");
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&audience]);
        validation.set_issuer(&[&self.config.client_id]);
        validation.sub = Some(self.config.client_id.clone());
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = 5;
        let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
            .map_err(|e| format!("the assertion does not verify: {e}"))?
            .claims;
        let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
            return Err("the assertion needs iat and exp".into());
        };
        if exp.saturating_sub(iat) > 300 {
            return Err(format!("the assertion lives {} s; five minutes at most", exp.saturating_sub(iat)));
        }
        let jti = claims["jti"].as_str().filter(|j| !j.is_empty()).ok_or("the assertion has no jti")?;
        if !self.jtis.lock().unwrap_or_else(PoisonError::into_inner).insert(jti.to_string()) {
            return Err(format!("jti `{jti}` was used before: a replayed assertion"));
        }
        Ok(())
    }
}

/// Marks a request that came over TLS.
#[derive(Clone, Copy)]
struct Tls;

/// Equality whose time does not depend on where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

// ---------------------------------------------------------------- token endpoint

async fn token(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let number = shared.counters.token_requests.fetch_add(1, Relaxed) + 1;
    let at = arrived(&req).saturating_duration_since(shared.started);
    shared.token_times.lock().unwrap_or_else(PoisonError::into_inner).push(at);
    if !shared.config.token_delay.is_zero() {
        tokio::time::sleep(shared.config.token_delay).await;
    }
    if shared.take_failure() {
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the sandbox was told to fail this token request",
        );
    }
    let (parts, body) = req.into_parts();
    let params = match to_bytes(body, MAX_TOKEN_BODY).await {
        Ok(bytes) => token_params(&parts, &bytes),
        Err(err) => Err(format!("cannot read the request body: {err}")),
    };
    let params = match params {
        Ok(params) => params,
        Err(description) => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &description);
        }
    };

    let basic = parts.headers.get(AUTHORIZATION).map(|value| {
        value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .and_then(|(_, b64)| STANDARD.decode(b64.trim()).ok())
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|pair| pair.split_once(':').map(|(id, secret)| (id.to_owned(), secret.to_owned())))
    });
    if let Some(assertion) = params.get("client_assertion")
        && let Err(why) = shared.verify_assertion(&parts, &params, assertion)
    {
        shared.refused_assertions.lock().unwrap_or_else(PoisonError::into_inner).push(why.clone());
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_client", &why);
    }
    let authenticated = match &basic {
        Some(_) if params.contains_key("client_secret") => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "use one client authentication method, not both Basic and client_secret",
            );
        }
        Some(Some((id, secret))) => shared.client_matches(id, secret, true),
        Some(None) => false,
        None if params.contains_key("client_assertion") => true,
        None => match (params.get("client_id"), params.get("client_secret")) {
            (Some(id), Some(secret)) => shared.client_matches(id, secret, false),
            // tls_client_auth: with client_ca the handshake verified a certificate.
            (Some(id), None) => {
                shared.config.client_ca.is_some() && ct_eq(id.as_bytes(), shared.config.client_id.as_bytes())
            }
            _ => false,
        },
    };
    if shared.config.reject_credentials_after.is_some_and(|n| number > n) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "the sandbox was told to refuse these credentials now",
        );
    }
    if !authenticated {
        let mut response = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed: unknown client_id, wrong client_secret, or no credentials",
        );
        if basic.is_some() {
            // RFC 6749 §5.2: required when the client tried the Authorization header.
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"bulkcall-sandbox\""));
        }
        return response;
    }

    match params.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            );
        }
        None => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "missing grant_type");
        }
    }

    let lifetime = shared.config.token_lifetime.as_secs();
    let expires_in = if shared.config.expires_in_as_string { json!(lifetime.to_string()) } else { json!(lifetime) };
    let mut answer = json!({
        "access_token": shared.issue_token(),
        "token_type": "bearer",
        "expires_in": expires_in,
    });
    if let Some(scope) = params.get("scope").filter(|s| !s.is_empty()) {
        answer["scope"] = json!(scope);
    }
    (StatusCode::OK, no_store(), axum::Json(answer)).into_response()
}

/// The token request's parameters, from a JSON body (Optum) or a form body (RFC 6749).
/// A body without Content-Type that looks like JSON is read as JSON, so that a
/// forgotten header is not misreported as missing credentials.
fn token_params(parts: &Parts, body: &Bytes) -> Result<HashMap<String, String>, String> {
    let is_json = match parts.headers.get(CONTENT_TYPE) {
        Some(ct) => ct.to_str().is_ok_and(|ct| ct.to_ascii_lowercase().contains("json")),
        None => body.trim_ascii_start().starts_with(b"{"),
    };
    if !is_json {
        return Ok(url::form_urlencoded::parse(body).into_owned().collect());
    }
    let object: Map<String, Value> =
        serde_json::from_slice(body).map_err(|err| format!("body is not a JSON object: {err}"))?;
    object
        .into_iter()
        .filter_map(|(key, value)| match value {
            Value::String(s) => Some(Ok((key, s))),
            _ if ["client_id", "client_secret", "grant_type", "scope"].contains(&key.as_str()) => {
                Some(Err(format!("{key} must be a string")))
            }
            _ => None, // extra parameters (audience, ...) of any type are accepted and ignored
        })
        .collect()
}

fn no_store() -> [(axum::http::HeaderName, &'static str); 2] {
    [(CACHE_CONTROL, "no-store"), (PRAGMA, "no-cache")]
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, no_store(), axum::Json(json!({ "error": error, "error_description": description }))).into_response()
}

// ---------------------------------------------------------------- sample APIs

/// How an API answers a valid call.
#[derive(Clone, Copy)]
enum Api {
    /// At once, with the function's mock data.
    Sync(ApiFn),
    /// `202 Accepted` with a `Location` to poll (see [`poll_call`]).
    AsyncClaim,
}

async fn api_call(shared: Arc<Shared>, req: Request, answer: Api) -> Response {
    shared.counters.api_calls.fetch_add(1, Relaxed);
    // Like a real gateway, finish a call that arrived even if the client goes
    // away meanwhile: the call happened, whether or not its answer is read.
    let handled = tokio::spawn(handle_api_call(shared, req, answer));
    handled.await.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn handle_api_call(shared: Arc<Shared>, req: Request, answer: Api) -> Response {
    let arrived = arrived(&req);
    let at = arrived.saturating_duration_since(shared.started);
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
    let (parts, body) = req.into_parts();
    let body = to_bytes(body, MAX_API_BODY).await;
    let json = match &body {
        Ok(bytes) if !bytes.is_empty() => serde_json::from_slice::<Value>(bytes).map_err(|err| err.to_string()),
        Ok(_) => Err("the body is empty".to_owned()),
        Err(err) => Err(err.to_string()),
    };
    let response = match body {
        Err(err) => gateway_errors(
            StatusCode::PAYLOAD_TOO_LARGE,
            vec![json!({ "description": format!("cannot read the request body: {err}") })],
        ),
        Ok(_) => match check_call(&shared, &parts, &json, arrived) {
            Err(refused) => refused,
            Ok(request) => match shared.fault(request["controlNumber"].as_str(), None, arrived) {
                Some(Injected::Answer(response)) => response,
                Some(Injected::Delay(delay)) => {
                    tokio::time::sleep(delay).await;
                    shared.answer(&parts, request, answer)
                }
                None => shared.answer(&parts, request, answer),
            },
        },
    };
    shared.record(&parts, json.unwrap_or(Value::Null), response.status(), at);
    response
}

/// A call to a path that is no API: refused, and recorded like any call.
async fn no_such_api(shared: Arc<Shared>, req: Request) -> Response {
    let at = arrived(&req).saturating_duration_since(shared.started);
    let description = format!("no such API: {} {}", req.method(), req.uri().path());
    let response = gateway_errors(StatusCode::NOT_FOUND, vec![json!({ "description": description })]);
    let (parts, _) = req.into_parts();
    shared.record(&parts, Value::Null, response.status(), at);
    response
}

/// Checks what every API call needs (method, token, environment header, a
/// JSON object) and gives the object back, or the answer refusing the call.
#[allow(clippy::result_large_err)] // built once per call and answered at once
fn check_call<'a>(
    shared: &Shared,
    parts: &Parts,
    json: &'a Result<Value, String>,
    arrived: Instant,
) -> Result<&'a Value, Response> {
    if parts.method != Method::POST {
        let description = format!("method {} is not allowed here; use POST", parts.method);
        let mut response = gateway_errors(StatusCode::METHOD_NOT_ALLOWED, vec![json!({ "description": description })]);
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
        return Err(response);
    }
    check_access(shared, parts, arrived)?;
    match json {
        Ok(request @ Value::Object(_)) => Ok(request),
        Ok(_) => Err(gateway_errors(
            StatusCode::BAD_REQUEST,
            vec![json!({ "description": "request body must be a JSON object" })],
        )),
        Err(err) => Err(gateway_errors(
            StatusCode::BAD_REQUEST,
            vec![json!({ "description": format!("request body is not JSON: {err}") })],
        )),
    }
}

/// The token and the environment header every API call (polls included) needs.
#[allow(clippy::result_large_err)] // built once per call and answered at once
fn check_access(shared: &Shared, parts: &Parts, arrived: Instant) -> Result<(), Response> {
    if let Err(refused) = shared.check_bearer(&parts.headers, arrived) {
        let c = &shared.counters;
        c.unauthorized.fetch_add(1, Relaxed);
        let (counter, description) = match refused {
            Refused::Unknown(why) => (&c.unknown_token_calls, why),
            Refused::Expired(why) => (&c.expired_token_calls, why),
        };
        counter.fetch_add(1, Relaxed);
        return Err((
            StatusCode::UNAUTHORIZED,
            [(WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)],
            axum::Json(json!({ "error": "invalid_token", "error_description": description })),
        )
            .into_response());
    }
    let environment_ok =
        parts.headers.get("environment").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"sandbox"));
    if shared.config.require_environment_header && !environment_ok {
        let description = "the sandbox answers mock data only to requests with the header `environment: sandbox`";
        return Err(gateway_errors(
            StatusCode::BAD_REQUEST,
            vec![json!({ "field": "environment", "description": description })],
        ));
    }
    Ok(())
}

fn mock_answer(request: &Value, answer: ApiFn) -> Response {
    match answer(request) {
        Ok(body) => axum::Json(body).into_response(),
        Err(field_errors) => gateway_errors(StatusCode::BAD_REQUEST, field_errors),
    }
}

impl Shared {
    fn answer(&self, parts: &Parts, request: &Value, api: Api) -> Response {
        match api {
            Api::Sync(answer) => mock_answer(request, answer),
            Api::AsyncClaim => self.submit_claim(parts, request),
        }
    }

    /// Keeps a valid claim and answers 202 with where to poll it.
    fn submit_claim(&self, parts: &Parts, request: &Value) -> Response {
        let mut errors = Vec::new();
        check_control_number(request, &mut errors);
        if !errors.is_empty() {
            return gateway_errors(StatusCode::BAD_REQUEST, errors);
        }
        let claim = AsyncClaim {
            control_number: request["controlNumber"].as_str().unwrap_or_default().into(),
            trading_partner: echo(request, "/tradingPartnerServiceId").to_string().into(),
            patient_control_number: request
                .pointer("/claimInformation/patientControlNumber")
                .map(|pcn| pcn.to_string().into()),
            rejected: rejected(request),
            polls_left: self.config.async_polls,
            polls: 0,
        };
        let id = {
            let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
            let id = claims.next;
            claims.next += 1;
            claims.by_id.insert(id, claim);
            // Forget the oldest past the bound, as a gateway's retention does.
            while claims.by_id.len() > self.config.async_capacity.max(1) {
                let oldest = claims.oldest;
                claims.by_id.remove(&oldest);
                claims.oldest += 1;
            }
            id
        };
        self.counters.async_submissions.fetch_add(1, Relaxed);
        let location = status_location(parts, id, self.config.async_location_origin.as_deref());
        let body = json!({
            "status": "PENDING",
            "controlNumber": echo(request, "/controlNumber"),
            "tradingPartnerServiceId": echo(request, "/tradingPartnerServiceId"),
            "claimReference": { "correlationId": claim_id(id), "statusUrl": location },
        });
        let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(axum::http::header::LOCATION, v);
        }
        self.async_retry_after(response)
    }

    fn async_retry_after(&self, mut response: Response) -> Response {
        let secs = self.config.async_retry_after.as_secs().to_string();
        if let Ok(v) = HeaderValue::from_str(&secs) {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        response
    }

    /// A poll of claim `id` that met no fault: 202 while polls are owed, then
    /// 200 with the outcome (and again on every later poll).
    fn poll_claim(&self, id: u64) -> Response {
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(claim) = claims.by_id.get_mut(&id) else {
            drop(claims);
            return unknown_claim();
        };
        claim.polls += 1;
        let echoed = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
        let mut body = json!({
            "controlNumber": &*claim.control_number,
            "tradingPartnerServiceId": echoed(&claim.trading_partner),
            "claimReference": { "correlationId": claim_id(id) },
            "polls": claim.polls,
        });
        if let Some(pcn) = &claim.patient_control_number {
            body["claimReference"]["patientControlNumber"] = echoed(pcn);
        }
        if claim.polls_left > 0 {
            claim.polls_left -= 1;
            drop(claims);
            body["status"] = json!("PENDING");
            return self.async_retry_after((StatusCode::ACCEPTED, axum::Json(body)).into_response());
        }
        let rejected = claim.rejected;
        drop(claims);
        let outcome = if rejected { "REJECTED" } else { "SUCCESS" };
        body["status"] = json!(outcome);
        body["editStatus"] = json!(outcome);
        body["claimStatus"] = json!(if rejected { "REJECTED" } else { "ACCEPTED" });
        if rejected {
            body["errors"] = json!([field_error(REJECTED_FIELD, REJECTED_WHY)]);
        }
        axum::Json(body).into_response()
    }

    fn claim_key(&self, id: u64) -> Option<String> {
        let claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        claims.by_id.get(&id).map(|claim| claim.control_number.to_string())
    }
}

/// The claim id as it appears in its status URL and `correlationId`.
fn claim_id(id: u64) -> String {
    format!("{id:016X}")
}

/// The absolute status URL of claim `id` on the origin the client reached
/// (a path alone when the request had no `Host`).
fn status_location(parts: &Parts, id: u64, origin: Option<&str>) -> String {
    let path = format!("{ASYNC_STATUS_PATH}/{}", claim_id(id));
    if let Some(origin) = origin {
        return format!("{}{path}", origin.trim_end_matches('/'));
    }
    let host = parts.headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok());
    match host.filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic())) {
        Some(host) => {
            let scheme = if parts.extensions.get::<Tls>().is_some() { "https" } else { "http" };
            format!("{scheme}://{host}{path}")
        }
        None => path,
    }
}

/// Why the payer rejects a claim, decided by its input so tests choose:
/// a `claimInformation.claimChargeAmount` (number or numeric string) of 0
/// or less is rejected; every other valid claim is accepted.
fn rejected(request: &Value) -> bool {
    let amount = match request.pointer("/claimInformation/claimChargeAmount") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    amount.is_some_and(|amount| amount <= 0.0)
}

const REJECTED_FIELD: &str = "claimInformation.claimChargeAmount";
const REJECTED_WHY: &str = "the payer rejected the claim: claimChargeAmount must be greater than 0";

fn unknown_claim() -> Response {
    gateway_errors(StatusCode::NOT_FOUND, vec![json!({ "description": "no claim has this status id" })])
}

/// `GET {ASYNC_STATUS_PATH}/{id}`: the status of an asynchronous claim, with
/// the latency, token check and faults of any API call.
async fn poll_call(shared: Arc<Shared>, req: Request) -> Response {
    shared.counters.api_calls.fetch_add(1, Relaxed);
    shared.counters.polls.fetch_add(1, Relaxed);
    let handled = tokio::spawn(handle_poll(shared, req));
    handled.await.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn handle_poll(shared: Arc<Shared>, req: Request) -> Response {
    let arrived = arrived(&req);
    let at = arrived.saturating_duration_since(shared.started);
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
    let (parts, _) = req.into_parts();
    let response = poll_answer(&shared, &parts, arrived).await;
    shared.record(&parts, Value::Null, response.status(), at);
    response
}

async fn poll_answer(shared: &Shared, parts: &Parts, arrived: Instant) -> Response {
    if parts.method != Method::GET {
        let description = format!("method {} is not allowed here; use GET", parts.method);
        let mut response = gateway_errors(StatusCode::METHOD_NOT_ALLOWED, vec![json!({ "description": description })]);
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    if let Err(refused) = check_access(shared, parts, arrived) {
        return refused;
    }
    let id = parts
        .uri
        .path()
        .strip_prefix(ASYNC_STATUS_PATH)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|id| id.len() == 16)
        .and_then(|id| u64::from_str_radix(id, 16).ok());
    let key = id.and_then(|id| shared.claim_key(id));
    match shared.fault(key.as_deref(), id, arrived) {
        Some(Injected::Answer(response)) => return response,
        Some(Injected::Delay(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    match (id, key) {
        (Some(id), Some(_)) => shared.poll_claim(id),
        _ => unknown_claim(),
    }
}

/// What an injected fault does to a call.
enum Injected {
    Answer(Response),
    Delay(Duration),
}

impl Shared {
    /// The fault this call meets: the server-side rate limit first, then the
    /// fault of its row key (transient ones only for its first attempts).
    /// Polls pass `attempts_of` (their claim), so a key's transient fault
    /// meets its submission's first attempts and its claim's first polls alike.
    /// The rate limit counts the call in the second it `arrived`.
    fn fault(&self, key: Option<&str>, attempts_of: Option<u64>, arrived: Instant) -> Option<Injected> {
        let faults = &self.config.faults;
        if faults.rate_limit > 0 {
            let second = arrived.saturating_duration_since(self.started).as_secs();
            let mut windows = self.rate_window.lock().unwrap_or_else(PoisonError::into_inner);
            let window = &mut windows[(second % RATE_SECONDS as u64) as usize];
            // A slot holding a later second: the call arrived more than
            // RATE_SECONDS before calls already counted (a runtime stalled
            // that long) and is counted in that later second.
            if window.0 < second {
                *window = (second, 0);
            }
            window.1 += 1;
            if window.1 > faults.rate_limit {
                return Some(Injected::Answer(self.throttled()));
            }
        }
        if !faults.any() {
            return None;
        }
        let key = key?;
        let fault = faults.fault_for(key)?;
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
            let counted = match attempts_of {
                Some(claim) => format!("{key} poll {claim}"),
                None => key.to_string(),
            };
            let n = attempts.entry(counted).or_default();
            *n += 1;
            *n
        };
        let transient = attempt <= faults.transient_attempts;
        let error = |status, description: &str| gateway_errors(status, vec![json!({ "description": description })]);
        Some(match fault {
            Fault::BadRequest => {
                Injected::Answer(error(StatusCode::BAD_REQUEST, "the sandbox was told to refuse this key (400)"))
            }
            Fault::Broken => Injected::Answer(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the sandbox was told to always fail this key",
            )),
            _ if !transient => return None,
            Fault::ServerError => Injected::Answer(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the sandbox was told to fail this call once",
            )),
            Fault::Throttle => Injected::Answer(self.throttled()),
            Fault::Unavailable => Injected::Answer(self.with_retry_after(
                StatusCode::SERVICE_UNAVAILABLE,
                "the sandbox is down for maintenance; retry after the time in Retry-After",
            )),
            Fault::Slow => Injected::Delay(faults.slow_delay),
            Fault::Reset => {
                // Headers go out, then the connection drops mid-body.
                let body = axum::body::Body::from_stream(futures::stream::once(async {
                    Err::<Bytes, _>(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected reset"))
                }));
                Injected::Answer((StatusCode::OK, body).into_response())
            }
        })
    }

    fn throttled(&self) -> Response {
        self.with_retry_after(StatusCode::TOO_MANY_REQUESTS, "too many requests; retry after the time in Retry-After")
    }

    /// An error answer with the configured `Retry-After`.
    fn with_retry_after(&self, status: StatusCode, description: &str) -> Response {
        let faults = &self.config.faults;
        let value = if faults.retry_after_date {
            // An HTTP date has whole seconds: round up so the wait is never shorter.
            let at = std::time::SystemTime::now() + faults.retry_after + Duration::from_secs(1);
            httpdate::fmt_http_date(at)
        } else {
            faults.retry_after.as_secs().max(1).to_string()
        };
        let mut response = gateway_errors(status, vec![json!({ "description": description })]);
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        response
    }
}

/// The gateway's error style: `{"errors":[{"field":..,"description":..}]}`.
fn gateway_errors(status: StatusCode, errors: Vec<Value>) -> Response {
    (status, axum::Json(json!({ "errors": errors }))).into_response()
}

fn field_error(field: &str, description: &str) -> Value {
    json!({ "field": field, "description": description })
}

fn check_control_number(request: &Value, errors: &mut Vec<Value>) {
    let ok = request["controlNumber"].as_str().is_some_and(|n| n.len() == 9 && n.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        errors.push(field_error("controlNumber", "controlNumber must be a string of exactly 9 digits"));
    }
}

/// The request's value at `pointer`, or null.
fn echo(request: &Value, pointer: &str) -> Value {
    request.pointer(pointer).cloned().unwrap_or(Value::Null)
}

/// `YYYYMMDD` as `YYYY-MM-DD` when it looks like a date; anything else unchanged.
fn iso_date(value: Value) -> Value {
    let Some(s) = value.as_str().filter(|s| s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit())) else {
        return value;
    };
    let (year, month, day) = (&s[..4], &s[4..6], &s[6..]);
    match (month.parse::<u8>(), day.parse::<u8>()) {
        (Ok(1..=12), Ok(1..=31)) => json!(format!("{year}-{month}-{day}")),
        _ => value,
    }
}

fn eligibility(request: &Value) -> Result<Value, Vec<Value>> {
    let mut errors = Vec::new();
    check_control_number(request, &mut errors);
    match &request["subscriber"] {
        Value::Object(subscriber) => {
            let member_id = subscriber.get("memberId").and_then(Value::as_str);
            if member_id.is_none_or(|id| id.trim().is_empty()) {
                errors.push(field_error("subscriber.memberId", "subscriber.memberId must be a non-empty string"));
            }
        }
        _ => errors.push(field_error("subscriber", "subscriber must be an object with a memberId")),
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let control_number = echo(request, "/controlNumber");
    let payer_id = echo(request, "/tradingPartnerServiceId");
    let benefit_dates = |kind: &str| json!({ kind: "20160818-20160818" });
    // The fixture's shape and synthetic values, with the request's identifiers echoed.
    Ok(json!({
        "benefitsInformation": [
            {
                "benefitsDateInformation": benefit_dates("benefit"),
                "code": "1",
                "coverageLevel": "Individual",
                "coverageLevelCode": "IND",
                "insuranceType": "Qualified Medicare Beneficiary",
                "insuranceTypeCode": "QM",
                "name": "Active Coverage",
                "planCoverage": "QMB",
                "serviceTypeCodes": ["30"],
                "serviceTypes": ["Health Benefit Plan Coverage"],
            },
            {
                "benefitsDateInformation": benefit_dates("plan"),
                "code": "R",
                "coverageLevel": "Individual",
                "coverageLevelCode": "IND",
                "insuranceTypeCode": "WA",
                "name": "Other or Additional Payor",
                "planCoverage": "MEDICARE PART A",
                "serviceTypeCodes": ["30"],
                "serviceTypes": ["Health Benefit Plan Coverage"],
            },
            {
                "benefitsDateInformation": benefit_dates("plan"),
                "code": "R",
                "coverageLevel": "Individual",
                "coverageLevelCode": "IND",
                "insuranceType": "Medicare Part B",
                "insuranceTypeCode": "MB",
                "name": "Other or Additional Payor",
                "planCoverage": "MEDICARE PART B",
                "serviceTypeCodes": ["30"],
                "serviceTypes": ["Health Benefit Plan Coverage"],
            },
        ],
        "controlNumber": control_number,
        "payer": {
            "entityIdentifier": "Payer",
            "entityType": "Non-Person Entity",
            "name": "Sandbox Payer",
            "payorIdentification": payer_id,
        },
        "planDateInformation": { "plan": "20160818-20160818" },
        "planInformation": { "socialSecurityNumber": "111111111" },
        "planStatus": [{ "planDetails": "QMB", "serviceTypeCodes": ["30"], "status": "Active Coverage", "statusCode": "1" }],
        "provider": {
            "entityIdentifier": "Provider",
            "entityType": "Non-Person Entity",
            "npi": echo(request, "/provider/npi"),
            "providerName": echo(request, "/provider/organizationName"),
        },
        "reassociationKey": control_number,
        "subscriber": {
            "dateOfBirth": iso_date(echo(request, "/subscriber/dateOfBirth")),
            "entityIdentifier": "Insured or Subscriber",
            "entityType": "Person",
            "firstName": echo(request, "/subscriber/firstName"),
            "gender": "M",
            "lastName": echo(request, "/subscriber/lastName"),
            "memberId": echo(request, "/subscriber/memberId"),
            "provider": {},
            "ssn": "111111111",
        },
        "subscriberTraceNumbers": [{
            "originatingCompanyIdentifier": "9EMDEON999",
            "referenceIdentification": control_number,
            "traceType": "Current Transaction Trace Numbers",
            "traceTypeCode": "1",
        }],
        "tradingPartnerServiceId": payer_id,
    }))
}

fn claim_status(request: &Value) -> Result<Value, Vec<Value>> {
    let mut errors = Vec::new();
    check_control_number(request, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let dates = ["/encounter/beginningDateOfService", "/encounter/endDateOfService"]
        .map(|pointer| request.pointer(pointer).and_then(Value::as_str).unwrap_or_default());
    let service_date = match dates {
        ["", ""] => Value::Null,
        [begin, ""] | ["", begin] => json!(begin),
        [begin, end] => json!(format!("{begin}-{end}")),
    };
    let account = ["/patientControlNumber", "/claimId"]
        .iter()
        .find_map(|pointer| request.pointer(pointer))
        .cloned()
        .unwrap_or(Value::Null);
    Ok(json!({
        "controlNumber": echo(request, "/controlNumber"),
        "tradingPartnerServiceId": echo(request, "/tradingPartnerServiceId"),
        "claims": [{
            "claimStatus": {
                "statusCategoryCode": "F1",
                "statusCategoryCodeValue": "Finalized/Payment-The claim/line has been paid.",
                "claimServiceDate": service_date,
                "totalClaimChargeAmount": "100.00",
                "claimPaymentAmount": "80.00",
                "patientAccountNumber": account,
            }
        }],
    }))
}

fn professional_claim(request: &Value) -> Result<Value, Vec<Value>> {
    let mut errors = Vec::new();
    check_control_number(request, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let correlation_id: String = rand::rng().random::<[u8; 10]>().iter().map(|b| format!("{b:02X}")).collect();
    let mut reference = json!({ "correlationId": correlation_id });
    if let Some(pcn) = request.pointer("/claimInformation/patientControlNumber") {
        reference["patientControlNumber"] = pcn.clone();
    }
    Ok(json!({
        "status": "SUCCESS",
        "controlNumber": echo(request, "/controlNumber"),
        "tradingPartnerServiceId": echo(request, "/tradingPartnerServiceId"),
        "claimReference": reference,
        "editStatus": "SUCCESS",
    }))
}

#[cfg(test)]
mod fault_tests {
    use super::*;

    #[test]
    fn an_async_claim_entry_stays_small() {
        // The map's entry (id + claim) inline; the ~210 bytes per claim in
        // `async_capacity` add the table's overhead and the three short strings.
        assert!(std::mem::size_of::<(u64, AsyncClaim)>() <= 80, "{}", std::mem::size_of::<(u64, AsyncClaim)>());
    }

    #[test]
    fn a_claim_charge_of_zero_or_less_is_rejected() {
        let claim = |amount: Value| json!({ "claimInformation": { "claimChargeAmount": amount } });
        assert!(rejected(&claim(json!("0.00"))));
        assert!(rejected(&claim(json!(-5))));
        assert!(!rejected(&claim(json!("28.75"))));
        assert!(!rejected(&claim(json!("abc"))));
        assert!(!rejected(&json!({})));
    }

    #[test]
    fn faults_are_spread_over_keys_by_their_shares() {
        let faults = Faults { server_errors: 0.05, bad_requests: 0.01, ..Faults::default() };
        let hits = (1..=10_000).filter(|n| faults.fault_for(&format!("{n:09}")).is_some()).count();
        assert!((500..=700).contains(&hits), "{hits}");
        assert_eq!(faults.fault_for("000000042"), faults.fault_for("000000042"), "deterministic");
        let reseeded = Faults { seed: 7, ..faults.clone() };
        assert!((1..=200).any(|n| faults.fault_for(&format!("{n:09}")) != reseeded.fault_for(&format!("{n:09}"))));
    }
}
