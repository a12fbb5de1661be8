//! `bulkcall sandbox`: serve the built-in mock gateway.

use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::cli::*;
use crate::error::{Error, ExitCode};
use crate::sandbox::SandboxConfig;

pub(super) async fn sandbox(args: SandboxArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let addr = format!("{}:{}", args.host, args.port);
    let listener =
        tokio::net::TcpListener::bind(&addr).await.map_err(|source| Error::Sandbox { addr: addr.clone(), source })?;
    let local = listener.local_addr().map_err(|source| Error::Sandbox { addr: addr.clone(), source })?;
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
        jwks: None,
        client_ca: None,
    };
    eprintln!("bulkcall sandbox listening on http://{local}");
    eprintln!("  token URL: http://{local}{}  (client id `{}`)", crate::sandbox::TOKEN_PATH, args.client_id);
    eprintln!(
        "  APIs: POST /medicalnetwork/eligibility/v3, /medicalnetwork/claimstatus/v2, /medicalnetwork/professionalclaims/v3/submission"
    );
    eprintln!("  stats: GET /_sandbox/stats   revoke all tokens: POST /_sandbox/revoke   Ctrl-C stops");
    crate::sandbox::serve(listener, config, async move { stop.cancelled().await })
        .await
        .map_err(|source| Error::Sandbox { addr, source })?;
    Ok(ExitCode::Success)
}
