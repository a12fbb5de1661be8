//! Judging an answer: the job's `success` expression and its captures.

use minijinja::Value as JValue;
use serde_json::{Map, Value};

use super::render::{Lazy, Requests, RowContext, render_node};
use super::template::Capture;
use super::value::json_value;
use crate::answer::Body;
use crate::input::Row;

/// An answer judged by the job: success or not, and the captured values.
pub struct Judged {
    pub ok: bool,
    pub captured: Map<String, Value>,
}

impl Requests {
    /// Evaluates the job's `success` expression (default: any 2xx) and its
    /// captures against an answer. The template engine and the parsed
    /// answer are made only if an expression needs them.
    pub fn judge(&self, status: u16, body: &Body<'_>, row: &Row) -> Judged {
        let job = &self.job;
        let make = || {
            minijinja::context! {
                status => status,
                response => json_value(body.value()),
                row => JValue::from_object(RowContext::new(row)),
                row_number => row.number,
            }
        };
        let ctx = Lazy { cell: std::cell::OnceCell::new(), make: &make };
        let ok = match &job.success {
            Some(e) => e.expr.eval(ctx.get()).map(|v| v.is_true()).unwrap_or(false),
            None => (200..300).contains(&status),
        };
        Judged { ok, captured: capture_all(&job.capture, body, &ctx) }
    }
}

/// The values of `captures` in an answer; a capture that is missing or null is left out.
pub(super) fn capture_all(captures: &[(String, Capture)], body: &Body<'_>, ctx: &Lazy<'_>) -> Map<String, Value> {
    let mut captured = Map::new();
    for (name, capture) in captures {
        let value = match capture {
            Capture::Path(path) => body.lookup(path),
            Capture::Node(node) => render_node(node, None, ctx, false).ok(),
        };
        if let Some(v) = value.filter(|v| !v.is_null()) {
            captured.insert(name.clone(), v);
        }
    }
    captured
}
