//! Redis, where the processes of one run meet: its address (a secret when it
//! holds a password), the connection, and the names of the keys a run uses.
//!
//! What lives there: the shared rate limit (`limiter/redis.rs`), the shared
//! token (`token/shared.rs`) and the run's manifest ([`pin_manifest`]).
//! Every key of a run starts with `bulkcall:{run id}:`, so runs never meet.

use std::path::Path;
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
         every shard of a run needs the same job, inputs, shard count and --limit (or another --run-id)"
    )]
    ManifestMismatch { run_id: String, difference: String },
    #[error("cannot write the run's manifest {}: {source}", path.display())]
    ManifestFile { path: std::path::PathBuf, source: std::io::Error },
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

/// The key `what` of run `run_id`. The braces keep every key of a run on
/// one Redis Cluster slot.
pub fn run_key(run_id: &str, what: &str) -> String {
    format!("bulkcall:{{{run_id}}}:{what}")
}

/// What every shard of a run must agree on; the first one pins it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub run_id: String,
    pub shards: u32,
    /// Each input's file name and SHA-256, in order.
    pub inputs: Vec<(String, String)>,
    /// SHA-256 of the job spec's text.
    pub job: String,
    /// `--limit`: the first rows of the run that its shards split.
    #[serde(default)]
    pub limit: Option<u64>,
}

/// A manifest is forgotten this long after the first shard pinned it.
const MANIFEST_TTL_S: u64 = 30 * 86_400;

impl Manifest {
    /// What differs between `self` (this shard) and the run's `pinned` one.
    fn difference(&self, pinned: &Manifest) -> Option<String> {
        if self.shards != pinned.shards {
            return Some(format!("shard count is {}, the run's is {}", self.shards, pinned.shards));
        }
        if self.limit != pinned.limit {
            let shown = |l: Option<u64>| l.map_or_else(|| "none".to_string(), |l| l.to_string());
            return Some(format!("--limit is {}, the run's is {}", shown(self.limit), shown(pinned.limit)));
        }
        if self.job != pinned.job {
            return Some("job spec differs from the one the run started with (its SHA-256 differs)".into());
        }
        if self.inputs.len() != pinned.inputs.len() {
            return Some(format!("{} inputs, the run's {}", self.inputs.len(), pinned.inputs.len()));
        }
        self.inputs.iter().zip(&pinned.inputs).find(|(a, b)| a.1 != b.1).map(|(a, b)| {
            let theirs = if a.0 == b.0 { String::new() } else { format!(" ({} in the run)", b.0) };
            format!("input {}{theirs} differs from the run's (its SHA-256 differs)", a.0)
        })
    }
}

/// The run folder's own record of its manifest, beside the shards' directories.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Pins `manifest` in the run's folder if this shard is the first there,
/// or checks it against the one pinned: shards split another way (another
/// count, `--limit`, job or inputs) never share one folder, Redis or not.
/// The file is written whole under a temporary name, then linked into
/// place, which fails if another shard was first.
pub fn pin_manifest_file(folder: &Path, manifest: &Manifest) -> Result<(), CoordinationError> {
    let path = folder.join(MANIFEST_FILE);
    let failed = |source| CoordinationError::ManifestFile { path: path.clone(), source };
    if !path.exists() {
        let temp = folder.join(format!(".{MANIFEST_FILE}.{}.tmp", std::process::id()));
        let text = serde_json::to_vec_pretty(manifest).expect("serializable");
        let written = (|| {
            let mut file = std::fs::File::create(&temp)?;
            std::io::Write::write_all(&mut file, &text)?;
            file.sync_all()?;
            std::fs::hard_link(&temp, &path)
        })();
        let _ = std::fs::remove_file(&temp);
        match written {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed(e)),
        }
    }
    let found = std::fs::read(&path).map_err(failed)?;
    let difference = match serde_json::from_slice::<Manifest>(&found) {
        Ok(pinned) => manifest.difference(&pinned),
        Err(_) => Some(format!("run folder's {MANIFEST_FILE} is not one this version of bulkcall wrote")),
    };
    match difference {
        None => Ok(()),
        Some(difference) => Err(CoordinationError::ManifestMismatch { run_id: manifest.run_id.clone(), difference }),
    }
}

/// Pins `manifest` as its run's if it is the first, or checks it against
/// the one pinned: a shard with other inputs, another job, another shard
/// count or `--limit` refuses to start.
pub async fn pin_manifest(redis: &Redis, manifest: &Manifest) -> Result<(), CoordinationError> {
    let key = run_key(&manifest.run_id, "manifest");
    let text = serde_json::to_string(manifest).expect("serializable");
    let unreachable =
        |e: redis::RedisError| CoordinationError::Unreachable { url: redis.url.shown.clone(), reason: e.to_string() };
    let mut conn = redis.conn.clone();
    let mut set = redis::cmd("SET");
    set.arg(&key).arg(&text).arg("NX").arg("EX").arg(MANIFEST_TTL_S);
    let pinned: Option<String> = set.query_async(&mut conn).await.map_err(unreachable)?;
    if pinned.is_some() {
        return Ok(());
    }
    let mut get = redis::cmd("GET");
    get.arg(&key);
    let found: Option<String> = get.query_async(&mut conn).await.map_err(unreachable)?;
    let Some(found) = found else { return Ok(()) };
    let difference = match serde_json::from_str::<Manifest>(&found) {
        Ok(pinned) => manifest.difference(&pinned),
        Err(_) => Some("manifest in Redis is not one this version of bulkcall wrote".into()),
    };
    match difference {
        None => Ok(()),
        Some(difference) => Err(CoordinationError::ManifestMismatch { run_id: manifest.run_id.clone(), difference }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_names_what_differs() {
        let run = Manifest {
            run_id: "r".into(),
            shards: 4,
            inputs: vec![("a.csv".into(), "aa".into()), ("b.csv".into(), "bb".into())],
            job: "jj".into(),
            limit: None,
        };
        assert_eq!(run.difference(&run.clone()), None);
        let other = Manifest { limit: Some(100), ..run.clone() };
        assert_eq!(other.difference(&run).unwrap(), "--limit is 100, the run's is none");
        let other = Manifest { shards: 3, ..run.clone() };
        assert_eq!(other.difference(&run).unwrap(), "shard count is 3, the run's is 4");
        let mut other = run.clone();
        other.inputs[1] = ("b.csv".into(), "cc".into());
        assert!(other.difference(&run).unwrap().starts_with("input b.csv differs"));
        let other = Manifest { job: "kk".into(), ..run.clone() };
        assert!(other.difference(&run).unwrap().starts_with("job spec differs"));
    }

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
