//! The polls of a `[poll]` job: every accepted row polled until its answer
//! is final, on one thread of its own.
//!
//! A worker whose first call was accepted (its `success` held, and there is
//! a URL to poll) writes the row to `accepted.jsonl`, durable, and hands
//! the poller the row's place in that file; from then on the row's first
//! call is never sent again. The poller keeps one small entry per waiting
//! row in a heap ordered by when it is due (the row's data stays in the
//! file and is read back for each poll), so 100,000 rows waiting cost a few
//! MiB. Every poll passes the rate limiter and carries the shared token; a
//! poll's `Retry-After` sets that row's next poll; connection errors,
//! timeouts, 401, 429 and 5xx are tried again at the next interval, with
//! backoff, never taken as the row's answer. A row still not final at its
//! `max_wait`, or when the run stops, is pending: no outcome, so `resume`
//! polls it again.

use std::cell::RefCell;
use std::cmp::Ordering as Order;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use reqwest::header::HeaderMap;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::answer::Body;
use crate::error::Error;
use crate::input::{CsvHeaders, Origin, Raw, Row};
use crate::job::{First, PollUrl, Request};
use crate::outcome::{ErrorKind, Failure, Outcome, Polled, Source, Success};
use crate::output::{AcceptedFile, AcceptedRow, Marked, Place, StoredRecord};

use super::Shared;
use super::call::{answer_message, backoff, send, take_token};
use super::http::ApiClient;
use super::recorder::Outcomes;

/// What workers need to hand an accepted row to the poller.
pub(super) struct Polls {
    pub(super) file: AcceptedFile,
    /// Every poll's headers (the configuration's), made once.
    headers: HeaderMap,
    /// A row accepted, and when to poll it first (the first answer's `Retry-After`).
    tx: mpsc::UnboundedSender<(Waiting, Option<Duration>)>,
}

impl Polls {
    pub(super) fn new(
        file: AcceptedFile,
        headers: HeaderMap,
    ) -> (Polls, mpsc::UnboundedReceiver<(Waiting, Option<Duration>)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Polls { file, headers, tx }, rx)
    }
}

/// A row waiting for its next poll: its place in `accepted.jsonl` and how
/// its polls went so far. No row data: that stays in the file.
pub(super) struct Waiting {
    place: Place,
    /// Past it, the row is pending.
    deadline: Instant,
    /// Polls sent for this row in this run.
    polls: u32,
    /// Failed polls in a row (connection, timeout, 401, 429, 5xx): the backoff.
    failures: u32,
    /// The first call's attempts (0 for a row accepted in an earlier part of the run).
    attempts: u32,
}

impl Waiting {
    /// A row accepted earlier (`resume`): polled at once, then for `max_wait` more.
    pub(super) fn resumed(place: Place, max_wait: Duration) -> Waiting {
        Waiting { place, deadline: Instant::now() + max_wait, polls: 0, failures: 0, attempts: 0 }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Header names in lower case, values as text.
fn header_map(headers: &HeaderMap) -> Map<String, Value> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), Value::from(String::from_utf8_lossy(value.as_bytes()))))
        .collect()
}

/// A row whose first call succeeded: polled if there is a URL to poll
/// (recorded in `accepted.jsonl` first, durable, and `None` returned: its
/// outcome comes from the poller), else its outcome as it is.
///
/// Boxed: its future is about 2 KiB, more than the rest of a worker's, and
/// a worker's task holds room for its largest future all the time (4 KiB a
/// worker instead of about 2.5 at `-j 2000`; BENCHMARKS.md).
pub(super) fn accept<'a>(
    shared: &'a Shared,
    polls: &'a Polls,
    outcome: Outcome,
    request: &'a Request,
    headers: &'a HeaderMap,
    retry_after: Option<Duration>,
) -> std::pin::Pin<Box<impl Future<Output = Option<Outcome>> + Send + 'a>> {
    Box::pin(accept_row(shared, polls, outcome, request, headers, retry_after))
}

async fn accept_row(
    shared: &Shared,
    polls: &Polls,
    mut outcome: Outcome,
    request: &Request,
    headers: &HeaderMap,
    retry_after: Option<Duration>,
) -> Option<Outcome> {
    let (Ok(success), Source::Record(_)) = (&mut outcome.result, &outcome.source) else { return Some(outcome) };
    // The first answer and the record move out of the outcome, to the
    // accepted row's line; a row that is not polled gets them back.
    let taken = success.raw.is_none();
    let response = match &success.raw {
        Some(raw) => serde_json::from_slice(raw).unwrap_or(Value::Null),
        None => std::mem::take(&mut success.response),
    };
    let status = outcome.status.unwrap_or(0);
    let first = First { status, headers: header_map(headers), response: Arc::new(response) };
    let Source::Record(record) = std::mem::replace(&mut outcome.source, Source::Raw(Raw::Text(String::new()))) else {
        unreachable!("matched above")
    };
    let row = Row { input: outcome.input, number: outcome.number, line: outcome.line, record, earlier: None };
    let unpolled = |mut outcome: Outcome, row: Row, first: First| {
        outcome.source = Source::Record(row.record);
        if let (true, Ok(success)) = (taken, &mut outcome.result) {
            success.response = Arc::try_unwrap(first.response).unwrap_or_else(|shared| (*shared).clone());
        }
        outcome
    };
    let accepted = |what: String| {
        format!("the gateway accepted the call (HTTP {status}), {what}; check the row there before sending it again")
    };
    let url = match shared.requests.poll_url(&row, &first, &request.url) {
        PollUrl::None => return Some(unpolled(outcome, row, first)),
        PollUrl::To(url) => url,
        PollUrl::OtherOrigin(origin) => {
            let mut outcome = unpolled(outcome, row, first);
            let message = accepted(format!(
                "but its poll URL is on {origin}, another origin than the call's ({}): not polled, so the token \
                 does not go there (poll.allow_other_origin = true allows it)",
                request.url.origin().ascii_serialization()
            ));
            outcome.result = Err(Failure { kind: ErrorKind::OtherOrigin, message });
            return Some(outcome);
        }
        PollUrl::Invalid(why) => {
            let mut outcome = unpolled(outcome, row, first);
            let message = accepted(format!("but it cannot be polled: {why}"));
            outcome.result = Err(Failure { kind: ErrorKind::Pending, message });
            return Some(outcome);
        }
    };
    let Ok(success) = outcome.result else { unreachable!("matched above") };
    let line = AcceptedRow {
        input: outcome.input,
        row: outcome.number,
        line: outcome.line,
        key: outcome.key,
        attempts: outcome.attempts,
        latency_us: outcome.latency.as_micros() as u64,
        at_ms: now_ms(),
        url: url.to_string(),
        status,
        headers: first.headers,
        response: Arc::try_unwrap(first.response).unwrap_or_else(|shared| (*shared).clone()),
        capture: success.captured,
        record: StoredRecord::from(row.record),
        source_row: outcome.origin.as_ref().and_then(|o| o.row),
        source_run: outcome.origin.as_ref().and_then(|o| o.run.as_deref().map(str::to_string)),
        source_input: outcome.origin.as_ref().and_then(|o| o.input),
    };
    let max_wait = shared.requests.poll().map_or(Duration::ZERO, |p| p.max_wait);
    match polls.file.commit(&line).await {
        Ok(place) => {
            // A poller gone (the run stops) leaves the row accepted: resume polls it.
            let (deadline, attempts) = (Instant::now() + max_wait, line.attempts);
            let waiting = Waiting { place, deadline, polls: 0, failures: 0, attempts };
            let _ = polls.tx.send((waiting, retry_after));
        }
        // Not known as accepted: the row stays in doubt.
        Err(e) => shared.abort(Error::Output(e)),
    }
    None
}

/// A row in the heap, the soonest due on top.
struct Due(Instant, u64, Waiting);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Order> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> Order {
        (other.0, other.1).cmp(&(self.0, self.1))
    }
}

type PollFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = (Waiting, Step)> + 'a>>;

/// What one poll came to.
enum Step {
    /// Not final: poll again after this long.
    Again(Duration),
    Final(Box<Outcome>),
    /// The run stopped before the poll went out, or while it was in flight.
    Stopped,
}

/// How the polls of the run went.
#[derive(Debug, Default)]
pub(super) struct PollerEnd {
    /// Rows not final at `max_wait` or when the run stopped.
    pub(super) pending: u64,
    /// The first calls' attempts of those rows (`attempts` counts them too).
    pub(super) pending_attempts: u64,
}

impl PollerEnd {
    fn pend(&mut self, waiting: &Waiting) {
        self.pending += 1;
        self.pending_attempts += u64::from(waiting.attempts);
    }
}

/// What the poller starts with on `resume`: the rows accepted earlier.
pub(super) struct Preload {
    pub(super) rows: Vec<Waiting>,
    /// `--give-up-pending`: record them as failed (`pending`) instead of polling.
    pub(super) give_up: bool,
}

/// Starts the poller's thread. It ends once `lanes_done` is cancelled and
/// every row handed to it has its outcome or is pending.
pub(super) fn start_poller(
    shared: Arc<Shared>,
    client: ApiClient,
    rows: mpsc::UnboundedReceiver<(Waiting, Option<Duration>)>,
    outcomes: Outcomes,
    lanes_done: CancellationToken,
    preload: Preload,
) -> Result<oneshot::Receiver<PollerEnd>, Error> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("bulkcall-poller".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    shared.abort(Error::Internal(format!("cannot start an async runtime: {e}")));
                    return;
                }
            };
            let end = runtime.block_on(poll_all(&shared, &client, rows, &outcomes, lanes_done, preload));
            runtime.shutdown_background();
            let _ = done_tx.send(end);
        })
        .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?;
    Ok(done_rx)
}

async fn poll_all(
    shared: &Shared,
    client: &ApiClient,
    mut rows: mpsc::UnboundedReceiver<(Waiting, Option<Duration>)>,
    outcomes: &Outcomes,
    lanes_done: CancellationToken,
    preload: Preload,
) -> PollerEnd {
    let Some(polls) = &shared.polls else { return PollerEnd::default() };
    let every = shared.requests.poll().map_or(Duration::from_secs(5), |p| p.every);
    let headers = RefCell::new(Vec::new());
    let mut end = PollerEnd::default();
    let mut heap = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Due>, at: Instant, waiting: Waiting| {
        seq += 1;
        heap.push(Due(at, seq, waiting));
    };
    for waiting in preload.rows {
        if preload.give_up {
            match given_up(polls, &headers, waiting.place) {
                Ok(outcome) => {
                    if outcomes.send(outcome, Marked::unbounded()).await.is_err() {
                        return end;
                    }
                }
                Err(e) => shared.abort(Error::Output(e)),
            }
        } else {
            shared.live.waiting.fetch_add(1, Ordering::Relaxed);
            push(&mut heap, Instant::now(), waiting);
        }
    }
    let waited = || shared.live.waiting.fetch_sub(1, Ordering::Relaxed);
    let cap = shared.settings.concurrency.max(1);
    let mut in_flight: futures::stream::FuturesUnordered<PollFuture<'_>> = futures::stream::FuturesUnordered::new();
    let mut lanes_over = false;
    loop {
        if shared.stop.is_cancelled() {
            break;
        }
        if lanes_over && heap.is_empty() && in_flight.is_empty() && rows.is_empty() {
            break;
        }
        let next = heap.peek().map(|d: &Due| d.0).filter(|_| in_flight.len() < cap);
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break,
            Some((waiting, step)) = in_flight.next(), if !in_flight.is_empty() => {
                match step {
                    Step::Final(outcome) => {
                        waited();
                        if outcomes.send(*outcome, Marked::unbounded()).await.is_err() {
                            break;
                        }
                    }
                    Step::Again(after) => {
                        let now = Instant::now();
                        if now >= waiting.deadline {
                            waited();
                            end.pend(&waiting);
                        } else {
                            push(&mut heap, (now + after).min(waiting.deadline), waiting);
                        }
                    }
                    Step::Stopped => {
                        waited();
                        end.pend(&waiting);
                    }
                }
            }
            Some((waiting, after)) = rows.recv() => {
                shared.live.waiting.fetch_add(1, Ordering::Relaxed);
                // The first answer's Retry-After, else `every`.
                let after = after.map_or(every, |a| a.min(shared.settings.retry_after_max));
                let at = (Instant::now() + after).min(waiting.deadline);
                push(&mut heap, at, waiting);
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let Due(_, _, waiting) = heap.pop().expect("peeked");
                in_flight.push(Box::pin(poll_once(shared, client, polls, &headers, every, waiting)));
            }
            _ = lanes_done.cancelled(), if !lanes_over => lanes_over = true,
        }
    }
    // Stopped: polls in flight end (within the grace period); every row
    // not final is pending.
    while let Some((waiting, step)) = in_flight.next().await {
        match step {
            Step::Final(outcome) => {
                let _ = outcomes.send(*outcome, Marked::unbounded()).await;
            }
            Step::Again(_) | Step::Stopped => end.pend(&waiting),
        }
    }
    for Due(_, _, waiting) in heap {
        end.pend(&waiting);
    }
    rows.close();
    while let Ok((waiting, _)) = rows.try_recv() {
        end.pend(&waiting);
    }
    end
}

/// An accepted row read back: its line, and the row as templates see it.
fn read_back(
    polls: &Polls,
    headers: &RefCell<Vec<Option<Arc<CsvHeaders>>>>,
    place: Place,
) -> Result<(AcceptedRow, Row), crate::output::OutputError> {
    let mut line = polls.file.read(place)?;
    let record = std::mem::replace(&mut line.record, StoredRecord::Json(Map::new()));
    let mut cache = headers.borrow_mut();
    if cache.len() <= line.input {
        cache.resize(line.input + 1, None);
    }
    let record = record.into_record(&mut cache[line.input]);
    let row = Row { input: line.input, number: line.row, line: line.line, record, earlier: None };
    Ok((line, row))
}

fn outcome_of(line: AcceptedRow, row: Row, status: Option<u16>, result: Result<Success, Failure>) -> Outcome {
    let known = line.source_row.is_some() || line.source_run.is_some() || line.source_input.is_some();
    let origin =
        known.then(|| Origin { row: line.source_row, run: line.source_run.map(Arc::from), input: line.source_input });
    Outcome {
        input: row.input,
        number: row.number,
        line: row.line,
        key: line.key,
        attempts: line.attempts,
        latency: Duration::from_micros(line.latency_us),
        status,
        result,
        source: Source::Record(row.record),
        origin,
        poll: None,
    }
}

/// `--give-up-pending`: a row accepted earlier, failed as `pending`.
fn given_up(
    polls: &Polls,
    headers: &RefCell<Vec<Option<Arc<CsvHeaders>>>>,
    place: Place,
) -> Result<Outcome, crate::output::OutputError> {
    let (line, row) = read_back(polls, headers, place)?;
    let status = Some(line.status);
    let message = format!(
        "the gateway accepted the call (HTTP {}) and its answer was not final when given up (--give-up-pending); \
         poll {} or check there before sending the row again",
        line.status, line.url
    );
    Ok(outcome_of(line, row, status, Err(Failure { kind: ErrorKind::Pending, message })))
}

/// One poll of one row.
async fn poll_once(
    shared: &Shared,
    client: &ApiClient,
    polls: &Polls,
    headers: &RefCell<Vec<Option<Arc<CsvHeaders>>>>,
    every: Duration,
    mut waiting: Waiting,
) -> (Waiting, Step) {
    let ready = tokio::select! {
        biased;
        _ = shared.stop.cancelled() => false,
        _ = shared.limiter.until_ready() => true,
    };
    if !ready {
        return (waiting, Step::Stopped);
    }
    let (mut line, row) = match read_back(polls, headers, waiting.place) {
        Ok(read) => read,
        Err(e) => {
            shared.abort(Error::Output(e));
            return (waiting, Step::Stopped);
        }
    };
    let url = match url::Url::parse(&line.url) {
        Ok(url) => url,
        Err(e) => {
            shared.abort(Error::Internal(format!("accepted.jsonl holds a poll URL that is not valid: {e}")));
            return (waiting, Step::Stopped);
        }
    };
    let poll = shared.requests.poll().expect("a poller runs only for a job with [poll]");
    let key = std::mem::take(&mut line.key);
    let request = Request { key, method: poll.method.clone(), url, headers: polls.headers.clone(), body: None };
    let Some(token) = take_token(shared).await else { return (waiting, Step::Stopped) };
    waiting.polls += 1;
    shared.live.polls.fetch_add(1, Ordering::Relaxed);
    shared.live.in_flight.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let result = tokio::select! {
        r = send(shared, client, &request, token.as_deref()) => Some(r),
        _ = shared.hard_stop.cancelled() => None,
    };
    shared.live.in_flight.fetch_sub(1, Ordering::Relaxed);
    line.key = request.key;
    let Some(result) = result else { return (waiting, Step::Stopped) };
    let latency = started.elapsed();
    let cap = |after: Duration| after.min(shared.settings.retry_after_max);
    let answer = match result {
        Ok(answer) => answer,
        Err(_) => {
            // Connection lost, timeout: the next interval, with backoff.
            shared.live.calls.record(None, latency);
            waiting.failures += 1;
            let after = every.max(backoff(shared, ErrorKind::Connection, waiting.failures));
            return (waiting, Step::Again(after));
        }
    };
    let status = answer.status.as_u16();
    shared.live.calls.record(Some(status), latency);
    shared.limiter.answered(status == 429);
    if status == 401 {
        // The token was refused: that one is forgotten, and the poll tried again.
        if let (Some(tokens), Some(token)) = (&shared.tokens, &token) {
            tokens.invalidate(token.generation);
        }
        waiting.failures += 1;
        let after = if waiting.failures == 1 {
            Duration::ZERO
        } else {
            every.max(backoff(shared, ErrorKind::Auth, waiting.failures))
        };
        return (waiting, Step::Again(after));
    }
    let transient = status == 429 || status == 408 || answer.status.is_server_error();
    if transient || shared.settings.retry_on.contains(&status) {
        let kind = if status == 429 { ErrorKind::Throttled } else { ErrorKind::ServerError };
        waiting.failures += 1;
        let after = answer.retry_after.map(cap).unwrap_or_else(|| every.max(backoff(shared, kind, waiting.failures)));
        return (waiting, Step::Again(after));
    }
    waiting.failures = 0;
    let poll_headers = answer.headers.as_ref().map(header_map).unwrap_or_default();
    let first = First {
        status: line.status,
        headers: std::mem::take(&mut line.headers),
        response: Arc::new(std::mem::take(&mut line.response)),
    };
    let body = Body::new(answer.body, answer.total);
    let judged = shared.requests.judge_poll(&row, &first, status, &poll_headers, &body);
    if !judged.done {
        return (waiting, Step::Again(answer.retry_after.map_or(every, cap)));
    }
    let message = (!judged.ok).then(|| answer_message(answer.status, None, body.bytes()));
    let polled = Polled {
        status: Some(status),
        polls: waiting.polls,
        waited_ms: now_ms().saturating_sub(line.at_ms),
        response: body.into_value(),
    };
    let (first_status, mut captured) = (line.status, std::mem::take(&mut line.capture));
    let response = Arc::try_unwrap(first.response).unwrap_or_else(|shared| (*shared).clone());
    let (status, result) = match message {
        None => {
            captured.extend(judged.captured);
            (Some(first_status), Ok(Success { response, raw: None, truncated: None, captured }))
        }
        Some(message) => {
            let message = format!("the final poll's answer was refused by the job's poll.success: {message}");
            (Some(status), Err(Failure { kind: ErrorKind::Rejected, message }))
        }
    };
    let mut outcome = outcome_of(line, row, status, result);
    outcome.poll = Some(Box::new(polled));
    (waiting, Step::Final(Box::new(outcome)))
}
