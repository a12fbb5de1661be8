//! The job spec (TOML) and its templates: a row in, a request out. Templates
//! are compiled once when the job is loaded; rendering is pure.
//!
//! A body string that is exactly one expression (`"{{ row }}"`,
//! `"{{ amount | float }}"`) keeps the value's type; other strings render as
//! text. In request templates a missing input field is an error that names
//! the field; in `success` and `[capture]` a missing response field is
//! undefined, never an error.
//!
//! This file holds the spec itself; the other concerns live beside it:
//! - [`template`]: compiling the spec's strings into templates, once.
//! - [`render`]: a row in, a [`Request`] out.
//! - [`judge`]: an answer in, success or not and the captured values out.
//! - [`value`]: JSON values as the template engine sees them.

mod judge;
mod poll;
mod render;
mod template;
mod value;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Settings;
use crate::input::{Encoding, Format};

pub use judge::Judged;
pub use poll::{First, Poll, PollJudged, PollUrl, location_of};
pub use render::{RenderError, Request, Requests};
use template::{Capture, Compiler, Expr, Node, Text, envs, header_name, single_expression};

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
    encoding: Option<Encoding>,
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
    poll: Option<poll::PollFile>,
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
    /// The inputs' text encoding (`encoding`; default UTF-8).
    pub encoding: Encoding,
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
    /// Follow-up calls until a row's answer is final.
    poll: Option<Poll>,
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
        // The methods of RFC 9110 and PATCH: a typo (`PSOT`) is a token
        // HTTP would carry, and the gateway would answer it as something else.
        const METHODS: [Method; 8] = [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
            Method::TRACE,
        ];
        let method = METHODS.into_iter().find(|m| m.as_str() == method_name).ok_or_else(|| {
            c.invalid(format!(
                "method `{method_name}` is not an HTTP method; use one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"
            ))
        })?;

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
        let capture = template::captures(&c, "capture", &file.capture)?;

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
            encoding: file.encoding.unwrap_or_default(),
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
            poll: file.poll.map(|p| Poll::compile(&c, p)).transpose()?,
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
            requests.fixed_url = Some(requests.full_url(&path).map_err(|e| c.invalid(e.message))?);
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

    /// Whether the job polls each accepted row (`[poll]`).
    pub fn polls(&self) -> bool {
        self.poll.is_some()
    }

    /// The HTTP method of every call.
    pub fn method(&self) -> &Method {
        &self.method
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Body;
    use crate::input::{CsvHeaders, Record, Row};

    fn job(spec: &str) -> Requests {
        let job = Arc::new(Job::parse(Path::new("jobs/test.toml"), spec).unwrap());
        let settings = Settings { base_url: Some("https://api.example.com/".into()), ..Settings::default() };
        job.requests(&settings).unwrap()
    }

    fn json_row(v: Value) -> Row {
        let Value::Object(map) = v else { panic!("object") };
        Row { input: 0, number: 7, line: 8, record: Record::Json(map), earlier: None }
    }

    fn csv_row(pairs: &[(&str, &str)]) -> Row {
        let headers = CsvHeaders::for_tests(pairs.iter().map(|(k, _)| k.to_string()).collect());
        let values = pairs.iter().map(|(_, v)| v.to_string()).collect();
        Row { input: 0, number: 3, line: 4, record: Record::Csv { headers: Arc::new(headers), values }, earlier: None }
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
    fn an_unknown_method_is_refused_when_the_job_loads() {
        for method in ["PSOT", "GETT", "CONNECT", "", "PO ST"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("job.toml");
            std::fs::write(&path, format!("method = \"{method}\"\nurl = \"/x\"\n")).unwrap();
            let Err(err) = Job::load(&path) else { panic!("{method} accepted") };
            let err = err.to_string();
            assert!(err.contains("is not an HTTP method") && err.contains("job.toml"), "{method}: {err}");
        }
    }

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

    /// Numbers whose digits a float would change, and one a float cannot hold.
    /// An exponent is written in one form: `e`, then its sign (`1E400` is sent as `1e+400`).
    const AWKWARD: &str = r#"{"id":"n1","amount":3923.5950000000003,"price":125.50,"big":12345678901234567890123,"huge":1e+400,"tiny":-0.000000000000000000001,"exp":1.0e-2,"nested":{"list":[0.10,2,-7]}}"#;

    fn awkward_row() -> Row {
        json_row(serde_json::from_str(AWKWARD).unwrap())
    }

    #[test]
    fn json_numbers_keep_their_digits_in_whole_rows_leaves_and_text() {
        let requests = job(r#"
            url = "/x"
            body = "{{ row }}"
        "#);
        let r = requests.render(&awkward_row()).unwrap();
        assert_eq!(std::str::from_utf8(r.body.as_ref().unwrap()).unwrap(), AWKWARD);
        let other_exponents = json_row(serde_json::from_str(r#"{"a":1E400,"b":2.50E7}"#).unwrap());
        let r = requests.render(&other_exponents).unwrap();
        assert_eq!(std::str::from_utf8(r.body.as_ref().unwrap()).unwrap(), r#"{"a":1e+400,"b":2.50e+7}"#);

        let requests = job(r#"
            url = "/x/{{ price }}"
            [query]
            big = "{{ big }}"
            [body]
            amount = "{{ amount }}"
            price = "{{ price }}"
            big = "{{ big }}"
            huge = "{{ huge }}"
            list = "{{ nested.list }}"
            nested = "{{ nested if nested else none }}"
            text = "{{ price }} of {{ big }}"
            engine_text = "{{ price }} {{ id | upper }}"
        "#);
        let r = requests.render(&awkward_row()).unwrap();
        assert_eq!(
            std::str::from_utf8(r.body.as_ref().unwrap()).unwrap(),
            concat!(
                r#"{"amount":3923.5950000000003,"price":125.50,"big":12345678901234567890123,"huge":1e+400,"#,
                r#""list":[0.10,2,-7],"nested":{"list":[0.10,2,-7]},"text":"125.50 of 12345678901234567890123","#,
                // Through the engine too: printed with the input's digits.
                r#""engine_text":"125.50 N1"}"#
            )
        );
        assert_eq!(r.url.path(), "/x/125.50");
        assert_eq!(r.url.query(), Some("big=12345678901234567890123"));
    }

    #[test]
    fn mixed_templates_print_numbers_and_booleans_as_the_input_wrote_them() {
        let requests = job(r#"
            url = "/x/{{ flag }}/{% if flag %}{{ price }}{% endif %}"
            [body]
            both = "{{ price }} {{ flag }}"
            block = "{{ price }}{% if flag %}!{% endif %}"
            looped = "{% for n in nested.list %}{{ n }};{% endfor %}"
            exp = "{{ exp }}{{ '' }}"
            computed = "{{ price * 2 }} {{ price + 0 }} {{ not flag }}"
        "#);
        let row = r#"{"price":125.50,"flag":true,"exp":1.0e-2,"nested":{"list":[0.10,2,-7]}}"#;
        let r = requests.render(&json_row(serde_json::from_str(row).unwrap())).unwrap();
        assert_eq!(
            body(&r),
            serde_json::json!({
                "both": "125.50 true",
                "block": "125.50!",
                "looped": "0.10;2;-7;",
                "exp": "1.0e-2",
                // A computed value is the engine's; one equal to an input number prints as the input had it.
                "computed": "251.0 125.50 false",
            })
        );
        assert_eq!(r.url.path(), "/x/true/125.50");
        // Two texts of one value: the engine's text, as neither can be told from the other.
        let twice =
            json_row(serde_json::from_str(r#"{"price":1.10,"flag":true,"exp":1.1,"nested":{"list":[]}}"#).unwrap());
        assert_eq!(body(&requests.render(&twice).unwrap())["block"], "1.1!");
    }

    #[test]
    fn a_typed_csv_value_does_not_grow_digits() {
        let requests = job(r#"
            url = "/x"
            [body]
            amount = "{{ amount | float }}"
            cents = "{{ (amount | float * 100) | round | int }}"
            big = "{{ big | int }}"
        "#);
        let r = requests.render(&csv_row(&[("amount", "125.10"), ("big", "12345678901234567890123")])).unwrap();
        assert_eq!(
            std::str::from_utf8(r.body.as_ref().unwrap()).unwrap(),
            r#"{"amount":125.1,"cents":12510,"big":12345678901234567890123}"#
        );
    }

    #[test]
    fn numbers_in_the_engine_compare_and_compute() {
        let requests = job(r#"
            url = "/x"
            [body]
            over = "{{ amount > 3923 }}"
            double = "{{ nested.list[2] * 2 }}"
            big = "{{ big + 1 }}"
        "#);
        let r = requests.render(&awkward_row()).unwrap();
        assert_eq!(body(&r), serde_json::json!({"over": true, "double": -14, "big": 12345678901234567890124_i128}));
    }

    #[test]
    fn captured_numbers_keep_their_digits() {
        let requests = job(r#"
            url = "/x"
            success = "{{ response.price > 100 }}"
            [capture]
            price = "{{ response.price }}"
            big = "{{ response['big'] }}"
            nested = "{{ response.nested }}"
        "#);
        let judged = requests.judge(200, &Body::new(AWKWARD.as_bytes(), AWKWARD.len() as u64), &awkward_row());
        assert!(judged.ok);
        assert_eq!(
            serde_json::to_string(&judged.captured).unwrap(),
            r#"{"price":125.50,"big":12345678901234567890123,"nested":{"list":[0.10,2,-7]}}"#
        );
    }
}
