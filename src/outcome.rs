//! What happened to one row, and the one function that classifies an
//! attempt's result as success, retryable or permanent.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Map, Value};

use crate::answer::Body;
use crate::input::{BadRow, Raw, Record, Row};

/// Why a row failed: the `_error` column of the failures file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidRow,
    ClientError,
    ServerError,
    Throttled,
    Timeout,
    Connection,
    Auth,
    Rejected,
    InDoubt,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRow => "invalid_row",
            ErrorKind::ClientError => "client_error",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Auth => "auth",
            ErrorKind::Rejected => "rejected",
            ErrorKind::InDoubt => "in_doubt",
        }
    }
}

/// The input record an outcome is about, kept for the failures file.
#[derive(Debug, Clone)]
pub enum Source {
    Record(Record),
    Raw(Raw),
}

/// The final outcome of one row.
#[derive(Debug)]
pub struct Outcome {
    pub input: usize,
    pub number: u64,
    pub line: u64,
    pub key: String,
    /// Attempts counted (a resend after a 401 refresh is not counted).
    pub attempts: u32,
    /// Latency of the last attempt.
    pub latency: Duration,
    pub status: Option<u16>,
    pub result: Result<Success, Failure>,
    pub source: Source,
}

#[derive(Debug)]
pub struct Success {
    /// The answer: JSON if it parses, else a string; null when `raw` has it.
    pub response: Value,
    /// The answer's own bytes when they are JSON on one line: written to
    /// results as they are, instead of serializing `response` again.
    pub raw: Option<Vec<u8>>,
    /// `Some(total bytes)` when the kept answer was cut at `max_response_bytes`.
    pub truncated: Option<u64>,
    pub captured: Map<String, Value>,
}

impl Success {
    /// The answer kept for results: its bytes when they are JSON on one
    /// line, else its value.
    pub fn new(body: Body<'_>, captured: Map<String, Value>) -> Success {
        let truncated = body.cut();
        if body.is_compact_json() {
            Success { response: Value::Null, raw: Some(body.into_bytes()), truncated, captured }
        } else {
            Success { response: body.into_value(), raw: None, truncated, captured }
        }
    }
}

#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Outcome {
    pub fn invalid(row: &Row, key: String, message: String) -> Outcome {
        Outcome {
            input: row.input,
            number: row.number,
            line: row.line,
            key,
            attempts: 0,
            latency: Duration::ZERO,
            status: None,
            result: Err(Failure { kind: ErrorKind::InvalidRow, message }),
            source: Source::Record(row.record.clone()),
        }
    }

    pub fn bad_row(bad: BadRow) -> Outcome {
        Outcome {
            input: bad.input,
            number: bad.number,
            line: bad.line,
            key: bad.number.to_string(),
            attempts: 0,
            latency: Duration::ZERO,
            status: None,
            result: Err(Failure { kind: ErrorKind::InvalidRow, message: bad.message }),
            source: Source::Raw(bad.raw),
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// A 2xx (the job's `success` expression judges it further).
    Done,
    /// Try again if attempts are left; `after` is the server's Retry-After.
    Retry { kind: ErrorKind, after: Option<Duration> },
    /// Permanent: never retried.
    Fail(ErrorKind),
    /// 401: refresh the token and resend once.
    Unauthorized,
}

/// Classifies an answer's status. `retry_on` is the configured set of
/// retryable statuses.
pub fn classify_status(status: StatusCode, retry_on: &[u16], retry_after: Option<Duration>) -> Verdict {
    let code = status.as_u16();
    if status.is_success() {
        return Verdict::Done;
    }
    if code == 401 {
        return Verdict::Unauthorized;
    }
    let kind = match code {
        429 => ErrorKind::Throttled,
        408 => ErrorKind::Timeout,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::ClientError,
    };
    if retry_on.contains(&code) { Verdict::Retry { kind, after: retry_after } } else { Verdict::Fail(kind) }
}

/// Classifies a transport error: timeouts and connection failures are retryable.
pub fn classify_error(e: &reqwest::Error) -> Verdict {
    if untrusted_certificate(e) {
        // The same certificate answers the next attempt too.
        Verdict::Fail(ErrorKind::Connection)
    } else if e.is_timeout() {
        Verdict::Retry { kind: ErrorKind::Timeout, after: None }
    } else if e.is_connect() || e.is_request() || e.is_body() || e.is_decode() {
        Verdict::Retry { kind: ErrorKind::Connection, after: None }
    } else {
        // Building the request failed: a bug or an unsendable value, never fixed by retrying.
        Verdict::Fail(ErrorKind::Connection)
    }
}

/// A server's TLS certificate that no trusted root vouches for: never
/// retried, it stops the run whether it is the token endpoint's or the API's.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the TLS certificate of {url} is not trusted ({detail}); check the URL, or name the CA that signed it with ca_file"
)]
pub struct UntrustedCertificate {
    pub url: String,
    pub detail: String,
}

/// Whether the server's TLS certificate was refused: not retried, and a
/// matter of `ca_file` or the URL, not of the network.
pub fn untrusted_certificate(e: &reqwest::Error) -> bool {
    use std::error::Error;
    use tokio_rustls::rustls::Error as Tls;
    let mut source: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(mut s) = source {
        // An io::Error hides the error it wraps from `source()`.
        while let Some(inner) = s.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            s = inner;
        }
        if matches!(s.downcast_ref::<Tls>(), Some(Tls::InvalidCertificate(_))) {
            return true;
        }
        source = s.source();
    }
    false
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        // Absurd values (1e20) are kept as a very long wait, never a panic.
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A one-line description of a transport error, with its causes.
pub fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY_ON: &[u16] = &[408, 425, 429, 500, 502, 503, 504];

    #[test]
    fn statuses_are_classified_once() {
        let c = |code| classify_status(StatusCode::from_u16(code).unwrap(), RETRY_ON, None);
        assert_eq!(c(200), Verdict::Done);
        assert_eq!(c(204), Verdict::Done);
        assert_eq!(c(401), Verdict::Unauthorized);
        assert_eq!(c(403), Verdict::Fail(ErrorKind::ClientError), "a 403 never refreshes the token");
        assert_eq!(c(400), Verdict::Fail(ErrorKind::ClientError));
        assert_eq!(c(404), Verdict::Fail(ErrorKind::ClientError));
        assert_eq!(c(429), Verdict::Retry { kind: ErrorKind::Throttled, after: None });
        assert_eq!(c(503), Verdict::Retry { kind: ErrorKind::ServerError, after: None });
        assert_eq!(c(501), Verdict::Fail(ErrorKind::ServerError));
        assert_eq!(c(408), Verdict::Retry { kind: ErrorKind::Timeout, after: None });
        assert_eq!(
            classify_status(StatusCode::BAD_GATEWAY, &[429], None),
            Verdict::Fail(ErrorKind::ServerError),
            "retry_on changes the set"
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 1.5 ", now), Some(Duration::from_millis(1500)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("1e20", now), Some(Duration::MAX), "an absurd value is a very long wait");
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::MAX));
    }
}
