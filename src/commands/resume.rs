//! `bulkcall resume`: finish a stopped, killed or crashed run.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cli::*;
use crate::config::Sources;
use crate::error::{Error, ExitCode};
use crate::input::Format;
use crate::input::InputFingerprint;
use crate::job::Job;
use crate::lifecycle::{Recovery, RowStates};
use crate::options::MaxFailures;
use crate::output::RunInfo;
use crate::runner::Resume;

use super::close::rerun_command;
use super::launch::{parse_in_doubt, run_flags, run_resolved};
use super::resolve::resolve_inputs;
use super::resolve::{RunOptions, Sharding};

pub(super) async fn resume(args: ResumeArgs, log: LogArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
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
                .map(|s| {
                    format!("{} resume {}", crate::options::program(), crate::options::shell_word(s.dir.display()))
                })
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
    // Over a failures file, the run's own `--in-doubt` unless one is given now.
    let earlier_rule = match args.in_doubt {
        Some(rule) => Some(rule),
        None => flags.in_doubt.as_deref().map(parse_in_doubt).transpose().map_err(|e| bad("in_doubt", e))?,
    };
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
    // Each failures file is written with its input's delimiter.
    let failures_read: Vec<(String, u8)> =
        resolved.failures.iter().zip(&resolved.inputs).map(|(name, spec)| (name.clone(), spec.delimiter)).collect();
    // Outcomes on file without their done mark (a crash came between the
    // two) are done, marked so before anything is sent.
    let (states, recovered) =
        RowStates::recover(&dir, Recovery { failures: &failures_read, inputs: resolved.inputs.len() }, |d| {
            recorded.add_recorded(d.status, d.error.as_deref(), d.attempts, d.latency_us);
            if d.at_ms > 0 {
                (first, last) = (first.min(d.at_ms), last.max(d.at_ms));
            }
        })?;
    if let Some(summary) = &earlier {
        recorded.add_budget_stopped(summary.budget_stopped);
    }
    // Time already spent: from the last summary, or (after a crash) the ledger's marks.
    recorded.add_earlier_time(match &earlier {
        Some(summary) => Duration::from_secs_f64(summary.duration_s.max(0.0)),
        None => Duration::from_millis(last.saturating_sub(first)),
    });
    for (_, _, outcome) in &recovered {
        recorded.add_recorded(outcome.status, outcome.error.as_deref(), outcome.attempts, outcome.latency_us);
    }
    // Rows a `[poll]` job's gateway accepted and that have no outcome yet
    // (pending): never sent again, polled (not in doubt, and skipped by the
    // reader as the rows done are).
    let RowStates { mut done, in_doubt, pending, .. } = states;
    let mut accepted = Vec::with_capacity(pending.len());
    for (input, row, place) in pending {
        done.insert(input, row);
        accepted.push(place);
    }
    if !accepted.is_empty() && !resolved.job.polls() && !args.give_up_pending {
        return Err(Error::Usage(format!(
            "{} rows of this run were accepted by the gateway and wait on their polls, but {} has no [poll] \
             table now: put it back to poll them, or resume with --give-up-pending to write them to failures",
            accepted.len(),
            info.job.display()
        )));
    }
    if args.give_up_pending && accepted.is_empty() {
        tracing::info!("--give-up-pending: no row of this run is pending");
    }
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
        in_doubt: earlier_rule,
    };
    let resume = Resume {
        done,
        recorded,
        in_doubt,
        fail_in_doubt: in_doubt_rule == InDoubt::Fail,
        accepted,
        give_up_pending: args.give_up_pending,
        polls: earlier.as_ref().map_or(0, |s| s.polls),
    };
    run_resolved(resolved, None, options, Some(resume), stop).await
}
