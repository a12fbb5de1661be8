//! What happened to one row, and the one function that classifies an
//! attempt's result as success, retryable or permanent.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Map, Value};

use crate::answer::Body;
use crate::input::{BadRow, Origin, Raw, Record, Row};

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
    /// A poll URL on another origin than the first call's (`[poll]` without `allow_other_origin`).
    OtherOrigin,
    /// Still not final when given up (`resume --give-up-pending`).
    Pending,
}

impl ErrorKind {
    /// Every kind, for parsing.
    const ALL: [ErrorKind; 11] = [
        ErrorKind::InvalidRow,
        ErrorKind::ClientError,
        ErrorKind::ServerError,
        ErrorKind::Throttled,
        ErrorKind::Timeout,
        ErrorKind::Connection,
        ErrorKind::Auth,
        ErrorKind::Rejected,
        ErrorKind::InDoubt,
        ErrorKind::OtherOrigin,
        ErrorKind::Pending,
    ];

    /// The kind an `_error` column names.
    pub fn parse(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether a failure of this kind may have been acted on by the
    /// gateway (it answered 5xx, or the call may have gone out).
    pub fn may_have_acted(self) -> bool {
        matches!(
            self,
            ErrorKind::InDoubt
                | ErrorKind::ServerError
                | ErrorKind::Timeout
                | ErrorKind::Connection
                // The gateway accepted these: only their polls did not end.
                | ErrorKind::OtherOrigin
                | ErrorKind::Pending
        )
    }

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
            ErrorKind::OtherOrigin => "other_origin",
            ErrorKind::Pending => "pending",
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
    /// Where the row first came from, when it was read from a failures
    /// file (or results): `source_row` and `source_run` in the outcome files.
    pub origin: Option<Origin>,
    /// A row polled to its end (`[poll]`): the last poll's answer.
    pub poll: Option<Box<Polled>>,
}

/// How the polls of a row went (`poll` in `results.jsonl`).
#[derive(Debug, serde::Serialize)]
pub struct Polled {
    /// The final poll's status.
    pub status: Option<u16>,
    /// Polls sent: the final one and failed ones included.
    pub polls: u32,
    /// From the first answer to the final poll's.
    pub waited_ms: u64,
    pub response: Value,
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
    /// About how many bytes the outcome holds, itself and what it points
    /// to (the answer kept, the input record, the message): what keeping it
    /// waiting for the recorder costs. Shared parts (a CSV file's header)
    /// are not counted.
    pub fn weight(&self) -> usize {
        let mut bytes = std::mem::size_of::<Outcome>() + self.key.capacity();
        bytes += match &self.source {
            Source::Record(Record::Csv { values, .. }) => strings_weight(values.iter().map(String::capacity)),
            Source::Record(Record::Json(map)) => map_weight(map),
            Source::Raw(Raw::Csv { values, .. }) => strings_weight(values.iter().map(Vec::capacity)),
            Source::Raw(Raw::Text(text)) => text.capacity(),
        };
        bytes += match &self.result {
            Ok(success) => {
                success.raw.as_ref().map_or(0, Vec::capacity)
                    + value_weight(&success.response)
                    + map_weight(&success.captured)
            }
            Err(failure) => failure.message.capacity(),
        };
        if let Some(polled) = &self.poll {
            bytes += std::mem::size_of::<Polled>() + value_weight(&polled.response);
        }
        bytes
    }

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
            origin: row.origin().cloned(),
            poll: None,
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
            origin: bad.earlier.and_then(|e| e.origin),
            poll: None,
        }
    }
}

/// A list of strings' bytes: each one's and its own header's.
fn strings_weight(capacities: impl Iterator<Item = usize>) -> usize {
    capacities.map(|c| c + std::mem::size_of::<String>()).sum()
}

/// About what a JSON object holds: each entry's key, value and place in the map.
fn map_weight(map: &Map<String, Value>) -> usize {
    map.iter().map(|(k, v)| k.capacity() + std::mem::size_of::<(String, Value, u64)>() + value_weight(v)).sum()
}

/// About what a JSON value holds beyond its own place (counted by its parent).
fn value_weight(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 0,
        // With `arbitrary_precision` a number is its digits in a string.
        Value::Number(_) => 24,
        Value::String(s) => s.capacity(),
        Value::Array(items) => items.iter().map(|v| std::mem::size_of::<Value>() + value_weight(v)).sum(),
        Value::Object(map) => map_weight(map),
    }
}

/// Said of a call that failed before any byte of it went out (connecting,
/// the TLS handshake): the gateway never saw it, so it may be sent again.
pub const NEVER_REACHED: &str = "the call never reached the gateway";

/// Whether the gateway may have acted on a row that failed earlier, as a
/// failures file says (`_error`, `_status`, `_message`): it was in doubt,
/// answered 5xx, or timed out or lost its connection after it went out.
/// Such a row of a job that is not idempotent is not sent again unasked.
pub fn may_have_acted(earlier: &crate::input::Earlier) -> Option<ErrorKind> {
    let kind = ErrorKind::parse(&earlier.error).filter(|k| k.may_have_acted())?;
    let acted = match kind {
        // A 408 is the gateway saying it did not take the request whole.
        ErrorKind::Timeout => earlier.status != Some(408) && !earlier.message.contains(NEVER_REACHED),
        ErrorKind::Connection => !earlier.message.contains(NEVER_REACHED),
        _ => true,
    };
    acted.then_some(kind)
}

/// What one attempt came to; [`crate::retry::decide`] says what follows.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A 2xx (the job's `success` expression judges it further).
    Done,
    /// 401: the token was refused, before the call was processed.
    Unauthorized,
    /// Any other answer: its kind and status, whether `retry_on` holds the
    /// status, and its `Retry-After`.
    Answer { kind: ErrorKind, status: u16, retryable: bool, after: Option<Duration> },
    /// The call failed before anything was written (connecting, the TLS
    /// handshake): the gateway never saw it.
    NotSent(ErrorKind),
    /// The call went out, or may have, and no whole answer came back (a
    /// timeout, a connection lost mid-call): the gateway may have acted on it.
    NoAnswer(ErrorKind),
    /// Never worth another attempt: a request that cannot be built, a
    /// certificate that is not trusted.
    Permanent(ErrorKind),
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
    Verdict::Answer { kind, status: code, retryable: retry_on.contains(&code), after: retry_after }
}

/// Classifies a transport error: whether anything reached the gateway.
pub fn classify_error(e: &reqwest::Error) -> Verdict {
    if untrusted_certificate(e) {
        // The same certificate answers the next attempt too.
        Verdict::Permanent(ErrorKind::Connection)
    } else if e.is_connect() {
        // Connecting or the TLS handshake: no byte of the request went out.
        Verdict::NotSent(if e.is_timeout() { ErrorKind::Timeout } else { ErrorKind::Connection })
    } else if e.is_timeout() {
        Verdict::NoAnswer(ErrorKind::Timeout)
    } else if e.is_request() || e.is_body() || e.is_decode() {
        Verdict::NoAnswer(ErrorKind::Connection)
    } else {
        // Building the request failed: a bug or an unsendable value, never fixed by retrying.
        Verdict::Permanent(ErrorKind::Connection)
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

/// Why the circuit breaker (`runner/breaker.rs`) opened: the run stops with exit 75.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the gateway at {origin} has not answered for {}: {calls} calls failed in a row, the last with: {last}. \
     No more rows are taken, and the rows the outage stopped are not recorded as failed: try again later",
    humantime::format_duration(*lasted)
)]
pub struct Outage {
    /// The origin the calls went to (never a path or query: they may hold row values).
    pub origin: String,
    pub lasted: Duration,
    pub calls: u64,
    /// The last failure, as the failures file would say it.
    pub last: String,
}

/// Whether the server's TLS certificate was refused: not retried, and a
/// matter of `ca_file` or the URL, not of the network.
pub fn untrusted_certificate(e: &reqwest::Error) -> bool {
    untrusted_in(e)
}

fn untrusted_in(e: &(dyn std::error::Error + 'static)) -> bool {
    use tokio_rustls::rustls::Error as Tls;
    causes(e).any(|s| matches!(s.downcast_ref::<Tls>(), Some(Tls::InvalidCertificate(_))))
}

/// An error and its causes, each io::Error seen through: it hides the
/// error it wraps from `source()`.
pub(crate) fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    let mut source = Some(e);
    std::iter::from_fn(move || {
        let mut s = source?;
        while let Some(inner) = s.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            s = inner;
        }
        source = s.source();
        Some(s)
    })
}

/// A connect timeout (the connecting and the TLS handshake), or the total
/// one, ran out.
#[derive(Debug, thiserror::Error)]
#[error("operation timed out")]
pub struct TimedOut;

/// Why a call got no answer, as both HTTP clients' errors come to it: what
/// it means for the row, and how it is told.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{text}")]
pub struct CallError {
    /// `NotSent`, `NoAnswer` or `Permanent`.
    pub verdict: Verdict,
    /// The server's TLS certificate is not trusted (the verdict is `Permanent`).
    pub untrusted: bool,
    /// The TLS alert the server refused this client's certificate with.
    pub refused: Option<String>,
    /// The error and its causes, the server named by its origin alone.
    pub text: String,
}

impl From<reqwest::Error> for CallError {
    fn from(e: reqwest::Error) -> CallError {
        let text = describe(&e);
        CallError {
            verdict: classify_error(&e),
            untrusted: untrusted_certificate(&e),
            refused: crate::token::refused_alert(&e, &text),
            text,
        }
    }
}

impl CallError {
    /// An error of a call sent without reqwest: `connecting` when it came
    /// before any byte of the request was written (hyper_util's `is_connect`).
    pub fn direct(e: &(dyn std::error::Error + 'static), connecting: bool, url: &url::Url) -> CallError {
        let timed_out = causes(e).any(|s| {
            s.is::<TimedOut>()
                || s.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout)
                || s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        });
        let untrusted = untrusted_in(e);
        let verdict = if untrusted {
            Verdict::Permanent(ErrorKind::Connection)
        } else if connecting {
            Verdict::NotSent(if timed_out { ErrorKind::Timeout } else { ErrorKind::Connection })
        } else if timed_out {
            Verdict::NoAnswer(ErrorKind::Timeout)
        } else {
            // It went out, or may have: in doubt.
            Verdict::NoAnswer(ErrorKind::Connection)
        };
        let mut text = format!("error sending request to {}", url.origin().ascii_serialization());
        let mut source = Some(e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        let text = without_url(text, url);
        CallError { verdict, untrusted, refused: crate::token::refused_alert(e, &text), text }
    }

    /// The total timeout ran out: the call may have gone out.
    pub fn timed_out(url: &url::Url) -> CallError {
        CallError::direct(&TimedOut, false, url)
    }

    /// A request that cannot be made (never fixed by retrying).
    pub fn unsendable(e: &(dyn std::error::Error + 'static), url: &url::Url) -> CallError {
        CallError { verdict: Verdict::Permanent(ErrorKind::Connection), ..CallError::direct(e, true, url) }
    }
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

/// A one-line description of a transport error, with its causes, that
/// names the server by its origin alone (scheme, host and port): a URL's
/// path and query hold row values (PHI), and this text reaches stderr.
pub fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    match e.url() {
        Some(url) => without_url(text, url),
        None => text,
    }
}

/// `text` with `url` named by its origin: reqwest's " for url (…)" and any
/// other place the URL, its path or its query appear.
fn without_url(text: String, url: &url::Url) -> String {
    let origin = url.origin().ascii_serialization();
    let mut text = text.replace(&format!(" for url ({url})"), &format!(" to {origin}")).replace(url.as_str(), &origin);
    let private = [url.path(), url.query().unwrap_or(""), url.fragment().unwrap_or("")];
    for part in private.into_iter().filter(|p| p.len() > 1) {
        text = text.replace(part, "<path>");
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
        let answer = |kind, status, retryable| Verdict::Answer { kind, status, retryable, after: None };
        assert_eq!(c(200), Verdict::Done);
        assert_eq!(c(204), Verdict::Done);
        assert_eq!(c(401), Verdict::Unauthorized);
        assert_eq!(c(403), answer(ErrorKind::ClientError, 403, false), "a 403 never refreshes the token");
        assert_eq!(c(400), answer(ErrorKind::ClientError, 400, false));
        assert_eq!(c(404), answer(ErrorKind::ClientError, 404, false));
        assert_eq!(c(429), answer(ErrorKind::Throttled, 429, true));
        assert_eq!(c(503), answer(ErrorKind::ServerError, 503, true));
        assert_eq!(c(501), answer(ErrorKind::ServerError, 501, false));
        assert_eq!(c(408), answer(ErrorKind::Timeout, 408, true));
        assert_eq!(
            classify_status(StatusCode::BAD_GATEWAY, &[429], None),
            answer(ErrorKind::ServerError, 502, false),
            "retry_on changes the set"
        );
        let after = Some(Duration::from_secs(7));
        assert_eq!(
            classify_status(StatusCode::SERVICE_UNAVAILABLE, RETRY_ON, after),
            Verdict::Answer { kind: ErrorKind::ServerError, status: 503, retryable: true, after }
        );
    }

    #[tokio::test]
    async fn transport_errors_say_whether_the_gateway_saw_the_call() {
        // Nothing listens on a port just freed: refused while connecting.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = reqwest::Client::new();
        let refused = client.post(format!("http://127.0.0.1:{port}/")).send().await.unwrap_err();
        assert_eq!(classify_error(&refused), Verdict::NotSent(ErrorKind::Connection));
        // A server that reads the request and never answers: a timeout
        // after the request went out.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let timeout =
            client.post(format!("http://{addr}/")).timeout(Duration::from_millis(200)).send().await.unwrap_err();
        assert_eq!(classify_error(&timeout), Verdict::NoAnswer(ErrorKind::Timeout));
        server.abort();
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
