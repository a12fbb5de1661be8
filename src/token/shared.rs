//! The token shared by every process of a run, through Redis: one token
//! request per token lifetime however many hosts ask.
//!
//! The token is stored under a key derived from every token-request
//! parameter ([`super::request_key`]: style, token URL, client id, the
//! secret's or key's fingerprint, scope, audience, extra parameters), encrypted with AES-256-GCM under
//! a key that never reaches Redis (`BULKCALL_TOKEN_KEY` or
//! `auth.shared_key_file`), with a TTL that ends before the token does.
//! A refresh is single-flight across hosts: `SET lock NX PX`, read again,
//! fetch, write, and delete the lock only if it is still ours; a process
//! that dies holding the lock releases it through the lock's expiry.

use std::time::{Duration, SystemTime};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rand::Rng as _;

use super::cache::Entry;
use crate::config::{AuthSettings, ConfigError};
use crate::coordination::{ROUND_TRIP_TIMEOUT, Redis};

/// The environment variable holding the key (64 hex characters).
pub const KEY_VARIABLE: &str = "BULKCALL_TOKEN_KEY";
/// How long the refresh lock lives if its holder dies; a live holder
/// renews it every [`LOCK_RENEW_EVERY`] until its fetch ends, however long
/// the token endpoint takes.
const LOCK_TTL: Duration = Duration::from_secs(10);
pub const LOCK_RENEW_EVERY: Duration = Duration::from_secs(3);

/// The key the shared token is encrypted with: `BULKCALL_TOKEN_KEY`, or
/// the file `auth.shared_key_file`; `None` when neither is there.
pub fn load_key(settings: &AuthSettings) -> Result<Option<[u8; 32]>, ConfigError> {
    let (text, from) = match (std::env::var(KEY_VARIABLE), &settings.shared_key_file) {
        (Ok(text), _) => (text, KEY_VARIABLE.to_string()),
        (Err(_), Some(path)) => (
            std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Value(format!("auth.shared_key_file {}: {e}", path.display())))?,
            format!("auth.shared_key_file {}", path.display()),
        ),
        (Err(_), None) => return Ok(None),
    };
    let text = text.trim();
    let bad = || ConfigError::Value(format!("{from} must be 64 hex characters (as `openssl rand -hex 32` prints)"));
    if text.len() != 64 || !text.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(Some(key))
}

/// Where the shared token lives, and the key it is sealed with.
pub struct SharedStore {
    redis: Redis,
    key: String,
    lock_key: String,
    cipher: Aes256Gcm,
}

/// A value read from Redis: the token, and the exact text stored, for a
/// compare-and-delete.
struct Read {
    entry: Entry,
    raw: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SharedStore {
    /// `id` is [`super::request_key`]; `key` seals the token.
    pub fn new(redis: Redis, id: &str, key: [u8; 32]) -> SharedStore {
        SharedStore {
            redis,
            key: format!("bulkcall:token:{id}"),
            lock_key: format!("bulkcall:token:{id}:lock"),
            cipher: Aes256Gcm::new_from_slice(&key).expect("a 32-byte key"),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        let mut conn = self.redis.conn.clone();
        match tokio::time::timeout(ROUND_TRIP_TIMEOUT, cmd.query_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 1s".into()),
        }
    }

    fn seal(&self, entry: &Entry) -> String {
        let mut nonce = [0u8; 12];
        rand::rng().fill(&mut nonce);
        let plain = serde_json::to_vec(entry).expect("serializable");
        let sealed = self
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: &plain, aad: self.key.as_bytes() })
            .expect("encryption does not fail");
        let mut bytes = nonce.to_vec();
        bytes.extend(sealed);
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn open(&self, raw: &str) -> Option<Entry> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
        if bytes.len() < 12 {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(12);
        let nonce = Nonce::try_from(nonce).ok()?;
        let plain = self.cipher.decrypt(&nonce, Payload { msg: sealed, aad: self.key.as_bytes() }).ok()?;
        serde_json::from_slice(&plain).ok()
    }

    async fn read(&self) -> Result<Option<Read>, String> {
        let raw: Option<String> = self.query(redis::cmd("GET").arg(&self.key)).await?;
        let Some(raw) = raw else { return Ok(None) };
        match self.open(&raw) {
            Some(entry) => Ok(Some(Read { entry, raw })),
            None => {
                tracing::warn!(
                    "the shared token in Redis cannot be decrypted with this key: is {KEY_VARIABLE} the same on every host?"
                );
                Ok(None)
            }
        }
    }

    /// The token other processes stored, if any.
    pub async fn load(&self) -> Result<Option<Entry>, String> {
        Ok(self.read().await?.map(|r| r.entry))
    }

    /// Stores a token, to expire from Redis before it expires itself.
    pub async fn store(&self, entry: &Entry) -> Result<(), String> {
        let left = entry.expires_at().duration_since(SystemTime::now()).unwrap_or_default();
        let ttl = left.saturating_sub((left / 4).min(Duration::from_secs(60)));
        if ttl < Duration::from_secs(1) {
            return Ok(());
        }
        let value = self.seal(entry);
        self.query::<()>(redis::cmd("SET").arg(&self.key).arg(value).arg("PX").arg(ttl.as_millis() as u64)).await
    }

    /// A call was refused with `access_token`: it goes, unless another
    /// process already replaced it.
    pub async fn remove_if(&self, access_token: &str) -> Result<(), String> {
        let Some(read) = self.read().await? else { return Ok(()) };
        if read.entry.access_token == access_token {
            self.compare_and_delete(&self.key, &read.raw).await?;
        }
        Ok(())
    }

    /// Takes the refresh lock if nobody holds it: the lock's own value.
    pub async fn try_lock(&self) -> Result<Option<String>, String> {
        let id = hex(&rand::rng().random::<[u8; 16]>());
        let mut set = redis::cmd("SET");
        set.arg(&self.lock_key).arg(&id).arg("NX").arg("PX").arg(LOCK_TTL.as_millis() as u64);
        let taken: Option<String> = self.query(&set).await?;
        Ok(taken.map(|_| id))
    }

    /// Renews the lock for another [`LOCK_TTL`] if it is still ours:
    /// whether it was.
    pub async fn renew(&self, id: &str) -> Result<bool, String> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
        )
        .arg(1)
        .arg(&self.lock_key)
        .arg(id)
        .arg(LOCK_TTL.as_millis() as u64);
        self.query::<i64>(&eval).await.map(|renewed| renewed == 1)
    }

    /// Releases the lock if it is still ours (it may have expired and gone
    /// to another process).
    pub async fn unlock(&self, id: &str) {
        let _ = self.compare_and_delete(&self.lock_key, id).await;
    }

    async fn compare_and_delete(&self, key: &str, value: &str) -> Result<(), String> {
        let mut eval = redis::cmd("EVAL");
        eval.arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
            .arg(1)
            .arg(key)
            .arg(value);
        self.query::<i64>(&eval).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_64_hex_characters() {
        let settings = AuthSettings::default();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, format!("{}\n", "ab".repeat(32))).unwrap();
        let from_file = AuthSettings { shared_key_file: Some(file.clone()), ..settings.clone() };
        if std::env::var(KEY_VARIABLE).is_err() {
            assert_eq!(load_key(&from_file).unwrap(), Some([0xab; 32]));
            assert_eq!(load_key(&settings).unwrap(), None);
            std::fs::write(&file, "abc").unwrap();
            let err = load_key(&from_file).unwrap_err().to_string();
            assert!(err.contains("64 hex characters"), "{err}");
        }
    }
}
