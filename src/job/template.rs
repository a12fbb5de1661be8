//! Compiling the spec's strings: text templates, single expressions and
//! JSON trees whose string leaves are templates. Compiled once per job.

use std::collections::HashSet;
use std::path::Path;

use minijinja::{Environment, Expression, Template, UndefinedBehavior};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::HeaderName;
use serde_json::{Map, Value};

use super::JobError;
use crate::answer::Step;

/// A `[capture]` entry.
pub(super) enum Capture {
    /// `"{{ response.a[0].b }}"`: looked up in the answer without the
    /// template engine or parsing the whole answer.
    Path(Vec<Step>),
    Node(Node),
}

/// A text template and the input fields it uses.
pub(super) struct Text {
    pub(super) template: Template<'static, 'static>,
    pub(super) vars: Vec<String>,
    pub(super) place: String,
    /// Literals and plain field references, when the template is only
    /// that: rendered without the template engine.
    pub(super) parts: Option<Vec<Part>>,
    /// Interpolated values are percent-encoded (the URL).
    pub(super) encode: bool,
}

pub(super) enum Part {
    Literal(String),
    Field(Vec<String>),
}

/// `member.id` → `["member", "id"]`, if the expression is only a field path.
pub(super) fn field_path(expr: &str) -> Option<Vec<String>> {
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

pub(super) struct Expr {
    pub(super) expr: Expression<'static, 'static>,
    pub(super) vars: Vec<String>,
    pub(super) place: String,
}

/// A member's name in an object of a [`Node`] tree, and the same as it
/// begins the member in a JSON body (`"name":`), serialized once: every
/// row's body copies it.
pub(super) struct Key {
    pub(super) name: String,
    pub(super) json: Box<[u8]>,
}

impl Key {
    fn new(name: &str) -> Key {
        let mut json = serde_json::to_vec(name).expect("a string serializes");
        json.push(b':');
        Key { name: name.to_string(), json: json.into() }
    }
}

/// A JSON body (or capture) template: a tree whose string leaves are templates.
pub(super) enum Node {
    Object(Vec<(Key, Node)>),
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

/// Values in the URL: everything but RFC 3986's unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) is percent-encoded, `/`, `\\` and `%` included,
/// so a value stays within its path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Writes a value into the URL, percent-encoded; a value that is `.` or
/// `..` (also as `%2e`) is refused: the URL parser would resolve it as a
/// dot segment and send the call to another path.
pub(super) fn url_value(value: &str, out: &mut String) -> Result<(), minijinja::Error> {
    let dots = value.to_ascii_lowercase().replace("%2e", ".");
    if dots == "." || dots == ".." {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("a value of `{value}` would send the call to another path"),
        ));
    }
    out.extend(utf8_percent_encode(value, SEGMENT));
    Ok(())
}

/// The three template environments, built once and kept for the whole process.
pub(super) struct Envs {
    /// Request templates: a missing field is an error.
    pub(super) strict: Environment<'static>,
    /// The URL: like `strict`, and every interpolated value is percent-encoded.
    pub(super) url: Environment<'static>,
    /// `success` and `[capture]`: a missing response field is undefined.
    pub(super) lenient: Environment<'static>,
}

pub(super) fn envs() -> &'static Envs {
    static ENVS: std::sync::OnceLock<Envs> = std::sync::OnceLock::new();
    ENVS.get_or_init(|| {
        let mut strict = Environment::new();
        strict.set_undefined_behavior(UndefinedBehavior::Strict);
        strict.set_formatter(|out, state, value| match printed(state, value) {
            Some(text) => out.write_str(&text).map_err(minijinja::Error::from),
            None => minijinja::escape_formatter(out, state, value),
        });
        let mut url = strict.clone();
        url.set_formatter(|out, state, value| {
            let mut text = String::new();
            url_value(&printed(state, value).unwrap_or_else(|| value.to_string()), &mut text)?;
            out.write_str(&text).map_err(minijinja::Error::from)
        });
        let mut lenient = Environment::new();
        lenient.set_undefined_behavior(UndefinedBehavior::Lenient);
        Envs { strict, url, lenient }
    })
}

/// How a value prints where the engine's own text would differ from the
/// input's: a boolean as JSON writes it (`true`, never `True`), a number
/// with the digits the row had (`125.50`, not `125.5`); `None`: as the
/// engine prints it.
fn printed(state: &minijinja::State, value: &minijinja::Value) -> Option<String> {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Bool => Some(value.is_true().to_string()),
        ValueKind::Number => {
            let text = value.to_string();
            if !text.contains(['.', 'e', 'E']) {
                // An integer prints with its digits already.
                return None;
            }
            let digits = state.lookup(super::value::DIGITS)?;
            digits.downcast_object_ref::<super::value::Digits>()?.of(text.parse().ok()?).map(str::to_string)
        }
        _ => None,
    }
}

/// Sources are leaked so compiled templates can live in the job: a job is
/// loaded once per run.
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// `"{{ expr }}"` with nothing around it → `Some("expr")`.
pub(super) fn single_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("{#") {
        return None;
    }
    Some(inner.trim())
}

pub(super) struct Compiler<'a> {
    pub(super) path: &'a Path,
}

impl Compiler<'_> {
    pub(super) fn invalid(&self, message: String) -> JobError {
        JobError::Invalid { path: self.path.to_path_buf(), message }
    }

    pub(super) fn text(&self, env: &'static Environment<'static>, place: &str, source: &str) -> Result<Text, JobError> {
        let template = env
            .template_from_str(leak(source))
            .map_err(|e| self.invalid(format!("{place}: bad template `{source}`: {e}")))?;
        let vars = sorted(template.undeclared_variables(true));
        let envs = envs();
        let (strict, encode) = (std::ptr::eq(env, &envs.strict), std::ptr::eq(env, &envs.url));
        let parts = if strict || encode { plain_parts(source) } else { None };
        Ok(Text { template, vars, place: place.to_string(), parts, encode })
    }

    pub(super) fn expr(&self, env: &'static Environment<'static>, place: &str, source: &str) -> Result<Expr, JobError> {
        let expr = env
            .compile_expression(leak(source))
            .map_err(|e| self.invalid(format!("{place}: bad expression `{source}`: {e}")))?;
        let vars = sorted(expr.undeclared_variables(true));
        Ok(Expr { expr, vars, place: place.to_string() })
    }

    pub(super) fn node(
        &self,
        env: &'static Environment<'static>,
        place: &str,
        value: &Value,
    ) -> Result<Node, JobError> {
        Ok(match value {
            Value::Object(map) => Node::Object(
                map.iter()
                    .map(|(k, v)| Ok((Key::new(k), self.node(env, &format!("{place}.{k}"), v)?)))
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

    pub(super) fn string_map(&self, what: &str, map: &Map<String, Value>) -> Result<Vec<(String, String)>, JobError> {
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

/// A `[capture]` table (`place` names it in errors: `capture`,
/// `poll.capture`): a plain response path is looked up without the
/// template engine, anything else is a lenient template.
pub(super) fn captures(
    c: &Compiler<'_>,
    place: &str,
    table: &Map<String, Value>,
) -> Result<Vec<(String, Capture)>, JobError> {
    table
        .iter()
        .map(|(k, v)| {
            let path = v.as_str().and_then(single_expression).and_then(crate::answer::response_path);
            let capture = match path {
                Some(path) => Capture::Path(path),
                None => Capture::Node(c.node(&envs().lenient, &format!("{place}.{k}"), v)?),
            };
            Ok((k.clone(), capture))
        })
        .collect()
}

fn sorted(set: HashSet<String>) -> Vec<String> {
    let mut v: Vec<String> = set.into_iter().collect();
    v.sort();
    v
}

pub(super) fn header_name(c: &Compiler<'_>, name: &str) -> Result<HeaderName, JobError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| c.invalid(format!("`{name}` is not a valid header name")))
}
