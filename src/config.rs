//! Configuration: figment sources in precedence order → one resolved, validated
//! [`Settings`] with nothing left to decide on the hot path.
//!
//! Precedence, lowest first: built-in defaults < config file `[default]` <
//! the selected profile < the job spec's run settings < `BULKCALL_*`
//! environment variables < command-line flags.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Profile, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::key::warn_if_readable_by_others;

/// The config file used when none is given and it exists.
pub const DEFAULT_CONFIG: &str = "config/bulkcall.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("profile `{profile}` is not defined in {file} (profiles there: {known})")]
    UnknownProfile { profile: String, file: String, known: String },
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Value(String),
    #[error(
        "{what} is `{url}`: bulkcall only sends credentials and PHI over https, except to loopback hosts; \
         use an https:// URL or set allow_http = true"
    )]
    InsecureUrl { what: &'static str, url: String },
    /// `profile` is ` for profile `sandbox`` once known, else empty.
    #[error("no client {what}{profile}: set the environment variable {var}{hint}")]
    MissingCredential { what: &'static str, var: String, hint: &'static str, profile: String },
    #[error(
        "auth.token_url is not set for profile `{profile}`{file}: name the token endpoint there, \
         or set auth.style = \"none\" for an API without OAuth"
    )]
    NoTokenUrl { profile: String, file: String },
    #[error(
        "no config file: looked for {DEFAULT_CONFIG} in {cwd}; name one with -c FILE or BULKCALL_CONFIG \
         (profile `{profile}` was asked for)"
    )]
    NoConfigFile { profile: String, cwd: String },
    #[error("could not read the client secret file {path}: {source}")]
    SecretFile { path: PathBuf, source: std::io::Error },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Invalid(Box::new(e))
    }
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthStyle {
    /// A JSON body with `client_id`, `client_secret` and `grant_type` (Optum).
    Json,
    /// An `application/x-www-form-urlencoded` body (RFC 6749 §2.3.1).
    Form,
    /// HTTP Basic client authentication with a form body (RFC 6749 §2.3.1).
    Basic,
    /// An RFC 7523 client assertion signed with the client's private key
    /// (SMART Backend Services); no secret.
    #[serde(rename = "private_key_jwt")]
    PrivateKeyJwt,
    /// RFC 8705 mutual TLS: the client certificate proves the client, the
    /// form body carries `client_id`; no secret.
    #[serde(rename = "tls_client_auth")]
    TlsClientAuth,
    /// No token: calls are sent without Authorization.
    None,
}

/// Token endpoint settings as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub style: AuthStyle,
    pub token_url: Option<String>,
    /// A client id is not secret and may sit in the config file.
    pub client_id: Option<String>,
    pub client_id_env: String,
    pub client_secret_env: String,
    pub client_secret_file: Option<PathBuf>,
    /// Allowed, but a config file that others can read earns a warning.
    #[serde(skip_serializing)]
    pub client_secret: Option<SecretString>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// Extra fields sent in the token request body.
    pub params: BTreeMap<String, String>,
    #[serde(with = "humantime_serde")]
    pub refresh_before: Duration,
    /// The token lifetime assumed when the answer has no `expires_in`.
    #[serde(with = "humantime_serde")]
    pub default_lifetime: Duration,
    pub cache: bool,
    pub cache_dir: Option<PathBuf>,
    /// The key (64 hex characters) the token shared in Redis is encrypted
    /// with, when `BULKCALL_TOKEN_KEY` is not set.
    pub shared_key_file: Option<PathBuf>,
    /// `private_key_jwt`: the PEM private key (PKCS#8, RSA or EC P-256/P-384).
    pub private_key_file: Option<PathBuf>,
    /// `private_key_jwt`: the variable holding the PEM private key instead.
    pub private_key_env: Option<String>,
    /// The assertion header's `kid`, as registered; default the key's RFC
    /// 7638 thumbprint (what `bulkcall jwks` prints).
    pub key_id: Option<String>,
    /// RS256 | RS384 | RS512 | ES256 | ES384; default RS384 for RSA, ES256
    /// for P-256, ES384 for P-384.
    pub algorithm: Option<String>,
    /// The assertion's `aud`; default the token URL as configured.
    pub assertion_audience: Option<String>,
    /// How long an assertion is valid (`exp - iat`), five minutes at most.
    #[serde(with = "humantime_serde")]
    pub assertion_lifetime: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            style: AuthStyle::Json,
            token_url: None,
            client_id: None,
            client_id_env: "BULKCALL_CLIENT_ID".into(),
            client_secret_env: "BULKCALL_CLIENT_SECRET".into(),
            client_secret_file: None,
            client_secret: None,
            scope: None,
            audience: None,
            params: BTreeMap::new(),
            refresh_before: Duration::from_secs(300),
            default_lifetime: Duration::from_secs(600),
            cache: true,
            cache_dir: None,
            shared_key_file: None,
            private_key_file: None,
            private_key_env: None,
            key_id: None,
            algorithm: None,
            assertion_audience: None,
            assertion_lifetime: Duration::from_secs(240),
        }
    }
}

/// Every setting a run needs, resolved from all sources.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub base_url: Option<String>,
    pub allow_http: bool,
    pub concurrency: usize,
    /// Requests per second across all workers, every attempt counted; 0 = unlimited.
    pub rate: f64,
    pub burst: u32,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub max_attempts: u32,
    /// Statuses retried (besides connection errors and timeouts).
    pub retry_on: Vec<u16>,
    /// Base of the exponential backoff for transient errors.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Base of the exponential backoff after a 429 without Retry-After.
    #[serde(with = "humantime_serde")]
    pub throttle_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A Retry-After longer than this stops the run (exit 75), to resume later.
    #[serde(with = "humantime_serde")]
    pub retry_after_max: Duration,
    /// Calls failing at the transport level (or answered 502/503/504) this
    /// long with no other answer stop the run (exit 75); zero: never.
    #[serde(with = "humantime_serde")]
    pub outage_after: Duration,
    /// Retries each first attempt earns (besides ten a second): when many
    /// calls fail at once, rows beyond it fail without another attempt.
    pub retry_budget: f64,
    pub headers: BTreeMap<String, String>,
    pub max_response_bytes: usize,
    /// Root certificates (PEM) trusted besides the built-in ones: a gateway
    /// behind a private CA or a TLS-inspecting proxy.
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS (and `tls.ca_file`, the same as `ca_file`).
    pub tls: TlsSettings,
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// Where run directories go: `<out_dir>/<job>/<timestamp>/`.
    pub out_dir: PathBuf,
    pub auth: AuthSettings,
    pub coordination: CoordinationSettings,
    pub metrics: MetricsSettings,
}

/// Where the run's metrics go (Prometheus text format; see `metrics`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// A file for node_exporter's textfile collector, rewritten atomically
    /// every 10 s and at the end.
    pub file: Option<PathBuf>,
    /// Where `GET /metrics` is served while the run lasts.
    pub listen: Option<std::net::SocketAddr>,
    /// A Pushgateway's URL: the final figures are pushed there.
    pub push: Option<String>,
}

/// TLS towards the token endpoint and every call.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// Root certificates (PEM) trusted besides the built-in ones; `ca_file`
    /// says the same.
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM): a secret, kept 0600.
    pub client_key: Option<PathBuf>,
    /// The variable holding the client key's PEM instead of a file.
    pub client_key_env: Option<String>,
}

/// Where the processes of a run split over several hosts meet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinationSettings {
    /// `redis://` or `rediss://` (also `BULKCALL_REDIS_URL`): one rate limit
    /// and one token for every process of a run. A password in it is a
    /// secret: never shown, never written to run.json.
    #[serde(skip_serializing)]
    pub redis_url: Option<SecretString>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            base_url: None,
            allow_http: false,
            concurrency: 8,
            rate: 20.0,
            burst: 5,
            timeout: Duration::from_secs(30),
            max_attempts: 5,
            retry_on: vec![408, 425, 429, 500, 502, 503, 504],
            backoff_base: Duration::from_millis(100),
            throttle_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(20),
            retry_after_max: Duration::from_secs(300),
            outage_after: Duration::from_secs(30),
            retry_budget: 0.2,
            headers: BTreeMap::new(),
            max_response_bytes: 1 << 20,
            ca_file: None,
            tls: TlsSettings::default(),
            progress_interval: Duration::from_secs(30),
            out_dir: PathBuf::from("out"),
            auth: AuthSettings::default(),
            coordination: CoordinationSettings::default(),
            metrics: MetricsSettings::default(),
        }
    }
}

/// Where the settings come from, besides the built-in defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `--config`; when `None`, [`DEFAULT_CONFIG`] is read if it exists.
    pub config_file: Option<PathBuf>,
    /// `--profile`; `None` selects `[default]` alone.
    pub profile: Option<String>,
    /// Run settings from the job spec.
    pub job: serde_json::Map<String, serde_json::Value>,
    /// Command-line flags that were given.
    pub flags: serde_json::Map<String, serde_json::Value>,
    /// Read `BULKCALL_*` variables (tests turn this off).
    pub env: bool,
    /// Read no config file at all, not even the default one.
    pub no_config: bool,
}

/// JSON settings as TOML values for figment. Converted explicitly: with
/// serde_json's `arbitrary_precision` a JSON number serializes as a private
/// map. A `null` is left out, as if not given.
fn plain(map: &serde_json::Map<String, serde_json::Value>) -> toml::Table {
    fn value(v: &serde_json::Value) -> Option<toml::Value> {
        use serde_json::Value as J;
        Some(match v {
            J::Null => return None,
            J::Bool(b) => toml::Value::Boolean(*b),
            J::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => toml::Value::Integer(i),
                (None, Some(f)) => toml::Value::Float(f),
                (None, None) => toml::Value::String(n.to_string()),
            },
            J::String(s) => toml::Value::String(s.clone()),
            J::Array(items) => toml::Value::Array(items.iter().filter_map(value).collect()),
            J::Object(map) => toml::Value::Table(plain(map)),
        })
    }
    map.iter().filter_map(|(k, v)| Some((k.clone(), value(v)?))).collect()
}

/// The result of loading: settings plus where they came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub config_file: Option<PathBuf>,
    pub profile: String,
    /// Where `auth.client_id` and `auth.client_secret` were set, when they
    /// were: `[local] of config/bulkcall.toml`, `the environment variable
    /// BULKCALL_AUTH__CLIENT_SECRET`.
    pub set_in: BTreeMap<&'static str, String>,
}

impl Loaded {
    /// [`Settings::credentials`], saying where each was read from: the
    /// profile, and the config file's table or the variable that set a
    /// setting.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        let mut credentials = self.settings.credentials().map_err(|e| match e {
            ConfigError::MissingCredential { what, var, hint, .. } => {
                ConfigError::MissingCredential { what, var, hint, profile: format!(" for profile `{}`", self.profile) }
            }
            e => e,
        })?;
        let from = &mut credentials.from;
        from.profile = Some(self.profile.clone());
        for from in from.id.iter_mut().chain(from.proof.iter_mut().map(|(_, f)| f)) {
            if let CredentialFrom::Setting { key, place } = from {
                *place = self.set_in.get(key).cloned();
            }
        }
        Ok(credentials)
    }

    /// The token endpoint, which a run that sends calls with a token needs.
    pub fn token_url(&self) -> Result<&str, ConfigError> {
        self.settings.auth.token_url.as_deref().ok_or_else(|| ConfigError::NoTokenUrl {
            profile: self.profile.clone(),
            file: self
                .config_file
                .as_ref()
                .map_or_else(|| " (no config file)".into(), |f| format!(" in {}", f.display())),
        })
    }
}

impl Sources {
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let config_file = match &self.config_file {
            _ if self.no_config => None,
            Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.clone())),
            Some(path) => Some(path.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
        };
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        let mut known = vec![];
        let mut tables = figment::value::Map::new();
        if let Some(path) = &config_file {
            let file = Toml::file_exact(path).nested();
            // Parse now, so a TOML error is reported as such (with its line).
            tables = file.data()?;
            known = tables.keys().map(|p| p.as_str().to_string()).collect();
            figment = figment.merge(file);
        }
        let profile = self.profile.clone().unwrap_or_else(|| "default".into());
        if profile != "default" && config_file.is_none() {
            let cwd = std::env::current_dir().map_or_else(|_| ".".into(), |d| d.display().to_string());
            return Err(ConfigError::NoConfigFile { profile, cwd });
        }
        if profile != "default" && !known.iter().any(|k| k.eq_ignore_ascii_case(&profile)) {
            return Err(ConfigError::UnknownProfile {
                profile,
                file: config_file.map_or_else(|| "(no config file)".into(), |p| p.display().to_string()),
                known: known.into_iter().filter(|k| k != "default").collect::<Vec<_>>().join(", "),
            });
        }
        figment = figment.merge(Serialized::globals(plain(&self.job)));
        if self.env {
            figment = figment.merge(
                Env::prefixed("BULKCALL_")
                    .ignore(&["profile", "config", "client_id", "client_secret", "log", "redis_url", "token_key"])
                    .split("__")
                    .global(),
            );
            figment = figment
                .merge(Env::raw().only(&["BULKCALL_REDIS_URL"]).map(|_| "coordination.redis_url".into()).global());
        }
        figment = figment.merge(Serialized::globals(plain(&self.flags)));
        let figment = figment.select(Profile::new(&profile));
        let settings: Settings = figment.extract().map_err(|e| placed(e, config_file.as_deref()))?;
        let set_in = ["auth.client_id", "auth.client_secret"]
            .into_iter()
            .filter_map(|key| Some((key, set_in(&figment, &tables, &profile, key)?)))
            .collect();
        settings.validate()?;
        let loopback_idp =
            settings.auth.token_url.as_deref().and_then(|u| url::Url::parse(u).ok()).is_some_and(|u| is_loopback(&u));
        if settings.auth.client_secret.is_some()
            && !loopback_idp
            && let Some(path) = &config_file
        {
            warn_if_readable_by_others(path, "a client secret");
        }
        Ok(Loaded { settings, config_file, profile, set_in })
    }
}

/// Where `key` got its value, if it has one and a file or the environment
/// set it: `[local] of config/bulkcall.toml`, `the environment variable
/// BULKCALL_AUTH__CLIENT_SECRET`.
/// `tables` are the config file's tables, by profile.
fn set_in(
    figment: &Figment,
    tables: &figment::value::Map<Profile, figment::value::Dict>,
    profile: &str,
    key: &str,
) -> Option<String> {
    let tag = figment.find_value(key).ok()?.tag();
    let metadata = figment.get_metadata(tag)?;
    match &metadata.source {
        Some(figment::Source::File(path)) => {
            let shown = std::env::current_dir()
                .ok()
                .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
                .unwrap_or_else(|| path.clone());
            // The selected profile's table wins over [default]'s.
            let has = |table: &str| {
                let dict = tables.get(&Profile::new(table))?;
                let mut parts = key.split('.');
                let mut value = dict.get(parts.next()?)?;
                for part in parts {
                    value = value.as_dict()?.get(part)?;
                }
                Some(value)
            };
            let table = [profile, "default"].into_iter().find(|t| has(t).is_some());
            Some(match table {
                Some(table) => format!("[{table}] of {}", shown.display()),
                None => shown.display().to_string(),
            })
        }
        _ if metadata.name.contains("environment") => {
            Some(format!("the environment variable BULKCALL_{}", key.to_uppercase().replace('.', "__")))
        }
        _ => None,
    }
}

/// A setting the config file got wrong, named by its line and column there
/// (figment names the key and the file, not where in it).
fn placed(e: figment::Error, config_file: Option<&Path>) -> ConfigError {
    let from_env = e.metadata.as_ref().is_some_and(|m| m.name.contains("environment"));
    if let (true, figment::error::Kind::UnknownField(field, expected)) = (from_env, &e.kind) {
        return unknown_variable(&e.path, field, expected);
    }
    let from_file = e.metadata.as_ref().and_then(|m| m.source.as_ref()).and_then(|s| s.file_path());
    let place = match (config_file, from_file) {
        (Some(file), Some(from)) if std::path::absolute(file).ok().as_deref() == Some(from) || file == from => {
            let keys: Vec<&str> =
                e.profile.iter().map(|p| p.as_str().as_str()).chain(e.path.iter().map(String::as_str)).collect();
            std::fs::read_to_string(file)
                .ok()
                .and_then(|text| locate(&text, &keys))
                .map(|(line, column)| (file, line, column))
        }
        _ => None,
    };
    match place {
        Some((file, line, column)) => {
            ConfigError::Value(format!("{} line {line}, column {column}: {e}", file.display()))
        }
        None => ConfigError::Invalid(Box::new(e)),
    }
}

/// A `BULKCALL_` environment variable that names no setting (a typo, or
/// one meant for something else): named whole, with the nearest setting.
fn unknown_variable(path: &[String], field: &str, expected: &[&str]) -> ConfigError {
    // `BULKCALL_`, or `BULKCALL_AUTH__` for a setting in [auth].
    let prefix: String = path
        .iter()
        .take_while(|p| *p != field)
        .fold("BULKCALL_".to_string(), |prefix, table| prefix + &table.to_uppercase() + "__");
    let nearest = expected
        .iter()
        .map(|name| (strsim::damerau_levenshtein(field, name), *name))
        .filter(|(distance, name)| *distance <= 2.max(name.len() / 3))
        .min();
    let hint = match nearest {
        Some((_, name)) => format!(" (did you mean {prefix}{}?)", name.to_uppercase()),
        None => String::new(),
    };
    ConfigError::Value(format!(
        "the environment variable {prefix}{} names no setting{hint}: unset it, or rename it {prefix}<SETTING> for one of {}",
        field.to_uppercase(),
        expected.join(", "),
    ))
}

/// Where `keys` (a table path, such as `default`, `auth`, `style`) are set
/// in a TOML text: the last key's line and column, from 1.
fn locate(text: &str, keys: &[&str]) -> Option<(usize, usize)> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut at = None;
    for (i, key) in keys.iter().enumerate() {
        let (name, value) = table.get_key_value(*key)?;
        at = Some(name.span().start);
        if i + 1 < keys.len() {
            table = value.get_ref().as_table()?;
        }
    }
    let at = at?;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    Some((text[..at].matches('\n').count() + 1, text[line_start..at].chars().count() + 1))
}

impl Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Value(msg));
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1".into());
        }
        if self.burst == 0 {
            return bad("burst must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1 (the first attempt counts)".into());
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            return bad(format!("rate must be a number of requests per second, 0 for unlimited; got {}", self.rate));
        }
        if self.timeout.is_zero() {
            return bad("timeout must be longer than 0".into());
        }
        if self.progress_interval.is_zero() {
            return bad("progress_interval must be longer than 0".into());
        }
        if let Some(base) = &self.base_url {
            self.check_url("base_url", base)?;
        }
        if let Some(url) = &self.auth.token_url {
            self.check_url("auth.token_url", url)?;
        }
        if let Some(push) = &self.metrics.push {
            // Figures only, no PHI: plain http to a Pushgateway in the cluster is fine.
            match url::Url::parse(push) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                _ => return bad(format!("metrics.push `{push}` is not an http:// or https:// URL")),
            }
        }
        let lifetime = self.auth.assertion_lifetime;
        if lifetime < Duration::from_secs(1) || lifetime > crate::key::MAX_ASSERTION_LIFETIME {
            return bad(format!(
                "auth.assertion_lifetime is {}: a client assertion lives from 1s to 5m",
                humantime::format_duration(lifetime)
            ));
        }
        let tls = &self.tls;
        if tls.client_cert.is_some() != (tls.client_key.is_some() || tls.client_key_env.is_some()) {
            return bad("tls.client_cert and tls.client_key (or tls.client_key_env) go together".into());
        }
        if let (Some(a), Some(b)) = (&self.ca_file, &tls.ca_file)
            && a != b
        {
            return bad("ca_file and tls.ca_file name different files: keep one".into());
        }
        match self.auth.style {
            AuthStyle::TlsClientAuth if tls.client_cert.is_none() => {
                bad("auth.style = \"tls_client_auth\" needs tls.client_cert and tls.client_key".into())
            }
            AuthStyle::PrivateKeyJwt if self.auth.private_key_file.is_none() && self.auth.private_key_env.is_none() => {
                bad("auth.style = \"private_key_jwt\" needs auth.private_key_file or auth.private_key_env".into())
            }
            _ => Ok(()),
        }
    }

    /// The file of trusted roots: `ca_file` or `tls.ca_file`.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref().or(self.tls.ca_file.as_deref())
    }

    /// The client certificate and key, concatenated PEM, for mutual TLS.
    pub fn client_identity(&self) -> Result<Option<(PathBuf, SecretString)>, ConfigError> {
        let Some(cert) = &self.tls.client_cert else { return Ok(None) };
        let read = |path: &Path, what: &str| {
            std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Value(format!("cannot read the {what} {}: {e}", path.display())))
        };
        let mut pem = read(cert, "client certificate (tls.client_cert)")?;
        let key = match (&self.tls.client_key, &self.tls.client_key_env) {
            (Some(path), _) => {
                warn_if_readable_by_others(path, "a private key");
                read(path, "client key (tls.client_key)")?
            }
            (None, Some(var)) => std::env::var(var).map_err(|_| ConfigError::MissingCredential {
                what: "certificate key",
                var: var.clone(),
                hint: " (tls.client_key_env)",
                profile: String::new(),
            })?,
            (None, None) => unreachable!("validated: a client certificate has a key"),
        };
        if !pem.ends_with('\n') {
            pem.push('\n');
        }
        pem.push_str(&key);
        Ok(Some((cert.clone(), SecretString::from(pem))))
    }

    /// `https://` is required unless the host is loopback or `allow_http` is set.
    pub fn check_url(&self, what: &'static str, raw: &str) -> Result<url::Url, ConfigError> {
        let url = url::Url::parse(raw).map_err(|e| ConfigError::Value(format!("{what} `{raw}` is not a URL: {e}")))?;
        match url.scheme() {
            "https" => Ok(url),
            "http" if self.allow_http || is_loopback(&url) => Ok(url),
            "http" => Err(ConfigError::InsecureUrl { what, url: raw.to_string() }),
            other => Err(ConfigError::Value(format!("{what} `{raw}` has scheme `{other}`; use https://"))),
        }
    }
}

/// Whether a header's name says it carries a credential (an API key, a
/// token, a cookie): its value is kept out of run.json and dry-run output.
pub fn is_sensitive_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name != "idempotency-key"
        && ["auth", "key", "token", "secret", "cookie", "password", "signature"].iter().any(|w| name.contains(w))
}

/// `127.0.0.0/8`, `::1` and `localhost`.
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// The client credentials, read from where the settings say.
pub struct Credentials {
    pub client_id: String,
    pub proof: Proof,
    /// `tls.client_cert`, to name in a message when a server refuses it.
    pub client_cert: Option<PathBuf>,
    /// Where the client id and its proof were read from, to name when the
    /// token endpoint rejects them (never their values).
    pub from: CredentialsFrom,
}

/// Where a run's credentials come from: the profile, and for the client id
/// and its proof the variable, file or setting each was read from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialsFrom {
    /// The profile the settings were read for; `None` when not from a config.
    pub profile: Option<String>,
    pub id: Option<CredentialFrom>,
    /// What proves the client (`client secret`, `private key`, `client
    /// certificate`) and where it was read from.
    pub proof: Option<(&'static str, CredentialFrom)>,
}

/// Where one credential was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialFrom {
    /// An environment variable, by its name.
    Env(String),
    /// A file (`auth.client_secret_file`, `auth.private_key_file`, `tls.client_cert`), and the setting naming it.
    File { path: PathBuf, setting: &'static str },
    /// A setting itself (`auth.client_id`, `auth.client_secret`), and where
    /// it was set when known: `[local] of config/bulkcall.toml`.
    Setting { key: &'static str, place: Option<String> },
}

impl std::fmt::Display for CredentialFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialFrom::Env(var) => write!(f, "the environment variable {var}"),
            CredentialFrom::File { path, setting } => write!(f, "the file {} ({setting})", path.display()),
            CredentialFrom::Setting { key, place: Some(place) } => write!(f, "{key} in {place}"),
            CredentialFrom::Setting { key, place: None } => write!(f, "{key}"),
        }
    }
}

impl std::fmt::Display for CredentialsFrom {
    /// `profile `local`: client id from auth.client_id in [local] of
    /// config/bulkcall.toml, client secret from the environment variable
    /// BULKCALL_CLIENT_SECRET`; empty when nothing is known.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = vec![];
        if let Some(id) = &self.id {
            parts.push(format!("client id from {id}"));
        }
        if let Some((what, from)) = &self.proof {
            parts.push(format!("{what} from {from}"));
        }
        match &self.profile {
            Some(profile) if parts.is_empty() => write!(f, "profile `{profile}`"),
            Some(profile) => write!(f, "profile `{profile}`: {}", parts.join(", ")),
            None => write!(f, "{}", parts.join(", ")),
        }
    }
}

/// What proves the client at the token endpoint.
pub enum Proof {
    /// `json`, `form`, `basic`.
    Secret(SecretString),
    /// `private_key_jwt`: the key that signs each assertion.
    Key(std::sync::Arc<crate::key::SigningKey>),
    /// `tls_client_auth`: the client certificate does, in the handshake;
    /// its SHA-256, for the token cache's key.
    Certificate(String),
}

impl Credentials {
    pub fn secret(client_id: String, client_secret: SecretString) -> Credentials {
        Credentials {
            client_id,
            proof: Proof::Secret(client_secret),
            client_cert: None,
            from: CredentialsFrom::default(),
        }
    }

    /// The client secret, for the styles that send one.
    pub fn client_secret(&self) -> Option<&str> {
        match &self.proof {
            Proof::Secret(s) => Some(s.expose_secret()),
            _ => None,
        }
    }

    /// What proves the client, as a hash that shows nothing of it: the
    /// token cache and the shared token are keyed by it (a key's RFC 7638
    /// thumbprint, a certificate's SHA-256, a secret's SHA-256).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        match &self.proof {
            Proof::Secret(s) => format!("secret:{}", hex(&sha2::Sha256::digest(s.expose_secret().as_bytes()))),
            Proof::Key(key) => format!("jwk:{}", key.thumbprint()),
            Proof::Certificate(hash) => format!("certificate:{hash}"),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

impl Settings {
    /// Reads the client id and what proves the client, as the style asks.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        let mut credentials = self.auth.credentials_with(&self.tls)?;
        credentials.client_cert = self.tls.client_cert.clone();
        Ok(credentials)
    }
}

impl AuthSettings {
    /// Reads the client id and its proof: for a secret, the environment
    /// first, then the secret file, then the config file; for a key, the
    /// key file or variable; for mutual TLS, the client certificate.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        self.credentials_with(&TlsSettings::default())
    }

    /// [`AuthSettings::credentials`], with the client certificate `tls`
    /// names for `tls_client_auth`.
    pub fn credentials_with(&self, tls: &TlsSettings) -> Result<Credentials, ConfigError> {
        let from_env = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
        let setting = |key| CredentialFrom::Setting { key, place: None };
        let (client_id, id_from) = match (from_env(&self.client_id_env), &self.client_id) {
            (Some(id), _) => (id, CredentialFrom::Env(self.client_id_env.clone())),
            (None, Some(id)) => (id.clone(), setting("auth.client_id")),
            (None, None) => {
                return Err(ConfigError::MissingCredential {
                    what: "id",
                    var: self.client_id_env.clone(),
                    hint: " (or auth.client_id in the profile)",
                    profile: String::new(),
                });
            }
        };
        let from =
            |what, proof| CredentialsFrom { profile: None, id: Some(id_from.clone()), proof: Some((what, proof)) };
        let keyed = matches!(self.style, AuthStyle::PrivateKeyJwt | AuthStyle::TlsClientAuth);
        if keyed
            && (from_env(&self.client_secret_env).is_some()
                || self.client_secret.is_some()
                || self.client_secret_file.is_some())
        {
            tracing::warn!(
                "a client secret is set ({} or auth.client_secret) but auth.style = {:?} sends none: it is ignored",
                self.client_secret_env,
                self.style
            );
        }
        match self.style {
            AuthStyle::PrivateKeyJwt => {
                let key = self.signing_key()?.ok_or_else(|| {
                    ConfigError::Value(
                        "auth.style = \"private_key_jwt\" needs auth.private_key_file or auth.private_key_env".into(),
                    )
                })?;
                let key_from = match (&self.private_key_file, &self.private_key_env) {
                    (Some(path), _) => CredentialFrom::File { path: path.clone(), setting: "auth.private_key_file" },
                    (None, var) => CredentialFrom::Env(var.clone().unwrap_or_default()),
                };
                return Ok(Credentials {
                    client_id,
                    proof: Proof::Key(std::sync::Arc::new(key)),
                    client_cert: None,
                    from: from("private key", key_from),
                });
            }
            AuthStyle::TlsClientAuth => {
                use sha2::Digest as _;
                let cert = tls.client_cert.as_ref().ok_or_else(|| {
                    ConfigError::Value(
                        "auth.style = \"tls_client_auth\" needs tls.client_cert and tls.client_key".into(),
                    )
                })?;
                let pem = std::fs::read(cert).map_err(|e| {
                    ConfigError::Value(format!("cannot read the client certificate {}: {e}", cert.display()))
                })?;
                let hash = sha2::Sha256::digest(&pem).iter().map(|b| format!("{b:02x}")).collect();
                let cert_from = CredentialFrom::File { path: cert.clone(), setting: "tls.client_cert" };
                return Ok(Credentials {
                    client_id,
                    proof: Proof::Certificate(hash),
                    client_cert: None,
                    from: from("client certificate", cert_from),
                });
            }
            _ => {}
        }
        let (secret, secret_from) = match from_env(&self.client_secret_env) {
            Some(s) => (s, CredentialFrom::Env(self.client_secret_env.clone())),
            None => match (&self.client_secret_file, &self.client_secret) {
                (Some(path), _) => (
                    std::fs::read_to_string(path)
                        .map_err(|source| ConfigError::SecretFile { path: path.clone(), source })?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                    CredentialFrom::File { path: path.clone(), setting: "auth.client_secret_file" },
                ),
                (None, Some(s)) => (s.expose_secret().to_string(), setting("auth.client_secret")),
                (None, None) => {
                    return Err(ConfigError::MissingCredential {
                        what: "secret",
                        var: self.client_secret_env.clone(),
                        hint: " (or auth.client_secret_file in the profile)",
                        profile: String::new(),
                    });
                }
            },
        };
        let mut credentials = Credentials::secret(client_id, SecretString::from(secret));
        credentials.from = from("client secret", secret_from);
        Ok(credentials)
    }

    /// The private key `private_key_file` or `private_key_env` names, if any.
    pub fn signing_key(&self) -> Result<Option<crate::key::SigningKey>, ConfigError> {
        use crate::key::SigningKey;
        let (algorithm, kid) = (self.algorithm.as_deref(), self.key_id.as_deref());
        let key = match (&self.private_key_file, &self.private_key_env) {
            (Some(path), _) => SigningKey::from_file(path, algorithm, kid),
            (None, Some(var)) => match std::env::var(var) {
                Ok(pem) => SigningKey::from_pem(pem.as_bytes(), &format!("the variable {var}"), algorithm, kid),
                Err(_) => {
                    return Err(ConfigError::MissingCredential {
                        what: "private key",
                        var: var.clone(),
                        hint: " (auth.private_key_env; or auth.private_key_file)",
                        profile: String::new(),
                    });
                }
            },
            (None, None) => return Ok(None),
        };
        key.map(Some).map_err(ConfigError::Value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const CONFIG: &str = r#"
        [default]
        concurrency = 4
        rate = 10
        [default.auth]
        style = "form"
        token_url = "https://idp.example.com/token"

        [sandbox]
        base_url = "https://sandbox.example.com"
        rate = 30
        headers.environment = "sandbox"
        auth.client_id_env = "SANDBOX_ID"
    "#;

    #[test]
    fn profile_overrides_default_and_job_and_flags_override_profile() {
        let file = config_file(CONFIG);
        let mut sources = Sources {
            config_file: Some(file.path().to_path_buf()),
            profile: Some("sandbox".into()),
            ..Default::default()
        };
        let loaded = sources.load().unwrap();
        let s = &loaded.settings;
        assert_eq!(s.concurrency, 4, "from [default]");
        assert_eq!(s.rate, 30.0, "profile beats [default]");
        assert_eq!(s.auth.style, AuthStyle::Form, "nested [default.auth] kept");
        assert_eq!(s.auth.client_id_env, "SANDBOX_ID");
        assert_eq!(s.headers["environment"], "sandbox");
        assert_eq!(s.burst, 5, "built-in default");

        sources.job.insert("rate".into(), 50.into());
        sources.job.insert("concurrency".into(), 2.into());
        sources.flags.insert("rate".into(), 70.into());
        let s = sources.load().unwrap().settings;
        assert_eq!(s.concurrency, 2, "job beats profile");
        assert_eq!(s.rate, 70.0, "flag beats job");
    }

    #[test]
    fn a_secret_in_the_file_never_shows_in_debug_output() {
        let file = config_file(
            "[default]\nauth.token_url = \"https://idp.example.com/t\"\nauth.client_id = \"id\"\nauth.client_secret = \"hunter2-abc\"\n",
        );
        let sources = Sources { config_file: Some(file.path().to_path_buf()), ..Default::default() };
        let settings = sources.load().unwrap().settings;
        assert!(!format!("{settings:?}").contains("hunter2-abc"));
        assert!(!serde_json::to_string(&settings).unwrap().contains("hunter2-abc"));
        let credentials = settings.credentials().unwrap();
        assert!(!format!("{credentials:?}").contains("hunter2-abc"));
        assert_eq!(credentials.client_secret(), Some("hunter2-abc"));
    }

    #[test]
    fn unknown_profile_names_the_known_ones() {
        let file = config_file(CONFIG);
        let sources = Sources {
            config_file: Some(file.path().to_path_buf()),
            profile: Some("prod".into()),
            ..Default::default()
        };
        let err = sources.load().unwrap_err().to_string();
        assert!(err.contains("`prod`") && err.contains("sandbox"), "{err}");
    }

    #[test]
    fn http_is_refused_except_on_loopback() {
        let file = config_file(
            "[default]\nbase_url = \"http://api.example.com\"\nauth.token_url = \"http://127.0.0.1:9/token\"\n",
        );
        let sources = Sources { config_file: Some(file.path().to_path_buf()), ..Default::default() };
        let err = sources.load().unwrap_err();
        assert!(matches!(err, ConfigError::InsecureUrl { what: "base_url", .. }), "{err}");

        let file =
            config_file("[default]\nbase_url = \"http://localhost:8787\"\nauth.token_url = \"http://[::1]:9/token\"\n");
        let sources = Sources { config_file: Some(file.path().to_path_buf()), ..Default::default() };
        sources.load().unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let file = config_file("[default]\nauth.style = \"none\"\ntimeout = \"soon\"\n");
        let sources = Sources { config_file: Some(file.path().to_path_buf()), ..Default::default() };
        let err = sources.load().unwrap_err().to_string();
        assert!(err.contains("timeout"), "{err}");

        let file = config_file("[default]\nauth.style = \"none\"\nrate = 1\nrate = 2\n");
        let sources = Sources { config_file: Some(file.path().to_path_buf()), ..Default::default() };
        let err = sources.load().unwrap_err().to_string();
        assert!(err.contains("duplicate key") && err.contains("line 4"), "{err}");

        let file = config_file("[default]\nauth.style = \"none\"\nconcurency = 3\n");
        let sources = Sources { config_file: Some(file.path().to_path_buf()), ..Default::default() };
        let err = sources.load().unwrap_err().to_string();
        assert!(err.contains("concurency"), "{err}");
    }

    #[test]
    fn a_wrong_setting_is_named_by_its_file_line_and_column() {
        let text = "[default]\nauth.style = \"none\"\n\n[production]\nrate = 5\n  concurency = 3\n";
        let file = config_file(text);
        let path = file.path().display().to_string();
        let load = |profile: &str| {
            let sources = Sources {
                config_file: Some(file.path().to_path_buf()),
                profile: Some(profile.into()),
                ..Default::default()
            };
            sources.load().unwrap_err().to_string()
        };
        let err = load("production");
        assert!(err.contains(&format!("{path} line 6, column 3:")) && err.contains("concurency"), "{err}");
        let file = config_file("[default]\nauth = { style = \"nope\" }\ntimeout = \"soon\"\n");
        let sources = Sources { config_file: Some(file.path().to_path_buf()), ..Default::default() };
        let err = sources.load().unwrap_err().to_string();
        assert!(err.contains("line 2, column 10:") && err.contains("nope"), "a key of an inline table: {err}");
        assert_eq!(locate("a = 1\n[b]\nc.d = 2\n", &["b", "c", "d"]), Some((3, 3)));
        assert_eq!(locate("a = 1\n", &["b"]), None);
    }
}
