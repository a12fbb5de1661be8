//! The run directory. This module is the only writer of files in it:
//! `results.jsonl`, `failures.csv` / `failures.jsonl`, `requests.jsonl`,
//! `summary.json` and `run.json`.
//!
//! Files hold PHI: the directory is created 0700 and every file 0600. Each
//! record is serialized whole before it is handed to the file, so a line is
//! written by one `write` and is never torn.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::input::{CsvHeaders, Format, Raw, Record};
use crate::outcome::{Outcome, Source};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{0} already holds a run (it has a run.json); choose another --out, or finish that run with `bulkcall resume {0}`"
    )]
    Occupied(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io { path: path.to_path_buf(), source }
}

/// Creates the run directory (mode 0700) and its parents.
pub fn create_run_dir(path: &Path) -> Result<(), OutputError> {
    if path.join("run.json").exists() {
        return Err(OutputError::Occupied(path.to_path_buf()));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

fn create_file(path: &Path) -> Result<File, OutputError> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io(path))
}

/// Writes a JSON document whole: to a temporary file, then renamed.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), OutputError> {
    let tmp = path.with_extension("json.tmp");
    let mut file = create_file(&tmp)?;
    let mut text = serde_json::to_vec_pretty(value).expect("serializable");
    text.push(b'\n');
    file.write_all(&text).and_then(|()| file.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// What the writer needs to know about each input.
#[derive(Debug, Clone)]
pub struct InputInfo {
    pub name: String,
    pub format: Format,
}

/// A JSON Lines file written one whole line at a time.
struct Lines {
    path: PathBuf,
    file: BufWriter<File>,
    line: Vec<u8>,
}

impl Lines {
    fn create(path: PathBuf) -> Result<Lines, OutputError> {
        let file = BufWriter::with_capacity(64 * 1024, create_file(&path)?);
        Ok(Lines { path, file, line: Vec::with_capacity(1024) })
    }

    fn write(&mut self, value: &impl Serialize) -> Result<(), OutputError> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, value).expect("serializable");
        self.line.push(b'\n');
        self.file.write_all(&self.line).map_err(io(&self.path))
    }

    fn flush(&mut self) -> Result<(), OutputError> {
        self.file.flush().map_err(io(&self.path))
    }
}

/// A failures CSV: the input's columns, then the six failure columns.
struct CsvFailures {
    path: PathBuf,
    file: BufWriter<File>,
    /// One record's bytes, reused.
    record: Vec<u8>,
}

const ERROR_COLUMNS: [&str; 6] = ["_row", "_key", "_error", "_status", "_attempts", "_message"];

impl CsvFailures {
    fn create(path: PathBuf, headers: &CsvHeaders) -> Result<CsvFailures, OutputError> {
        let file = BufWriter::with_capacity(64 * 1024, create_file(&path)?);
        let mut this = CsvFailures { path, file, record: Vec::with_capacity(1024) };
        let columns = headers.names().iter().map(String::as_str).chain(ERROR_COLUMNS);
        this.write(columns)?;
        Ok(this)
    }

    fn write<'a>(&mut self, fields: impl IntoIterator<Item = &'a str>) -> Result<(), OutputError> {
        let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(std::mem::take(&mut self.record));
        let written = w.write_record(fields).map_err(std::io::Error::other);
        self.record = w.into_inner().map_err(|e| std::io::Error::other(e.to_string())).map_err(io(&self.path))?;
        written.map_err(io(&self.path))?;
        self.file.write_all(&self.record).map_err(io(&self.path))?;
        self.record.clear();
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
    status: Option<u16>,
    attempts: u32,
    latency_ms: u64,
    response: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_truncated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    capture: &'a Map<String, Value>,
}

/// Writes outcomes as they arrive.
pub struct Writer {
    dir: PathBuf,
    inputs: Vec<InputInfo>,
    results: Lines,
    failures_jsonl: Option<Lines>,
    /// One failures CSV per distinct header (normally one: `failures.csv`).
    failures_csv: HashMap<usize, CsvFailures>,
    /// Keeps the headers alive while their address is a key above.
    csv_headers: Vec<Arc<CsvHeaders>>,
}

impl Writer {
    pub fn create(dir: &Path, inputs: Vec<InputInfo>) -> Result<Writer, OutputError> {
        Ok(Writer {
            dir: dir.to_path_buf(),
            inputs,
            results: Lines::create(dir.join("results.jsonl"))?,
            failures_jsonl: None,
            failures_csv: HashMap::new(),
            csv_headers: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn record(&mut self, outcome: &Outcome) -> Result<(), OutputError> {
        match &outcome.result {
            Ok(success) => {
                let line = ResultLine {
                    row: outcome.number,
                    key: &outcome.key,
                    input: (self.inputs.len() > 1).then(|| self.inputs[outcome.input].name.as_str()),
                    status: outcome.status,
                    attempts: outcome.attempts,
                    latency_ms: outcome.latency.as_millis() as u64,
                    response: &success.response,
                    response_truncated: success.truncated.map(|_| true),
                    response_bytes: success.truncated,
                    capture: &success.captured,
                };
                self.results.write(&line)
            }
            Err(failure) => {
                let status = outcome.status.map(|s| s.to_string()).unwrap_or_default();
                let attempts = outcome.attempts.to_string();
                let row = outcome.number.to_string();
                let errors = [
                    row.as_str(),
                    outcome.key.as_str(),
                    failure.kind.as_str(),
                    status.as_str(),
                    attempts.as_str(),
                    failure.message.as_str(),
                ];
                match &outcome.source {
                    Source::Record(Record::Csv { headers, values }) | Source::Raw(Raw::Csv { headers, values }) => {
                        let file = self.csv_file(outcome.input, headers)?;
                        file.write(values.iter().map(String::as_str).chain(errors))
                    }
                    Source::Record(Record::Json(map)) => {
                        let mut map = map.clone();
                        add_error_fields(&mut map, &errors, outcome.status, outcome.attempts);
                        self.jsonl_file()?.write(&map)
                    }
                    Source::Raw(Raw::Text(text)) => {
                        let mut map = Map::new();
                        map.insert("_raw".into(), Value::String(text.clone()));
                        add_error_fields(&mut map, &errors, outcome.status, outcome.attempts);
                        self.jsonl_file()?.write(&map)
                    }
                }
            }
        }
    }

    fn jsonl_file(&mut self) -> Result<&mut Lines, OutputError> {
        if self.failures_jsonl.is_none() {
            self.failures_jsonl = Some(Lines::create(self.dir.join("failures.jsonl"))?);
        }
        Ok(self.failures_jsonl.as_mut().expect("just created"))
    }

    fn csv_file(&mut self, input: usize, headers: &Arc<CsvHeaders>) -> Result<&mut CsvFailures, OutputError> {
        let id = Arc::as_ptr(headers) as usize;
        if !self.failures_csv.contains_key(&id) {
            let name = if self.failures_csv.is_empty() {
                "failures.csv".to_string()
            } else {
                let stem = Path::new(&self.inputs[input].name).file_stem().and_then(|s| s.to_str()).unwrap_or("input");
                format!("failures.{stem}.csv")
            };
            let file = CsvFailures::create(self.dir.join(name), headers)?;
            self.failures_csv.insert(id, file);
            self.csv_headers.push(headers.clone());
        }
        Ok(self.failures_csv.get_mut(&id).expect("just inserted"))
    }

    /// Hands buffered lines to the operating system.
    pub fn flush(&mut self) -> Result<(), OutputError> {
        self.results.flush()?;
        if let Some(f) = &mut self.failures_jsonl {
            f.flush()?;
        }
        for f in self.failures_csv.values_mut() {
            f.file.flush().map_err(io(&f.path))?;
        }
        Ok(())
    }

    /// The failures files written, for the closing message.
    pub fn failure_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.failures_csv.values().map(|f| f.path.clone()).collect();
        files.sort();
        files.extend(self.failures_jsonl.as_ref().map(|f| f.path.clone()));
        files
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

/// `requests.jsonl` of a dry run.
pub struct RequestsFile(Lines);

impl RequestsFile {
    pub fn create(dir: &Path) -> Result<RequestsFile, OutputError> {
        Lines::create(dir.join("requests.jsonl")).map(RequestsFile)
    }

    pub fn write(&mut self, value: &impl Serialize) -> Result<(), OutputError> {
        self.0.write(value)
    }

    pub fn flush(&mut self) -> Result<(), OutputError> {
        self.0.flush()
    }
}
