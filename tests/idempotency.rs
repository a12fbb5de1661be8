//! Non-idempotent jobs (a claim submission): a row is sent again only when
//! the gateway provably did not act on it; a row whose fate is unknown
//! fails as `in_doubt`. With `idempotency_key` the same key goes out on
//! every attempt, and rows are retried as for any idempotent job.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use bulkcall::sandbox::SandboxConfig;
use common::*;

fn bulkcall() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkcall"));
    command.env_remove("RUST_LOG").stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    command
}

async fn wait_for_calls(gw: &Gateway, n: u64) {
    while gw.sandbox.stats().api_calls < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

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
        let output = bulkcall()
            .args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .args(["-c", config.to_str().unwrap(), "-p", "test"])
            .output()
            .await
            .unwrap();
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
    let mut child = bulkcall()
        .args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["-c", config.to_str().unwrap(), "-p", "test", "-j", "8"])
        .spawn()
        .unwrap();
    wait_for_calls(&gw, 20).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // Calls that arrived are answered by the gateway even though nobody reads the answer.
    while gw.sandbox.recorded().len() as u64 != gw.sandbox.stats().api_calls {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent_before: HashSet<String> = sent_per_row(&gw).into_keys().collect();

    let output = bulkcall().args(["resume", out.to_str().unwrap(), "-j", "32"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "the rows in doubt failed: {stderr}");
    let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    let mut reader = csv::Reader::from_reader(failures.as_bytes());
    let error = reader.headers().unwrap().iter().position(|h| h == "_error").unwrap();
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert!(!records.is_empty(), "the kill left rows in flight");
    assert!(records.iter().all(|r| &r[error] == "in_doubt"), "{failures}");
    let in_doubt: HashSet<String> = records.iter().map(|r| r[0].to_string()).collect();
    assert!(in_doubt.len() <= 8, "no more rows in doubt than calls in flight: {}", in_doubt.len());
    let recorded: HashSet<String> =
        jsonl(&out.join("results.jsonl")).iter().map(|r| r["key"].as_str().unwrap().to_string()).collect();
    assert!(sent_before.difference(&recorded).all(|k| in_doubt.contains(k)), "every row sent without an outcome");
    assert!(sent_per_row(&gw).values().all(|&n| n == 1), "no claim was sent twice");
    assert_eq!(recorded.len() + records.len(), 100, "every row in exactly one output");
}
