//! Outcomes on file that a crash left without their done mark.

use std::fs::File;
use std::path::Path;

use serde_json::Value;

use super::Done;
use crate::input::FAILURE_COLUMNS;

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
/// after its last marked line (`marked`), however large the answers. A
/// JSON Lines file is read backwards until a marked line, and at least its
/// last 4 MiB or 4,096 lines; a failures CSV, whose records may span lines,
/// is read whole by the CSV parser, record by record.
///
/// What a file says is not trusted further: the caller takes an outcome
/// found only for a row its ledger marked started and not done.
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
        found.extend(csv_failures(&path, *delimiter, input, &marked));
    }
    found
}

/// The records of a failures CSV (its header's input columns, the two
/// source columns of a run over a failures file, then the six failure
/// columns, which end every record) not `marked`, read by the CSV
/// parser up to the last whole record: a record cut short by a crash is
/// not read.
fn csv_failures(path: &Path, delimiter: u8, input: usize, marked: &impl Fn(usize, u64) -> bool) -> Vec<Recent> {
    use std::io::Read;
    let Ok(mut file) = File::open(path) else { return Vec::new() };
    let Ok(whole) = super::whole_csv_len(&mut file) else { return Vec::new() };
    let Ok(file) = File::open(path) else { return Vec::new() };
    let mut reader =
        csv::ReaderBuilder::new().has_headers(true).flexible(true).delimiter(delimiter).from_reader(file.take(whole));
    let mut found = Vec::new();
    let mut record = csv::ByteRecord::new();
    while let Ok(true) = reader.read_byte_record(&mut record) {
        let six = FAILURE_COLUMNS.len();
        if record.len() < six {
            continue;
        }
        let field = |i: usize| std::str::from_utf8(&record[record.len() - six + i]).unwrap_or_default().trim();
        let Ok(row) = field(0).parse::<u64>() else { continue };
        if marked(input, row) {
            continue;
        }
        let done = Done {
            status: field(3).parse().ok(),
            error: Some(field(2).to_string()),
            attempts: field(4).parse().unwrap_or(0),
            latency_us: 0,
            at_ms: 0,
        };
        found.push((Some(input), row, done));
    }
    found
}
