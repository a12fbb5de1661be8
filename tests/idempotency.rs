//! Non-idempotent jobs (a claim submission): a row is sent again only when
//! the gateway provably did not act on it; a row whose fate is unknown
//! fails as `in_doubt`. With `idempotency_key` the same key goes out on
//! every attempt, and rows are retried as for any idempotent job.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bulkcall::error::ExitCode;
use bulkcall::sandbox::{Fault, Faults, RecordedCall, SandboxConfig};
use common::*;

/// How many calls the gateway received for each control number.
fn sent_per_row(gw: &Gateway) -> HashMap<String, usize> {
    gw.received_by_control_number().into_iter().map(|(k, calls)| (k, calls.len())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_job_without_a_key_says_once_at_start_what_that_means_for_retries() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 5));
    let line = "is not idempotent";
    for (name, job, expected) in [
        ("claims.toml", CLAIMS_JOB.to_string(), 1),
        ("keyed.toml", claims_job_with_key(), 0),
        ("query.toml", ELIGIBILITY_JOB.to_string(), 0),
    ] {
        let job = gw.write(name, &job);
        let out = gw.path(&format!("run-{name}"));
        let output = run_command(&job, &input, &out, &config).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        assert_eq!(stderr.matches(line).count(), expected, "{name}: {stderr}");
        if expected == 1 {
            assert!(stderr.contains("idempotency_key") && stderr.contains("in_doubt"), "{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_fails_the_rows_in_doubt_of_a_non_idempotent_job_by_default() {
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(200), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 100));
    let job = gw.write("claims.toml", CLAIMS_JOB);
    let out = gw.path("run");
    let mut child = run_command(&job, &input, &out, &config).args(["-j", "8"]).spawn().unwrap();
    gw.wait_for_calls(20).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    gw.settled().await;
    let sent_before: HashSet<String> = sent_per_row(&gw).into_keys().collect();
    let marked: HashSet<String> = started_not_done(&out).iter().map(|&(_, row)| key_of_row(row)).collect();

    let output = bulkcall().args(["resume", out.to_str().unwrap(), "-j", "32"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "the rows in doubt failed: {stderr}");
    let records = csv_records(&out.join("failures.csv"));
    assert!(!records.is_empty(), "the kill left rows in flight");
    assert!(records.iter().all(|r| r["_error"] == "in_doubt"), "{records:?}");
    let in_doubt: HashSet<String> = records.iter().map(|r| r["_key"].clone()).collect();
    // README: a claim job's rows in doubt are never more than its calls in
    // flight.
    let most = in_doubt_at_most(8, false);
    assert!(in_doubt.len() <= most, "no more rows in doubt than calls in flight: {}", in_doubt.len());
    let recorded: HashSet<String> =
        jsonl(&out.join("results.jsonl")).iter().map(|r| r["key"].as_str().unwrap().to_string()).collect();
    let expected: HashSet<String> = marked.difference(&recorded).cloned().collect();
    assert_eq!(in_doubt, expected, "the rows in doubt are those the journal started with no outcome");
    assert!(sent_before.difference(&recorded).all(|k| in_doubt.contains(k)), "every row sent without an outcome");
    assert!(sent_per_row(&gw).values().all(|&n| n == 1), "no claim was sent twice");
    assert_eq!(recorded.len() + records.len(), 100, "every row in exactly one output");
}

/// Faults of every kind for a claim job; `--timeout` is shorter than the
/// slow fault's delay.
fn every_fault() -> Faults {
    Faults {
        server_errors: 0.06,
        throttles: 0.06,
        unavailable: 0.06,
        resets: 0.06,
        slow: 0.06,
        slow_delay: Duration::from_millis(1500),
        broken: 0.04,
        bad_requests: 0.02,
        retry_after: Duration::from_secs(1),
        ..Faults::default()
    }
}

/// Runs `job` over 200 rows against a gateway with [`every_fault`]; waits
/// until the gateway has answered every call it received.
async fn run_with_faults(job: &str) -> (Gateway, std::path::PathBuf, HashMap<String, Vec<RecordedCall>>) {
    let gw = Gateway::start(SandboxConfig { faults: every_fault(), ..sandbox_config() }).await;
    gw.config(SECRET, "backoff_base = \"10ms\"\nbackoff_max = \"50ms\"");
    let input = gw.write("claims.csv", &eligibility_csv(1, 200));
    let job = gw.write("claims.toml", job);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &["--max-attempts", "3", "--timeout", "500ms"]).await;
    assert_eq!(code, ExitCode::RowsFailed);
    // Slow calls are answered after the client gave up on them.
    gw.settled().await;
    let calls = gw.received_by_control_number();
    (gw, out, calls)
}

fn outcomes(out: &std::path::Path) -> (HashSet<String>, HashMap<String, (String, String)>) {
    let results = jsonl(&out.join("results.jsonl")).iter().map(|r| r["key"].as_str().unwrap().to_string()).collect();
    let text = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (key, error, attempts) = (column("_key"), column("_error"), column("_attempts"));
    let failed = reader
        .records()
        .map(Result::unwrap)
        .map(|r| (r[key].to_string(), (r[error].to_string(), r[attempts].to_string())))
        .collect();
    (results, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_sent_again_only_when_the_gateway_provably_did_not_act_on_it() {
    let (_gw, out, calls) = run_with_faults(CLAIMS_JOB).await;
    let (results, failed) = outcomes(&out);
    assert_eq!(results.len() + failed.len(), 200, "every row in exactly one output");
    let faults = every_fault();
    let mut seen = HashSet::new();
    for n in 1..=200 {
        let key = format!("{n:09}");
        let fault = faults.fault_for(&key);
        seen.insert(fault);
        let sent = calls[&key].len();
        let failure = |error: &str| (error.to_string(), "1".to_string());
        match fault {
            Some(Fault::Throttle | Fault::Unavailable) => {
                assert!(results.contains(&key), "{key} ({fault:?}): refused before processing, sent again");
                assert_eq!(sent, 2, "{key} ({fault:?})");
                assert_eq!(calls[&key][0].status, if fault == Some(Fault::Throttle) { 429 } else { 503 });
            }
            Some(Fault::ServerError | Fault::Broken) => {
                assert_eq!(sent, 1, "{key} ({fault:?}): a 500 may have been processed: never sent twice");
                assert_eq!(failed[&key], failure("server_error"), "{key}");
            }
            Some(Fault::Reset | Fault::Slow) => {
                assert_eq!(sent, 1, "{key} ({fault:?}): the gateway may have acted on it: never sent twice");
                assert_eq!(failed[&key], failure("in_doubt"), "{key} ({fault:?})");
            }
            Some(Fault::BadRequest) => {
                assert_eq!(sent, 1);
                assert_eq!(failed[&key], failure("client_error"));
            }
            None => {
                assert!(results.contains(&key), "{key}");
                assert_eq!(sent, 1);
            }
        }
    }
    // Seven kinds of fault and rows with none: 200 rows meet them all
    // (faults are fixed per key).
    assert_eq!(seen.len(), 8, "every fault was met: {seen:?}");
    let message = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    assert!(message.contains("not idempotent"), "the failures say why a row was not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_idempotency_key_a_claim_is_retried_with_the_same_key_on_every_attempt() {
    let (_gw, out, calls) = run_with_faults(&claims_job_with_key()).await;
    let (results, failed) = outcomes(&out);
    assert_eq!(results.len() + failed.len(), 200, "every row in exactly one output");
    let faults = every_fault();
    for n in 1..=200 {
        let key = format!("{n:09}");
        let keys: HashSet<Option<&str>> = calls[&key].iter().map(|c| c.header("idempotency-key")).collect();
        let expected = format!("claim-{key}");
        assert_eq!(keys, HashSet::from([Some(expected.as_str())]), "{key}: one key, on every attempt");
        match faults.fault_for(&key) {
            Some(Fault::Broken) => {
                assert_eq!(calls[&key].len(), 3, "{key}: retried to max_attempts");
                assert_eq!(failed[&key], ("server_error".to_string(), "3".to_string()));
            }
            Some(Fault::BadRequest) => assert_eq!(calls[&key].len(), 1),
            Some(fault) => {
                assert!(results.contains(&key), "{key} ({fault:?}): retried to success");
                assert_eq!(calls[&key].len(), 2, "{key} ({fault:?})");
            }
            None => assert_eq!(calls[&key].len(), 1),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_claims_job_runs_against_the_sandbox_with_a_key_per_claim() {
    let gw = Gateway::start(sandbox_config()).await;
    let jobs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
    let out = gw.path("run");
    let code = gw.run_job(&jobs.join("claims.toml"), &jobs.join("claims.jsonl"), &out, &[]).await;
    assert_eq!(code, ExitCode::Success);
    let results = jsonl(&out.join("results.jsonl"));
    assert_eq!(results.len(), 50);
    assert!(results.iter().all(|r| r["correlation_id"].is_string() || r["capture"]["correlation_id"].is_string()));
    let keys: HashSet<String> =
        gw.sandbox.recorded().iter().map(|c| c.header("idempotency-key").unwrap().to_string()).collect();
    assert_eq!(keys.len(), 50, "one key per claim");
    assert!(keys.iter().all(|k| k.starts_with("claim-PCN")));
}

/// The rows a claim run's directory leaves in doubt: started in the journal
/// (and not released) with neither a done mark nor an outcome line.
fn in_doubt_on_file(out: &std::path::Path) -> HashSet<String> {
    let (_, started) = bulkcall::output::Ledger::read(out, |_| {}).unwrap();
    let recorded: HashSet<String> =
        jsonl(&out.join("results.jsonl")).iter().map(|r| r["key"].as_str().unwrap().to_string()).collect();
    started.into_iter().map(|(_, row)| key_of_row(row)).filter(|k| !recorded.contains(k)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_job_killed_between_rows_leaves_at_most_its_calls_in_flight_in_doubt() {
    // Quick answers: most kills land while workers go from one row to the
    // next (an outcome being written, the next row's started mark being
    // synced), not during a call. Whenever it lands, a worker has at most
    // one row started and without an outcome on file.
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(1), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 4000));
    let job = gw.write("claims.toml", CLAIMS_JOB);
    let concurrency = 4;
    let mut sent_before = sent_per_row(&gw);
    for (kill_at, name) in [(300, "a"), (900, "b"), (1500, "c")] {
        let out = gw.path(&format!("run-{name}"));
        let calls_before = gw.sandbox.stats().api_calls;
        let mut child =
            run_command(&job, &input, &out, &config).args(["-j", &concurrency.to_string()]).spawn().unwrap();
        gw.wait_for_calls(calls_before + kill_at).await;
        child.start_kill().unwrap();
        assert_eq!(child.wait().await.unwrap().code(), None, "killed by a signal");
        gw.settled().await;
        let in_doubt = in_doubt_on_file(&out);
        let most = in_doubt_at_most(concurrency, false);
        assert!(in_doubt.len() <= most, "run {name}: at most {most} rows in doubt, found {}", in_doubt.len());
        // This run's calls: each row sent once, and every one without an
        // outcome on file is in doubt.
        let sent = sent_per_row(&gw);
        let recorded: HashSet<String> =
            jsonl(&out.join("results.jsonl")).iter().map(|r| r["key"].as_str().unwrap().to_string()).collect();
        for (key, n) in &sent {
            let this_run = n - sent_before.get(key).copied().unwrap_or(0);
            assert!(this_run <= 1, "run {name}: {key} sent {this_run} times");
            assert!(this_run == 0 || recorded.contains(key) || in_doubt.contains(key), "run {name}: {key} sent, lost");
        }
        sent_before = sent;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_job_stopped_by_sigterm_leaves_nothing_in_doubt_and_resume_sends_each_row_once() {
    // Quick answers: the signal finds workers between rows (an outcome being
    // written, a started mark being synced) as well as in calls; every call
    // that went out is recorded, and no row is left started without one.
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(1), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 3000));
    let job = gw.write("claims.toml", CLAIMS_JOB);
    let out = gw.path("run");
    let child = run_command(&job, &input, &out, &config).args(["-j", "8"]).spawn().unwrap();
    gw.wait_for_calls(500).await;
    let pid = child.id().expect("the child runs") as libc::pid_t;
    // SAFETY: a plain kill(2) of the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", String::from_utf8_lossy(&output.stderr));
    gw.settled().await;
    assert!(in_doubt_on_file(&out).is_empty(), "nothing in doubt after a graceful stop");
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["in_doubt"].as_u64(), Some(0), "{summary}");

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 3000, "every row recorded");
    let sent = sent_per_row(&gw);
    assert_eq!(sent.len(), 3000);
    assert!(sent.values().all(|&n| n == 1), "no claim sent twice");
}
