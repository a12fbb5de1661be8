//! `[poll]`: the follow-up calls of a row whose first answer is only an
//! acceptance (`202` with a `Location`), until the answer is final.
//!
//! Poll templates see `row`, `first` (the first call's `status`, `headers`
//! and `response`) and `location`; `until`, `success` and `[poll.capture]`
//! also the poll's own `status`, `headers` and `response`.

use std::sync::Arc;
use std::time::Duration;

use minijinja::Value as JValue;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::JobError;
use super::judge::capture_all;
use super::render::{Lazy, Requests, RowContext};
use super::template::{Capture, Compiler, Expr, Text, captures, envs, single_expression};
use super::value::json_value;
use crate::answer::Body;
use crate::input::Row;

/// `[poll]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PollFile {
    url: Option<String>,
    method: Option<String>,
    every: Option<String>,
    until: Option<String>,
    success: Option<String>,
    max_wait: Option<String>,
    #[serde(default)]
    capture: Map<String, Value>,
    #[serde(default)]
    allow_other_origin: bool,
}

/// `[poll]`, compiled.
pub struct Poll {
    /// `None`: the first answer's `Location` (or `Content-Location`).
    url: Option<Text>,
    pub method: Method,
    /// The wait before each poll, unless a poll's `Retry-After` says otherwise.
    pub every: Duration,
    until: Option<Expr>,
    success: Option<Expr>,
    /// From the first answer (and from the start of each resume): past it, the row is pending.
    pub max_wait: Duration,
    capture: Vec<(String, Capture)>,
    /// May a poll go to another origin than the first call's (the token goes with it).
    pub allow_other_origin: bool,
}

/// The first call's answer, as poll templates see it (`first`).
#[derive(Debug, Clone)]
pub struct First {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Map<String, Value>,
    pub response: Arc<Value>,
}

/// A poll's answer judged: final or not, accepted or not, and its captures.
pub struct PollJudged {
    /// `until` held: this answer is the row's final one.
    pub done: bool,
    /// `success` held (only meaningful when `done`).
    pub ok: bool,
    pub captured: Map<String, Value>,
}

/// Where a row is polled.
#[derive(Debug)]
pub enum PollUrl {
    /// No `Location` and no `url` template: the first answer is final.
    None,
    To(url::Url),
    /// On another origin than the first call, which `allow_other_origin` does not allow.
    OtherOrigin(String),
    Invalid(String),
}

fn duration(c: &Compiler<'_>, place: &str, text: Option<&str>, default: Duration) -> Result<Duration, JobError> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| c.invalid(format!("{place} `{t}` is not a duration such as 5s or 1h: {e}"))),
    }
}

impl Poll {
    pub(super) fn compile(c: &Compiler<'_>, file: PollFile) -> Result<Poll, JobError> {
        let envs = envs();
        let method_name = file.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
        let method = [Method::GET, Method::POST, Method::HEAD]
            .into_iter()
            .find(|m| m.as_str() == method_name)
            .ok_or_else(|| c.invalid(format!("poll.method `{method_name}` must be GET, POST or HEAD")))?;
        let every = duration(c, "poll.every", file.every.as_deref(), Duration::from_secs(5))?;
        if every.is_zero() {
            return Err(c.invalid("poll.every must be more than 0s: a gateway would be polled without a pause".into()));
        }
        let expr = |place: &str, s: Option<String>| -> Result<Option<Expr>, JobError> {
            s.map(|s| c.expr(&envs.lenient, place, single_expression(&s).unwrap_or(&s))).transpose()
        };
        let capture = captures(c, "poll.capture", &file.capture)?;
        Ok(Poll {
            url: file.url.map(|u| c.text(&envs.lenient, "poll.url", &u)).transpose()?,
            method,
            every,
            until: expr("poll.until", file.until)?,
            success: expr("poll.success", file.success)?,
            max_wait: duration(c, "poll.max_wait", file.max_wait.as_deref(), Duration::from_secs(3600))?,
            capture,
            allow_other_origin: file.allow_other_origin,
        })
    }
}

fn first_context(first: &First) -> JValue {
    minijinja::context! {
        status => first.status,
        headers => JValue::from_serialize(&first.headers),
        response => json_value(&first.response),
    }
}

/// The first answer's `Location`, else its `Content-Location`.
pub fn location_of(headers: &Map<String, Value>) -> Option<&str> {
    headers.get("location").or_else(|| headers.get("content-location")).and_then(Value::as_str)
}

impl Requests {
    /// The job's `[poll]`, if it has one.
    pub fn poll(&self) -> Option<&Poll> {
        self.job.poll.as_ref()
    }

    /// The headers of every poll: the configuration's (the environment
    /// header, say), without the first call's `Content-Type`; the token is
    /// added by the sender.
    pub fn poll_headers(&self) -> reqwest::header::HeaderMap {
        let mut headers = self.static_headers.clone();
        headers.remove(reqwest::header::CONTENT_TYPE);
        headers
    }

    /// Where to poll a row whose first call went to `sent_to` and was
    /// answered `first`: a relative URL is resolved against `sent_to`.
    pub fn poll_url(&self, row: &Row, first: &First, sent_to: &url::Url) -> PollUrl {
        let Some(poll) = self.poll() else { return PollUrl::None };
        let location = location_of(&first.headers);
        let text = match &poll.url {
            None => match location {
                Some(l) => l.to_string(),
                None => return PollUrl::None,
            },
            Some(t) => {
                let make = || {
                    minijinja::context! {
                        row => JValue::from_object(RowContext::new(row)),
                        row_number => row.number,
                        first => first_context(first),
                        location => location,
                    }
                };
                let ctx = Lazy { cell: std::cell::OnceCell::new(), make: &make };
                match t.template.render(ctx.get()) {
                    Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
                    Ok(_) => {
                        return PollUrl::Invalid("poll.url rendered empty (no Location in the first answer?)".into());
                    }
                    Err(e) => return PollUrl::Invalid(format!("poll.url cannot be rendered: {e}")),
                }
            }
        };
        let url = match sent_to.join(&text) {
            Ok(url) => url,
            Err(e) => return PollUrl::Invalid(format!("poll URL `{text}` is not valid: {e}")),
        };
        if url.scheme() != "https" && url.scheme() != "http" {
            return PollUrl::Invalid(format!("poll URL `{url}` is not http(s)"));
        }
        if url.scheme() == "http" && !self.allow_http && !crate::config::is_loopback(&url) {
            return PollUrl::Invalid(format!("poll URL `{url}` is http:// to a host that is not loopback"));
        }
        if url.origin() != sent_to.origin() && !poll.allow_other_origin {
            return PollUrl::OtherOrigin(url.origin().ascii_serialization());
        }
        PollUrl::To(url)
    }

    /// Judges a poll's answer: `until` (default: status is not 202), then
    /// `success` (default: a 2xx) and `[poll.capture]`.
    pub fn judge_poll(
        &self,
        row: &Row,
        first: &First,
        status: u16,
        headers: &Map<String, Value>,
        body: &Body<'_>,
    ) -> PollJudged {
        let poll = self.poll().expect("judge_poll is only called for a job with [poll]");
        let make = || {
            minijinja::context! {
                row => JValue::from_object(RowContext::new(row)),
                row_number => row.number,
                first => first_context(first),
                location => location_of(&first.headers),
                status => status,
                headers => JValue::from_serialize(headers),
                response => json_value(body.value()),
            }
        };
        let ctx = Lazy { cell: std::cell::OnceCell::new(), make: &make };
        let holds = |e: &Expr| e.expr.eval(ctx.get()).map(|v| v.is_true()).unwrap_or(false);
        let done = poll.until.as_ref().map_or(status != 202, holds);
        if !done {
            return PollJudged { done, ok: false, captured: Map::new() };
        }
        let ok = poll.success.as_ref().map_or((200..300).contains(&status), holds);
        PollJudged { done, ok, captured: capture_all(&poll.capture, body, &ctx) }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Settings;
    use crate::input::Record;

    fn requests(poll: &str) -> Requests {
        let spec = format!("url = \"/submit\"\n[poll]\n{poll}");
        let job = Arc::new(super::super::Job::parse(Path::new("jobs/t.toml"), &spec).unwrap());
        let settings = Settings { base_url: Some("https://api.example.com".into()), ..Settings::default() };
        job.requests(&settings).unwrap()
    }

    fn row() -> Row {
        let map = serde_json::json!({"id": "A1"}).as_object().unwrap().clone();
        Row { input: 0, number: 1, line: 1, record: Record::Json(map), earlier: None }
    }

    fn first(location: Option<&str>) -> First {
        let mut headers = Map::new();
        if let Some(l) = location {
            headers.insert("location".into(), Value::from(l));
        }
        First { status: 202, headers, response: Arc::new(serde_json::json!({"id": "T9"})) }
    }

    fn sent_to() -> url::Url {
        url::Url::parse("https://api.example.com/submit").unwrap()
    }

    #[test]
    fn the_default_url_is_the_location_resolved_against_the_first_call() {
        let r = requests("every = \"1s\"");
        match r.poll_url(&row(), &first(Some("/status/7")), &sent_to()) {
            PollUrl::To(url) => assert_eq!(url.as_str(), "https://api.example.com/status/7"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.poll_url(&row(), &first(None), &sent_to()), PollUrl::None), "no Location: final as is");
    }

    #[test]
    fn a_location_on_another_origin_is_refused_unless_allowed() {
        let other = first(Some("https://elsewhere.example.net/status/7"));
        match requests("").poll_url(&row(), &other, &sent_to()) {
            PollUrl::OtherOrigin(origin) => assert_eq!(origin, "https://elsewhere.example.net"),
            other => panic!("{other:?}"),
        }
        let allowed = requests("allow_other_origin = true");
        assert!(matches!(allowed.poll_url(&row(), &other, &sent_to()), PollUrl::To(_)));
        let http = first(Some("http://api.example.com/status/7"));
        assert!(matches!(requests("").poll_url(&row(), &http, &sent_to()), PollUrl::Invalid(_)), "http:// is refused");
    }

    #[test]
    fn a_url_template_sees_the_row_and_the_first_answer() {
        let r = requests("url = \"/status/{{ first.response.id }}?for={{ row.id }}\"");
        match r.poll_url(&row(), &first(None), &sent_to()) {
            PollUrl::To(url) => assert_eq!(url.as_str(), "https://api.example.com/status/T9?for=A1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn until_success_and_captures_judge_the_polls_answer() {
        let r = requests("");
        let pending = Body::new(&b"{\"state\":\"PENDING\"}"[..], 19);
        assert!(!r.judge_poll(&row(), &first(None), 202, &Map::new(), &pending).done, "202 is not final by default");
        let done = Body::new(&b"{\"state\":\"OK\"}"[..], 14);
        let judged = r.judge_poll(&row(), &first(None), 200, &Map::new(), &done);
        assert!(judged.done && judged.ok);
        let refused = r.judge_poll(&row(), &first(None), 404, &Map::new(), &done);
        assert!(refused.done && !refused.ok, "a 404 is final and not a success by default");

        let r = requests(
            "until = \"{{ response.state != 'PENDING' }}\"\nsuccess = \"{{ response.state == 'ACCEPTED' }}\"\n\
             [poll.capture]\nstate = \"{{ response.state }}\"\nfirst_id = \"{{ first.response.id }}\"",
        );
        assert!(!r.judge_poll(&row(), &first(None), 200, &Map::new(), &pending).done);
        let rejected = Body::new(&b"{\"state\":\"REJECTED\"}"[..], 20);
        let judged = r.judge_poll(&row(), &first(None), 200, &Map::new(), &rejected);
        assert!(judged.done && !judged.ok);
        assert_eq!(judged.captured["state"], "REJECTED");
        assert_eq!(judged.captured["first_id"], "T9");
    }

    #[test]
    fn a_bad_poll_table_is_refused_with_its_place() {
        for (poll, says) in [
            ("every = \"soon\"", "poll.every"),
            ("every = \"0s\"", "poll.every"),
            ("method = \"DELETE\"", "poll.method"),
            ("max_wait = \"x\"", "poll.max_wait"),
            ("until = \"{{ status ==\"", "poll.until"),
        ] {
            let spec = format!("url = \"/x\"\n[poll]\n{poll}");
            let err = super::super::Job::parse(Path::new("jobs/t.toml"), &spec).err().expect(poll).to_string();
            assert!(err.contains(says), "{poll}: {err}");
        }
    }
}
