//! Redis, where the processes of one run meet: its address (a secret when it
//! holds a password), the connection, and the names of the keys a run uses.
//!
//! What lives there: the shared rate limit (`limiter/redis.rs`), the shared
//! token (`token/shared.rs`) and the run's manifest ([`pin_manifest`]).
//! Every key of a run starts with `bulkcall:{run id}:`, so runs never meet.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};

/// How long one round trip to Redis may take before it counts as lost.
pub const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CoordinationError {
    #[error("coordination.redis_url `{url}` is not a Redis URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("Redis at {url} is unreachable: {reason}; try again when it is up (nothing was sent)")]
    Unreachable { url: String, reason: String },
    #[error(
        "this shard does not belong to run `{run_id}`: its {difference}; \
         every shard of a run needs the same job, inputs and shard count (or another --run-id)"
    )]
    ManifestMismatch { run_id: String, difference: String },
}

/// `coordination.redis_url`, parsed; shown only without its password.
#[derive(Clone)]
pub struct RedisUrl {
    url: SecretString,
    shown: String,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl RedisUrl {
    /// `redis://` or `rediss://` (TLS); a password in it is never shown.
    pub fn parse(raw: &SecretString) -> Result<RedisUrl, CoordinationError> {
        let raw = raw.expose_secret();
        let bad = |shown: String, reason: &str| CoordinationError::BadUrl { url: shown, reason: reason.into() };
        let mut url = url::Url::parse(raw).map_err(|e| bad("<unparsable>".into(), &e.to_string()))?;
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        }
        let shown = url.to_string();
        if !matches!(url.scheme(), "redis" | "rediss") {
            return Err(bad(shown, "use redis:// or rediss:// (TLS)"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad(shown, "it names no host"));
        }
        Ok(RedisUrl { url: SecretString::from(raw.to_string()), shown })
    }
}

/// One connection to Redis, shared by everything of this process that
/// meets there; it reconnects by itself after Redis comes back.
#[derive(Clone)]
pub struct Redis {
    pub conn: ConnectionManager,
    pub url: RedisUrl,
}

impl Redis {
    /// Connects and checks that Redis answers; exit 75 when it does not.
    pub async fn connect(url: &RedisUrl) -> Result<Redis, CoordinationError> {
        let unreachable = |reason: String| CoordinationError::Unreachable { url: url.shown.clone(), reason };
        let client = redis::Client::open(url.url.expose_secret())
            .map_err(|e| CoordinationError::BadUrl { url: url.shown.clone(), reason: e.to_string() })?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(ROUND_TRIP_TIMEOUT))
            .set_response_timeout(Some(ROUND_TRIP_TIMEOUT))
            .set_max_delay(Duration::from_millis(500));
        let connecting = ConnectionManager::new_with_config(client, config);
        let mut conn = tokio::time::timeout(3 * ROUND_TRIP_TIMEOUT, connecting)
            .await
            .map_err(|_| unreachable("no answer within 3s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _: String = tokio::time::timeout(ROUND_TRIP_TIMEOUT, redis::cmd("PING").query_async(&mut conn))
            .await
            .map_err(|_| unreachable("no answer to PING within 1s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Redis { conn, url: url.clone() })
    }

    /// Whether Redis answers now, within [`ROUND_TRIP_TIMEOUT`].
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        matches!(tokio::time::timeout(ROUND_TRIP_TIMEOUT, ping.query_async::<String>(&mut conn)).await, Ok(Ok(_)))
    }
}

/// The prefix of every key of run `run_id`.
pub fn run_key(run_id: &str, what: &str) -> String {
    format!("bulkcall:{{{run_id}}}:{what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_is_never_shown() {
        let url = RedisUrl::parse(&SecretString::from("rediss://app:hunter2@redis.internal:6380/0")).unwrap();
        assert_eq!(url.to_string(), "rediss://app:***@redis.internal:6380/0");
        assert!(!format!("{url:?}").contains("hunter2"));
        let err = RedisUrl::parse(&SecretString::from("http://u:hunter2@x/")).unwrap_err().to_string();
        assert!(err.contains("redis://") && !err.contains("hunter2"), "{err}");
        let err = RedisUrl::parse(&SecretString::from("not a url hunter2")).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
