//! The HTTP client that calls and token requests go out through.

use std::time::Duration;

use crate::config::{ConfigError, Settings};

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
        .user_agent(concat!("bulkcall/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(settings.concurrency)
        .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
        .timeout(settings.timeout);
    if let Some(path) = settings.ca_file() {
        let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let bad = |why: String| ConfigError::Value(format!("ca_file {}: {why}", shown.display()));
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
        if certificates.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        for certificate in certificates {
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
