//! Rendering a row into a request: the plain parts without the template
//! engine where they can be, the engine where they cannot.

use std::sync::Arc;

use bytes::Bytes;
use minijinja::Value as JValue;
use minijinja::value::{Enumerator, Object, ObjectRepr};
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Map, Value};

use super::Job;
use super::template::{Node, Part, Text, url_value};
use super::value::{DIGITS, Digits, Json, json_value, scalar};
use crate::input::{Record, Row};

/// A field's value, borrowed from the row where it can be.
enum Field<'a> {
    Str(&'a str),
    Json(&'a Value),
    Owned(Value),
}

/// The value at a field path of a row: an input field, `row` or `row_number`.
fn field<'a>(row: &'a Row, path: &[String]) -> Option<Field<'a>> {
    let (first, rest) = path.split_first()?;
    match &row.record {
        Record::Csv { headers, values } => {
            if let Some(i) = headers.index(first) {
                // A CSV value is text: it has no fields of its own.
                return rest.is_empty().then(|| Field::Str(&values[i]));
            }
        }
        Record::Json(map) => {
            if let Some(mut value) = map.get(first) {
                for part in rest {
                    value = value.as_object()?.get(part)?;
                }
                return Some(Field::Json(value));
            }
        }
    }
    let mut value = match first.as_str() {
        "row" => Value::Object(row.record.to_json()),
        "row_number" => Value::from(row.number),
        _ => return None,
    };
    for part in rest {
        value = match value {
            Value::Object(mut map) => map.remove(part)?,
            _ => return None,
        };
    }
    Some(Field::Owned(value))
}

impl Field<'_> {
    /// The text printed for strings and numbers (a number with its digits as written).
    fn plain(&self) -> Option<std::borrow::Cow<'_, str>> {
        let value = match self {
            Field::Str(s) => return Some((*s).into()),
            Field::Json(v) => *v,
            Field::Owned(v) => v,
        };
        match value {
            Value::String(s) => Some(s.as_str().into()),
            // A number as the input wrote it: `125.50` stays `125.50`.
            Value::Number(n) => Some(n.as_str().into()),
            Value::Bool(b) => Some(if *b { "true" } else { "false" }.into()),
            _ => None,
        }
    }

    fn into_value(self) -> Value {
        match self {
            Field::Str(s) => Value::from(s),
            Field::Json(v) => v.clone(),
            Field::Owned(v) => v,
        }
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Field::Str(s) => serde_json::to_writer(out, s),
            Field::Json(v) => serde_json::to_writer(out, v),
            Field::Owned(v) => serde_json::to_writer(out, v),
        }
        .expect("a JSON value serializes");
    }
}

impl Text {
    /// Renders against a row: the plain parts directly when every value is
    /// a string or a number (a number with the digits the input had), else
    /// the engine.
    fn render(&self, row: Option<&Row>, ctx: &Lazy<'_>) -> Result<String, minijinja::Error> {
        if let (Some(parts), Some(row)) = (&self.parts, row) {
            let mut out = String::new();
            let mut plain = true;
            for part in parts {
                match part {
                    Part::Literal(text) => out.push_str(text),
                    Part::Field(path) => match field(row, path).as_ref().and_then(Field::plain) {
                        Some(text) => self.push(&mut out, &text)?,
                        // Missing, or printed differently: the engine decides.
                        None => {
                            plain = false;
                            break;
                        }
                    },
                }
            }
            if plain {
                return Ok(out);
            }
        }
        self.template.render(ctx.get())
    }

    fn push(&self, out: &mut String, value: &str) -> Result<(), minijinja::Error> {
        if self.encode {
            url_value(value, out)?;
        } else {
            out.push_str(value);
        }
        Ok(())
    }
}

/// The template context, built only when the engine is needed.
pub(super) struct Lazy<'a> {
    pub(super) cell: std::cell::OnceCell<JValue>,
    pub(super) make: &'a dyn Fn() -> JValue,
}

impl Lazy<'_> {
    pub(super) fn get(&self) -> &JValue {
        self.cell.get_or_init(self.make)
    }
}

/// One rendered call, ready to send (Authorization is added by the sender).
#[derive(Debug, Clone)]
pub struct Request {
    pub key: String,
    pub method: Method,
    pub url: url::Url,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
}

/// Why a row could not be turned into a request: the whole message (for
/// the failures file), and a brief one that quotes no row value (for
/// stderr and logs).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RenderError {
    pub message: String,
    brief: Option<String>,
}

impl RenderError {
    /// A message that quotes no row value.
    fn plain(message: String) -> RenderError {
        RenderError { message, brief: None }
    }

    /// A message that may quote row values, and a brief one that does not.
    fn quoting(message: String, brief: String) -> RenderError {
        RenderError { message, brief: Some(brief) }
    }

    /// What went wrong, without the row's values.
    pub fn brief(&self) -> &str {
        self.brief.as_deref().unwrap_or(&self.message)
    }
}

/// A job bound to a run's settings: renders rows into requests.
pub struct Requests {
    pub(super) job: Arc<Job>,
    pub(super) base_url: Option<String>,
    pub(super) static_headers: HeaderMap,
    pub(super) allow_http: bool,
    /// The URL when it is the same for every row: parsed once.
    pub(super) fixed_url: Option<url::Url>,
}

/// The template context of one row: its fields by name, `row` (the whole
/// record) and `row_number`.
#[derive(Debug)]
pub(super) struct RowContext {
    pub(super) record: Record,
    pub(super) number: u64,
    /// The row's [`Digits`], gathered the first time a float is printed.
    pub(super) digits: std::sync::OnceLock<Option<JValue>>,
}

impl RowContext {
    pub(super) fn new(row: &Row) -> RowContext {
        RowContext { record: row.record.clone(), number: row.number, digits: std::sync::OnceLock::new() }
    }
}

impl Object for RowContext {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        let key = key.as_str()?;
        if key == DIGITS {
            let digits = self.digits.get_or_init(|| match &self.record {
                Record::Json(map) => Some(JValue::from_object(Digits::of_record(map))),
                Record::Csv { .. } => None,
            });
            return digits.clone();
        }
        match &self.record {
            Record::Csv { headers, values } => {
                if let Some(i) = headers.index(key) {
                    return Some(JValue::from(values[i].as_str()));
                }
            }
            Record::Json(map) => {
                if let Some(v) = map.get(key) {
                    return Some(scalar(v));
                }
            }
        }
        match key {
            "row" => Some(json_value(&Arc::new(Value::Object(self.record.to_json())))),
            "row_number" => Some(JValue::from(self.number)),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut keys: Vec<JValue> = match &self.record {
            Record::Csv { headers, .. } => headers.names().iter().map(|n| JValue::from(n.as_str())).collect(),
            Record::Json(map) => map.keys().map(|n| JValue::from(n.as_str())).collect(),
        };
        keys.extend([JValue::from("row"), JValue::from("row_number")]);
        Enumerator::Values(keys)
    }
}

impl Requests {
    /// Renders one row into a request.
    pub fn render(&self, row: &Row) -> Result<Request, RenderError> {
        let job = &self.job;
        let make = || JValue::from_object(RowContext::new(row));
        let ctx = Lazy { cell: std::cell::OnceCell::new(), make: &make };
        let fail = |place: &str, vars: &[String], e: minijinja::Error| -> RenderError {
            let missing: Vec<&str> = vars.iter().map(String::as_str).filter(|v| !resolves(&row.record, v)).collect();
            match missing.as_slice() {
                [] => RenderError::quoting(
                    format!("{place}: {}", e.detail().unwrap_or(&e.to_string())),
                    format!("{place}: cannot be rendered ({})", e.kind()),
                ),
                [one] => RenderError::plain(format!("field `{one}` is missing (used in {place})")),
                many => RenderError::plain(format!("fields `{}` are missing (used in {place})", many.join("`, `"))),
            }
        };
        let text = |t: &Text| t.render(Some(row), &ctx).map_err(|e| fail(&t.place, &t.vars, e));

        let key = match &job.key {
            Some(t) => text(t)?,
            None => row.number.to_string(),
        };
        let mut url = match &self.fixed_url {
            Some(url) => url.clone(),
            None => {
                let path = text(&job.url)?;
                check_path(&job.url_source, &path)?;
                self.full_url(&path)?
            }
        };
        if !job.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, t) in &job.query {
                pairs.append_pair(name, &text(t)?);
            }
        }
        let mut headers = self.static_headers.clone();
        let header_value = |place: &str, v: String| {
            HeaderValue::from_str(&v).map_err(|_| {
                RenderError::quoting(
                    format!("{place}: `{v}` cannot be sent in a header"),
                    format!("{place}: a value that cannot be sent in a header"),
                )
            })
        };
        for (name, t) in &job.headers {
            headers.insert(name.clone(), header_value(&t.place, text(t)?)?);
        }
        if let Some((name, t)) = &job.idempotency {
            headers.insert(name.clone(), header_value(&t.place, text(t)?)?);
        }
        let body = match &job.body {
            Some(node) => {
                let mut out = Vec::with_capacity(512);
                write_node(node, row, &ctx, &mut out).map_err(|(place, vars, e)| fail(place, vars, e))?;
                Some(Bytes::from(out))
            }
            None => None,
        };
        Ok(Request { key, method: job.method.clone(), url, headers, body })
    }

    /// The rendered URL joined to `base_url` (unless absolute), parsed and
    /// checked for https.
    pub(super) fn full_url(&self, path: &str) -> Result<url::Url, RenderError> {
        let full = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            match &self.base_url {
                Some(base) if path.starts_with('/') => format!("{base}{path}"),
                Some(base) => format!("{base}/{path}"),
                None => {
                    return Err(RenderError::quoting(
                        format!("url `{path}` is relative and no base_url is configured; set base_url in the profile"),
                        "url: relative and no base_url is configured; set base_url in the profile".into(),
                    ));
                }
            }
        };
        let url = url::Url::parse(&full).map_err(|e| {
            RenderError::quoting(format!("url `{full}` is not valid: {e}"), format!("url: not valid: {e}"))
        })?;
        if url.scheme() == "http" && !self.allow_http && !crate::config::is_loopback(&url) {
            return Err(RenderError::quoting(
                format!("url `{full}` is http:// to a host that is not loopback; use https://"),
                "url: http:// to a host that is not loopback; use https://".into(),
            ));
        }
        Ok(url)
    }

    /// The row's key alone, when the whole request cannot be rendered.
    pub fn key(&self, row: &Row) -> String {
        let ctx = JValue::from_object(RowContext::new(row));
        self.job.key.as_ref().and_then(|t| t.template.render(&ctx).ok()).unwrap_or_else(|| row.number.to_string())
    }

    /// The captured values' names, when the job asks for `results.csv`.
    pub fn results_csv(&self) -> Option<Vec<String>> {
        self.job.results_csv.then(|| self.job.capture.iter().map(|(name, _)| name.clone()).collect())
    }

    /// Whether the job has its own `success` expression.
    pub fn has_success(&self) -> bool {
        self.job.success.is_some()
    }

    /// See [`Job::idempotent`].
    pub fn idempotent(&self) -> bool {
        self.job.idempotent
    }
}

/// A row value may not change where the call goes: a path segment that is
/// `.` or `..` (also as `%2e`), or empty where the template has none, would
/// be resolved by the URL parser and send the call to another path. Values
/// are percent-encoded, so each lies within one segment.
fn check_path(template: &str, rendered: &str) -> Result<(), RenderError> {
    let path_of = |url: &str| -> String {
        let rest = match url.find("://") {
            Some(i) => url[i + 3..].find('/').map_or("", |j| &url[i + 3 + j..]),
            None => url,
        };
        rest.split(['?', '#']).next().unwrap_or_default().to_string()
    };
    let path = path_of(rendered);
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        let empty = segment.is_empty() && i != 0 && (i != last || !path_of(template).ends_with('/'));
        if empty || decoded == "." || decoded == ".." {
            let what = if empty { "empty" } else { "`.` or `..`" };
            return Err(RenderError::plain(format!(
                "url: a value of the row makes path segment {} {what}, which would send the call to another path",
                i + 1
            )));
        }
    }
    Ok(())
}

/// Whether a dotted variable path such as `member.last` exists in a record.
fn resolves(record: &Record, path: &str) -> bool {
    let mut parts = path.split('.');
    let first = parts.next().unwrap_or_default();
    if first == "row" || first == "row_number" {
        return true;
    }
    let Some(mut value) = record.get(first) else { return false };
    for part in parts {
        match value {
            Value::Object(mut map) => match map.remove(part) {
                Some(v) => value = v,
                None => return false,
            },
            // Attributes of strings and numbers (methods, filters) are not fields.
            _ => return true,
        }
    }
    true
}

/// Writes a request body straight as JSON bytes: no tree is built.
fn write_node<'a>(node: &'a Node, row: &Row, ctx: &Lazy<'_>, out: &mut Vec<u8>) -> Result<(), NodeError<'a>> {
    let json = |out: &mut Vec<u8>, v: &Value| serde_json::to_writer(out, v).expect("a JSON value serializes");
    match node {
        Node::Object(fields) => {
            out.push(b'{');
            for (i, (key, n)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&key.json);
                write_node(n, row, ctx, out)?;
            }
            out.push(b'}');
        }
        Node::Array(items) => {
            out.push(b'[');
            for (i, n) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_node(n, row, ctx, out)?;
            }
            out.push(b']');
        }
        Node::Field { path, vars, place } => {
            if let Some(value) = field(row, path) {
                value.write_json(out);
            } else {
                let err = minijinja::Error::new(minijinja::ErrorKind::UndefinedError, "undefined value");
                return Err((place.as_str(), vars.as_slice(), err));
            }
        }
        Node::Literal(v) => json(out, v),
        Node::Text(_) | Node::Expr(_) => json(out, &render_node(node, Some(row), ctx, true)?),
    }
    Ok(())
}

pub(super) type NodeError<'a> = (&'a str, &'a [String], minijinja::Error);

pub(super) fn render_node<'a>(
    node: &'a Node,
    row: Option<&Row>,
    ctx: &Lazy<'_>,
    strict: bool,
) -> Result<Value, NodeError<'a>> {
    Ok(match node {
        Node::Object(fields) => {
            let mut map = Map::with_capacity(fields.len());
            for (k, n) in fields {
                map.insert(k.name.clone(), render_node(n, row, ctx, strict)?);
            }
            Value::Object(map)
        }
        Node::Array(items) => {
            Value::Array(items.iter().map(|n| render_node(n, row, ctx, strict)).collect::<Result<_, _>>()?)
        }
        Node::Text(t) => Value::String(t.render(row, ctx).map_err(|e| (t.place.as_str(), t.vars.as_slice(), e))?),
        Node::Field { path, vars, place } => match row.and_then(|row| field(row, path)) {
            Some(value) => value.into_value(),
            None => {
                let err = minijinja::Error::new(minijinja::ErrorKind::UndefinedError, "undefined value");
                return Err((place.as_str(), vars.as_slice(), err));
            }
        },
        Node::Expr(e) => {
            let v = e.expr.eval(ctx.get()).map_err(|err| (e.place.as_str(), e.vars.as_slice(), err))?;
            if v.is_undefined() {
                if strict {
                    let err = minijinja::Error::new(minijinja::ErrorKind::UndefinedError, "undefined value");
                    return Err((e.place.as_str(), e.vars.as_slice(), err));
                }
                Value::Null
            } else if let Some(json) = v.downcast_object_ref::<Json>() {
                // An object or array of the input passed through: its numbers as written.
                (*json.0).clone()
            } else {
                serde_json::to_value(&v).map_err(|err| {
                    let err = minijinja::Error::new(minijinja::ErrorKind::BadSerialization, err.to_string());
                    (e.place.as_str(), e.vars.as_slice(), err)
                })?
            }
        }
        Node::Literal(v) => v.clone(),
    })
}
