//! CSV: a header row, then data rows; UTF-8 with or without a BOM; `\n` or
//! `\r\n`; quoted fields may hold delimiters and newlines.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

use super::{BadRow, Earlier, FAILURE_COLUMNS, InputError, InputSpec, Item, Origin, Raw, Record, Row, SOURCE_COLUMNS};

/// The header of a CSV input: its column names, and whether it is a
/// failures file bulkcall wrote (its last six columns are then bulkcall's,
/// and the two before them too when they are the source columns).
#[derive(Debug)]
pub struct CsvHeaders {
    /// The record's own columns: every column of the file, but for a
    /// failures file's last six (or eight).
    names: Vec<String>,
    /// Looked up for every field a template names, in every row: hashed
    /// with FxHash rather than SipHash (a column name is no secret), which
    /// halves what a field of a row costs to find.
    by_name: rustc_hash::FxHashMap<String, usize>,
    /// The file ends every record with the six failure columns.
    failures: bool,
    /// A failures file whose records have the two source columns before the six.
    sourced: bool,
    /// The file's delimiter: a failures file is written with it.
    delimiter: u8,
}

impl CsvHeaders {
    fn new(mut names: Vec<String>, delimiter: u8) -> Result<CsvHeaders, String> {
        // Only a header that ends with the six failure columns is a failures
        // file's: then they are not fields, whatever the columns before them
        // are called. Elsewhere `_key` is a field like any.
        let failures = names.len() >= FAILURE_COLUMNS.len()
            && names[names.len() - FAILURE_COLUMNS.len()..].iter().zip(FAILURE_COLUMNS).all(|(n, c)| n == c);
        if failures {
            names.truncate(names.len() - FAILURE_COLUMNS.len());
        }
        // Before them, the source columns of a failures file of a failures
        // file (by position too).
        let sourced = failures
            && names.len() >= SOURCE_COLUMNS.len()
            && names[names.len() - SOURCE_COLUMNS.len()..].iter().zip(SOURCE_COLUMNS).all(|(n, c)| n == c);
        if sourced {
            names.truncate(names.len() - SOURCE_COLUMNS.len());
        }
        let mut by_name = rustc_hash::FxHashMap::with_capacity_and_hasher(names.len(), Default::default());
        for (pos, name) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(format!("column {} of the header has no name", pos + 1));
            }
            if by_name.insert(name.clone(), pos).is_some() {
                return Err(format!("the header names column `{name}` twice"));
            }
        }
        Ok(CsvHeaders { names, by_name, failures, sourced, delimiter })
    }

    /// A header made again from the names a record was stored with (an
    /// accepted row of a `[poll]` job, read back).
    /// `failures`: the input was a failures file (the outcome's own
    /// failures file then has the source columns).
    pub fn of_names(names: Vec<String>, delimiter: u8, failures: bool) -> CsvHeaders {
        let by_name = names.iter().enumerate().map(|(pos, name)| (name.clone(), pos)).collect();
        CsvHeaders { names, by_name, failures, sourced: false, delimiter }
    }

    #[cfg(test)]
    pub(crate) fn for_tests(names: Vec<String>) -> CsvHeaders {
        CsvHeaders::new(names, b',').expect("valid test header")
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn delimiter(&self) -> u8 {
        self.delimiter
    }

    /// Whether the file is a failures file bulkcall wrote: its records
    /// have an origin, and a failures file of them keeps it in the source
    /// columns.
    pub fn is_failures(&self) -> bool {
        self.failures
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
}

/// The file, read through an index of where its newlines are, so each
/// record's line is exact (the csv crate counts lines only between records).
struct Lines {
    file: Box<dyn Read>,
    offset: u64,
    /// Offsets of newlines read but not yet passed by the parser.
    newlines: VecDeque<u64>,
    passed: u64,
    /// The last byte read, and whether the file's end was reached.
    last: Option<u8>,
    eof: bool,
}

impl Read for Lines {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.newlines.extend(memchr::memchr_iter(b'\n', &buf[..n]).map(|i| self.offset + i as u64));
        self.offset += n as u64;
        match n {
            0 => self.eof = true,
            _ => self.last = Some(buf[n - 1]),
        }
        Ok(n)
    }
}

impl Lines {
    /// The 1-based line of the byte at `offset`.
    fn line_of(&mut self, offset: u64) -> u64 {
        while self.newlines.front().is_some_and(|&n| n < offset) {
            self.newlines.pop_front();
            self.passed += 1;
        }
        self.passed + 1
    }
}

type Reader = csv::Reader<Lines>;

fn reader(spec: &InputSpec, file: Box<dyn Read>) -> Reader {
    csv::ReaderBuilder::new()
        .delimiter(spec.delimiter)
        .has_headers(true)
        // A ragged row fails alone instead of stopping the file.
        .flexible(true)
        .buffer_capacity(256 * 1024)
        .from_reader(Lines { file, offset: 0, newlines: VecDeque::new(), passed: 0, last: None, eof: false })
}

/// The line a record starts on: the line of its last byte (the reader's
/// position is one past the first terminator byte), less the newlines
/// inside its quoted values.
/// The parser reads to the end of the file only for a record without a
/// terminator. If that record's last value ends with a newline and the
/// file does not end with a closing quote, a quote was left open: that
/// newline starts no line of the record.
/// Returns the line and whether a quote was left open.
fn record_line(rdr: &mut Reader, record: &csv::ByteRecord) -> (u64, bool) {
    let end = rdr.position().byte();
    let lines = rdr.get_mut();
    let last_line = lines.line_of(end.saturating_sub(1));
    let embedded: usize = record.iter().map(|f| memchr::memchr_iter(b'\n', f).count()).sum();
    let open_quote =
        lines.eof && lines.last != Some(b'"') && record.iter().next_back().is_some_and(|f| f.ends_with(b"\n"));
    (last_line.saturating_sub(embedded as u64) + u64::from(open_quote), open_quote)
}

fn read_headers(spec: &InputSpec, rdr: &mut Reader) -> Result<Arc<CsvHeaders>, InputError> {
    let err = |message: String| InputError::Format { path: spec.path.clone(), message };
    let raw = rdr.byte_headers().map_err(|e| err(format!("cannot read the header row: {e}")))?.clone();
    if raw.is_empty() || (raw.len() == 1 && raw[0].is_empty()) {
        return Err(err("the file is empty: a CSV input needs a header row naming its columns".into()));
    }
    let names = raw
        .iter()
        .map(|f| String::from_utf8(f.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| err("line 1: the header row is not valid UTF-8".into()))?;
    let names: Vec<String> = names.into_iter().map(|n| n.trim().to_string()).collect();
    CsvHeaders::new(names, spec.delimiter).map(Arc::new).map_err(|m| err(format!("line 1: {m}")))
}

/// Checks the header and that a data row follows; returns the column names.
pub(super) fn preflight(spec: &InputSpec, file: Box<dyn Read>) -> Result<Vec<String>, InputError> {
    let mut rdr = reader(spec, file);
    let headers = read_headers(spec, &mut rdr)?;
    let mut record = csv::ByteRecord::new();
    match rdr.read_byte_record(&mut record) {
        Ok(true) => Ok(headers.names.clone()),
        Ok(false) => Err(InputError::Format {
            path: spec.path.clone(),
            message: "the file has a header row but no data rows".into(),
        }),
        Err(e) => Err(csv_error(spec, e)),
    }
}

fn csv_error(spec: &InputSpec, e: csv::Error) -> InputError {
    match e.position() {
        Some(pos) => InputError::At { path: spec.path.clone(), line: pos.line(), column: 1, message: e.to_string() },
        None => InputError::Format { path: spec.path.clone(), message: e.to_string() },
    }
}

pub(super) fn read(
    input: usize,
    spec: &InputSpec,
    file: Box<dyn Read>,
    progress: &dyn Fn(u64),
    sink: &mut dyn FnMut(Item) -> bool,
) -> Result<bool, InputError> {
    let mut rdr = reader(spec, file);
    let headers = read_headers(spec, &mut rdr)?;
    let mut record = csv::ByteRecord::new();
    let mut number = 0u64;
    loop {
        match rdr.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            // Only I/O errors reach here: the reader is flexible and reads bytes.
            Err(e) => return Err(csv_error(spec, e)),
        }
        number += 1;
        let (line, open_quote) = record_line(&mut rdr, &record);
        if number.is_multiple_of(64) {
            progress(record.position().map_or(0, |p| p.byte()));
        }
        let item = to_row(input, number, line, open_quote, &headers, &record);
        if !sink(item) {
            return Ok(false);
        }
    }
    progress(rdr.position().byte());
    Ok(true)
}

fn to_row(
    input: usize,
    number: u64,
    line: u64,
    open_quote: bool,
    headers: &Arc<CsvHeaders>,
    record: &csv::ByteRecord,
) -> Item {
    let width = headers.names.len();
    // A failures file's record ends with the six failure columns (the
    // source columns before them, if it has them); the fields before them
    // are the record as its input had it.
    let sources = if headers.sourced { SOURCE_COLUMNS.len() } else { 0 };
    let own = sources + FAILURE_COLUMNS.len();
    let (fields, earlier) = if headers.failures && record.len() >= own {
        let at = record.len() - own;
        let column = |i: usize| std::str::from_utf8(&record[at + i]).unwrap_or_default();
        let mut earlier = Earlier::from_columns(std::array::from_fn(|i| column(sources + i)));
        if headers.sourced {
            earlier.origin = Some(Origin::from_columns(std::array::from_fn(column)));
        }
        (at, Some(Box::new(earlier)))
    } else {
        (record.len(), None)
    };
    // The bytes as they are, every field, so the failures file keeps them unchanged.
    let bad = |message: String| BadRow {
        input,
        number,
        line,
        message,
        raw: Raw::Csv { headers: headers.clone(), values: record.iter().take(fields).map(<[u8]>::to_vec).collect() },
        earlier: earlier.clone(),
    };
    if fields != width {
        let hint = if open_quote {
            let lines = 1 + record.iter().map(|f| memchr::memchr_iter(b'\n', f).count()).sum::<usize>();
            // The quote opened the record's last field: it took the rest of the file.
            let field = fields.checked_sub(1).and_then(|i| headers.names.get(i));
            let field = field.map(|name| format!(" in field `{name}`")).unwrap_or_default();
            format!(" (a quote is left open{field}: it runs {lines} lines to the end of the file)")
        } else if fields > width {
            " (an unquoted delimiter in a value?)".to_string()
        } else {
            String::new()
        };
        let message = format!("line {line}: has {fields} fields but the header has {width}{hint}");
        return Err(bad(message));
    }
    // A ragged row a failures file holds aligned, fed back as it was
    // written: its empty padding or joined last column are not values.
    if let Some(earlier) = &earlier
        && let Some((found, expected, how)) = still_ragged(earlier, record.iter().take(width), headers.delimiter)
        && expected == width
    {
        return Err(bad(format!(
            "line {line}: still as a failures file holds a row that has {found} fields but the header has \
             {expected} ({how}); fix its fields, then send it again"
        )));
    }
    let mut values = Vec::with_capacity(width);
    for (i, field) in record.iter().take(width).enumerate() {
        match std::str::from_utf8(field) {
            Ok(s) => values.push(s.to_string()),
            Err(_) => {
                return Err(bad(format!(
                    "line {line}: field `{}` is not valid UTF-8; if the file is Windows-1252, Latin-1 or UTF-16 (an Excel export), say so with `encoding` in the job (encoding = \"windows-1252\")",
                    headers.names[i]
                )));
            }
        }
    }
    Ok(Row { input, number, line, record: Record::Csv { headers: headers.clone(), values }, earlier })
}

/// Whether a failures file's record of a ragged row (its `_message` says
/// `has N fields but the header has M`) is still as bulkcall wrote it,
/// aligned with the header (`output::writer`): a short row's last `M - N`
/// fields empty, a long row's last field holding `N - M + 1` values joined
/// by the delimiter. Returns `N`, `M` and how it was written.
pub(crate) fn still_ragged<'a>(
    earlier: &Earlier,
    fields: impl Iterator<Item = &'a [u8]>,
    delimiter: u8,
) -> Option<(usize, usize, &'static str)> {
    if earlier.error != "invalid_row" {
        return None;
    }
    let (_, rest) = earlier.message.split_once("has ")?;
    let (found, rest) = rest.split_once(" fields but the header has ")?;
    let found: usize = found.parse().ok()?;
    let expected: usize = rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let fields: Vec<&[u8]> = fields.collect();
    if fields.len() != expected || found == expected || expected == 0 {
        return None;
    }
    if found < expected {
        fields[found..].iter().all(|f| f.is_empty()).then_some((found, expected, "the missing fields left empty"))
    } else {
        let joined = memchr::memchr_iter(delimiter, fields[expected - 1]).count() + 1;
        (joined == found - expected + 1).then_some((found, expected, "the extra fields joined into the last column"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Format, Origin, read_all};
    use super::*;
    use std::io::Write;

    fn read_text(bytes: &[u8], delimiter: u8) -> (Vec<Item>, Result<(), InputError>) {
        let mut f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        f.write_all(bytes).unwrap();
        let spec = InputSpec {
            path: f.path().to_path_buf(),
            format: Format::Csv,
            delimiter,
            encoding: super::super::Encoding::Utf8,
        };
        let mut items = vec![];
        let result = read_all(&[spec], &|_| {}, &mut |item| {
            items.push(item);
            true
        });
        (items, result)
    }

    fn fields(item: &Item) -> Vec<(String, String)> {
        let row = item.as_ref().unwrap();
        row.record.to_json().into_iter().map(|(k, v)| (k, v.as_str().unwrap().to_string())).collect()
    }

    #[test]
    fn a_quote_left_open_is_reported_on_its_own_line() {
        let (items, _) = read_text(b"a,b,c\n1,2,3\n7,\"8,9\n10,11,12\n13,14,15\n", b',');
        assert_eq!(items.len(), 2, "the open quote swallows the rest of the file into one record");
        let Err(bad) = &items[1] else { panic!("a bad row") };
        assert_eq!((bad.number, bad.line), (2, 3));
        assert!(bad.message.starts_with("line 3: has 2 fields"), "{}", bad.message);
        assert!(bad.message.contains("a quote is left open in field `b`"), "{}", bad.message);
        // Closed values that end in a newline, at the end of the file, with
        // every kind of ending; and a quote left open after an escaped quote.
        for (text, line) in [
            (&b"a,b\n0,x\n1,\"two\nlines\n\"\r\n"[..], 3),
            (b"a,b\n0,x\n1,\"two\nlines\n\"", 3),
            (b"a,b\n0,x\n1,\"two\nlines\n\"\r", 3),
            (b"a,b\n0,x\n1,\"ab\"\"\n", 3),
        ] {
            let (items, _) = read_text(text, b',');
            let last = items.last().unwrap();
            let got = match last {
                Ok(row) => (row.number, row.line),
                Err(bad) => (bad.number, bad.line),
            };
            assert_eq!(got, (2, line), "{:?}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn bom_crlf_and_quoted_newlines() {
        let (items, result) =
            read_text(b"\xEF\xBB\xBFid,note\r\n1,plain\r\n2,\"two\r\nlines, and a comma\"\r\n3,last\r\n", b',');
        result.unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(fields(&items[0]), [("id".into(), "1".into()), ("note".into(), "plain".into())]);
        assert_eq!(fields(&items[1])[1].1, "two\r\nlines, and a comma");
        let third = items[2].as_ref().unwrap();
        assert_eq!((third.number, third.line), (3, 5), "row 3 starts on line 5 after the two-line value");
    }

    #[test]
    fn other_delimiters() {
        let (items, result) = read_text(b"a;b\n1;2\n", b';');
        result.unwrap();
        assert_eq!(fields(&items[0]), [("a".into(), "1".into()), ("b".into(), "2".into())]);
        let (items, _) = read_text(b"a\tb\n1\t2\n", b'\t');
        assert_eq!(fields(&items[0])[1].1, "2");
    }

    #[test]
    fn ragged_and_non_utf8_rows_fail_alone() {
        let (items, result) = read_text(b"a,b\n1,2\n3\n4,5,6\n7,\xff\n8,9\n", b',');
        result.unwrap();
        assert_eq!(items.len(), 5);
        let short = items[1].as_ref().unwrap_err();
        assert_eq!((short.number, short.line), (2, 3));
        assert!(short.message.contains("has 1 fields but the header has 2"), "{}", short.message);
        assert!(items[2].as_ref().unwrap_err().message.contains("has 3 fields"));
        let bad = items[3].as_ref().unwrap_err();
        assert!(bad.message.contains("line 5: field `b` is not valid UTF-8"), "{}", bad.message);
        assert_eq!(fields(&items[4])[0].1, "8");
    }

    #[test]
    fn failure_columns_are_not_fields() {
        let (items, _) =
            read_text(b"id,_row,_key,_error,_status,_attempts,_message\n7,3,k,client_error,400,1,nope\n", b',');
        assert_eq!(fields(&items[0]), [("id".into(), "7".into())]);
    }

    #[test]
    fn empty_file_and_duplicate_columns_are_file_errors() {
        let mut f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        let spec = InputSpec {
            path: f.path().to_path_buf(),
            format: Format::Csv,
            delimiter: b',',
            encoding: super::super::Encoding::Utf8,
        };
        let err = super::super::preflight(std::slice::from_ref(&spec)).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        f.write_all(b"a,b\n").unwrap();
        let err = super::super::preflight(std::slice::from_ref(&spec)).unwrap_err().to_string();
        assert!(err.contains("no data rows"), "{err}");
        let (_, result) = read_text(b"a,a\n1,2\n", b',');
        assert!(result.unwrap_err().to_string().contains("`a` twice"));
    }

    #[test]
    fn failure_columns_are_dropped_only_from_a_failures_file() {
        let (items, _) = read_text(b"id;_key;_row\n1;k;9\n", b';');
        assert_eq!(
            fields(&items[0]),
            [("id".into(), "1".into()), ("_key".into(), "k".into()), ("_row".into(), "9".into())]
        );
        let failures = b"id;_row;_key;_error;_status;_attempts;_message\n1;3;k;client_error;400;1;x\n";
        let (items, _) = read_text(failures, b';');
        assert_eq!(fields(&items[0]), [("id".to_string(), "1".to_string())]);
    }

    #[test]
    fn source_columns_before_the_six_are_where_a_record_first_came_from() {
        let origin = |item: &Item| {
            let earlier = match item {
                Ok(row) => row.earlier.as_deref(),
                Err(bad) => bad.earlier.as_deref(),
            };
            earlier.and_then(|e| e.origin.clone())
        };
        let text = b"id,source_row,source_run,source_input,_row,_key,_error,_status,_attempts,_message\n\
            7,3,/runs/a,,1,k,client_error,400,1,no\n\
            8,,,,2,k,client_error,400,1,no\n\
            9,extra,4,/runs/b,1,3,k,invalid_row,,0,ragged\n";
        let (items, _) = read_text(text, b',');
        assert_eq!(fields(&items[0]), [("id".into(), "7".into())]);
        assert_eq!(origin(&items[0]), Some(Origin { row: Some(3), run: Some("/runs/a".into()), input: None }));
        assert_eq!(origin(&items[1]), Some(Origin::default()), "kept unknown, not made this file's");
        let ragged = items[2].as_ref().unwrap_err();
        assert!(matches!(&ragged.raw, Raw::Csv { values, .. } if values.len() == 2), "{ragged:?}");
        assert_eq!(origin(&items[2]), Some(Origin { row: Some(4), run: Some("/runs/b".into()), input: Some(1) }));
        // A failures file of a first run: the record's own row (and no run:
        // this file is in no run directory).
        let (items, _) =
            read_text(b"id,_row,_key,_error,_status,_attempts,_message\n7,5,k,client_error,400,1,x\n", b',');
        assert_eq!(origin(&items[0]), Some(Origin { row: Some(5), ..Origin::default() }));
        // Elsewhere, fields like any.
        let (items, _) = read_text(b"id,source_row,source_run,source_input\n7,3,x,1\n", b',');
        assert_eq!(fields(&items[0]).len(), 4);
        assert!(items[0].as_ref().unwrap().earlier.is_none());
    }

    #[test]
    fn a_value_not_in_utf8_names_the_encoding_setting() {
        let (items, _) = read_text(b"id,name\n1,Zo\xEB\n", b',');
        let bad = items[0].as_ref().unwrap_err();
        assert!(
            bad.message.contains("field `name` is not valid UTF-8") && bad.message.contains("`encoding`"),
            "{}",
            bad.message
        );
    }
}
