//! One row, from its request to its outcome: attempts, retries, the verdict.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::answer::Body;
use crate::error::Error;
use crate::input::{Item, Row};
use crate::job::Request;
use crate::outcome::{self, CallError, ErrorKind, Failure, Outcome, Source, Success, Verdict};
use crate::output::{Marked, Marks};
use crate::retry::{self, Next, Used};
use crate::token::Token;

use super::Shared;
use super::breaker::{self, Hold};
use super::call::{Answer, answer_message, backoff, send, take_token};
use super::http::ApiClient;

/// What a lane's workers share, on the lane's thread alone.
pub(super) struct Lane {
    /// The lane's own: its connections' I/O stays on this thread.
    pub(super) client: ApiClient,
    /// Where its workers wait for their started marks.
    pub(super) marks: Marks,
}

/// Takes one row to its outcome: render it, then attempt and decide until
/// the decision is final. `None` when the run stopped before the row was
/// finished: it stays to resume (released in the ledger when the gateway
/// provably did not act on it, else in doubt), or when it was accepted and
/// handed to the poller. `marked` holds the row's started mark once there
/// is one: the row is settled when it is dropped.
pub(super) async fn process(shared: &Shared, lane: &Lane, item: Item, marked: &mut Marked) -> Option<Outcome> {
    let (row, request) = match render(shared, item) {
        Ok(rendered) => rendered,
        Err(outcome) => {
            // Marked started like every row that gets an outcome: `resume`
            // trusts an outcome line only for a row the ledger knows. (A
            // rare path, boxed: no room for it in every worker's task.)
            let marking = Box::pin(mark(shared, lane, (outcome.input, outcome.number), marked));
            return (marking.await && going_on(shared, outcome.input, outcome.number)).then_some(outcome);
        }
    };
    // A row of a failures file that the gateway may have acted on: a job
    // that is not idempotent does not send it again unless told to.
    if shared.leave_out_earlier
        && let Some(kind) = row.earlier.as_deref().and_then(outcome::may_have_acted)
    {
        if !(Box::pin(mark(shared, lane, (row.input, row.number), marked)).await
            && going_on(shared, row.input, row.number))
        {
            return None;
        }
        let earlier = row.earlier.as_deref().expect("checked above");
        let message = format!(
            "left out: it failed as {} before{}, so the gateway may have acted on it; check there, then send it \
             with --in-doubt resend (before: {})",
            kind.as_str(),
            earlier.row.map(|r| format!(" (row {r})")).unwrap_or_default(),
            earlier.message
        );
        // No attempt, no status of this run: the summary counts it as left out.
        return Some(finish(row, &request, 0, Duration::ZERO, None, fail(kind, message)));
    }
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
        let (result, latency, token) = match attempt(shared, lane, &row, &request, &mut used, resend, marked).await {
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
            Err(e) if e.untrusted => {
                // Nothing reached the server: the row stays to be sent once
                // the certificate is trusted (`resume`).
                shared.abort(Error::Certificate(outcome::UntrustedCertificate {
                    url: request.url.origin().ascii_serialization(),
                    detail: e.text,
                }));
                return unfinished(shared, &row, &used, unprocessed);
            }
            Err(CallError { refused: Some(alert), .. }) => {
                // The API refused this client's certificate in the handshake:
                // every call would meet the same. Nothing was processed.
                let cert = shared.settings.tls.client_cert.as_deref();
                shared.abort(Error::Token(crate::token::TokenError::client_certificate(
                    &request.url.origin().ascii_serialization(),
                    "the API",
                    cert,
                    &alert,
                )));
                return unfinished(shared, &row, &used, unprocessed);
            }
            Err(e) => {
                let verdict = e.verdict;
                let mut text = e.text;
                if matches!(verdict, Verdict::NotSent(_)) {
                    text = format!("{text}; {}", outcome::NEVER_REACHED);
                }
                (verdict, None, text)
            }
        };
        unprocessed &= retry::unprocessed(&verdict);
        let status = answer.as_ref().map(|a| a.status.as_u16());
        shared.live.calls.record(status, latency);
        let origin = || request.url.origin().ascii_serialization();
        let what = || status.map_or_else(|| error.clone(), |s| format!("HTTP {s}"));
        if let Some(outage) = shared.breaker.observe((row.input, row.number), &verdict, origin, what) {
            shared.abort(Error::Outage(outage));
        }
        if let Some(status) = status {
            shared.limiter.answered(status == 429);
            if verdict != Verdict::Unauthorized {
                shared.auth_streak.store(0, Ordering::Relaxed);
            }
        }
        let message = || {
            answer.as_ref().map_or_else(|| error.clone(), |a| answer_message(a.status, a.location.as_deref(), &a.body))
        };
        let next = retry::decide(&verdict, &used, &shared.policy);
        // A row that failed only because the gateway is out is not a failure.
        if matches!(next, Next::Fail { .. } | Next::Judge { .. }) && outage_holds(shared, &verdict).await {
            return unfinished(shared, &row, &used, unprocessed);
        }
        match next {
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
                    if outage_holds(shared, &verdict).await {
                        return unfinished(shared, &row, &used, unprocessed);
                    }
                    shared.budget_stopped.fetch_add(1, Ordering::Relaxed);
                    let message = format!(
                        "{}; not retried: the retry budget is spent (too many calls are failing; see retry_budget)",
                        message()
                    );
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
                let Some(mut answer) = answer else { return unfinished(shared, &row, &used, unprocessed) };
                let (headers, after) = (answer.headers.take(), answer.retry_after);
                let outcome = judge(shared, row, &request, used.attempts, latency, answer, kind, note);
                return match (&shared.polls, headers) {
                    (Some(polls), Some(headers)) if outcome.result.is_ok() => {
                        super::poller::accept(shared, polls, outcome, &request, &headers, after).await
                    }
                    _ => Some(outcome),
                };
            }
        }
    }
}

/// Marks a row started (into `marked`); false, the run aborted, when the
/// ledger cannot be written.
async fn mark(shared: &Shared, lane: &Lane, (input, row): (usize, u64), marked: &mut Marked) -> bool {
    match lane.marks.started(input, row).await {
        Ok(mark) => {
            *marked = mark;
            true
        }
        Err(e) => {
            shared.abort(Error::Output(e));
            false
        }
    }
}

/// Whether a row marked started without a call to make (its outcome is
/// known already) goes on to it: not once the run stopped while its mark
/// waited (its room came when an outcome that stopped the run was
/// written, as with `--max-failures`); the row is then released, as one
/// never sent.
fn going_on(shared: &Shared, input: usize, row: u64) -> bool {
    if !shared.stop.is_cancelled() {
        return true;
    }
    if let Err(e) = shared.ledger.released(input, row) {
        shared.abort(Error::Output(e));
    }
    false
}

/// Whether a row whose last attempt was an outage attempt is released to
/// resume rather than recorded as failed: the breaker opened (or the run
/// stopped) before any other call got an answer.
async fn outage_holds(shared: &Shared, verdict: &Verdict) -> bool {
    if !breaker::is_outage(verdict) {
        return false;
    }
    match shared.breaker.hold(&shared.stop).await {
        Hold::Record => false,
        Hold::Release => true,
        Hold::Opened(outage) => {
            shared.abort(Error::Outage(outage));
            true
        }
    }
}

/// A row's request, or its outcome when it cannot be sent.
#[allow(clippy::result_large_err)] // an outcome goes straight to the collector
pub(super) fn render(shared: &Shared, item: Item) -> Result<(Row, Request), Outcome> {
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
pub(super) enum Tried {
    /// It went out (or failed trying): its result, how long it took, the token it carried.
    Sent { result: Result<Answer, CallError>, latency: Duration, token: Option<Arc<Token>> },
    /// The run stopped before it went out.
    Stopped,
    /// The grace period ended while it was in flight.
    Abandoned,
}

/// One attempt: waits for the rate limiter, marks the row started before
/// its first attempt (into `marked`), takes the token (as late as can be, so it cannot
/// expire in between), sends. A resend after a token refresh is not counted.
pub(super) async fn attempt(
    shared: &Shared,
    lane: &Lane,
    row: &Row,
    request: &Request,
    used: &mut Used,
    resend: bool,
    marked: &mut Marked,
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
            if !mark(shared, lane, (row.input, row.number), marked).await {
                return Tried::Abandoned;
            }
            // The run stopped while the mark waited (its room came when an
            // outcome that stopped the run was written): nothing goes out.
            if shared.stop.is_cancelled() {
                return Tried::Stopped;
            }
            shared.budget.earn_retry();
        }
    }
    let Some(token) = take_token(shared).await else { return Tried::Stopped };
    shared.live.in_flight.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let result = tokio::select! {
        r = send(shared, &lane.client, request, token.as_deref()) => Some(r),
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
pub(super) async fn wait(shared: &Shared, delay: Duration) -> bool {
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
pub(super) fn unfinished(shared: &Shared, row: &Row, used: &Used, unprocessed: bool) -> Option<Outcome> {
    if used.attempts > 0 && !unprocessed {
        // Started, with no answer to record: the summary counts it in doubt.
        shared.abandoned.fetch_add(1, Ordering::Relaxed);
    }
    if used.attempts > 0
        && unprocessed
        && let Err(e) = shared.ledger.released(row.input, row.number)
    {
        shared.abort(Error::Output(e));
    }
    None
}

/// A 401 with a fresh token: a stream of them stops the run.
pub(super) fn refused_again(shared: &Shared) {
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
pub(super) fn judge(
    shared: &Shared,
    row: Row,
    request: &Request,
    attempts: u32,
    latency: Duration,
    answer: Answer,
    kind: ErrorKind,
    note: Option<&str>,
) -> Outcome {
    let (status, location) = (answer.status, answer.location);
    let body = Body::new(answer.body, answer.total);
    let judged = shared.requests.judge(status.as_u16(), &body, &row);
    let success = status.is_success();
    let result = if judged.ok && (success || shared.requests.has_success()) {
        Ok(Success::new(body, judged.captured))
    } else if success {
        let message = answer_message(status, location.as_deref(), body.bytes());
        fail(kind, format!("the job's success expression refused the answer: {message}"))
    } else {
        fail(kind, with_note(answer_message(status, location.as_deref(), body.bytes()), note))
    };
    finish(row, request, attempts, latency, Some(status.as_u16()), result)
}

/// A row's outcome; its record moves into it, uncopied.
pub(super) fn finish(
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
        origin: row.earlier.and_then(|e| e.origin),
        poll: None,
    }
}

pub(super) fn fail(kind: ErrorKind, message: String) -> Result<Success, Failure> {
    Err(Failure { kind, message })
}

pub(super) fn with_note(message: String, note: Option<&str>) -> String {
    match note {
        Some(note) if message.is_empty() => note.to_string(),
        Some(note) => format!("{message}; {note}"),
        None => message,
    }
}

/// What a gateway's long `Retry-After` stops the run with: the wait it
/// asked for, when that ends, and how to go on.
pub(super) fn pause_message(shared: &Shared, after: Duration) -> String {
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
        crate::options::shell_word(shared.dir.display())
    )
}
