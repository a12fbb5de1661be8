//! Judging an answer: the job's `success` expression and its captures.

use std::sync::Arc;

use minijinja::Value as JValue;
use minijinja::value::{Enumerator, Object, ObjectRepr};
use serde_json::{Map, Value};

use super::render::{Lazy, Requests, RowContext, render_node};
use super::template::Capture;
use crate::answer::Body;
use crate::input::Row;

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
}
