//! `bulkcall token`: get a token for the profile and say where it came from.

use std::time::Duration;

use crate::cli::*;
use crate::config::{AuthStyle, Sources};
use crate::error::{Error, ExitCode};
use crate::runner::{self};
use crate::token::{Origin, TokenSource};

pub(super) async fn token(args: TokenArgs) -> Result<ExitCode, Error> {
    let sources = Sources {
        config_file: args.config.config.clone(),
        profile: args.config.profile.clone(),
        env: true,
        ..Sources::default()
    };
    let loaded = sources.load()?;
    let auth = &loaded.settings.auth;
    if auth.style == AuthStyle::None {
        return Err(Error::Usage(format!(
            "profile `{}` has auth.style = \"none\": there is no token to get",
            loaded.profile
        )));
    }
    let client = runner::token_client(&loaded.settings)?;
    let tokens = TokenSource::new(client, auth, loaded.credentials()?);
    let token = if args.refresh { tokens.get_fresh().await? } else { tokens.get().await? };
    let left = token.expires_at.saturating_duration_since(tokio::time::Instant::now());
    let url = crate::token::shown_url(auth.token_url.as_deref().unwrap_or(""));
    match &token.origin {
        Origin::Fetched => eprintln!("token fetched now from {url} (profile {})", loaded.profile),
        Origin::Cache(path) => {
            eprintln!("token from the cache {} (profile {}, no token request)", path.display(), loaded.profile)
        }
        Origin::Shared => eprintln!("token shared through Redis (profile {}, no token request)", loaded.profile),
    }
    eprintln!("  type: {}", token.token_type);
    if let Some(scope) = &token.scope {
        eprintln!("  scope: {scope}");
    }
    eprintln!(
        "  expires: {} (in {})",
        humantime::format_rfc3339_seconds(token.expires_at_wall),
        humantime::format_duration(Duration::from_secs(left.as_secs()))
    );
    if args.print {
        println!("{}", token.expose());
    }
    Ok(ExitCode::Success)
}
