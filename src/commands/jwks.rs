//! `bulkcall jwks`: the public keys to register with the authorization
//! server, as a JWKS on stdout. Never any private material.

use crate::cli::JwksArgs;
use crate::config::Sources;
use crate::error::{Error, ExitCode};
use crate::key::SigningKey;

pub(super) async fn jwks(args: JwksArgs) -> Result<ExitCode, Error> {
    let mut keys = Vec::new();
    if args.key.is_empty() {
        // The profile's key, read as runs read it: what is registered is what runs sign with.
        let sources = Sources {
            config_file: args.config.config.clone(),
            profile: args.config.profile.clone(),
            env: true,
            ..Sources::default()
        };
        let loaded = sources.load()?;
        let auth = &loaded.settings.auth;
        let key = auth.signing_key()?.ok_or_else(|| {
            Error::Usage(format!(
                "profile `{}` names no private key (auth.private_key_file or auth.private_key_env): \
                 name one with --key FILE",
                loaded.profile
            ))
        })?;
        keys.push(key);
    } else {
        if args.key_id.len() > args.key.len() {
            return Err(Error::Usage("more --key-id than --key: give one --key-id per key, in order".into()));
        }
        for (n, path) in args.key.iter().enumerate() {
            let key = SigningKey::from_file(path, args.algorithm.as_deref(), args.key_id.get(n).map(String::as_str))
                .map_err(Error::Usage)?;
            keys.push(key);
        }
    }
    let set = serde_json::json!({ "keys": keys.iter().map(SigningKey::public_jwk).collect::<Vec<_>>() });
    println!("{}", serde_json::to_string_pretty(&set).expect("serializable"));
    for key in &keys {
        eprintln!("bulkcall: key `{}` ({:?}, thumbprint {})", key.kid(), key.algorithm(), key.thumbprint());
    }
    Ok(ExitCode::Success)
}
