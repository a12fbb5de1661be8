//! The command line: flags and commands (clap derive; the doc comments are
//! the `--help` text). What each command does is in [`crate::commands`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::input::Format;
use crate::options::MaxFailures;
use crate::report::ProgressMode;
use crate::sandbox::Faults;

#[derive(Debug, Parser)]
#[command(
    name = "bulkcall",
    version,
    about = "Send every row of CSV, JSON or JSON Lines files as an OAuth-protected API call",
    long_about = "Send every row of CSV, JSON or JSON Lines files as an HTTP call, through a rate-limited \
concurrent pool that shares one auto-refreshing OAuth 2.0 client-credentials token. Every row ends up in \
exactly one of results.jsonl and the failures file of its run directory.",
    after_help = "Examples:\n  bulkcall demo\n  bulkcall run jobs/eligibility.toml -p sandbox\n  \
bulkcall run jobs/eligibility.toml -p sandbox out/eligibility/2026-11-28T181355Z/failures.csv\n  \
bulkcall resume out/eligibility/2026-11-28T181355Z\n  bulkcall validate jobs/claim-status.toml -p local\n\n\
Exit codes: 0 all rows succeeded, 1 some rows failed, 2 usage/config/input error (nothing sent), 3 credentials \
rejected, 401s on fresh tokens or an untrusted TLS certificate, 4 --max-failures reached, 70 internal error, 74 the run directory could not be \
written, 75 try again later (another run of the job is going on, or the token endpoint is down), 130 interrupted (bulkcall resume finishes it)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Print only errors and the final line.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More logging (-v debug, -vv trace); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// One JSON object per log line, for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Colour on stderr; NO_COLOR is honoured by `auto`.
    #[arg(long, global = true, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send every row of the inputs as calls.
    ///
    /// Example: bulkcall run jobs/eligibility.toml -p sandbox --rate 10
    Run(RunArgs),
    /// Finish an interrupted or crashed run into the same run directory.
    ///
    /// Job, inputs, limit, config file, profile and the run's flags (-j, -r, …) come from the run's run.json;
    /// flags given here win over the run's. URLs, credentials, headers and ca_file come from the config and the
    /// environment as they are now. An input that changed since is refused. Rows with a recorded outcome are
    /// never sent again. Example: bulkcall resume out/eligibility/2026-11-28T181355Z
    Resume(ResumeArgs),
    /// Parse every row and render every request; send nothing.
    ///
    /// Reports each row that cannot be rendered with its file, line and field.
    /// Exit 0 when every row renders, 1 when some do not, 2 when a file cannot be read.
    Validate(ValidateArgs),
    /// Get a token for the profile and show where it came from and when it expires.
    ///
    /// The token itself is shown only with --print. Exit 3 when the credentials are rejected.
    Token(TokenArgs),
    /// Print the public keys to register with the authorization server, as a JWKS (private_key_jwt).
    ///
    /// Never prints private material. Without --key, the profile's auth.private_key_file (or
    /// private_key_env), key_id and algorithm: what is registered is what runs sign with.
    /// Example: bulkcall jwks --key keys/bulkcall.pem --key-id 2026-12 > jwks.json
    Jwks(JwksArgs),
    /// Serve the built-in mock gateway: token endpoint and sample APIs.
    ///
    /// Example: bulkcall sandbox --port 8787 --token-lifetime 2m
    Sandbox(SandboxArgs),
    /// Run the example eligibility job against an in-process sandbox, with progress.
    Demo(DemoArgs),
    /// (Re)write a run's report.html: summary, throughput, latency, statuses, first failures.
    ///
    /// Over the folder of a run split with --shard, one report.html there covers every shard.
    /// Example: bulkcall report out/eligibility/2026-11-28T181355Z
    Report(ReportArgs),
    /// Where a run stands: with shards, every shard's rows done, failed and in doubt, and which have not finished.
    ///
    /// RUN is a run directory, or the folder of a run split with --shard (the one holding shard-K-of-N/).
    /// Exit 0 when every shard finished and every row succeeded, 1 when every shard finished and some rows failed,
    /// 75 while a shard has not finished. Example: bulkcall status out/eligibility/nightly-1
    Status(StatusArgs),
    /// The runs in the output folder, newest first: start, state, rows and exit code.
    ///
    /// State is finished, finished with rows failed, stopped, aborted, crashed, running (pid) or pending
    /// (shards to start). out/<job>/latest points to each job's newest run.
    /// Example: bulkcall runs eligibility -p production
    Runs(RunsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// Example: bulkcall completions bash > /etc/bash_completion.d/bulkcall
    Completions(CompletionArgs),
    /// Print a man page (roff), generated from these flags: bulkcall's, or one command's; --dir writes them all.
    ///
    /// Example: bulkcall man --dir /usr/local/share/man/man1 (bulkcall.1, bulkcall-run.1, ...), or bulkcall man run
    Man(ManArgs),
}

/// Where the configuration comes from.
#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    /// Config profile, such as `sandbox` or `production`.
    #[arg(short, long, env = "BULKCALL_PROFILE")]
    pub profile: Option<String>,
    /// Config file [default: config/bulkcall.toml if present].
    #[arg(short, long, env = "BULKCALL_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Settings that flags may override.
#[derive(Debug, Args, Clone, Default)]
pub struct SettingArgs {
    /// Requests in flight at most.
    #[arg(short = 'j', long)]
    pub concurrency: Option<usize>,
    /// Requests per second across all workers, every attempt counted; 0 = unlimited.
    #[arg(short, long, allow_negative_numbers = true)]
    pub rate: Option<f64>,
    /// How many calls may start at once after a quiet spell (at least 1).
    #[arg(long)]
    pub burst: Option<u32>,
    /// Attempts per row, the first included.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Timeout per attempt, such as 30s or 500ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Write the run's metrics (Prometheus text format) to this file every 10 s and at the end, atomically:
    /// for node_exporter's textfile collector.
    #[arg(long, value_name = "PATH", help_heading = "Metrics")]
    pub metrics_file: Option<PathBuf>,
    /// Serve GET /metrics on this address while the run lasts, such as 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR", help_heading = "Metrics")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Push the final figures to this Prometheus Pushgateway (job=bulkcall, grouped by job name and shard).
    #[arg(long, value_name = "URL", help_heading = "Metrics")]
    pub metrics_push: Option<String>,
}

impl SettingArgs {
    pub fn to_map(&self) -> Map<String, Value> {
        let mut map = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                map.insert(k.to_string(), v);
            }
        };
        put("concurrency", self.concurrency.map(Value::from));
        put("rate", self.rate.map(Value::from));
        put("burst", self.burst.map(Value::from));
        put("max_attempts", self.max_attempts.map(Value::from));
        put("timeout", self.timeout.map(|t| Value::from(humantime::format_duration(t).to_string())));
        // A relative file stays where it was when `resume` runs from another folder.
        let file = self.metrics_file.as_ref().map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()));
        let metrics: Map<String, Value> = [
            ("file", file.map(|f| Value::from(f.display().to_string()))),
            ("listen", self.metrics_listen.map(|a| Value::from(a.to_string()))),
            ("push", self.metrics_push.clone().map(Value::from)),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect();
        if !metrics.is_empty() {
            map.insert("metrics".into(), Value::Object(metrics));
        }
        map
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job spec (TOML).
    pub job: PathBuf,
    /// Input files (CSV, JSON, JSON Lines; also .gz, .zst); they replace the spec's `input`. `-` reads standard input.
    pub inputs: Vec<PathBuf>,
    /// The inputs' format when the file name does not tell it (standard input, a pipe).
    #[arg(long, value_parser = format_parser())]
    pub format: Option<Format>,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub settings: SettingArgs,
    /// The run directory itself [default: out/<job>/<UTC timestamp>/].
    #[arg(short, long)]
    pub out: Option<PathBuf>,
    /// Send only the first N rows.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Render every request into requests.jsonl and print the first few; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Over a failures file: rows that failed where the gateway may have acted on them (in_doubt,
    /// server_error, a timeout or a lost connection after the call went out) are sent again (`resend`),
    /// or left out and written to failures as they were (`fail`)
    /// [default: resend for an idempotent job, fail for the others].
    #[arg(long, value_enum)]
    pub in_doubt: Option<InDoubt>,
    #[command(flatten)]
    pub sharding: ShardArgs,
    #[command(flatten)]
    pub running: RunningArgs,
}

/// One run split over N processes.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Many hosts")]
pub struct ShardArgs {
    /// Send only shard K of N (K from 0): the rows whose 0-based position across all inputs is K modulo N.
    /// Its run directory is <run>/shard-K-of-N/ (<run> is -o, or out/<job>/<run id>); started again, it resumes there.
    #[arg(long, value_name = "K/N", conflicts_with = "shards")]
    pub shard: Option<crate::shard::Shard>,
    /// Split the run into N shards; this process's K comes from JOB_COMPLETION_INDEX (Kubernetes Indexed Job)
    /// or AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch array job).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub shards: Option<u32>,
    /// The name that ties the shards of a run together [default: the job's name and a hash of its inputs].
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The run directory of the run to finish.
    pub run_dir: PathBuf,
    /// Rows that were sent but have no recorded outcome: send them again, or write them to failures as
    /// `in_doubt` [default: resend for an idempotent job, fail for the others].
    #[arg(long, value_enum)]
    pub in_doubt: Option<InDoubt>,
    /// A `[poll]` job: write the rows still pending (accepted by the gateway, not final) to failures as
    /// `pending` instead of polling them again.
    #[arg(long)]
    pub give_up_pending: bool,
    /// The config file to read, when it moved since the run started [default: the run's, from run.json].
    /// The run's profile stays.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SettingArgs,
    #[command(flatten)]
    pub running: RunningArgs,
}

/// How a run behaves while it goes and how it ends (`run` and `resume`).
#[derive(Debug, Args)]
#[command(next_help_heading = "Running and stopping")]
pub struct RunningArgs {
    /// Abort (exit 4) once this many rows have failed: a count (50) or a share (5%).
    #[arg(long)]
    pub max_failures: Option<MaxFailures>,
    /// How long calls in flight may take to finish after Ctrl-C, SIGTERM or SIGHUP [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub grace: Option<Duration>,
    /// Progress bar; `auto` = only when stderr is a terminal.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Print summary.json to stdout at the end (logs stay on stderr).
    #[arg(long)]
    pub json: bool,
}

impl RunningArgs {
    /// The grace period when no flag gives one.
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InDoubt {
    Resend,
    Fail,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The job spec (TOML).
    pub job: PathBuf,
    /// Input files; they replace the spec's `input`. `-` reads standard input.
    pub inputs: Vec<PathBuf>,
    /// The inputs' format when the file name does not tell it (standard input, a pipe).
    #[arg(long, value_parser = format_parser())]
    pub format: Option<Format>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the counts and the first reasons as one JSON object to stdout.
    #[arg(long)]
    pub json: bool,
}

/// `--format`'s values, which completions offer (never file names).
fn format_parser() -> impl clap::builder::TypedValueParser<Value = Format> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["csv", "json", "jsonl", "ndjson"])
        .map(|s| parse_format(&s).expect("one of the possible values"))
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s.to_ascii_lowercase().as_str() {
        "csv" => Ok(Format::Csv),
        "json" => Ok(Format::Json),
        "jsonl" | "ndjson" => Ok(Format::Jsonl),
        other => Err(format!("`{other}` is not a format: csv, json or jsonl")),
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the token itself on stdout (for curl: -H "Authorization: Bearer $(bulkcall token --print)").
    #[arg(long)]
    pub print: bool,
    /// Fetch a new token even if the cache holds a valid one (and cache the new one).
    #[arg(long)]
    pub refresh: bool,
}

#[derive(Debug, Args)]
pub struct JwksArgs {
    /// A PEM private key (PKCS#8 RSA, or EC P-256/P-384); repeat it for a key rotation.
    #[arg(long)]
    pub key: Vec<PathBuf>,
    /// The `kid` of each --key, in order [default: the key's RFC 7638 thumbprint, as runs use].
    #[arg(long)]
    pub key_id: Vec<String>,
    /// RS256 | RS384 | RS512 | ES256 | ES384 [default: RS384 for RSA, ES256 for P-256, ES384 for P-384].
    #[arg(long)]
    pub algorithm: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// The client id the token endpoint accepts.
    #[arg(long, env = "BULKCALL_SANDBOX_CLIENT_ID", default_value = "sandbox-client")]
    pub client_id: String,
    /// The client secret the token endpoint accepts.
    #[arg(long, env = "BULKCALL_SANDBOX_CLIENT_SECRET", default_value = "sandbox-secret", hide_default_value = true)]
    pub client_secret: String,
    /// How long an issued token lives.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub token_lifetime: Duration,
    /// Answer `expires_in` as a string ("3600"), as some gateways do.
    #[arg(long)]
    pub expires_in_string: bool,
    /// Delay before answering each token request.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub token_delay: Duration,
    /// The first N token requests answer 503.
    #[arg(long, default_value_t = 0)]
    pub fail_token_requests: u32,
    /// Delay added to every API answer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub latency: Duration,
    /// Answer calls without the `environment: sandbox` header too.
    #[arg(long)]
    pub no_environment_header: bool,
    /// Revoke every token issued so far this long after the start (tests 401 recovery).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub revoke_after: Option<Duration>,
    /// Registered client keys (a JWKS, as `bulkcall jwks` prints): client assertions (private_key_jwt) are
    /// verified against them (signature, aud, iss/sub, exp at most 5 minutes after iat, jti never reused).
    #[arg(long)]
    pub jwks: Option<PathBuf>,
    /// Serve over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM), and accept tls_client_auth token requests;
    /// needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Asynchronous claims: polls of a claim's status answered 202 before the one with its outcome.
    #[arg(long, default_value_t = 2)]
    pub async_polls: u32,
    /// Asynchronous claims: the Retry-After (whole seconds) of a 202, submission or poll.
    #[arg(long, default_value_t = 1)]
    pub async_retry_after: u64,
    /// Asynchronous claims kept (about 210 bytes each); past it the oldest are forgotten (their polls get 404).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub async_capacity: u64,
    /// Asynchronous claims: answer the status Location on this origin (http://127.0.0.2:9) instead of the
    /// one the client used, as a gateway pointing polls elsewhere would.
    #[arg(long, value_name = "ORIGIN")]
    pub async_location_origin: Option<String>,
    #[command(flatten)]
    pub faults: FaultArgs,
}

/// Faults injected into API calls, decided per row key (`controlNumber`) so
/// the same rows meet the same faults in every run. Shares are fractions (0.05 = 5%).
#[derive(Debug, Args)]
#[command(next_help_heading = "Fault injection")]
pub struct FaultArgs {
    /// Share of keys whose first call(s) answer 500.
    #[arg(long, default_value_t = 0.0)]
    pub fail_500: f64,
    /// Share of keys whose first call(s) answer 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub fail_429: f64,
    /// Share of keys whose first call(s) answer 503 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub fail_503: f64,
    /// Share of keys whose first call(s) lose the connection mid-answer.
    #[arg(long, default_value_t = 0.0)]
    pub fail_reset: f64,
    /// Share of keys whose first call(s) are answered after --slow-delay.
    #[arg(long, default_value_t = 0.0)]
    pub slow: f64,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub slow_delay: Duration,
    /// Share of keys always answered 400.
    #[arg(long, default_value_t = 0.0)]
    pub fail_400_always: f64,
    /// Share of keys always answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub fail_500_always: f64,
    /// How many calls of a key with a transient fault fail before it succeeds.
    #[arg(long, default_value_t = 1)]
    pub transient_attempts: u32,
    /// Retry-After of a 429, in seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after: u64,
    /// Send Retry-After as an HTTP date instead of seconds.
    #[arg(long)]
    pub retry_after_date: bool,
    /// A server-side limit in calls per second; calls over it get 429 (0 = none).
    #[arg(long, default_value_t = 0)]
    pub rate_limit: u32,
    /// Changes which keys get which fault.
    #[arg(long, default_value_t = 0)]
    pub fault_seed: u64,
}

impl FaultArgs {
    pub fn to_faults(&self) -> Result<Faults, Error> {
        let shares = [
            self.fail_500,
            self.fail_429,
            self.fail_503,
            self.fail_reset,
            self.slow,
            self.fail_400_always,
            self.fail_500_always,
        ];
        if shares.iter().any(|s| !(0.0..=1.0).contains(s)) || shares.iter().sum::<f64>() > 1.0 {
            return Err(Error::Usage("fault shares are fractions between 0 and 1 that add up to 1 at most".into()));
        }
        Ok(Faults {
            server_errors: self.fail_500,
            throttles: self.fail_429,
            unavailable: self.fail_503,
            resets: self.fail_reset,
            slow: self.slow,
            slow_delay: self.slow_delay,
            bad_requests: self.fail_400_always,
            broken: self.fail_500_always,
            transient_attempts: self.transient_attempts,
            retry_after: Duration::from_secs(self.retry_after),
            retry_after_date: self.retry_after_date,
            rate_limit: self.rate_limit,
            seed: self.fault_seed,
        })
    }
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run directory.
    pub run_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The run directory, or the folder holding a run's shard-K-of-N directories.
    pub run: PathBuf,
    /// Print the state as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// The command whose page to print, such as `run` [default: bulkcall's own page].
    pub command: Option<String>,
    /// Write every page (bulkcall.1 and bulkcall-<command>.1) into this folder instead.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// A job's name, or its spec file: only its runs [default: every job's].
    pub job: Option<String>,
    /// The folder of runs [default: the config's out_dir, `out`].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the list as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Progress bar; `auto` = only when stderr is a terminal.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Where the run directory goes.
    #[arg(long, default_value = "out")]
    pub out_dir: PathBuf,
    /// Print summary.json to stdout at the end.
    #[arg(long)]
    pub json: bool,
    /// Send synthetic claims to the sandbox's asynchronous endpoint instead: each answered 202 and polled
    /// until final (jobs/claims-async.toml).
    #[arg(long = "async")]
    pub r#async: bool,
}
