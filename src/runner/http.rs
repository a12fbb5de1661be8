//! The HTTP client that calls and token requests go out through.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, Entry, HeaderMap, HeaderValue, USER_AGENT};
use http::{StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, Settings};
use crate::outcome::CallError;

/// What bulkcall's requests say they come from.
const USER_AGENT_VALUE: &str = concat!("bulkcall/", env!("CARGO_PKG_VERSION"));

/// An HTTP client for calls or token requests: connections are reused, the
/// pool sized to the concurrency, HTTP/2 used when a server offers it
/// (ALPN), `ca_file`'s certificates trusted besides the built-in roots,
/// the `tls.client_cert` shown to servers that ask for one.
///
/// A redirect is never followed: it would carry the body (PHI), the token,
/// the job's headers or the client secret to wherever the server points,
/// an `http://` URL included. A `3xx` is an answer like any other.
pub fn http_client(settings: &Settings) -> Result<reqwest::Client, ConfigError> {
    builder(settings)?.build().map_err(|e| ConfigError::Value(format!("cannot set up the HTTP client: {e}")))
}

/// The client token requests go out through: [`http_client`]'s, over
/// HTTP/1.1, one request per connection at a time, so a server refusing the
/// client certificate after a TLS 1.3 handshake is seen as that (its alert
/// answers the request) rather than as a connection closed under a request
/// still queued on an HTTP/2 connection.
pub fn token_client(settings: &Settings) -> Result<reqwest::Client, ConfigError> {
    builder(settings)?
        .http1_only()
        .build()
        .map_err(|e| ConfigError::Value(format!("cannot set up the HTTP client: {e}")))
}

fn builder(settings: &Settings) -> Result<reqwest::ClientBuilder, ConfigError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT_VALUE)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(settings.concurrency)
        .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
        .timeout(settings.timeout);
    if let Some(ca) = CaFile::read(settings)? {
        for certificate in ca.certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    // Mutual TLS: the certificate goes to every server that asks for one.
    if let Some((cert, pem)) = settings.client_identity()? {
        use secrecy::ExposeSecret as _;
        let identity = reqwest::Identity::from_pem(pem.expose_secret().as_bytes()).map_err(|e| {
            ConfigError::Value(format!("tls.client_cert {} and its key cannot be used together: {e}", cert.display()))
        })?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

/// The client a lane's (or the poller's) calls go out through: hyper_util's
/// pooled client over rustls, without reqwest's layers above it (its URL
/// parsed twice per call, its request cloned for retries, its boxed
/// futures), and reqwest's whenever a proxy applies to a call's origin
/// (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`).
///
/// The same settings as [`http_client`]: the pool sized to the
/// concurrency, HTTP/2 when the gateway offers it (ALPN), the built-in
/// roots, `ca_file` and `tls.client_cert`, the connect timeout and the
/// total one, redirects never followed (hyper_util's client follows none).
pub struct ApiClient {
    pub(super) direct: Client<Connector, Full<Bytes>>,
    /// reqwest's client and what says when it is used, when a proxy is set.
    pub(super) proxied: Option<(reqwest::Client, Matcher)>,
    pub(super) timeout: Duration,
}

/// An answer read through [`ApiClient::exchange`].
pub(super) struct Exchanged {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    /// The body up to the cap.
    pub(super) body: Vec<u8>,
    /// The whole body's length.
    pub(super) total: u64,
}

impl ApiClient {
    /// reqwest's client, when a proxy applies to `uri`.
    pub(super) fn proxied(&self, uri: &Uri) -> Option<&reqwest::Client> {
        let (client, matcher) = self.proxied.as_ref()?;
        matcher.intercept(uri).is_some().then_some(client)
    }

    /// Sends `call` to `url` without reqwest and reads its answer, its body
    /// kept up to `cap` bytes, all within the total timeout.
    pub(super) async fn exchange(
        &self,
        mut call: http::Request<Full<Bytes>>,
        url: &url::Url,
        cap: usize,
    ) -> Result<Exchanged, CallError> {
        // What reqwest's client adds to a call that does not say otherwise.
        let headers = call.headers_mut();
        if let Entry::Vacant(entry) = headers.entry(USER_AGENT) {
            entry.insert(HeaderValue::from_static(USER_AGENT_VALUE));
        }
        if let Entry::Vacant(entry) = headers.entry(ACCEPT) {
            entry.insert(HeaderValue::from_static("*/*"));
        }
        let exchange = async {
            let response = match self.direct.request(call).await {
                Ok(response) => response,
                Err(e) => return Err(CallError::direct(&e, e.is_connect(), url)),
            };
            let (parts, mut incoming) = response.into_parts();
            let mut body = Vec::new();
            let mut total = 0u64;
            while let Some(frame) = incoming.frame().await {
                let frame = frame.map_err(|e| CallError::direct(&e, false, url))?;
                if let Ok(chunk) = frame.into_data() {
                    total += chunk.len() as u64;
                    let room = cap.saturating_sub(body.len()).min(chunk.len());
                    body.extend_from_slice(&chunk[..room]);
                }
            }
            Ok(Exchanged { status: parts.status, headers: parts.headers, body, total })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(exchanged) => exchanged,
            Err(_) => Err(CallError::timed_out(url)),
        }
    }
}

/// The TLS settings every [`ApiClient`] of a run shares: the roots are
/// loaded once.
#[derive(Clone)]
pub struct ApiTls(Arc<rustls::ClientConfig>);

/// `ca_file`, read and checked: every PEM certificate in it parses, and
/// there is one at least. Both clients trust what it holds.
struct CaFile {
    /// Where it is, as the errors name it.
    shown: std::path::PathBuf,
    pem: Vec<u8>,
    certificates: Vec<reqwest::Certificate>,
}

impl CaFile {
    fn read(settings: &Settings) -> Result<Option<CaFile>, ConfigError> {
        let Some(path) = settings.ca_file() else { return Ok(None) };
        let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut ca = CaFile { shown, pem: Vec::new(), certificates: Vec::new() };
        ca.pem = std::fs::read(path).map_err(|e| ca.bad(e))?;
        ca.certificates = reqwest::Certificate::from_pem_bundle(&ca.pem).map_err(|e| ca.bad(e))?;
        if ca.certificates.is_empty() {
            return Err(ca.bad("no PEM certificate in it"));
        }
        Ok(Some(ca))
    }

    fn bad(&self, why: impl std::fmt::Display) -> ConfigError {
        ConfigError::Value(format!("ca_file {}: {why}", self.shown.display()))
    }
}

/// The variables reqwest's (and hyper_util's) proxy matcher reads a proxy from.
const PROXY_VARS: [&str; 6] = ["ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"];

pub fn api_tls(settings: &Settings) -> Result<ApiTls, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // As reqwest loads them: a system certificate that does not parse is skipped.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = CaFile::read(settings)? {
        for cert in CertificateDer::pem_slice_iter(&ca.pem) {
            let cert = cert.map_err(|e| ca.bad(e))?;
            roots.add(cert).map_err(|e| ca.bad(e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| ConfigError::Value(format!("cannot set up the HTTP client: {e}")))?
        .with_root_certificates(roots);
    let mut config = match settings.client_identity()? {
        Some((cert, pem)) => {
            use secrecy::ExposeSecret as _;
            let unusable = |e: &dyn std::fmt::Display| {
                ConfigError::Value(format!(
                    "tls.client_cert {} and its key cannot be used together: {e}",
                    cert.display()
                ))
            };
            // reqwest's checks first, for the same messages as the token client's.
            reqwest::Identity::from_pem(pem.expose_secret().as_bytes()).map_err(|e| unusable(&e))?;
            let (certs, key) = identity(pem.expose_secret().as_bytes()).ok_or_else(|| unusable(&"no key"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| ConfigError::Value(format!("cannot set up the HTTP client: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ApiTls(Arc::new(config)))
}

/// The certificates and the key of a PEM identity, read as reqwest reads them.
fn identity(pem: &[u8]) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    use rustls::pki_types::pem::{self, SectionKind};
    let mut reader = std::io::Cursor::new(pem);
    let (mut certs, mut keys) = (Vec::new(), Vec::new());
    while let Some((kind, data)) = pem::from_buf(&mut reader).ok()? {
        match kind {
            SectionKind::Certificate => certs.push(data.into()),
            SectionKind::PrivateKey => keys.push(PrivateKeyDer::Pkcs8(data.into())),
            SectionKind::RsaPrivateKey => keys.push(PrivateKeyDer::Pkcs1(data.into())),
            SectionKind::EcPrivateKey => keys.push(PrivateKeyDer::Sec1(data.into())),
            _ => return None,
        }
    }
    let key = keys.pop()?;
    (!certs.is_empty()).then_some((certs, key))
}

pub fn api_client(settings: &Settings, tls: &ApiTls) -> Result<ApiClient, ConfigError> {
    let connect_timeout = settings.timeout.min(Duration::from_secs(10));
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(15)));
    http.set_keepalive_interval(Some(Duration::from_secs(15)));
    // As reqwest's: a connection whose packets vanish is given up after
    // three unanswered probes, and on Linux after 30 s of unacknowledged
    // data, not after the kernel's default of about 15 minutes.
    http.set_keepalive_retries(Some(3));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    http.set_tcp_user_timeout(Some(Duration::from_secs(30)));
    let https = hyper_rustls::HttpsConnector::from((http, tls.0.clone()));
    let direct = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(settings.concurrency)
        .build(Connector { https, timeout: connect_timeout });
    let proxied = PROXY_VARS
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
        .then(|| http_client(settings).map(|client| (client, Matcher::from_env())))
        .transpose()?;
    Ok(ApiClient { direct, proxied, timeout: settings.timeout })
}

/// hyper_rustls's connector, its connecting and handshake bounded by the
/// connect timeout as reqwest's are.
#[derive(Clone)]
pub(super) struct Connector {
    https: hyper_rustls::HttpsConnector<HttpConnector>,
    timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.https.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.https.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(Box::new(crate::outcome::TimedOut) as BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{ErrorKind, Verdict};

    fn client(timeout: Duration) -> ApiClient {
        let settings = Settings { timeout, ..Settings::default() };
        api_client(&settings, &api_tls(&settings).unwrap()).unwrap()
    }

    fn post(url: &url::Url) -> http::Request<Full<Bytes>> {
        let mut call = http::Request::new(Full::new(Bytes::from_static(b"{}")));
        *call.method_mut() = http::Method::POST;
        *call.uri_mut() = Uri::try_from(url.as_str()).unwrap();
        call
    }

    /// A server that reads one request on each connection, then waits
    /// `hold` and closes it without an answer.
    async fn silent(hold: Duration) -> (url::Url, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/members/SYN00000001?dob=19800102", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
                tokio::time::sleep(hold).await;
            }
        });
        (url::Url::parse(&url).unwrap(), server)
    }

    #[tokio::test]
    async fn direct_calls_say_whether_the_gateway_saw_them_and_never_name_the_path() {
        let client = client(Duration::from_millis(300));
        // Nothing listens on a port just freed: refused while connecting.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = url::Url::parse(&format!("http://127.0.0.1:{port}/members/SYN00000001?dob=19800102")).unwrap();
        let refused = client.exchange(post(&url), &url, 1024).await.err().unwrap();
        assert_eq!(refused.verdict, Verdict::NotSent(ErrorKind::Connection), "{}", refused.text);
        assert!(refused.text.contains(&format!("to http://127.0.0.1:{port}")), "{}", refused.text);

        // The request went out and no answer came: the total timeout.
        let (url, server) = silent(Duration::from_secs(5)).await;
        let timeout = client.exchange(post(&url), &url, 1024).await.err().unwrap();
        assert_eq!(timeout.verdict, Verdict::NoAnswer(ErrorKind::Timeout), "{}", timeout.text);
        server.abort();

        // The connection closed under the request: in doubt.
        let (url, server) = silent(Duration::ZERO).await;
        let closed = client.exchange(post(&url), &url, 1024).await.err().unwrap();
        assert_eq!(closed.verdict, Verdict::NoAnswer(ErrorKind::Connection), "{}", closed.text);
        server.abort();

        for e in [refused, timeout, closed] {
            assert!(!e.text.contains("SYN00000001") && !e.text.contains("19800102"), "{}", e.text);
            assert!(!e.untrusted && e.refused.is_none());
        }
    }
}
