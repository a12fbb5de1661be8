//! Retries against the sandbox's fault injection: every outcome is what the
//! fault of the row's key calls for, and each row lands in exactly one file.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bulkcall::error::ExitCode;
use bulkcall::sandbox::{Fault, Faults, SandboxConfig};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_gets_the_outcome_it_calls_for() {
    let faults = Faults {
        server_errors: 0.05,
        throttles: 0.05,
        resets: 0.02,
        bad_requests: 0.01,
        broken: 0.01,
        retry_after: Duration::from_secs(1),
        ..Faults::default()
    };
    let gw = Gateway::start(SandboxConfig { faults: faults.clone(), ..sandbox_config() }).await;
    gw.config(SECRET, "backoff_base = \"10ms\"\nbackoff_max = \"100ms\"");
    let rows = 400;
    let input = gw.write("rows.csv", &eligibility_csv(1, rows));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &["--max-attempts", "3"]).await;
    assert_eq!(code, ExitCode::RowsFailed);

    let mut calls: HashMap<String, Vec<Duration>> = HashMap::new();
    for call in gw.sandbox.recorded() {
        calls.entry(call.body["controlNumber"].as_str().unwrap().to_string()).or_default().push(call.at);
    }
    let results: HashSet<String> =
        jsonl(&out.join("results.jsonl")).iter().map(|r| r["key"].as_str().unwrap().to_string()).collect();
    let failed: HashMap<String, (String, String)> = csv_records(&out.join("failures.csv"))
        .into_iter()
        .map(|r| (r["_key"].clone(), (r["_error"].clone(), r["_attempts"].clone())))
        .collect();
    assert_eq!(results.len() + failed.len(), rows as usize, "every row in exactly one output");
    assert!(results.is_disjoint(&failed.keys().cloned().collect()));

    let mut seen = HashMap::new();
    for n in 1..=rows {
        let key = format!("{n:09}");
        let fault = faults.fault_for(&key);
        *seen.entry(fault).or_insert(0) += 1;
        let sent = calls[&key].len();
        match fault {
            Some(Fault::BadRequest) => {
                assert_eq!(sent, 1, "{key}: a 400 is never retried");
                assert_eq!(failed[&key], ("client_error".into(), "1".into()));
            }
            Some(Fault::Broken) => {
                assert_eq!(sent, 3, "{key}: a permanent 500 is sent max_attempts times");
                assert_eq!(failed[&key], ("server_error".into(), "3".into()));
            }
            Some(Fault::Throttle) => {
                assert!(results.contains(&key), "{key}: a throttled row succeeds in the end");
                let gap = calls[&key][1] - calls[&key][0];
                assert!(gap >= Duration::from_millis(950), "{key}: retried {gap:?} after a Retry-After of 1 s");
            }
            Some(_) => {
                assert!(results.contains(&key), "{key} ({fault:?}): a transient fault is retried to success");
                assert_eq!(sent, 2);
            }
            None => {
                assert!(results.contains(&key));
                assert_eq!(sent, 1, "{key}: a row without a fault is sent once");
            }
        }
    }
    // Five kinds of fault and rows with none: 400 rows meet them all
    // (faults are fixed per key).
    assert_eq!(seen.len(), 6, "the faults were all exercised: {seen:?}");
    let summary = json(&out.join("summary.json"));
    assert!(summary["retries"].as_u64().unwrap() > 0);
    assert_eq!(summary["total"], rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_rate_limit_lowers_the_sending_rate() {
    let faults = Faults { rate_limit: 50, ..Faults::default() };
    let gw = Gateway::start(SandboxConfig { faults, record: false, ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 300));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &["--max-attempts", "10"]).await;
    assert_eq!(code, ExitCode::Success, "every throttled row succeeds in the end");
    let summary = json(&out.join("summary.json"));
    let lowest = summary["throttled_rate"].as_f64().expect("the rate was lowered");
    assert!(lowest < 50.0, "{lowest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_date_is_honoured() {
    let faults = Faults { throttles: 0.1, retry_after_date: true, ..Faults::default() };
    let gw = Gateway::start(SandboxConfig { faults: faults.clone(), ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 40));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, ExitCode::Success);
    let mut calls: HashMap<String, Vec<Duration>> = HashMap::new();
    for call in gw.sandbox.recorded() {
        calls.entry(call.body["controlNumber"].as_str().unwrap().to_string()).or_default().push(call.at);
    }
    let throttled: Vec<&String> = calls.keys().filter(|k| faults.fault_for(k) == Some(Fault::Throttle)).collect();
    assert!(!throttled.is_empty());
    for key in throttled {
        let gap = calls[key][1] - calls[key][0];
        assert!(gap >= Duration::from_millis(950), "{key}: retried {gap:?} after an HTTP-date Retry-After");
    }
}
