//! The runner end to end: the real command line, in-process, against the
//! in-process sandbox, asserting on what the gateway received and on the
//! files of the run directory.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bulkcall::error::ExitCode;
use common::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// With 64 workers a machine with two cores or more runs two lanes or
/// more: rows and outcomes still meet exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_lanes_every_row_is_sent_once_and_recorded_once() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(400_000_001, 5000));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let out = gw.path("run");

    let code = gw.run_job(&job, &input, &out, &["-j", "64"]).await;
    assert_eq!(code, ExitCode::Success);
    let received = gw.received_by_control_number();
    assert_eq!(received.len(), 5000);
    assert!(received.values().all(|calls| calls.len() == 1), "every key sent once");
    let results = jsonl(&out.join("results.jsonl"));
    let rows: HashSet<u64> = results.iter().map(|r| r["row"].as_u64().unwrap()).collect();
    assert_eq!((results.len(), rows.len()), (5000, 5000), "every row exactly once in results");
    let journal = std::fs::read_to_string(out.join("journal")).unwrap();
    let marks = |kind: &str| journal.lines().filter(|l| l.starts_with(kind)).count();
    assert_eq!((marks("S\t"), marks("D\t")), (5000, 5000), "one started and one done mark per row");
    assert_eq!(json(&out.join("summary.json"))["succeeded"], 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_csv_row_is_sent_once_and_recorded_once() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(100_000_001, 2000));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    gw.config(SECRET, "headers.x-static = \"on-every-call\"");
    let out = gw.path("run");

    let code = gw.run_job(&job, &input, &out, &["-j", "16"]).await;
    assert_eq!(code, ExitCode::Success);

    let received = gw.received_by_control_number();
    assert_eq!(received.len(), 2000, "the gateway saw every key");
    for (key, calls) in &received {
        assert_eq!(calls.len(), 1, "key {key} sent once");
        let call = &calls[0];
        let n: u64 = key.parse().unwrap();
        assert_eq!(call.body["provider"]["organizationName"], format!("Clinic {n}, LLC"));
        assert_eq!(call.body["subscriber"]["memberId"], format!("M{n}"));
        assert_eq!(call.body["subscriber"]["dateOfBirth"], "19800102");
        let header = |name: &str| call.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(header("x-static"), Some("on-every-call"));
        assert_eq!(header("environment"), Some("sandbox"));
        assert_eq!(header("x-request-id"), Some(format!("req-{key}").as_str()));
        assert_eq!(header("content-type"), Some("application/json"));
    }
    let stats = gw.sandbox.stats();
    assert_eq!(stats.token_requests, 1, "one token for the whole run");
    assert_eq!(stats.unauthorized, 0);

    let results = jsonl(&out.join("results.jsonl"));
    let keys: HashSet<&str> = results.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!((results.len(), keys.len()), (2000, 2000), "every key exactly once in results");
    let first = results.iter().find(|r| r["row"] == 1).unwrap();
    assert_eq!(first["key"], "100000001");
    assert_eq!(first["status"], 200);
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["response"]["controlNumber"], "100000001", "the answer is kept as JSON");
    assert!(!out.join("failures.csv").exists());

    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["total"], 2000);
    assert_eq!(summary["succeeded"], 2000);
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["attempts"], 2000);
    assert_eq!(summary["retries"], 0);
    assert_eq!(summary["token_requests"], 1);
    assert_eq!(summary["statuses"]["200"], 2000);
    assert_eq!(summary["exit_code"], 0);

    let run = json(&out.join("run.json"));
    assert_eq!(run["profile"], "test");
    assert_eq!(run["inputs"][0]["size"], std::fs::metadata(&input).unwrap().len());
    assert_eq!(run["inputs"][0]["sha256"].as_str().unwrap().len(), 64);
    let run_text = std::fs::read_to_string(out.join("run.json")).unwrap();
    assert!(!run_text.contains(SECRET), "run.json holds no secret");

    // Outputs hold PHI: 0700 directory, 0600 files.
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o700);
    for file in ["results.jsonl", "summary.json", "run.json"] {
        assert_eq!(std::fs::metadata(out.join(file)).unwrap().permissions().mode() & 0o777, 0o600, "{file}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_rows_keep_their_types_and_json_lines_skip_blank_lines() {
    let gw = Gateway::start(sandbox_config()).await;
    let records = json!([
        {"controlNumber": "000000001", "subscriber": {"memberId": "A1", "tags": ["x", "y"]}, "amount": 12.5, "count": 3, "ok": true, "none": null},
        {"controlNumber": "000000002", "subscriber": {"memberId": "A2", "tags": []}, "amount": 0, "count": -1, "ok": false, "none": null}
    ]);
    let input = gw.write("rows.json", &serde_json::to_string_pretty(&records).unwrap());
    let job = gw.write(
        "whole.toml",
        "url = \"/medicalnetwork/eligibility/v3\"\nkey = \"{{ controlNumber }}\"\nbody = \"{{ row }}\"\n",
    );
    let out = gw.path("run-json");
    let code = gw.run_job(&job, &input, &out, &[]).await;
    assert_eq!(code, ExitCode::Success);
    let received = gw.received_by_control_number();
    for record in records.as_array().unwrap() {
        let key = record["controlNumber"].as_str().unwrap();
        assert_eq!(received[key][0].body, *record, "the record arrives as it was, types intact");
    }

    let lines = "{\"controlNumber\": \"000000003\", \"subscriber\": {\"memberId\": \"B\"}, \"n\": 1}\n\n\n{\"controlNumber\": \"000000004\", \"subscriber\": {\"memberId\": \"C\"}, \"n\": 2.5}\n   \n";
    let input = gw.write("rows.jsonl", lines);
    let out = gw.path("run-jsonl");
    let code = gw.run_job(&job, &input, &out, &[]).await;
    assert_eq!(code, ExitCode::Success);
    let results = jsonl(&out.join("results.jsonl"));
    let rows: HashSet<u64> = results.iter().map(|r| r["row"].as_u64().unwrap()).collect();
    assert_eq!(rows, HashSet::from([1, 2]), "blank lines are not rows");
    assert_eq!(gw.received_by_control_number()["000000004"][0].body["n"], 2.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rows_land_in_failures_that_can_be_fed_back() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write(
        "claims.toml",
        r#"
url = "/medicalnetwork/claimstatus/v2"
key = "{{ id }}"
[body]
controlNumber = "{{ id }}"
subscriber = { memberId = "{{ member.id }}", lastName = "{{ member.last }}" }
"#,
    );
    let input = gw.write(
        "claims.jsonl",
        &[
            r#"{"id": "000000001", "member": {"id": "M1", "last": "Doe"}}"#,
            r#"{"id": "12", "member": {"id": "M2", "last": "Roe"}}"#,
            r#"{"id": "000000003", "member": {"id": "M3"}}"#,
            r#"{"id": "000000004", "member": {"id": "M4", "last": "Poe"}"#,
            r#"{"id": "000000005", "member": {"id": "M5", "last": "Moe"}}"#,
        ]
        .join("\n"),
    );
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &[]).await;
    assert_eq!(code, ExitCode::RowsFailed);

    let received = gw.received_by_control_number();
    assert_eq!(received["12"].len(), 1, "a 400 is sent once, never retried");
    assert!(!received.contains_key("000000003"), "a row missing a template field is never sent");
    assert_eq!(received.len(), 3);

    let failures = jsonl(&out.join("failures.jsonl"));
    assert_eq!(failures.len(), 3);
    let by_row = |n: u64| failures.iter().find(|f| f["_row"] == n).unwrap_or_else(|| panic!("row {n} in failures"));
    let rejected = by_row(2);
    assert_eq!(rejected["_error"], "client_error");
    assert_eq!(rejected["_status"], 400);
    assert_eq!(rejected["_attempts"], 1);
    assert_eq!(rejected["member"], json!({"id": "M2", "last": "Roe"}), "original fields unchanged");
    let invalid = by_row(3);
    assert_eq!(invalid["_error"], "invalid_row");
    assert_eq!(invalid["_attempts"], 0);
    let message = invalid["_message"].as_str().unwrap();
    assert_eq!(message, "claims.jsonl line 3: field `member.last` is missing (used in body.subscriber.lastName)");
    let broken = by_row(4);
    assert_eq!(broken["_error"], "invalid_row");
    assert!(broken["_raw"].as_str().unwrap().contains("000000004"));
    let results = jsonl(&out.join("results.jsonl"));
    assert_eq!(results.len(), 2);
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["succeeded"].as_u64(), summary["failed"].as_u64()), (Some(2), Some(3)));
    assert_eq!(summary["errors"], json!({"invalid_row": 2, "client_error": 1}));

    // Fed back as input, the failures file sends exactly those rows again.
    let calls_before = gw.sandbox.stats().api_calls;
    let again = gw.path("again");
    let code = gw
        .run(&[
            "run",
            job.to_str().unwrap(),
            out.join("failures.jsonl").to_str().unwrap(),
            "-o",
            again.to_str().unwrap(),
        ])
        .await;
    assert_eq!(code, ExitCode::RowsFailed);
    assert_eq!(gw.sandbox.stats().api_calls - calls_before, 1, "only the row that was sent before is sent again");
    assert_eq!(gw.received_by_control_number()["12"].len(), 2);
    let failures = jsonl(&again.join("failures.jsonl"));
    assert_eq!(failures.len(), 3, "the same three rows fail the same way");
    assert!(failures.iter().all(|f| f.get("_raw").is_none() || f["_error"] == "invalid_row"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_csv_keeps_the_input_columns_and_feeds_back() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let mut csv = eligibility_csv(1, 3);
    csv.push_str("77,000050,Bad Control,0123456789,M77,Pat,Doe,19800102\n");
    csv.push_str("000000005,000050,Too few columns\n");
    let input = gw.write("rows.csv", &csv);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &[]).await;
    assert_eq!(code, ExitCode::RowsFailed);

    let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    // Every record lines up with the header (the reader is not flexible).
    let mut reader = csv::ReaderBuilder::new().from_reader(failures.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        header,
        [
            "control_number",
            "payer_id",
            "provider_name",
            "npi",
            "member_id",
            "first_name",
            "last_name",
            "dob",
            "_row",
            "_key",
            "_error",
            "_status",
            "_attempts",
            "_message"
        ]
    );
    let rows: Vec<Vec<String>> = reader.records().map(|r| r.unwrap().iter().map(String::from).collect()).collect();
    assert_eq!(rows.len(), 2);
    let bad = rows.iter().find(|r| r[0] == "77").unwrap();
    assert_eq!(&bad[8..13], ["4", "77", "client_error", "400", "1"]);
    // The ragged row keeps its own three fields in their columns, the
    // missing five empty, the six columns after them.
    let ragged = rows.iter().find(|r| r[0] == "000000005").unwrap();
    assert_eq!(ragged.len(), 8 + 6, "{ragged:?}");
    assert_eq!(&ragged[..8], ["000000005", "000050", "Too few columns", "", "", "", "", ""]);
    assert_eq!((ragged[8].as_str(), ragged[10].as_str()), ("5", "invalid_row"));
    let message = &ragged[13];
    assert!(
        message.contains("rows.csv: line 6: has 3 fields but the header has 8"),
        "file, line, found and expected: {message}"
    );

    let again = gw.path("again");
    let code = gw
        .run(&["run", job.to_str().unwrap(), out.join("failures.csv").to_str().unwrap(), "-o", again.to_str().unwrap()])
        .await;
    assert_eq!(code, ExitCode::RowsFailed);
    let received = gw.received_by_control_number();
    assert_eq!(received["77"].len(), 2, "fed back, the 400 row is sent again");
    // The ragged row comes back as it was written, its missing fields
    // empty: it fails again, unsent (never sent with the padding as
    // values), until it is fixed in the file.
    assert!(!received.contains_key("000000005"));
    assert_eq!(gw.sandbox.stats().api_calls, 5);
    let mut reader = csv::ReaderBuilder::new().from_path(again.join("failures.csv")).unwrap();
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    // Before the six, where it first came from: row 5 of the first run.
    let ragged = records.iter().find(|r| &r[0] == "000000005").unwrap();
    assert_eq!((ragged.len(), &ragged[8], &ragged[13]), (8 + 3 + 6, "5", "invalid_row"), "{ragged:?}");
    assert!(ragged[16].contains("has 3 fields but the header has 8 (the missing fields left empty)"), "{ragged:?}");

    // Fixed in the file (its fields filled in), it goes out.
    let fixed = again.join("failures.csv");
    let text = std::fs::read_to_string(&fixed).unwrap();
    let text =
        text.replace("000000005,000050,Too few columns,,,,,", "000000005,000050,Fixed,0123456789,M5,Pat,Doe,19800102");
    std::fs::write(&fixed, text).unwrap();
    let code = gw
        .run(&["run", job.to_str().unwrap(), fixed.to_str().unwrap(), "-o", gw.path("fixed").to_str().unwrap()])
        .await;
    assert_eq!(code, ExitCode::RowsFailed, "77 fails again");
    assert_eq!(gw.received_by_control_number()["000000005"].len(), 1, "the fixed row is sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_spaces_every_call() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 200));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &["--rate", "100", "--burst", "1"]).await;
    assert_eq!(code, ExitCode::Success);
    // Judged on the calls' arrivals, first to last, not on the run's time
    // (which holds the token request too): 199 gaps at 100/s paced
    // `HEADROOM` (2%) below it, 10.2 ms each.
    let mut arrivals: Vec<Duration> = gw.sandbox.recorded().iter().map(|c| c.at).collect();
    arrivals.sort();
    let span = arrivals[199] - arrivals[0];
    let paced = Duration::from_secs_f64(199.0 / (100.0 * (1.0 - bulkcall::limiter::HEADROOM)));
    // The last call may go `SLACK` before its slot, and the first may reach
    // the gateway up to 5 ms later than the last does after its send (a
    // loopback hop on a busy host): no more early than that.
    let early = bulkcall::limiter::SLACK + Duration::from_millis(5);
    assert!(span >= paced - early, "200 calls in {span:?}, at least {:?} at 100/s", paced - early);
    // Not far below the rate either: losing a third of it (as a tolerance
    // in whole periods once did to timer lateness) would take 3 s. A slot
    // given up by a call woken more than `LATE` after it costs a period;
    // half as long again leaves room for 100 of them on a loaded host.
    assert!(span < paced.mul_f64(1.5), "200 calls in {span:?}: far below 100/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_refreshed_before_they_expire() {
    let gw =
        Gateway::start(bulkcall::sandbox::SandboxConfig { token_lifetime: Duration::from_secs(2), ..sandbox_config() })
            .await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 500));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &["--rate", "100", "-j", "32"]).await;
    assert_eq!(code, ExitCode::Success);
    let stats = gw.sandbox.stats();
    assert_eq!(stats.expired_token_calls, 0, "no call carried an expired token");
    assert_eq!(stats.unknown_token_calls, 0);
    assert_eq!(stats.unauthorized, 0);
    // A 2 s token is refreshed in its advisory window, 0.75-1 s before it
    // expires (a quarter of jitter): 1 to 1.25 s after it was fetched, by
    // the first call after that (calls are 10 ms apart), whose refresh
    // reaches the gateway within 100 ms on a busy host.
    let tokens = gw.sandbox.token_request_times();
    for pair in tokens.windows(2) {
        let gap = pair[1] - pair[0];
        let (soonest, latest) = (Duration::from_secs(1), Duration::from_millis(1250 + 10 + 100));
        assert!(gap >= soonest && gap <= latest, "a token refreshed {gap:?} after the one before: {tokens:?}");
    }
    // And refreshed for as long as the calls went on: the last token was
    // fetched less than its 1.25 s (and the margin) before the last call.
    let last_call = gw.sandbox.recorded().iter().map(|c| c.at).max().unwrap();
    let last_token = *tokens.last().unwrap();
    assert!(last_call - last_token < Duration::from_millis(1360), "no token after {last_token:?}: {tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_replaced_once_not_once_per_worker() {
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig { record: false, ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 600));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let out = gw.path("run");
    let args: Vec<String> = [
        "run",
        job.to_str().unwrap(),
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--rate",
        "200",
        "-j",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = {
        let gw = &gw;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            gw.run(&args).await
        }
    };
    let revoke = async {
        gw.wait_for_calls(200).await;
        gw.sandbox.revoke_all_tokens();
    };
    let (code, ()) = tokio::join!(run, revoke);
    assert_eq!(code, ExitCode::Success, "every row still succeeds");
    let stats = gw.sandbox.stats();
    assert!(stats.unauthorized > 0, "the revocation was seen");
    assert_eq!(stats.token_requests, 2, "one refresh for all 64 workers");
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["attempts"], 600, "the resend after a 401 is not an attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_token_endpoint_is_retried() {
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig { fail_token_requests: 3, ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 20));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &[]).await;
    assert_eq!(code, ExitCode::Success);
    assert_eq!(gw.sandbox.stats().token_requests, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_runs_finish_calls_in_flight_and_write_the_summary() {
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig {
        latency: Duration::from_millis(50),
        record: false,
        ..sandbox_config()
    })
    .await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 2000));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let out = gw.path("run");
    let stop = CancellationToken::new();
    let args = ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()];
    let run = gw.run_until(&args, stop.clone());
    let interrupt = async {
        gw.wait_for_calls(100).await;
        stop.cancel();
    };
    let (code, ()) = tokio::join!(run, interrupt);
    assert_eq!(code, ExitCode::Interrupted);
    let results = jsonl(&out.join("results.jsonl"));
    let sent = gw.sandbox.stats().api_calls as usize;
    assert_eq!(results.len(), sent, "every call that went out has its outcome recorded");
    assert!(sent < 2000);
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["exit_code"], 130);
    assert_eq!(summary["total"].as_u64(), Some(sent as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_and_dry_run_send_nothing() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("claims.toml", "url = \"/claims/{{ id }}\"\n[body]\nmember = \"{{ member }}\"\n");
    let input = gw
        .write("claims.jsonl", "{\"id\": \"a/1\", \"member\": \"M1\"}\n{\"id\": 2}\n{\"id\": 3, \"member\": \"M3\"}\n");
    let code = gw.run(&["validate", job.to_str().unwrap(), input.to_str().unwrap()]).await;
    assert_eq!(code, ExitCode::RowsFailed, "row 2 has no `member`");

    let out = gw.path("dry");
    let code = gw
        .run(&["run", job.to_str().unwrap(), input.to_str().unwrap(), "--dry-run", "-o", out.to_str().unwrap()])
        .await;
    assert_eq!(code, ExitCode::RowsFailed);
    let stats = gw.sandbox.stats();
    assert_eq!((stats.api_calls, stats.token_requests), (0, 0), "nothing sent, no token fetched");
    let requests = jsonl(&out.join("requests.jsonl"));
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0]["url"], format!("{}/claims/a%2F1", gw.sandbox.base_url()));
    assert_eq!(requests[0]["headers"]["authorization"], "Bearer <redacted>");
    assert_eq!(requests[0]["headers"]["environment"], "sandbox");
    assert_eq!(requests[0]["body"], json!({"member": "M1"}));
    let failures = jsonl(&out.join("failures.jsonl"));
    assert_eq!(failures[0]["_row"], 2);
    assert_eq!(failures[0]["_error"], "invalid_row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_inputs_share_one_token_and_name_their_file() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let a = gw.write("a.csv", &eligibility_csv(1, 30));
    let b = gw.write("b.csv", &eligibility_csv(101, 20));
    let out = gw.path("run");
    let code = gw
        .run(&["run", job.to_str().unwrap(), a.to_str().unwrap(), b.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .await;
    assert_eq!(code, ExitCode::Success);
    let results = jsonl(&out.join("results.jsonl"));
    assert_eq!(results.len(), 50);
    assert_eq!(results.iter().filter(|r| r["input"] == "b.csv").count(), 20);
    assert!(results.iter().any(|r| r["input"] == "b.csv" && r["row"] == 1 && r["key"] == "000000101"));
    assert!(results.iter().all(|r| r["input_index"] == if r["input"] == "b.csv" { 1 } else { 0 }));
    assert_eq!(gw.sandbox.stats().token_requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_stop_before_any_call() {
    let gw = Gateway::start(sandbox_config()).await;
    gw.config("not-the-secret", "");
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 10));
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &[]).await;
    assert_eq!(code, ExitCode::Auth);
    assert_eq!(gw.sandbox.stats().api_calls, 0);
    assert_eq!(gw.sandbox.stats().token_requests, 1, "a rejection is not retried");
    assert!(!out.exists(), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_and_max_failures_stop_early() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 100));
    let out = gw.path("limited");
    let code = gw
        .run(&["run", job.to_str().unwrap(), input.to_str().unwrap(), "--limit", "7", "-o", out.to_str().unwrap()])
        .await;
    assert_eq!(code, ExitCode::Success);
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 7);

    // Control numbers of two digits are refused by the gateway with 400.
    let mut bad = String::from("control_number,payer_id,provider_name,npi,member_id,first_name,last_name,dob\n");
    for i in 0..200 {
        bad.push_str(&format!("{},000050,C,0123456789,M,P,D,19800102\n", i % 90 + 10));
    }
    let input = gw.write("bad.csv", &bad);
    let out = gw.path("aborted");
    let code = gw
        .run(&[
            "run",
            job.to_str().unwrap(),
            input.to_str().unwrap(),
            "--max-failures",
            "5",
            "-j",
            "2",
            "-o",
            out.to_str().unwrap(),
        ])
        .await;
    assert_eq!(code, ExitCode::MaxFailures);
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["exit_code"], 4);
    // Every row fails once (a 400 is not retried), and every failure is
    // recorded. The recorder counts them: the fifth stops the run, and the
    // calls that went on meanwhile are at most those in flight and those
    // whose outcomes wait for the recorder, README's bound on rows in doubt
    // (130 at -j 2; measured: 6 to 15 calls in all), short of the 200 rows.
    let calls = gw.sandbox.stats().api_calls - 7;
    let most = 5 + in_doubt_at_most(2, true) as u64;
    assert!(calls >= 5 && calls <= most, "{calls} calls for --max-failures 5 at -j 2 (at most {most})");
    assert_eq!(summary["failed"].as_u64(), Some(calls), "{summary}");
    // The abort is told once, and why.
    assert_eq!(event_kinds(&out), ["start", "abort", "end"]);
    let abort = &jsonl(&out.join("events.jsonl"))[1];
    assert_eq!((abort["reason"].as_str(), abort["exit"].as_u64()), (Some("max_failures"), Some(4)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_run_with_exit_74() {
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig { record: false, ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 200));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let out = gw.path("run");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink("/dev/full", out.join("results.jsonl")).unwrap();
    let code = tokio::time::timeout(Duration::from_secs(30), gw.run_job(&job, &input, &out, &[]))
        .await
        .expect("the run ends instead of hanging");
    assert_eq!(code, ExitCode::Io);
    assert!(gw.sandbox.stats().api_calls < 200, "sending stopped when outcomes could not be written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_answers_are_kept_cut_with_a_marker() {
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig { record: false, ..sandbox_config() }).await;
    gw.config(SECRET, "max_response_bytes = 64");
    let input = gw.write("rows.csv", &eligibility_csv(1, 3));
    let job = gw.write("eligibility.toml", common::ELIGIBILITY_JOB);
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, ExitCode::Success, "a long answer is not a failure");
    for line in jsonl(&out.join("results.jsonl")) {
        assert_eq!(line["response_truncated"], true);
        assert!(line["response_bytes"].as_u64().unwrap() > 64);
        assert_eq!(line["response"].as_str().unwrap().len(), 64, "the first bytes, kept as text");
    }
}
