//! The command line: flags (clap derive; the doc comments are the `--help`
//! text) and the commands they start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::config::{AuthStyle, Credentials, Loaded, Sources};
use crate::error::{Error, ExitCode};
use crate::input::{self, Format, InputSpec};
use crate::job::Job;
use crate::output::{InputFingerprint, RunInfo};
use crate::report::ProgressMode;
use crate::runner::{self, Finished, MaxFailures, Plan, Resume};
use crate::sandbox::{Faults, Sandbox, SandboxConfig};
use crate::token::{Origin, TokenSource};

#[derive(Debug, Parser)]
#[command(
    name = "bulkcall",
    version,
    about = "Send every row of CSV, JSON or JSON Lines files as an OAuth-protected API call",
    long_about = "Send every row of CSV, JSON or JSON Lines files as an HTTP call, through a rate-limited \
concurrent pool that shares one auto-refreshing OAuth 2.0 client-credentials token. Every row ends up in \
exactly one of results.jsonl and the failures file of its run directory.",
    after_help = "Examples:\n  bulkcall demo\n  bulkcall run jobs/eligibility.toml -p sandbox\n  \
bulkcall run jobs/eligibility.toml out/eligibility/2026-11-28T181355Z/failures.csv\n  \
bulkcall validate jobs/claim-status.toml\n\nExit codes: 0 all rows succeeded, 1 some rows failed, 2 usage/config/input \
error (nothing sent), 3 credentials rejected or 401s on fresh tokens, 4 --max-failures reached, 74 the run \
directory could not be written, 130 interrupted."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
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
    /// Job, inputs, config and profile come from the run's run.json; an input that changed since is refused.
    /// Rows with a recorded outcome are never sent again. Example: bulkcall resume out/eligibility/2026-11-28T181355Z
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
    /// Serve the built-in mock gateway: token endpoint and sample APIs.
    ///
    /// Example: bulkcall sandbox --port 8787 --token-lifetime 2m
    Sandbox(SandboxArgs),
    /// Run the example eligibility job against an in-process sandbox, with progress.
    Demo(DemoArgs),
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
    #[arg(short, long)]
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
}

impl SettingArgs {
    fn to_map(&self) -> Map<String, Value> {
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
        map
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job spec (TOML).
    pub job: PathBuf,
    /// Input files (CSV, JSON, JSON Lines); they replace the spec's `input`.
    pub inputs: Vec<PathBuf>,
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
    /// Abort (exit 4) once this many rows have failed: a count (50) or a share (5%).
    #[arg(long)]
    pub max_failures: Option<MaxFailures>,
    /// How long calls in flight may take to finish after Ctrl-C or SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub grace: Duration,
    /// Progress bar; `auto` = only when stderr is a terminal.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Print summary.json to stdout at the end (logs stay on stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The run directory of the run to finish.
    pub run_dir: PathBuf,
    /// Rows that were sent but have no recorded outcome: send them again, or write them to failures as `in_doubt`.
    #[arg(long, value_enum, default_value_t = InDoubt::Resend)]
    pub in_doubt: InDoubt,
    #[command(flatten)]
    pub settings: SettingArgs,
    /// Abort (exit 4) once this many rows have failed: a count (50) or a share (5%).
    #[arg(long)]
    pub max_failures: Option<MaxFailures>,
    /// How long calls in flight may take to finish after Ctrl-C or SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub grace: Duration,
    /// Progress bar; `auto` = only when stderr is a terminal.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Print summary.json to stdout at the end (logs stay on stderr).
    #[arg(long)]
    pub json: bool,
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
    /// Input files; they replace the spec's `input`.
    pub inputs: Vec<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
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
    fn to_faults(&self) -> Result<Faults, Error> {
        let shares =
            [self.fail_500, self.fail_429, self.fail_reset, self.slow, self.fail_400_always, self.fail_500_always];
        if shares.iter().any(|s| !(0.0..=1.0).contains(s)) || shares.iter().sum::<f64>() > 1.0 {
            return Err(Error::Usage("fault shares are fractions between 0 and 1 that add up to 1 at most".into()));
        }
        Ok(Faults {
            server_errors: self.fail_500,
            throttles: self.fail_429,
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
}

/// Runs a command to its exit code. `stop` is cancelled on SIGINT/SIGTERM.
pub async fn execute(cli: Cli, stop: CancellationToken) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Run(args) => run(args, stop).await,
        Command::Resume(args) => resume(args, stop).await,
        Command::Validate(args) => validate(args).await,
        Command::Token(args) => token(args).await,
        Command::Sandbox(args) => sandbox(args, stop).await,
        Command::Demo(args) => demo(args, stop).await,
    }
}

/// The job, its settings and its inputs, resolved.
struct Resolved {
    job: Arc<Job>,
    loaded: Loaded,
    inputs: Vec<InputSpec>,
}

fn resolve(
    job_path: &Path,
    inputs: &[PathBuf],
    config: &ConfigArgs,
    settings: &SettingArgs,
) -> Result<Resolved, Error> {
    let job = Job::load(job_path)?;
    let sources = Sources {
        config_file: config.config.clone(),
        profile: config.profile.clone(),
        job: job.settings.clone(),
        flags: settings.to_map(),
        env: true,
        ..Sources::default()
    };
    let loaded = sources.load()?;
    resolve_inputs(job, loaded, inputs)
}

fn resolve_inputs(job: Job, loaded: Loaded, inputs: &[PathBuf]) -> Result<Resolved, Error> {
    let paths = if inputs.is_empty() { job.inputs.clone() } else { inputs.to_vec() };
    if paths.is_empty() {
        return Err(Error::Usage(format!(
            "no input: give INPUT files after the job, or set `input` in {}",
            job.path.display()
        )));
    }
    let specs = paths
        .into_iter()
        .map(|path| {
            let format = match (job.format, Format::from_path(&path)) {
                // A failures file fed back keeps its own format.
                (_, Some(f)) if is_failures_file(&path) => f,
                (Some(f), _) | (None, Some(f)) => f,
                (None, None) => return Err(Error::Input(input::InputError::UnknownFormat(path))),
            };
            let is_tsv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
            let delimiter = if is_tsv && job.delimiter == b',' { b'\t' } else { job.delimiter };
            Ok(InputSpec { path, format, delimiter })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let headers = input::preflight(&specs)?;
    // A field no column of a CSV input has would fail every row: say so once.
    for (spec, columns) in specs.iter().zip(&headers) {
        let Some(columns) = columns else { continue };
        let missing: Vec<String> = job
            .fields()
            .into_iter()
            .filter(|(field, _)| !columns.contains(field))
            .map(|(field, place)| format!("`{field}` (used in {place})"))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Usage(format!(
                "{} uses {} but {} has no such column; its columns are: {}",
                job.path.display(),
                missing.join(", "),
                spec.path.display(),
                columns.join(", ")
            )));
        }
    }
    Ok(Resolved { job: Arc::new(job), loaded, inputs: specs })
}

fn is_failures_file(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("failures."))
}

/// The default run directory: `<out_dir>/<job>/<UTC timestamp>/`, with a
/// suffix when two runs start in the same second.
fn default_run_dir(out_dir: &Path, job: &str) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
    let base = out_dir.join(job).join(&stamp);
    (1..)
        .map(|n| if n == 1 { base.clone() } else { out_dir.join(job).join(format!("{stamp}-{n}")) })
        .find(|p| !p.exists())
        .expect("a free name")
}

/// `run.json`: what `resume` needs, written before the first call goes out.
async fn write_run_json(dir: &Path, r: &Resolved, limit: Option<u64>) -> Result<(), Error> {
    let inputs = r.inputs.clone();
    let inputs = tokio::task::spawn_blocking(move || {
        inputs.iter().map(|i| InputFingerprint::of(&i.path, i.format, i.delimiter)).collect::<std::io::Result<Vec<_>>>()
    })
    .await
    .expect("hashing does not panic")
    .map_err(|e| Error::Usage(format!("cannot read an input to fingerprint it: {e}")))?;
    let info = RunInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        job: absolute(&r.job.path),
        job_name: r.job.name.clone(),
        inputs,
        profile: r.loaded.profile.clone(),
        config: r.loaded.config_file.as_deref().map(absolute),
        settings: serde_json::to_value(&r.loaded.settings).expect("serializable"),
        limit,
        started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        pid: std::process::id(),
    };
    crate::output::write_json(&dir.join("run.json"), &info)?;
    Ok(())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Options of a run that are not settings.
struct RunOptions {
    out: Option<PathBuf>,
    limit: Option<u64>,
    dry_run: bool,
    max_failures: Option<MaxFailures>,
    grace: Duration,
    progress: ProgressMode,
    json: bool,
    /// How the user would run this job again (for the closing hint).
    rerun: String,
}

async fn run(args: RunArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let resolved = resolve(&args.job, &args.inputs, &args.config, &args.settings)?;
    let mut rerun = format!("bulkcall run {}", args.job.display());
    if let Some(p) = &args.config.profile {
        rerun.push_str(&format!(" -p {p}"));
    }
    let options = RunOptions {
        out: args.out,
        limit: args.limit,
        dry_run: args.dry_run,
        max_failures: args.max_failures,
        grace: args.grace,
        progress: args.progress,
        json: args.json,
        rerun,
    };
    run_resolved(resolved, None, options, None, stop).await
}

/// Runs a resolved job: token first (bad credentials stop here, before any
/// file is written), then the run directory and `run.json`, then the pool.
async fn run_resolved(
    r: Resolved,
    credentials: Option<Credentials>,
    options: RunOptions,
    resume: Option<Resume>,
    stop: CancellationToken,
) -> Result<ExitCode, Error> {
    let settings = r.loaded.settings.clone();
    let requests = Arc::new(r.job.requests(&settings)?);
    let dir = options.out.clone().unwrap_or_else(|| default_run_dir(&settings.out_dir, &r.job.name));
    let authorized = settings.auth.style != AuthStyle::None;
    let resuming = resume.is_some();
    let mut resume = resume;
    let mut plan = |dir: PathBuf| Plan {
        requests: requests.clone(),
        inputs: r.inputs.clone(),
        settings: settings.clone(),
        limit: options.limit,
        dir,
        progress: options.progress,
        grace: options.grace,
        max_failures: options.max_failures,
        resume: resume.take(),
    };

    if options.dry_run {
        crate::output::create_run_dir(&dir)?;
        let finished = runner::dry_run(plan(dir.clone()), authorized).await?;
        print_dry_run(&dir);
        return Ok(close(&finished, &dir, &options));
    }

    // One run per job: a second one stops here, before any token request.
    let folder = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let _lock = crate::output::lock_job(folder, &r.job.name)?;
    let client = runner::http_client(&settings);
    let tokens = if authorized {
        r.loaded.token_url()?;
        let credentials = match credentials {
            Some(c) => c,
            None => settings.auth.credentials()?,
        };
        let tokens = TokenSource::new(client.clone(), &settings.auth, credentials);
        tokens.get().await?;
        Some(tokens)
    } else {
        None
    };
    if !resuming {
        crate::output::create_run_dir(&dir)?;
        write_run_json(&dir, &r, options.limit).await?;
    }
    tracing::info!(
        "{} {} ({} input{}) into {}",
        if resuming { "resuming" } else { "running" },
        r.job.name,
        r.inputs.len(),
        if r.inputs.len() == 1 { "" } else { "s" },
        dir.display()
    );
    let finished = runner::run(plan(dir.clone()), client, tokens, stop).await?;
    Ok(close(&finished, &dir, &options))
}

async fn resume(args: ResumeArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let dir = args.run_dir;
    let info_path = dir.join("run.json");
    let text = std::fs::read_to_string(&info_path).map_err(|e| {
        Error::Usage(format!(
            "cannot read {}: {e}; resume needs the run directory of a run that started (it writes run.json first)",
            info_path.display()
        ))
    })?;
    let info: RunInfo = serde_json::from_str(&text)
        .map_err(|e| Error::Usage(format!("{} is not a run.json bulkcall wrote: {e}", info_path.display())))?;

    let recorded = info.inputs.clone();
    let changed = tokio::task::spawn_blocking(move || {
        recorded
            .iter()
            .filter_map(|was| {
                let delimiter = was.delimiter.bytes().next().unwrap_or(b',');
                match InputFingerprint::of(&was.path, was.format, delimiter) {
                    Ok(now) if now.size == was.size && now.sha256 == was.sha256 => None,
                    Ok(now) => Some(format!(
                        "{} changed since the run started ({} bytes then, {} now; the SHA-256 differs)",
                        was.path.display(),
                        was.size,
                        now.size
                    )),
                    Err(e) => Some(format!("{} cannot be read: {e}", was.path.display())),
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("hashing does not panic");
    if !changed.is_empty() {
        return Err(Error::Usage(format!(
            "resume refuses: {}; rows are matched by position, so a changed input could send the wrong rows. Start a new run instead",
            changed.join("; ")
        )));
    }

    let job = Job::load(&info.job)?;
    let mut flags = match info.settings {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    flags.extend(args.settings.to_map());
    let sources = Sources {
        config_file: info.config.clone(),
        no_config: info.config.is_none(),
        profile: Some(info.profile.clone()).filter(|p| p != "default"),
        job: job.settings.clone(),
        flags,
        env: true,
    };
    let loaded = sources.load()?;
    let inputs: Vec<PathBuf> = info.inputs.iter().map(|i| i.path.clone()).collect();
    let mut resolved = resolve_inputs(job, loaded, &inputs)?;
    for (spec, was) in resolved.inputs.iter_mut().zip(&info.inputs) {
        spec.format = was.format;
        spec.delimiter = was.delimiter.bytes().next().unwrap_or(b',');
    }

    let (mut done, started) = crate::output::Ledger::read(&dir)?;
    let mut in_doubt: std::collections::HashSet<(usize, u64)> = started.into_iter().collect();
    let names: Vec<String> =
        info.inputs.iter().map(|i| i.path.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    for (input, row, outcome) in crate::output::last_outcomes(&dir) {
        let matches: Vec<(usize, u64)> = in_doubt
            .iter()
            .copied()
            .filter(|&(i, r)| r == row && input.as_deref().is_none_or(|name| names[i] == name))
            .collect();
        if let [key] = matches.as_slice() {
            in_doubt.remove(key);
            done.insert(*key, outcome);
        }
    }
    tracing::info!(
        "{} rows already have an outcome; {} were in flight when the run stopped ({})",
        done.len(),
        in_doubt.len(),
        if args.in_doubt == InDoubt::Fail { "written to failures as in_doubt" } else { "sending them again" }
    );
    let options = RunOptions {
        out: Some(dir.clone()),
        limit: info.limit,
        dry_run: false,
        max_failures: args.max_failures,
        grace: args.grace,
        progress: args.progress,
        json: args.json,
        rerun: format!("bulkcall run {}", info.job.display()),
    };
    let resume = Resume { done, in_doubt, fail_in_doubt: args.in_doubt == InDoubt::Fail };
    run_resolved(resolved, None, options, Some(resume), stop).await
}

fn print_dry_run(dir: &Path) {
    let path = dir.join("requests.jsonl");
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines().take(3) {
            println!("{line}");
        }
    }
}

/// Prints the closing lines and returns the exit code.
fn close(finished: &Finished, dir: &Path, options: &RunOptions) -> ExitCode {
    let s = &finished.summary;
    if let Some(e) = &finished.abort {
        eprintln!("bulkcall: {e}");
    }
    let mut errors: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if errors.is_empty() {
        errors.push("none".into());
    }
    eprintln!(
        "bulkcall: {} rows in {:.1}s ({:.1} rows/s): {} succeeded, {} failed (errors: {})",
        s.total,
        s.duration_s,
        s.rows_per_s,
        s.succeeded,
        s.failed,
        errors.join(", ")
    );
    if !options.dry_run {
        eprintln!(
            "  latency p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; {} attempts, {} retries, {} token request{}",
            s.latency_ms.p50,
            s.latency_ms.p90,
            s.latency_ms.p99,
            s.latency_ms.max,
            s.attempts,
            s.retries,
            s.token_requests,
            if s.token_requests == 1 { "" } else { "s" }
        );
    }
    eprintln!("  run directory: {}", dir.display());
    for file in &finished.failure_files {
        eprintln!("  failures: {}   (send them again: {} {})", file.display(), options.rerun, file.display());
    }
    if matches!(finished.exit, ExitCode::Interrupted | ExitCode::MaxFailures | ExitCode::Auth) {
        eprintln!(
            "  rows not yet sent are in neither file; run the same command again with --limit, or see the README"
        );
    }
    if options.json {
        println!("{}", serde_json::to_string_pretty(s).expect("serializable"));
    }
    finished.exit
}

async fn validate(args: ValidateArgs) -> Result<ExitCode, Error> {
    let r = resolve(&args.job, &args.inputs, &args.config, &SettingArgs::default())?;
    let requests = r.job.requests(&r.loaded.settings)?;
    let names: Vec<String> = r.inputs.iter().map(|i| i.path.display().to_string()).collect();
    let inputs = r.inputs.clone();
    let (rows, bad) = tokio::task::spawn_blocking(move || {
        let (mut rows, mut bad) = (0u64, Vec::new());
        let result = input::read_all(&inputs, &|_| {}, &mut |item| {
            rows += 1;
            match item {
                Err(b) => bad.push(format!("{} row {}: {}", names[b.input], b.number, b.message)),
                Ok(row) => {
                    if let Err(e) = requests.render(&row) {
                        bad.push(format!("{} line {} (row {}): {e}", names[row.input], row.line, row.number));
                    }
                }
            }
            true
        });
        result.map(|()| (rows, bad))
    })
    .await
    .expect("validation does not panic")?;
    const SHOWN: usize = 50;
    for line in bad.iter().take(SHOWN) {
        eprintln!("{line}");
    }
    if bad.len() > SHOWN {
        eprintln!("... and {} more", bad.len() - SHOWN);
    }
    eprintln!("bulkcall: {rows} rows read: {} ready to send, {} cannot be sent", rows - bad.len() as u64, bad.len());
    Ok(if bad.is_empty() { ExitCode::Success } else { ExitCode::RowsFailed })
}

async fn token(args: TokenArgs) -> Result<ExitCode, Error> {
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
    let client = runner::http_client(&loaded.settings);
    let tokens = TokenSource::new(client, auth, auth.credentials()?);
    let token = if args.refresh { tokens.get_fresh().await? } else { tokens.get().await? };
    let left = token.expires_at.saturating_duration_since(tokio::time::Instant::now());
    let url = auth.token_url.as_deref().unwrap_or("");
    match &token.origin {
        Origin::Fetched => eprintln!("token fetched now from {url} (profile {})", loaded.profile),
        Origin::Cache(path) => {
            eprintln!("token from the cache {} (profile {}, no token request)", path.display(), loaded.profile)
        }
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

async fn sandbox(args: SandboxArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
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
        latency: args.latency,
        require_environment_header: !args.no_environment_header,
        record: false,
        revoke_after: args.revoke_after,
        faults: args.faults.to_faults()?,
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

/// The example job, built in, so `bulkcall demo` works from anywhere.
const DEMO_JOB: &str = include_str!("../jobs/eligibility.toml");
const DEMO_INPUT: &[u8] = include_bytes!("../jobs/eligibility.csv");

async fn demo(args: DemoArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let secret = "demo-secret";
    let sandbox_config = SandboxConfig {
        client_id: "demo-client".into(),
        client_secret: SecretString::from(secret),
        latency: Duration::from_millis(40),
        ..SandboxConfig::default()
    };
    let addr = "127.0.0.1:0";
    let sandbox = Sandbox::start(sandbox_config, addr.parse().expect("valid address"))
        .await
        .map_err(|source| Error::Sandbox { addr: addr.into(), source })?;
    let folder = args.out_dir.join("demo");
    std::fs::create_dir_all(&folder).map_err(|e| Error::Usage(format!("cannot create {}: {e}", folder.display())))?;
    let job_path = folder.join("eligibility.toml");
    for (path, bytes) in [(&job_path, DEMO_JOB.as_bytes()), (&folder.join("eligibility.csv"), DEMO_INPUT)] {
        std::fs::write(path, bytes).map_err(|e| Error::Usage(format!("cannot write {}: {e}", path.display())))?;
    }
    let job = Job::parse(&job_path, DEMO_JOB)?;
    let mut flags = Map::new();
    flags.insert("base_url".into(), Value::from(sandbox.base_url()));
    flags.insert("concurrency".into(), Value::from(16));
    flags.insert("rate".into(), Value::from(250));
    flags.insert("burst".into(), Value::from(16));
    flags.insert("out_dir".into(), Value::from(args.out_dir.display().to_string()));
    flags.insert("headers".into(), serde_json::json!({"environment": "sandbox"}));
    flags.insert("auth".into(), serde_json::json!({"style": "json", "token_url": sandbox.token_url(), "cache": false}));
    let loaded = Sources { job: job.settings.clone(), flags, no_config: true, ..Sources::default() }.load()?;
    let resolved = resolve_inputs(job, loaded, &[])?;
    eprintln!(
        "bulkcall demo: the built-in sandbox is at {}; sending {} with 16 workers at 250 calls/s",
        sandbox.base_url(),
        resolved.inputs[0].path.display()
    );
    let credentials = Credentials { client_id: "demo-client".into(), client_secret: SecretString::from(secret) };
    let options = RunOptions {
        out: None,
        limit: None,
        dry_run: false,
        max_failures: None,
        grace: Duration::from_secs(30),
        progress: args.progress,
        json: args.json,
        rerun: format!("bulkcall run {}", job_path.display()),
    };
    let exit = run_resolved(resolved, Some(credentials), options, None, stop).await;
    sandbox.shutdown().await;
    if exit.is_ok() {
        eprintln!(
            "next: `bulkcall sandbox` in one terminal, then `bulkcall run jobs/eligibility.toml -p local` in another"
        );
    }
    exit
}
