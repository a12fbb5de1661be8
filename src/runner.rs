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

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, RETRY_AFTER};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::answer::Body;
use crate::config::{ConfigError, Settings};
use crate::error::{Error, ExitCode};
use crate::input::{InputSpec, Item, Row, read_all};
use crate::job::{Request, Requests};
use crate::limiter::{Limiter, RetryBudget};
use crate::options::MaxFailures;
use crate::outcome::{self, ErrorKind, Failure, Outcome, Source, Success, Verdict};
use crate::output::{GroupCommit, InputInfo, Ledger, OutputError, RequestsFile, Writer};
use crate::report::{Live, Progress, ProgressMode, ProgressSource, Stats, Summary};
use crate::retry::{self, Next, Policy, Used};
use crate::rows::RowSet;
use crate::shard::Shard;
use crate::token::{Token, TokenSource};

/// Everything a run needs, resolved.
pub struct Plan {
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
    let brief = format!("row {} (key {}): {}{status}", outcome.number, outcome.key, failure.kind.as_str());
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
    /// Rows dropped in flight at the end of the grace period.
    abandoned: AtomicU64,
    /// Abort (exit 4) once this many rows have failed.
    max_failures: Option<MaxFailures>,
    /// The run directory, for messages.
    dir: PathBuf,
}

impl Shared {
    fn abort(&self, error: Error) {
        let mut abort = self.abort.lock().unwrap_or_else(|e| e.into_inner());
        if abort.is_none() {
            tracing::error!("{error}");
            *abort = Some(error);
        }
        self.stop.cancel();
    }
}

/// An HTTP client for calls or token requests: connections are reused, the
/// pool sized to the concurrency, HTTP/2 used when a server offers it
/// (ALPN), `ca_file`'s certificates trusted besides the built-in roots.
pub fn http_client(settings: &Settings) -> Result<reqwest::Client, ConfigError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("bulkcall/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(settings.concurrency)
        .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
        .timeout(settings.timeout);
    if let Some(path) = &settings.ca_file {
        let shown = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        let bad = |why: String| ConfigError::Value(format!("ca_file {}: {why}", shown.display()));
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
        if certificates.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| ConfigError::Value(format!("cannot set up the HTTP client: {e}")))
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

/// Rows cross from the reader thread to the lanes in batches: one
/// wake-up per batch instead of one per row.
const BATCH: usize = 64;

/// Starts the reader thread: it feeds `tx` batches of rows until the inputs
/// end, `limit` rows were read, or `stop` is cancelled. Only `shard`'s rows
/// are taken (`limit` counts every row, so the shards of a limited run
/// share its first rows); rows in `skip` are not sent.
fn spawn_reader(
    inputs: Vec<InputSpec>,
    limit: Option<u64>,
    shard: Option<Shard>,
    skip: RowSet,
    live: Arc<Live>,
    stop: CancellationToken,
    tx: async_channel::Sender<Vec<Item>>,
) -> tokio::task::JoinHandle<Result<(), crate::input::InputError>> {
    tokio::task::spawn_blocking(move || {
        let mut count = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        let progress = |bytes| live.bytes_read.store(bytes, Ordering::Relaxed);
        let result = read_all(&inputs, &progress, &mut |item| {
            if stop.is_cancelled() || limit.is_some_and(|l| count >= l) {
                return false;
            }
            count += 1;
            if shard.is_some_and(|s| !s.takes(count - 1)) {
                return true;
            }
            let key = match &item {
                Ok(row) => (row.input, row.number),
                Err(bad) => (bad.input, bad.number),
            };
            live.current_input.store(key.0 as u64, Ordering::Relaxed);
            if skip.contains(key.0, key.1) {
                live.rows_skipped.fetch_add(1, Ordering::Relaxed);
            } else {
                live.rows_read.fetch_add(1, Ordering::Relaxed);
                batch.push(item);
            }
            batch.len() < BATCH || tx.send_blocking(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))).is_ok()
        });
        if !batch.is_empty() && !stop.is_cancelled() {
            let _ = tx.send_blocking(batch);
        }
        result
    })
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

/// The run's files and statistics, owned by the recorder thread.
struct Recorder {
    writer: Writer,
    group: GroupCommit,
    stats: Stats,
    first_failures: Vec<(String, String)>,
}

impl Recorder {
    /// Records outcomes: counted, and written with one write per file;
    /// made durable and marked done at the group's sync.
    fn record(&mut self, shared: &Shared, outcomes: &[Outcome]) -> Result<(), OutputError> {
        let live = &shared.live;
        for outcome in outcomes {
            self.stats.add(outcome);
            if self.first_failures.len() < SHOWN_FAILURES {
                self.first_failures.extend(describe_failure(outcome));
            }
            live.done.fetch_add(1, Ordering::Relaxed);
            let counter = if outcome.result.is_ok() { &live.succeeded } else { &live.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            if let Some(max) = shared.max_failures {
                // A count caps the run's failures, earlier sessions' too, so
                // resuming with the same cap never piles up more; a share
                // judges this session's rows alone, failed and done alike.
                let done = live.done.load(Ordering::Relaxed);
                let failed = match max {
                    crate::options::MaxFailures::Count(_) => self.stats.failed(),
                    crate::options::MaxFailures::Percent(_) => live.failed.load(Ordering::Relaxed),
                };
                if max.reached(failed, done) && !shared.stop.is_cancelled() {
                    let of = match max {
                        crate::options::MaxFailures::Count(_) => "the run's rows".to_string(),
                        crate::options::MaxFailures::Percent(_) => format!("{done} rows sent"),
                    };
                    shared.abort(Error::MaxFailures(format!(
                        "{failed} of {of} failed, reaching --max-failures; `{} resume {}` sends the rest",
                        crate::options::program(),
                        shared.dir.display()
                    )));
                }
            }
        }
        // The outcomes first, durable, then the ledger's marks: a crash or
        // a power cut between the two leaves those rows in doubt, never lost.
        self.group.write(&mut self.writer, outcomes)
    }

    /// Makes the outcomes written durable and marks them done.
    fn sync(&mut self, shared: &Shared) -> Result<(), OutputError> {
        self.group.sync(&mut self.writer, &shared.ledger)
    }
}

/// An outcome on its way to the recorder, with, for a job that is not
/// idempotent, the worker's wait for it to be written.
type ToRecord = (Outcome, Option<oneshot::Sender<()>>);

/// How often a busy recorder takes the outcomes waiting: in a beat, rather
/// than woken by every one (a wake-up crosses threads).
const RECORDER_BEAT: Duration = Duration::from_millis(1);

/// Starts the recorder: a thread that takes the outcomes waiting and writes
/// them at once, and makes what it wrote durable (with the done marks after
/// it) at most [`crate::output::SYNC_EVERY`] later, so one sync serves every
/// outcome of that moment and the syncs never hold up a call: workers wait
/// only when the channel is full. While outcomes keep coming it takes them
/// every [`RECORDER_BEAT`]; when none came, it waits to be woken. When a
/// write fails, the run is aborted and the channel closed (the workers
/// stop: without a place for outcomes, sending more would lose them). The
/// thread hands the recorder back when every sender is gone and the last
/// outcomes are durable.
fn start_recorder(
    mut recorder: Recorder,
    shared: Arc<Shared>,
    mut outcomes: mpsc::Receiver<ToRecord>,
) -> Result<oneshot::Receiver<Recorder>, Error> {
    use tokio::sync::mpsc::error::TryRecvError;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start an async runtime: {e}")))?;
    let (done_tx, done_rx) = oneshot::channel();
    let record = async move {
        let most = outcomes.max_capacity();
        let mut group = Vec::with_capacity(most);
        let (mut busy, mut open) = (false, true);
        while open {
            if busy {
                tokio::time::sleep(RECORDER_BEAT).await;
                while group.len() < most {
                    match outcomes.try_recv() {
                        Ok(outcome) => group.push(outcome),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
            } else {
                tokio::select! {
                    taken = outcomes.recv_many(&mut group, most) => open = taken > 0,
                    () = sleep_until_some(recorder.group.due()) => {}
                }
            }
            busy = !group.is_empty();
            let (written, acks): (Vec<Outcome>, Vec<_>) = group.drain(..).unzip();
            if busy && let Err(e) = recorder.record(&shared, &written) {
                shared.abort(Error::Output(e));
                return recorder;
            }
            // Written: their workers may take their next rows.
            for ack in acks.into_iter().flatten() {
                let _ = ack.send(());
            }
            if recorder.group.due().is_some_and(|due| std::time::Instant::now() >= due)
                && let Err(e) = recorder.sync(&shared)
            {
                shared.abort(Error::Output(e));
                return recorder;
            }
        }
        // The last group, durable, then its done marks too: a run that
        // finished says so on disk. A failure here is the run's failure:
        // those outcomes may not be on disk.
        if let Err(e) = recorder.sync(&shared).and_then(|()| shared.ledger.sync()) {
            shared.abort(Error::Output(e));
        }
        recorder
    };
    std::thread::Builder::new()
        .name("bulkcall-recorder".into())
        .spawn(move || {
            let _ = done_tx.send(runtime.block_on(record));
        })
        .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?;
    Ok(done_rx)
}

/// Sleeps until `at`; forever when `None`.
async fn sleep_until_some(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Starts one lane: a thread running `workers` workers and their collector
/// on an async runtime of its own. The receiver says whether every worker
/// ended cleanly.
fn start_lane(
    number: usize,
    workers: usize,
    shared: Arc<Shared>,
    batches: async_channel::Receiver<Vec<Item>>,
    outcomes: mpsc::Sender<ToRecord>,
    client: reqwest::Client,
) -> Result<oneshot::Receiver<bool>, Error> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("bulkcall-lane-{number}"))
        .spawn(move || {
            // Built here: a runtime must not be dropped on an async thread.
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    shared.abort(Error::Internal(format!("cannot start an async runtime: {e}")));
                    let _ = done_tx.send(false);
                    return;
                }
            };
            let clean = runtime.block_on(lane(workers, shared, batches, outcomes, client));
            // Do not wait for connections' tasks on the way out.
            runtime.shutdown_background();
            let _ = done_tx.send(clean);
        })
        .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?;
    Ok(done_rx)
}

async fn lane(
    workers: usize,
    shared: Arc<Shared>,
    batches: async_channel::Receiver<Vec<Item>>,
    outcomes: mpsc::Sender<ToRecord>,
    // The lane's own: its connections' I/O stays on this thread.
    client: reqwest::Client,
) -> bool {
    let (row_tx, row_rx) = async_channel::bounded::<Item>(BATCH);
    let feeder = tokio::spawn(async move {
        while let Ok(batch) = batches.recv().await {
            for item in batch {
                if row_tx.send(item).await.is_err() {
                    return;
                }
            }
        }
    });

    let idempotent = shared.requests.idempotent();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (shared, rows, out, client) = (shared.clone(), row_rx.clone(), outcomes.clone(), client.clone());
        set.spawn(async move {
            while !shared.stop.is_cancelled() {
                let Ok(item) = rows.recv().await else { break };
                if shared.stop.is_cancelled() {
                    break;
                }
                let Some(outcome) = process(&shared, &client, item).await else { continue };
                // A job that is not idempotent takes its next row only once
                // this outcome is written, so its rows in doubt after a
                // crash are never more than the calls in flight.
                let (ack, written) = if idempotent {
                    (None, None)
                } else {
                    let (ack, written) = oneshot::channel();
                    (Some(ack), Some(written))
                };
                if out.send((outcome, ack)).await.is_err() {
                    // The recorder stopped: nowhere to put outcomes.
                    break;
                }
                if let Some(written) = written
                    && written.await.is_err()
                {
                    break;
                }
            }
        });
    }
    drop((row_rx, outcomes));
    let mut clean = true;
    while let Some(joined) = set.join_next().await {
        clean &= joined.is_ok();
    }
    feeder.abort();
    clean
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
    let clients = (0..lanes).map(|_| http_client(&plan.settings)).collect::<Result<Vec<_>, _>>()?;
    // A row of a job that is not idempotent must be known as sent even
    // after a power cut: its started mark is durable before it goes out.
    let ledger = Arc::new(Ledger::open(&plan.dir, append, !plan.requests.idempotent())?);
    let mut stats = resume.recorded;
    stats.restart_clock();
    let live = Arc::new(Live::default());
    let total_bytes = plan.inputs.iter().filter_map(|i| std::fs::metadata(&i.path).ok()).map(|m| m.len()).sum();
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

    let shared = Arc::new(Shared {
        requests: plan.requests.clone(),
        tokens: tokens.clone(),
        limiter: limiter.clone(),
        policy: Policy::new(&plan.settings, plan.requests.idempotent()),
        budget: RetryBudget::default(),
        settings: plan.settings.clone(),
        live: live.clone(),
        inputs: input_names(&plan.inputs),
        stop: stop.clone(),
        hard_stop: CancellationToken::new(),
        abort: Mutex::new(None),
        auth_streak: AtomicU64::new(0),
        ledger,
        fail_in_doubt: if resume.fail_in_doubt { resume.in_doubt } else { HashSet::new() },
        abandoned: AtomicU64::new(0),
        max_failures: plan.max_failures,
        dir: plan.dir.clone(),
    });

    // After a stop, calls in flight get `grace` to finish.
    let watchdog = {
        let (stop, hard, grace) = (stop.clone(), shared.hard_stop.clone(), plan.grace);
        tokio::spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
            hard.cancel();
        })
    };

    // Outcomes waiting to be recorded: they pile up here while the recorder
    // syncs, and a full channel makes workers wait. Eight places per worker
    // (at least 64) keep the syncs off the calls' path. The rows in doubt
    // after a crash: those in flight, those waiting here, and the group the
    // recorder holds while it writes (at most as many again); a job that is
    // not idempotent waits for each outcome to be written (see `lane`), so
    // its rows in doubt are only those in flight.
    let (outcome_tx, outcome_rx) = mpsc::channel::<ToRecord>((8 * concurrency).max(64));
    let recorder = Recorder { writer, group: GroupCommit::default(), stats, first_failures: Vec::new() };
    let recorded = start_recorder(recorder, shared.clone(), outcome_rx)?;
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
    watchdog.abort();
    let Recorder { writer, mut stats, first_failures, .. } =
        recorded.await.map_err(|_| Error::Internal("the recorder stopped unexpectedly; please report this".into()))?;
    let read_result = reader.await.expect("the reader thread does not panic");
    progress.finish(!stop.is_cancelled() && read_result.is_ok()).await;
    for _ in 0..shared.abandoned.load(Ordering::Relaxed) {
        stats.add_abandoned();
    }

    let mut abort = shared.abort.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Err(e) = read_result
        && abort.is_none()
    {
        abort = Some(Error::Input(e));
    }
    let exit = match &abort {
        Some(e) => e.exit_code(),
        None if stop.is_cancelled() => ExitCode::Interrupted,
        None if stats.failed() > 0 => ExitCode::RowsFailed,
        None => ExitCode::Success,
    };
    let mut summary = stats.summary(tokens.as_ref().map_or(0, TokenSource::requests), exit.code());
    summary.throttled_rate = limiter.lowest_rate().map(|r| (r * 10.0).round() / 10.0);
    crate::output::write_json(&plan.dir.join("summary.json"), &summary)?;
    Ok(Finished { summary, exit, abort, failure_files: failure_files(&plan, &writer), first_failures, rendered: 0 })
}

/// One attempt's answer, read up to `max_response_bytes`.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Vec<u8>,
    /// The whole body's length.
    total: u64,
}

async fn send(
    shared: &Shared,
    client: &reqwest::Client,
    request: &Request,
    token: Option<&Token>,
) -> Result<Answer, reqwest::Error> {
    let mut builder = client.request(request.method.clone(), request.url.clone()).headers(request.headers.clone());
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, token.header().clone());
    }
    if let Some(body) = &request.body {
        builder = builder.body(body.clone());
    }
    let mut response = builder.send().await?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| outcome::parse_retry_after(v, SystemTime::now()));
    let cap = shared.settings.max_response_bytes;
    let mut body = Vec::new();
    let mut total = 0u64;
    while let Some(chunk) = response.chunk().await? {
        total += chunk.len() as u64;
        let room = cap.saturating_sub(body.len()).min(chunk.len());
        body.extend_from_slice(&chunk[..room]);
    }
    Ok(Answer { status, retry_after, body, total })
}

/// A short text of an error answer for the failures file.
fn answer_message(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(500).collect();
    let reason = status.canonical_reason().unwrap_or("");
    if text.is_empty() {
        format!("HTTP {} {reason}", status.as_u16())
    } else {
        format!("HTTP {} {reason}: {text}", status.as_u16())
    }
}

fn backoff(shared: &Shared, kind: ErrorKind, attempt: u32) -> Duration {
    let base = if kind == ErrorKind::Throttled { shared.settings.throttle_base } else { shared.settings.backoff_base };
    let ceiling = base.saturating_mul(1u32 << (attempt - 1).min(20)).min(shared.settings.backoff_max);
    // Full jitter: uniform over [0, ceiling].
    ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
}

/// Takes one row to its outcome: render it, then attempt and decide until
/// the decision is final. `None` when the run stopped before the row was
/// finished: it stays to resume (released in the ledger when the gateway
/// provably did not act on it, else in doubt).
async fn process(shared: &Shared, client: &reqwest::Client, item: Item) -> Option<Outcome> {
    let (row, request) = match render(shared, item) {
        Ok(rendered) => rendered,
        Err(outcome) => return Some(outcome),
    };
    if shared.fail_in_doubt.contains(&(row.input, row.number)) {
        let message =
            "sent before the run stopped, with no recorded answer; check on the server before sending it again";
        // Marked started: at least one attempt went out, or was about to.
        return Some(finish(row, &request, 1, Duration::ZERO, None, fail(ErrorKind::InDoubt, message.into())));
    }
    let mut used = Used { attempts: 0, refreshed: false, authorized: shared.tokens.is_some() };
    // The gateway provably did not act on any attempt so far.
    let mut unprocessed = true;
    let mut resend = false;
    loop {
        let (result, latency, token) = match attempt(shared, client, &row, &request, &mut used, resend).await {
            Tried::Sent { result, latency, token } => (result, latency, token),
            Tried::Stopped => return unfinished(shared, &row, &used, unprocessed),
            Tried::Abandoned => return None,
        };
        resend = false;
        let (verdict, answer, error) = match result {
            Ok(answer) => {
                let verdict = outcome::classify_status(answer.status, &shared.settings.retry_on, answer.retry_after);
                (verdict, Some(answer), String::new())
            }
            Err(e) if outcome::untrusted_certificate(&e) => {
                // Nothing reached the server: the row stays to be sent once
                // the certificate is trusted (`resume`).
                shared.abort(Error::Certificate(outcome::UntrustedCertificate {
                    url: request.url.origin().ascii_serialization(),
                    detail: outcome::describe(&e),
                }));
                return unfinished(shared, &row, &used, unprocessed);
            }
            Err(e) => (outcome::classify_error(&e), None, outcome::describe(&e)),
        };
        unprocessed &= retry::unprocessed(&verdict);
        let status = answer.as_ref().map(|a| a.status.as_u16());
        if let Some(status) = status {
            shared.limiter.answered(status == 429);
            if verdict != Verdict::Unauthorized {
                shared.auth_streak.store(0, Ordering::Relaxed);
            }
        }
        let message = || answer.as_ref().map_or_else(|| error.clone(), |a| answer_message(a.status, &a.body));
        match retry::decide(&verdict, &used, &shared.policy) {
            Next::Refresh => {
                // The token was refused: forget exactly that one and resend once.
                if let (Some(tokens), Some(token)) = (&shared.tokens, &token) {
                    tokens.invalidate(token.generation);
                }
                used.refreshed = true;
                resend = true;
            }
            Next::Retry { kind, after } => {
                if let Some(after) = after {
                    shared.limiter.pause(after);
                }
                if !shared.budget.spend_retry() {
                    let message =
                        format!("{}; not retried: the retry budget is spent (too many calls are failing)", message());
                    return Some(finish(row, &request, used.attempts, latency, status, fail(kind, message)));
                }
                let delay = after.unwrap_or_else(|| backoff(shared, kind, used.attempts));
                if !wait(shared, delay).await {
                    return unfinished(shared, &row, &used, unprocessed);
                }
            }
            Next::Pause { after } => {
                shared.abort(Error::Paused(pause_message(shared, after)));
                return unfinished(shared, &row, &used, unprocessed);
            }
            Next::Fail { kind, note } => {
                if verdict == Verdict::Unauthorized {
                    refused_again(shared);
                }
                let result = fail(kind, with_note(message(), note));
                return Some(finish(row, &request, used.attempts, latency, status, result));
            }
            Next::Judge { kind, note } => {
                let Some(answer) = answer else { return unfinished(shared, &row, &used, unprocessed) };
                return Some(judge(shared, row, &request, used.attempts, latency, answer, kind, note));
            }
        }
    }
}

/// A row's request, or its outcome when it cannot be sent.
#[allow(clippy::result_large_err)] // an outcome goes straight to the collector
fn render(shared: &Shared, item: Item) -> Result<(Row, Request), Outcome> {
    let row = match item {
        Ok(row) => row,
        Err(bad) => {
            let mut outcome = Outcome::bad_row(bad);
            if let Err(message) = &mut outcome.result {
                message.message = format!("{}: {}", shared.inputs[outcome.input], message.message);
            }
            return Err(outcome);
        }
    };
    match shared.requests.render(&row) {
        Ok(request) => Ok((row, request)),
        Err(e) => {
            let place = format!("{} line {}", shared.inputs[row.input], row.line);
            Err(Outcome::invalid(&row, shared.requests.key(&row), format!("{place}: {e}")))
        }
    }
}

/// How an attempt went.
enum Tried {
    /// It went out (or failed trying): its result, how long it took, the token it carried.
    Sent { result: Result<Answer, reqwest::Error>, latency: Duration, token: Option<Arc<Token>> },
    /// The run stopped before it went out.
    Stopped,
    /// The grace period ended while it was in flight.
    Abandoned,
}

/// One attempt: waits for the rate limiter, marks the row started before
/// its first attempt, takes the token (as late as can be, so it cannot
/// expire in between), sends. A resend after a token refresh is not counted.
async fn attempt(
    shared: &Shared,
    client: &reqwest::Client,
    row: &Row,
    request: &Request,
    used: &mut Used,
    resend: bool,
) -> Tried {
    let ready = tokio::select! {
        biased;
        _ = shared.stop.cancelled() => false,
        _ = shared.limiter.until_ready() => true,
    };
    if !ready {
        return Tried::Stopped;
    }
    if !resend {
        used.attempts += 1;
        if used.attempts == 1 {
            if let Err(e) = shared.ledger.started(row.input, row.number).await {
                shared.abort(Error::Output(e));
                return Tried::Abandoned;
            }
            shared.budget.earn_retry();
        }
    }
    let token = match &shared.tokens {
        Some(tokens) => {
            let got = tokio::select! {
                biased;
                _ = shared.stop.cancelled() => None,
                got = tokens.get() => Some(got),
            };
            match got {
                None => return Tried::Stopped,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    shared.abort(Error::Token(e));
                    return Tried::Stopped;
                }
            }
        }
        None => None,
    };
    shared.live.in_flight.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let result = tokio::select! {
        r = send(shared, client, request, token.as_deref()) => Some(r),
        _ = shared.hard_stop.cancelled() => None,
    };
    shared.live.in_flight.fetch_sub(1, Ordering::Relaxed);
    match result {
        Some(result) => Tried::Sent { result, latency: started.elapsed(), token },
        None => {
            tracing::warn!(row = row.number, key = %request.key, "call abandoned at the end of the grace period");
            shared.abandoned.fetch_add(1, Ordering::Relaxed);
            Tried::Abandoned
        }
    }
}

/// Waits before a retry; false if the run stopped meanwhile.
async fn wait(shared: &Shared, delay: Duration) -> bool {
    shared.live.retrying.fetch_add(1, Ordering::Relaxed);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shared.stop.cancelled() => {}
    }
    shared.live.retrying.fetch_sub(1, Ordering::Relaxed);
    !shared.stop.is_cancelled()
}

/// A row the run stopped before finishing: no outcome, so `resume` sends
/// it. A row the gateway provably did not act on is released, so it is
/// sent as one never sent; any other started row stays in doubt.
fn unfinished(shared: &Shared, row: &Row, used: &Used, unprocessed: bool) -> Option<Outcome> {
    if used.attempts > 0
        && unprocessed
        && let Err(e) = shared.ledger.released(row.input, row.number)
    {
        shared.abort(Error::Output(e));
    }
    None
}

/// A 401 with a fresh token: a stream of them stops the run.
fn refused_again(shared: &Shared) {
    let streak = shared.auth_streak.fetch_add(1, Ordering::Relaxed) + 1;
    let limit = (shared.settings.concurrency as u64).max(10);
    if streak >= limit {
        shared.abort(Error::Unauthorized(format!(
            "{streak} rows in a row were refused with 401 even with a fresh token; \
             the credentials may lack access to this API"
        )));
    }
}

/// The outcome of an answer: the job's `success` expression (default: a
/// 2xx) makes it a success, else the row fails as `kind`.
#[allow(clippy::too_many_arguments)]
fn judge(
    shared: &Shared,
    row: Row,
    request: &Request,
    attempts: u32,
    latency: Duration,
    answer: Answer,
    kind: ErrorKind,
    note: Option<&str>,
) -> Outcome {
    let status = answer.status;
    let body = Body::new(answer.body, answer.total);
    let judged = shared.requests.judge(status.as_u16(), &body, &row);
    let success = status.is_success();
    let result = if judged.ok && (success || shared.requests.has_success()) {
        Ok(Success::new(body, judged.captured))
    } else if success {
        let message = answer_message(status, body.bytes());
        fail(kind, format!("the job's success expression refused the answer: {message}"))
    } else {
        fail(kind, with_note(answer_message(status, body.bytes()), note))
    };
    finish(row, request, attempts, latency, Some(status.as_u16()), result)
}

/// A row's outcome; its record moves into it, uncopied.
fn finish(
    row: Row,
    request: &Request,
    attempts: u32,
    latency: Duration,
    status: Option<u16>,
    result: Result<Success, Failure>,
) -> Outcome {
    Outcome {
        input: row.input,
        number: row.number,
        line: row.line,
        key: request.key.clone(),
        attempts,
        latency,
        status,
        result,
        source: Source::Record(row.record),
    }
}

fn fail(kind: ErrorKind, message: String) -> Result<Success, Failure> {
    Err(Failure { kind, message })
}

fn with_note(message: String, note: Option<&str>) -> String {
    match note {
        Some(note) if message.is_empty() => note.to_string(),
        Some(note) => format!("{message}; {note}"),
        None => message,
    }
}

/// What a gateway's long `Retry-After` stops the run with: the wait it
/// asked for, when that ends, and how to go on.
fn pause_message(shared: &Shared, after: Duration) -> String {
    let until = SystemTime::now()
        .checked_add(after)
        .map(|t| format!(" (until {})", humantime::format_rfc3339_seconds(t)))
        .unwrap_or_default();
    format!(
        "the gateway asked for a pause of {}{until} (Retry-After), longer than retry_after_max ({}); \
         calls in flight were recorded and no new row was sent. When the pause is over, `{} resume {}` sends the rest",
        humantime::format_duration(after),
        humantime::format_duration(shared.settings.retry_after_max),
        crate::options::program(),
        shared.dir.display()
    )
}

/// A dry run: renders every row into `requests.jsonl`; fetches no token and
/// sends nothing. Rows that cannot be rendered go to failures.
pub async fn dry_run(plan: Plan, authorized: bool) -> Result<Finished, Error> {
    let live = Arc::new(Live::default());
    let (tx, rx) = async_channel::bounded::<Vec<Item>>(16);
    let reader = spawn_reader(
        plan.inputs.clone(),
        plan.limit,
        plan.shard,
        RowSet::default(),
        live,
        CancellationToken::new(),
        tx,
    );
    let mut writer = Writer::open(&plan.dir, input_infos(&plan), false, false, None)?;
    let mut requests = RequestsFile::create(&plan.dir)?;
    let names = input_names(&plan.inputs);
    let mut stats = Stats::default();
    let (mut rendered, mut first_failures) = (0u64, Vec::new());
    while let Ok(batch) = rx.recv().await {
        for item in batch {
            let outcome = match item {
                Err(bad) => Some(Outcome::bad_row(bad)),
                Ok(row) => match plan.requests.render(&row) {
                    Ok(request) => {
                        requests.write(&dry_request(&row, &request, authorized))?;
                        rendered += 1;
                        None
                    }
                    Err(e) => {
                        let message = format!("{} line {}: {e}", names[row.input], row.line);
                        Some(Outcome::invalid(&row, plan.requests.key(&row), message))
                    }
                },
            };
            if let Some(outcome) = outcome {
                stats.add(&outcome);
                if first_failures.len() < SHOWN_FAILURES {
                    first_failures.extend(describe_failure(&outcome));
                }
                writer.record(&outcome)?;
                writer.flush()?;
            }
        }
    }
    reader.await.expect("the reader thread does not panic")?;
    requests.flush()?;
    let exit = if stats.failed() > 0 { ExitCode::RowsFailed } else { ExitCode::Success };
    let summary = stats.summary(0, exit.code());
    Ok(Finished { summary, exit, abort: None, failure_files: failure_files(&plan, &writer), first_failures, rendered })
}

fn dry_request(row: &Row, request: &Request, authorized: bool) -> Value {
    let mut headers = serde_json::Map::new();
    if authorized {
        headers.insert("authorization".into(), Value::from("Bearer <redacted>"));
    }
    for (name, value) in &request.headers {
        let shown = if crate::config::is_sensitive_header(name.as_str()) {
            "<redacted>"
        } else {
            value.to_str().unwrap_or("<binary>")
        };
        headers.insert(name.as_str().to_string(), Value::from(shown));
    }
    let body = request.body.as_ref().map(|b| serde_json::from_slice::<Value>(b).unwrap_or(Value::Null));
    serde_json::json!({
        "row": row.number,
        "key": request.key,
        "method": request.method.as_str(),
        "url": request.url.as_str(),
        "headers": headers,
        "body": body,
    })
}
