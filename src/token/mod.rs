//! The one shared access token. Only this module calls the token endpoint.
//!
//! Every worker asks [`TokenSource::get`] before each attempt. The read path
//! is one atomic load and a clock comparison. A token has two windows
//! before its expiry, drawn once when it arrives:
//!
//! - advisory: one background refresh starts; workers keep the current token;
//! - mandatory: workers wait, all on the same single token request.
//!
//! A token is never handed out inside its mandatory window, so an expired
//! token is never sent. A 401 invalidates exactly the token that call used
//! (compare-and-swap on its generation), so many simultaneous 401s cause one
//! refresh. With `auth.cache` a still-valid token is shared with later runs
//! through [`DiskCache`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use rand::Rng as _;
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::time::Instant;

use crate::config::{AuthSettings, AuthStyle, Credentials, Proof};
use crate::events::{Event, Events};
use crate::outcome::{describe, parse_retry_after};

mod cache;
pub mod shared;
pub use cache::DiskCache;

use shared::SharedStore;

/// Token endpoint attempts for one refresh before giving up.
const FETCH_ATTEMPTS: u32 = 5;
/// The most of a token endpoint's answer that is read: a token answer is a
/// few KiB at most, and this one is held in memory.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Lifetimes outside this range are clamped.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// `from` names the profile and where the client id and its proof
    /// were read from (a variable's name, a file, a setting), never them.
    #[error("the token endpoint {url} rejected the credentials ({status}{error}); {}", rejected_advice(from))]
    Rejected { url: String, status: u16, error: String, from: String },
    /// Unreachable, or answering 5xx (or 408/429) through every attempt:
    /// exit 75, try again later.
    #[error(
        "the token endpoint {url} could not give a token after {attempts} attempts: {last}; \
         nothing is wrong with the credentials as far as bulkcall can tell: try again later"
    )]
    Unavailable { url: String, attempts: u32, last: String },
    /// A 3xx: never followed, it would carry the credentials elsewhere.
    #[error(
        "the token endpoint {url} answered {status} with a redirect to {location}; bulkcall never follows a \
         redirect with credentials: set auth.token_url to the endpoint itself"
    )]
    Redirected { url: String, status: u16, location: String },
    /// Another 4xx (404, 405, ...): the URL is not a token endpoint.
    #[error("the token endpoint {url} answered HTTP {status}{error}; check auth.token_url for this profile")]
    Refused { url: String, status: u16, error: String },
    #[error("the token endpoint {url} answered something that is not a usable token: {message}")]
    BadAnswer { url: String, message: String },
    #[error(transparent)]
    Certificate(#[from] crate::outcome::UntrustedCertificate),
    /// The server refused this client's TLS certificate, or wanted one and
    /// got none: exit 3, never retried.
    #[error("{0}")]
    ClientCertificate(String),
}

/// An access token and the moments that matter for it.
pub struct Token {
    /// `Bearer <token>`, built once, marked sensitive.
    header: HeaderValue,
    secret: SecretString,
    pub generation: u64,
    pub token_type: String,
    pub scope: Option<String>,
    pub expires_at: Instant,
    /// Wall-clock expiry, for display.
    pub expires_at_wall: SystemTime,
    pub lifetime: Duration,
    pub origin: Origin,
    advisory_at: Instant,
    mandatory_at: Instant,
}

/// Where a token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Fetched from the token endpoint by this process.
    Fetched,
    /// Read from the disk cache, written by an earlier run.
    Cache(std::path::PathBuf),
    /// Read from Redis, fetched by another process of the run.
    Shared,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Token {
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// The token itself, for `bulkcall token --print`.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

/// A token as stored, on disk or in Redis.
fn entry_of(token: &Token) -> cache::Entry {
    cache::Entry {
        access_token: token.expose().to_string(),
        token_type: token.token_type.clone(),
        scope: token.scope.clone(),
        expires_at: token.expires_at_wall.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
        lifetime_s: token.lifetime.as_secs_f64(),
    }
}

/// Where the advisory and mandatory windows start for a token that lives
/// `lifetime` from `sent`; `jitter` in [0, 1) is drawn once per token.
fn windows(sent: Instant, lifetime: Duration, refresh_before: Duration, jitter: f64) -> (Instant, Instant) {
    let advisory = refresh_before.min(lifetime / 2).mul_f64(0.75 + 0.25 * jitter);
    let mandatory = (advisory / 2).min(Duration::from_secs(30));
    let expires = sent + lifetime;
    (expires - advisory, expires - mandatory)
}

struct Inner {
    client: reqwest::Client,
    /// The runtime the source was made on: every token request runs there,
    /// whichever lane asks, so the token endpoint's connection lives on one
    /// thread that outlasts the lanes.
    home: tokio::runtime::Handle,
    url: String,
    /// The token URL as messages name it: no query, fragment or user info.
    shown: String,
    style: AuthStyle,
    credentials: Credentials,
    settings: AuthSettings,
    cache: Option<DiskCache>,
    /// The token shared through Redis; with it the disk cache is not used.
    shared: Option<SharedStore>,
    /// A token a call was refused with, to drop from the disk cache.
    rejected: std::sync::Mutex<Option<SecretString>>,
    /// The token workers use; swapped whole, read without a lock.
    current: ArcSwapOption<Token>,
    /// Held while a token request is in flight, so there is only ever one.
    fetching: tokio::sync::Mutex<()>,
    /// How many refreshes have ended, and the error the last one ended
    /// with: callers that waited behind a refresh that failed take its
    /// answer instead of asking again (one request, one answer).
    ended: std::sync::Mutex<(u64, Option<TokenError>)>,
    /// True while a background refresh task exists, so there is at most one.
    refreshing: AtomicBool,
    generation: AtomicU64,
    /// Token requests sent, for the summary.
    requests: AtomicU64,
    warned_no_expiry: AtomicBool,
    /// Where each refresh (and its failure) is told, and Redis lost and back.
    events: Events,
    /// Whether the last refresh found the shared token in Redis out of reach.
    shared_lost: AtomicBool,
}

/// The shared token; cheap to clone.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl TokenSource {
    /// Call it inside the runtime that token requests should run on.
    pub fn new(client: reqwest::Client, settings: &AuthSettings, credentials: Credentials) -> TokenSource {
        TokenSource {
            inner: Arc::new(Inner {
                home: tokio::runtime::Handle::current(),
                cache: DiskCache::new(settings, &request_key(settings, &credentials)),
                shared: None,
                rejected: std::sync::Mutex::new(None),
                client,
                url: settings.token_url.clone().unwrap_or_default(),
                shown: shown_url(settings.token_url.as_deref().unwrap_or_default()),
                style: settings.style,
                credentials,
                settings: settings.clone(),
                current: ArcSwapOption::empty(),
                fetching: tokio::sync::Mutex::new(()),
                ended: std::sync::Mutex::new((0, None)),
                refreshing: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                warned_no_expiry: AtomicBool::new(false),
                events: Events::default(),
                shared_lost: AtomicBool::new(false),
            }),
        }
    }

    /// Tells `events` of every refresh and of the shared token's Redis lost
    /// and back. Call it before the source is cloned.
    pub fn with_events(mut self, events: Events) -> TokenSource {
        Arc::get_mut(&mut self.inner).expect("not shared yet").events = events;
        self
    }

    /// Shares the token with every process that uses the same store.
    /// Call it before the source is cloned.
    pub fn with_shared(mut self, store: SharedStore) -> TokenSource {
        Arc::get_mut(&mut self.inner).expect("not shared yet").shared = Some(store);
        self
    }

    /// Token requests sent so far.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Time left on the current token, if there is one.
    pub fn time_left(&self) -> Option<Duration> {
        self.inner.current.load().as_ref().map(|t| t.expires_at.saturating_duration_since(Instant::now()))
    }

    /// A token that is valid now and will not expire in transit.
    pub async fn get(&self) -> Result<Arc<Token>, TokenError> {
        let seen = self.inner.current.load_full();
        if let Some(token) = &seen {
            let now = Instant::now();
            if now < token.advisory_at {
                return Ok(token.clone());
            }
            if now < token.mandatory_at {
                self.refresh_in_background(token.generation);
                return Ok(token.clone());
            }
        }
        self.inner.refresh_at_home(seen.map(|t| t.generation), false).await
    }

    /// A new token from the endpoint, whatever the cache holds (`token --refresh`).
    pub async fn get_fresh(&self) -> Result<Arc<Token>, TokenError> {
        self.inner.refresh_at_home(None, true).await
    }

    /// Forgets `generation` if it is still the current token: a call
    /// carrying it got a 401. Later generations are left alone, and the
    /// disk cache drops the token too.
    pub fn invalidate(&self, generation: u64) {
        let current = self.inner.current.load_full();
        let Some(token) = current.as_ref().filter(|t| t.generation == generation) else { return };
        let previous = self.inner.current.compare_and_swap(&current, None::<Arc<Token>>);
        let swapped = previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, token));
        if swapped && (self.inner.cache.is_some() || self.inner.shared.is_some()) {
            // The next refresh drops it from the disk cache too.
            *self.inner.rejected.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(SecretString::from(token.expose().to_string()));
        }
    }

    fn refresh_in_background(&self, generation: u64) {
        if self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        self.inner.home.spawn(async move {
            if let Err(e) = inner.refresh(Some(generation), false).await {
                // The current token stays in use until its mandatory window;
                // wait before the next background try.
                let left = inner
                    .current
                    .load()
                    .as_ref()
                    .map_or(Duration::ZERO, |t| t.mandatory_at.saturating_duration_since(Instant::now()));
                let pause = (left / 3).min(Duration::from_secs(30)).mul_f64(rand::rng().random_range(0.5..1.0));
                tracing::warn!("background token refresh failed, keeping the current token: {e}");
                tokio::time::sleep(pause).await;
            }
            inner.refreshing.store(false, Ordering::Release);
        });
    }
}

impl Inner {
    /// [`Inner::refresh`] on the home runtime. A caller that gives up
    /// waiting leaves the request to finish for the others.
    async fn refresh_at_home(self: &Arc<Self>, seen: Option<u64>, force: bool) -> Result<Arc<Token>, TokenError> {
        let inner = self.clone();
        match self.home.spawn(async move { inner.refresh(seen, force).await }).await {
            Ok(result) => result,
            Err(e) => Err(TokenError::Unavailable {
                url: self.shown.clone(),
                attempts: 0,
                last: format!("the token request's task ended early ({e})"),
            }),
        }
    }

    /// Replaces the token, unless another task already replaced the one
    /// the caller saw (`seen`), in which case that newer token is returned.
    /// With a disk cache, another run's newer token is adopted instead of
    /// fetching; `force` fetches regardless.
    async fn refresh(self: &Arc<Self>, seen: Option<u64>, force: bool) -> Result<Arc<Token>, TokenError> {
        let ended = |inner: &Self| inner.ended.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let before = ended(self).0;
        let _guard = self.fetching.lock().await;
        // A refresh ended while this caller waited: a new token is taken
        // below; a failure is this caller's answer too.
        if let (count, Some(error)) = ended(self)
            && count > before
            && !force
        {
            return Err(error);
        }
        let result = self.refresh_locked(seen, force).await;
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        *ended = (ended.0 + 1, result.as_ref().err().cloned());
        result
    }

    /// [`Inner::refresh`] with the `fetching` lock held.
    async fn refresh_locked(self: &Arc<Self>, seen: Option<u64>, force: bool) -> Result<Arc<Token>, TokenError> {
        let current = self.current.load_full();
        if let Some(token) = &current
            && !force
            && Some(token.generation) != seen
            && Instant::now() < token.mandatory_at
        {
            return Ok(token.clone());
        }
        // Why this refresh: the first token of the process is no event.
        let how = match &current {
            _ if force => "forced",
            Some(token) if Instant::now() < token.mandatory_at => "background",
            Some(_) => "waiting",
            None if self.generation.load(Ordering::Relaxed) == 0 => "first",
            None => "after_401",
        };
        let obtained = self.obtain(current.as_deref(), force).await;
        if how != "first" {
            self.events.emit(match &obtained {
                Ok(token) => {
                    Event::TokenRefresh { how, origin: token.origin.word(), lifetime_s: token.lifetime.as_secs() }
                }
                Err(e) => Event::TokenRefreshFailed { how, error: e.kind() },
            });
        }
        let token = Arc::new(obtained?);
        self.current.store(Some(token.clone()));
        Ok(token)
    }

    /// A new token: adopted from the disk cache or Redis, or fetched.
    async fn obtain(self: &Arc<Self>, current: Option<&Token>, force: bool) -> Result<Token, TokenError> {
        let token = match &self.cache {
            _ if self.shared.is_some() => self.refresh_shared(current, force).await?,
            None => self.fetch().await?,
            Some(cache) => {
                // File work goes to the blocking pool: the async thread
                // serves every worker. The lock is held until this function
                // returns: one fetch across processes. Without the lock
                // (another process kept it too long) the cache is left alone.
                let inner = self.clone();
                let rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner()).take();
                let (lock, entry) = tokio::task::spawn_blocking(move || {
                    let cache = inner.cache.as_ref().expect("a cache");
                    let Some(lock) = cache.lock() else { return (None, None) };
                    if let Some(rejected) = &rejected {
                        cache.remove_if(rejected.expose_secret());
                    }
                    (Some(lock), cache.load())
                })
                .await
                .unwrap_or((None, None));
                match self.adopt_cached(cache, entry, current, force) {
                    Some(token) => token,
                    None if lock.is_none() => self.fetch().await?,
                    None => {
                        let token = self.fetch().await?;
                        let entry = entry_of(&token);
                        let inner = self.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            if let Some(cache) = &inner.cache {
                                cache.store(&entry);
                            }
                        })
                        .await;
                        token
                    }
                }
            }
        };
        Ok(token)
    }

    /// A refresh through Redis, single-flight across hosts: adopt the token
    /// another process stored, or take the lock, read again, fetch, store,
    /// release. Without Redis, this process fetches its own.
    async fn refresh_shared(self: &Arc<Self>, current: Option<&Token>, force: bool) -> Result<Token, TokenError> {
        let shared = self.shared.as_ref().expect("a shared store");
        let alone = |e: String| {
            tracing::warn!("the shared token in Redis is out of reach ({e}): fetching one for this process");
            if !self.shared_lost.swap(true, Ordering::Relaxed) {
                self.events.emit(Event::RedisLost { part: "token" });
            }
        };
        let rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(rejected) = &rejected
            && let Err(e) = shared.remove_if(rejected.expose_secret()).await
        {
            alone(e);
            return self.fetch().await;
        }
        loop {
            match shared.load().await {
                Ok(entry) => {
                    if self.shared_lost.swap(false, Ordering::Relaxed) {
                        self.events.emit(Event::RedisBack { part: "token" });
                    }
                    if let Some(token) = self.adopt_entry(entry, current, force, Origin::Shared) {
                        return Ok(token);
                    }
                }
                Err(e) => {
                    alone(e);
                    return self.fetch().await;
                }
            }
            match shared.try_lock().await {
                Ok(Some(lock)) => {
                    // Another process may have stored one just before.
                    if let Ok(entry) = shared.load().await
                        && let Some(token) = self.adopt_entry(entry, current, force, Origin::Shared)
                    {
                        shared.unlock(&lock).await;
                        return Ok(token);
                    }
                    // The lock stays ours while the endpoint takes its time
                    // (retries included); it lapses only if this process dies.
                    let renewing = async {
                        loop {
                            tokio::time::sleep(shared::LOCK_RENEW_EVERY).await;
                            match shared.renew(&lock).await {
                                Ok(true) => {}
                                // Lapsed (this process stalled, or Redis restarted):
                                // another process may fetch too; harmless, but said.
                                Ok(false) => tracing::debug!("the token refresh lock in Redis lapsed during the fetch"),
                                Err(e) => tracing::debug!("could not renew the token refresh lock in Redis: {e}"),
                            }
                        }
                    };
                    let fetched = tokio::select! {
                        fetched = self.fetch() => fetched,
                        _ = renewing => unreachable!("renewing never ends"),
                    };
                    if let Ok(token) = &fetched
                        && let Err(e) = shared.store(&entry_of(token)).await
                    {
                        tracing::warn!("could not share the new token through Redis: {e}");
                    }
                    shared.unlock(&lock).await;
                    return fetched;
                }
                // Another process is fetching: wait for its token. A live
                // holder keeps the lock until its fetch ends (bounded by its
                // attempts and timeouts), a dead one's lapses within 10 s.
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    alone(e);
                    return self.fetch().await;
                }
            }
        }
    }

    /// A token from the disk cache that is not the one being replaced and
    /// has time left: before its advisory window when replacing a token,
    /// before its mandatory window when there is none.
    fn adopt_cached(
        &self,
        cache: &DiskCache,
        entry: Option<cache::Entry>,
        current: Option<&Token>,
        force: bool,
    ) -> Option<Token> {
        self.adopt_entry(entry, current, force, Origin::Cache(cache.path().into()))
    }

    /// A stored token (disk cache or Redis), on the same terms.
    fn adopt_entry(
        &self,
        entry: Option<cache::Entry>,
        current: Option<&Token>,
        force: bool,
        origin: Origin,
    ) -> Option<Token> {
        if force {
            return None;
        }
        let entry = entry?;
        if current.is_some_and(|t| t.expose() == entry.access_token) {
            return None;
        }
        let left = entry.expires_at().duration_since(SystemTime::now()).ok()?;
        let lifetime = Duration::from_secs_f64(entry.lifetime_s.max(0.0)).clamp(MIN_LIFETIME, MAX_LIFETIME).max(left);
        let now = Instant::now();
        let sent = (now + left).checked_sub(lifetime)?;
        let token = self
            .make_token(&entry.access_token, &entry.token_type, entry.scope.clone(), sent, lifetime, origin)
            .ok()?;
        let usable_until = if current.is_some() { token.advisory_at } else { token.mandatory_at };
        (now < usable_until).then(|| {
            tracing::debug!(generation = token.generation, origin = ?token.origin, "reusing a stored token");
            token
        })
    }

    /// A token with its refresh windows, jitter drawn once.
    fn make_token(
        &self,
        access: &str,
        token_type: &str,
        scope: Option<String>,
        sent: Instant,
        lifetime: Duration,
        origin: Origin,
    ) -> Result<Token, String> {
        let (advisory_at, mandatory_at) =
            windows(sent, lifetime, self.settings.refresh_before, rand::rng().random_range(0.0..1.0));
        let mut header = HeaderValue::from_str(&format!("Bearer {access}"))
            .map_err(|_| "the access token holds characters that cannot be sent in a header".to_string())?;
        header.set_sensitive(true);
        let expires_in = (sent + lifetime).saturating_duration_since(Instant::now());
        Ok(Token {
            header,
            secret: SecretString::from(access.to_string()),
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            token_type: token_type.to_string(),
            scope,
            expires_at: sent + lifetime,
            expires_at_wall: SystemTime::now() + expires_in,
            lifetime,
            origin,
            advisory_at,
            mandatory_at,
        })
    }

    /// Asks the token endpoint, retrying transient failures with backoff.
    async fn fetch(&self) -> Result<Token, TokenError> {
        let mut last = String::new();
        for attempt in 1..=FETCH_ATTEMPTS {
            match self.fetch_once().await {
                Ok(token) => return Ok(token),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Transient { message, retry_after }) => {
                    tracing::warn!("token request {attempt}/{FETCH_ATTEMPTS} to {} failed: {message}", self.shown);
                    last = message;
                    if attempt < FETCH_ATTEMPTS {
                        let backoff = Duration::from_millis(250 << attempt.min(6))
                            .min(Duration::from_secs(10))
                            .mul_f64(rand::rng().random_range(0.5..1.0));
                        tokio::time::sleep(retry_after.unwrap_or(backoff).min(Duration::from_secs(60))).await;
                    }
                }
            }
        }
        Err(TokenError::Unavailable { url: self.shown.clone(), attempts: FETCH_ATTEMPTS, last })
    }

    async fn fetch_once(&self) -> Result<Token, Attempt> {
        let s = &self.settings;
        let c = &self.credentials;
        let secret = c.client_secret().unwrap_or_default();
        // Signed anew for every request, retries included: a jti is never reused.
        let assertion = match &c.proof {
            Proof::Key(key) => {
                let audience = s.assertion_audience.as_deref().unwrap_or(&self.url);
                let signed = key.assertion(&c.client_id, audience, s.assertion_lifetime);
                Some(
                    signed
                        .map_err(|m| Attempt::Fatal(TokenError::BadAnswer { url: self.shown.clone(), message: m }))?,
                )
            }
            _ => None,
        };
        let mut fields: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        match self.style {
            AuthStyle::Json | AuthStyle::Form | AuthStyle::None => {
                fields.push(("client_id", &c.client_id));
                fields.push(("client_secret", secret));
            }
            AuthStyle::Basic => {}
            AuthStyle::PrivateKeyJwt => {
                fields.push(("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"));
                fields.push(("client_assertion", assertion.as_deref().unwrap_or_default()));
            }
            AuthStyle::TlsClientAuth => fields.push(("client_id", &c.client_id)),
        }
        if let Some(scope) = &s.scope {
            fields.push(("scope", scope));
        }
        if let Some(audience) = &s.audience {
            fields.push(("audience", audience));
        }
        fields.extend(s.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));

        let mut request = self.client.post(&self.url).header(reqwest::header::ACCEPT, "application/json");
        request = match self.style {
            AuthStyle::Json => {
                let body: serde_json::Map<String, Value> =
                    fields.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
                request.json(&body)
            }
            AuthStyle::Form | AuthStyle::None | AuthStyle::PrivateKeyJwt | AuthStyle::TlsClientAuth => {
                request.form(&fields)
            }
            AuthStyle::Basic => request.basic_auth(form_encode(&c.client_id), Some(form_encode(secret))).form(&fields),
        };

        let sent = Instant::now();
        let sent_wall = SystemTime::now();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = request.send().await.map_err(|e| {
            let message = self.mask(&describe(&e));
            if crate::outcome::untrusted_certificate(&e) {
                let url = self.shown.clone();
                Attempt::Fatal(crate::outcome::UntrustedCertificate { url, detail: message }.into())
            } else if let Some(alert) = refused_certificate(&e) {
                let cert = self.credentials.client_cert.as_deref();
                Attempt::Fatal(TokenError::client_certificate(&self.shown, "the token endpoint", cert, &alert))
            } else {
                Attempt::Transient { message, retry_after: None }
            }
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        if status.is_redirection() {
            let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok());
            return Err(Attempt::Fatal(TokenError::Redirected {
                url: self.shown.clone(),
                status: status.as_u16(),
                location: location_origin(&self.url, location),
            }));
        }
        let body = self.read_answer(response).await?;
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        let oauth_error = json.as_ref().and_then(|j| j.get("error")).and_then(Value::as_str).map(str::to_string);
        let description = json
            .as_ref()
            .and_then(|j| j.get("error_description"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());

        if !status.is_success() {
            let fatal_error = matches!(
                oauth_error.as_deref(),
                Some(
                    "invalid_client"
                        | "invalid_grant"
                        | "invalid_scope"
                        | "unauthorized_client"
                        | "unsupported_grant_type"
                )
            );
            let shown = match &oauth_error {
                Some(e) => format!(" {}: {}", self.mask(e), self.mask(&description)),
                None => format!(": {}", self.mask(&description)),
            };
            let code = status.as_u16();
            if fatal_error || matches!(code, 400 | 401 | 403) {
                return Err(Attempt::Fatal(TokenError::Rejected {
                    url: self.shown.clone(),
                    status: code,
                    error: shown,
                    from: self.credentials.from.to_string(),
                }));
            }
            if status.is_client_error() && !matches!(code, 408 | 425 | 429) {
                return Err(Attempt::Fatal(TokenError::Refused {
                    url: self.shown.clone(),
                    status: code,
                    error: shown,
                }));
            }
            return Err(Attempt::Transient { message: format!("HTTP {code}{shown}"), retry_after });
        }
        let bad =
            |message: &str| Attempt::Fatal(TokenError::BadAnswer { url: self.shown.clone(), message: message.into() });
        let json = json.ok_or_else(|| bad("the body is not JSON"))?;
        let access = json.get("access_token").and_then(Value::as_str).filter(|t| !t.is_empty());
        let access = access.ok_or_else(|| bad("no access_token in the answer"))?;
        let token_type = json.get("token_type").and_then(Value::as_str).unwrap_or("Bearer");
        if !token_type.eq_ignore_ascii_case("bearer") {
            return Err(bad(&format!("token_type `{token_type}` is not supported; bulkcall sends Bearer tokens")));
        }
        let lifetime = self.lifetime(&json, access, sent_wall);
        let scope = json.get("scope").and_then(Value::as_str).map(str::to_string);
        let token = self.make_token(access, token_type, scope, sent, lifetime, Origin::Fetched).map_err(|m| bad(&m))?;
        tracing::debug!(generation = token.generation, lifetime_s = lifetime.as_secs_f64(), "got a token");
        Ok(token)
    }

    /// The answer's body, [`MAX_ANSWER_BYTES`] at most: a longer one is not
    /// a token answer, and is not read further.
    async fn read_answer(&self, mut response: reqwest::Response) -> Result<Vec<u8>, Attempt> {
        let too_long = || {
            Attempt::Fatal(TokenError::BadAnswer {
                url: self.shown.clone(),
                message: format!("the answer is longer than {} KiB", MAX_ANSWER_BYTES / 1024),
            })
        };
        if response.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
            return Err(too_long());
        }
        let mut body = Vec::new();
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|e| Attempt::Transient { message: self.mask(&describe(&e)), retry_after: None })?;
            let Some(chunk) = chunk else { return Ok(body) };
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(too_long());
            }
            body.extend_from_slice(&chunk);
        }
    }

    /// `expires_in` (an integer or a numeric string), clamped; the
    /// configured default when absent; a JWT's `exp` when it comes sooner.
    fn lifetime(&self, json: &Value, access: &str, sent: SystemTime) -> Duration {
        let expires_in = match json.get("expires_in") {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        let mut lifetime = match expires_in {
            Some(secs) if secs.is_finite() => Duration::from_secs_f64(secs.max(0.0).min(MAX_LIFETIME.as_secs_f64())),
            _ => {
                if !self.warned_no_expiry.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the token endpoint {} gave no expires_in; assuming tokens live {} (auth.default_lifetime)",
                        self.shown,
                        humantime::format_duration(self.settings.default_lifetime)
                    );
                }
                self.settings.default_lifetime
            }
        };
        if let Some(jwt) = jwt_lifetime(access, sent) {
            lifetime = lifetime.min(jwt);
        }
        lifetime.clamp(MIN_LIFETIME, MAX_LIFETIME)
    }

    /// Masks the secret wherever a token endpoint echoes it (as is, JSON-
    /// escaped or form-encoded), then trims the text.
    fn mask(&self, text: &str) -> String {
        let secret = self.credentials.client_secret().unwrap_or_default();
        let mut text = text.to_string();
        if !secret.is_empty() {
            let escaped = serde_json::to_string(secret).unwrap_or_default();
            let escaped = escaped.trim_matches('"');
            for form in [secret, escaped, &form_encode(secret)] {
                if !form.is_empty() {
                    text = text.replace(form, "***");
                }
            }
        }
        let text: String = text.chars().take(300).collect();
        text.trim().to_string()
    }
}

enum Attempt {
    Fatal(TokenError),
    Transient { message: String, retry_after: Option<Duration> },
}

/// RFC 6749 §2.3.1: client id and secret are form-encoded before Basic.
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Origin {
    /// The origin as events name it.
    pub fn word(&self) -> &'static str {
        match self {
            Origin::Fetched => "fetched",
            Origin::Cache(_) => "cache",
            Origin::Shared => "shared",
        }
    }
}

/// What to check when the credentials are rejected: where they came from.
fn rejected_advice(from: &str) -> String {
    if from.is_empty() {
        "check the client id and secret for this profile".into()
    } else {
        format!("{from}: check that these hold this environment's credentials")
    }
}

impl TokenError {
    /// The kind of failure in one word, for events (never the message:
    /// it may quote the token endpoint's answer).
    pub fn kind(&self) -> &'static str {
        match self {
            TokenError::Rejected { .. } => "rejected",
            TokenError::Unavailable { .. } => "unavailable",
            TokenError::Redirected { .. } => "redirected",
            TokenError::Refused { .. } => "refused",
            TokenError::BadAnswer { .. } => "bad_answer",
            TokenError::Certificate(_) => "certificate",
            TokenError::ClientCertificate(_) => "client_certificate",
        }
    }

    /// `server` (the token endpoint or the API, at `url`) refused the
    /// client certificate `cert` (or wanted one and none is configured).
    pub fn client_certificate(url: &str, server: &str, cert: Option<&std::path::Path>, alert: &str) -> TokenError {
        TokenError::ClientCertificate(match cert {
            Some(cert) => format!(
                "{server} {url} refused the client certificate {} in the TLS handshake ({alert}): check that \
                 tls.client_cert is the certificate registered for this client, signed by a CA the server trusts",
                cert.display()
            ),
            None => format!(
                "{server} {url} asks for a client certificate ({alert}) and no client certificate is configured: \
                 set tls.client_cert and tls.client_key"
            ),
        })
    }
}

/// The TLS alert a server refused this client's certificate with, if
/// that is how the request failed.
pub fn refused_certificate(e: &reqwest::Error) -> Option<String> {
    refused_alert(e, &crate::outcome::describe(e))
}

/// [`refused_certificate`] of any error, `text` its description.
pub(crate) fn refused_alert(e: &(dyn std::error::Error + 'static), text: &str) -> Option<String> {
    use tokio_rustls::rustls::{AlertDescription as Alert, Error as Tls};
    for s in crate::outcome::causes(e) {
        if let Some(Tls::AlertReceived(alert)) = s.downcast_ref::<Tls>()
            && matches!(
                alert,
                Alert::BadCertificate
                    | Alert::CertificateRequired
                    | Alert::UnknownCA
                    | Alert::CertificateUnknown
                    | Alert::UnsupportedCertificate
                    | Alert::CertificateRevoked
                    | Alert::CertificateExpired
                    | Alert::AccessDenied
            )
        {
            return Some(format!("TLS alert {alert:?}"));
        }
    }
    // The alert as its text, when a layer between kept only that.
    let (_, alert) = text.split_once("received fatal alert: ")?;
    let alert: String = alert.chars().take_while(char::is_ascii_alphanumeric).collect();
    [
        "BadCertificate",
        "CertificateRequired",
        "UnknownCA",
        "CertificateUnknown",
        "UnsupportedCertificate",
        "CertificateRevoked",
        "CertificateExpired",
        "AccessDenied",
    ]
    .contains(&alert.as_str())
    .then(|| format!("TLS alert {alert}"))
}

/// A token URL as messages show it: scheme, host, port and path; a query,
/// a fragment or user info in it may hold a key, and stays out of logs.
pub fn shown_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            let hidden = url.query().is_some() || url.fragment().is_some();
            url.set_query(None);
            url.set_fragment(None);
            let _ = url.set_username("");
            let _ = url.set_password(None);
            if hidden { format!("{url}?...") } else { url.to_string() }
        }
        Err(_) => "(the configured auth.token_url)".into(),
    }
}

/// Where a redirect points, by its origin alone (a relative Location is
/// read against the token URL).
fn location_origin(token_url: &str, location: Option<&str>) -> String {
    let Some(location) = location else { return "nowhere (no Location header)".into() };
    match url::Url::parse(token_url).and_then(|base| base.join(location)) {
        Ok(url) => url.origin().ascii_serialization(),
        Err(_) => "a Location that is not a URL".into(),
    }
}

/// What a token is requested with, hashed: the disk cache's file name and
/// the shared token's Redis key. Every token-request parameter is in it, so
/// a token for another resource, scope, client or credential is never
/// reused; scopes are sorted, as their order means nothing.
pub fn request_key(settings: &AuthSettings, credentials: &Credentials) -> String {
    use sha2::Digest as _;
    let mut scopes: Vec<&str> = settings.scope.as_deref().unwrap_or("").split_whitespace().collect();
    scopes.sort_unstable();
    let style = serde_json::to_string(&settings.style).unwrap_or_default();
    let mut parts: Vec<(&str, String)> = vec![
        ("style", style),
        ("token_url", settings.token_url.clone().unwrap_or_default()),
        ("client_id", credentials.client_id.clone()),
        ("proof", credentials.fingerprint()),
        ("scope", scopes.join(" ")),
        ("audience", settings.audience.clone().unwrap_or_default()),
        ("assertion_audience", settings.assertion_audience.clone().unwrap_or_default()),
    ];
    parts.extend(settings.params.iter().map(|(k, v)| ("param", format!("{k}={v}"))));
    let mut hasher = sha2::Sha256::new();
    for (name, value) in &parts {
        // Length-prefixed: no two lists of parts hash alike.
        for bytes in [name.as_bytes(), value.as_bytes()] {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
    }
    hasher.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// How long a JWT lives, if the token is one with an `exp` claim: `exp -
/// iat` when it has both, which no clock skew between this host and the
/// issuer can shorten; else `exp` against the local clock from `sent`.
fn jwt_lifetime(token: &str, sent: SystemTime) -> Option<Duration> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims = serde_json::from_slice::<Value>(&bytes).ok()?;
    let time = |name: &str| {
        let secs = claims.get(name)?.as_f64()?;
        Duration::try_from_secs_f64(secs).ok().filter(|d| !d.is_zero())
    };
    let exp = time("exp")?;
    match time("iat") {
        Some(iat) => Some(exp.saturating_sub(iat)),
        None => Some(SystemTime::UNIX_EPOCH.checked_add(exp)?.duration_since(sent).unwrap_or(Duration::ZERO)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_capped_at_half_the_lifetime() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let (advisory, mandatory) = windows(t0, hour, Duration::from_secs(300), 1.0);
        assert_eq!(t0 + hour - advisory, Duration::from_secs(300));
        assert_eq!(t0 + hour - mandatory, Duration::from_secs(30));
        let (advisory, _) = windows(t0, hour, Duration::from_secs(300), 0.0);
        assert_eq!(t0 + hour - advisory, Duration::from_secs(225), "jitter shortens the window by up to a quarter");

        let two = Duration::from_secs(2);
        let (advisory, mandatory) = windows(t0, two, Duration::from_secs(300), 1.0);
        assert_eq!(t0 + two - advisory, Duration::from_secs(1), "never more than half the lifetime");
        assert_eq!(t0 + two - mandatory, Duration::from_millis(500));
        assert!(mandatory > advisory && mandatory < t0 + two);
    }

    #[test]
    fn a_jwt_lives_exp_minus_iat_whatever_the_local_clock_says() {
        let jwt = |claims: &str| format!("eyJhbGciOiJub25lIn0.{}.sig", URL_SAFE_NO_PAD.encode(claims));
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_999_999_000);
        // Issued and expiring long ago by this host's clock (the issuer's
        // clock is ahead, or this one behind): still a 5-minute token.
        let skewed = jwt(r#"{"iat": 1000000000, "exp": 1000000300}"#);
        assert_eq!(jwt_lifetime(&skewed, now), Some(Duration::from_secs(300)));
        let early = jwt(r#"{"iat": 2100000000, "exp": 2100003600}"#);
        assert_eq!(jwt_lifetime(&early, now), Some(Duration::from_secs(3600)), "an issuer clock behind ours");
        let exp_only = jwt(r#"{"exp": 2000000000}"#);
        assert_eq!(jwt_lifetime(&exp_only, now), Some(Duration::from_secs(1000)), "without iat: exp from now");
        assert_eq!(jwt_lifetime("opaque-token", now), None);
        assert_eq!(jwt_lifetime(&jwt(r#"{"iat": 1}"#), now), None, "no exp, no JWT lifetime");
        assert_eq!(jwt_lifetime(&jwt(r#"{"exp": 1e300}"#), now), None, "an absurd exp is ignored, never a panic");
        assert_eq!(jwt_lifetime("a.b.c.d", now), None);
    }
}
