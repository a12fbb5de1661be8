//! The commands: resolve the job, its configuration and inputs, fetch the
//! first token, create the run directory, hand a plan to the runner, and
//! print the closing lines.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::cli::*;
use crate::config::{AuthStyle, Credentials, Loaded, Sources};
use crate::coordination::{Manifest, Redis, RedisUrl};
use crate::error::{Error, ExitCode};
use crate::input::{self, Format, InputSpec};
use crate::job::Job;
use crate::limiter::redis::RedisLimiter;
use crate::limiter::{Limiter, LocalLimiter};
use crate::options::MaxFailures;
use crate::output::{InputFingerprint, RunFlags, RunInfo};
use crate::report::ProgressMode;
use crate::runner::{self, Finished, Plan, Resume};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::shard::Shard;
use crate::token::shared::SharedStore;
use crate::token::{Origin, TokenSource};

/// Runs a command to its exit code. `stop` is cancelled on SIGINT/SIGTERM/SIGHUP.
pub async fn execute(cli: Cli, stop: CancellationToken) -> Result<ExitCode, Error> {
    let log = cli.log;
    match cli.command {
        Command::Run(args) => run(args, log, stop).await,
        Command::Resume(args) => resume(args, log, stop).await,
        Command::Validate(args) => validate(args, &log).await,
        Command::Token(args) => token(args).await,
        Command::Sandbox(args) => sandbox(args, stop).await,
        Command::Demo(args) => demo(args, log, stop).await,
        Command::Report(args) => {
            let path = write_report(&args.run_dir)?;
            eprintln!("bulkcall: wrote {}", path.display());
            Ok(ExitCode::Success)
        }
        Command::Status(args) => {
            let run = crate::status::RunStatus::read(&args.run)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&run).expect("serializable"));
            } else {
                print!("{}", run.render());
            }
            Ok(run.exit_code())
        }
        Command::Completions(args) => {
            use clap::CommandFactory as _;
            clap_complete::generate(args.shell, &mut Cli::command(), "bulkcall", &mut std::io::stdout());
            Ok(ExitCode::Success)
        }
        Command::Man => {
            use clap::CommandFactory as _;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| Error::Usage(format!("cannot print the man page: {e}")))?;
            Ok(ExitCode::Success)
        }
    }
}

/// The job, its settings and its inputs, resolved.
struct Resolved {
    job: Arc<Job>,
    loaded: Loaded,
    inputs: Vec<InputSpec>,
    /// Each input's failures file name in the run directory.
    failures: Vec<String>,
    /// Inputs that were standard input or a pipe, read once into a 0600
    /// file (by input index), until the run directory keeps them.
    spooled: Vec<(usize, tempfile::NamedTempFile)>,
}

fn resolve(
    job_path: &Path,
    inputs: &[PathBuf],
    format: Option<Format>,
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
    resolve_inputs(job, loaded, inputs, format, &[])
}

/// `saved`: each input's format and delimiter as a resumed run recorded
/// them; they win over the extension and the job.
fn resolve_inputs(
    job: Job,
    loaded: Loaded,
    inputs: &[PathBuf],
    format: Option<Format>,
    saved: &[(Format, u8)],
) -> Result<Resolved, Error> {
    let paths = if inputs.is_empty() { job.inputs.clone() } else { inputs.to_vec() };
    if paths.is_empty() {
        return Err(Error::Usage(format!(
            "no input: give INPUT files after the job, or set `input` in {}",
            job.path.display()
        )));
    }
    let given = format.or(job.format);
    let mut spooled = Vec::new();
    let paths_given = paths.clone();
    let specs = paths
        .into_iter()
        .enumerate()
        .map(|(index, path)| {
            let (format, path) = if let Some(&(format, _)) = saved.get(index) {
                (format, path)
            } else if is_stream(&path) {
                let Some(format) = given else {
                    return Err(Error::Usage(format!(
                        "{} is {}: it has no file name to tell its format; give it with --format csv|json|jsonl or `format` in the job",
                        path.display(),
                        if path == Path::new("-") { "standard input" } else { "a pipe" },
                    )));
                };
                let spool = spool(&path)?;
                let spool_path = spool.path().to_path_buf();
                spooled.push((index, spool));
                (format, spool_path)
            } else {
                let format = match (given, Format::from_path(&path)) {
                    // A failures file fed back keeps its own format.
                    (_, Some(f)) if is_failures_file(&path) => f,
                    (Some(f), _) | (None, Some(f)) => f,
                    (None, None) => return Err(Error::Input(input::InputError::UnknownFormat(path))),
                };
                (format, path)
            };
            let is_tsv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
            let delimiter = match saved.get(index) {
                Some(&(_, delimiter)) => delimiter,
                None if is_tsv && job.delimiter == b',' => b'\t',
                None => job.delimiter,
            };
            Ok(InputSpec { path, format, delimiter, encoding: job.encoding })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let headers = input::preflight(&specs).map_err(|e| {
        // Name a spooled input as the user gave it, not by its spool file.
        let message = spooled.iter().fold(e.to_string(), |message, (index, spool)| {
            message.replace(&spool.path().display().to_string(), &paths_given[*index].display().to_string())
        });
        if spooled.is_empty() { Error::Input(e) } else { Error::Usage(message) }
    })?;
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
    let failures = crate::output::failure_file_names(
        &specs.iter().map(|i| (i.path.clone(), i.format, i.delimiter)).collect::<Vec<_>>(),
    );
    Ok(Resolved { job: Arc::new(job), loaded, inputs: specs, failures, spooled })
}

/// Standard input (`-`), a FIFO, `<(...)` or a device: anything that can be
/// read only once.
fn is_stream(path: &Path) -> bool {
    // `/dev/stdin` or `/proc/self/fd/0` redirected from a regular file is
    // that file now, and something else (or nothing) when the run is resumed.
    let names_a_descriptor = path.starts_with("/dev/")
        || (path.starts_with("/proc/") && path.components().nth(3).is_some_and(|c| c.as_os_str() == "fd"));
    path == Path::new("-") || names_a_descriptor || std::fs::metadata(path).is_ok_and(|m| !m.is_file())
}

/// Reads a stream once into a 0600 file, so the preflight, the fingerprint
/// and the run (and a later `resume`) all read the same bytes.
fn spool(path: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let failed = |e: std::io::Error| Error::Usage(format!("cannot read input {}: {e}", path.display()));
    let mut spool = tempfile::Builder::new()
        .prefix(".bulkcall-input-")
        .tempfile()
        .map_err(|e| Error::Usage(format!("cannot make a file to keep input {} in: {e}", path.display())))?;
    if path == Path::new("-") {
        std::io::copy(&mut std::io::stdin().lock(), spool.as_file_mut()).map_err(failed)?;
    } else {
        std::io::copy(&mut std::fs::File::open(path).map_err(failed)?, spool.as_file_mut()).map_err(failed)?;
    }
    Ok(spool)
}

/// Moves the spooled inputs into the run directory (`input-1.jsonl`, …),
/// 0600 like every file there, and reads them from there on.
fn keep_spooled(dir: &Path, r: &mut Resolved) -> Result<(), Error> {
    for (index, spool) in r.spooled.drain(..) {
        let spec = &mut r.inputs[index];
        let ext = match spec.format {
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Jsonl => "jsonl",
        };
        let target = dir.join(format!("input-{}.{ext}", index + 1));
        let failed = |e: std::io::Error| Error::Usage(format!("cannot keep the input in {}: {e}", target.display()));
        if let Err(e) = spool.persist(&target) {
            // Another file system: copy it, and let the spool go.
            let spool = e.file;
            std::fs::copy(spool.path(), &target).map_err(failed)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
        }
        spec.path = target;
    }
    r.failures = crate::output::failure_file_names(
        &r.inputs.iter().map(|i| (i.path.clone(), i.format, i.delimiter)).collect::<Vec<_>>(),
    );
    Ok(())
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

/// Each input's size and hash. Reads every input whole.
async fn fingerprint(inputs: &[InputSpec]) -> Result<Vec<InputFingerprint>, Error> {
    let inputs = inputs.to_vec();
    tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .map(|i| InputFingerprint::of(&i.path, i.format, i.delimiter).map_err(|e| (i.path.clone(), e)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .expect("hashing does not panic")
    .map_err(|(path, e)| Error::Usage(format!("cannot read input {} to fingerprint it: {e}", path.display())))
}

/// `run.json`: what `resume` needs, written before the first call goes out.
async fn write_run_json(dir: &Path, r: &Resolved, options: &RunOptions) -> Result<(), Error> {
    let mut inputs = match &options.sharding {
        Some(sharding) => sharding.inputs.clone(),
        None => fingerprint(&r.inputs).await?,
    };
    // Where each input is now: standard input, hashed from its spool before
    // the run directory existed, is kept in the run directory since.
    for (input, spec) in inputs.iter_mut().zip(&r.inputs) {
        input.path = absolute(&spec.path);
    }
    for (input, failures) in inputs.iter_mut().zip(&r.failures) {
        input.failures = Some(failures.clone());
    }
    let info = RunInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        job: absolute(&r.job.path),
        job_name: r.job.name.clone(),
        inputs,
        profile: r.loaded.profile.clone(),
        config: r.loaded.config_file.as_deref().map(absolute),
        settings: {
            let mut settings = serde_json::to_value(&r.loaded.settings).expect("serializable");
            if let Some(Value::Object(headers)) = settings.get_mut("headers") {
                for (name, value) in headers.iter_mut() {
                    if crate::config::is_sensitive_header(name) {
                        *value = Value::from("<redacted>");
                    }
                }
            }
            // Extra token parameters may be credentials too (an API key, a resource password).
            if let Some(Value::Object(params)) = settings.pointer_mut("/auth/params") {
                for value in params.values_mut() {
                    *value = Value::from("<redacted>");
                }
            }
            settings
        },
        limit: options.limit,
        started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        pid: std::process::id(),
        flags: options.flags.clone(),
        run_id: options.sharding.as_ref().map(|s| s.run_id.clone()),
        shard: options.sharding.as_ref().map(|s| s.shard),
    };
    crate::output::write_json(&dir.join("run.json"), &info)?;
    Ok(())
}

/// What every shard of the run must agree on.
fn manifest(r: &Resolved, sharding: &Sharding) -> Result<Manifest, Error> {
    use sha2::Digest;
    let job = std::fs::read(&r.job.path)
        .map_err(|e| Error::Usage(format!("cannot read the job spec {}: {e}", r.job.path.display())))?;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    Ok(Manifest {
        run_id: sharding.run_id.clone(),
        shards: sharding.shard.count,
        inputs: sharding
            .inputs
            .iter()
            .map(|i| {
                let name =
                    i.path.file_name().map_or_else(|| i.path.display().to_string(), |n| n.to_string_lossy().into());
                (name, i.sha256.clone())
            })
            .collect(),
        job: hex(&sha2::Sha256::digest(&job)),
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Options of a run that are not settings.
struct RunOptions {
    log: LogArgs,
    out: Option<PathBuf>,
    limit: Option<u64>,
    dry_run: bool,
    max_failures: Option<MaxFailures>,
    grace: Duration,
    /// The command-line flags to keep in run.json.
    flags: RunFlags,
    progress: ProgressMode,
    json: bool,
    /// How the user would run this job again (for the closing hint).
    rerun: String,
    /// Whether `bulkcall resume` can finish the run (not the demo's).
    resumable: bool,
    /// This process's part of a run split over several.
    sharding: Option<Sharding>,
}

/// A shard of a run split over several processes.
#[derive(Debug, Clone)]
struct Sharding {
    shard: Shard,
    run_id: String,
    /// The inputs as the run found them (the run id's default is their hash).
    inputs: Vec<InputFingerprint>,
}

impl ShardArgs {
    /// `--shard K/N`, or `--shards N` with K from the scheduler's environment.
    fn shard(&self) -> Result<Option<Shard>, Error> {
        let shard = match (self.shard, self.shards) {
            (Some(shard), _) => Some(shard),
            (None, Some(count)) => Some(Shard::from_env(count, |name| std::env::var(name).ok())?),
            (None, None) => None,
        };
        if shard.is_none() && self.run_id.is_some() {
            return Err(Error::Usage(
                "--run-id names the run that shards share: give --shard K/N or --shards N".into(),
            ));
        }
        if let Some(id) = &self.run_id {
            crate::shard::check_run_id(id)?;
        }
        Ok(shard)
    }
}

async fn run(args: RunArgs, log: LogArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let shard = args.sharding.shard()?;
    let resolved = resolve(&args.job, &args.inputs, args.format, &args.config, &args.settings)?;
    let rerun = rerun_command(&args.job, args.config.profile.as_deref(), args.config.config.as_deref());
    let resumable = true;
    let (mut out, mut sharding) = (args.out, None);
    if let Some(shard) = shard {
        let inputs = fingerprint(&resolved.inputs).await?;
        let run_id = args.sharding.run_id.unwrap_or_else(|| crate::shard::default_run_id(&resolved.job.name, &inputs));
        let run = out.unwrap_or_else(|| resolved.loaded.settings.out_dir.join(&resolved.job.name).join(&run_id));
        let dir = shard.dir(&run);
        // A shard started again (a Kubernetes index retried, a host
        // rebooted) picks up where it left off.
        if dir.join("run.json").exists() && !args.dry_run {
            tracing::info!("shard {shard} of run {run_id} started before: resuming {}", dir.display());
            let again = ResumeArgs {
                run_dir: dir,
                // The same default as `bulkcall resume`: by the job's idempotency.
                in_doubt: None,
                // The config file this command names, as `resume -c` would.
                config: args.config.config,
                settings: args.settings,
                running: args.running,
            };
            return resume(again, log, stop).await;
        }
        out = Some(dir);
        sharding = Some(Sharding { shard, run_id, inputs });
    }
    let options = RunOptions {
        log,
        out,
        limit: args.limit,
        dry_run: args.dry_run,
        max_failures: args.running.max_failures,
        grace: args.running.grace.unwrap_or(RunningArgs::DEFAULT_GRACE),
        progress: args.running.progress,
        json: args.running.json,
        flags: run_flags(&args.settings, &args.running),
        rerun,
        resumable,
        sharding,
    };
    run_resolved(resolved, None, options, None, stop).await
}

/// The flags of a run that `resume` applies again.
fn run_flags(settings: &SettingArgs, running: &RunningArgs) -> RunFlags {
    RunFlags {
        settings: settings.to_map(),
        max_failures: running.max_failures.map(|m| m.to_string()),
        grace: running.grace.map(|g| humantime::format_duration(g).to_string()),
    }
}

/// Runs a resolved job: token first (bad credentials stop here, before any
/// file is written), then the run directory and `run.json`, then the pool.
async fn run_resolved(
    mut r: Resolved,
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
    let mut plan = |dir: PathBuf, r: &Resolved| Plan {
        requests: requests.clone(),
        inputs: r.inputs.clone(),
        failures: r.failures.clone(),
        settings: settings.clone(),
        limit: options.limit,
        dir,
        progress: options.progress,
        grace: options.grace,
        max_failures: options.max_failures,
        resume: resume.take(),
        shard: options.sharding.as_ref().map(|s| s.shard),
        run_id: options.sharding.as_ref().map(|s| s.run_id.clone()),
    };

    if options.dry_run {
        crate::output::create_run_dir(&dir)?;
        keep_spooled(&dir, &mut r)?;
        let finished = runner::dry_run(plan(dir.clone(), &r), authorized).await?;
        print_dry_run(&dir, options.log.verbose > 0);
        return Ok(close(&finished, &dir, &options));
    }

    // One run per job: a second one stops here, before any token request.
    // The lock lives in the job's own output folder, wherever `-o` puts the
    // run directory, so every run of the job meets it.
    // A shard's lock is its own, beside its directory: the shards of a run
    // go on at the same time.
    let _lock = match (&options.sharding, dir.parent()) {
        (Some(sharding), Some(run)) => {
            crate::output::lock_job(run, &format!("{}.{}", r.job.name, sharding.shard.dir_name()))?
        }
        _ => crate::output::lock_job(&settings.out_dir.join(&r.job.name), &r.job.name)?,
    };
    // Redis before the token: a shard that may not start asks for none.
    let redis = match &settings.coordination.redis_url {
        Some(url) => Some(Redis::connect(&RedisUrl::parse(url)?).await?),
        None => None,
    };
    if let (Some(redis), Some(sharding)) = (&redis, &options.sharding) {
        crate::coordination::pin_manifest(redis, &manifest(&r, sharding)?).await?;
    }
    let client = runner::http_client(&settings)?;
    let tokens = if authorized {
        r.loaded.token_url()?;
        let credentials = match credentials {
            Some(c) => c,
            None => settings.auth.credentials()?,
        };
        let (client_id, secret) = (credentials.client_id.clone(), credentials.client_secret.clone());
        let mut tokens = TokenSource::new(client.clone(), &settings.auth, credentials);
        if let Some(redis) = &redis {
            match crate::token::shared::load_key(&settings.auth)? {
                Some(key) => {
                    let store =
                        SharedStore::new(redis.clone(), &settings.auth, &client_id, secret.expose_secret(), key);
                    tokens = tokens.with_shared(store);
                }
                None => tracing::warn!(
                    "{} is not set (nor auth.shared_key_file): the processes share the rate limit, \
                     but each fetches its own token",
                    crate::token::shared::KEY_VARIABLE
                ),
            }
        }
        tokens.get().await?;
        Some(tokens)
    } else {
        None
    };
    // The run directory's own lock (`resume` takes it before it reads anything there).
    let _dir_lock = if resuming {
        None
    } else {
        crate::output::create_run_dir(&dir)?;
        let lock = crate::output::lock_run_dir(&dir)?;
        keep_spooled(&dir, &mut r)?;
        write_run_json(&dir, &r, &options).await?;
        Some(lock)
    };
    let part = options.sharding.as_ref().map(|s| format!(" shard {} of run {}", s.shard, s.run_id)).unwrap_or_default();
    tracing::info!(
        "{} {}{part} ({} input{}) into {}",
        if resuming { "resuming" } else { "running" },
        r.job.name,
        r.inputs.len(),
        if r.inputs.len() == 1 { "" } else { "s" },
        dir.display()
    );
    if !requests.idempotent() {
        tracing::info!(
            "{} is not idempotent ({} without idempotency_key): a row is sent again only when the gateway \
             provably did not act on it; after a timeout, a lost connection or a 5xx it fails (in_doubt or \
             server_error) instead of risking a duplicate. Set idempotency_key, or idempotent = true for a query",
            r.job.name,
            r.job.method()
        );
    }
    let shared_limit = redis.map(|redis| {
        // The shards of a run share its limit; without shards, the runs of
        // the job on every host do.
        let (run_id, processes) =
            options.sharding.as_ref().map_or((r.job.name.as_str(), 1), |s| (s.run_id.as_str(), s.shard.count));
        let key = crate::coordination::run_key(run_id, "limit");
        Arc::new(RedisLimiter::new(redis, key, settings.rate, settings.burst, processes))
    });
    let limiter: Arc<dyn Limiter> = match &shared_limit {
        Some(shared) => shared.clone(),
        None => Arc::new(LocalLimiter::new(settings.rate, settings.burst)),
    };
    let finished = runner::run(plan(dir.clone(), &r), tokens, limiter, stop).await?;
    if let Some(shared) = shared_limit {
        let (round_trips, calls) = shared.round_trips();
        tracing::info!(
            "shared rate limit: {round_trips} round trips to Redis for {calls} calls ({:.3} per call)",
            round_trips as f64 / calls.max(1) as f64
        );
    }
    if let Err(e) = write_report(&dir) {
        tracing::warn!("could not write report.html: {e}");
    }
    Ok(close(&finished, &dir, &options))
}

async fn resume(args: ResumeArgs, log: LogArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let dir = args.run_dir;
    let info_path = dir.join("run.json");
    // One process works on a run directory at a time, wherever each was
    // started from: the lock is taken before anything in it is read.
    let _dir_lock = if info_path.is_file() { Some(crate::output::lock_run_dir(&dir)?) } else { None };
    let text = std::fs::read_to_string(&info_path).map_err(|e| {
        // The folder of a sharded run: each shard resumes on its own.
        if let Ok(run) = crate::status::RunStatus::read(&dir) {
            let left: Vec<String> = run
                .shards
                .iter()
                .filter(|s| !s.state.finished())
                .map(|s| format!("{} resume {}", crate::options::program(), s.dir.display()))
                .collect();
            return Error::Usage(format!(
                "{} is the folder of a run split into {} shards: each resumes on its own (or is started again \
                 with the same command); {}",
                dir.display(),
                run.shards.len(),
                if left.is_empty() { "every shard finished".to_string() } else { left.join("; ") }
            ));
        }
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
    // A row in doubt may have been acted on: only an idempotent job sends it again unasked.
    let in_doubt_rule = args.in_doubt.unwrap_or(if job.idempotent() { InDoubt::Resend } else { InDoubt::Fail });
    // The run's own flags apply again, and the flags given now win over
    // them; URLs, credentials, headers and ca_file come from the config
    // and the environment as they are now, so a fix made there is used.
    let given = run_flags(&args.settings, &args.running);
    let mut flags = info.flags.clone();
    flags.settings.extend(given.settings);
    let bad = |flag: &str, e: String| Error::Usage(format!("{}: {flag}: {e}", info_path.display()));
    let max_failures = given.max_failures.or(flags.max_failures);
    let max_failures =
        max_failures.as_deref().map(str::parse::<MaxFailures>).transpose().map_err(|e| bad("max_failures", e))?;
    let grace = given.grace.or(flags.grace);
    let grace = grace.as_deref().map(humantime::parse_duration).transpose().map_err(|e| bad("grace", e.to_string()))?;
    // The config file named now (it moved), else the run's.
    if args.config.is_none()
        && let Some(was) = info.config.as_deref().filter(|c| !c.exists())
    {
        return Err(Error::Usage(format!(
            "the run's config file {} is gone; if it moved, `{} resume {} -c NEW_PATH` reads it from there",
            was.display(),
            crate::options::program(),
            dir.display()
        )));
    }
    let config_file = args.config.or_else(|| info.config.clone());
    let sources = Sources {
        no_config: config_file.is_none(),
        config_file,
        profile: Some(info.profile.clone()).filter(|p| p != "default"),
        job: job.settings.clone(),
        flags: flags.settings,
        env: true,
    };
    let loaded = sources.load()?;
    let inputs: Vec<PathBuf> = info.inputs.iter().map(|i| i.path.clone()).collect();
    let saved: Vec<(Format, u8)> =
        info.inputs.iter().map(|i| (i.format, i.delimiter.bytes().next().unwrap_or(b','))).collect();
    let mut resolved = resolve_inputs(job, loaded, &inputs, None, &saved)?;
    for (failures, was) in resolved.failures.iter_mut().zip(&info.inputs) {
        // Runs from before failures files were named in run.json keep the name computed now.
        if let Some(name) = &was.failures {
            failures.clone_from(name);
        }
    }

    // A run that finished has nothing to resume.
    let earlier: Option<crate::report::Summary> =
        std::fs::read_to_string(dir.join("summary.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    if let Some(summary) = &earlier
        && matches!(summary.exit_code, 0 | 1)
    {
        eprintln!(
            "bulkcall: nothing to resume: {} finished ({} rows: {} succeeded, {} failed)",
            dir.display(),
            summary.total,
            summary.succeeded,
            summary.failed
        );
        return Ok(if summary.exit_code == 0 { ExitCode::Success } else { ExitCode::RowsFailed });
    }
    let mut recorded = crate::report::Stats::default();
    let (mut first, mut last) = (u64::MAX, 0);
    let (mut done, started) = crate::output::Ledger::read(&dir, |d| {
        recorded.add_recorded(d.status, d.error.as_deref(), d.attempts, d.latency_us);
        if d.at_ms > 0 {
            (first, last) = (first.min(d.at_ms), last.max(d.at_ms));
        }
    })?;
    // Time already spent: from the last summary, or (after a crash) the ledger's marks.
    recorded.add_earlier_time(match &earlier {
        Some(summary) => Duration::from_secs_f64(summary.duration_s.max(0.0)),
        None => Duration::from_millis(last.saturating_sub(first)),
    });
    // Outcomes on file without their done mark (a crash came between the
    // two) are done: matched exactly on (input, row), never by row alone.
    let mut in_doubt: std::collections::HashSet<(usize, u64)> = started.into_iter().collect();
    let mut recovered = Vec::new();
    // Each failures file is written with its input's delimiter.
    let failures_read: Vec<(String, u8)> =
        resolved.failures.iter().zip(&resolved.inputs).map(|(name, spec)| (name.clone(), spec.delimiter)).collect();
    for (input, row, outcome) in crate::output::recent_outcomes(&dir, &failures_read, |i, row| done.contains(i, row)) {
        // A line that does not say its input could be another input's row.
        let Some(input) = input.filter(|&i| i < resolved.inputs.len()) else { continue };
        if done.insert(input, row) {
            in_doubt.remove(&(input, row));
            recorded.add_recorded(outcome.status, outcome.error.as_deref(), outcome.attempts, outcome.latency_us);
            recovered.push((input, row, outcome));
        }
    }
    crate::output::Ledger::recovered(&dir, &recovered)?;
    tracing::info!(
        "{} rows already have an outcome; {} were in flight when the run stopped ({})",
        done.len(),
        in_doubt.len(),
        if in_doubt_rule == InDoubt::Fail { "written to failures as in_doubt" } else { "sending them again" }
    );
    let options = RunOptions {
        log,
        out: Some(dir.clone()),
        limit: info.limit,
        dry_run: false,
        max_failures,
        grace: grace.unwrap_or(RunningArgs::DEFAULT_GRACE),
        progress: args.running.progress,
        json: args.running.json,
        flags: info.flags.clone(),
        // The config file read now: the one `-c` named if it moved.
        rerun: rerun_command(
            &info.job,
            Some(info.profile.as_str()).filter(|p| *p != "default"),
            resolved.loaded.config_file.as_deref(),
        ),
        resumable: true,
        sharding: match (info.shard, info.run_id) {
            (Some(shard), Some(run_id)) => Some(Sharding { shard, run_id, inputs: info.inputs.clone() }),
            _ => None,
        },
    };
    let resume = Resume { done, recorded, in_doubt, fail_in_doubt: in_doubt_rule == InDoubt::Fail };
    run_resolved(resolved, None, options, Some(resume), stop).await
}

/// Shows the first requests of a dry run: row, key and method; whole (URL,
/// headers, body: row values) only with -v.
fn print_dry_run(dir: &Path, verbose: bool) {
    let path = dir.join("requests.jsonl");
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines().take(3) {
            if verbose {
                println!("{line}");
            } else if let Ok(request) = serde_json::from_str::<Value>(line) {
                let text = |field: &str| request[field].as_str().unwrap_or_default().to_string();
                println!("row {} (key {}): {}", request["row"], text("key"), text("method"));
            }
        }
        if verbose {
            eprintln!("(-v: the requests above show row values)");
        } else {
            eprintln!("  whole requests (URL, headers, body) in {}, readable by its owner only", path.display());
        }
    }
}

/// How to run the job again with the same configuration (for the hint
/// that sends the failures again).
fn rerun_command(job: &Path, profile: Option<&str>, config: Option<&Path>) -> String {
    let mut command = format!("{} run {}", crate::options::program(), job.display());
    if let Some(config) = config {
        command.push_str(&format!(" -c {}", config.display()));
    }
    if let Some(profile) = profile {
        command.push_str(&format!(" -p {profile}"));
    }
    command
}

/// Builds and writes a run's `report.html`; in the folder of a sharded
/// run, one page over every shard.
fn write_report(dir: &Path) -> Result<PathBuf, Error> {
    let html = if dir.join("run.json").exists() || dir.join("summary.json").exists() {
        crate::report::html::render(dir)?
    } else {
        crate::report::html::render_shards(&crate::status::RunStatus::read(dir)?)?
    };
    Ok(crate::output::write_report(dir, &html)?)
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// Prints the closing lines and returns the exit code. `-q` keeps only the
/// first line; `--log-format json` prints one JSON object instead.
fn close(finished: &Finished, dir: &Path, options: &RunOptions) -> ExitCode {
    let s = &finished.summary;
    if options.log.log_format == LogFormat::Json {
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "level": if finished.exit == ExitCode::Success { "INFO" } else { "WARN" },
            "message": "finished",
            "run_dir": dir,
            "summary": s,
        });
        eprintln!("{line}");
    } else if options.dry_run {
        eprintln!(
            "bulkcall: dry run: {} rendered into {} (nothing sent); {} cannot be sent",
            plural(finished.rendered, "request"),
            dir.join("requests.jsonl").display(),
            plural(s.failed, "row"),
        );
    } else {
        let how = match finished.exit {
            ExitCode::Interrupted | ExitCode::Locked => "stopped after",
            ExitCode::Auth | ExitCode::MaxFailures | ExitCode::Io | ExitCode::Usage | ExitCode::Internal => {
                "aborted after"
            }
            _ => "finished",
        };
        let errors: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let errors = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join(", ")) };
        eprintln!(
            "bulkcall: {how} {} in {:.1}s ({:.1} rows/s): {} succeeded, {} failed{errors}",
            plural(s.total, "row"),
            s.duration_s,
            s.rows_per_s,
            s.succeeded,
            s.failed,
        );
    }
    if !options.log.quiet && options.log.log_format == LogFormat::Text {
        if !options.dry_run {
            let throttled = s.throttled_rate.map(|r| format!("; throttled down to {r}/s")).unwrap_or_default();
            eprintln!(
                "  latency p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; {}, {}, {}{throttled}",
                s.latency_ms.p50,
                s.latency_ms.p90,
                s.latency_ms.p99,
                s.latency_ms.max,
                plural(s.attempts, "attempt"),
                plural(s.retries, "retry").replace("retrys", "retries"),
                plural(s.token_requests, "token request"),
            );
        }
        if !finished.first_failures.is_empty() {
            // Messages may quote server answers and row values: PHI stays in
            // the run directory unless -v asks for it here.
            let verbose = options.log.verbose > 0;
            eprintln!("  first failures:");
            for (brief, message) in &finished.first_failures {
                if verbose {
                    eprintln!("    {brief}: {message}");
                } else {
                    eprintln!("    {brief}");
                }
            }
            if verbose {
                eprintln!("  (-v: the messages above may quote server answers and row values)");
            } else {
                eprintln!("  why, with server answers and row values: the failures file, readable by its owner only");
            }
        }
        eprintln!("  run directory: {}", dir.display());
        if finished.failure_files.len() > 1 {
            for (input, file) in &finished.failure_files {
                eprintln!("  failures of {}: {}", input.display(), file.display());
            }
        }
        if !finished.failure_files.is_empty() {
            let files: Vec<String> = finished.failure_files.iter().map(|(_, f)| f.display().to_string()).collect();
            eprintln!("  send the failures again: {} {}", options.rerun, files.join(" "));
        }
        if s.in_doubt > 0 {
            let rows = if s.in_doubt == 1 { "1 row was".to_string() } else { format!("{} rows were", s.in_doubt) };
            eprintln!("  {rows} sent without a recorded answer (in doubt)");
        }
        if matches!(
            finished.exit,
            ExitCode::Interrupted
                | ExitCode::Locked
                | ExitCode::MaxFailures
                | ExitCode::Auth
                | ExitCode::Io
                | ExitCode::Internal
        ) && !options.dry_run
        {
            if options.resumable {
                eprintln!(
                    "  rows not yet sent are in neither file; send them with: {} resume {}",
                    crate::options::program(),
                    dir.display()
                );
            } else {
                eprintln!("  the demo's sandbox is gone with it: run `{} demo` again", crate::options::program());
            }
        }
    }
    if options.json {
        println!("{}", serde_json::to_string_pretty(s).expect("serializable"));
    }
    finished.exit
}

async fn validate(args: ValidateArgs, log: &LogArgs) -> Result<ExitCode, Error> {
    // A reason may quote a row's values (PHI): only -v shows it whole.
    let verbose = log.verbose > 0;
    let r = resolve(&args.job, &args.inputs, args.format, &args.config, &SettingArgs::default())?;
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
                        let why = if verbose { &e.message } else { e.brief() };
                        bad.push(format!("{} line {} (row {}): {why}", names[row.input], row.line, row.number));
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
    if verbose && !bad.is_empty() {
        eprintln!("(-v: the reasons above may quote row values)");
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
    let client = runner::http_client(&loaded.settings)?;
    let tokens = TokenSource::new(client, auth, auth.credentials()?);
    let token = if args.refresh { tokens.get_fresh().await? } else { tokens.get().await? };
    let left = token.expires_at.saturating_duration_since(tokio::time::Instant::now());
    let url = auth.token_url.as_deref().unwrap_or("");
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
        reject_credentials_after: None,
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

async fn demo(args: DemoArgs, log: LogArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
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
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| Error::Usage(format!("cannot write {}: {e}", path.display())))?;
    }
    let mut job = Job::parse(&job_path, DEMO_JOB)?;
    // Demo runs go to out/demo/, apart from real eligibility runs.
    job.name = "demo".into();
    let mut flags = Map::new();
    flags.insert("base_url".into(), Value::from(sandbox.base_url()));
    flags.insert("concurrency".into(), Value::from(16));
    flags.insert("rate".into(), Value::from(250));
    flags.insert("burst".into(), Value::from(16));
    flags.insert("out_dir".into(), Value::from(args.out_dir.display().to_string()));
    flags.insert("headers".into(), serde_json::json!({"environment": "sandbox"}));
    flags.insert("auth".into(), serde_json::json!({"style": "json", "token_url": sandbox.token_url(), "cache": false}));
    let loaded = Sources { job: job.settings.clone(), flags, no_config: true, ..Sources::default() }.load()?;
    let resolved = resolve_inputs(job, loaded, &[], None, &[])?;
    eprintln!(
        "bulkcall demo: sandbox at {}; sending the example's synthetic rows from {} (16 workers, 250 calls/s)",
        sandbox.base_url(),
        resolved.inputs[0].path.display()
    );
    let credentials = Credentials { client_id: "demo-client".into(), client_secret: SecretString::from(secret) };
    let options = RunOptions {
        log: log.clone(),
        out: None,
        limit: None,
        dry_run: false,
        max_failures: None,
        grace: RunningArgs::DEFAULT_GRACE,
        flags: RunFlags::default(),
        progress: args.progress,
        json: args.json,
        rerun: format!("{} run {}", crate::options::program(), job_path.display()),
        resumable: false,
        sharding: None,
    };
    let exit = run_resolved(resolved, Some(credentials), options, None, stop).await;
    sandbox.shutdown().await;
    if exit.is_ok() && !log.quiet {
        let program = crate::options::program();
        eprintln!(
            "next: `{program} sandbox` in one terminal, then `{program} run jobs/eligibility.toml -p local` in another"
        );
    }
    exit
}
