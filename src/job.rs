//! The job spec (TOML) and its templates: a row in, a request out. Templates
//! are compiled once when the job is loaded; rendering is pure.
//!
//! A body string that is exactly one expression (`"{{ row }}"`,
//! `"{{ amount | float }}"`) keeps the value's type; other strings render as
//! text. In request templates a missing input field is an error that names
//! the field; in `success` and `[capture]` a missing response field is
//! undefined, never an error.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, Expression, Template, UndefinedBehavior, Value as JValue};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::answer::{Body, Step, response_path};
use crate::config::Settings;
use crate::input::{Format, Record, Row};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job spec {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("job spec {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The job spec file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: Option<String>,
    input: Option<OneOrMany>,
    format: Option<Format>,
    delimiter: Option<String>,
    method: Option<String>,
    url: String,
    key: Option<String>,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    query: Map<String, Value>,
    body: Option<Value>,
    success: Option<String>,
    #[serde(default)]
    capture: Map<String, Value>,
    idempotency_key: Option<String>,
    idempotency_header: Option<String>,
    idempotent: Option<bool>,
    #[serde(default)]
    results_csv: bool,
    // Run settings, passed on to the configuration.
    concurrency: Option<Value>,
    rate: Option<Value>,
    burst: Option<Value>,
    max_attempts: Option<Value>,
    timeout: Option<Value>,
    retry_on: Option<Value>,
    max_response_bytes: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

/// A loaded job spec with every template compiled.
pub struct Job {
    pub name: String,
    pub path: PathBuf,
    /// The spec's default inputs, resolved against the spec's folder.
    pub inputs: Vec<PathBuf>,
    pub format: Option<Format>,
    pub delimiter: u8,
    /// Run settings from the spec, for the configuration layer.
    pub settings: Map<String, Value>,
    method: Method,
    url: Text,
    url_source: String,
    key: Option<Text>,
    headers: Vec<(HeaderName, Text)>,
    query: Vec<(String, Text)>,
    body: Option<Node>,
    idempotency: Option<(HeaderName, Text)>,
    /// May a row be sent again when it is unknown whether the gateway
    /// acted on it: `idempotent`, else true for the methods that are by
    /// definition and for a job with `idempotency_key`.
    idempotent: bool,
    success: Option<Expr>,
    capture: Vec<(String, Capture)>,
    /// Also write `results.csv` (row, key, status and the captured values).
    results_csv: bool,
}

/// A `[capture]` entry.
enum Capture {
    /// `"{{ response.a[0].b }}"`: looked up in the answer without the
    /// template engine or parsing the whole answer.
    Path(Vec<Step>),
    Node(Node),
}

/// A text template and the input fields it uses.
struct Text {
    template: Template<'static, 'static>,
    vars: Vec<String>,
    place: String,
    /// Literals and plain field references, when the template is only
    /// that: rendered without the template engine.
    parts: Option<Vec<Part>>,
    /// Interpolated values are percent-encoded (the URL).
    encode: bool,
}

enum Part {
    Literal(String),
    Field(Vec<String>),
}

/// `member.id` → `["member", "id"]`, if the expression is only a field path.
fn field_path(expr: &str) -> Option<Vec<String>> {
    const KEYWORDS: [&str; 11] = ["true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is"];
    let parts: Vec<String> = expr.trim().split('.').map(str::to_string).collect();
    let ident = |p: &String| {
        let mut chars = p.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !KEYWORDS.contains(&p.as_str())
    };
    parts.iter().all(ident).then_some(parts)
}

/// Splits `a {{ x }} b` into parts, if it holds nothing but field references.
fn plain_parts(source: &str) -> Option<Vec<Part>> {
    if source.contains("{%") || source.contains("{#") {
        return None;
    }
    let mut parts = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Literal(rest[..start].to_string()));
        }
        let end = rest[start..].find("}}")? + start;
        let inner = &rest[start + 2..end];
        if inner.starts_with('-') || inner.ends_with('-') {
            return None;
        }
        parts.push(Part::Field(field_path(inner)?));
        rest = &rest[end + 2..];
    }
    if rest.contains("}}") {
        return None;
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_string()));
    }
    Some(parts)
}

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
    /// The text the template engine would print, for strings and integers.
    fn plain(&self) -> Option<std::borrow::Cow<'_, str>> {
        let value = match self {
            Field::Str(s) => return Some((*s).into()),
            Field::Json(v) => *v,
            Field::Owned(v) => v,
        };
        match value {
            Value::String(s) => Some(s.as_str().into()),
            Value::Number(n) if !n.is_f64() => Some(n.to_string().into()),
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
    /// a string or an integer (as the engine would print them), else the engine.
    fn render(&self, row: Option<&Row>, ctx: &Lazy<'_>) -> Result<String, minijinja::Error> {
        if let (Some(parts), Some(row)) = (&self.parts, row) {
            let mut out = String::new();
            let mut plain = true;
            for part in parts {
                match part {
                    Part::Literal(text) => out.push_str(text),
                    Part::Field(path) => match field(row, path).as_ref().and_then(Field::plain) {
                        Some(text) => self.push(&mut out, &text),
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

    fn push(&self, out: &mut String, value: &str) {
        if self.encode {
            out.extend(utf8_percent_encode(value, SEGMENT));
        } else {
            out.push_str(value);
        }
    }
}

/// The template context, built only when the engine is needed.
struct Lazy<'a> {
    cell: std::cell::OnceCell<JValue>,
    make: &'a dyn Fn() -> JValue,
}

impl Lazy<'_> {
    fn get(&self) -> &JValue {
        self.cell.get_or_init(self.make)
    }
}

struct Expr {
    expr: Expression<'static, 'static>,
    vars: Vec<String>,
    place: String,
}

/// A JSON body (or capture) template: a tree whose string leaves are templates.
enum Node {
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
    Text(Text),
    Expr(Expr),
    /// `"{{ member.id }}"` in a request body: the value itself, its type kept.
    Field {
        path: Vec<String>,
        vars: Vec<String>,
        place: String,
    },
    Literal(Value),
}

/// Path segments: everything but unreserved characters is encoded.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'&')
    .add(b'+')
    .add(b'=');

/// The three template environments, built once and kept for the whole process.
struct Envs {
    /// Request templates: a missing field is an error.
    strict: Environment<'static>,
    /// The URL: like `strict`, and every interpolated value is percent-encoded.
    url: Environment<'static>,
    /// `success` and `[capture]`: a missing response field is undefined.
    lenient: Environment<'static>,
}

fn envs() -> &'static Envs {
    static ENVS: std::sync::OnceLock<Envs> = std::sync::OnceLock::new();
    ENVS.get_or_init(|| {
        let mut strict = Environment::new();
        strict.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut url = strict.clone();
        url.set_formatter(|out, _state, value| {
            let text = value.to_string();
            write!(out, "{}", utf8_percent_encode(&text, SEGMENT)).map_err(minijinja::Error::from)
        });
        let mut lenient = Environment::new();
        lenient.set_undefined_behavior(UndefinedBehavior::Lenient);
        Envs { strict, url, lenient }
    })
}

/// Sources are leaked so compiled templates can live in the job: a job is
/// loaded once per run.
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// `"{{ expr }}"` with nothing around it → `Some("expr")`.
fn single_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("{#") {
        return None;
    }
    Some(inner.trim())
}

struct Compiler<'a> {
    path: &'a Path,
}

impl Compiler<'_> {
    fn invalid(&self, message: String) -> JobError {
        JobError::Invalid { path: self.path.to_path_buf(), message }
    }

    fn text(&self, env: &'static Environment<'static>, place: &str, source: &str) -> Result<Text, JobError> {
        let template = env
            .template_from_str(leak(source))
            .map_err(|e| self.invalid(format!("{place}: bad template `{source}`: {e}")))?;
        let vars = sorted(template.undeclared_variables(true));
        let envs = envs();
        let (strict, encode) = (std::ptr::eq(env, &envs.strict), std::ptr::eq(env, &envs.url));
        let parts = if strict || encode { plain_parts(source) } else { None };
        Ok(Text { template, vars, place: place.to_string(), parts, encode })
    }

    fn expr(&self, env: &'static Environment<'static>, place: &str, source: &str) -> Result<Expr, JobError> {
        let expr = env
            .compile_expression(leak(source))
            .map_err(|e| self.invalid(format!("{place}: bad expression `{source}`: {e}")))?;
        let vars = sorted(expr.undeclared_variables(true));
        Ok(Expr { expr, vars, place: place.to_string() })
    }

    fn node(&self, env: &'static Environment<'static>, place: &str, value: &Value) -> Result<Node, JobError> {
        Ok(match value {
            Value::Object(map) => Node::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), self.node(env, &format!("{place}.{k}"), v)?)))
                    .collect::<Result<_, JobError>>()?,
            ),
            Value::Array(items) => Node::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.node(env, &format!("{place}[{i}]"), v))
                    .collect::<Result<_, _>>()?,
            ),
            Value::String(s) => match single_expression(s) {
                Some(expr) => match field_path(expr) {
                    Some(path) if std::ptr::eq(env, &envs().strict) => {
                        Node::Field { vars: vec![path.join(".")], path, place: place.to_string() }
                    }
                    _ => Node::Expr(self.expr(env, place, expr)?),
                },
                None if s.contains("{{") || s.contains("{%") => Node::Text(self.text(env, place, s)?),
                None => Node::Literal(value.clone()),
            },
            other => Node::Literal(other.clone()),
        })
    }

    fn string_map(&self, what: &str, map: &Map<String, Value>) -> Result<Vec<(String, String)>, JobError> {
        map.iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                Value::Number(n) => Ok((k.clone(), n.to_string())),
                Value::Bool(b) => Ok((k.clone(), b.to_string())),
                _ => Err(self.invalid(format!("{what}.{k} must be a string template"))),
            })
            .collect()
    }
}

fn sorted(set: HashSet<String>) -> Vec<String> {
    let mut v: Vec<String> = set.into_iter().collect();
    v.sort();
    v
}

fn header_name(c: &Compiler<'_>, name: &str) -> Result<HeaderName, JobError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| c.invalid(format!("`{name}` is not a valid header name")))
}

impl Job {
    /// Reads and compiles a job spec.
    pub fn load(path: &Path) -> Result<Job, JobError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| JobError::Read { path: path.to_path_buf(), source })?;
        Job::parse(path, &text)
    }

    /// Compiles a job spec from its text; `path` names it in errors and
    /// anchors relative inputs.
    pub fn parse(path: &Path, text: &str) -> Result<Job, JobError> {
        let c = Compiler { path };
        let file: JobFile = toml::from_str(text).map_err(|e| c.invalid(e.to_string()))?;
        let envs = envs();
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = match file.name {
            Some(n) => n,
            None => path.file_stem().and_then(|s| s.to_str()).unwrap_or("job").to_string(),
        };
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(c.invalid(format!("name `{name}` cannot be used as a folder name")));
        }
        let inputs = match file.input {
            None => vec![],
            Some(OneOrMany::One(p)) => vec![dir.join(p)],
            Some(OneOrMany::Many(ps)) => ps.into_iter().map(|p| dir.join(p)).collect(),
        };
        let delimiter = match file.delimiter.as_deref() {
            None => b',',
            Some("\\t" | "tab" | "\t") => b'\t',
            Some(d) if d.len() == 1 && d.is_ascii() => d.as_bytes()[0],
            Some(d) => {
                return Err(c.invalid(format!("delimiter `{d}` must be one ASCII character such as , ; | or \\t")));
            }
        };
        let method_name = file.method.as_deref().unwrap_or("POST").to_ascii_uppercase();
        let method = Method::from_bytes(method_name.as_bytes())
            .map_err(|_| c.invalid(format!("method `{method_name}` is not an HTTP method")))?;

        let headers = c
            .string_map("headers", &file.headers)?
            .into_iter()
            .map(|(k, v)| Ok((header_name(&c, &k)?, c.text(&envs.strict, &format!("headers.{k}"), &v)?)))
            .collect::<Result<_, JobError>>()?;
        let query = c
            .string_map("query", &file.query)?
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), c.text(&envs.strict, &format!("query.{k}"), &v)?)))
            .collect::<Result<_, JobError>>()?;
        let idempotency = match file.idempotency_key {
            Some(t) => {
                let name = file.idempotency_header.as_deref().unwrap_or("Idempotency-Key");
                Some((header_name(&c, name)?, c.text(&envs.strict, "idempotency_key", &t)?))
            }
            None => None,
        };
        let idempotent = file.idempotent.unwrap_or_else(|| {
            idempotency.is_some()
                || [Method::GET, Method::HEAD, Method::PUT, Method::DELETE, Method::OPTIONS].contains(&method)
        });
        let success = match file.success {
            Some(s) => Some(c.expr(&envs.lenient, "success", single_expression(&s).unwrap_or(&s))?),
            None => None,
        };
        let capture = file
            .capture
            .iter()
            .map(|(k, v)| {
                let path = v.as_str().and_then(single_expression).and_then(response_path);
                let capture = match path {
                    Some(path) => Capture::Path(path),
                    None => Capture::Node(c.node(&envs.lenient, &format!("capture.{k}"), v)?),
                };
                Ok((k.clone(), capture))
            })
            .collect::<Result<_, JobError>>()?;

        let mut settings = Map::new();
        for (k, v) in [
            ("concurrency", file.concurrency),
            ("rate", file.rate),
            ("burst", file.burst),
            ("max_attempts", file.max_attempts),
            ("timeout", file.timeout),
            ("retry_on", file.retry_on),
            ("max_response_bytes", file.max_response_bytes),
        ] {
            if let Some(v) = v {
                settings.insert(k.to_string(), v);
            }
        }

        Ok(Job {
            name,
            path: path.to_path_buf(),
            inputs,
            format: file.format,
            delimiter,
            settings,
            method,
            url: c.text(&envs.url, "url", &file.url)?,
            url_source: file.url.clone(),
            key: file.key.map(|k| c.text(&envs.strict, "key", &k)).transpose()?,
            headers,
            query,
            body: file.body.map(|b| c.node(&envs.strict, "body", &b)).transpose()?,
            idempotency,
            idempotent,
            success,
            capture,
            results_csv: file.results_csv,
        })
    }

    /// Binds the job to the run's settings: base URL and static headers.
    pub fn requests(self: &Arc<Self>, settings: &Settings) -> Result<Requests, JobError> {
        let c = Compiler { path: &self.path };
        let absolute = ["http://", "https://", "{{", "{%"].iter().any(|p| self.url_source.trim_start().starts_with(p));
        if settings.base_url.is_none() && !absolute {
            return Err(c.invalid(format!(
                "url `{}` is relative and no base_url is configured; set base_url in the profile (-p) or write an absolute URL",
                self.url_source
            )));
        }
        let mut static_headers = HeaderMap::new();
        for (name, value) in &settings.headers {
            let value = HeaderValue::from_str(value).map_err(|_| {
                c.invalid(format!("header `{name}` from the configuration has a value that cannot be sent"))
            })?;
            static_headers.insert(header_name(&c, name)?, value);
        }
        if self.body.is_some() {
            static_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let mut requests = Requests {
            job: self.clone(),
            base_url: settings.base_url.as_deref().map(|b| b.trim_end_matches('/').to_string()),
            static_headers,
            allow_http: settings.allow_http,
            fixed_url: None,
        };
        if self.url.vars.is_empty()
            && let Ok(path) = self.url.template.render(())
        {
            requests.fixed_url = Some(requests.full_url(&path).map_err(|e| c.invalid(e.0))?);
        }
        Ok(requests)
    }
}

impl Job {
    /// Whether a row may be sent again when it is unknown whether the
    /// gateway acted on it (a timeout, a connection lost mid-call, a 5xx,
    /// a row in doubt on resume).
    pub fn idempotent(&self) -> bool {
        self.idempotent
    }

    /// The input fields the request templates use, each with the first
    /// place it is used in.
    pub fn fields(&self) -> Vec<(String, String)> {
        let mut texts: Vec<(&[String], &str)> = vec![(&self.url.vars, &self.url.place)];
        texts.extend(self.key.iter().map(|t| (t.vars.as_slice(), t.place.as_str())));
        texts.extend(self.headers.iter().map(|(_, t)| (t.vars.as_slice(), t.place.as_str())));
        texts.extend(self.query.iter().map(|(_, t)| (t.vars.as_slice(), t.place.as_str())));
        texts.extend(self.idempotency.iter().map(|(_, t)| (t.vars.as_slice(), t.place.as_str())));
        fn walk<'a>(node: &'a Node, out: &mut Vec<(&'a [String], &'a str)>) {
            match node {
                Node::Object(fields) => fields.iter().for_each(|(_, n)| walk(n, out)),
                Node::Array(items) => items.iter().for_each(|n| walk(n, out)),
                Node::Text(t) => out.push((&t.vars, &t.place)),
                Node::Expr(e) => out.push((&e.vars, &e.place)),
                Node::Field { vars, place, .. } => out.push((vars, place)),
                Node::Literal(_) => {}
            }
        }
        if let Some(body) = &self.body {
            walk(body, &mut texts);
        }
        let mut fields: Vec<(String, String)> = Vec::new();
        for (vars, place) in texts {
            for var in vars {
                let name = var.split('.').next().unwrap_or(var);
                if name != "row" && name != "row_number" && !fields.iter().any(|(f, _)| f == name) {
                    fields.push((name.to_string(), place.to_string()));
                }
            }
        }
        fields
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

/// An answer judged by the job: success or not, and the captured values.
pub struct Judged {
    pub ok: bool,
    pub captured: Map<String, Value>,
}

/// A JSON value as the template engine sees it; objects and arrays are
/// wrapped, not converted, so only the parts an expression reads are.
fn json_value(value: &Arc<Value>) -> JValue {
    match &**value {
        Value::Object(_) | Value::Array(_) => JValue::from_object(Json(value.clone())),
        other => scalar(other),
    }
}

fn scalar(value: &Value) -> JValue {
    match value {
        Value::Null => JValue::from(()),
        Value::Bool(b) => JValue::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => JValue::from(i),
            (None, Some(u)) => JValue::from(u),
            _ => JValue::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => JValue::from(s.as_str()),
        Value::Object(_) | Value::Array(_) => JValue::from_object(Json(Arc::new(value.clone()))),
    }
}

#[derive(Debug)]
struct Json(Arc<Value>);

impl Object for Json {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        if self.0.is_array() { ObjectRepr::Seq } else { ObjectRepr::Map }
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        let child = match &*self.0 {
            Value::Object(map) => map.get(key.as_str()?)?,
            Value::Array(items) => items.get(key.as_usize()?)?,
            _ => return None,
        };
        Some(scalar(child))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match &*self.0 {
            Value::Object(map) => Enumerator::Values(map.keys().map(|k| JValue::from(k.as_str())).collect()),
            Value::Array(items) => Enumerator::Seq(items.len()),
            _ => Enumerator::Empty,
        }
    }
}

/// Why a row could not be turned into a request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

/// A job bound to a run's settings: renders rows into requests.
pub struct Requests {
    job: Arc<Job>,
    base_url: Option<String>,
    static_headers: HeaderMap,
    allow_http: bool,
    /// The URL when it is the same for every row: parsed once.
    fixed_url: Option<url::Url>,
}

/// The template context of one row: its fields by name, `row` (the whole
/// record) and `row_number`.
#[derive(Debug)]
struct RowContext {
    record: Record,
    number: u64,
}

impl Object for RowContext {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        let key = key.as_str()?;
        match &self.record {
            Record::Csv { headers, values } => {
                if let Some(i) = headers.index(key) {
                    return Some(JValue::from(values[i].as_str()));
                }
            }
            Record::Json(map) => {
                if let Some(v) = map.get(key) {
                    return Some(JValue::from_serialize(v));
                }
            }
        }
        match key {
            "row" => Some(JValue::from_serialize(self.record.to_json())),
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
        let make = || JValue::from_object(RowContext { record: row.record.clone(), number: row.number });
        let ctx = Lazy { cell: std::cell::OnceCell::new(), make: &make };
        let fail = |place: &str, vars: &[String], e: minijinja::Error| -> RenderError {
            let missing: Vec<&str> = vars.iter().map(String::as_str).filter(|v| !resolves(&row.record, v)).collect();
            match missing.as_slice() {
                [] => RenderError(format!("{place}: {}", e.detail().unwrap_or(&e.to_string()))),
                [one] => RenderError(format!("field `{one}` is missing (used in {place})")),
                many => RenderError(format!("fields `{}` are missing (used in {place})", many.join("`, `"))),
            }
        };
        let text = |t: &Text| t.render(Some(row), &ctx).map_err(|e| fail(&t.place, &t.vars, e));

        let key = match &job.key {
            Some(t) => text(t)?,
            None => row.number.to_string(),
        };
        let mut url = match &self.fixed_url {
            Some(url) => url.clone(),
            None => self.full_url(&text(&job.url)?)?,
        };
        if !job.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, t) in &job.query {
                pairs.append_pair(name, &text(t)?);
            }
        }
        let mut headers = self.static_headers.clone();
        let header_value = |place: &str, v: String| {
            HeaderValue::from_str(&v).map_err(|_| RenderError(format!("{place}: `{v}` cannot be sent in a header")))
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

    /// Evaluates the job's `success` expression (default: any 2xx) and its
    /// captures against an answer. The template engine and the parsed
    /// answer are made only if an expression needs them.
    pub fn judge(&self, status: u16, body: &Body<'_>, row: &Row) -> Judged {
        let job = &self.job;
        let make = || {
            minijinja::context! {
                status => status,
                response => json_value(body.value()),
                row => JValue::from_object(RowContext { record: row.record.clone(), number: row.number }),
                row_number => row.number,
            }
        };
        let ctx = Lazy { cell: std::cell::OnceCell::new(), make: &make };
        let ok = match &job.success {
            Some(e) => e.expr.eval(ctx.get()).map(|v| v.is_true()).unwrap_or(false),
            None => (200..300).contains(&status),
        };
        let mut captured = Map::new();
        for (name, capture) in &job.capture {
            let value = match capture {
                Capture::Path(path) => body.lookup(path),
                Capture::Node(node) => render_node(node, None, &ctx, false).ok(),
            };
            if let Some(v) = value.filter(|v| !v.is_null()) {
                captured.insert(name.clone(), v);
            }
        }
        Judged { ok, captured }
    }

    /// The rendered URL joined to `base_url` (unless absolute), parsed and
    /// checked for https.
    fn full_url(&self, path: &str) -> Result<url::Url, RenderError> {
        let full = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            match &self.base_url {
                Some(base) if path.starts_with('/') => format!("{base}{path}"),
                Some(base) => format!("{base}/{path}"),
                None => {
                    return Err(RenderError(format!(
                        "url `{path}` is relative and no base_url is configured; set base_url in the profile"
                    )));
                }
            }
        };
        let url = url::Url::parse(&full).map_err(|e| RenderError(format!("url `{full}` is not valid: {e}")))?;
        if url.scheme() == "http" && !self.allow_http && !crate::config::is_loopback(&url) {
            return Err(RenderError(format!("url `{full}` is http:// to a host that is not loopback; use https://")));
        }
        Ok(url)
    }

    /// The row's key alone, when the whole request cannot be rendered.
    pub fn key(&self, row: &Row) -> String {
        let ctx = JValue::from_object(RowContext { record: row.record.clone(), number: row.number });
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
                serde_json::to_writer(&mut *out, key).expect("a string serializes");
                out.push(b':');
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

type NodeError<'a> = (&'a str, &'a [String], minijinja::Error);

fn render_node<'a>(node: &'a Node, row: Option<&Row>, ctx: &Lazy<'_>, strict: bool) -> Result<Value, NodeError<'a>> {
    Ok(match node {
        Node::Object(fields) => {
            let mut map = Map::with_capacity(fields.len());
            for (k, n) in fields {
                map.insert(k.clone(), render_node(n, row, ctx, strict)?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::CsvHeaders;

    fn job(spec: &str) -> Requests {
        let job = Arc::new(Job::parse(Path::new("jobs/test.toml"), spec).unwrap());
        let settings = Settings { base_url: Some("https://api.example.com/".into()), ..Settings::default() };
        job.requests(&settings).unwrap()
    }

    fn json_row(v: Value) -> Row {
        let Value::Object(map) = v else { panic!("object") };
        Row { input: 0, number: 7, line: 8, record: Record::Json(map) }
    }

    fn csv_row(pairs: &[(&str, &str)]) -> Row {
        let headers = CsvHeaders::for_tests(pairs.iter().map(|(k, _)| k.to_string()).collect());
        let values = pairs.iter().map(|(_, v)| v.to_string()).collect();
        Row { input: 0, number: 3, line: 4, record: Record::Csv { headers: Arc::new(headers), values } }
    }

    fn body(r: &Request) -> Value {
        serde_json::from_slice(r.body.as_ref().unwrap()).unwrap()
    }

    const ELIGIBILITY: &str = r#"
        url = "/medicalnetwork/eligibility/v3"
        key = "{{ control_number }}"
        [headers]
        x-request-id = "req-{{ control_number }}"
        [body]
        controlNumber = "{{ control_number }}"
        provider = { organizationName = "{{ provider_name }}", npi = "{{ npi }}" }
        subscriber = { memberId = "{{ member_id }}", dateOfBirth = "{{ dob }}" }
        encounter = { serviceTypeCodes = ["30"] }
        fixed = 3
    "#;

    #[test]
    fn idempotent_by_method_by_key_or_as_declared() {
        let idempotent =
            |extra: &str| Job::parse(Path::new("jobs/t.toml"), &format!("url = \"/x\"\n{extra}")).unwrap().idempotent();
        for method in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "get"] {
            assert!(idempotent(&format!("method = \"{method}\"")), "{method} is idempotent by definition");
        }
        assert!(!idempotent(""), "POST is the default method, and not idempotent");
        assert!(!idempotent("method = \"POST\""));
        assert!(!idempotent("method = \"PATCH\""));
        assert!(idempotent("idempotency_key = \"{{ id }}\""), "a key lets the server drop duplicates");
        assert!(idempotent("method = \"PATCH\"\nidempotency_key = \"{{ id }}\""));
        assert!(idempotent("idempotent = true"), "a query sent as POST may say so");
        assert!(!idempotent("method = \"PUT\"\nidempotent = false"), "the job's word wins");
        assert!(!idempotent("idempotency_key = \"{{ id }}\"\nidempotent = false"));
        let err = Job::parse(Path::new("jobs/t.toml"), "url = \"/x\"\nidempotent = \"yes\"").err().unwrap();
        assert!(err.to_string().contains("idempotent"), "{err}");
    }

    #[test]
    fn nested_body_from_a_csv_row() {
        let requests = job(ELIGIBILITY);
        let row = csv_row(&[
            ("control_number", "000000001"),
            ("provider_name", "Acme"),
            ("npi", "0123456789"),
            ("member_id", "M1"),
            ("dob", "19800102"),
        ]);
        let r = requests.render(&row).unwrap();
        assert_eq!(r.key, "000000001");
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.url.as_str(), "https://api.example.com/medicalnetwork/eligibility/v3");
        assert_eq!(r.headers["x-request-id"], "req-000000001");
        assert_eq!(r.headers[CONTENT_TYPE], "application/json");
        assert_eq!(
            body(&r),
            serde_json::json!({
                "controlNumber": "000000001",
                "provider": {"organizationName": "Acme", "npi": "0123456789"},
                "subscriber": {"memberId": "M1", "dateOfBirth": "19800102"},
                "encounter": {"serviceTypeCodes": ["30"]},
                "fixed": 3
            })
        );
    }

    #[test]
    fn a_missing_field_is_named_with_its_place() {
        let requests = job(ELIGIBILITY);
        let row = csv_row(&[("control_number", "1"), ("provider_name", "A"), ("npi", "1"), ("member_id", "M")]);
        let err = requests.render(&row).unwrap_err().to_string();
        assert_eq!(err, "field `dob` is missing (used in body.subscriber.dateOfBirth)");
    }

    #[test]
    fn single_expressions_keep_their_type() {
        let requests = job(r#"
            url = "https://other.example.com/claims"
            body = "{{ row }}"
        "#);
        let record = serde_json::json!({"id": 5, "amount": 12.5, "tags": ["a"], "nested": {"ok": true, "none": null}});
        let r = requests.render(&json_row(record.clone())).unwrap();
        assert_eq!(body(&r), record);
        assert_eq!(r.url.host_str(), Some("other.example.com"));
        assert_eq!(r.key, "7", "the default key is the row number");

        let requests = job(r#"
            url = "/x"
            [body]
            amount = "{{ amount | float }}"
            count = "{{- count | int -}}"
            text = "n={{ count }}"
            number = "{{ row_number }}"
        "#);
        let r = requests.render(&csv_row(&[("amount", "12.50"), ("count", "3")])).unwrap();
        assert_eq!(body(&r), serde_json::json!({"amount": 12.5, "count": 3, "text": "n=3", "number": 3}));

        let err = requests.render(&csv_row(&[("amount", "lots"), ("count", "3")])).unwrap_err().to_string();
        assert!(err.starts_with("body.amount: "), "{err}");
    }

    #[test]
    fn path_and_query_values_are_encoded() {
        let requests = job(r#"
            method = "get"
            url = "/members/{{ id }}/claims"
            [query]
            q = "{{ name }}"
        "#);
        let r = requests.render(&csv_row(&[("id", "a/b c?"), ("name", "O'Brien & Sons")])).unwrap();
        assert_eq!(r.method, Method::GET);
        assert_eq!(r.url.path(), "/members/a%2Fb%20c%3F/claims");
        assert_eq!(r.url.query(), Some("q=O%27Brien+%26+Sons"));
        assert!(r.body.is_none());
    }

    #[test]
    fn spec_errors_name_the_place() {
        let err = Job::parse(Path::new("j.toml"), "url = \"/x\"\n[body]\na = \"{{ b \"\n").err().unwrap().to_string();
        assert!(err.contains("body.a"), "{err}");
        let err = Job::parse(Path::new("j.toml"), "url = \"/x\"\nbodyy = 1\n").err().unwrap().to_string();
        assert!(err.contains("bodyy"), "{err}");
        let err = Job::parse(Path::new("j.toml"), "url = \"/x\"\nmethod = \"P OST\"\n").err().unwrap().to_string();
        assert!(err.contains("P OST"), "{err}");
    }

    #[test]
    fn success_and_captures_treat_missing_response_fields_as_undefined() {
        let requests = job(r#"
            url = "/x"
            success = "{{ status == 200 and not response.errors }}"
            [capture]
            plan = "{{ response.planStatus[0].status }}"
            missing = "{{ response.nothing.here }}"
            code = "{{ status }}"
        "#);
        let row = csv_row(&[("a", "1")]);
        let judge = |text: &str| requests.judge(200, &Body::new(text.as_bytes(), text.len() as u64), &row);
        let judged = judge(r#"{"planStatus": [{"status": "Active"}]}"#);
        assert!(judged.ok);
        assert_eq!(judged.captured, serde_json::json!({"plan": "Active", "code": 200}).as_object().unwrap().clone());
        assert!(!judge(r#"{"errors": [{"code": "x"}]}"#).ok);
        assert!(judge(r#"{"errors": []}"#).ok, "an empty list is falsy");
    }

    #[test]
    fn a_capture_path_and_the_same_expression_through_the_engine_agree() {
        let requests = job(r#"
            url = "/x"
            [capture]
            plan = "{{ response.planStatus[0].status }}"
            plan_engine = "{{ response.planStatus[0].status | string }}"
            whole = "{{ response['payer'] }}"
            text = "{{ response }}"
        "#);
        let row = csv_row(&[("a", "1")]);
        let judge = |text: &str| requests.judge(200, &Body::new(text.as_bytes(), text.len() as u64), &row).captured;
        let captured = judge(r#"{"planStatus": [{"status": "Active"}], "payer": {"name": "P"}}"#);
        assert_eq!(captured["plan"], "Active");
        assert_eq!(captured["plan_engine"], "Active");
        assert_eq!(captured["whole"], serde_json::json!({"name": "P"}));
        let captured = judge("not json");
        assert_eq!(captured.get("plan"), None);
        assert_eq!(captured["text"], "not json", "a text answer is a string");
    }
}
