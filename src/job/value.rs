//! JSON values as the template engine sees them, converted explicitly: with
//! serde_json's `arbitrary_precision` a number handed to minijinja's
//! `from_serialize` would arrive as a private map.

use std::sync::Arc;

use minijinja::Value as JValue;
use minijinja::value::{Enumerator, Object, ObjectRepr};
use serde_json::{Number, Value};

/// A JSON value as the template engine sees it; objects and arrays are
/// wrapped, not converted, so only the parts an expression reads are.
pub(super) fn json_value(value: &Arc<Value>) -> JValue {
    match &**value {
        Value::Object(_) | Value::Array(_) => JValue::from_object(Json(value.clone())),
        other => scalar(other),
    }
}

pub(super) fn scalar(value: &Value) -> JValue {
    match value {
        Value::Null => JValue::from(()),
        Value::Bool(b) => JValue::from(*b),
        Value::Number(n) => number(n),
        Value::String(s) => JValue::from(s.as_str()),
        Value::Object(_) | Value::Array(_) => JValue::from_object(Json(Arc::new(value.clone()))),
    }
}

#[derive(Debug)]
pub(super) struct Json(pub(super) Arc<Value>);

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

/// A JSON number as the engine's closest number: an integer of any size up
/// to 128 bits exactly, else a float. A number beyond a float's range
/// (`1e400`) is its text. Where a template passes a value through without
/// computing with it (`{{ amount }}`, `{{ row }}`), the engine is not used
/// and the digits are sent as the input had them.
pub(super) fn number(n: &Number) -> JValue {
    if let Some(i) = n.as_i64() {
        return JValue::from(i);
    }
    if let Some(u) = n.as_u64() {
        return JValue::from(u);
    }
    let text = n.as_str();
    if !text.contains(['.', 'e', 'E']) {
        if let Ok(i) = text.parse::<i128>() {
            return JValue::from(i);
        }
        if let Ok(u) = text.parse::<u128>() {
            return JValue::from(u);
        }
    }
    match n.as_f64() {
        Some(f) => JValue::from(f),
        None => JValue::from(text),
    }
}

/// The context's name for the row's [`Digits`]: not an identifier, so no
/// template can name it, and looked up before the row's fields.
pub(super) const DIGITS: &str = "\u{1}digits";

/// The text each of a row's non-integer numbers had in the input, by the
/// value the engine computes with: a printed float that equals one of
/// them prints with the input's digits (`125.50`, `1e2`).
#[derive(Debug, Default)]
pub(super) struct Digits(std::collections::HashMap<u64, Option<String>>);

impl Digits {
    pub(super) fn of_record(map: &serde_json::Map<String, Value>) -> Digits {
        let mut digits = Digits::default();
        let mut stack: Vec<&Value> = map.values().collect();
        while let Some(value) = stack.pop() {
            match value {
                Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => {
                    if let Some(f) = n.as_f64() {
                        let text = n.as_str();
                        // Two texts of one value (`1.10`, `1.1`): neither is taken.
                        let entry = digits.0.entry(f.to_bits()).or_insert_with(|| Some(text.to_string()));
                        if entry.as_deref().is_some_and(|t| t != text) {
                            *entry = None;
                        }
                    }
                }
                Value::Array(items) => stack.extend(items),
                Value::Object(map) => stack.extend(map.values()),
                _ => {}
            }
        }
        digits
    }

    /// The input's text of a value, if one number of the row had it.
    pub(super) fn of(&self, value: f64) -> Option<&str> {
        self.0.get(&value.to_bits())?.as_deref()
    }
}

impl Object for Digits {}
