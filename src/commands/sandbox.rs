//! `bulkcall sandbox`: serve the built-in mock gateway.

use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::cli::*;
use crate::error::{Error, ExitCode};
use crate::sandbox::SandboxConfig;

pub(super) async fn sandbox(args: SandboxArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let addr = format!("{}:{}", args.host, args.port);
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Error::Usage(format!("cannot read {}: {e}", path.display())))
    };
    let jwks = match &args.jwks {
        Some(path) => Some(
            serde_json::from_slice::<jsonwebtoken::jwk::JwkSet>(&read(path)?)
                .map_err(|e| Error::Usage(format!("{} is not a JWKS ({{\"keys\": [...]}}): {e}", path.display())))?,
        ),
        None => None,
    };
    let client_ca = args.client_ca.as_deref().map(read).transpose()?;
    let config = SandboxConfig {
        client_id: args.client_id.clone(),
        client_secret: SecretString::from(args.client_secret),
        token_lifetime: args.token_lifetime,
        expires_in_as_string: args.expires_in_string,
        token_delay: args.token_delay,
        fail_token_requests: args.fail_token_requests,
        reject_credentials_after: None,
        latency: args.latency,
        require_environment_header: !args.no_environment_header,
        record: false,
        revoke_after: args.revoke_after,
        faults: args.faults.to_faults()?,
        jwks,
        client_ca,
        async_polls: args.async_polls,
        async_retry_after: std::time::Duration::from_secs(args.async_retry_after),
        async_capacity: usize::try_from(args.async_capacity).unwrap_or(usize::MAX),
        async_location_origin: args.async_location_origin,
    };
    let keys = config.jwks.as_ref().map(|set| set.keys.len());
    let mutual = config.client_ca.is_some();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let (cert, key) = (read(cert)?, read(key)?);
        let bind = tokio::net::lookup_host(&addr)
            .await
            .map_err(|source| Error::Sandbox { addr: addr.clone(), source })?
            .next()
            .ok_or_else(|| Error::Usage(format!("{addr} names no address")))?;
        let sandbox = crate::sandbox::Sandbox::start_tls(config, bind, &cert, &key)
            .await
            .map_err(|source| Error::Sandbox { addr: addr.clone(), source })?;
        let base = sandbox.base_url();
        explain(&base, &args.client_id, keys, mutual);
        stop.cancelled().await;
        sandbox.shutdown().await;
        return Ok(ExitCode::Success);
    }
    let listener =
        tokio::net::TcpListener::bind(&addr).await.map_err(|source| Error::Sandbox { addr: addr.clone(), source })?;
    let local = listener.local_addr().map_err(|source| Error::Sandbox { addr: addr.clone(), source })?;
    explain(&format!("http://{local}"), &args.client_id, keys, mutual);
    crate::sandbox::serve(listener, config, async move { stop.cancelled().await })
        .await
        .map_err(|source| Error::Sandbox { addr, source })?;
    Ok(ExitCode::Success)
}

/// What the sandbox serves, on stderr.
fn explain(base: &str, client_id: &str, keys: Option<usize>, mutual: bool) {
    eprintln!("bulkcall sandbox listening on {base}");
    eprintln!("  token URL: {base}{}  (client id `{client_id}`)", crate::sandbox::TOKEN_PATH);
    if let Some(keys) = keys {
        eprintln!("  private_key_jwt: client assertions verified against {keys} registered key(s)");
    }
    if mutual {
        eprintln!("  mutual TLS: a client certificate from --client-ca is required; tls_client_auth accepted");
    }
    eprintln!(
        "  APIs: POST /medicalnetwork/eligibility/v3, /medicalnetwork/claimstatus/v2, /medicalnetwork/professionalclaims/v3/submission"
    );
    eprintln!(
        "  async claims: POST {} answers 202 + Location {}/ID; a claimChargeAmount <= 0 is rejected",
        crate::sandbox::ASYNC_SUBMISSION_PATH,
        crate::sandbox::ASYNC_STATUS_PATH
    );
    eprintln!("  stats: GET /_sandbox/stats   revoke all tokens: POST /_sandbox/revoke   Ctrl-C stops");
}
