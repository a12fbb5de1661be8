//! The core that `run`, `resume` and `demo` share: from a resolved job to
//! a finished run (token, run directory, run.json, the pool, the closing lines).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use clap::ValueEnum;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cli::*;
use crate::config::{AuthStyle, Credentials};
use crate::coordination::{Manifest, Redis, RedisUrl};
use crate::error::{Error, ExitCode};
use crate::limiter::redis::RedisLimiter;
use crate::limiter::{Limiter, LocalLimiter};
use crate::output::{RunFlags, RunInfo};
use crate::runner::{self, Plan, Resume};
use crate::token::TokenSource;
use crate::token::shared::SharedStore;

use super::close::{close, print_dry_run};
use super::resolve::{Resolved, RunOptions, Sharding, absolute, fingerprint, keep_spooled};
use super::write_report;

/// The default run directory: `<out_dir>/<job>/<UTC timestamp>/`, with a
/// suffix when two runs start in the same second.
pub(super) fn default_run_dir(out_dir: &Path, job: &str) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
    let base = out_dir.join(job).join(&stamp);
    (1..)
        .map(|n| if n == 1 { base.clone() } else { out_dir.join(job).join(format!("{stamp}-{n}")) })
        .find(|p| !p.exists())
        .expect("a free name")
}

/// `run.json`: what `resume` needs, written before the first call goes out.
pub(super) async fn write_run_json(dir: &Path, r: &Resolved, options: &RunOptions) -> Result<(), Error> {
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
pub(super) fn manifest(r: &Resolved, sharding: &Sharding, limit: Option<u64>) -> Result<Manifest, Error> {
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
        limit,
    })
}

/// The flags of a run that `resume` applies again.
pub(super) fn run_flags(settings: &SettingArgs, running: &RunningArgs) -> RunFlags {
    RunFlags {
        settings: settings.to_map(),
        max_failures: running.max_failures.map(|m| m.to_string()),
        grace: running.grace.map(|g| humantime::format_duration(g).to_string()),
        in_doubt: None,
    }
}

/// `--in-doubt` as `run.json` keeps it.
pub(super) fn in_doubt_name(rule: InDoubt) -> String {
    rule.to_possible_value().expect("no variant is skipped").get_name().to_string()
}

/// `--in-doubt` from `run.json`.
pub(super) fn parse_in_doubt(name: &str) -> Result<InDoubt, String> {
    InDoubt::from_str(name, false)
}

/// Runs a resolved job: token first (bad credentials stop here, before any
/// file is written), then the run directory and `run.json`, then the pool.
/// The metrics, once started, end with the run's exit code, whatever
/// stopped it.
pub(super) async fn run_resolved(
    r: Resolved,
    credentials: Option<Credentials>,
    options: RunOptions,
    resume: Option<Resume>,
    stop: CancellationToken,
) -> Result<ExitCode, Error> {
    let mut metrics = None;
    let result = run_job(r, credentials, options, resume, stop, &mut metrics).await;
    if let Some(metrics) = metrics {
        metrics.finish(result.as_ref().map_or_else(|e| e.exit_code(), |code| *code).code()).await;
    }
    result
}

async fn run_job(
    mut r: Resolved,
    credentials: Option<Credentials>,
    options: RunOptions,
    resume: Option<Resume>,
    stop: CancellationToken,
    metrics: &mut Option<crate::metrics::Exporter>,
) -> Result<ExitCode, Error> {
    let settings = r.loaded.settings.clone();
    // Before any file or token: -j must fit under the open-files limit.
    let requests = Arc::new(r.job.requests(&settings)?);
    if !options.dry_run {
        // A job that polls has as many polls in flight at most besides.
        let calls = if requests.poll().is_some() { 2 * settings.concurrency } else { settings.concurrency };
        runner::enough_descriptors(calls)?;
        runner::tune_allocator(calls);
    }
    let dir = options.out.clone().unwrap_or_else(|| default_run_dir(&settings.out_dir, &r.job.name));
    let authorized = settings.auth.style != AuthStyle::None;
    let resuming = resume.is_some();
    let mut resume = resume;
    // The run's events: told from here on, written once the run directory is there.
    let events = crate::events::Events::default();
    let mut plan = |dir: PathBuf, r: &Resolved| Plan {
        resumable: options.resumable,
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
        leave_out_earlier: options.in_doubt.unwrap_or(if requests.idempotent() {
            InDoubt::Resend
        } else {
            InDoubt::Fail
        }) == InDoubt::Fail,
        metrics: crate::metrics::Board::default(),
        events: events.clone(),
    };

    if options.dry_run {
        crate::output::create_run_dir(&dir)?;
        keep_spooled(&dir, &mut r)?;
        let finished = runner::dry_run(plan(dir.clone(), &r), authorized).await?;
        print_dry_run(&dir, options.log.verbose > 0, options.json);
        return Ok(close(&finished, &dir, &options, &r.job.name, requests.idempotent()));
    }

    // One run per job: a second one stops here, before any token request.
    // The lock lives beside the run directory (in `out/<job>/` by
    // default), so every run of the job into that folder meets it, and
    // nothing is written to the current folder when `-o` puts the run
    // elsewhere. A shard's lock is its own: the shards of a run go on at
    // the same time.
    let folder = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let _lock = match &options.sharding {
        Some(sharding) => crate::output::lock_job(folder, &format!("{}.{}", r.job.name, sharding.shard.dir_name()))?,
        None => crate::output::lock_job(folder, &r.job.name)?,
    };
    // The metrics once the run is this process's (never over a running
    // one's file), before anything else: a Redis or token endpoint that
    // stops the run shows in its exit code there; an address that cannot be
    // bound or a file that cannot be written stops it before any request.
    let shard = options.sharding.as_ref().map(|s| s.shard);
    let board = metrics.insert(crate::metrics::Exporter::start(&settings.metrics, &r.job.name, shard).await?).board();
    // Redis before the token: a shard that may not start asks for none.
    let redis = match &settings.coordination.redis_url {
        Some(url) => Some(Redis::connect(&RedisUrl::parse(url)?).await?),
        None => None,
    };
    if let Some(sharding) = &options.sharding {
        let manifest = manifest(&r, sharding, options.limit)?;
        crate::coordination::pin_manifest_file(folder, &manifest)?;
        if let Some(redis) = &redis {
            crate::coordination::pin_manifest(redis, &manifest).await?;
        }
    }
    let client = runner::token_client(&settings)?;
    let tokens = if authorized {
        r.loaded.token_url()?;
        let credentials = match credentials {
            Some(c) => c,
            None => r.loaded.credentials()?,
        };
        let request_key = crate::token::request_key(&settings.auth, &credentials);
        let mut tokens = TokenSource::new(client.clone(), &settings.auth, credentials).with_events(events.clone());
        if let Some(redis) = &redis {
            match crate::token::shared::load_key(&settings.auth)? {
                Some(key) => {
                    tokens = tokens.with_shared(SharedStore::new(redis.clone(), &request_key, key));
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
        // `out/<job>/latest` at the newest run in the job's folder of runs
        // (a split run's folder, not a shard's directory); none for a run
        // that -o puts elsewhere.
        let run = if options.sharding.is_some() { folder } else { dir.as_path() };
        let runs = settings.out_dir.join(&r.job.name);
        if run.parent() == Some(runs.as_path()) {
            crate::output::point_latest(&runs, run);
        }
        Some(lock)
    };
    events.attach(Box::new(crate::output::EventsFile::open(&dir, resuming)?));
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
        Arc::new(RedisLimiter::new(redis, key, settings.rate, settings.burst, processes).with_events(events.clone()))
    });
    let limiter: Arc<dyn Limiter> = match &shared_limit {
        Some(shared) => shared.clone(),
        None => Arc::new(LocalLimiter::new(settings.rate, settings.burst).with_events(events.clone())),
    };
    let mut planned = plan(dir.clone(), &r);
    planned.metrics = board;
    let finished = runner::run(planned, tokens, limiter, stop).await;
    events.detach();
    let finished = finished?;
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
    Ok(close(&finished, &dir, &options, &r.job.name, requests.idempotent()))
}
