//! One HTTP call as both a row's attempts and a row's polls make it: the
//! token taken, the request sent, the answer read (up to
//! `max_response_bytes`), and what an answer or a wait says.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Uri;
use http_body_util::Full;
use rand::Rng as _;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, LOCATION, RETRY_AFTER};

use crate::error::Error;
use crate::job::Request;
use crate::outcome::{self, CallError, ErrorKind};
use crate::token::Token;

use super::Shared;
use super::http::ApiClient;

/// One attempt's answer, read up to `max_response_bytes`.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) retry_after: Option<Duration>,
    pub(super) body: Vec<u8>,
    /// The whole body's length.
    pub(super) total: u64,
    /// Where a `3xx` pointed (never followed).
    pub(super) location: Option<String>,
    /// Every header, kept for a job that polls (`first.headers`, `Location`).
    pub(super) headers: Option<HeaderMap>,
}

/// Sends one call and reads its answer: through hyper_util's client, or
/// reqwest's when a proxy applies to the call's URL.
pub(super) async fn send(
    shared: &Shared,
    client: &ApiClient,
    request: &Request,
    token: Option<&Token>,
) -> Result<Answer, CallError> {
    let uri = match Uri::try_from(request.url.as_str()) {
        Ok(uri) => uri,
        Err(e) => return Err(CallError::unsendable(&e, &request.url)),
    };
    if let Some(proxied) = client.proxied(&uri) {
        return send_proxied(shared, proxied, request, token).await.map_err(CallError::from);
    }
    let mut call = http::Request::new(Full::new(request.body.clone().unwrap_or_default()));
    *call.method_mut() = request.method.clone();
    *call.uri_mut() = uri;
    let headers = call.headers_mut();
    *headers = request.headers.clone();
    if let Some(token) = token {
        headers.append(AUTHORIZATION, token.header().clone());
    }
    let cap = shared.settings.max_response_bytes;
    let exchanged = client.exchange(call, &request.url, cap).await?;
    let mut answer = answer(exchanged.status, &exchanged.headers, exchanged.body, exchanged.total);
    if shared.requests.poll().is_some() {
        answer.headers = Some(exchanged.headers);
    }
    Ok(answer)
}

/// A call through reqwest's client: a proxy applies to it.
async fn send_proxied(
    shared: &Shared,
    client: &reqwest::Client,
    request: &Request,
    token: Option<&Token>,
) -> Result<Answer, reqwest::Error> {
    // Made whole rather than through a `RequestBuilder`, which would insert
    // the job's headers one by one into an empty map: a clone of the map
    // is one copy (the same headers, in the same order).
    let mut call = reqwest::Request::new(request.method.clone(), request.url.clone());
    *call.headers_mut() = request.headers.clone();
    if let Some(token) = token {
        call.headers_mut().append(AUTHORIZATION, token.header().clone());
    }
    if let Some(body) = &request.body {
        *call.body_mut() = Some(body.clone().into());
    }
    let mut response = client.execute(call).await?;
    let cap = shared.settings.max_response_bytes;
    let mut body = Vec::new();
    let mut total = 0u64;
    let (status, headers) = (response.status(), std::mem::take(response.headers_mut()));
    while let Some(chunk) = response.chunk().await? {
        total += chunk.len() as u64;
        let room = cap.saturating_sub(body.len()).min(chunk.len());
        body.extend_from_slice(&chunk[..room]);
    }
    let mut answer = answer(status, &headers, body, total);
    if shared.requests.poll().is_some() {
        answer.headers = Some(headers);
    }
    Ok(answer)
}

/// An answer read whole (up to the cap), its headers not yet kept.
fn answer(status: StatusCode, headers: &HeaderMap, body: Vec<u8>, total: u64) -> Answer {
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| outcome::parse_retry_after(v, SystemTime::now()));
    let location = status
        .is_redirection()
        .then(|| headers.get(LOCATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .flatten();
    Answer { status, retry_after, body, total, location, headers: None }
}

/// A short text of an error answer for the failures file.
/// A redirect says where it pointed, and that it was not followed.
pub(super) fn answer_message(status: StatusCode, location: Option<&str>, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(500).collect();
    let reason = status.canonical_reason().unwrap_or("");
    let mut message = format!("HTTP {} {reason}", status.as_u16());
    if status.is_redirection() {
        let to = location.map_or_else(|| "no Location".to_string(), |l| format!("Location {l}"));
        message.push_str(&format!(
            " ({to}): a redirect, not followed (it would carry the call's body, token and headers there)"
        ));
    }
    if !text.is_empty() {
        message.push_str(": ");
        message.push_str(&text);
    }
    message
}

pub(super) fn backoff(shared: &Shared, kind: ErrorKind, attempt: u32) -> Duration {
    let base = if kind == ErrorKind::Throttled { shared.settings.throttle_base } else { shared.settings.backoff_base };
    let ceiling = base.saturating_mul(1u32 << (attempt - 1).min(20)).min(shared.settings.backoff_max);
    // Full jitter: uniform over [0, ceiling].
    ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
}

/// The shared token for a call (`Some(None)` for a job without one), taken
/// as late as can be so it cannot expire in between; `None` when the run
/// stopped meanwhile or the token cannot be had (the run is aborted).
pub(super) async fn take_token(shared: &Shared) -> Option<Option<Arc<Token>>> {
    let Some(tokens) = &shared.tokens else { return Some(None) };
    let got = tokio::select! {
        biased;
        _ = shared.stop.cancelled() => None,
        got = tokens.get() => Some(got),
    };
    match got? {
        Ok(token) => Some(Some(token)),
        Err(e) => {
            shared.abort(Error::Token(e));
            None
        }
    }
}
