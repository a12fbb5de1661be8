//! Shards: one run split over N processes. Every row goes to exactly one
//! shard (by position, never by bytes), each shard has its own run
//! directory, and a shard started again resumes there.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use bulkcall::error::ExitCode;
use bulkcall::sandbox::SandboxConfig;
use common::*;

fn keys_in(path: &std::path::Path) -> Vec<String> {
    jsonl(path).iter().map(|r| r["key"].as_str().unwrap().to_string()).collect()
}

/// A CSV whose provider names hold quoted newlines and commas: a split by
/// bytes or lines would cut rows apart.
fn multiline_csv(n: u64) -> String {
    let mut text = String::from("control_number,payer_id,provider_name,npi,member_id,first_name,last_name,dob\n");
    for i in 1..=n {
        text.push_str(&format!("{i:09},000050,\"Clinic {i}\nWest Wing, LLC\",0123456789,M{i},Pat,Doe{i},19800102\n"));
    }
    text
}

#[tokio::test]
async fn the_shards_of_one_input_cover_every_row_exactly_once() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &multiline_csv(100));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let run = gw.path("run");
    for k in 0..3 {
        let shard = format!("{k}/3");
        let code = gw.run_job(&job, &input, &run, &["--shard", &shard, "--run-id", "nightly-1"]).await;
        assert_eq!(code, ExitCode::Success, "shard {shard}");
    }

    let mut seen: HashMap<String, String> = HashMap::new();
    for k in 0..3 {
        let dir = run.join(format!("shard-{k}-of-3"));
        let info = json(&dir.join("run.json"));
        assert_eq!(info["shard"], serde_json::json!({"index": k, "count": 3}));
        assert_eq!(info["run_id"], "nightly-1");
        let results = jsonl(&dir.join("results.jsonl"));
        for result in &results {
            let (key, row) = (result["key"].as_str().unwrap().to_string(), result["row"].as_u64().unwrap());
            assert_eq!((row - 1) % 3, k, "row {row} (position {}) belongs to shard {}", row - 1, (row - 1) % 3);
            assert_eq!(key, format!("{row:09}"), "the row was read whole, its quoted newline included");
            if let Some(other) = seen.insert(key.clone(), dir.display().to_string()) {
                panic!("{key} is in two shards: {other} and {}", dir.display());
            }
        }
        let summary = json(&dir.join("summary.json"));
        assert_eq!(summary["total"].as_u64(), Some(results.len() as u64));
    }
    let all: HashSet<String> = (1..=100).map(|i| format!("{i:09}")).collect();
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), all, "the union of the shards is every row");
    let sent = gw.received_by_control_number();
    assert_eq!(sent.len(), 100);
    assert!(sent.values().all(|calls| calls.len() == 1), "every row was sent once, by one shard");
    assert!(
        sent.values().flatten().all(|call| call.body["provider"]["organizationName"].as_str().unwrap().contains('\n')),
        "quoted newlines reached the gateway inside their rows"
    );
}

#[tokio::test]
async fn a_limit_is_shared_by_the_shards_and_a_bad_shard_is_refused() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 50));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let run = gw.path("run");
    for k in 0..2 {
        let shard = format!("{k}/2");
        let code = gw.run_job(&job, &input, &run, &["--shard", &shard, "--run-id", "r", "--limit", "7"]).await;
        assert_eq!(code, ExitCode::Success);
    }
    let mut keys: Vec<String> =
        (0..2).flat_map(|k| keys_in(&run.join(format!("shard-{k}-of-2")).join("results.jsonl"))).collect();
    keys.sort();
    let first: Vec<String> = (1..=7).map(|i| format!("{i:09}")).collect();
    assert_eq!(keys, first, "--limit 7 sends the input's first 7 rows, split between the shards");

    assert_eq!(gw.run_job(&job, &input, &run, &["--run-id", "r"]).await, ExitCode::Usage, "--run-id needs shards");
    assert_eq!(gw.run_job(&job, &input, &run, &["--shard", "0/2", "--run-id", "../up"]).await, ExitCode::Usage);
    assert_eq!(gw.sandbox.stats().api_calls, 7);
}

/// `--shards 2` with the index from the scheduler's environment, the run
/// id from the job and its input; killed, then started again with the same
/// command: it resumes its own directory without sending a recorded row again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shard_started_again_with_the_same_command_resumes() {
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(20), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 2000));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let command = || {
        let mut command = bulkcall();
        command
            .args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "--shards", "2"])
            .args(["-c", config.to_str().unwrap(), "-p", "test", "-j", "32"])
            .env("JOB_COMPLETION_INDEX", "1");
        command
    };
    let mut child = command().spawn().unwrap();
    // Killed after more calls than README's bound on rows in doubt (544 at
    // -j 32), so a run that recorded nothing as it went would exceed it.
    let most = in_doubt_at_most(32, true);
    gw.wait_for_calls(most as u64 + 100).await;
    child.start_kill().unwrap();
    assert_eq!(child.wait().await.unwrap().code(), None, "killed by a signal");
    let sent_before = gw.settled().await;

    // out_dir/<job>/<job>-<input hash>/shard-1-of-2
    let runs: Vec<_> = std::fs::read_dir(gw.path("out").join("eligibility")).unwrap().flatten().collect();
    let runs: Vec<_> = runs.into_iter().filter(|e| e.file_type().unwrap().is_dir()).collect();
    assert_eq!(runs.len(), 1);
    let run_id = runs[0].file_name().to_string_lossy().into_owned();
    assert!(run_id.starts_with("eligibility-"), "{run_id}");
    let dir = runs[0].path().join("shard-1-of-2");
    let (code, text) = status(&runs[0].path()).await;
    assert_eq!(code, Some(75), "{text}");
    assert!(text.contains("crashed (no process on it)") && text.contains("not started"), "{text}");
    let before: HashSet<String> = keys_in(&dir.join("results.jsonl")).into_iter().collect();
    let in_doubt = started_not_done(&dir).len();
    assert!(in_doubt <= most, "at most {most} rows in doubt after the kill: {in_doubt}");
    // Every row sent was marked started; one with no outcome is still
    // marked started and not done (each row was sent once so far).
    assert!(
        before.len() + in_doubt >= sent_before,
        "outcomes recorded as they happened: {} for {sent_before} rows sent, {in_doubt} in doubt",
        before.len()
    );

    let output = command().output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));

    let keys = keys_in(&dir.join("results.jsonl"));
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!((keys.len(), unique.len()), (1000, 1000), "every row of shard 1 exactly once");
    assert!(keys.iter().all(|k| k.parse::<u64>().unwrap() % 2 == 0), "rows 2, 4, … are at positions 1, 3, …");
    let mut sent: HashMap<String, usize> = HashMap::new();
    for call in gw.sandbox.recorded() {
        *sent.entry(call.body["controlNumber"].as_str().unwrap().to_string()).or_default() += 1;
    }
    for key in &before {
        assert_eq!(sent[key], 1, "{key} was recorded before the kill and not sent again");
    }
    assert_eq!(sent.len(), 1000, "no row of shard 0 was sent");
    let info = json(&dir.join("run.json"));
    assert_eq!(info["run_id"].as_str(), Some(run_id.as_str()));

    // Started once more, a finished shard has nothing left to send.
    let output = command().output().await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nothing to resume"));
    assert_eq!(sent.values().sum::<usize>() as u64, gw.sandbox.stats().api_calls);
}

async fn status(run: &std::path::Path) -> (Option<i32>, String) {
    let output = bulkcall().args(["status", run.to_str().unwrap()]).output().await.unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `status` and `report` over a run's folder read every shard's directory:
/// non-zero while a shard has not finished, naming it; 1 once all finished
/// with failed rows; one report.html over all shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_report_cover_every_shard_and_name_the_unfinished_ones() {
    let faults = bulkcall::sandbox::Faults { bad_requests: 0.1, ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults, ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 90));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let run = gw.path("run");
    for shard in ["0/3", "2/3"] {
        let code = gw.run_job(&job, &input, &run, &["--shard", shard, "--run-id", "nightly-1"]).await;
        assert!(matches!(code, ExitCode::Success | ExitCode::RowsFailed), "{code:?}");
    }
    let (code, text) = status(&run).await;
    assert_eq!(code, Some(75), "a shard has not finished:\n{text}");
    assert!(text.contains("2 of 3 shards finished"), "{text}");
    assert!(text.contains("not finished: 1/3"), "{text}");
    let line = |text: &str, shard: &str| text.lines().find(|l| l.starts_with(shard)).unwrap_or("").to_string();
    assert!(line(&text, "1/3").contains("not started"), "{text}");
    let done0 = jsonl(&run.join("shard-0-of-3/results.jsonl")).len();
    assert!(line(&text, "0/3").contains(&format!(" {done0} ")), "{text}");

    let output = bulkcall().args(["report", run.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("2 of 3 shards finished; not finished: 1/3"), "{html:.2000}");
    // `resume` over the run's folder names the shard left to finish.
    let output = bulkcall().args(["resume", run.to_str().unwrap()]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("split into 3 shards") && stderr.contains("shard-1-of-3"), "{stderr}");
    assert!(html.contains("nightly-1"));

    let code = gw.run_job(&job, &input, &run, &["--shard", "1/3", "--run-id", "nightly-1"]).await;
    assert!(matches!(code, ExitCode::Success | ExitCode::RowsFailed), "{code:?}");
    let failed = gw.sandbox.stats().api_calls
        - (0..3).map(|k| jsonl(&run.join(format!("shard-{k}-of-3/results.jsonl"))).len() as u64).sum::<u64>();
    assert!(failed > 0, "the sandbox answered some rows 400");
    let (code, text) = status(&run).await;
    assert_eq!(code, Some(1), "every shard finished, some rows failed:\n{text}");
    assert!(text.contains("3 of 3 shards finished"), "{text}");
    assert!(line(&text, "all").contains(&format!(" 90 {:>10} {failed:>10} ", 90 - failed)), "{text}");

    let output = bulkcall().args(["status", run.to_str().unwrap(), "--json"]).output().await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["run_id"], "nightly-1");
    assert_eq!(json["shards"].as_array().unwrap().len(), 3);
    assert!(json["shards"].as_array().unwrap().iter().all(|s| s["state"] == "finished"));

    bulkcall().args(["report", run.to_str().unwrap()]).output().await.unwrap();
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("every shard finished; some rows failed"));
    assert!(html.contains(r#"<a href="shard-1-of-3/report.html">"#), "each shard's own page is linked");
    assert!(html.contains("client_error"), "the failures of every shard are counted");
    // Every shard's events, each named by its shard, its file linked.
    let events = &html[html.find("<h2>Events</h2>").unwrap()..html.find("<h2>Statuses</h2>").unwrap()];
    assert!(events.contains("<p>6 events: started 3, ended 3.</p>"), "{events}");
    assert_eq!(events.matches("Z (shard 1/3)</td>").count(), 2, "{events}");
    for k in 0..3 {
        let file = format!("shard-{k}-of-3/events.jsonl");
        assert!(events.contains(&format!(r#"<a href="{file}">{file}</a>: 2 events"#)), "{events}");
    }
}

/// A shard reading standard input keeps it in its own directory, so the
/// same command started again finds the shard finished (or resumes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_of_standard_input_keeps_it_and_is_found_again() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let rows = eligibility_csv(1, 40);
    let start = || async {
        let mut child = bulkcall()
            .args(["run", job.to_str().unwrap(), "-", "--format", "csv", "--shard", "1/2", "--run-id", "piped"])
            .args(["-c", config.to_str().unwrap(), "-p", "test"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stdin, rows.as_bytes()).await.unwrap();
        drop(stdin);
        child.wait_with_output().await.unwrap()
    };
    let output = start().await;
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let dir = gw.path("out").join("eligibility").join("piped").join("shard-1-of-2");
    let info = json(&dir.join("run.json"));
    let kept = std::path::PathBuf::from(info["inputs"][0]["path"].as_str().unwrap());
    assert!(
        kept.starts_with(&dir) && kept.exists(),
        "run.json names the input kept in the shard's directory: {kept:?}"
    );
    assert_eq!(keys_in(&dir.join("results.jsonl")).len(), 20);

    let output = start().await;
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nothing to resume"));
    assert_eq!(gw.sandbox.stats().api_calls, 20);
}
