use std::sync::Arc;

use serde_json::Map;

use super::*;
use crate::input::{Format, Record};
use crate::outcome::{ErrorKind, Failure, Outcome, Source};

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
        origin: None,
        poll: None,
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
    let ledger = Ledger::open(dir.path(), false, MarkStarted::Written).unwrap();
    let len = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len();

    let mut group = GroupCommit::default();
    group.write(&mut writer, &[failed(1), failed(2)]).unwrap();
    assert_eq!(len("journal"), 0, "no mark before the sync");
    assert!(group.due().is_some());
    group.sync(&mut writer, &ledger).unwrap();
    let (failures_1, journal_1) = (len("failures.jsonl"), len("journal"));
    // The ledger as it was before this batch's marks (its rows' started
    // marks), then the batch's lines (one sync); the marks written after.
    assert_eq!(synced(dir.path()), [("journal".into(), 0), ("failures.jsonl".into(), failures_1)]);
    assert!(journal_1 > 0, "the marks are written");

    group.write(&mut writer, &[failed(3)]).unwrap();
    group.sync(&mut writer, &ledger).unwrap();
    assert!(group.due().is_none(), "nothing left to sync");
    // The next batch makes the first batch's marks durable (their lines
    // were made durable at the first sync), then its own lines; its marks
    // are written after.
    assert_eq!(synced(dir.path()), [("journal".into(), journal_1), ("failures.jsonl".into(), len("failures.jsonl"))]);
    let journal = std::fs::read_to_string(dir.path().join("journal")).unwrap();
    assert_eq!(journal.lines().filter(|l| l.starts_with("D\t0\t")).count(), 3);
}

#[tokio::test]
async fn started_marks_are_durable_before_a_row_goes_out_only_when_asked() {
    for sync_started in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let started = if sync_started { MarkStarted::Durable { in_doubt: 1 } } else { MarkStarted::Written };
        let ledger = Arc::new(Ledger::open(dir.path(), false, started).unwrap());
        let _marked = ledger.started(0, 1).await.unwrap();
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
fn recent_failures_of_a_resend_are_read_by_their_last_six_columns() {
    // A failures file of a failures file: the source columns before the
    // six, and values (a run directory's path among them) that span lines.
    let dir = tempfile::tempdir().unwrap();
    let text = "id,note,source_row,source_run,source_input,_row,_key,_error,_status,_attempts,_message\n\
        7,\"two\nlines, 5\",12,\"/runs/a,\nb\",1,1,7,client_error,422,2,no\n\
        8,plain,13,/runs/a,,2,8,server_error,500,1,\"quoted, \"\"here\"\"\"\n";
    std::fs::write(dir.path().join("failures.csv"), text).unwrap();
    let found = recent_outcomes(dir.path(), &[("failures.csv".to_string(), b',')], |_, _| false);
    let rows: Vec<_> = found.iter().map(|(i, row, d)| (*i, *row, d.status, d.error.clone(), d.attempts)).collect();
    assert_eq!(
        rows,
        [
            (Some(0), 1, Some(422), Some("client_error".into()), 2),
            (Some(0), 2, Some(500), Some("server_error".into()), 1)
        ]
    );
}

#[test]
fn a_failures_csv_keeps_the_columns_its_header_has_when_resumed() {
    use crate::input::{CsvHeaders, FAILURE_COLUMNS, Origin};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("failures.csv");
    // The header of a failures file read as input: `id`, then the six.
    let names = std::iter::once("id").chain(FAILURE_COLUMNS).map(String::from).collect();
    let headers = Arc::new(CsvHeaders::for_tests(names));
    let outcome = |n: u64| Outcome {
        source: Source::Record(Record::Csv { headers: headers.clone(), values: vec![format!("v{n}")] }),
        origin: Some(Origin { row: Some(40 + n), run: Some("/runs/a".into()), input: None }),
        ..failed(n)
    };
    let write = |append: bool, n: u64| {
        let inputs = vec![InputInfo { name: "failures.csv".into(), failures: "failures.csv".into() }];
        let mut writer = Writer::open(dir.path(), inputs, append, false, None).unwrap();
        writer.record(&outcome(n)).unwrap();
        writer.flush().unwrap();
    };
    write(false, 1);
    write(true, 2);
    let header = "id,source_row,source_run,source_input,_row,_key,_error,_status,_attempts,_message";
    let expected = format!(
        "{header}\nv1,41,/runs/a,,1,k1,client_error,400,1,HTTP 400\nv2,42,/runs/a,,2,k2,client_error,400,1,HTTP 400\n"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
    // A file an earlier session wrote without them: none are added.
    std::fs::write(&path, "id,_row,_key,_error,_status,_attempts,_message\n").unwrap();
    write(true, 3);
    let expected = "id,_row,_key,_error,_status,_attempts,_message\nv3,3,k3,client_error,400,1,HTTP 400\n";
    assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
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

#[test]
fn done_marks_read_back_as_they_were_written() {
    let dir = tempfile::tempdir().unwrap();
    let dones = [
        (0, 1, Done { status: Some(200), error: None, attempts: 1, latency_us: 5, at_ms: 9 }),
        (
            3,
            u64::MAX,
            Done { status: None, error: Some("timeout".into()), attempts: 4, latency_us: u64::MAX, at_ms: 0 },
        ),
        (
            usize::MAX,
            0,
            Done { status: Some(503), error: Some("server_error".into()), attempts: 0, latency_us: 0, at_ms: 1 },
        ),
    ];
    Ledger::recovered(dir.path(), &dones).unwrap();
    let journal = std::fs::read_to_string(dir.path().join("journal")).unwrap();
    assert!(journal.starts_with("D\t0\t1\t200\tok\t1\t5\t9\nD\t3\t18446744073709551615\t-\ttimeout\t4\t"), "{journal}");
    let mut read = Vec::new();
    Ledger::scan(dir.path(), |mark| {
        if let Mark::Done(input, row, done) = mark {
            read.push((input, row, done));
        }
    })
    .unwrap();
    assert_eq!(read, dones);
}

#[test]
fn a_written_line_is_due_for_its_sync_within_sync_every_of_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = vec![InputInfo { name: "rows.jsonl".into(), failures: "failures.jsonl".into() }];
    let mut writer = Writer::open(dir.path(), inputs, false, true, None).unwrap();
    let ledger = Ledger::open(dir.path(), false, MarkStarted::Written).unwrap();
    let mut group = GroupCommit::default();
    assert!(group.due().is_none(), "nothing written, nothing due");
    let before = std::time::Instant::now();
    group.write(&mut writer, &[failed(1)]).unwrap();
    let after = std::time::Instant::now();
    let due = group.due().expect("due once a line is written");
    assert!(due >= before + SYNC_EVERY && due <= after + SYNC_EVERY, "SYNC_EVERY after the line");
    // A later line shares the oldest one's sync: the window does not slide.
    std::thread::sleep(std::time::Duration::from_millis(2));
    group.write(&mut writer, &[failed(2)]).unwrap();
    assert_eq!(group.due(), Some(due));
    group.sync(&mut writer, &ledger).unwrap();
    assert!(group.due().is_none());
    assert_eq!(SYNC_EVERY, std::time::Duration::from_millis(10), "README's 10 ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_marks_share_one_sync_per_window_at_most() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(dir.path(), false, MarkStarted::Durable { in_doubt: 400 }).unwrap());
    let began = std::time::Instant::now();
    let rows: Vec<_> = (0..400u64)
        .map(|row| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.started(0, row).await })
        })
        .collect();
    let mut marked = Vec::new();
    for row in rows {
        marked.push(row.await.unwrap().unwrap());
    }
    let took = began.elapsed();
    // Every mark is on disk once its started() returned.
    let journal = std::fs::read_to_string(dir.path().join("journal")).unwrap();
    assert_eq!(journal.lines().filter(|l| l.starts_with("S\t0\t")).count(), 400);
    let syncs = synced(dir.path()).len() as u128;
    // One sync per COMMIT_WINDOW at most (the first one at once).
    assert!(syncs <= took.as_micros() / COMMIT_WINDOW.as_micros() + 1, "{syncs} syncs in {took:?}");
    assert!(syncs < 400, "marks share syncs: {syncs} for 400 rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_rows_are_marked_started_than_may_be_in_doubt_until_one_is_settled() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(dir.path(), false, MarkStarted::Durable { in_doubt: 3 }).unwrap());
    let marks_on_file = || {
        let journal = std::fs::read_to_string(dir.path().join("journal")).unwrap_or_default();
        journal.lines().filter(|l| l.starts_with("S\t")).count()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for row in 0..5u64 {
        let (ledger, tx) = (ledger.clone(), tx.clone());
        tokio::spawn(async move { tx.send((row, ledger.started(0, row).await.unwrap())).unwrap() });
    }
    let mut marked = Vec::new();
    for _ in 0..3 {
        marked.push(rx.recv().await.unwrap());
    }
    // Three rows marked and not settled: the other two wait, unwritten (a
    // crash now leaves three rows in doubt, not five).
    tokio::time::sleep(COMMIT_WINDOW * 20).await;
    assert!(rx.try_recv().is_err(), "a fourth row was marked while three were not settled");
    assert_eq!(marks_on_file(), 3);
    // One outcome written (its mark dropped): one more row is marked.
    drop(marked.remove(0));
    marked.push(rx.recv().await.unwrap());
    assert_eq!(marks_on_file(), 4);
    tokio::time::sleep(COMMIT_WINDOW * 20).await;
    assert!(rx.try_recv().is_err(), "one settled, one more marked");
    drop(marked);
    let _last = rx.recv().await.unwrap();
    assert_eq!(marks_on_file(), 5);
}

#[tokio::test]
async fn a_lanes_workers_wait_for_their_marks_through_one_follower() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(dir.path(), false, MarkStarted::Durable { in_doubt: 100 }).unwrap());
    let marks = Arc::new(ledger.marks());
    let rows: Vec<_> = (0..50u64)
        .map(|row| {
            let marks = marks.clone();
            tokio::spawn(async move { marks.started(0, row).await })
        })
        .collect();
    let mut marked = Vec::new();
    for row in rows {
        marked.push(row.await.unwrap().unwrap());
    }
    let journal = std::fs::read_to_string(dir.path().join("journal")).unwrap();
    let mut rows: Vec<u64> = journal.lines().map(|l| l.rsplit('\t').next().unwrap().parse().unwrap()).collect();
    rows.sort_unstable();
    assert_eq!(rows, (0..50).collect::<Vec<_>>(), "every mark on file once its started() returned");
    let syncs = synced(dir.path());
    assert!(!syncs.is_empty() && syncs.len() < 50, "marks share syncs: {syncs:?}");
}
