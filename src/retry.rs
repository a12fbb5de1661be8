//! The retry decision: after each attempt of a row, what happens next.
//!
//! Pure: the attempt's [`Verdict`], what the row has used so far and the
//! job's [`Policy`] in, the [`Next`] step out; the runner carries it out
//! (backoff, the retry budget, pauses, the token, the files).
//!
//! An idempotent job's row is retried after any transient failure. A row of
//! a job that is not idempotent (a claim submission) is sent again only
//! when the gateway provably did not act on it: the call failed before
//! anything was written, or the answer was 429, 401 (the token was refused
//! before processing) or 503 with `Retry-After`. After a timeout or a
//! connection lost mid-call it fails as `in_doubt`, after a 5xx as
//! `server_error`, never sent twice.

use std::time::Duration;

use crate::config::Settings;
use crate::outcome::{ErrorKind, Verdict};

/// What the job allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Attempts per row, the first included.
    pub max_attempts: u32,
    /// Whether a row may be sent again when the gateway may have acted on it.
    pub idempotent: bool,
    /// A longer `Retry-After` stops the run instead of waiting.
    pub retry_after_max: Duration,
}

impl Policy {
    pub fn new(settings: &Settings, idempotent: bool) -> Policy {
        Policy { max_attempts: settings.max_attempts, idempotent, retry_after_max: settings.retry_after_max }
    }
}

/// What a row has used so far.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Used {
    /// Attempts made, the one just judged included (a resend after a token
    /// refresh is not counted).
    pub attempts: u32,
    /// The one resend with a new token after a 401 is spent.
    pub refreshed: bool,
    /// The call carried a token (a 401 without one is final).
    pub authorized: bool,
}

/// The next step for a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// An answer to judge: the job's `success` expression (default: 2xx)
    /// makes it a success, or a failure of `kind`; `note` says why it was
    /// not sent again.
    Judge { kind: ErrorKind, note: Option<&'static str> },
    /// Forget the refused token and send again at once with a new one.
    Refresh,
    /// Send again after a backoff, or after `after` (the server's
    /// `Retry-After`, which pauses every worker).
    Retry { kind: ErrorKind, after: Option<Duration> },
    /// The row fails as `kind`, its answer (if any) not judged; `note`
    /// says why it was not sent again.
    Fail { kind: ErrorKind, note: Option<&'static str> },
    /// The gateway asked for a pause longer than `retry_after_max` (a
    /// maintenance window): stop the run; rows not finished stay to resume.
    Pause { after: Duration },
}

/// Why a row of a job that is not idempotent was not sent again.
pub const NOT_IDEMPOTENT: &str = "not sent again: the gateway may have acted on it and the job is not idempotent \
     (set idempotency_key, or idempotent = true if a duplicate does no harm)";

/// Whether the gateway provably did not act on the call: nothing was
/// written, or it answered before processing (429, 401, 503 with `Retry-After`).
pub fn unprocessed(verdict: &Verdict) -> bool {
    match verdict {
        Verdict::NotSent(_) | Verdict::Unauthorized => true,
        Verdict::Answer { status, after, .. } => *status == 429 || (*status == 503 && after.is_some()),
        Verdict::Done | Verdict::NoAnswer(_) | Verdict::Permanent(_) => false,
    }
}

/// The next step for a row after an attempt.
pub fn decide(verdict: &Verdict, used: &Used, policy: &Policy) -> Next {
    let attempts_left = used.attempts < policy.max_attempts;
    let may_resend = policy.idempotent || unprocessed(verdict);
    match *verdict {
        Verdict::Done => Next::Judge { kind: ErrorKind::Rejected, note: None },
        Verdict::Unauthorized if used.authorized && !used.refreshed => Next::Refresh,
        Verdict::Unauthorized => Next::Fail { kind: ErrorKind::Auth, note: None },
        Verdict::Answer { kind, retryable: false, .. } => Next::Judge { kind, note: None },
        Verdict::Answer { after: Some(after), .. } if after > policy.retry_after_max && may_resend => {
            Next::Pause { after }
        }
        Verdict::Answer { kind, .. } if !may_resend => Next::Judge { kind, note: Some(NOT_IDEMPOTENT) },
        Verdict::Answer { kind, after, .. } if attempts_left => Next::Retry { kind, after },
        Verdict::Answer { kind, .. } => Next::Judge { kind, note: None },
        Verdict::NotSent(kind) | Verdict::NoAnswer(kind) if may_resend && attempts_left => {
            Next::Retry { kind, after: None }
        }
        Verdict::NotSent(kind) => Next::Fail { kind, note: None },
        Verdict::NoAnswer(_) if !policy.idempotent => {
            Next::Fail { kind: ErrorKind::InDoubt, note: Some(NOT_IDEMPOTENT) }
        }
        Verdict::NoAnswer(kind) | Verdict::Permanent(kind) => Next::Fail { kind, note: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorKind::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn policy(idempotent: bool) -> Policy {
        Policy { max_attempts: 3, idempotent, retry_after_max: Duration::from_secs(300) }
    }

    fn first() -> Used {
        Used { attempts: 1, refreshed: false, authorized: true }
    }

    fn last() -> Used {
        Used { attempts: 3, ..first() }
    }

    fn answer(status: u16, kind: ErrorKind, after: Option<Duration>) -> Verdict {
        Verdict::Answer { kind, status, retryable: true, after }
    }

    /// Every row of the table, for an idempotent job and for one that is not.
    #[test]
    fn the_table() {
        let judge_not_idempotent = |kind| Next::Judge { kind, note: Some(NOT_IDEMPOTENT) };
        let fail_not_idempotent = |kind| Next::Fail { kind, note: Some(NOT_IDEMPOTENT) };
        let rows: Vec<(&str, Verdict, Used, Next, Next)> = vec![
            // (what, verdict, used, idempotent job, job that is not)
            (
                "2xx",
                Verdict::Done,
                first(),
                Next::Judge { kind: Rejected, note: None },
                Next::Judge { kind: Rejected, note: None },
            ),
            ("401, first", Verdict::Unauthorized, first(), Next::Refresh, Next::Refresh),
            (
                "401 after the refresh",
                Verdict::Unauthorized,
                Used { refreshed: true, ..first() },
                Next::Fail { kind: Auth, note: None },
                Next::Fail { kind: Auth, note: None },
            ),
            (
                "401 without a token",
                Verdict::Unauthorized,
                Used { authorized: false, ..first() },
                Next::Fail { kind: Auth, note: None },
                Next::Fail { kind: Auth, note: None },
            ),
            (
                "400",
                Verdict::Answer { kind: ClientError, status: 400, retryable: false, after: None },
                first(),
                Next::Judge { kind: ClientError, note: None },
                Next::Judge { kind: ClientError, note: None },
            ),
            (
                "500 not in retry_on",
                Verdict::Answer { kind: ServerError, status: 500, retryable: false, after: None },
                first(),
                Next::Judge { kind: ServerError, note: None },
                Next::Judge { kind: ServerError, note: None },
            ),
            (
                "429",
                answer(429, Throttled, None),
                first(),
                Next::Retry { kind: Throttled, after: None },
                Next::Retry { kind: Throttled, after: None },
            ),
            (
                "429 with Retry-After",
                answer(429, Throttled, Some(MINUTE)),
                first(),
                Next::Retry { kind: Throttled, after: Some(MINUTE) },
                Next::Retry { kind: Throttled, after: Some(MINUTE) },
            ),
            (
                "429, last attempt",
                answer(429, Throttled, None),
                last(),
                Next::Judge { kind: Throttled, note: None },
                Next::Judge { kind: Throttled, note: None },
            ),
            (
                "429 with a Retry-After over retry_after_max",
                answer(429, Throttled, Some(HOUR)),
                first(),
                Next::Pause { after: HOUR },
                Next::Pause { after: HOUR },
            ),
            (
                "429 with a long Retry-After, last attempt",
                answer(429, Throttled, Some(HOUR)),
                last(),
                Next::Pause { after: HOUR },
                Next::Pause { after: HOUR },
            ),
            (
                "503 with Retry-After",
                answer(503, ServerError, Some(MINUTE)),
                first(),
                Next::Retry { kind: ServerError, after: Some(MINUTE) },
                Next::Retry { kind: ServerError, after: Some(MINUTE) },
            ),
            (
                "503 with a Retry-After over retry_after_max",
                answer(503, ServerError, Some(HOUR)),
                first(),
                Next::Pause { after: HOUR },
                Next::Pause { after: HOUR },
            ),
            (
                "503 without Retry-After",
                answer(503, ServerError, None),
                first(),
                Next::Retry { kind: ServerError, after: None },
                judge_not_idempotent(ServerError),
            ),
            (
                "500",
                answer(500, ServerError, None),
                first(),
                Next::Retry { kind: ServerError, after: None },
                judge_not_idempotent(ServerError),
            ),
            (
                "500 with Retry-After",
                answer(500, ServerError, Some(MINUTE)),
                first(),
                Next::Retry { kind: ServerError, after: Some(MINUTE) },
                judge_not_idempotent(ServerError),
            ),
            (
                "500 with a long Retry-After",
                answer(500, ServerError, Some(HOUR)),
                first(),
                Next::Pause { after: HOUR },
                judge_not_idempotent(ServerError),
            ),
            (
                "500, last attempt",
                answer(500, ServerError, None),
                last(),
                Next::Judge { kind: ServerError, note: None },
                judge_not_idempotent(ServerError),
            ),
            (
                "408",
                answer(408, Timeout, None),
                first(),
                Next::Retry { kind: Timeout, after: None },
                judge_not_idempotent(Timeout),
            ),
            (
                "connect error",
                Verdict::NotSent(Connection),
                first(),
                Next::Retry { kind: Connection, after: None },
                Next::Retry { kind: Connection, after: None },
            ),
            (
                "connect timeout",
                Verdict::NotSent(Timeout),
                first(),
                Next::Retry { kind: Timeout, after: None },
                Next::Retry { kind: Timeout, after: None },
            ),
            (
                "connect error, last attempt",
                Verdict::NotSent(Connection),
                last(),
                Next::Fail { kind: Connection, note: None },
                Next::Fail { kind: Connection, note: None },
            ),
            (
                "timeout",
                Verdict::NoAnswer(Timeout),
                first(),
                Next::Retry { kind: Timeout, after: None },
                fail_not_idempotent(InDoubt),
            ),
            (
                "connection lost mid-call",
                Verdict::NoAnswer(Connection),
                first(),
                Next::Retry { kind: Connection, after: None },
                fail_not_idempotent(InDoubt),
            ),
            (
                "timeout, last attempt",
                Verdict::NoAnswer(Timeout),
                last(),
                Next::Fail { kind: Timeout, note: None },
                fail_not_idempotent(InDoubt),
            ),
            (
                "a request that cannot be sent",
                Verdict::Permanent(Connection),
                first(),
                Next::Fail { kind: Connection, note: None },
                Next::Fail { kind: Connection, note: None },
            ),
        ];
        for (what, verdict, used, idempotent, not) in rows {
            assert_eq!(decide(&verdict, &used, &policy(true)), idempotent, "{what}, idempotent job");
            assert_eq!(decide(&verdict, &used, &policy(false)), not, "{what}, job that is not idempotent");
        }
    }

    #[test]
    fn only_calls_the_gateway_did_not_act_on_count_as_unprocessed() {
        assert!(unprocessed(&Verdict::NotSent(Connection)));
        assert!(unprocessed(&Verdict::Unauthorized));
        assert!(unprocessed(&answer(429, Throttled, None)));
        assert!(unprocessed(&answer(503, ServerError, Some(MINUTE))));
        assert!(!unprocessed(&answer(503, ServerError, None)));
        assert!(!unprocessed(&answer(500, ServerError, Some(MINUTE))));
        assert!(!unprocessed(&Verdict::NoAnswer(Timeout)));
        assert!(!unprocessed(&Verdict::Done));
    }
}
