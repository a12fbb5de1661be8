//! Stopping a run: signals, a gateway that asks for a long pause, and rows
//! waiting for a retry when the run stops. Rows not finished stay resumable.

mod common;

use std::time::Duration;

use bulkcall::sandbox::SandboxConfig;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_stops_the_run_gracefully_like_sigterm() {
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(100), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 200));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let child = run_command(&job, &input, &out, &config).args(["-j", "4"]).spawn().unwrap();
    gw.wait_for_calls(8).await;
    let pid = child.id().unwrap() as libc::pid_t;
    // SAFETY: a plain kill(2) of the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "a graceful stop, not death by SIGHUP: {stderr}");
    assert!(stderr.contains("resume"), "the closing lines say how to finish: {stderr}");
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["exit_code"], 130);
    let recorded = jsonl(&out.join("results.jsonl")).len() as u64;
    assert!((8..200).contains(&recorded), "calls in flight finished and were recorded: {recorded}");

    let output = bulkcall().args(["resume", out.to_str().unwrap(), "-j", "32"]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_longer_than_retry_after_max_stops_with_75_and_resume_sends_the_rest() {
    use bulkcall::sandbox::{Fault, Faults};
    let faults = Faults { throttles: 0.05, retry_after: Duration::from_secs(3600), ..Faults::default() };
    let gw = Gateway::start(SandboxConfig { faults: faults.clone(), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 200));
    // A claim job: rows refused with 429 must stay resumable, not in doubt.
    let job = gw.write("claims.toml", CLAIMS_JOB);
    let out = gw.path("run");
    let output = run_command(&job, &input, &out, &config).args(["-j", "4"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("1h") && stderr.contains("resume"), "the pause asked for and how to go on: {stderr}");
    assert!(!out.join("failures.csv").exists(), "no row failed for the pause");
    let recorded = jsonl(&out.join("results.jsonl")).len();
    assert!(recorded < 200, "rows not sent stayed unsent: {recorded}");

    // Each throttled key asks for the pause once: resume until none is left.
    let mut output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    for _ in 0..20 {
        if output.status.code() != Some(75) {
            break;
        }
        output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    }
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 200, "every row in results, none in doubt");
    for (key, calls) in gw.received_by_control_number() {
        let expected = if faults.fault_for(&key) == Some(Fault::Throttle) { 2 } else { 1 };
        assert!(calls.len() <= expected, "{key} sent {} times", calls.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_waiting_for_a_retry_when_the_run_stops_are_sent_by_resume_as_never_sent() {
    use bulkcall::sandbox::Faults;
    // A claim job (not idempotent): some keys first answer 503 with a long
    // Retry-After, which a claim may be retried after (the gateway did not
    // act on it); the run is stopped while they wait.
    // Each such key pauses the whole pool for the Retry-After, resume too:
    // a few keys and a few seconds keep the test short.
    let faults = Faults { unavailable: 0.1, retry_after: Duration::from_secs(3), ..Faults::default() };
    let gw = Gateway::start(SandboxConfig { faults, ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 40));
    let job = gw.write("claims.toml", CLAIMS_JOB);
    let out = gw.path("run");
    let child = run_command(&job, &input, &out, &config).args(["-j", "4"]).spawn().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !gw.sandbox.recorded().iter().any(|c| c.status == 503) {
        assert!(tokio::time::Instant::now() < deadline, "no 503 within a minute");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.id().unwrap() as libc::pid_t;
    // SAFETY: a plain kill(2) of the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(!out.join("failures.csv").exists(), "no row failed for waiting: {stderr}");
    let waiting: Vec<String> = gw
        .received_by_control_number()
        .into_iter()
        .filter(|(_, calls)| calls.iter().all(|c| c.status == 503))
        .map(|(key, _)| key)
        .collect();
    assert!(!waiting.is_empty());

    // The rows refused with 503 were released, not left in doubt: resume
    // sends them by default, though a claim in doubt would be failed.
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!out.join("failures.csv").exists());
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 40, "every row in results");
    let calls = gw.received_by_control_number();
    for key in &waiting {
        let statuses: Vec<u16> = calls[key].iter().map(|c| c.status).collect();
        assert_eq!(statuses, [503, 200], "{key}: refused once, then sent by resume");
    }
    for (key, calls) in &calls {
        assert_eq!(calls.iter().filter(|c| c.status == 200).count(), 1, "{key} accepted exactly once");
    }
}
