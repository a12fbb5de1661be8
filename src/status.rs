//! The state of a run, read from its run directory, or from every shard's
//! directory of a run split over several processes (`<run>/shard-K-of-N/`):
//! rows done, failed and in doubt per shard, and which shards have not
//! finished. `bulkcall status` prints it; `bulkcall report` over a sharded
//! run builds one page from it. It only reads: a shard that is running
//! goes on undisturbed.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::exit::ExitCode;
use crate::lifecycle::RowStates;
use crate::output::{OutputError, RunInfo};
use crate::report::Summary;
use crate::shard::Shard;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0} is not a run: it has neither a run.json nor shard-K-of-N directories")]
    NotARun(PathBuf),
    #[error("{path} holds shards of runs split differently ({counts}): give the folder of one run")]
    MixedCounts { path: PathBuf, counts: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Ledger(#[from] OutputError),
}

/// Where a shard (or an unsharded run) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "exit_code")]
pub enum State {
    /// No run directory, or no `run.json` in it: nothing was sent.
    NotStarted,
    /// `run.json` but no `summary.json`: running now, or stopped by a
    /// crash (`kill -9`, a node lost); `resume` finishes it.
    Unfinished,
    /// It ended with this exit code (0 or 1): every row has an outcome.
    Finished(u8),
    /// It stopped early with this exit code (interrupted, aborted); rows
    /// not sent stay resumable. A resume may be running now.
    Stopped(u8),
}

impl State {
    pub fn finished(self) -> bool {
        matches!(self, State::Finished(_))
    }

    pub fn describe(self) -> String {
        match self {
            State::NotStarted => "not started".into(),
            State::Unfinished => "crashed (no process on it)".into(),
            State::Finished(0) => "finished".into(),
            State::Finished(_) => "finished, rows failed".into(),
            State::Stopped(130) => "interrupted (exit 130)".into(),
            // The gateway out, a pause asked for, rows pending: not an abort.
            State::Stopped(75) => "stopped (exit 75)".into(),
            State::Stopped(code) => format!("aborted (exit {code})"),
        }
    }
}

/// One shard's directory (or an unsharded run's), as read.
#[derive(Debug, Clone, Serialize)]
pub struct ShardStatus {
    /// `None` for a run that is not split.
    pub shard: Option<Shard>,
    pub dir: PathBuf,
    #[serde(flatten)]
    pub state: State,
    /// Rows with a recorded outcome.
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// The pid of the process working on it now (it holds the directory's
    /// lock): a run going on, or a resume of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// Rows sent without a recorded answer: failed as `in_doubt`, or
    /// started with no outcome yet (in flight, or lost in a crash).
    pub in_doubt: u64,
    /// Rows of a `[poll]` job accepted by the gateway and not final yet
    /// (`accepted.jsonl`, no outcome): `resume` polls them.
    pub pending: u64,
    /// The last `summary.json`, when there is one.
    #[serde(skip)]
    pub summary: Option<Summary>,
}

/// A run: one directory, or the directories of all its shards.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    pub path: PathBuf,
    pub run_id: Option<String>,
    pub job: Option<String>,
    /// In shard order; a shard with no directory yet is `NotStarted`.
    pub shards: Vec<ShardStatus>,
}

impl RunStatus {
    /// Reads a run directory, a shard's directory, or the folder that holds
    /// a run's `shard-K-of-N` directories.
    pub fn read(path: &Path) -> Result<RunStatus, StatusError> {
        if path.join("run.json").exists() {
            let status = read_dir(None, path)?;
            let info = read_info(path);
            let shard = info.as_ref().and_then(|i| i.shard);
            return Ok(RunStatus {
                path: path.to_path_buf(),
                run_id: info.as_ref().and_then(|i| i.run_id.clone()),
                job: info.map(|i| i.job_name),
                shards: vec![ShardStatus { shard, ..status }],
            });
        }
        let entries = std::fs::read_dir(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => StatusError::NotARun(path.to_path_buf()),
            _ => StatusError::Read { path: path.to_path_buf(), source },
        })?;
        let found: Vec<Shard> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| Shard::from_dir_name(&e.file_name().to_string_lossy()))
            .collect();
        let mut counts: Vec<u32> = found.iter().map(|s| s.count).collect();
        counts.sort_unstable();
        counts.dedup();
        let count = match counts.as_slice() {
            [] => return Err(StatusError::NotARun(path.to_path_buf())),
            [count] => *count,
            _ => {
                let counts = counts.iter().map(|n| format!("{n} shards")).collect::<Vec<_>>().join(", ");
                return Err(StatusError::MixedCounts { path: path.to_path_buf(), counts });
            }
        };
        let mut run = RunStatus { path: path.to_path_buf(), run_id: None, job: None, shards: Vec::new() };
        for index in 0..count {
            let shard = Shard { index, count };
            let dir = shard.dir(path);
            if let Some(info) = read_info(&dir) {
                run.run_id = run.run_id.or(info.run_id);
                run.job = run.job.or(Some(info.job_name));
            }
            run.shards.push(read_dir(Some(shard), &dir)?);
        }
        Ok(run)
    }

    /// Every shard finished (every row has an outcome).
    pub fn finished(&self) -> bool {
        self.shards.iter().all(|s| s.state.finished())
    }

    /// 0 when every shard finished and every row succeeded, 1 when every
    /// shard finished and some rows failed, 75 (come back later) while a
    /// shard has not finished.
    pub fn exit_code(&self) -> ExitCode {
        if !self.finished() {
            ExitCode::Locked
        } else if self.shards.iter().any(|s| s.failed > 0 || s.state != State::Finished(0)) {
            ExitCode::RowsFailed
        } else {
            ExitCode::Success
        }
    }

    pub fn total(&self) -> (u64, u64, u64, u64) {
        self.shards
            .iter()
            .fold((0, 0, 0, 0), |(d, s, f, i), x| (d + x.done, s + x.succeeded, f + x.failed, i + x.in_doubt))
    }

    /// The lines `bulkcall status` prints.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let name = self.run_id.as_deref().or(self.job.as_deref()).unwrap_or("run");
        let finished = self.shards.iter().filter(|s| s.state.finished()).count();
        let _ = writeln!(out, "{name}: {}", self.path.display());
        if self.shards.len() > 1 || self.shards[0].shard.is_some() {
            let _ = writeln!(out, "{finished} of {} shards finished", self.shards.len());
        }
        let _ = writeln!(
            out,
            "{:<8} {:<24} {:>10} {:>10} {:>10} {:>9}",
            "shard", "state", "done", "succeeded", "failed", "in doubt"
        );
        for s in &self.shards {
            let shard = s.shard.map_or_else(|| "-".to_string(), |s| s.to_string());
            let state = match &s.running {
                Some(pid) => format!("running (pid {pid})"),
                None => s.state.describe(),
            };
            let _ = writeln!(
                out,
                "{shard:<8} {state:<24} {:>10} {:>10} {:>10} {:>9}",
                s.done, s.succeeded, s.failed, s.in_doubt
            );
        }
        if self.shards.len() > 1 {
            let (done, succeeded, failed, in_doubt) = self.total();
            let _ = writeln!(out, "{:<8} {:<24} {done:>10} {succeeded:>10} {failed:>10} {in_doubt:>9}", "all", "");
        }
        let pending: u64 = self.shards.iter().map(|s| s.pending).sum();
        if pending > 0 {
            let _ = writeln!(
                out,
                "{pending} rows accepted by the gateway are pending (not final yet): resume polls them, never sends them again"
            );
        }
        let unfinished: Vec<&ShardStatus> = self.shards.iter().filter(|s| !s.state.finished()).collect();
        if !unfinished.is_empty() && self.shards[0].shard.is_some() {
            let names: Vec<String> = unfinished.iter().filter_map(|s| s.shard).map(|s| s.to_string()).collect();
            let _ = writeln!(out, "not finished: {}", names.join(", "));
        }
        for s in unfinished.iter().filter(|s| matches!(s.state, State::Unfinished | State::Stopped(_))) {
            let program = crate::options::program();
            let _ = match (&s.running, s.shard) {
                (Some(pid), _) => {
                    writeln!(out, "  {}: pid {pid} is working on it; wait for it to end", s.dir.display())
                }
                (None, Some(_)) => writeln!(
                    out,
                    "  send the rest: {program} resume {} (or start the shard again with the same command)",
                    crate::options::shell_word(s.dir.display())
                ),
                (None, None) => {
                    writeln!(out, "  send the rest: {program} resume {}", crate::options::shell_word(s.dir.display()))
                }
            };
        }
        out
    }
}

fn read_info(dir: &Path) -> Option<RunInfo> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).ok()?).ok()
}

fn read_dir(shard: Option<Shard>, dir: &Path) -> Result<ShardStatus, StatusError> {
    let mut status = ShardStatus {
        shard,
        dir: dir.to_path_buf(),
        state: State::NotStarted,
        done: 0,
        succeeded: 0,
        failed: 0,
        in_doubt: 0,
        pending: 0,
        running: None,
        summary: None,
    };
    if !dir.join("run.json").exists() {
        return Ok(status);
    }
    let summary: Option<Summary> =
        std::fs::read_to_string(dir.join("summary.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    status.state = match &summary {
        None => State::Unfinished,
        Some(s) if matches!(s.exit_code, 0 | 1) => State::Finished(s.exit_code),
        Some(s) => State::Stopped(s.exit_code),
    };
    let (mut succeeded, mut failed, mut in_doubt) = (0, 0, 0);
    let mut count = |outcome: &crate::output::Done| match outcome.error.as_deref() {
        None => succeeded += 1,
        Some(kind) => {
            failed += 1;
            in_doubt += u64::from(kind == crate::outcome::ErrorKind::InDoubt.as_str());
        }
    };
    // With the recovery `resume` makes, so the counts agree with what it
    // finds, but writing nothing: a process may be working on the run.
    // Each input's failures file and the delimiter it is written with (a
    // run from before run.json named them: the names a run gives them).
    let info = read_info(dir);
    let inputs = info.as_ref().map(|i| i.inputs.as_slice()).unwrap_or_default();
    let delimiter = |i: &crate::input::InputFingerprint| i.delimiter.bytes().next().unwrap_or(b',');
    let named: Vec<_> = inputs.iter().map(|i| (i.path.clone(), i.format, delimiter(i))).collect();
    let failures: Vec<(String, u8)> = inputs
        .iter()
        .zip(crate::output::failure_file_names(&named))
        .map(|(i, computed)| (i.failures.clone().unwrap_or(computed), delimiter(i)))
        .collect();
    let recovery = crate::lifecycle::Recovery { failures: &failures, inputs: inputs.len() };
    let (states, recovered) = RowStates::read_recovering(dir, recovery, &mut count)?;
    for (_, _, outcome) in &recovered {
        count(outcome);
    }
    status.done = states.done.len();
    (status.succeeded, status.failed, status.in_doubt) = (succeeded, failed, in_doubt);
    // Started and not done: in doubt, unless the gateway's acceptance is on file (pending).
    status.pending = states.pending.len() as u64;
    status.in_doubt += states.in_doubt.len() as u64;
    status.summary = summary;
    status.running = crate::output::run_dir_holder(dir);
    Ok(status)
}
