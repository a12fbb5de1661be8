//! The token cache on disk, so the next run (a cron job every five minutes)
//! reuses a still-valid token instead of asking for a new one.
//!
//! One file per token request (style, token URL, client id, the secret's
//! or key's fingerprint, scopes, audience, extra parameters), named by
//! [`super::request_key`], in a 0700 directory; files are 0600, written whole (temporary file,
//! fsync, rename). A file that others can read or that another user owns is
//! ignored with a warning. A lock file beside it makes two runs that refresh
//! at the same moment fetch one token between them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::AuthSettings;

/// How long a refresh waits for another process's lock on the cache
/// before it goes on without the cache: a token request, retries included,
/// takes far less; a process stopped with the lock held never lets go.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// A cached token as stored.
#[derive(Serialize, Deserialize)]
pub struct Entry {
    pub access_token: String,
    pub token_type: String,
    pub scope: Option<String>,
    /// Seconds since the Unix epoch.
    pub expires_at: f64,
    /// The lifetime the token was issued with, for its refresh windows.
    pub lifetime_s: f64,
}

impl Entry {
    pub fn expires_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(self.expires_at.max(0.0))
    }
}

pub struct DiskCache {
    dir: PathBuf,
    file: PathBuf,
    lock: PathBuf,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache").field("file", &self.file).finish()
    }
}

/// `auth.cache_dir`, else `$XDG_CACHE_HOME/bulkcall`, else `~/.cache/bulkcall`.
fn cache_dir(settings: &AuthSettings) -> Option<PathBuf> {
    if let Some(dir) = &settings.cache_dir {
        return Some(dir.clone());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("bulkcall"))
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether only this user can read `path` and owns it.
fn private(path: &Path, meta: &std::fs::Metadata, mask: u32) -> bool {
    if meta.uid() != current_uid() {
        tracing::warn!("ignoring {}: it belongs to another user", path.display());
        return false;
    }
    if meta.permissions().mode() & mask != 0 {
        tracing::warn!(
            "ignoring {}: other users can read it (mode {:o}); run `chmod go-rwx {}`",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        );
        return false;
    }
    true
}

impl DiskCache {
    /// The cache for these settings, or `None` when caching is off or there
    /// is no place for it. `key` is [`super::request_key`]: a token asked
    /// for with anything else (another secret, audience or parameter) is
    /// never reused.
    pub fn new(settings: &AuthSettings, key: &str) -> Option<DiskCache> {
        if !settings.cache {
            return None;
        }
        let dir = cache_dir(settings)?;
        Some(DiskCache { file: dir.join(format!("{key}.json")), lock: dir.join(format!("{key}.lock")), dir })
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    fn ensure_dir(&self) -> std::io::Result<bool> {
        match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = std::fs::metadata(&self.dir)?;
        Ok(private(&self.dir, &meta, 0o077))
    }

    /// Takes the cross-process refresh lock; it is released when the file
    /// is dropped. Blocking: call it off the async threads. `None` when the
    /// cache cannot be used, or when another process held the lock for
    /// [`LOCK_WAIT`] (a stopped process, say): then the caller goes on
    /// without the cache.
    pub fn lock(&self) -> Option<File> {
        self.lock_within(LOCK_WAIT)
    }

    fn lock_within(&self, wait: Duration) -> Option<File> {
        match self.ensure_dir() {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::warn!("token cache {} unusable: {e}", self.dir.display());
                return None;
            }
        }
        let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&self.lock);
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot lock {}: {e}", self.lock.display());
                return None;
            }
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Some(file),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    tracing::warn!(
                        "another process has held {} for {}; going on without the token cache",
                        self.lock.display(),
                        humantime::format_duration(wait)
                    );
                    return None;
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    tracing::warn!("cannot lock {}: {e}", self.lock.display());
                    return None;
                }
            }
        }
    }

    /// The cached entry, if there is a usable one.
    pub fn load(&self) -> Option<Entry> {
        let meta = std::fs::symlink_metadata(&self.file).ok()?;
        if !meta.is_file() || !private(&self.file, &meta, 0o077) {
            return None;
        }
        let text = std::fs::read(&self.file).ok()?;
        match serde_json::from_slice(&text) {
            Ok(entry) => Some(entry),
            Err(e) => {
                tracing::warn!("ignoring the unreadable token cache {}: {e}", self.file.display());
                None
            }
        }
    }

    /// Writes the entry whole: a temporary file (0600), fsync, rename.
    pub fn store(&self, entry: &Entry) {
        let result = (|| -> std::io::Result<()> {
            if !self.ensure_dir()? {
                return Ok(());
            }
            let tmp = self.file.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            file.write_all(&serde_json::to_vec(entry).expect("serializable"))?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.file)
        })();
        if let Err(e) = result {
            tracing::warn!("cannot write the token cache {}: {e}", self.file.display());
        }
    }

    /// Drops the cached token if it is `access_token` (a call got 401 with it).
    pub fn remove_if(&self, access_token: &str) {
        if self.load().is_some_and(|e| e.access_token == access_token) {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn cache(settings: &AuthSettings, client_id: &str, secret: &str) -> Option<DiskCache> {
        let credentials = crate::config::Credentials::secret(client_id.into(), secret.to_string().into());
        DiskCache::new(settings, &crate::token::request_key(settings, &credentials))
    }

    fn settings(dir: &Path) -> AuthSettings {
        AuthSettings {
            token_url: Some("https://idp.example.com/token".into()),
            scope: Some("b a".into()),
            cache_dir: Some(dir.join("cache")),
            ..AuthSettings::default()
        }
    }

    fn entry(token: &str) -> Entry {
        Entry {
            access_token: token.into(),
            token_type: "bearer".into(),
            scope: None,
            expires_at: 4e9,
            lifetime_s: 3600.0,
        }
    }

    #[test]
    fn stores_privately_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&settings(dir.path()), "client", "secret").unwrap();
        assert!(cache.load().is_none());
        cache.store(&entry("tok-1"));
        assert_eq!(cache.load().unwrap().access_token, "tok-1");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(cache.path()), 0o600);
        assert_eq!(mode(&dir.path().join("cache")), 0o700);

        cache.remove_if("another");
        assert!(cache.load().is_some(), "only the named token is dropped");
        cache.remove_if("tok-1");
        assert!(cache.load().is_none());
    }

    #[test]
    fn the_key_ignores_scope_order_but_not_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path());
        let a = cache(&s, "client", "secret").unwrap();
        s.scope = Some("a b".into());
        assert_eq!(cache(&s, "client", "secret").unwrap().path(), a.path());
        assert_ne!(cache(&s, "other", "secret").unwrap().path(), a.path());
        assert_ne!(cache(&s, "client", "rotated").unwrap().path(), a.path(), "another secret, another token");
        let differs = |change: &dyn Fn(&mut AuthSettings)| {
            let mut other = s.clone();
            change(&mut other);
            cache(&other, "client", "secret").unwrap().path() != a.path()
        };
        assert!(differs(&|o| o.audience = Some("https://fhir.example.com".into())), "audience");
        assert!(differs(&|o| _ = o.params.insert("resource".into(), "https://other".into())), "extra parameter");
        assert!(differs(&|o| o.style = crate::config::AuthStyle::Form), "style");
        assert!(differs(&|o| o.token_url = Some("https://idp.example.com/other".into())), "token URL");
        assert!(differs(&|o| o.scope = Some("a".into())), "scope");
        assert!(differs(&|o| o.assertion_audience = Some("https://idp.example.com".into())), "assertion audience");
        s.cache = false;
        assert!(cache(&s, "client", "secret").is_none());
    }

    #[test]
    fn a_lock_held_elsewhere_is_waited_for_a_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(cache(&settings(dir.path()), "client", "secret").unwrap());
        // Another holder, as a stopped process would be: flock locks of two
        // opens of one file exclude each other even in one process.
        let held = cache.lock().expect("a free lock is taken");
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = cache.clone();
        std::thread::spawn(move || tx.send(waiter.lock_within(Duration::from_millis(200)).is_some()));
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("the wait ends without the holder letting go");
        assert!(!got, "no lock while another holds it");
        drop(held);
        assert!(cache.lock_within(Duration::from_millis(200)).is_some(), "taken once it is free");
    }

    #[test]
    fn a_file_others_can_read_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&settings(dir.path()), "client", "secret").unwrap();
        cache.store(&entry("tok"));
        std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(cache.load().is_none());
    }
}
