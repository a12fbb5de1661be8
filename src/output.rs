//! The run directory. This module is the only writer of files in it:
//! `results.jsonl`, `failures.csv` / `failures.jsonl`, `requests.jsonl`,
//! `summary.json` and `run.json`.
//!
//! Files hold PHI: the directory is created 0700 and every file 0600.
//! Records are serialized whole into a buffer that [`Writer::flush`] hands
//! to the operating system in one `write` per file, so a line is never torn
//! and `kill -9` loses no outcome that was recorded (flushed). `journal` is the ledger that makes `resume` exact: a row is
//! marked started before its first attempt goes out, and done after its
//! outcome is written.

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
use crate::rows::RowSet;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{0} already holds a run (it has a run.json); choose another --out, or finish that run with `bulkcall resume {0}`"
    )]
    Occupied(PathBuf),
    #[error("another run of job `{job}` is going on (pid {pid}, lock {path}); wait for it, or stop it first")]
    Locked { job: String, pid: String, path: PathBuf },
    #[error("another bulkcall process (pid {pid}) is working on {dir}; wait for it, or stop it first")]
    RunLocked { dir: PathBuf, pid: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io { path: path.to_path_buf(), source }
}

/// Makes what was written to `file` durable: on disk, not only handed to
/// the operating system. Tests record the order files were synced in.
fn sync(file: &File, path: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    tests::SYNCED.lock().unwrap().push((path.to_path_buf(), file.metadata().map_or(0, |m| m.len())));
    #[cfg(not(test))]
    let _ = path;
    file.sync_data()
}

/// Makes a new file's name durable in its directory.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
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

/// Opens a file for appending (resume) or creates it empty (a new run), in
/// append mode either way.
/// Appending, a line a crash cut short (after a partial write) is dropped
/// first, so the next line does not run into it.
fn open_file(path: &Path, append: bool) -> Result<File, OutputError> {
    let new = !append || !path.exists();
    if append {
        trim_torn_tail(path).map_err(io(path))?;
    } else {
        create_file(path)?;
    }
    // Always in append mode: each write lands whole at the end, whichever
    // thread makes it.
    let file = OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(io(path))?;
    if new {
        sync_dir(path).map_err(io(path))?;
    }
    Ok(file)
}

fn trim_torn_tail(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(1 << 20);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    if tail.last().is_none_or(|&b| b == b'\n') {
        return Ok(());
    }
    let keep = tail.iter().rposition(|&b| b == b'\n').map_or(start, |i| start + i as u64 + 1);
    file.set_len(keep)
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

/// Writes `report.html` whole (temporary file, then renamed), mode 0600.
pub fn write_report(dir: &Path, html: &str) -> Result<PathBuf, OutputError> {
    let path = dir.join("report.html");
    let tmp = dir.join("report.html.tmp");
    let mut file = create_file(&tmp)?;
    file.write_all(html.as_bytes()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

/// `run.json`: what `resume` needs, written before the first call goes out.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub version: String,
    pub job: PathBuf,
    pub job_name: String,
    pub inputs: Vec<InputFingerprint>,
    pub profile: String,
    pub config: Option<PathBuf>,
    /// The resolved settings, secrets left out.
    pub settings: Value,
    pub limit: Option<u64>,
    pub started_at: String,
    pub pid: u32,
    /// The command-line flags the run was started with: `resume` applies
    /// them again (its own flags win); everything else comes from the
    /// config and the environment as they are when it resumes.
    #[serde(default)]
    pub flags: RunFlags,
    /// The run this directory is one shard of, and which shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::shard::Shard>,
}

/// The flags of a run that `resume` applies again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct RunFlags {
    /// Setting flags (`-j`, `-r`, `--burst`, `--max-attempts`, `--timeout`), by setting name.
    #[serde(default)]
    pub settings: Map<String, Value>,
    /// `--max-failures` as given (`50`, `5%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<String>,
    /// `--grace` as given (`45s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
}

/// An input as it was when the run started.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct InputFingerprint {
    pub path: PathBuf,
    pub format: Format,
    pub delimiter: String,
    pub size: u64,
    pub sha256: String,
    /// The input's failures file in the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<String>,
}

impl InputFingerprint {
    /// Reads the whole file to fingerprint it. Blocking.
    pub fn of(path: &Path, format: Format, delimiter: u8) -> std::io::Result<InputFingerprint> {
        use sha2::Digest;
        let mut file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok(InputFingerprint {
            path: std::path::absolute(path)?,
            format,
            delimiter: (delimiter as char).to_string(),
            size,
            sha256: format!("{:x}", hasher.finalize()),
            failures: None,
        })
    }
}

/// An outcome found on file: (input if the line says, row, outcome).
pub type Recent = (Option<usize>, u64, Done);

/// Outcomes a crash may have left without their ledger mark:
/// `results.jsonl` and each input's failures file (`failures`, by input
/// index: its name and the input's delimiter, which it is written with).
/// Returns (input if the line says, row, outcome).
///
/// A batch's lines are durable before its done marks are written (in the
/// lines' order, one write), and the ledger is synced before the next
/// batch's marks: so the lines without a mark are a suffix of each file,
/// after its last marked line (`marked`), however large the answers. Each
/// file is read backwards until a marked line, and at least its last 4 MiB
/// or 4,096 lines.
pub fn recent_outcomes(dir: &Path, failures: &[(String, u8)], marked: impl Fn(usize, u64) -> bool) -> Vec<Recent> {
    const TAIL_BYTES: u64 = 4 << 20;
    const TAIL_LINES: usize = 4096;
    // The lines of `path` from its end back to the first one `parse` reads
    // as marked, newest first.
    let tail = |path: &Path, parse: &dyn Fn(&[u8]) -> Option<Recent>| {
        use std::io::{Read, Seek, SeekFrom};
        const CHUNK: u64 = 1 << 20;
        let mut found = vec![];
        let Ok(mut file) = File::open(path) else { return found };
        let len = file.metadata().map_or(0, |m| m.len());
        let (mut start, mut lines_seen) = (len, 0);
        // The bytes of a line cut by the chunk's start.
        let mut partial: Vec<u8> = Vec::new();
        while start > 0 {
            let from = start.saturating_sub(CHUNK);
            let mut bytes = vec![0; (start - from) as usize];
            if file.seek(SeekFrom::Start(from)).is_err() || file.read_exact(&mut bytes).is_err() {
                return found;
            }
            bytes.extend_from_slice(&partial);
            start = from;
            let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
            // The first piece may be cut unless the file starts there.
            let first = if start > 0 { lines.remove(0).to_vec() } else { Vec::new() };
            for line in lines.into_iter().rev().filter(|l| !l.is_empty()) {
                lines_seen += 1;
                let Some((input, row, done)) = parse(line) else { continue };
                let is_marked = input.is_some_and(|i| marked(i, row));
                if is_marked && (lines_seen >= TAIL_LINES || len - start >= TAIL_BYTES) {
                    return found;
                }
                found.push((input, row, done));
            }
            partial = first;
        }
        found
    };
    let num = |v: &Value| v.as_u64();
    let mut found = tail(&dir.join("results.jsonl"), &|line| {
        let line = serde_json::from_slice::<Value>(line).ok()?;
        let row = num(&line["row"])?;
        let done = Done {
            status: num(&line["status"]).map(|s| s as u16),
            error: None,
            attempts: num(&line["attempts"]).unwrap_or(1) as u32,
            latency_us: num(&line["latency_ms"]).unwrap_or(0) * 1000,
            at_ms: 0,
        };
        let input = num(&line["input_index"]).map(|i| i as usize).or((failures.len() == 1).then_some(0));
        Some((input, row, done))
    });
    for (input, (name, delimiter)) in failures.iter().enumerate() {
        let path = dir.join(name);
        if name.ends_with(".jsonl") {
            found.extend(tail(&path, &|line| {
                let line = serde_json::from_slice::<Value>(line).ok()?;
                let row = num(&line["_row"])?;
                let done = Done {
                    status: num(&line["_status"]).map(|s| s as u16),
                    error: line["_error"].as_str().map(str::to_string),
                    attempts: num(&line["_attempts"]).unwrap_or(0) as u32,
                    latency_us: 0,
                    at_ms: 0,
                };
                Some((Some(input), row, done))
            }));
            continue;
        }
        // The six failure columns end every record, and their values hold
        // no line breaks, so the last line of a record has them all.
        found.extend(tail(&path, &|line| {
            let mut reader =
                csv::ReaderBuilder::new().has_headers(false).flexible(true).delimiter(*delimiter).from_reader(line);
            let record = reader.byte_records().next()?.ok()?;
            if record.len() < 6 {
                return None;
            }
            let field = |back: usize| String::from_utf8_lossy(&record[record.len() - back]).into_owned();
            let row = field(6).parse().ok()?;
            let done = Done {
                status: field(3).parse().ok(),
                error: Some(field(4)),
                attempts: field(2).parse().unwrap_or(0),
                latency_us: 0,
                at_ms: 0,
            };
            Some((Some(input), row, done))
        }));
    }
    found
}

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
        Ok(Lines { file: open_file(&path, append)?, path, pending: Vec::with_capacity(64 * 1024), unsynced: false })
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

/// Writes what is pending; true if there was anything.
fn flush_pending(file: &mut File, pending: &mut Vec<u8>, path: &Path) -> Result<bool, OutputError> {
    if pending.is_empty() {
        return Ok(false);
    }
    file.write_all(pending).map_err(io(path))?;
    pending.clear();
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
    /// Records handed to the operating system since the last sync.
    unsynced: bool,
}

const ERROR_COLUMNS: [&str; 6] = ["_row", "_key", "_error", "_status", "_attempts", "_message"];

impl CsvFile {
    /// Opens the file and writes its header, unless resuming a file that has one.
    fn open<'a>(
        path: PathBuf,
        header: impl IntoIterator<Item = &'a [u8]>,
        append: bool,
    ) -> Result<CsvFile, OutputError> {
        let has_header = append && std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        let mut this = CsvFile {
            file: open_file(&path, append)?,
            path,
            record: Vec::with_capacity(1024),
            delimiter: b',',
            unsynced: false,
        };
        if !has_header {
            this.write(header)?;
        }
        Ok(this)
    }

    /// A failures CSV: the input's columns, then the six failure columns,
    /// with the input's delimiter.
    fn failures(path: PathBuf, headers: &CsvHeaders, append: bool) -> Result<CsvFile, OutputError> {
        let has_header = append && std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        let mut this = CsvFile {
            file: open_file(&path, append)?,
            path,
            record: Vec::with_capacity(1024),
            delimiter: headers.delimiter(),
            unsynced: false,
        };
        if !has_header {
            this.write(headers.names().iter().map(String::as_bytes).chain(ERROR_COLUMNS.map(str::as_bytes)))?;
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
                    status: outcome.status,
                    attempts: outcome.attempts,
                    latency_ms: outcome.latency.as_millis() as u64,
                    response: success.raw.is_none().then_some(&success.response),
                    response_truncated: success.truncated.map(|_| true),
                    response_bytes: success.truncated,
                    capture: &success.captured,
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
                let errors = [
                    row.as_str(),
                    outcome.key.as_str(),
                    failure.kind.as_str(),
                    status.as_str(),
                    attempts.as_str(),
                    failure.message.as_str(),
                ];
                match &outcome.source {
                    Source::Record(Record::Csv { headers, values }) => {
                        let file = self.csv_file(outcome.input, headers)?;
                        file.write(values.iter().map(String::as_bytes).chain(errors.map(str::as_bytes)))
                    }
                    Source::Raw(Raw::Csv { headers, values }) => {
                        let file = self.csv_file(outcome.input, headers)?;
                        file.write(values.iter().map(Vec::as_slice).chain(errors.map(str::as_bytes)))
                    }
                    Source::Record(Record::Json(map)) => {
                        let mut map = map.clone();
                        add_error_fields(&mut map, &errors, outcome.status, outcome.attempts);
                        self.jsonl_file(outcome.input)?.write(&map)
                    }
                    Source::Raw(Raw::Text(text)) => {
                        let mut map = Map::new();
                        map.insert("_raw".into(), Value::String(text.clone()));
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

/// How long an outcome line may wait, written but not yet durable, for
/// others to share its sync. About a hundred syncs a second at most, however
/// fast rows come: a power cut can take back only this last moment's
/// outcomes (their rows are then in doubt, or unsent).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Records outcomes for good, in groups: [`GroupCommit::write`] writes their
/// lines at once (safe from a crash of the process, not yet from a power
/// cut) and keeps their done marks; [`GroupCommit::sync`] makes every line
/// written so far durable, then the ledger (holding the marks of earlier
/// groups, whose lines were made durable before them), and only then writes
/// the group's done marks. A done mark is never on disk before its outcome
/// line, at one `fdatasync` per file per group; after a power cut, the rows
/// with an outcome on disk and no mark are at most the last group's, and
/// `resume` finds them at the end of the outcome files.
#[derive(Default)]
pub struct GroupCommit {
    /// Done marks of the lines written and not yet synced.
    marks: String,
    /// When the oldest of those lines was written.
    since: Option<std::time::Instant>,
}

impl GroupCommit {
    /// Writes the outcomes' lines, one write per file; their done marks
    /// wait for the next [`GroupCommit::sync`].
    pub fn write(&mut self, writer: &mut Writer, outcomes: &[Outcome]) -> Result<(), OutputError> {
        outcomes.iter().try_for_each(|outcome| writer.record(outcome))?;
        writer.flush()?;
        // When these outcomes were recorded: one clock reading for all.
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        for outcome in outcomes {
            Ledger::push_done(&mut self.marks, outcome, at_ms as u64);
        }
        if !outcomes.is_empty() {
            self.since.get_or_insert_with(std::time::Instant::now);
        }
        Ok(())
    }

    /// When the lines written wait to be made durable: [`SYNC_EVERY`]
    /// after the oldest; `None` when none waits.
    pub fn due(&self) -> Option<std::time::Instant> {
        self.since.map(|since| since + SYNC_EVERY)
    }

    /// Makes every line written durable, then writes their done marks.
    pub fn sync(&mut self, writer: &mut Writer, ledger: &Ledger) -> Result<(), OutputError> {
        if self.since.take().is_none() {
            return Ok(());
        }
        writer.sync()?;
        ledger.sync()?;
        ledger.write_marks(&std::mem::take(&mut self.marks))
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

/// The ledger of a run (`journal`): `S` when a row's first attempt is
/// about to go out, `D` with its outcome once that is written, `R` when the
/// run stopped before the row was finished and the gateway provably did
/// not act on it. Rows with `S` and no later `R` or `D` were in flight when
/// the run stopped: in doubt.
pub struct Ledger {
    path: PathBuf,
    /// Opened for appending: each batch of lines is one `write`, whole even
    /// when workers write at the same moment.
    file: File,
    /// `S` marks not yet written, and how many marks were ever queued.
    queued: std::sync::Mutex<(Vec<u8>, u64)>,
    /// Held while marks are written (and synced): the one writer at a time.
    writing: std::sync::Mutex<()>,
    /// How many queued marks have been written (and synced).
    written: std::sync::atomic::AtomicU64,
    /// Make each `S` mark durable before its row is sent (a job that is
    /// not idempotent: after a power cut, a row sent must be known as sent).
    sync_started: bool,
}

/// `write!` into a byte buffer.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::io::Write for ByteWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a run's ledger says: the rows with a recorded outcome, and the rows
/// started without one (in doubt), in order.
pub type LedgerState = (RowSet, Vec<(usize, u64)>);

/// What the ledger knows of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub status: Option<u16>,
    /// `None` for a success.
    pub error: Option<String>,
    pub attempts: u32,
    pub latency_us: u64,
    /// When the outcome was recorded, in ms since the Unix epoch (0 if unknown).
    pub at_ms: u64,
}

impl Ledger {
    /// Opens the ledger; `sync_started` makes each `S` mark durable before
    /// [`Ledger::started`] returns.
    pub fn open(dir: &Path, append: bool, sync_started: bool) -> Result<Ledger, OutputError> {
        let path = dir.join("journal");
        Ok(Ledger {
            file: open_file(&path, append)?,
            path,
            queued: std::sync::Mutex::new((Vec::new(), 0)),
            writing: std::sync::Mutex::new(()),
            written: std::sync::atomic::AtomicU64::new(0),
            sync_started,
        })
    }

    /// Marks a row started, written (with `sync_started`, durable) before
    /// this returns. Workers that mark rows in the same moment share one
    /// `write` and one sync: each queues its mark, lets the others run once,
    /// and the first back writes every mark queued.
    pub async fn started(self: &Arc<Self>, input: usize, row: u64) -> Result<(), OutputError> {
        use std::sync::atomic::Ordering;
        let mine = {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(ByteWriter(&mut queued.0), "S\t{input}\t{row}");
            queued.1 += 1;
            queued.1
        };
        tokio::task::yield_now().await;
        if self.written.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        if !self.sync_started {
            return self.write_queued(mine);
        }
        // The sync waits for the disk: off the thread that drives the calls.
        let ledger = self.clone();
        tokio::task::spawn_blocking(move || ledger.write_queued(mine)).await.expect("writing marks does not panic")
    }

    /// Writes every mark queued, unless another writer already wrote
    /// `mine`; with `sync_started`, makes them durable before saying so.
    fn write_queued(&self, mine: u64) -> Result<(), OutputError> {
        use std::sync::atomic::Ordering;
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if self.written.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        let (marks, upto) = {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut queued.0), queued.1)
        };
        (&self.file).write_all(&marks).map_err(io(&self.path))?;
        if self.sync_started {
            sync(&self.file, &self.path).map_err(io(&self.path))?;
        }
        self.written.store(upto, Ordering::Release);
        Ok(())
    }

    /// Makes every mark written so far durable.
    pub fn sync(&self) -> Result<(), OutputError> {
        sync(&self.file, &self.path).map_err(io(&self.path))
    }

    /// Marks a started row released: the run stopped before the row was
    /// finished, and the gateway provably did not act on any of its
    /// attempts (none went out, or each was refused before processing), so
    /// `resume` sends it as a row never sent, not as one in doubt.
    pub fn released(&self, input: usize, row: u64) -> Result<(), OutputError> {
        (&self.file).write_all(format!("R\t{input}\t{row}\n").as_bytes()).map_err(io(&self.path))
    }

    /// Writes done marks ([`Ledger::push_done`]), in one `write`.
    fn write_marks(&self, lines: &str) -> Result<(), OutputError> {
        (&self.file).write_all(lines.as_bytes()).map_err(io(&self.path))
    }

    /// Appends `outcome`'s done mark, stamped `at_ms`, to `marks`.
    fn push_done(marks: &mut String, outcome: &Outcome, at_ms: u64) {
        let done = Done {
            status: outcome.status,
            error: outcome.result.as_ref().err().map(|f| f.kind.as_str().to_string()),
            attempts: outcome.attempts,
            latency_us: outcome.latency.as_micros() as u64,
            at_ms,
        };
        Self::push_mark(marks, outcome.input, outcome.number, &done);
    }

    /// The one place that writes a done mark's line.
    fn push_mark(marks: &mut String, input: usize, row: u64, done: &Done) {
        use std::fmt::Write as _;
        let _ = write!(marks, "D\t{input}\t{row}\t");
        match done.status {
            Some(status) => {
                let _ = write!(marks, "{status}");
            }
            None => marks.push('-'),
        }
        let error = done.error.as_deref().unwrap_or("ok");
        let _ = writeln!(marks, "\t{error}\t{}\t{}\t{}", done.attempts, done.latency_us, done.at_ms);
    }

    /// Marks done, before a resumed run sends anything, the rows whose
    /// outcome is on file without a mark (a crash came between the two), so
    /// later resumes know them too. The marks are on disk when this returns.
    pub fn recovered(dir: &Path, rows: &[(usize, u64, Done)]) -> Result<(), OutputError> {
        if rows.is_empty() {
            return Ok(());
        }
        let path = dir.join("journal");
        let mut lines = String::new();
        for (input, row, done) in rows {
            Self::push_mark(&mut lines, *input, *row, done);
        }
        let file = open_file(&path, true)?;
        (&file).write_all(lines.as_bytes()).and_then(|()| file.sync_data()).map_err(io(&path))
    }

    /// Reads a run's ledger: the rows done and the rows started but not
    /// done. `on_done` sees the outcome of each row done, once. Memory is
    /// two bits per row.
    pub fn read(dir: &Path, mut on_done: impl FnMut(&Done)) -> Result<LedgerState, OutputError> {
        let (mut done, mut started) = (RowSet::default(), RowSet::default());
        Ledger::scan(dir, |mark| match mark {
            Mark::Started(input, row) => {
                started.insert(input, row);
            }
            Mark::Released(input, row) => {
                started.remove(input, row);
            }
            Mark::Done(input, row, outcome) => {
                if done.insert(input, row) {
                    on_done(&outcome);
                }
            }
        })?;
        let in_doubt = started.difference(&done).collect();
        Ok((done, in_doubt))
    }

    /// Streams a run's ledger, mark by mark. The ledger's line format is
    /// known here alone.
    pub fn scan(dir: &Path, mut on_mark: impl FnMut(Mark)) -> Result<(), OutputError> {
        use std::io::BufRead;
        let path = dir.join("journal");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut reader = std::io::BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io(&path))? == 0 {
                break;
            }
            // A line cut by a crash (only ever the last one) is ignored:
            // cut short, its row number could name another row.
            let Some(line) = line.strip_suffix('\n') else { break };
            let f: Vec<&str> = line.split('\t').collect();
            let key = || Some((f.get(1)?.parse::<usize>().ok()?, f.get(2)?.parse::<u64>().ok()?));
            match (f[0], key()) {
                ("S", Some((input, row))) => on_mark(Mark::Started(input, row)),
                ("R", Some((input, row))) => on_mark(Mark::Released(input, row)),
                ("D", Some((input, row))) if f.len() == 8 => on_mark(Mark::Done(
                    input,
                    row,
                    Done {
                        status: f[3].parse().ok(),
                        error: (f[4] != "ok").then(|| f[4].to_string()),
                        attempts: f[5].parse().unwrap_or(0),
                        latency_us: f[6].parse().unwrap_or(0),
                        at_ms: f[7].parse().unwrap_or(0),
                    },
                )),
                _ => {}
            }
        }
        Ok(())
    }
}

/// One line of the ledger: (input, row) started, released (not sent after
/// all, or refused before processing), or done with its outcome.
pub enum Mark {
    Started(usize, u64),
    Released(usize, u64),
    Done(usize, u64, Done),
}

/// Holds the one-run-per-job lock for as long as it lives.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

/// Takes the job's lock in its output folder, or says who holds it.
pub fn lock_job(folder: &Path, job: &str) -> Result<JobLock, OutputError> {
    std::fs::create_dir_all(folder).map_err(io(folder))?;
    let path = folder.join(format!(".{job}.lock"));
    lock(&path).map_err(|held| match held {
        Held::By(pid) => OutputError::Locked { job: job.to_string(), pid, path: path.clone() },
        Held::Error(e) => e,
    })
}

/// Takes the run directory's own lock (`.lock` in it), or says who holds
/// it. Every process that works on the directory takes it, whatever its
/// current folder and config.
pub fn lock_run_dir(dir: &Path) -> Result<JobLock, OutputError> {
    let path = dir.join(".lock");
    lock(&path).map_err(|held| match held {
        Held::By(pid) => OutputError::RunLocked { dir: dir.to_path_buf(), pid },
        Held::Error(e) => e,
    })
}

/// Why a lock was not taken.
enum Held {
    /// Another process holds it: its pid, as it wrote it.
    By(String),
    Error(OutputError),
}

fn lock(path: &Path) -> Result<JobLock, Held> {
    let io = |e| Held::Error(io(path)(e));
    let mut file =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)
                .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
                .map_err(io)?;
            Ok(JobLock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(Held::By(std::fs::read_to_string(path).unwrap_or_default().trim().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{ErrorKind, Failure};

    /// Every sync of every test: the file, and its length then.
    pub(super) static SYNCED: std::sync::Mutex<Vec<(PathBuf, u64)>> = std::sync::Mutex::new(Vec::new());

    /// The syncs of files in `dir` since the last call, in order.
    fn synced(dir: &Path) -> Vec<(String, u64)> {
        let mut all = SYNCED.lock().unwrap();
        let (mine, others): (Vec<_>, Vec<_>) = all.drain(..).partition(|(p, _)| p.starts_with(dir));
        *all = others;
        mine.into_iter().map(|(p, n)| (p.file_name().unwrap().to_string_lossy().into(), n)).collect()
    }

    fn failed(number: u64) -> Outcome {
        Outcome {
            input: 0,
            number,
            line: number + 1,
            key: format!("k{number}"),
            attempts: 1,
            latency: std::time::Duration::from_millis(5),
            status: Some(400),
            result: Err(Failure { kind: ErrorKind::ClientError, message: "HTTP 400".into() }),
            source: Source::Record(Record::Json(Map::new())),
        }
    }

    #[test]
    fn every_outcome_line_after_the_last_marked_one_is_found_however_large_the_answers() {
        let dir = tempfile::tempdir().unwrap();
        let answer = "x".repeat(100 * 1024);
        let mut results = String::new();
        // 20 rows marked done, then two batches of 64 rows written without
        // their marks (a power cut): 12.8 MB, far beyond a fixed tail.
        for row in 0..148u64 {
            let line = serde_json::json!({"row": row, "input_index": 0, "status": 200, "answer": answer});
            results.push_str(&format!("{line}\n"));
        }
        std::fs::write(dir.path().join("results.jsonl"), results).unwrap();
        let failures = [("failures.jsonl".to_string(), b','), ("failures-2.jsonl".to_string(), b',')];

        let found = recent_outcomes(dir.path(), &failures, |input, row| input == 0 && row < 20);
        let rows: std::collections::BTreeSet<u64> = found.iter().map(|(_, row, _)| *row).collect();
        assert!((20..148).all(|row| rows.contains(&row)), "every unmarked row is found: {rows:?}");
        assert!(found.iter().all(|(input, _, done)| *input == Some(0) && done.status == Some(200)));
    }

    #[test]
    fn a_done_mark_reaches_the_disk_only_after_its_outcome_line() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = vec![InputInfo { name: "rows.jsonl".into(), failures: "failures.jsonl".into() }];
        let mut writer = Writer::open(dir.path(), inputs, false, true, None).unwrap();
        let ledger = Ledger::open(dir.path(), false, false).unwrap();
        let len = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len();

        let mut group = GroupCommit::default();
        group.write(&mut writer, &[failed(1), failed(2)]).unwrap();
        assert_eq!(len("journal"), 0, "no mark before the sync");
        assert!(group.due().is_some());
        group.sync(&mut writer, &ledger).unwrap();
        let (failures_1, journal_1) = (len("failures.jsonl"), len("journal"));
        // The batch's lines made durable (one sync), then the ledger as it
        // was before this batch's marks; the marks written after.
        assert_eq!(synced(dir.path()), [("failures.jsonl".into(), failures_1), ("journal".into(), 0)]);
        assert!(journal_1 > 0, "the marks are written");

        group.write(&mut writer, &[failed(3)]).unwrap();
        group.sync(&mut writer, &ledger).unwrap();
        assert!(group.due().is_none(), "nothing left to sync");
        // The next batch makes the first batch's marks durable, after its own lines.
        assert_eq!(
            synced(dir.path()),
            [("failures.jsonl".into(), len("failures.jsonl")), ("journal".into(), journal_1)]
        );
        let journal = std::fs::read_to_string(dir.path().join("journal")).unwrap();
        assert_eq!(journal.lines().filter(|l| l.starts_with("D\t0\t")).count(), 3);
    }

    #[tokio::test]
    async fn started_marks_are_durable_before_a_row_goes_out_only_when_asked() {
        for sync_started in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Arc::new(Ledger::open(dir.path(), false, sync_started).unwrap());
            ledger.started(0, 1).await.unwrap();
            let expected = if sync_started { vec![("journal".to_string(), 6)] } else { vec![] };
            assert_eq!(synced(dir.path()), expected, "sync_started = {sync_started}");
            assert_eq!(std::fs::read_to_string(dir.path().join("journal")).unwrap(), "S\t0\t1\n");
        }
    }

    #[test]
    fn every_input_gets_a_failures_file_of_its_own() {
        let inputs = [
            ("a/claims.csv", Format::Csv),
            ("b/claims.csv", Format::Csv),
            ("c/claims.csv", Format::Csv),
            ("claims-2.csv", Format::Csv),
            ("x/rows.jsonl", Format::Jsonl),
            ("y/rows.json", Format::Json),
            ("z/claims.tsv", Format::Csv),
        ]
        .map(|(p, f)| (PathBuf::from(p), f, if p.ends_with(".tsv") { b'\t' } else { b',' }));
        let names = failure_file_names(&inputs);
        assert_eq!(
            names,
            [
                "failures.csv",
                "failures.claims.csv",
                "failures.claims-2.csv",
                "failures.claims-2-2.csv",
                "failures.jsonl",
                "failures.rows.jsonl",
                "failures.tsv"
            ]
        );
        assert_eq!(failure_file_names(&inputs[..1]), ["failures.csv"], "one input: the plain name");
    }

    #[test]
    fn recent_failures_are_read_with_the_inputs_delimiter() {
        let dir = tempfile::tempdir().unwrap();
        for (name, d) in [("failures.csv", ';'), ("failures.b.csv", '\t')] {
            let text = format!(
                "id{d}amount{d}_row{d}_key{d}_error{d}_status{d}_attempts{d}_message\n7{d}1,5{d}3{d}7{d}http_4xx{d}422{d}2{d}no\n"
            );
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let failures = [("failures.csv".to_string(), b';'), ("failures.b.csv".to_string(), b'\t')];
        let found = recent_outcomes(dir.path(), &failures, |_, _| false);
        let rows: Vec<_> = found.iter().map(|(i, row, d)| (*i, *row, d.status, d.attempts)).collect();
        assert_eq!(rows, [(Some(0), 3, Some(422), 2), (Some(1), 3, Some(422), 2)]);
    }

    #[test]
    fn a_ledger_line_cut_short_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal"), "S\t0\t1\nS\t0\t2\nD\t0\t1\t200\tok\t1\t5\t9\nS\t1\t12").unwrap();
        let mut outcomes = 0;
        let (done, in_doubt) = Ledger::read(dir.path(), |_| outcomes += 1).unwrap();
        assert_eq!((done.len(), outcomes), (1, 1));
        assert_eq!(in_doubt, [(0, 2)], "row 12 of input 1 may be row 123 cut short");
    }
}
