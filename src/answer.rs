//! An answer's body as judging and results see it: parsed into a value at
//! most once, and only when something needs the value. A capture such as
//! `{{ response.planStatus[0].status }}` is looked up in the bytes without
//! building the rest of the answer; an answer that only goes to results is
//! checked to be JSON and kept as it came.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::sync::Arc;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// One step of a path into a JSON answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// `response.planStatus[0].status`, `response["a b"]` or `response` →
/// the steps after `response`; `None` for anything else (filters,
/// operators, other variables), which the template engine evaluates.
pub fn response_path(expr: &str) -> Option<Vec<Step>> {
    let mut rest = expr.trim().strip_prefix("response")?;
    let ident = |s: &str| s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let len = ident(after);
            if len == 0 || after.as_bytes()[0].is_ascii_digit() {
                return None;
            }
            steps.push(Step::Key(after[..len].to_string()));
            rest = &after[len..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let (inside, after) = after.split_once(']')?;
            let inside = inside.trim();
            let quoted = |q: char| inside.strip_prefix(q).and_then(|s| s.strip_suffix(q));
            match quoted('"').or_else(|| quoted('\'')) {
                Some(key) if !key.contains(['\\', '"', '\'']) => steps.push(Step::Key(key.to_string())),
                Some(_) => return None,
                None if !inside.is_empty() && inside.bytes().all(|b| b.is_ascii_digit()) => {
                    steps.push(Step::Index(inside.parse().ok()?));
                }
                None => return None,
            }
            rest = after;
        } else {
            // `response_code`, `response | length`, `response == 1`, ...
            return None;
        }
    }
    Some(steps)
}

/// An answer's body, kept up to `max_response_bytes`.
pub struct Body<'a> {
    /// Owned when the answer was read for a call: results take it uncopied.
    bytes: Cow<'a, [u8]>,
    /// The whole answer's size, when `bytes` is only its start.
    cut: Option<u64>,
    json: OnceCell<bool>,
    value: OnceCell<Arc<Value>>,
}

impl<'a> Body<'a> {
    /// `total` is the whole answer's size; more than `bytes` holds means it was cut.
    pub fn new(bytes: impl Into<Cow<'a, [u8]>>, total: u64) -> Body<'a> {
        let bytes = bytes.into();
        let cut = (total > bytes.len() as u64).then_some(total);
        Body { bytes, cut, json: OnceCell::new(), value: OnceCell::new() }
    }

    /// The whole answer's size when it was cut at `max_response_bytes`.
    pub fn cut(&self) -> Option<u64> {
        self.cut
    }

    /// The answer's bytes as kept.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the answer is whole and JSON (checked without building it).
    pub fn is_json(&self) -> bool {
        *self.json.get_or_init(|| {
            let mut de = serde_json::Deserializer::from_slice(&self.bytes);
            self.whole() && Check.deserialize(&mut de).and_then(|()| de.end()).is_ok()
        })
    }

    fn whole(&self) -> bool {
        self.cut.is_none() && !self.bytes.is_empty()
    }

    /// The answer as a value: JSON if it is JSON, else its text; null when empty.
    pub fn value(&self) -> &Arc<Value> {
        self.value.get_or_init(|| {
            if self.whole()
                && self.json.get() != Some(&false)
                && let Ok(v) = serde_json::from_slice(&self.bytes)
            {
                let _ = self.json.set(true);
                return Arc::new(v);
            }
            let _ = self.json.set(false);
            Arc::new(if self.bytes.is_empty() {
                Value::Null
            } else {
                Value::String(String::from_utf8_lossy(&self.bytes).into_owned())
            })
        })
    }

    /// The value at `path`; `None` when it is absent or the answer is not JSON.
    pub fn lookup(&self, path: &[Step]) -> Option<Value> {
        if path.is_empty() {
            return Some((**self.value()).clone());
        }
        if let Some(value) = self.value.get() {
            return walk(value, path).cloned();
        }
        if !self.whole() || self.json.get() == Some(&false) {
            return None;
        }
        let mut de = serde_json::Deserializer::from_slice(&self.bytes);
        match PathSeed(path).deserialize(&mut de).and_then(|found| de.end().map(|()| found)) {
            Ok(found) => {
                let _ = self.json.set(true);
                found
            }
            Err(_) => {
                let _ = self.json.set(false);
                None
            }
        }
    }

    /// Whether the answer is JSON on one line: results take its bytes as
    /// they are instead of writing the value again.
    pub fn is_compact_json(&self) -> bool {
        self.is_json() && memchr::memchr2(b'\n', b'\r', &self.bytes).is_none()
    }

    /// The answer's bytes, taken out (copied only if they were borrowed).
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes.into_owned()
    }

    /// The answer as a value, taken out.
    pub fn into_value(self) -> Value {
        self.value();
        let value = self.value.into_inner().expect("just made");
        Arc::try_unwrap(value).unwrap_or_else(|shared| (*shared).clone())
    }
}

fn walk<'v>(mut value: &'v Value, path: &[Step]) -> Option<&'v Value> {
    for step in path {
        value = match (step, value) {
            (Step::Key(k), Value::Object(map)) => map.get(k)?,
            (Step::Index(i), Value::Array(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Reads a JSON document and keeps only the value at a path: everything
/// else is checked and skipped, never built.
struct PathSeed<'p>(&'p [Step]);

impl<'de> DeserializeSeed<'de> for PathSeed<'_> {
    type Value = Option<Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
        if self.0.is_empty() {
            return serde::Deserialize::deserialize(d).map(Some);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PathSeed<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    // A scalar where the path goes on: nothing there.
    fn visit_bool<E>(self, _: bool) -> Result<Option<Value>, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Option<Value>, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Option<Value>, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Option<Value>, E> {
        Ok(None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Option<Value>, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Option<Value>, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Value>, A::Error> {
        let (step, rest) = self.0.split_first().expect("a step");
        let want = match step {
            Step::Index(i) => Some(*i),
            Step::Key(_) => None,
        };
        let mut found = None;
        for i in 0.. {
            if want == Some(i) {
                match seq.next_element_seed(PathSeed(rest))? {
                    Some(v) => found = v,
                    None => break,
                }
            } else if seq.next_element_seed(Check)?.is_none() {
                break;
            }
        }
        Ok(found)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Value>, A::Error> {
        let (step, rest) = self.0.split_first().expect("a step");
        let want = match step {
            Step::Key(k) => Some(k.as_str()),
            Step::Index(_) => None,
        };
        let mut found = None;
        while let Some(matched) = map.next_key_seed(KeyIs(want))? {
            if matched {
                // A repeated key: the last one counts, as when parsed whole.
                found = map.next_value_seed(PathSeed(rest))?;
            } else {
                map.next_value_seed(Check)?;
            }
        }
        Ok(found)
    }
}

/// Reads a JSON value and builds nothing, with every check a parse into a
/// value makes (UTF-8, escapes, number range, nesting depth); serde's
/// `IgnoredAny` skips some of them.
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Check)?.is_some() {
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

/// A map key compared with the wanted one without being copied.
struct KeyIs<'k>(Option<&'k str>);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(self.0 == Some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(k: &str) -> Step {
        Step::Key(k.into())
    }

    #[test]
    fn paths_on_the_response_are_recognised_and_nothing_else() {
        assert_eq!(
            response_path("response.planStatus[0].status"),
            Some(vec![key("planStatus"), Step::Index(0), key("status")])
        );
        assert_eq!(response_path(" response['a b'][\"c\"] "), Some(vec![key("a b"), key("c")]));
        assert_eq!(response_path("response"), Some(vec![]));
        for other in ["response | length", "response.a == 1", "response_code", "response[-1]", "response.0", "row.a"] {
            assert_eq!(response_path(other), None, "{other}");
        }
    }

    #[test]
    fn a_lookup_finds_what_a_parsed_answer_holds() {
        let text = br#"{"a": [1, {"b": "x\"y", "c": null}], "a2": {"k": 1}, "d": 1.5e3, "a2": {"k": 2}}"#;
        let parsed: Value = serde_json::from_slice(text).unwrap();
        let paths: &[&[Step]] = &[
            &[key("a"), Step::Index(1), key("b")],
            &[key("a"), Step::Index(1), key("c")],
            &[key("a"), Step::Index(0)],
            &[key("a"), Step::Index(5)],
            &[key("a2"), key("k")],
            &[key("d")],
            &[key("d"), key("e")],
            &[key("missing")],
            &[Step::Index(0)],
            &[key("a")],
        ];
        for path in paths {
            let body = Body::new(text, text.len() as u64);
            assert_eq!(body.lookup(path), walk(&parsed, path).cloned(), "{path:?}");
            assert!(body.is_json());
        }
        assert_eq!(Body::new(text, text.len() as u64).lookup(&[key("a2"), key("k")]), Some(json!(2)));
    }

    #[test]
    fn text_broken_or_cut_answers_have_no_fields() {
        for (text, total) in
            [(&b"plain text"[..], 10), (br#"{"a": 1"#, 7), (br#"{"a": 1} x"#, 10), (br#"{"a": 1}"#, 99)]
        {
            let body = Body::new(text, total);
            assert_eq!(body.lookup(&[key("a")]), None, "{:?}", String::from_utf8_lossy(text));
            assert!(!body.is_json());
            assert!(!body.is_compact_json());
            assert_eq!(body.into_value(), Value::String(String::from_utf8_lossy(text).into_owned()));
        }
        let empty = Body::new(b"", 0);
        assert!(!empty.is_json());
        assert_eq!(empty.into_value(), Value::Null);
    }

    #[test]
    fn only_what_parses_as_a_value_counts_as_json() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        let cases: [&[u8]; 7] = [
            b"{\"a\":\"\xff\"}",
            br#"{"a":"\ud800"}"#,
            br#"{"a":1,"x":1e400}"#,
            deep.as_bytes(),
            br#"{"a":1,"x":[1,2,{"y":"\u00e9"}]}"#,
            br#"[1, -2, 3.5e-3, true, null, "x"]"#,
            b"{\"a\":1}\n",
        ];
        for text in cases {
            let parses = serde_json::from_slice::<Value>(text).is_ok();
            let body = Body::new(text, text.len() as u64);
            assert_eq!(body.is_json(), parses, "{}", String::from_utf8_lossy(text));
            let body = Body::new(text, text.len() as u64);
            let expected = serde_json::from_slice::<Value>(text).ok().and_then(|v| walk(&v, &[key("a")]).cloned());
            assert_eq!(body.lookup(&[key("a")]), expected, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn json_on_one_line_is_kept_as_it_came() {
        let one = br#"{"a":1}"#;
        let body = Body::new(&one[..], 7);
        assert!(body.is_compact_json());
        assert_eq!(body.into_bytes(), one);
        let pretty = b"{\n  \"a\": 1\n}";
        let body = Body::new(pretty, pretty.len() as u64);
        assert!(!body.is_compact_json());
        assert_eq!(body.into_value(), json!({"a": 1}));
    }
}
