//! `bulkcall runs [JOB]`: the runs in the output folder at a glance, newest first.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cli::*;
use crate::config::Sources;
use crate::error::{Error, ExitCode};
use crate::output::RunInfo;
use crate::status::{RunStatus, State};

/// One run as `runs` lists it.
#[derive(Debug, Serialize)]
struct Listed {
    job: String,
    path: PathBuf,
    /// When it started (RFC 3339, UTC): its first shard's start for a split run.
    started_at: String,
    /// finished, failed rows, stopped, aborted, crashed, running, pending.
    state: String,
    done: u64,
    succeeded: u64,
    failed: u64,
    in_doubt: u64,
    /// The last session's exit code, when it ended.
    exit_code: Option<u8>,
}

pub(super) fn runs(args: RunsArgs) -> Result<ExitCode, Error> {
    let (job, out) = where_runs_are(&args)?;
    let jobs: Vec<PathBuf> = match &job {
        Some(name) => vec![out.join(name)],
        None => subfolders(&out),
    };
    let mut listed: Vec<Listed> = jobs.iter().flat_map(|folder| runs_in(folder)).collect();
    listed.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| b.path.cmp(&a.path)));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listed).expect("serializable"));
        return Ok(ExitCode::Success);
    }
    if listed.is_empty() {
        eprintln!("no runs in {}", job.map_or(out.clone(), |j| out.join(j)).display());
        return Ok(ExitCode::Success);
    }
    println!(
        "{:<20} {:<16} {:<22} {:>8} {:>9} {:>7} {:>8} {:>4}  run",
        "started", "job", "state", "done", "succeeded", "failed", "in doubt", "exit"
    );
    for run in &listed {
        let exit = run.exit_code.map_or_else(|| "-".to_string(), |c| c.to_string());
        println!(
            "{:<20} {:<16} {:<22} {:>8} {:>9} {:>7} {:>8} {:>4}  {}",
            run.started_at,
            run.job,
            run.state,
            run.done,
            run.succeeded,
            run.failed,
            run.in_doubt,
            exit,
            run.path.display()
        );
    }
    Ok(ExitCode::Success)
}

/// The job asked for (by name, or its spec's) and the folder of runs.
fn where_runs_are(args: &RunsArgs) -> Result<(Option<String>, PathBuf), Error> {
    let spec = args.job.as_deref().map(Path::new).filter(|p| p.extension().is_some_and(|e| e == "toml"));
    let job = spec.map(crate::job::Job::load).transpose()?;
    if let Some(out) = &args.out {
        let name = job.as_ref().map(|j| j.name.clone()).or_else(|| args.job.clone());
        return Ok((name, out.clone()));
    }
    let sources = Sources {
        config_file: args.config.config.clone(),
        profile: args.config.profile.clone(),
        no_config: false,
        job: job.as_ref().map(|j| j.settings.clone()).unwrap_or_default(),
        env: true,
        ..Sources::default()
    };
    let loaded = sources.load()?;
    let name = job.map(|j| j.name).or_else(|| args.job.clone());
    Ok((name, loaded.settings.out_dir))
}

fn subfolders(folder: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    found.sort();
    found
}

/// The runs in a job's folder: directories with a run.json, and folders
/// of shard directories (`latest` is a link to one of them, not a run).
fn runs_in(folder: &Path) -> Vec<Listed> {
    let job = folder.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let runs = subfolders(folder).into_iter().filter(|p| !p.is_symlink());
    runs.filter_map(|path| RunStatus::read(&path).ok().map(|run| listed(&job, path, &run))).collect()
}

fn listed(job: &str, path: PathBuf, run: &RunStatus) -> Listed {
    let (done, succeeded, failed, in_doubt) = run.total();
    let started_at = run
        .shards
        .iter()
        .filter_map(|s| serde_json::from_slice::<RunInfo>(&std::fs::read(s.dir.join("run.json")).ok()?).ok())
        .map(|info| info.started_at)
        .min()
        .unwrap_or_default();
    let running = run.shards.iter().find_map(|s| s.running.clone());
    let states: Vec<State> = run.shards.iter().map(|s| s.state).collect();
    let state = match running {
        Some(pid) => format!("running (pid {pid})"),
        None if states.contains(&State::Unfinished) => "crashed".into(),
        None if states.iter().any(|s| matches!(s, State::Stopped(130))) => "stopped".into(),
        None if states.iter().any(|s| matches!(s, State::Stopped(_))) => "aborted".into(),
        None if states.contains(&State::NotStarted) => "pending (shards to start)".into(),
        None if failed > 0 => "finished, rows failed".into(),
        None => "finished".into(),
    };
    // The worst exit code of the shards' last sessions.
    let exit_code = run.shards.iter().filter_map(|s| s.summary.as_ref().map(|m| m.exit_code)).max();
    Listed {
        job: run.job.clone().unwrap_or_else(|| job.to_string()),
        path,
        started_at,
        state,
        done,
        succeeded,
        failed,
        in_doubt,
        exit_code,
    }
}
