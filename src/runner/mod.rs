//! The pool: rows → rate limiter → workers → outcomes → the run's files.
//!
//! A reader thread streams rows in batches into a bounded channel; lanes
//! (a thread each) take the batches; in a lane, workers take one row at a
//! time, render it, and send it, every attempt through the rate limiter and
//! with the shared token; each row's outcome goes to the one recorder
//! thread, which keeps statistics and writes outcomes in groups, each group
//! made durable with one sync while the workers go on sending. A failed row
//! is data, not an early return: only a fatal token error or a stream of
//! 401s stops the pool.

mod breaker;
mod call;
mod dry;
mod http;
mod lane;
mod poller;
mod reader;
mod recorder;
mod worker;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::error::{Error, ExitCode};
use crate::events::{Event, Events};
use crate::input::{InputSpec, Item};
use crate::job::Requests;
use crate::limiter::{Limiter, RetryBudget};
use crate::options::MaxFailures;
use crate::outcome::Outcome;
use crate::output::{AcceptedFile, GroupCommit, InputInfo, Ledger, MarkStarted, Writer};
use crate::report::{Live, Progress, ProgressMode, ProgressSource, Stats, Summary};
use crate::retry::Policy;
use crate::rows::RowSet;
use crate::shard::Shard;
use crate::token::TokenSource;

use breaker::Breaker;
use lane::start_lane;
use poller::start_poller;
use reader::spawn_reader;
use recorder::{Outcomes, Recorder, WAITING_BYTES, start_recorder};

pub use dry::dry_run;
pub use http::{http_client, token_client};

/// Everything a run needs, resolved.
pub struct Plan {
    /// Whether `bulkcall resume` can finish the run (not the demo's).
    pub resumable: bool,
    pub requests: Arc<Requests>,
    pub inputs: Vec<InputSpec>,
    /// Each input's failures file name, as run.json has it.
    pub failures: Vec<String>,
    pub settings: Settings,
    /// Send only the first N rows.
    pub limit: Option<u64>,
    /// The run directory, already created.
    pub dir: PathBuf,
    pub progress: ProgressMode,
    /// How long calls in flight may take to finish after a stop.
    pub grace: Duration,
    /// Abort (exit 4) once this many rows have failed.
    pub max_failures: Option<MaxFailures>,
    /// Continuing an earlier run into the same directory.
    pub resume: Option<Resume>,
    /// This process's part of a run split over several: only its rows are read.
    pub shard: Option<Shard>,
    /// The name shared by every shard of the run (sharded runs only).
    pub run_id: Option<String>,
    /// Rows of a failures file that failed where the gateway may have acted
    /// on them are left out (recorded as failures again, not sent).
    pub leave_out_earlier: bool,
    /// Where the metrics read the run's figures.
    pub metrics: crate::metrics::Board,
    /// Where the run's start, stop, abort and end are told.
    pub events: Events,
}

/// What the ledger of an interrupted run says.
#[derive(Default)]
pub struct Resume {
    /// Rows with a recorded outcome: never sent again.
    pub done: RowSet,
    /// The statistics of those rows, and how long the earlier parts of the run took.
    pub recorded: Stats,
    /// Rows sent with no recorded outcome.
    pub in_doubt: HashSet<(usize, u64)>,
    /// Write in-doubt rows to failures as `in_doubt` instead of resending them.
    pub fail_in_doubt: bool,
    /// Rows of a `[poll]` job accepted earlier and not final: polled, never sent again.
    pub accepted: Vec<crate::output::Place>,
    /// `--give-up-pending`: write those to failures as `pending` instead of polling them.
    pub give_up_pending: bool,
    /// Polls sent by the earlier parts of the run.
    pub polls: u64,
}

/// How a run ended.
#[derive(Debug)]
pub struct Finished {
    pub summary: Summary,
    pub exit: ExitCode,
    /// What stopped the run early, if anything did.
    pub abort: Option<Error>,
    /// The failures files written to: (input, its failures file).
    pub failure_files: Vec<(PathBuf, PathBuf)>,
    /// The first few failures, to show at the end: row, key, error kind
    /// and status; then the message, which may quote the server's answer
    /// or row values (PHI), shown only with `-v`.
    pub first_failures: Vec<(String, String)>,
    /// Dry runs: the requests rendered into `requests.jsonl`.
    pub rendered: u64,
}

/// How many failures the closing lines show.
const SHOWN_FAILURES: usize = 3;

fn describe_failure(outcome: &Outcome) -> Option<(String, String)> {
    let failure = outcome.result.as_ref().err()?;
    let status = outcome.status.map(|s| format!(", status {s}")).unwrap_or_default();
    // A row sent again from a failures file: where it was first.
    let first =
        outcome.origin.as_ref().and_then(|o| o.row).map(|r| format!(", first run's row {r}")).unwrap_or_default();
    let brief = format!("row {} (key {}{first}): {}{status}", outcome.number, outcome.key, failure.kind.as_str());
    Some((brief, failure.message.chars().take(160).collect()))
}

/// State every worker shares. Each field is here because every attempt of
/// every row consults it.
struct Shared {
    requests: Arc<Requests>,
    tokens: Option<TokenSource>,
    /// Every attempt passes it; a Retry-After pauses it for everyone.
    limiter: Arc<dyn Limiter>,
    /// What the job allows after a failed attempt.
    policy: Policy,
    /// Retries left; per process, whichever limiter paces the calls.
    budget: RetryBudget,
    settings: Settings,
    live: Arc<Live>,
    inputs: Vec<String>,
    /// Cancelled on SIGINT/SIGTERM/SIGHUP or abort: take no new rows.
    stop: CancellationToken,
    /// Cancelled when the grace period is over: drop calls in flight.
    hard_stop: CancellationToken,
    /// The first fatal error; it also cancels `stop`.
    abort: Mutex<Option<Error>>,
    /// Rows that failed with 401 on a fresh token, in a row without any
    /// other answer in between.
    auth_streak: AtomicU64,
    /// Marks each row started before its first attempt goes out.
    ledger: Arc<Ledger>,
    /// Resuming with `--in-doubt fail`: these rows are not sent again.
    fail_in_doubt: HashSet<(usize, u64)>,
    /// Rows of a failures file that the gateway may have acted on are not
    /// sent again: recorded as failures, as they were.
    leave_out_earlier: bool,
    /// Rows left in doubt: dropped in flight at the end of the grace
    /// period, or stopped after an attempt the gateway may have acted on.
    abandoned: AtomicU64,
    /// Opens when the gateway is out: the run stops, its rows stay to resume.
    breaker: Breaker,
    /// Rows that failed without another attempt: the retry budget was spent.
    budget_stopped: AtomicU64,
    /// Abort (exit 4) once this many rows have failed.
    max_failures: Option<MaxFailures>,
    /// The run directory, for messages.
    dir: PathBuf,
    /// Where an abort (the breaker opening among them) and a stop are told.
    events: Events,
    /// A job with `[poll]`: where accepted rows are recorded and handed to the poller.
    polls: Option<poller::Polls>,
}

impl Shared {
    fn abort(&self, error: Error) {
        let mut abort = self.abort.lock().unwrap_or_else(|e| e.into_inner());
        if abort.is_none() {
            tracing::error!("{error}");
            if let Error::Outage(outage) = &error {
                self.events
                    .emit(Event::BreakerOpen { calls: outage.calls, lasted_ms: outage.lasted.as_millis() as u64 });
            }
            self.events.emit(Event::Abort { reason: abort_reason(&error), exit: error.exit_code().code() });
            *abort = Some(error);
        }
        self.stop.cancel();
    }
}

/// What stopped the run, in a word, for its events.
fn abort_reason(error: &Error) -> &'static str {
    match error {
        Error::Outage(_) => "outage",
        Error::MaxFailures(_) => "max_failures",
        Error::Unauthorized(_) => "unauthorized",
        Error::Token(_) => "token",
        Error::Certificate(_) => "certificate",
        Error::Paused(_) => "long_pause",
        Error::Output(_) => "run_directory",
        Error::Input(_) => "input",
        _ => "internal",
    }
}

fn input_names(inputs: &[InputSpec]) -> Vec<String> {
    inputs
        .iter()
        .map(|i| i.path.file_name().map_or_else(|| i.path.display().to_string(), |n| n.to_string_lossy().into_owned()))
        .collect()
}

fn failure_files(plan: &Plan, writer: &Writer) -> Vec<(PathBuf, PathBuf)> {
    writer.failure_files().into_iter().map(|(input, file)| (plan.inputs[input].path.clone(), file)).collect()
}

fn input_infos(plan: &Plan) -> Vec<InputInfo> {
    let names = input_names(&plan.inputs).into_iter();
    names.zip(&plan.failures).map(|(name, failures)| InputInfo { name, failures: failures.clone() }).collect()
}

/// How many lanes share the workers: one per core, and at most one per 16
/// workers. A lane is a thread with its own async runtime, HTTP
/// connections and collector, so a row never leaves the thread it was
/// sent from; lanes meet only once per batch of rows and once per batch of
/// outcomes.
fn lane_count(concurrency: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(concurrency.div_ceil(16)).max(1)
}

/// The run this process is working on, for the last words of a process
/// stopped at once by a second signal.
static CURRENT: Mutex<Option<(PathBuf, bool, Arc<Live>)>> = Mutex::new(None);

/// What a process stopped at once leaves: printed by the binary before it
/// exits (the run directory, the calls in flight, the command to go on).
pub fn last_words() -> Option<String> {
    let current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, resumable, live) = current.as_ref()?;
    let in_flight = live.in_flight.load(Ordering::Relaxed) + live.retrying.load(Ordering::Relaxed);
    let mut words = format!(
        "{in_flight} rows were in flight or waiting to retry, with no recorded outcome (in doubt); run directory {}",
        dir.display()
    );
    if *resumable {
        let dir = crate::options::shell_word(dir.display());
        words.push_str(&format!("; send the rest with: {} resume {dir}", crate::options::program()));
    }
    Some(words)
}

/// Raises the soft limit on open files to the hard one, and says whether
/// `concurrency` calls in flight fit under it: each needs a socket, and the
/// run needs some more (files, the token client, Redis, metrics).
pub fn enough_descriptors(concurrency: usize) -> Result<(), Error> {
    const SPARE: u64 = 64;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the one struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Ok(());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let needed = concurrency as u64 + SPARE;
    if needed > limit.rlim_cur {
        return Err(Error::Usage(format!(
            "-j {concurrency} needs about {needed} open files, and this process may open {}; \
             lower -j, or raise the limit (ulimit -n, LimitNOFILE= in a systemd unit)",
            limit.rlim_cur
        )));
    }
    Ok(())
}

/// From this many calls in flight on, memory freed goes back to the system
/// at once ([`tune_allocator`]).
pub const PURGE_AT_ONCE: usize = 1000;

// The allocator's own: the library links it, the binary makes it the
// global allocator (main.rs).
extern crate libmimalloc_sys;

unsafe extern "C" {
    fn mi_option_set_default(option: libc::c_int, value: libc::c_long);
}

/// mimalloc 2.x's option `purge_delay` (its number in `mimalloc.h`): how
/// long a page freed stays with the process before it goes back to the
/// system, in ms (10 by default).
const PURGE_DELAY: libc::c_int = 15;

/// Tunes the allocator for `concurrency` calls in flight. From
/// [`PURGE_AT_ONCE`] on, the pages mimalloc frees go back to the system at
/// once (its `purge_delay` 0 instead of 10 ms): at a slow gateway, with
/// thousands of calls in flight answered in waves, the pages each wave
/// frees and keeps for 10 ms add about 5 MiB to the peak at `-j 2000`
/// (BENCHMARKS.md). Below it the delay stays: at `-j 64` against a fast
/// server, handing back every page at once costs about 5-10% more CPU.
/// `MIMALLOC_PURGE_DELAY` in the environment wins over both.
pub fn tune_allocator(concurrency: usize) {
    if concurrency >= PURGE_AT_ONCE {
        // SAFETY: sets one entry of mimalloc's table of options (unless the
        // environment set it), as MIMALLOC_PURGE_DELAY does; called before
        // the run's threads start.
        unsafe { mi_option_set_default(PURGE_DELAY, 0) };
    }
}

/// Why a run with rows still pending ends with exit 75, and how to go on.
fn pending_message(plan: &Plan, pending: u64) -> String {
    let when = "at poll.max_wait";
    let next = if plan.resumable {
        format!(
            "`{} resume {}` polls them again (a cron job can run it until it exits 0 or 1; \
             --give-up-pending writes them to failures instead)",
            crate::options::program(),
            crate::options::shell_word(plan.dir.display())
        )
    } else {
        "this run cannot be resumed".to_string()
    };
    format!(
        "{pending} rows accepted by the gateway were still not final {when}; their first call is never sent again; {next}"
    )
}

/// Sends every row and records every outcome in `plan.dir`.
pub async fn run(
    mut plan: Plan,
    tokens: Option<TokenSource>,
    limiter: Arc<dyn Limiter>,
    stop: CancellationToken,
) -> Result<Finished, Error> {
    let concurrency = plan.settings.concurrency;
    // Resuming, every file is appended to: an outcome already on file is never lost.
    let append = plan.resume.is_some();
    let resume = plan.resume.take().unwrap_or_default();
    let results_csv = plan.requests.results_csv();
    let writer = Writer::open(&plan.dir, input_infos(&plan), append, true, results_csv)?;
    let lanes = lane_count(concurrency);
    let tls = http::api_tls(&plan.settings)?;
    let clients = (0..lanes).map(|_| http::api_client(&plan.settings, &tls)).collect::<Result<Vec<_>, _>>()?;
    // A row of a job that is not idempotent must be known as sent even
    // after a power cut: its started mark is durable before it goes out,
    // and the rows a crash can leave in doubt are never more than the calls
    // that may be in flight.
    let started = match plan.requests.idempotent() {
        true => MarkStarted::Written,
        false => MarkStarted::Durable { in_doubt: concurrency },
    };
    let ledger = Arc::new(Ledger::open(&plan.dir, append, started)?);
    let resume_polls = resume.polls;
    let mut stats = resume.recorded;
    stats.restart_clock();
    let stats = Arc::new(Mutex::new(stats));
    let live = Arc::new(Live::default());
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some((plan.dir.clone(), plan.resumable, live.clone()));
    let total_bytes = plan.inputs.iter().filter_map(|i| std::fs::metadata(&i.path).ok()).map(|m| m.len()).sum();
    plan.metrics.attach(crate::metrics::Source {
        live: live.clone(),
        stats: stats.clone(),
        total_bytes,
        tokens: tokens.clone(),
    });
    let progress = Progress::start(
        plan.progress,
        ProgressSource {
            live: live.clone(),
            total_bytes,
            tokens: tokens.clone(),
            limiter: Some(limiter.clone()),
            inputs: input_names(&plan.inputs),
            interval: plan.settings.progress_interval,
        },
    );

    let (batch_tx, batch_rx) = async_channel::bounded::<Vec<Item>>(2 * lanes);
    live.rows_to_skip.store(resume.done.len(), Ordering::Relaxed);
    let limit = plan.limit.map(|l| plan.shard.map_or(l, |s| s.share_of(l)));
    live.rows_limit.store(limit.unwrap_or(u64::MAX), Ordering::Relaxed);
    let reader =
        spawn_reader(plan.inputs.clone(), plan.limit, plan.shard, resume.done, live.clone(), stop.clone(), batch_tx);
    // A resume with rows accepted earlier needs the poller even if only to
    // give them up (`--give-up-pending`).
    let (polls, waiting) = match plan.requests.poll().is_some() || !resume.accepted.is_empty() {
        true => {
            let (polls, waiting) =
                poller::Polls::new(AcceptedFile::open(&plan.dir, append)?, plan.requests.poll_headers());
            (Some(polls), Some(waiting))
        }
        false => (None, None),
    };

    let shared = Arc::new(Shared {
        requests: plan.requests.clone(),
        tokens: tokens.clone(),
        limiter: limiter.clone(),
        policy: Policy::new(&plan.settings, plan.requests.idempotent()),
        budget: RetryBudget::new(plan.settings.retry_budget),
        settings: plan.settings.clone(),
        live: live.clone(),
        inputs: input_names(&plan.inputs),
        stop: stop.clone(),
        hard_stop: CancellationToken::new(),
        abort: Mutex::new(None),
        auth_streak: AtomicU64::new(0),
        ledger,
        fail_in_doubt: if resume.fail_in_doubt { resume.in_doubt } else { HashSet::new() },
        leave_out_earlier: plan.leave_out_earlier,
        abandoned: AtomicU64::new(0),
        breaker: Breaker::new(plan.settings.outage_after),
        budget_stopped: AtomicU64::new(0),
        max_failures: plan.max_failures,
        dir: plan.dir.clone(),
        events: plan.events.clone(),
        polls,
    });
    plan.events.emit(Event::Started { resume: append });

    // A stop by signal is told once: by the watchdog when it wakes, or at
    // the end if the run ended first. (An abort told its own event.)
    let tell_stop = {
        let (shared, told) = (shared.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        move || {
            let aborted = shared.abort.lock().unwrap_or_else(|e| e.into_inner()).is_some();
            if shared.stop.is_cancelled() && !aborted && !told.swap(true, Ordering::Relaxed) {
                shared.events.emit(Event::Stop);
            }
        }
    };
    // After a stop, calls in flight get `grace` to finish.
    let watchdog = {
        let (stop, hard, grace, tell_stop) = (stop.clone(), shared.hard_stop.clone(), plan.grace, tell_stop.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            tell_stop();
            tokio::time::sleep(grace).await;
            hard.cancel();
        })
    };

    // Outcomes waiting to be recorded: they pile up here while the recorder
    // syncs, and a full channel makes workers wait. Eight places per worker
    // (at least 64) keep the syncs off the calls' path. The rows in doubt
    // after a crash: those in flight, those waiting here, and the group the
    // recorder holds while it writes (at most as many again); for a job
    // that is not idempotent, the ledger marks no row started while `-j`
    // rows are marked and their outcome not yet written (see
    // `MarkStarted::Durable`), so its rows in doubt are at most `-j`.
    // The bytes they hold are bounded too (`WAITING_BYTES`): an outcome
    // holds its answer.
    let (outcome_tx, outcome_rx) = Outcomes::channel((8 * concurrency).max(64), WAITING_BYTES);
    let recorder = Recorder { writer, group: GroupCommit::default(), stats: stats.clone(), first_failures: Vec::new() };
    let recorded = start_recorder(recorder, shared.clone(), outcome_rx)?;
    // Cancelled once every lane ended: no row is accepted after that.
    let lanes_done = CancellationToken::new();
    let poller = match waiting {
        Some(waiting) => {
            let max_wait = plan.requests.poll().map_or(Duration::ZERO, |p| p.max_wait);
            let rows = resume.accepted.iter().map(|&place| poller::Waiting::resumed(place, max_wait)).collect();
            let preload = poller::Preload { rows, give_up: resume.give_up_pending };
            let client = http::api_client(&plan.settings, &tls)?;
            Some(start_poller(shared.clone(), client, waiting, outcome_tx.clone(), lanes_done.clone(), preload)?)
        }
        None => None,
    };
    let mut lane_ends = Vec::with_capacity(lanes);
    for (number, client) in clients.into_iter().enumerate() {
        let workers = concurrency / lanes + usize::from(number < concurrency % lanes);
        match start_lane(number, workers, shared.clone(), batch_rx.clone(), outcome_tx.clone(), client) {
            Ok(end) => lane_ends.push(end),
            Err(e) => shared.abort(e),
        }
    }
    drop((batch_rx, outcome_tx));
    // The first lane that ends badly stops the others.
    let mut lane_ends: futures::stream::FuturesUnordered<_> = lane_ends.into_iter().collect();
    while let Some(end) = futures::StreamExt::next(&mut lane_ends).await {
        if end != Ok(true) {
            // A bug, not a row's failure: the run must not look finished.
            shared.abort(Error::Internal("a worker stopped unexpectedly; please report this".into()));
        }
    }
    lanes_done.cancel();
    let polled = match poller {
        Some(end) => {
            end.await.map_err(|_| Error::Internal("the poller stopped unexpectedly; please report this".into()))?
        }
        None => poller::PollerEnd::default(),
    };
    watchdog.abort();
    tell_stop();
    let Recorder { writer, first_failures, .. } =
        recorded.await.map_err(|_| Error::Internal("the recorder stopped unexpectedly; please report this".into()))?;
    let read_result = reader.await.expect("the reader thread does not panic");
    progress.finish(!stop.is_cancelled() && read_result.is_ok()).await;
    let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..shared.abandoned.load(Ordering::Relaxed) {
        stats.add_abandoned();
    }
    stats.add_budget_stopped(shared.budget_stopped.load(Ordering::Relaxed));

    let mut abort = shared.abort.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Err(e) = read_result
        && abort.is_none()
    {
        abort = Some(Error::Input(e));
    }
    // Pending at max_wait: exit 75. After a signal the exit stays 130; the
    // closing lines tell the pending rows all the same.
    if polled.pending > 0 && abort.is_none() && !stop.is_cancelled() {
        abort = Some(Error::Pending(pending_message(&plan, polled.pending)));
    }
    let exit = match &abort {
        Some(e) => e.exit_code(),
        None if stop.is_cancelled() => ExitCode::Interrupted,
        None if stats.failed() > 0 => ExitCode::RowsFailed,
        None => ExitCode::Success,
    };
    let mut summary = stats.summary(tokens.as_ref().map_or(0, TokenSource::requests), exit.code());
    summary.pending = polled.pending;
    summary.polls = resume_polls + live.polls.load(Ordering::Relaxed);
    // Their first calls went out: counted, though their outcome is to come.
    summary.attempts += polled.pending_attempts;
    summary.throttled_rate = limiter.lowest_rate().map(|r| (r * 10.0).round() / 10.0);
    let failure_files = failure_files(&plan, &writer);
    summary.run_dir = Some(plan.dir.clone());
    summary.failures = failure_files.iter().map(|(_, file)| file.clone()).collect();
    // Written from this summary right after.
    summary.report = Some(plan.dir.join("report.html"));
    crate::output::write_json(&plan.dir.join("summary.json"), &summary)?;
    plan.events.emit(Event::End { exit: exit.code() });
    Ok(Finished { summary, exit, abort, failure_files, first_failures, rendered: 0 })
}

#[cfg(test)]
mod tests {
    unsafe extern "C" {
        fn mi_option_get(option: libc::c_int) -> libc::c_long;
    }

    /// The allocator's `purge_delay` now, in ms.
    fn purge_delay() -> libc::c_long {
        // SAFETY: reads one entry of mimalloc's table of options.
        unsafe { mi_option_get(super::PURGE_DELAY) }
    }

    #[test]
    fn thousands_of_calls_in_flight_give_freed_pages_back_at_once() {
        // The number names `purge_delay`: mimalloc's 10 ms (this process's
        // allocator is the system's; the table is mimalloc's all the same).
        assert_eq!(purge_delay(), 10);
        super::tune_allocator(super::PURGE_AT_ONCE - 1);
        assert_eq!(purge_delay(), 10, "a pool of fewer calls keeps the delay");
        super::tune_allocator(super::PURGE_AT_ONCE);
        assert_eq!(purge_delay(), 0);
    }
}
