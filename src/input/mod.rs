//! Input files → a stream of rows. Files are streamed: memory does not grow
//! with the number of rows. A malformed row is a value ([`BadRow`]) that
//! flows on to the failures file; a file that cannot be read at all is an
//! [`InputError`] that stops the run.

mod csv;
mod fingerprint;
mod json;
mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

pub use self::csv::CsvHeaders;
pub use self::fingerprint::InputFingerprint;
pub use self::source::{Compression, Encoding};

/// The columns bulkcall adds to a failures file, after the record's own
/// fields. A file whose header ends with them (a CSV) or a line that has
/// them all (JSON) is a failures file: read back as input, they are not
/// fields, so it can be fed straight back in. In a CSV they are the last
/// six of every record, by position, so an input column with the same name
/// stays a field of its own.
pub const FAILURE_COLUMNS: [&str; 6] = ["_row", "_key", "_error", "_status", "_attempts", "_message"];

/// The columns a failures file has before the six [`FAILURE_COLUMNS`]
/// when its run's input was itself an outcome file bulkcall wrote (a
/// failures file, or results): each record's [`Origin`], the row, run and
/// input it first came from. In a CSV they are the three columns before
/// the last six, by position; in JSON Lines, fields (`source_input` only
/// when known). Named as in results (the SPEC names them so): they are
/// not fields of a record read back, as the six are not.
pub const SOURCE_COLUMNS: [&str; 3] = ["source_row", "source_run", "source_input"];

/// In a JSON failures line: a record that could not be read, as its text.
pub const RAW_FIELD: &str = "_raw";
/// In a JSON failures line: the record, when it has fields of the names
/// bulkcall adds (so none of them is overwritten).
pub const RECORD_FIELD: &str = "_record";

/// What an outcome file bulkcall wrote said of one of its records: the row
/// it was in the run that wrote the file, and how it failed there (a
/// failures file), or that it succeeded (results: `error` and `message`
/// are empty).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Earlier {
    /// `_row` (`row` in results): its position in that run's input.
    pub row: Option<u64>,
    /// `_error`: the kind it failed as.
    pub error: String,
    /// `_status`, if an answer came.
    pub status: Option<u16>,
    /// `_message`.
    pub message: String,
    /// `input_index` of a line of results: the input it was in.
    pub input: Option<usize>,
    /// Where the record first came from. Read from the file's source
    /// columns when it has them (its run's input was an outcome file too);
    /// else [`read_all`] makes it this file's own `_row` and run.
    pub origin: Option<Origin>,
}

impl Earlier {
    /// From the six failure columns' values, in [`FAILURE_COLUMNS`]' order.
    fn from_columns(values: [&str; 6]) -> Earlier {
        Earlier {
            row: values[0].trim().parse().ok(),
            error: values[2].to_string(),
            status: values[3].trim().parse().ok(),
            message: values[5].to_string(),
            input: None,
            origin: None,
        }
    }
}

/// Where a record first came from, kept however many times it is sent
/// again from a failures file (`source_row`, `source_run` and
/// `source_input` in results, [`SOURCE_COLUMNS`] in failures).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Origin {
    /// Its position in the first run's input.
    pub row: Option<u64>,
    /// The first run's directory, as an absolute path; unknown when the
    /// outcome file was read from outside its run directory.
    pub run: Option<Arc<str>>,
    /// The input it was in, by its place in that run's `run.json`
    /// `inputs` (from 0): known when that run had several.
    pub input: Option<usize>,
}

impl Origin {
    /// From the source columns' values, in [`SOURCE_COLUMNS`]' order (an
    /// empty one is not known).
    fn from_columns(values: [&str; 3]) -> Origin {
        let run = values[1].trim();
        Origin {
            row: values[0].trim().parse().ok(),
            run: (!run.is_empty()).then(|| Arc::from(run)),
            input: values[2].trim().parse().ok(),
        }
    }
}

/// The run directory an input is an outcome file of: the folder of a file
/// named as bulkcall names them (`failures.*`, `results.jsonl`) that holds
/// a `run.json`, as an absolute path with links resolved (`latest` names
/// another run tomorrow); and for a failures file of a run with several
/// inputs, the input it is of (`run.json`'s `inputs[i].failures`). A copy
/// elsewhere, or standard input kept in a run directory, has none.
pub fn run_of(path: &Path) -> Option<(Arc<str>, Option<usize>)> {
    let name = path.file_name()?.to_str()?;
    if !(name.starts_with("failures.") || name.starts_with("results.jsonl")) {
        return None;
    }
    let file = std::fs::canonicalize(path).ok()?;
    let dir = file.parent()?;
    let info = std::fs::read(dir.join("run.json")).ok()?;
    let name = file.file_name()?.to_str()?;
    let info = serde_json::from_slice::<Value>(&info).ok();
    let inputs = info.as_ref().and_then(|i| i.get("inputs")).and_then(Value::as_array);
    let input = inputs
        .filter(|inputs| inputs.len() > 1)
        .and_then(|inputs| inputs.iter().position(|i| i.get("failures").and_then(Value::as_str) == Some(name)));
    Some((Arc::from(dir.to_string_lossy().as_ref()), input))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Json,
    Jsonl,
}

impl Format {
    /// The format an extension names, if any; for a compressed file
    /// (`rows.csv.gz`), the extension inside.
    pub fn from_path(path: &Path) -> Option<Format> {
        let path = match Compression::of(path) {
            Compression::None => path,
            _ => Path::new(path.file_stem()?),
        };
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" | "tsv" | "txt" => Some(Format::Csv),
            "json" => Some(Format::Json),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

/// How to read one input file.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub path: PathBuf,
    pub format: Format,
    pub delimiter: u8,
    pub encoding: Encoding,
}

/// One record of an input file.
#[derive(Debug, Clone)]
pub struct Row {
    /// Index of the input file in the run's list.
    pub input: usize,
    /// 1-based position among the file's records (the CSV header and blank
    /// JSONL lines not counted).
    pub number: u64,
    /// The file line where the record starts.
    pub line: u64,
    pub record: Record,
    /// Read from a failures file (or results): what that file said of the row.
    pub earlier: Option<Box<Earlier>>,
}

impl Row {
    /// Where the row first came from, when it was read from an outcome file.
    pub fn origin(&self) -> Option<&Origin> {
        self.earlier.as_deref().and_then(|e| e.origin.as_ref())
    }
}

#[derive(Debug, Clone)]
pub enum Record {
    /// CSV values, aligned with the header's kept columns.
    Csv {
        headers: Arc<CsvHeaders>,
        values: Vec<String>,
    },
    Json(Map<String, Value>),
}

impl Record {
    /// The value of a field, as JSON.
    pub fn get(&self, name: &str) -> Option<Value> {
        match self {
            Record::Csv { headers, values } => headers.index(name).map(|i| Value::String(values[i].clone())),
            Record::Json(map) => map.get(name).cloned(),
        }
    }

    /// The whole record as a JSON object.
    pub fn to_json(&self) -> Map<String, Value> {
        match self {
            Record::Csv { headers, values } => {
                headers.names().iter().zip(values).map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()
            }
            Record::Json(map) => map.clone(),
        }
    }
}

/// A record that could not be read; it fails alone as `invalid_row`.
#[derive(Debug, Clone)]
pub struct BadRow {
    pub input: usize,
    pub number: u64,
    pub line: u64,
    pub message: String,
    /// What could be kept of it, for the failures file.
    pub raw: Raw,
    /// Read from a failures file: what that file said of the record.
    pub earlier: Option<Box<Earlier>>,
}

#[derive(Debug, Clone)]
pub enum Raw {
    /// The record's bytes, field by field, as the file has them: every
    /// field, those past the header's width too (a failures file's own
    /// six columns left out).
    Csv {
        headers: Arc<CsvHeaders>,
        values: Vec<Vec<u8>>,
    },
    Text(String),
}

/// A file that cannot be read at all, or is not the format it claims.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read input {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}:{line}:{column}: {message}")]
    At { path: PathBuf, line: u64, column: u64, message: String },
    #[error(
        "cannot tell the format of {0} from its extension; name it .csv, .json, .jsonl or .ndjson, or set format in the job spec"
    )]
    UnknownFormat(PathBuf),
}

/// What a reader yields: a row, or a row that failed alone.
pub type Item = Result<Row, BadRow>;

/// Reads the inputs one after another, calling `sink` for every item.
/// `sink` returns `false` to stop early. Blocking: run it on its own thread.
/// `progress` gets the bytes read so far, across every input.
pub fn read_all(
    inputs: &[InputSpec],
    progress: &dyn Fn(u64),
    sink: &mut dyn FnMut(Item) -> bool,
) -> Result<(), InputError> {
    // Bytes read count across the inputs, to compare with their total size.
    let mut before = 0u64;
    for (index, spec) in inputs.iter().enumerate() {
        let size = std::fs::metadata(&spec.path).map_or(0, |m| m.len());
        // A record of an outcome file without source columns came from
        // that file's own run: it is its origin from here on.
        let (run, input) = run_of(&spec.path).unzip();
        let input = input.flatten();
        let with_origin = &mut |mut item: Item| {
            let earlier = match &mut item {
                Ok(row) => row.earlier.as_deref_mut(),
                Err(bad) => bad.earlier.as_deref_mut(),
            };
            if let Some(earlier) = earlier.filter(|e| e.origin.is_none()) {
                earlier.origin = Some(Origin { row: earlier.row, run: run.clone(), input: earlier.input.or(input) });
            }
            sink(item)
        };
        let opened = source::open(spec)?;
        let file = opened.reader;
        // Where the parser is in the file; for a compressed or decoded
        // file, the bytes read from the file itself (compressed bytes).
        let exact = opened.exact;
        let progress = |at: u64| progress(before + if exact { at } else { opened.file_bytes.get() });
        let keep_going = match spec.format {
            Format::Csv => csv::read(index, spec, file, &progress, with_origin)?,
            Format::Json => json::read_array(index, spec, file, &progress, with_origin)?,
            Format::Jsonl => json::read_lines(index, spec, file, &progress, with_origin)?,
        };
        before += size;
        if !keep_going {
            break;
        }
    }
    Ok(())
}

/// Checks every input can be opened and is the format it claims (a JSON
/// array is checked whole), so a wrong path, an empty file or a file cut
/// short stops the run before anything is sent. Returns each CSV input's
/// column names.
pub fn preflight(inputs: &[InputSpec]) -> Result<Vec<Option<Vec<String>>>, InputError> {
    inputs
        .iter()
        .map(|spec| {
            let file = source::open(spec)?.reader;
            let headers = match spec.format {
                Format::Csv => csv::preflight(spec, file).map(Some),
                Format::Json | Format::Jsonl => json::preflight(spec, file).map(|()| None),
            }?;
            // A compressed file cut short or damaged fails only where the
            // damage is: it is decompressed to the end here, so it is
            // refused before anything is sent.
            if !matches!(Compression::of(&spec.path), Compression::None) {
                let mut whole = source::open(spec)?.reader;
                std::io::copy(&mut whole, &mut std::io::sink()).map_err(|e| InputError::Format {
                    path: spec.path.clone(),
                    message: format!("cannot be decompressed to its end (cut short or damaged?): {e}"),
                })?;
            }
            Ok(headers)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn progress_counts_bytes_across_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
            path
        };
        let csv = write("a.csv", "id\n1\n2\n");
        let jsonl = write("b.jsonl", "{\"id\": 3}\n{\"id\": 4}\n");
        let total = std::fs::metadata(&csv).unwrap().len() + std::fs::metadata(&jsonl).unwrap().len();
        let specs = [
            InputSpec { path: csv, format: Format::Csv, delimiter: b',', encoding: Encoding::Utf8 },
            InputSpec { path: jsonl, format: Format::Jsonl, delimiter: b',', encoding: Encoding::Utf8 },
        ];
        let seen = std::cell::RefCell::new(Vec::new());
        read_all(&specs, &|bytes| seen.borrow_mut().push(bytes), &mut |_| true).unwrap();
        let seen = seen.into_inner();
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "never goes back: {seen:?}");
        assert_eq!(seen.last(), Some(&total), "ends at the inputs' total size: {seen:?}");
    }

    #[test]
    fn progress_follows_the_rows_handed_over_not_the_read_ahead() {
        // 1,200 rows of 80 bytes: the whole file fits in the reader's read-ahead.
        let dir = tempfile::tempdir().unwrap();
        for (name, format) in [("rows.csv", Format::Csv), ("rows.jsonl", Format::Jsonl)] {
            let path = dir.path().join(name);
            let row = |i: u64| match format {
                Format::Csv => format!("{i:09},{:>69}\n", "x"),
                _ => format!("{{\"id\":\"{i:09}\",\"note\":\"{:>51}\"}}\n", "x"),
            };
            let header = if format == Format::Csv { format!("{:<79}\n", "id,note") } else { String::new() };
            let text: String = std::iter::once(header).chain((1..=1200).map(row)).collect();
            std::fs::write(&path, &text).unwrap();
            let spec = InputSpec { path, format, delimiter: b',', encoding: Encoding::Utf8 };
            let (rows, seen) = (std::cell::Cell::new(0u64), std::cell::RefCell::new(Vec::new()));
            read_all(&[spec], &|bytes| seen.borrow_mut().push((rows.get(), bytes)), &mut |_| {
                rows.set(rows.get() + 1);
                true
            })
            .unwrap();
            let seen = seen.into_inner();
            assert!(seen.len() > 10, "{name}: progress as it goes: {seen:?}");
            for &(rows, bytes) in &seen {
                // Each row is 80 bytes (and the header one more row's worth).
                let rows_by_bytes = bytes / 80;
                assert!(rows_by_bytes.abs_diff(rows) <= 2, "{name}: {rows} rows handed over at byte {bytes}");
            }
            assert_eq!(seen.last().unwrap().1, text.len() as u64);
        }
    }

    #[test]
    fn a_compressed_input_is_read_as_its_inner_format_and_counted_in_compressed_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for i in 0..1000 {
            writeln!(gz, "{}", if i == 0 { "id,note".to_string() } else { format!("{i},the same words again") })
                .unwrap();
        }
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        assert_eq!(Format::from_path(&path), Some(Format::Csv));
        assert_eq!(Format::from_path(Path::new("a.JSONL.zst")), Some(Format::Jsonl));
        assert_eq!(Format::from_path(Path::new("a.gz")), None);
        let spec = InputSpec { path: path.clone(), format: Format::Csv, delimiter: b',', encoding: Encoding::Utf8 };
        let (seen, mut rows) = (std::cell::RefCell::new(Vec::new()), 0);
        read_all(&[spec], &|bytes| seen.borrow_mut().push(bytes), &mut |item| {
            rows += u64::from(item.is_ok());
            true
        })
        .unwrap();
        assert_eq!(rows, 999);
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(seen.into_inner().last(), Some(&size), "progress ends at the compressed size");
    }

    #[test]
    fn an_outcome_file_names_its_run_directory_with_links_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("2026-12-02T160000Z");
        std::fs::create_dir(&run).unwrap();
        for name in ["failures.csv", "failures.b.jsonl", "results.jsonl", "input-1.csv"] {
            std::fs::write(run.join(name), "").unwrap();
        }
        std::os::unix::fs::symlink(&run, dir.path().join("latest")).unwrap();
        assert_eq!(run_of(&run.join("failures.csv")), None, "no run.json: not a run directory");
        std::fs::write(run.join("run.json"), r#"{"inputs": [{"failures": "failures.csv"}]}"#).unwrap();
        let canonical: Arc<str> = std::fs::canonicalize(&run).unwrap().display().to_string().into();
        for name in ["failures.csv", "failures.b.jsonl", "results.jsonl"] {
            assert_eq!(run_of(&run.join(name)), Some((canonical.clone(), None)), "{name}: one input, none named");
        }
        let through_latest = run_of(&dir.path().join("latest").join("failures.csv"));
        assert_eq!(through_latest, Some((canonical.clone(), None)), "`latest` moves on; the run stays");
        assert_eq!(run_of(&run.join("input-1.csv")), None, "standard input kept in a run directory is not its outcome");
        // Several inputs: a failures file names its own.
        let info = r#"{"inputs": [{"failures": "failures.csv"}, {"failures": "failures.b.jsonl"}]}"#;
        std::fs::write(run.join("run.json"), info).unwrap();
        assert_eq!(run_of(&run.join("failures.b.jsonl")), Some((canonical.clone(), Some(1))));
        assert_eq!(run_of(&run.join("failures.csv")), Some((canonical.clone(), Some(0))));
        assert_eq!(run_of(&run.join("results.jsonl")), Some((canonical, None)), "each line names its input");
    }

    #[test]
    fn a_compressed_input_cut_short_is_refused_by_the_preflight() {
        let dir = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        writeln!(gz, "id,note").unwrap();
        for i in 0..20_000u64 {
            writeln!(gz, "{i},{}", i.wrapping_mul(2_654_435_761) % 1_000_003).unwrap();
        }
        let bytes = gz.finish().unwrap();
        let mut zst = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        zst.write_all(b"{\"id\": 1}\n").unwrap();
        for i in 0..20_000u64 {
            writeln!(zst, "{{\"id\": {}}}", i.wrapping_mul(2_654_435_761) % 1_000_003).unwrap();
        }
        let zst_bytes = zst.finish().unwrap();
        for (name, bytes, format) in [("rows.csv.gz", bytes, Format::Csv), ("rows.jsonl.zst", zst_bytes, Format::Jsonl)]
        {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            let spec = InputSpec { path, format, delimiter: b',', encoding: Encoding::Utf8 };
            let e = preflight(std::slice::from_ref(&spec)).expect_err(name).to_string();
            assert!(e.contains(name) && e.contains("decompressed"), "{e}");
            std::fs::write(&spec.path, &bytes).unwrap();
            preflight(&[spec]).expect("the whole file passes");
        }
    }
}
