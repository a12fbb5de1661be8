//! JSON: an array of objects, streamed one element at a time. JSON Lines:
//! one object per line, blank lines skipped. Values keep their JSON types.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{
    BadRow, Earlier, FAILURE_COLUMNS, InputError, InputSpec, Item, Origin, RAW_FIELD, RECORD_FIELD, Raw, Record, Row,
    SOURCE_COLUMNS,
};

/// A byte cursor over a buffered file that knows its line and column.
struct Cursor<R> {
    r: R,
    line: u64,
    column: u64,
    bytes: u64,
}

impl<R: BufRead> Cursor<R> {
    fn new(r: R) -> Self {
        Cursor { r, line: 1, column: 1, bytes: 0 }
    }

    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        Ok(self.r.fill_buf()?.first().copied())
    }

    fn bump(&mut self, b: u8) {
        self.r.consume(1);
        self.bytes += 1;
        if b == b'\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
    }

    fn next(&mut self) -> std::io::Result<Option<u8>> {
        let b = self.peek()?;
        if let Some(b) = b {
            self.bump(b);
        }
        Ok(b)
    }

    /// Skips whitespace and returns the next byte without consuming it.
    fn skip_ws(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            match self.peek()? {
                Some(b @ (b' ' | b'\t' | b'\r' | b'\n')) => self.bump(b),
                Some(0xEF) if self.bytes == 0 => {
                    // A UTF-8 byte order mark at the start of the file.
                    for _ in 0..3 {
                        if let Some(b) = self.peek()? {
                            self.bump(b);
                        }
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Copies one JSON value into `buf` by matching brackets and quotes;
    /// parsing is left to serde_json. Returns `false` at end of file inside
    /// the value.
    fn take_value(&mut self, buf: &mut Vec<u8>) -> std::io::Result<bool> {
        buf.clear();
        let (mut depth, mut in_string, mut escape) = (0u32, false, false);
        match self.peek()? {
            Some(b'{' | b'[' | b'"') => loop {
                let Some(b) = self.next()? else { return Ok(false) };
                buf.push(b);
                if in_string {
                    match (escape, b) {
                        (true, _) => escape = false,
                        (false, b'\\') => escape = true,
                        (false, b'"') => in_string = false,
                        _ => {}
                    }
                } else {
                    match b {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => depth = depth.saturating_sub(1),
                        _ => {}
                    }
                }
                if depth == 0 && !in_string {
                    return Ok(true);
                }
            },
            _ => loop {
                match self.peek()? {
                    None | Some(b',' | b']' | b'}' | b' ' | b'\t' | b'\r' | b'\n') => return Ok(true),
                    Some(b) => {
                        self.bump(b);
                        buf.push(b);
                    }
                }
            },
        }
    }
}

fn open(file: Box<dyn Read>) -> Cursor<BufReader<Box<dyn Read>>> {
    Cursor::new(BufReader::with_capacity(256 * 1024, file))
}

fn io_error(spec: &InputSpec, source: std::io::Error) -> InputError {
    InputError::Open { path: spec.path.clone(), source }
}

pub(super) fn preflight(spec: &InputSpec, file: Box<dyn Read>) -> Result<(), InputError> {
    let mut cur = open(file);
    let err = |message: &str| InputError::Format { path: spec.path.clone(), message: message.into() };
    let first = cur.skip_ws().map_err(|e| io_error(spec, e))?;
    match (spec.format, first) {
        (_, None) => Err(err("the file is empty")),
        (super::Format::Json, Some(b'[')) => {
            cur.bump(b'[');
            match cur.skip_ws().map_err(|e| io_error(spec, e))? {
                Some(b']') => Err(err("the array is empty: there are no rows to send")),
                _ => {
                    let file = super::source::open(spec)?.reader;
                    scan_array(spec, file)
                }
            }
        }
        (super::Format::Json, Some(_)) => Err(err(
            "a .json input must be an array of objects ([{...}, {...}]); for one object per line, name the file .jsonl",
        )),
        _ => Ok(()),
    }
}

/// A JSON array of objects, one element at a time.
pub(super) fn read_array(
    input: usize,
    spec: &InputSpec,
    file: Box<dyn Read>,
    progress: &dyn Fn(u64),
    sink: &mut dyn FnMut(Item) -> bool,
) -> Result<bool, InputError> {
    let mut number = 0u64;
    walk_array(spec, file, &mut |line, column, text, bytes| {
        number += 1;
        if number.is_multiple_of(64) {
            progress(bytes);
        }
        sink(parse_object(input, number, line, column, text))
    })
    .map(|read| match read {
        Some(bytes) => {
            progress(bytes);
            true
        }
        None => false,
    })
}

/// Checks a whole JSON array's structure without parsing its elements, so
/// a file cut short stops the run before anything is sent.
pub(super) fn scan_array(spec: &InputSpec, file: Box<dyn Read>) -> Result<(), InputError> {
    walk_array(spec, file, &mut |_, _, _, _| true).map(|_| ())
}

/// Called with an element's line, column and text, and the bytes read so far.
type OnElement<'a> = dyn FnMut(u64, u64, &[u8], u64) -> bool + 'a;

/// Walks the elements of a JSON array, handing each one's line, column,
/// text and the bytes read so far to `element`, which returns `false` to
/// stop. Returns the bytes read, or `None` when stopped.
fn walk_array(spec: &InputSpec, file: Box<dyn Read>, element: &mut OnElement<'_>) -> Result<Option<u64>, InputError> {
    let mut cur = open(file);
    let at = |cur: &Cursor<_>, message: String| InputError::At {
        path: spec.path.clone(),
        line: cur.line,
        column: cur.column,
        message,
    };
    match cur.skip_ws().map_err(|e| io_error(spec, e))? {
        Some(b'[') => cur.bump(b'['),
        _ => return Err(at(&cur, "expected `[`: a .json input must be an array of objects".into())),
    }
    let mut buf = Vec::with_capacity(4096);
    if cur.skip_ws().map_err(|e| io_error(spec, e))? == Some(b']') {
        cur.bump(b']');
    } else {
        loop {
            cur.skip_ws().map_err(|e| io_error(spec, e))?;
            let (line, column) = (cur.line, cur.column);
            if !cur.take_value(&mut buf).map_err(|e| io_error(spec, e))? {
                return Err(InputError::At {
                    path: spec.path.clone(),
                    line,
                    column,
                    message: "the file ends inside the element that starts here (is it cut short?)".into(),
                });
            }
            if buf.is_empty() {
                return Err(at(&cur, "expected an object".into()));
            }
            if !element(line, column, &buf, cur.bytes) {
                return Ok(None);
            }
            match cur.skip_ws().map_err(|e| io_error(spec, e))? {
                Some(b',') => cur.bump(b','),
                Some(b']') => {
                    cur.bump(b']');
                    break;
                }
                None => return Err(at(&cur, "the file ends before the array's closing `]` (is it cut short?)".into())),
                Some(b) => {
                    return Err(at(
                        &cur,
                        format!("expected `,` or `]` after the element on line {line}, found `{}`", b as char),
                    ));
                }
            }
            if cur.skip_ws().map_err(|e| io_error(spec, e))? == Some(b']') {
                return Err(at(&cur, "a trailing comma before `]` is not JSON".into()));
            }
        }
    }
    if cur.skip_ws().map_err(|e| io_error(spec, e))?.is_some() {
        return Err(at(&cur, "unexpected data after the array's closing `]`".into()));
    }
    Ok(Some(cur.bytes))
}

fn parse_object(input: usize, number: u64, line: u64, column: u64, text: &[u8]) -> Item {
    let bad = |message: String| BadRow {
        input,
        number,
        line,
        message,
        raw: Raw::Text(String::from_utf8_lossy(text).into_owned()),
        earlier: None,
    };
    match serde_json::from_slice::<Value>(text) {
        // A line of a failures file bulkcall wrote (it has all six failure
        // fields): those are not the record's. Elsewhere `_key` is a field like any.
        Ok(Value::Object(mut map)) if FAILURE_COLUMNS.iter().all(|c| map.contains_key(*c)) => {
            let columns = FAILURE_COLUMNS.map(|c| map.shift_remove(c).unwrap_or(Value::Null));
            let text_of = |v: &Value| match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let texts = columns.each_ref().map(text_of);
            let mut earlier = Earlier::from_columns(texts.each_ref().map(String::as_str));
            // A failures file of a failures file: where the record first came from.
            if SOURCE_COLUMNS.iter().any(|c| map.contains_key(*c)) {
                let sources = SOURCE_COLUMNS.map(|c| map.shift_remove(c).unwrap_or(Value::Null));
                earlier.origin =
                    Some(Origin::from_columns(sources.each_ref().map(text_of).each_ref().map(String::as_str)));
            }
            let earlier = Some(Box::new(earlier));
            let only = |map: &Map<String, Value>, name: &str| map.len() == 1 && map.contains_key(name);
            if only(&map, RECORD_FIELD)
                && let Some(Value::Object(record)) = map.shift_remove(RECORD_FIELD)
            {
                // A record whose own fields have the names bulkcall adds.
                return Ok(Row { input, number, line, record: Record::Json(record), earlier });
            }
            if only(&map, RAW_FIELD)
                && let Some(Value::String(raw)) = map.shift_remove(RAW_FIELD)
            {
                // A row that was not JSON when it failed: read what it was again.
                return match parse_object(input, number, line, column, raw.as_bytes()) {
                    Ok(row) => Ok(Row { earlier, ..row }),
                    Err(bad) => Err(BadRow { earlier, ..bad }),
                };
            }
            Ok(Row { input, number, line, record: Record::Json(map), earlier })
        }
        // A line of a results file: its fields stay the record's, and it
        // keeps where it first came from.
        Ok(Value::Object(map)) if is_result(&map) => {
            let number_of = |name: &str| map.get(name).and_then(Value::as_u64);
            let origin = map.get("source_row").map(|row| Origin {
                row: row.as_u64(),
                run: map.get("source_run").and_then(Value::as_str).map(Arc::from),
                input: number_of("source_input").map(|i| i as usize),
            });
            let earlier = Earlier {
                row: number_of("row"),
                status: number_of("status").and_then(|s| u16::try_from(s).ok()),
                input: number_of("input_index").map(|i| i as usize),
                origin,
                ..Earlier::default()
            };
            Ok(Row { input, number, line, record: Record::Json(map), earlier: Some(Box::new(earlier)) })
        }
        Ok(Value::Object(map)) => Ok(Row { input, number, line, record: Record::Json(map), earlier: None }),
        Ok(other) => Err(bad(format!("line {line}: expected an object, found {}", kind(&other)))),
        Err(e) => {
            let (l, c) = (
                line + e.line() as u64 - 1,
                if e.line() == 1 { column + e.column() as u64 - 1 } else { e.column() as u64 },
            );
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg);
            Err(bad(format!("line {l} column {c}: {msg}")))
        }
    }
}

/// Whether a line is one of a `results.jsonl` bulkcall wrote: it has every
/// field a result always has.
fn is_result(map: &Map<String, Value>) -> bool {
    map.get("row").is_some_and(Value::is_u64)
        && map.get("key").is_some_and(Value::is_string)
        && map.get("attempts").is_some_and(Value::is_u64)
        && map.get("latency_ms").is_some_and(Value::is_u64)
        && ["status", "response"].iter().all(|k| map.contains_key(*k))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// JSON Lines: one object per line; blank lines are skipped and not counted.
pub(super) fn read_lines(
    input: usize,
    spec: &InputSpec,
    file: Box<dyn Read>,
    progress: &dyn Fn(u64),
    sink: &mut dyn FnMut(Item) -> bool,
) -> Result<bool, InputError> {
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut buf = Vec::with_capacity(4096);
    let (mut line, mut number, mut bytes) = (0u64, 0u64, 0u64);
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| io_error(spec, e))?;
        if n == 0 {
            break;
        }
        line += 1;
        bytes += n as u64;
        let mut text = buf.trim_ascii();
        if line == 1 {
            text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
        }
        if text.is_empty() {
            continue;
        }
        number += 1;
        if number.is_multiple_of(64) {
            progress(bytes);
        }
        if !sink(parse_object(input, number, line, 1, text)) {
            return Ok(false);
        }
    }
    progress(bytes);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::{Format, read_all};
    use super::*;
    use std::io::Write;

    fn read_text(text: &str, format: Format) -> (Vec<Item>, Result<(), InputError>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let spec =
            InputSpec { path: f.path().to_path_buf(), format, delimiter: b',', encoding: super::super::Encoding::Utf8 };
        let mut items = vec![];
        let result = read_all(&[spec], &|_| {}, &mut |item| {
            items.push(item);
            true
        });
        (items, result)
    }

    #[test]
    fn array_elements_keep_their_types_and_lines() {
        let text =
            "[\n  {\"id\": 1, \"nested\": {\"a\": [1, 2.5, \"x]\"]}, \"ok\": true},\n  {\"id\": \"two\\\"}\"}\n]\n";
        let (items, result) = read_text(text, Format::Json);
        result.unwrap();
        let first = items[0].as_ref().unwrap();
        let Record::Json(map) = &first.record else { panic!("json record") };
        assert_eq!(map["id"], 1);
        assert_eq!(map["nested"]["a"][1], 2.5);
        assert_eq!(map["ok"], true);
        assert_eq!((first.number, first.line), (1, 2));
        let second = items[1].as_ref().unwrap();
        assert_eq!((second.number, second.line), (2, 3));
        assert_eq!(second.record.get("id").unwrap(), "two\"}");
    }

    #[test]
    fn a_bad_element_fails_alone_but_a_cut_file_stops() {
        let (items, result) = read_text("[{\"a\": 1}, {\"a\": tru}, 7, {\"a\": 3}]", Format::Json);
        result.unwrap();
        assert_eq!(items.len(), 4);
        assert!(items[1].as_ref().unwrap_err().message.contains("line 1 column"), "{:?}", items[1]);
        assert!(items[2].as_ref().unwrap_err().message.contains("expected an object, found a number"));
        assert!(items[3].is_ok());

        let (items, result) = read_text("[{\"a\": 1},\n {\"a\": 2", Format::Json);
        assert_eq!(items.len(), 1);
        let err = result.unwrap_err().to_string();
        assert!(err.contains(":2:2:") && err.contains("cut short"), "{err}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"[{\"a\": 1},\n {\"a\": 2").unwrap();
        let spec = InputSpec {
            path: f.path().to_path_buf(),
            format: Format::Json,
            delimiter: b',',
            encoding: super::super::Encoding::Utf8,
        };
        let err = super::super::preflight(&[spec]).unwrap_err().to_string();
        assert!(err.contains("cut short"), "the preflight finds it before anything is sent: {err}");

        let (_, result) = read_text("[{\"a\": 1} {\"a\": 2}]", Format::Json);
        assert!(result.unwrap_err().to_string().contains("expected `,` or `]`"));
    }

    #[test]
    fn json_lines_skip_blank_lines_and_report_bad_lines() {
        let (items, result) = read_text("{\"a\": 1}\n\n  \r\n{\"a\": }\n{\"a\": {\"b\": [true]}}\n", Format::Jsonl);
        result.unwrap();
        assert_eq!(items.len(), 3);
        let bad = items[1].as_ref().unwrap_err();
        assert_eq!((bad.number, bad.line), (2, 4));
        assert!(bad.message.starts_with("line 4 column"), "{}", bad.message);
        let last = items[2].as_ref().unwrap();
        assert_eq!((last.number, last.line), (3, 5));
        assert_eq!(last.record.get("a").unwrap()["b"][0], true);
    }

    #[test]
    fn failure_fields_are_dropped_only_from_a_failures_file() {
        const SIX: &str =
            r#""_row": 3, "_key": "k", "_error": "client_error", "_status": 400, "_attempts": 1, "_message": "x""#;
        let text = [
            format!(r#"{{"id": 1, {SIX}}}"#),
            r#"{"id": 2, "_key": "a real field", "_row": 9}"#.to_string(),
            format!(r#"{{"_raw": "{{\"id\": 3}}", {SIX}}}"#),
            format!(r#"{{"_raw": "{{\"id\": tru", {SIX}}}"#),
        ]
        .join("\n");
        let (items, _) = read_text(&text, Format::Jsonl);
        let keys = |i: usize| match &items[i].as_ref().unwrap().record {
            Record::Json(map) => map.keys().cloned().collect::<Vec<_>>(),
            Record::Csv { .. } => panic!("json"),
        };
        assert_eq!(keys(0), ["id"], "a failures line: the six added fields go");
        assert_eq!(keys(1), ["id", "_key", "_row"], "not a failures line: every field stays");
        assert_eq!(items[2].as_ref().unwrap().record.get("id").unwrap(), 3, "`_raw` is read again");
        let bad = items[3].as_ref().unwrap_err();
        assert!(matches!(&bad.raw, Raw::Text(t) if t == r#"{"id": tru"#), "fails again, keeping its text: {bad:?}");
    }

    #[test]
    fn a_line_keeps_where_it_first_came_from() {
        const SIX: &str =
            r#""_row": 3, "_key": "k", "_error": "client_error", "_status": 400, "_attempts": 1, "_message": "x""#;
        let text = [
            // A failures line of a failures file: the source fields go too.
            format!(r#"{{"id": 1, "source_row": 7, "source_run": "/runs/a", "source_input": 2, {SIX}}}"#),
            // A failures line of a first run: its own row, its file's run (none here).
            format!(r#"{{"id": 2, {SIX}}}"#),
            // A line that did not read as JSON, from a failures file of a failures file.
            format!(r#"{{"_raw": "{{\"id\": tru", "source_row": 8, "source_run": null, {SIX}}}"#),
            // Results, of a first run and of a resend: every field stays.
            r#"{"row": 4, "key": "k4", "status": 200, "attempts": 1, "latency_ms": 3, "response": {}}"#.into(),
            r#"{"row": 5, "key": "k5", "source_row": 9, "source_run": "/runs/a", "status": 200, "attempts": 1, "latency_ms": 3, "response": "ok"}"#.into(),
            r#"{"row": 7, "key": "k7", "input": "b.csv", "input_index": 1, "status": 200, "attempts": 1, "latency_ms": 3, "response": "ok"}"#.into(),
            // Not results: a field is missing.
            r#"{"row": 6, "key": "k6", "status": 200, "attempts": 1, "response": "ok"}"#.into(),
        ]
        .join("\n");
        let (items, _) = read_text(&text, Format::Jsonl);
        let origin = |i: usize| {
            let earlier = match &items[i] {
                Ok(row) => row.earlier.as_deref(),
                Err(bad) => bad.earlier.as_deref(),
            };
            earlier.and_then(|e| e.origin.clone())
        };
        let at = |row: u64, run: Option<&str>| Some(Origin { row: Some(row), run: run.map(Arc::from), input: None });
        assert_eq!(origin(0), Some(Origin { input: Some(2), ..at(7, Some("/runs/a")).unwrap() }));
        assert_eq!(items[0].as_ref().unwrap().record.to_json().keys().collect::<Vec<_>>(), ["id"]);
        assert_eq!(origin(1), at(3, None));
        assert!(items[2].is_err(), "still not JSON");
        assert_eq!(origin(2), at(8, None));
        assert_eq!(origin(3), at(4, None));
        assert_eq!(items[3].as_ref().unwrap().record.to_json().len(), 6, "a result's fields are its record's");
        assert_eq!(origin(4), at(9, Some("/runs/a")));
        assert_eq!(origin(5), Some(Origin { input: Some(1), ..at(7, None).unwrap() }), "its input, from the line");
        assert_eq!(origin(6), None);
    }

    #[test]
    fn not_an_array_is_a_file_error() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"{\"a\": 1}\n").unwrap();
        let spec = InputSpec {
            path: f.path().to_path_buf(),
            format: Format::Json,
            delimiter: b',',
            encoding: super::super::Encoding::Utf8,
        };
        let err = super::super::preflight(&[spec]).unwrap_err().to_string();
        assert!(err.contains("array of objects") && err.contains(".jsonl"), "{err}");
    }
}
