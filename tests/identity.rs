//! Rows keep their identity through a resend: a failures file fed back as
//! input numbers its rows from 1, but the results and failures of that run
//! carry the row and the run each record first came from, however many
//! times it is sent again (issue 17, item 7).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bulkcall::error::ExitCode;
use bulkcall::sandbox::{Fault, Faults, SandboxConfig};
use common::*;
use serde_json::{Value, json};

/// A sandbox where some keys answer 500 to their first two calls: sent
/// with `--max-attempts 1`, such a row fails in the first run and in the
/// first resend, and succeeds in the second.
fn twice_failing() -> SandboxConfig {
    let faults = Faults { server_errors: 0.5, transient_attempts: 2, ..Faults::default() };
    SandboxConfig { faults, ..sandbox_config() }
}

fn fails_twice(config: &SandboxConfig, key: &str) -> bool {
    config.faults.fault_for(key) == Some(Fault::ServerError)
}

fn canonical(dir: &Path) -> String {
    std::fs::canonicalize(dir).unwrap().display().to_string()
}

/// A failures CSV read by the CSV parser: its header and records.
fn csv_file(path: &Path) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let mut reader = csv::ReaderBuilder::new().from_path(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let records =
        reader.records().map(|r| header.iter().cloned().zip(r.unwrap().iter().map(String::from)).collect()).collect();
    (header, records)
}

/// Runs `job` over `input` into `gw`'s folder `name`, `--max-attempts 1`.
async fn hop(gw: &Gateway, job: &Path, input: &Path, name: &str) -> (PathBuf, ExitCode) {
    let out = gw.path(name);
    let code = gw.run_job(job, input, &out, &["--max-attempts", "1"]).await;
    (out, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_row_keeps_its_first_row_and_run_through_two_resends() {
    let config = twice_failing();
    let gw = Gateway::start(config.clone()).await;
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let mut rows = eligibility_csv(1, 12);
    // Always refused (not 9 digits), one with a value of two lines.
    rows.push_str("77,000050,Bad Control,0123456789,M77,Pat,Doe,19800102\n");
    rows.push_str("88,000050,\"Two\nlines\",0123456789,M88,Pat,Doe,19800102\n");
    let input = gw.write("rows.csv", &rows);
    let flaky: Vec<u64> = (1..=12).filter(|&n| fails_twice(&config, &key_of_row(n))).collect();
    assert!(!flaky.is_empty() && flaky.len() < 12, "some rows fail twice, some never: {flaky:?}");
    // The row each key was in, in the first run's input.
    let mut first_row: HashMap<String, u64> = (1..=12).map(|n| (key_of_row(n), n)).collect();
    first_row.insert("77".into(), 13);
    first_row.insert("88".into(), 14);

    let (first, code) = hop(&gw, &job, &input, "first").await;
    assert_eq!(code, ExitCode::RowsFailed);
    let first_run = canonical(&first);
    let results = jsonl(&first.join("results.jsonl"));
    assert!(results.iter().all(|r| r.get("source_row").is_none()), "a first run has no source: {results:?}");
    let (header, failures) = csv_file(&first.join("failures.csv"));
    assert_eq!(header[header.len() - 7..], ["dob", "_row", "_key", "_error", "_status", "_attempts", "_message"]);
    assert_eq!(failures.len(), flaky.len() + 2);

    // The first resend: every row fails again, numbered from 1 in its input.
    let (second, code) = hop(&gw, &job, &first.join("failures.csv"), "second").await;
    assert_eq!(code, ExitCode::RowsFailed);
    let (header, failures) = csv_file(&second.join("failures.csv"));
    let own =
        ["source_row", "source_run", "source_input", "_row", "_key", "_error", "_status", "_attempts", "_message"];
    assert_eq!(header[..8], header_of(&rows)[..], "the input's columns, unchanged");
    assert_eq!(header[8..], own, "the source columns, then the six: {header:?}");
    assert_eq!(failures.len(), flaky.len() + 2);
    for f in &failures {
        let key = &f["control_number"];
        assert_eq!(f["source_row"], first_row[key].to_string(), "{f:?}");
        assert_eq!(f["source_run"], first_run, "{f:?}");
        assert_eq!(f["source_input"], "", "one input: none named, as in results");
        assert!(f["_row"].parse::<u64>().unwrap() <= failures.len() as u64, "numbered in its own input: {f:?}");
    }
    let two_lines = failures.iter().find(|f| f["control_number"] == "88").unwrap();
    assert_eq!(two_lines["provider_name"], "Two\nlines");

    // The second resend: the flaky rows succeed, the refused ones fail
    // again; both still name the first run and their row in it.
    let (third, code) = hop(&gw, &job, &second.join("failures.csv"), "third").await;
    assert_eq!(code, ExitCode::RowsFailed);
    let results = jsonl(&third.join("results.jsonl"));
    assert_eq!(results.len(), flaky.len(), "{results:?}");
    for r in &results {
        let key = r["key"].as_str().unwrap();
        assert_eq!(r["source_row"], json!(first_row[key]), "{r}");
        assert_eq!(r["source_run"], json!(first_run), "{r}");
        assert!(r.get("source_input").is_none(), "{r}");
        assert!(r["row"].as_u64().unwrap() <= (flaky.len() + 2) as u64, "{r}");
    }
    let (header, failures) = csv_file(&third.join("failures.csv"));
    assert_eq!(header[8..], own);
    let refused: HashMap<&str, &HashMap<String, String>> =
        failures.iter().map(|f| (f["control_number"].as_str(), f)).collect();
    assert_eq!(refused.len(), 2, "{failures:?}");
    assert_eq!((refused["77"]["source_row"].as_str(), refused["88"]["source_row"].as_str()), ("13", "14"));
    assert!(failures.iter().all(|f| f["source_run"] == first_run));
    assert_eq!(refused["88"]["provider_name"], "Two\nlines");
}

fn header_of(csv: &str) -> Vec<String> {
    csv.lines().next().unwrap().split(',').map(String::from).collect()
}

/// After a crash that lost the done marks, the outcomes on file of a run
/// over a failures file are found again: the failure columns are still
/// the last six of each record, values of two lines included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_whose_marks_were_lost_is_recovered_from_its_failures_csv() {
    let config = twice_failing();
    let gw = Gateway::start(config.clone()).await;
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let mut rows = eligibility_csv(1, 12);
    rows.push_str("88,000050,\"Two\nlines, \"\"quoted\"\"\",0123456789,M88,Pat,Doe,19800102\n");
    let input = gw.write("rows.csv", &rows);
    let (first, _) = hop(&gw, &job, &input, "first").await;
    let (second, code) = hop(&gw, &job, &first.join("failures.csv"), "second").await;
    assert_eq!(code, ExitCode::RowsFailed);
    let failed = csv_file(&second.join("failures.csv")).1.len();
    let calls = gw.sandbox.stats().api_calls;

    // As if the process died after writing every outcome but before any
    // done mark: every row is started and not done.
    let journal = std::fs::read_to_string(second.join("journal")).unwrap();
    let kept: Vec<&str> = journal.lines().filter(|l| !l.starts_with("D\t")).collect();
    std::fs::write(second.join("journal"), kept.join("\n") + "\n").unwrap();
    std::fs::remove_file(second.join("summary.json")).unwrap();
    assert_eq!(started_not_done(&second).len(), failed);

    let code = gw.run(&["resume", second.to_str().unwrap()]).await;
    assert_eq!(code, ExitCode::RowsFailed);
    assert_eq!(gw.sandbox.stats().api_calls, calls, "every outcome on file is found: nothing is sent again");
    let (_, failures) = csv_file(&second.join("failures.csv"));
    assert_eq!(failures.len(), failed, "none written twice");
    assert_eq!(json(&second.join("summary.json"))["failed"], failed);
    let two_lines = failures.iter().find(|f| f["control_number"] == "88").unwrap();
    assert_eq!(two_lines["provider_name"], "Two\nlines, \"quoted\"");
    assert_eq!(two_lines["source_row"], "13");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jsonl_row_keeps_its_first_row_and_run_through_two_resends_and_a_results_file() {
    let config = twice_failing();
    let gw = Gateway::start(config.clone()).await;
    let job = gw.write(
        "eligibility.toml",
        r#"
url = "/medicalnetwork/eligibility/v3"
key = "{{ id }}"
idempotent = true
[body]
controlNumber = "{{ id }}"
subscriber = { memberId = "{{ member }}" }
"#,
    );
    let mut lines: Vec<String> =
        (1..=12).map(|n| json!({"id": key_of_row(n), "member": format!("M{n}")}).to_string()).collect();
    // Refused, and a record with fields of the names bulkcall adds.
    lines.push(json!({"id": "77", "member": "M77", "source_row": "mine"}).to_string());
    let input = gw.write("rows.jsonl", &lines.join("\n"));
    let flaky: Vec<u64> = (1..=12).filter(|&n| fails_twice(&config, &key_of_row(n))).collect();
    let mut first_row: HashMap<String, u64> = (1..=12).map(|n| (key_of_row(n), n)).collect();
    first_row.insert("77".into(), 13);

    let (first, _) = hop(&gw, &job, &input, "first").await;
    let first_run = canonical(&first);
    let failures = jsonl(&first.join("failures.jsonl"));
    assert!(failures.iter().all(|f| f.get("source_row").is_none()));
    let own = failures.iter().find(|f| f["_key"] == "77").unwrap();
    assert_eq!(own["_record"]["source_row"], "mine", "an input field of that name is kept whole: {own}");

    let (second, _) = hop(&gw, &job, &first.join("failures.jsonl"), "second").await;
    let failures = jsonl(&second.join("failures.jsonl"));
    assert_eq!(failures.len(), flaky.len() + 1);
    for f in &failures {
        let key = f["_key"].as_str().unwrap();
        assert_eq!(f["source_row"], json!(first_row[key]), "{f}");
        assert_eq!(f["source_run"], json!(first_run), "{f}");
        assert!(f.get("source_input").is_none(), "one input: none named: {f}");
    }
    let own = failures.iter().find(|f| f["_key"] == "77").unwrap();
    assert_eq!(own["_record"], json!({"id": "77", "member": "M77", "source_row": "mine"}));

    let (third, _) = hop(&gw, &job, &second.join("failures.jsonl"), "third").await;
    let results = jsonl(&third.join("results.jsonl"));
    assert_eq!(results.len(), flaky.len());
    for r in &results {
        let key = r["key"].as_str().unwrap();
        assert_eq!((&r["source_row"], &r["source_run"]), (&json!(first_row[key]), &json!(first_run)), "{r}");
    }
    let failures = jsonl(&third.join("failures.jsonl"));
    assert_eq!(failures.len(), 1);
    assert_eq!((&failures[0]["source_row"], &failures[0]["source_run"]), (&json!(13), &json!(first_run)));

    // A results file fed to a next job: its rows name where they first
    // came from, the first run's results through this run's.
    let next = gw.write(
        "next.toml",
        r#"
url = "/medicalnetwork/eligibility/v3"
key = "{{ key }}"
idempotent = true
[body]
controlNumber = "{{ key }}"
subscriber = { memberId = "M{{ row }}" }
"#,
    );
    for (run, results) in [(&first, "first-results"), (&third, "third-results")] {
        let (out, code) = hop(&gw, &next, &run.join("results.jsonl"), results).await;
        assert_eq!(code, ExitCode::Success);
        let next_results = jsonl(&out.join("results.jsonl"));
        assert_eq!(next_results.len(), jsonl(&run.join("results.jsonl")).len());
        for r in &next_results {
            let key = r["key"].as_str().unwrap();
            assert_eq!((&r["source_row"], &r["source_run"]), (&json!(first_row[key]), &json!(first_run)), "{r}");
        }
    }
}

/// A failures file copied out of its run directory has no run to name: its
/// records keep their row, with the run unknown, and that is kept too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failures_file_read_from_elsewhere_names_no_run() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let mut rows = eligibility_csv(1, 3);
    rows.push_str("77,000050,Bad Control,0123456789,M77,Pat,Doe,19800102\n");
    let input = gw.write("rows.csv", &rows);
    let (first, _) = hop(&gw, &job, &input, "first").await;
    let copy = gw.path("failures.csv");
    std::fs::copy(first.join("failures.csv"), &copy).unwrap();
    let (second, _) = hop(&gw, &job, &copy, "second").await;
    let (_, failures) = csv_file(&second.join("failures.csv"));
    assert_eq!((failures[0]["source_row"].as_str(), failures[0]["source_run"].as_str()), ("4", ""));
    let (third, _) = hop(&gw, &job, &second.join("failures.csv"), "third").await;
    let (_, failures) = csv_file(&third.join("failures.csv"));
    assert_eq!((failures[0]["source_row"].as_str(), failures[0]["source_run"].as_str()), ("4", ""));
    let _: Value = json(&third.join("summary.json"));
}

/// A first run with several inputs: each input has its failures file, and
/// a record sent again from one names that input too, however often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_of_one_of_several_inputs_keeps_its_input_through_two_resends() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let refused = |n: u64| format!("{n},000050,Bad Control,0123456789,M{n},Pat,Doe,19800102\n");
    let a = gw.write("a.csv", &(eligibility_csv(1, 2) + &refused(71)));
    let mut b = eligibility_csv(3, 3) + &refused(81);
    b.push_str(&refused(82));
    let b = gw.write("b.csv", &b);
    let first = gw.path("first");
    let code = gw
        .run(&["run", job.to_str().unwrap(), a.to_str().unwrap(), b.to_str().unwrap(), "-o", first.to_str().unwrap()])
        .await;
    assert_eq!(code, ExitCode::RowsFailed);
    let first_run = canonical(&first);
    let mut input = first.join("failures.b.csv");
    for name in ["second", "third"] {
        let (out, code) = hop(&gw, &job, &input, name).await;
        assert_eq!(code, ExitCode::RowsFailed);
        let (_, failures) = csv_file(&out.join("failures.csv"));
        let mut origins: Vec<(&str, &str, &str, &str)> = failures
            .iter()
            .map(|f| {
                let at = |c: &str| f[c].as_str();
                (at("control_number"), at("source_row"), at("source_run"), at("source_input"))
            })
            .collect();
        origins.sort();
        // Rows 4 and 5 of b.csv, its place in the first run's inputs 1.
        assert_eq!(origins, [("81", "4", first_run.as_str(), "1"), ("82", "5", first_run.as_str(), "1")], "{name}");
        input = out.join("failures.csv");
    }
}

/// The closing lines name a failed row of a resend by its row in this
/// run's input and in the first run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_closing_lines_name_the_first_runs_row() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let mut rows = eligibility_csv(1, 3);
    rows.push_str("77,000050,Bad Control,0123456789,M77,Pat,Doe,19800102\n");
    let input = gw.write("rows.csv", &rows);
    let (first, _) = hop(&gw, &job, &input, "first").await;
    let config = gw.path("bulkcall.toml");
    let output = run_command(&job, &first.join("failures.csv"), &gw.path("second"), &config).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("row 1 (key 77, first run's row 4): client_error, status 400"), "{stderr}");
}

/// A row of a job that polls (`[poll]`) keeps its origin too: its outcome
/// comes from the poll, after the row was read back from `accepted.jsonl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_row_keeps_its_first_row_and_run_through_two_resends() {
    let config = SandboxConfig { async_polls: 1, async_retry_after: std::time::Duration::ZERO, ..sandbox_config() };
    let gw = Gateway::start(config).await;
    let job = gw.write("claims-async.toml", &async_claims_job("10ms", "1m"));
    // The payer rejects a charge of 0: rows 2 and 4 fail every time.
    let rows: String = (1..=4).map(|i| format!("{i:09},{}\n", if i % 2 == 0 { "0" } else { "125.50" })).collect();
    let input = gw.write("claims.csv", &format!("control_number,charge\n{rows}"));
    let (first, code) = hop(&gw, &job, &input, "first").await;
    assert_eq!(code, ExitCode::RowsFailed);
    let first_run = canonical(&first);
    let mut input = first.join("failures.csv");
    for name in ["second", "third"] {
        let (out, code) = hop(&gw, &job, &input, name).await;
        assert_eq!(code, ExitCode::RowsFailed, "{name}");
        let (header, failures) = csv_file(&out.join("failures.csv"));
        assert_eq!(header[..5], ["control_number", "charge", "source_row", "source_run", "source_input"]);
        let mut origins: Vec<(&str, &str, &str, &str)> = failures
            .iter()
            .map(|f| {
                (f["control_number"].as_str(), f["_error"].as_str(), f["source_row"].as_str(), f["source_run"].as_str())
            })
            .collect();
        origins.sort();
        let run = first_run.as_str();
        assert_eq!(origins, [("000000002", "rejected", "2", run), ("000000004", "rejected", "4", run)], "{name}");
        input = out.join("failures.csv");
    }
}
