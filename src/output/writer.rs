//! The outcome files: `results.jsonl` (and `results.csv`), each input's
//! failures file, and a dry run's `requests.jsonl`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{OutputError, Records, create_file, io, open_file, sync};
use crate::input::{CsvHeaders, FAILURE_COLUMNS, Format, Origin, RAW_FIELD, RECORD_FIELD, Raw, Record, SOURCE_COLUMNS};
use crate::outcome::{Outcome, Source};

/// What the writer needs to know about each input.
#[derive(Debug, Clone)]
pub struct InputInfo {
    /// The file name, for humans (two inputs may share it).
    pub name: String,
    /// The name of the input's own failures file in the run directory.
    pub failures: String,
}

/// The failures file of each input (path, format, delimiter):
/// `failures.csv` (CSV inputs; `failures.tsv` for a tab-separated one, so
/// it reads back with tabs when fed back) or
/// `failures.jsonl` (JSON and JSON Lines inputs) for the first input of
/// that kind, `failures.<stem>.<ext>` for the others, with `-2`, `-3`, …
/// added to the stem when an earlier input took that name. No two inputs
/// share a file, so a failure line belongs to exactly one input.
pub fn failure_file_names(inputs: &[(PathBuf, Format, u8)]) -> Vec<String> {
    let mut taken = std::collections::HashSet::new();
    inputs
        .iter()
        .map(|(path, format, delimiter)| {
            let ext = match (format, delimiter) {
                (Format::Csv, b'\t') => "tsv",
                (Format::Csv, _) => "csv",
                _ => "jsonl",
            };
            let stem = path.file_stem().map_or_else(|| "input".into(), |s| s.to_string_lossy().into_owned());
            let name = std::iter::once(format!("failures.{ext}"))
                .chain(std::iter::once(format!("failures.{stem}.{ext}")))
                .chain((2..).map(|n| format!("failures.{stem}-{n}.{ext}")))
                .find(|name| !taken.contains(name))
                .expect("a free name");
            taken.insert(name.clone());
            name
        })
        .collect()
}

/// An outcome file: lines gathered, handed to the operating system, then
/// made durable.
trait OutcomeFile {
    fn flush(&mut self) -> Result<(), OutputError>;
    fn sync(&mut self) -> Result<(), OutputError>;
}

/// A JSON Lines file written one whole line at a time, straight to the
/// operating system.
struct Lines {
    path: PathBuf,
    file: File,
    /// Whole lines not yet handed to the operating system.
    pending: Vec<u8>,
    /// Lines handed to the operating system since the last sync.
    unsynced: bool,
}

impl Lines {
    fn open(path: PathBuf, append: bool) -> Result<Lines, OutputError> {
        Ok(Lines {
            file: open_file(&path, append, Records::Lines)?,
            path,
            pending: Vec::with_capacity(64 * 1024),
            unsynced: false,
        })
    }

    fn write(&mut self, value: &impl Serialize) -> Result<(), OutputError> {
        serde_json::to_writer(&mut self.pending, value).expect("serializable");
        self.pending.push(b'\n');
        Ok(())
    }

    /// Writes `value` (an object) with one more field whose value is the
    /// JSON text `raw`, spliced in as it is.
    fn write_with(&mut self, value: &impl Serialize, name: &str, raw: &[u8]) -> Result<(), OutputError> {
        serde_json::to_writer(&mut self.pending, value).expect("serializable");
        debug_assert_eq!(self.pending.last(), Some(&b'}'));
        self.pending.pop();
        self.pending.push(b',');
        serde_json::to_writer(&mut self.pending, name).expect("a string serializes");
        self.pending.push(b':');
        self.pending.extend_from_slice(raw);
        self.pending.extend_from_slice(b"}\n");
        Ok(())
    }
}

impl OutcomeFile for Lines {
    fn flush(&mut self) -> Result<(), OutputError> {
        self.unsynced |= flush_pending(&mut self.file, &mut self.pending, &self.path)?;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), OutputError> {
        if std::mem::take(&mut self.unsynced) {
            sync(&self.file, &self.path).map_err(io(&self.path))?;
        }
        Ok(())
    }
}

/// Writes what is pending; true if there was anything. What a failed
/// write did hand over (a disk that filled up in the middle of a group)
/// leaves `pending` all the same, so a later flush goes on after it
/// instead of writing it twice, which would leave a line cut short in
/// the middle of the file.
fn flush_pending(file: &mut impl Write, pending: &mut Vec<u8>, path: &Path) -> Result<bool, OutputError> {
    if pending.is_empty() {
        return Ok(false);
    }
    let mut written = 0;
    let result = loop {
        match file.write(&pending[written..]) {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) if written + n == pending.len() => break Ok(()),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(()) => pending.clear(),
        Err(e) => {
            pending.drain(..written);
            return Err(io(path)(e));
        }
    }
    Ok(true)
}

/// A CSV file written one whole record at a time.
struct CsvFile {
    path: PathBuf,
    file: File,
    /// Whole records not yet handed to the operating system.
    record: Vec<u8>,
    /// The input's delimiter for a failures file, so it reads back as the input did.
    delimiter: u8,
    /// A failures CSV whose header has the source columns before the six:
    /// every record gets them, so the columns stay aligned.
    sources: bool,
    /// Records handed to the operating system since the last sync.
    unsynced: bool,
}

impl CsvFile {
    /// Opens the file and writes its header, unless resuming a file that has one.
    fn open<'a>(
        path: PathBuf,
        header: impl IntoIterator<Item = &'a [u8]>,
        append: bool,
    ) -> Result<CsvFile, OutputError> {
        let has_header = append && std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        let mut this = CsvFile {
            file: open_file(&path, append, Records::Csv)?,
            path,
            record: Vec::with_capacity(1024),
            delimiter: b',',
            sources: false,
            unsynced: false,
        };
        if !has_header {
            this.write(header)?;
        }
        Ok(this)
    }

    /// A failures CSV: the input's columns, then the six failure columns,
    /// with the input's delimiter; the input being a failures file, the two
    /// source columns before the six.
    fn failures(path: PathBuf, headers: &CsvHeaders, append: bool) -> Result<CsvFile, OutputError> {
        let has_header = append && std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        // Resuming, the header on file decides (an earlier session wrote it).
        let sources = match has_header {
            true => has_source_columns(&path, headers.delimiter()).unwrap_or(headers.is_failures()),
            false => headers.is_failures(),
        };
        let mut this = CsvFile {
            file: open_file(&path, append, Records::Csv)?,
            path,
            record: Vec::with_capacity(1024),
            delimiter: headers.delimiter(),
            sources,
            unsynced: false,
        };
        if !has_header {
            let own = SOURCE_COLUMNS.iter().filter(|_| sources).chain(&FAILURE_COLUMNS).map(|c| c.as_bytes());
            this.write(headers.names().iter().map(String::as_bytes).chain(own))?;
        }
        Ok(this)
    }

    fn write<'a>(&mut self, fields: impl IntoIterator<Item = &'a [u8]>) -> Result<(), OutputError> {
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .delimiter(self.delimiter)
            .from_writer(std::mem::take(&mut self.record));
        let written = w.write_record(fields).map_err(std::io::Error::other);
        self.record = w.into_inner().map_err(|e| std::io::Error::other(e.to_string())).map_err(io(&self.path))?;
        written.map_err(io(&self.path))
    }
}

impl OutcomeFile for CsvFile {
    fn flush(&mut self) -> Result<(), OutputError> {
        self.unsynced |= flush_pending(&mut self.file, &mut self.record, &self.path)?;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), OutputError> {
        if std::mem::take(&mut self.unsynced) {
            sync(&self.file, &self.path).map_err(io(&self.path))?;
        }
        Ok(())
    }
}

/// One line of `results.jsonl`.
#[derive(Serialize)]
struct ResultLine<'a> {
    row: u64,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a str>,
    /// The input's position in run.json's `inputs` (from 0): the file name
    /// alone may be shared by inputs in different folders.
    #[serde(skip_serializing_if = "Option::is_none")]
    input_index: Option<usize>,
    /// The input was a failures file (or results): the row in the first
    /// run's input, that run's directory, and with several inputs there
    /// the input's place in its `run.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    source_row: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_run: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_input: Option<usize>,
    status: Option<u16>,
    attempts: u32,
    latency_ms: u64,
    /// Left out when the raw answer is spliced in after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_truncated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    capture: &'a Map<String, Value>,
    /// A row polled to its end: the last poll's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    poll: Option<&'a crate::outcome::Polled>,
}

/// Writes outcomes as they arrive.
pub struct Writer {
    dir: PathBuf,
    /// Resuming: files are appended to, CSV headers not repeated.
    append: bool,
    inputs: Vec<InputInfo>,
    /// Created on first use in dry runs, which write no results.
    results: Option<Lines>,
    /// Each input's failures file, by input index, opened on first use
    /// (named by [`failure_file_names`]).
    failures: HashMap<usize, FailureFile>,
    /// `results.csv` and the captures it has columns for, when asked for.
    results_csv: Option<(CsvFile, Vec<String>)>,
}

impl Writer {
    /// Opens the outcome files of `dir`; `results` creates `results.jsonl`
    /// now, even if no row succeeds.
    pub fn open(
        dir: &Path,
        inputs: Vec<InputInfo>,
        append: bool,
        results: bool,
        results_csv: Option<Vec<String>>,
    ) -> Result<Writer, OutputError> {
        let results_csv = match results_csv {
            Some(captures) => {
                let columns = ["row", "key", "status", "attempts", "latency_ms"].into_iter().map(str::as_bytes);
                let columns = columns.chain(captures.iter().map(String::as_bytes));
                Some((CsvFile::open(dir.join("results.csv"), columns, append)?, captures))
            }
            None => None,
        };
        Ok(Writer {
            results_csv,
            dir: dir.to_path_buf(),
            append,
            inputs,
            results: if results { Some(Lines::open(dir.join("results.jsonl"), append)?) } else { None },
            failures: HashMap::new(),
        })
    }

    pub fn record(&mut self, outcome: &Outcome) -> Result<(), OutputError> {
        match &outcome.result {
            Ok(success) => {
                let line = ResultLine {
                    row: outcome.number,
                    key: &outcome.key,
                    input: (self.inputs.len() > 1).then(|| self.inputs[outcome.input].name.as_str()),
                    input_index: (self.inputs.len() > 1).then_some(outcome.input),
                    source_row: outcome.origin.as_ref().and_then(|o| o.row),
                    source_run: outcome.origin.as_ref().and_then(|o| o.run.as_deref()),
                    source_input: outcome.origin.as_ref().and_then(|o| o.input),
                    status: outcome.status,
                    attempts: outcome.attempts,
                    latency_ms: outcome.latency.as_millis() as u64,
                    response: success.raw.is_none().then_some(&success.response),
                    response_truncated: success.truncated.map(|_| true),
                    response_bytes: success.truncated,
                    capture: &success.captured,
                    poll: outcome.poll.as_deref(),
                };
                if self.results.is_none() {
                    self.results = Some(Lines::open(self.dir.join("results.jsonl"), self.append)?);
                }
                let results = self.results.as_mut().expect("just opened");
                match &success.raw {
                    Some(raw) => results.write_with(&line, "response", raw)?,
                    None => results.write(&line)?,
                }
                if let Some((file, captures)) = &mut self.results_csv {
                    let text = |v: Option<&Value>| match v {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                    };
                    let fixed = [
                        outcome.number.to_string(),
                        outcome.key.clone(),
                        outcome.status.map(|s| s.to_string()).unwrap_or_default(),
                        outcome.attempts.to_string(),
                        line.latency_ms.to_string(),
                    ];
                    let captured: Vec<String> = captures.iter().map(|c| text(success.captured.get(c))).collect();
                    file.write(fixed.iter().chain(&captured).map(String::as_bytes))?;
                }
                Ok(())
            }
            Err(failure) => {
                let status = outcome.status.map(|s| s.to_string()).unwrap_or_default();
                let attempts = outcome.attempts.to_string();
                let row = outcome.number.to_string();
                // One line, whatever the message quotes: a record of a
                // failures CSV ends with it, and resume finds its end so.
                let message = failure.message.replace(['\r', '\n'], " ");
                let errors = [
                    row.as_str(),
                    outcome.key.as_str(),
                    failure.kind.as_str(),
                    status.as_str(),
                    attempts.as_str(),
                    message.as_str(),
                ];
                // A failures CSV of a failures file has the source
                // columns; they are empty when not known.
                let origin = outcome.origin.as_ref();
                let source_row = origin.and_then(|o| o.row).map(|r| r.to_string()).unwrap_or_default();
                let source_run = origin.and_then(|o| o.run.as_deref()).unwrap_or_default();
                let source_input = origin.and_then(|o| o.input).map(|i| i.to_string()).unwrap_or_default();
                let sources = [source_row.as_str(), source_run, source_input.as_str()];
                let own = |with_sources: bool| {
                    let sources = if with_sources { &sources[..] } else { &[] };
                    sources.iter().chain(&errors).map(|c| c.as_bytes())
                };
                match &outcome.source {
                    Source::Record(Record::Csv { headers, values }) => {
                        let file = self.csv_file(outcome.input, headers)?;
                        let own = own(file.sources);
                        file.write(values.iter().map(String::as_bytes).chain(own))
                    }
                    Source::Raw(Raw::Csv { headers, values }) => {
                        let values = aligned(values, headers.names().len(), headers.delimiter());
                        let file = self.csv_file(outcome.input, headers)?;
                        let own = own(file.sources);
                        file.write(values.iter().map(|v| v.as_ref()).chain(own))
                    }
                    Source::Record(Record::Json(record)) => {
                        // A record with fields of the names bulkcall adds
                        // goes whole under `_record`: none is overwritten.
                        let reserved = |name: &String| {
                            FAILURE_COLUMNS.contains(&name.as_str())
                                || SOURCE_COLUMNS.contains(&name.as_str())
                                || name == RAW_FIELD
                                || name == RECORD_FIELD
                        };
                        let mut map = if record.keys().any(reserved) {
                            Map::from_iter([(RECORD_FIELD.to_string(), Value::Object(record.clone()))])
                        } else {
                            record.clone()
                        };
                        add_source_fields(&mut map, outcome.origin.as_ref());
                        add_error_fields(&mut map, &errors, outcome.status, outcome.attempts);
                        self.jsonl_file(outcome.input)?.write(&map)
                    }
                    Source::Raw(Raw::Text(text)) => {
                        let mut map = Map::new();
                        map.insert(RAW_FIELD.into(), Value::String(text.clone()));
                        add_source_fields(&mut map, outcome.origin.as_ref());
                        add_error_fields(&mut map, &errors, outcome.status, outcome.attempts);
                        self.jsonl_file(outcome.input)?.write(&map)
                    }
                }
            }
        }
    }

    fn jsonl_file(&mut self, input: usize) -> Result<&mut Lines, OutputError> {
        if !self.failures.contains_key(&input) {
            let path = self.dir.join(&self.inputs[input].failures);
            self.failures.insert(input, FailureFile::Jsonl(Lines::open(path, self.append)?));
        }
        if !matches!(self.failures.get(&input), Some(FailureFile::Jsonl(_))) {
            return Err(self.mixed(input));
        }
        match self.failures.get_mut(&input) {
            Some(FailureFile::Jsonl(file)) => Ok(file),
            _ => unreachable!("checked above"),
        }
    }

    fn csv_file(&mut self, input: usize, headers: &Arc<CsvHeaders>) -> Result<&mut CsvFile, OutputError> {
        if !self.failures.contains_key(&input) {
            let path = self.dir.join(&self.inputs[input].failures);
            self.failures.insert(input, FailureFile::Csv(CsvFile::failures(path, headers, self.append)?));
        }
        if !matches!(self.failures.get(&input), Some(FailureFile::Csv(_))) {
            return Err(self.mixed(input));
        }
        match self.failures.get_mut(&input) {
            Some(FailureFile::Csv(file)) => Ok(file),
            _ => unreachable!("checked above"),
        }
    }

    /// An input's readers gave both CSV and JSON records (a bug).
    fn mixed(&self, input: usize) -> OutputError {
        let path = self.dir.join(&self.inputs[input].failures);
        OutputError::Io { path, source: std::io::Error::other("CSV and JSON failures of one input") }
    }

    /// Hands every recorded line to the operating system: one `write` per
    /// file. An outcome counts as recorded once this returns.
    pub fn flush(&mut self) -> Result<(), OutputError> {
        self.each_file(|f| f.flush())
    }

    /// Makes every line flushed so far durable: one `fdatasync` per file
    /// written to since the last call.
    pub fn sync(&mut self) -> Result<(), OutputError> {
        self.each_file(|f| f.sync())
    }

    /// Calls `act` on every outcome file open.
    fn each_file(
        &mut self,
        mut act: impl FnMut(&mut dyn OutcomeFile) -> Result<(), OutputError>,
    ) -> Result<(), OutputError> {
        if let Some(f) = &mut self.results {
            act(f)?;
        }
        if let Some((f, _)) = &mut self.results_csv {
            act(f)?;
        }
        for f in self.failures.values_mut() {
            match f {
                FailureFile::Csv(f) => act(f)?,
                FailureFile::Jsonl(f) => act(f)?,
            }
        }
        Ok(())
    }

    /// The failures files written this session, by input index, for the
    /// closing lines.
    pub fn failure_files(&self) -> Vec<(usize, PathBuf)> {
        let mut files: Vec<(usize, PathBuf)> = self
            .failures
            .iter()
            .map(|(&input, f)| match f {
                FailureFile::Csv(f) => (input, f.path.clone()),
                FailureFile::Jsonl(f) => (input, f.path.clone()),
            })
            .collect();
        files.sort();
        files
    }
}

/// An input's failures file: CSV for CSV inputs, JSON Lines for the others.
enum FailureFile {
    Csv(CsvFile),
    Jsonl(Lines),
}

/// Whether the header of the failures CSV at `path` has the source columns
/// just before the six failure columns.
fn has_source_columns(path: &Path, delimiter: u8) -> Option<bool> {
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).from_path(path).ok()?;
    let header = reader.byte_headers().ok()?;
    let own = SOURCE_COLUMNS.len() + FAILURE_COLUMNS.len();
    let Some(at) = header.len().checked_sub(own) else { return Some(false) };
    Some(header.iter().skip(at).take(SOURCE_COLUMNS.len()).eq(SOURCE_COLUMNS.map(str::as_bytes)))
}

/// In a JSON failures line of a record read from an outcome file: where it
/// first came from (null when not known; the input only when known, as
/// `input_index` in results).
fn add_source_fields(map: &mut Map<String, Value>, origin: Option<&Origin>) {
    if let Some(origin) = origin {
        map.insert(SOURCE_COLUMNS[0].into(), origin.row.map_or(Value::Null, Value::from));
        map.insert(SOURCE_COLUMNS[1].into(), origin.run.as_deref().map_or(Value::Null, Value::from));
        if let Some(input) = origin.input {
            map.insert(SOURCE_COLUMNS[2].into(), Value::from(input));
        }
    }
}

fn add_error_fields(map: &mut Map<String, Value>, errors: &[&str; 6], status: Option<u16>, attempts: u32) {
    map.insert("_row".into(), errors[0].parse::<u64>().map_or(Value::Null, Value::from));
    map.insert("_key".into(), Value::from(errors[1]));
    map.insert("_error".into(), Value::from(errors[2]));
    map.insert("_status".into(), status.map_or(Value::Null, Value::from));
    map.insert("_attempts".into(), Value::from(attempts));
    map.insert("_message".into(), Value::from(errors[5]));
}

/// `requests.jsonl` of a dry run (buffered: a dry run has nothing to lose).
pub struct RequestsFile {
    path: PathBuf,
    file: BufWriter<File>,
}

impl RequestsFile {
    pub fn create(dir: &Path) -> Result<RequestsFile, OutputError> {
        let path = dir.join("requests.jsonl");
        Ok(RequestsFile { file: BufWriter::new(create_file(&path)?), path })
    }

    pub fn write(&mut self, value: &impl Serialize) -> Result<(), OutputError> {
        serde_json::to_writer(&mut self.file, value)
            .map_err(|e| OutputError::Io { path: self.path.clone(), source: e.into() })?;
        self.file.write_all(b"\n").map_err(io(&self.path))
    }

    pub fn flush(&mut self) -> Result<(), OutputError> {
        self.file.flush().map_err(io(&self.path))
    }
}

/// A ragged CSV row's fields as its failures file holds them, in the
/// header's columns so that every record lines up with the header: a short
/// row's missing fields empty, a long row's extra fields joined into the
/// last column by the file's delimiter (every value kept, in order). The
/// reader knows such a record when it is fed back unchanged
/// (`input::csv::still_ragged`).
fn aligned(values: &[Vec<u8>], width: usize, delimiter: u8) -> Vec<std::borrow::Cow<'_, [u8]>> {
    use std::borrow::Cow;
    let mut out: Vec<Cow<'_, [u8]>> = values.iter().take(width.saturating_sub(1)).map(|v| Cow::from(&v[..])).collect();
    match values.len().cmp(&width) {
        std::cmp::Ordering::Greater => out.push(Cow::Owned(values[width.saturating_sub(1)..].join(&delimiter))),
        _ => {
            out.extend(values.iter().skip(out.len()).map(|v| Cow::from(&v[..])));
            out.resize(width, Cow::Borrowed(&[]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that takes `room` more bytes, then reports the disk full.
    struct Filling {
        taken: Vec<u8>,
        room: usize,
    }

    impl Write for Filling {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.room);
            if n == 0 {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_cut_short_by_a_full_disk_is_not_written_twice() {
        let lines = b"{\"row\":1}\n{\"row\":2}\n".to_vec();
        let (mut file, mut pending) = (Filling { taken: Vec::new(), room: 13 }, lines.clone());
        let path = Path::new("results.jsonl");
        let full = flush_pending(&mut file, &mut pending, path).unwrap_err();
        assert!(full.to_string().contains("results.jsonl"), "{full}");
        assert_eq!(pending, lines[13..], "what reached the file is no longer pending");
        // Space freed: the next flush goes on where the file stopped.
        file.room = usize::MAX;
        assert!(flush_pending(&mut file, &mut pending, path).unwrap());
        assert_eq!(file.taken, lines, "each byte once, in order");
        assert!(pending.is_empty());
    }
}
