//! `accepted.jsonl`: the rows of a `[poll]` job whose first call was
//! answered and accepted, each with what its polls and its final outcome
//! need (key, first answer, poll URL, the input record). A row's line is
//! durable before its first poll, so its first call is never sent again:
//! `resume` polls it instead. The file is also where a waiting row's data
//! lives while it waits: memory holds only its place in the file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::committer::Committer;
use super::{OutputError, Records, io, open_file};
use crate::input::{CsvHeaders, Record};

/// One accepted row, as its line holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AcceptedRow {
    pub input: usize,
    pub row: u64,
    pub line: u64,
    pub key: String,
    /// The first call's attempts and the last one's latency.
    pub attempts: u32,
    pub latency_us: u64,
    /// When the first answer came, in ms since the Unix epoch.
    pub at_ms: u64,
    /// Where the row is polled.
    pub url: String,
    /// The first answer: status, headers (lower-case names), body.
    pub status: u16,
    pub headers: Map<String, Value>,
    pub response: Value,
    /// The first answer's `[capture]` values.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub capture: Map<String, Value>,
    pub record: StoredRecord,
    /// Where the row first came from (a row of a failures file): see `Origin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_row: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_input: Option<usize>,
}

/// The input record of an accepted row, for its outcome's line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredRecord {
    Json(Map<String, Value>),
    Csv {
        names: Vec<String>,
        delimiter: u8,
        values: Vec<String>,
        /// Read from a failures file: its own failures file has the source columns too.
        #[serde(default)]
        failures: bool,
    },
}

impl From<Record> for StoredRecord {
    fn from(record: Record) -> StoredRecord {
        match record {
            Record::Json(map) => StoredRecord::Json(map),
            Record::Csv { headers, values } => StoredRecord::Csv {
                names: headers.names().to_vec(),
                delimiter: headers.delimiter(),
                values,
                failures: headers.is_failures(),
            },
        }
    }
}

impl StoredRecord {
    /// The record back; a CSV record's header is `headers` when it has the
    /// same names (one header shared by every row of an input), else made.
    pub fn into_record(self, headers: &mut Option<Arc<CsvHeaders>>) -> Record {
        match self {
            StoredRecord::Json(map) => Record::Json(map),
            StoredRecord::Csv { names, delimiter, values, failures } => {
                let header = match headers {
                    Some(h)
                        if h.names() == names.as_slice()
                            && h.delimiter() == delimiter
                            && h.is_failures() == failures =>
                    {
                        h.clone()
                    }
                    _ => {
                        let made = Arc::new(CsvHeaders::of_names(names, delimiter, failures));
                        *headers = Some(made.clone());
                        made
                    }
                };
                Record::Csv { headers: header, values }
            }
        }
    }
}

/// Where an accepted row's line is in `accepted.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub offset: u64,
    pub len: u32,
}

/// `accepted.jsonl`, open for appending (each line made durable before
/// [`AcceptedFile::commit`] returns, one sync per window shared by every
/// line queued) and for reading lines back by their place.
pub struct AcceptedFile {
    path: PathBuf,
    read: File,
    committer: Arc<Committer>,
    /// Where the next line queued starts: taken and advanced while queueing,
    /// so places follow the order lines reach the file.
    end: Mutex<u64>,
}

impl Drop for AcceptedFile {
    fn drop(&mut self) {
        self.committer.close();
    }
}

pub const ACCEPTED: &str = "accepted.jsonl";

impl AcceptedFile {
    pub fn open(dir: &Path, append: bool) -> Result<AcceptedFile, OutputError> {
        let path = dir.join(ACCEPTED);
        let file = open_file(&path, append, Records::Lines)?;
        let end = file.metadata().map_err(io(&path))?.len();
        let read = File::open(&path).map_err(io(&path))?;
        let committer = Committer::start(file, path.clone(), None);
        Ok(AcceptedFile { path, read, committer, end: Mutex::new(end) })
    }

    /// Appends a row's line; it is durable when this returns.
    pub async fn commit(&self, row: &AcceptedRow) -> Result<Place, OutputError> {
        let mut line = serde_json::to_vec(row).expect("an accepted row serializes");
        line.push(b'\n');
        let (place, mine) = {
            let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
            let place = Place { offset: *end, len: line.len() as u32 };
            *end += line.len() as u64;
            (place, self.committer.queue(|buf| buf.extend_from_slice(&line)))
        };
        self.committer.durable(mine, &self.path).await?;
        Ok(place)
    }

    /// Reads a row's line back.
    pub fn read(&self, place: Place) -> Result<AcceptedRow, OutputError> {
        let mut bytes = vec![0; place.len as usize];
        self.read.read_exact_at(&mut bytes, place.offset).map_err(io(&self.path))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| io(&self.path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())))
    }

    /// Every whole line of a run's `accepted.jsonl`: (input, row, place,
    /// when its first answer came). A line cut by a crash is left out.
    pub fn scan(dir: &Path) -> Result<Vec<(usize, u64, Place, u64)>, OutputError> {
        #[derive(Deserialize)]
        struct Head {
            input: usize,
            row: u64,
            at_ms: u64,
        }
        use std::io::BufRead;
        let path = dir.join(ACCEPTED);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut reader = std::io::BufReader::new(file);
        let (mut rows, mut offset, mut line) = (Vec::new(), 0u64, Vec::new());
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line).map_err(io(&path))?;
            if read == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let place = Place { offset, len: read as u32 };
            offset += read as u64;
            if let Ok(head) = serde_json::from_slice::<Head>(&line) {
                rows.push((head.input, head.row, place, head.at_ms));
            }
        }
        Ok(rows)
    }
}
