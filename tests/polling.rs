//! Follow-up calls (`[poll]`) through the real command line against the
//! sandbox's asynchronous claim endpoint: every accepted row polled until
//! its answer is final, never submitted twice, across kills and resumes.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bulkcall::error::ExitCode;
use bulkcall::sandbox::{ASYNC_STATUS_PATH, ASYNC_SUBMISSION_PATH, Faults, SandboxConfig};
use common::*;

/// A claim job on the asynchronous endpoint, polled every `every` until the
/// answer is not 202, for at most `max_wait`.
fn job(gw: &Gateway, every: &str, max_wait: &str) -> std::path::PathBuf {
    gw.write("claims-async.toml", &async_claims_job(every, max_wait))
}

/// `n` claims as JSON Lines; those in `rejected` carry a charge of 0, which
/// the sandbox's payer rejects.
fn claims(gw: &Gateway, n: u64, rejected: &[u64]) -> std::path::PathBuf {
    let mut text = String::new();
    for i in 1..=n {
        let charge = if rejected.contains(&i) { "0" } else { "125.50" };
        text.push_str(&format!("{{\"control_number\":\"{i:09}\",\"charge\":\"{charge}\"}}\n"));
    }
    gw.write("claims.jsonl", &text)
}

/// Submissions the gateway received, by control number (every POST to the
/// submission path, whatever it answered).
fn submissions(gw: &Gateway) -> HashMap<String, Vec<u16>> {
    let mut by_key: HashMap<String, Vec<u16>> = HashMap::new();
    for call in gw.sandbox.recorded() {
        if call.path == ASYNC_SUBMISSION_PATH {
            by_key.entry(call.body["controlNumber"].as_str().unwrap().to_string()).or_default().push(call.status);
        }
    }
    by_key
}

/// Submissions the gateway acted on (answered 202), by control number.
fn accepted_submissions(gw: &Gateway) -> HashMap<String, usize> {
    submissions(gw)
        .into_iter()
        .map(|(key, statuses)| (key, statuses.iter().filter(|&&s| s == 202).count()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn key(record: &serde_json::Value) -> String {
    record["key"].as_str().or(record["_key"].as_str()).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_answered_202_is_polled_to_its_end_through_retry_after_and_transient_faults() {
    // Every claim's first submission and first poll are throttled (429 with
    // Retry-After: 1): both are tried again. Polls answer 202 with
    // Retry-After: 1 twice, then the outcome.
    let faults = Faults { throttles: 1.0, transient_attempts: 1, ..Faults::default() };
    let config = SandboxConfig { async_polls: 2, faults, ..sandbox_config() };
    let gw = Gateway::start(config).await;
    // `every` is short: the gateway's Retry-After is what spaces the polls.
    let job = job(&gw, "100ms", "1m");
    let input = claims(&gw, 6, &[4]);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &["-j", "4"]).await;
    assert_eq!(code, ExitCode::RowsFailed, "one claim is rejected by the payer");

    let results = jsonl(&out.join("results.jsonl"));
    assert_eq!(results.len(), 5, "{results:?}");
    for r in &results {
        assert_eq!(r["status"], 202, "the first answer's status is kept: {r}");
        assert_eq!(r["response"]["status"], "PENDING", "the first answer is kept under response: {r}");
        assert_eq!(r["poll"]["status"], 200, "{r}");
        assert_eq!(r["poll"]["response"]["claimStatus"], "ACCEPTED", "{r}");
        // The throttled poll, two 202s, the final answer.
        assert_eq!(r["poll"]["polls"], 4, "{r}");
        assert!(r["poll"]["waited_ms"].as_u64().unwrap() >= 3000, "three Retry-After: 1 waits at least: {r}");
        assert_eq!(r["capture"]["claim_status"], "ACCEPTED", "a poll capture joins the first call's: {r}");
        assert!(r["capture"]["correlation_id"].is_string(), "{r}");
    }
    let failures = jsonl(&out.join("failures.jsonl"));
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!((failures[0]["_error"].as_str(), failures[0]["_status"].as_u64()), (Some("rejected"), Some(200)));
    assert_eq!(key(&failures[0]), format!("{:09}", 4));

    // Retry-After is honoured per row: no two polls of one claim less than
    // a second apart, though `every` is 100 ms.
    let mut polls: HashMap<String, Vec<Duration>> = HashMap::new();
    for call in gw.sandbox.recorded() {
        if call.path.starts_with(ASYNC_STATUS_PATH) {
            polls.entry(call.path.clone()).or_default().push(call.at);
        }
    }
    assert_eq!(polls.len(), 6);
    for (path, times) in &polls {
        assert_eq!(times.len(), 4, "{path}: {times:?}");
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(990),
                "{path} polled again before its Retry-After: {times:?}"
            );
        }
    }
    // Each claim submitted once (its throttled attempt was not processed).
    let acted = accepted_submissions(&gw);
    assert_eq!(acted.len(), 6);
    assert!(acted.values().all(|&n| n == 1), "{acted:?}");
    assert_eq!(gw.sandbox.stats().async_submissions, 6);

    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["polls"], 24);
    assert_eq!(summary["pending"], 0);
    assert_eq!(summary["attempts"], 12, "attempts count first calls only (one throttled each)");
    assert_eq!(summary["total"], 6);
}

/// Waits until `accepted.jsonl` holds `n` whole lines.
async fn accepted_lines(out: &Path, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(out.join("accepted.jsonl")).unwrap_or_default();
        if text.matches('\n').count() >= n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "accepted.jsonl holds {} lines", text.matches('\n').count());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_while_polling_is_resumed_by_polling_never_by_submitting_again() {
    let config = SandboxConfig { async_polls: 3, ..sandbox_config() };
    let gw = Gateway::start(config).await;
    let config = gw.config(SECRET, "");
    let job = job(&gw, "1s", "1m");
    let n = 40;
    let input = claims(&gw, n, &[]);
    let out = gw.path("run");
    let mut child = run_command(&job, &input, &out, &config).args(["-j", "8"]).spawn().unwrap();
    // Every claim accepted and recorded, polls under way: then SIGKILL.
    accepted_lines(&out, n as usize).await;
    while gw.sandbox.stats().polls < 10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.start_kill().unwrap();
    assert_eq!(child.wait().await.unwrap().code(), None, "killed by a signal");
    gw.settled().await;
    let before = jsonl(&out.join("results.jsonl")).len();
    assert!(before < n as usize, "killed mid-poll, {before} rows were final already");

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let results = jsonl(&out.join("results.jsonl"));
    let mut keys: Vec<String> = results.iter().map(key).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((results.len(), keys.len()), (n as usize, n as usize), "every claim exactly once in results");
    assert!(results.iter().all(|r| r["poll"]["response"]["claimStatus"] == "ACCEPTED"));
    assert!(!out.join("failures.jsonl").exists(), "no row in doubt: each was accepted before the kill");
    // Not one claim submitted twice: the resume only polled.
    let sent = submissions(&gw);
    assert_eq!(sent.len(), n as usize);
    assert!(sent.values().all(|s| s.len() == 1), "{sent:?}");
    assert_eq!(gw.sandbox.stats().async_submissions, n);
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["total"].as_u64(), summary["succeeded"].as_u64()), (Some(n), Some(n)));
    assert_eq!(summary["pending"], 0);
}

/// A run whose rows are all still pending at `max_wait`: exit 75 (checked here).
async fn pending_run(gw: &Gateway, n: u64) -> std::path::PathBuf {
    // Polls answer 202 (Retry-After: 1) twice; at most 1.5 s of polling.
    let job = job(gw, "500ms", "1500ms");
    let input = claims(gw, n, &[]);
    let out = gw.path("run");
    let config = gw.config(SECRET, "");
    let output = run_command(&job, &input, &out, &config).args(["-j", "4"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains(&format!("{n} pending")), "the closing line counts the pending rows: {stderr}");
    assert!(
        stderr.contains(&format!("resume {}", out.display())),
        "the closing lines give the resume command: {stderr}"
    );
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["pending"].as_u64(), summary["total"].as_u64()), (Some(n), Some(0)), "{summary}");
    assert_eq!(summary["exit_code"], 75);
    assert!(!out.join("failures.jsonl").exists(), "a pending row is not a failure");
    assert_eq!(std::fs::read_to_string(out.join("results.jsonl")).unwrap(), "", "nor a result");
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains(&format!("Pending (accepted, not final)</th><td>{n}<")), "the report shows them");
    let status =
        bulkcall().args(["status", out.to_str().unwrap()]).stdout(std::process::Stdio::piped()).output().await.unwrap();
    let status = String::from_utf8_lossy(&status.stderr).to_string() + &String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(&format!("{n} rows accepted by the gateway are pending")), "{status}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_pending_at_max_wait_exit_75_and_resume_finishes_them() {
    let gw = Gateway::start(SandboxConfig { async_polls: 2, ..sandbox_config() }).await;
    let n = 5;
    let out = pending_run(&gw, n).await;

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let results = jsonl(&out.join("results.jsonl"));
    assert_eq!(results.len(), n as usize);
    assert!(results.iter().all(|r| r["poll"]["status"] == 200 && r["status"] == 202), "{results:?}");
    assert_eq!(gw.sandbox.stats().async_submissions, n, "resume polls, it does not submit");
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["pending"].as_u64(), summary["succeeded"].as_u64()), (Some(0), Some(n)));
    assert!(summary["polls"].as_u64().unwrap() >= 3 * n, "polls of both parts counted: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn give_up_pending_writes_the_pending_rows_to_failures_without_a_call() {
    let gw = Gateway::start(SandboxConfig { async_polls: 2, ..sandbox_config() }).await;
    let n = 3;
    let out = pending_run(&gw, n).await;
    let calls = gw.sandbox.stats().api_calls;
    // Without its [poll] table the job could not poll them: resume says so
    // rather than dropping them.
    let job = gw.path("claims-async.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, &text[..text.find("[poll]").unwrap()]).unwrap();
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{n} rows of this run were accepted")) && stderr.contains("[poll]"), "{stderr}");

    let output = bulkcall().args(["resume", out.to_str().unwrap(), "--give-up-pending"]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(gw.sandbox.stats().api_calls, calls, "nothing sent, nothing polled");
    let failures = jsonl(&out.join("failures.jsonl"));
    assert_eq!(failures.len(), n as usize);
    for f in &failures {
        assert_eq!((f["_error"].as_str(), f["_status"].as_u64()), (Some("pending"), Some(202)), "{f}");
        assert!(f["_message"].as_str().unwrap().contains("accepted"), "{f}");
        assert!(f["control_number"].is_string(), "the row's own fields, to send again if need be: {f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_location_on_another_origin_is_refused_and_no_token_goes_there() {
    // An origin nothing listens on: a poll sent there would fail as a
    // connection error, not as other_origin.
    let config = SandboxConfig { async_location_origin: Some("http://127.0.0.2:9".into()), ..sandbox_config() };
    let gw = Gateway::start(config).await;
    let job = job(&gw, "100ms", "1m");
    let input = claims(&gw, 3, &[]);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &[]).await;
    assert_eq!(code, ExitCode::RowsFailed);
    let failures = jsonl(&out.join("failures.jsonl"));
    assert_eq!(failures.len(), 3);
    for f in &failures {
        assert_eq!((f["_error"].as_str(), f["_status"].as_u64()), (Some("other_origin"), Some(202)), "{f}");
        let message = f["_message"].as_str().unwrap();
        assert!(message.contains("http://127.0.0.2:9") && message.contains("allow_other_origin"), "{message}");
    }
    assert_eq!(gw.sandbox.stats().polls, 0);
    assert_eq!(json(&out.join("summary.json"))["polls"], 0);
    // Failed where the gateway acted: fed back, they are left out, not submitted again.
    let failures_file = out.join("failures.jsonl");
    let again = gw.path("again");
    assert_eq!(gw.run_job(&job, &failures_file, &again, &[]).await, ExitCode::RowsFailed);
    assert_eq!(gw.sandbox.stats().async_submissions, 3, "left out on a resend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_polling_leaves_the_rows_pending_with_exit_130_and_every_call_counted() {
    // Polls answer 202 (Retry-After: 1) four times: nothing is final when the stop comes.
    let gw = Gateway::start(SandboxConfig { async_polls: 4, ..sandbox_config() }).await;
    let job = job(&gw, "1s", "1m");
    let n = 8;
    let input = claims(&gw, n, &[]);
    let out = gw.path("run");
    let stop = tokio_util::sync::CancellationToken::new();
    let args = ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()];
    let run = gw.run_until(&args, stop.clone());
    let stopper = async {
        accepted_lines(&out, n as usize).await;
        while gw.sandbox.stats().polls < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
    };
    let (code, ()) = tokio::join!(run, stopper);
    assert_eq!(code, ExitCode::Interrupted);
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["pending"].as_u64(), summary["total"].as_u64()), (Some(n), Some(0)), "{summary}");
    assert_eq!(summary["attempts"], n, "the submissions are counted though their outcome is to come");
    assert_eq!(summary["polls"], gw.sandbox.stats().polls, "every poll the gateway saw, and only those");

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), n as usize);
    assert_eq!(gw.sandbox.stats().async_submissions, n);
    assert_eq!(json(&out.join("summary.json"))["attempts"], n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_async_submits_the_example_claims_and_polls_each_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let output = bulkcall()
        .args(["demo", "--async", "--progress", "never", "--out-dir", dir.path().to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("50 succeeded") && stderr.contains("150 polls"), "{stderr}");
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("demo-async")).unwrap().flatten().collect();
    let run = runs.iter().find(|e| e.path().join("results.jsonl").exists()).expect("a run directory");
    let results = jsonl(&run.path().join("results.jsonl"));
    assert_eq!(results.len(), 50);
    assert!(results.iter().all(|r| r["status"] == 202 && r["capture"]["claim_status"] == "ACCEPTED"), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_pass_the_rate_limiter_with_the_first_calls() {
    // Polls answered at once (Retry-After: 0), the outcome on the first
    // poll: without the limiter every poll would go out at the same moment.
    let config = SandboxConfig { async_polls: 0, async_retry_after: Duration::ZERO, ..sandbox_config() };
    let gw = Gateway::start(config).await;
    gw.config(SECRET, "rate = 10\nburst = 1");
    let job = job(&gw, "100ms", "1m");
    let n = 15;
    let input = claims(&gw, n, &[]);
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &["-j", "8"]).await, ExitCode::Success);
    let mut times: Vec<u64> = gw
        .sandbox
        .recorded()
        .iter()
        .filter(|c| c.path.starts_with("/medicalnetwork"))
        .map(|c| c.at.as_nanos() as u64)
        .collect();
    times.sort_unstable();
    assert_eq!(times.len(), 2 * n as usize, "a submission and a poll per claim");
    let busiest = common::pace::busiest_second(&times);
    assert!(busiest <= 11, "{busiest} calls in one second at --rate 10 with a burst of 1");
    assert_eq!(json(&out.join("summary.json"))["polls"], n);
}
