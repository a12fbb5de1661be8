//! `events.jsonl`: what happened to a run as a whole, and when (pauses,
//! slow-downs, token refreshes, stops), as the real binary writes it.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use bulkcall::error::ExitCode;
use bulkcall::sandbox::{Faults, SandboxConfig};
use common::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Every string an event holds is a fixed word: no row value, URL, token
/// or server answer can be in it.
fn only_words(events: &[Value]) {
    for event in events {
        for (field, value) in event.as_object().unwrap() {
            match value {
                Value::String(s) => {
                    assert!(
                        s.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
                        "{field}: {s}"
                    );
                    assert!(!s.starts_with(|c: char| c.is_ascii_digit()), "{field}: {s} looks like a row key");
                }
                Value::Number(_) | Value::Bool(_) => {}
                other => panic!("{field}: {other} is not a number or a word"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_met_by_every_worker_is_one_pause_event() {
    // Every row's first call is answered 429 with Retry-After: 2.
    let faults = Faults { throttles: 1.0, retry_after: Duration::from_secs(2), ..Faults::default() };
    let gw = Gateway::start(SandboxConfig { faults, ..sandbox_config() }).await;
    // Each first attempt earns a retry: the budget lets every row retry.
    let config = gw.config(SECRET, "retry_budget = 1");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 16));
    let out = gw.path("run");
    let before = now_ms();
    let output = run_command(&job, &input, &out, &config).args(["-j", "16"]).output().await.unwrap();
    let after = now_ms();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let calls = gw.received_by_control_number();
    assert!(calls.len() == 16 && calls.values().all(|c| c.len() == 2), "each row: a 429, then its success");

    let events = jsonl(&out.join("events.jsonl"));
    only_words(&events);
    let kinds = event_kinds(&out);
    assert_eq!((kinds.first().map(String::as_str), kinds.last().map(String::as_str)), (Some("start"), Some("end")));
    // The 16 workers took their rows at once: 16 429s, one pause.
    let pauses: Vec<&Value> = events.iter().filter(|e| e["kind"] == "pause").collect();
    assert_eq!(pauses.len(), 1, "one event for one pause, however many 429s met it: {events:?}");
    assert_eq!((pauses[0]["ms"].as_u64(), pauses[0]["shared"].as_bool()), (Some(2000), Some(false)));
    let at = pauses[0]["at_ms"].as_u64().unwrap();
    assert!((before..=after).contains(&at), "at_ms is the Unix time in ms: {at}");
    // So many 429s among so few answers lower the rate too.
    assert!(kinds.iter().any(|k| k == "slow_down"), "{kinds:?}");
    let times: Vec<u64> = events.iter().map(|e| e["at_ms"].as_u64().unwrap()).collect();
    assert!(times.is_sorted(), "in the order they happened: {times:?}");

    // The report marks the pause on both time charts and lists it.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let charts = &html[html.find("<h2>Throughput</h2>").unwrap()..html.find("<h2>Events</h2>").unwrap()];
    assert_eq!(charts.matches(r#"<g class="mark pause"><title>"#).count(), 2, "on throughput and latency: {charts}");
    assert_eq!(charts.matches(">Retry-After pause</text>").count(), 2, "each chart's legend names it");
    let listed = &html[html.find("<h2>Events</h2>").unwrap()..html.find("<h2>Statuses</h2>").unwrap()];
    assert!(listed.contains("Retry-After pause</td><td>2000 ms: no call went out</td>"), "{listed}");
    assert!(listed.contains(r#"<a href="events.jsonl">events.jsonl</a>"#), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_and_a_resume_append_to_the_same_events() {
    let gw =
        Gateway::start(SandboxConfig { token_lifetime: Duration::from_secs(2), record: false, ..sandbox_config() })
            .await;
    gw.config(SECRET, "auth.cache = false");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 400));
    let out = gw.path("run");
    let stop = CancellationToken::new();
    let args = ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--rate", "100"];
    let stopping = async {
        // Two-second tokens: refreshed in the background 1 to 1.25 s in.
        gw.wait_for_calls(190).await;
        stop.cancel();
    };
    let (code, ()) = tokio::join!(gw.run_until(&args, stop.clone()), stopping);
    assert_eq!(code, ExitCode::Interrupted);
    let kinds = event_kinds(&out);
    assert_eq!((kinds[0].as_str(), kinds.last().map(String::as_str)), ("start", Some("end")), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "stop"), "{kinds:?}");
    let events = jsonl(&out.join("events.jsonl"));
    let refresh = events.iter().find(|e| e["kind"] == "token_refresh").expect("a token refresh");
    assert_eq!((refresh["how"].as_str(), refresh["origin"].as_str()), (Some("background"), Some("fetched")));
    assert_eq!(refresh["lifetime_s"], 2);

    let code = gw.run(&["resume", out.to_str().unwrap()]).await;
    assert_eq!(code, ExitCode::Success);
    let resumed = jsonl(&out.join("events.jsonl"));
    assert_eq!(resumed[..events.len()], events[..], "the first session's events are kept");
    let starts: Vec<&Value> = resumed.iter().filter(|e| e["kind"] == "start").collect();
    assert_eq!(starts.iter().map(|e| e["resume"].as_bool()).collect::<Vec<_>>(), [Some(false), Some(true)]);
    assert_eq!(resumed.last().unwrap()["exit"], 0);
    only_words(&resumed);
    let distinct: HashSet<String> = event_kinds(&out).into_iter().collect();
    assert!(!distinct.contains("abort"), "a stop is not an abort: {distinct:?}");
}
