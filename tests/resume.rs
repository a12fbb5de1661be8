//! Crash safety: a run killed with SIGKILL is finished by `resume` without
//! sending a recorded row again; one run per job at a time.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bulkcall::sandbox::SandboxConfig;
use common::*;

fn keys_in_results(path: &std::path::Path) -> Vec<String> {
    jsonl(path).iter().map(|r| r["key"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_is_resumed_without_resending_recorded_rows() {
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(20), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 3000));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    // 64 workers: several lanes on a machine with two cores or more.
    let concurrency = 64;
    let mut child = run_command(&job, &input, &out, &config).args(["-j", &concurrency.to_string()]).spawn().unwrap();
    // Killed after more calls than README's bound on rows in doubt (1,088
    // at -j 64), so a run that recorded nothing as it went would exceed it.
    let most = in_doubt_at_most(concurrency, true);
    gw.wait_for_calls(most as u64 + 500).await;
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    gw.settled().await;

    let in_doubt = started_not_done(&out);
    assert!(in_doubt.len() <= most, "at most {most} rows in doubt after the kill: {}", in_doubt.len());
    let before: HashSet<String> = keys_in_results(&out.join("results.jsonl")).into_iter().collect();
    let sent_before: HashSet<String> = gw.received_by_control_number().into_keys().collect();
    // Every row sent was marked started; one with no outcome is still
    // marked started and not done, so the outcomes recorded as they
    // happened are at least the rows sent but those.
    assert!(
        before.len() + in_doubt.len() >= sent_before.len(),
        "{} outcomes recorded for {} rows sent, {} in doubt",
        before.len(),
        sent_before.len(),
        in_doubt.len()
    );
    let calls_before = gw.sandbox.stats().api_calls;

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));

    let keys = keys_in_results(&out.join("results.jsonl"));
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!((keys.len(), unique.len()), (3000, 3000), "every row exactly once in results");
    let mut sent: HashMap<String, usize> = HashMap::new();
    for call in gw.sandbox.recorded() {
        *sent.entry(call.body["controlNumber"].as_str().unwrap().to_string()).or_default() += 1;
    }
    for key in &before {
        assert_eq!(sent[key], 1, "{key} was recorded before the kill and not sent again");
    }
    // Only rows in doubt are sent again (this job is idempotent).
    let doubtful: HashSet<String> = in_doubt.iter().map(|&(_, row)| key_of_row(row)).collect();
    let twice: Vec<&String> = sent.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k).collect();
    assert!(twice.iter().all(|k| doubtful.contains(*k)), "rows sent again that were not in doubt: {twice:?}");
    assert_eq!(gw.sandbox.stats().api_calls, 3000 + twice.len() as u64);
    assert!(gw.sandbox.stats().api_calls > calls_before);
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["total"].as_u64(), summary["succeeded"].as_u64()), (Some(3000), Some(3000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_rows_can_be_failed_instead_of_resent() {
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(50), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 300));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let concurrency = 8;
    let mut child = run_command(&job, &input, &out, &config).args(["-j", &concurrency.to_string()]).spawn().unwrap();
    // Killed after more calls than README's bound on rows in doubt (136 at
    // -j 8), so a run that recorded nothing as it went would exceed it.
    let most = in_doubt_at_most(concurrency, true);
    gw.wait_for_calls(most as u64 + 24).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    gw.settled().await;
    let sent_before: HashSet<String> = gw.received_by_control_number().into_keys().collect();
    let recorded: HashSet<String> = keys_in_results(&out.join("results.jsonl")).into_iter().collect();
    let marked: HashSet<String> = started_not_done(&out).iter().map(|&(_, row)| key_of_row(row)).collect();

    let output = bulkcall().args(["resume", out.to_str().unwrap(), "--in-doubt", "fail"]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    let records = csv_records(&out.join("failures.csv"));
    assert!(records.iter().all(|r| r["_error"] == "in_doubt" && r["_attempts"] == "1"), "{records:?}");
    let in_doubt: HashSet<String> = records.iter().map(|r| r["_key"].clone()).collect();
    // In doubt: exactly the rows the journal marks started and not done
    // whose outcome was not written either.
    let expected: HashSet<String> = marked.difference(&recorded).cloned().collect();
    assert_eq!(in_doubt, expected, "the rows in doubt are those started with no outcome");
    assert!(!in_doubt.is_empty(), "the kill left rows in flight");
    assert!(sent_before.difference(&recorded).all(|k| in_doubt.contains(k)), "every row sent with no outcome");
    assert!(in_doubt.len() <= most, "at most {most} rows in doubt: {}", in_doubt.len());
    let mut sent: HashMap<String, usize> = HashMap::new();
    for call in gw.sandbox.recorded() {
        *sent.entry(call.body["controlNumber"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert!(sent.values().all(|&n| n == 1), "nothing was sent twice");
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["in_doubt"].as_u64(), Some(in_doubt.len() as u64));
    assert_eq!(summary["total"], 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_refuses_a_changed_input_and_a_second_run_of_a_job_exits_75() {
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(100), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 400));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let runs = gw.path("runs");
    let args = |out: &str| {
        let mut command = bulkcall();
        command.args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o"]).arg(runs.join(out)).args([
            "-c",
            config.to_str().unwrap(),
            "-p",
            "test",
            "-j",
            "4",
        ]);
        command
    };
    let mut first = args("a").spawn().unwrap();
    gw.wait_for_calls(4).await;
    let second = args("b").output().await.unwrap();
    assert_eq!(second.status.code(), Some(75));
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(message.contains(&format!("pid {}", first.id().unwrap())), "{message}");
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    gw.write("rows.csv", &eligibility_csv(1, 401));
    let output = bulkcall().args(["resume", runs.join("a").to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("rows.csv") && message.contains("changed"), "{message}");

    let output = bulkcall().args(["resume", gw.path("nowhere").to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("run.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_written_just_before_a_crash_are_not_sent_again() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 50));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, bulkcall::error::ExitCode::Success);
    // As if the process died after writing the last outcomes but before
    // their ledger marks: drop the done marks of rows 31 to 50.
    let journal = std::fs::read_to_string(out.join("journal")).unwrap();
    let kept: Vec<&str> = journal
        .lines()
        .filter(|l| !(l.starts_with("D\t") && l.split('\t').nth(2).unwrap().parse::<u64>().unwrap() > 30))
        .collect();
    std::fs::write(out.join("journal"), kept.join("\n") + "\n").unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(gw.sandbox.stats().api_calls, 50, "rows with an outcome on file are not sent again");
    assert_eq!(keys_in_results(&out.join("results.jsonl")).len(), 50);
    assert_eq!(json(&out.join("summary.json"))["total"], 50);

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nothing to resume"));
    assert_eq!(gw.sandbox.stats().api_calls, 50);
}

/// Every key in the run directory's outcome files: (results, failures).
fn outcome_keys(out: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let results = keys_in_results(&out.join("results.jsonl"));
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        // A kill between a failures file's creation and its first write
        // (header and lines go together) leaves it empty: no failures yet.
        // `resume_writes_the_header_of_a_failures_file_left_empty_by_a_kill` holds resume to it.
        if name.starts_with("failures") && name.ends_with(".csv") && std::fs::metadata(&path).unwrap().len() > 0 {
            let mut reader = csv::Reader::from_path(&path).unwrap();
            let key = reader.headers().unwrap().iter().position(|h| h == "_key").unwrap();
            failures.extend(reader.records().map(|r| r.unwrap()[key].to_string()));
        }
    }
    (results, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_inputs_sharing_file_names_survive_two_kills_with_every_row_in_exactly_one_output() {
    let faults = bulkcall::sandbox::Faults { bad_requests: 0.05, ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults: faults.clone(), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    // 60 inputs of 40 rows in 20 folders: every file name is used three
    // times, every row number 60 times.
    let mut inputs = Vec::new();
    for i in 0..60u64 {
        let folder = gw.path(&format!("in/d{}", i % 20));
        std::fs::create_dir_all(&folder).unwrap();
        let path = folder.join(format!("part{}.csv", i / 20));
        std::fs::write(&path, eligibility_csv(1 + i * 40, 40)).unwrap();
        inputs.push(path.to_str().unwrap().to_string());
    }
    let all: HashSet<String> = (1..=2400).map(|i| format!("{i:09}")).collect();
    let permanent: HashSet<String> =
        all.iter().filter(|k| faults.fault_for(k) == Some(bulkcall::sandbox::Fault::BadRequest)).cloned().collect();
    assert!(permanent.len() > 50, "some rows always fail");
    let out = gw.path("run");

    let mut child = bulkcall()
        .arg("run")
        .arg(&job)
        .args(&inputs)
        .args(["-o", out.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "test", "-j", "32", "-r", "600"])
        .spawn()
        .unwrap();
    // Killed once after a third of the rows, its first resume after two thirds.
    let mut recorded_before = Vec::new();
    for (kill_at, resume) in [(800, false), (1600, true)] {
        if resume {
            child = bulkcall().args(["resume", out.to_str().unwrap()]).spawn().unwrap();
        }
        gw.wait_for_calls(kill_at).await;
        child.start_kill().unwrap();
        assert_eq!(child.wait().await.unwrap().code(), None, "killed by a signal");
        let (results, failures) = outcome_keys(&out);
        let recorded: HashSet<String> = results.into_iter().chain(failures).collect();
        recorded_before.push((gw.settled().await, recorded));
    }
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));

    let (results, failures) = outcome_keys(&out);
    let mut seen: HashMap<&String, usize> = HashMap::new();
    for key in results.iter().chain(&failures) {
        *seen.entry(key).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows in more than one outcome line: {twice:?}");
    let missing: Vec<_> = all.iter().filter(|k| !seen.contains_key(k)).collect();
    assert!(missing.is_empty(), "rows in no output: {missing:?}");
    assert_eq!(failures.iter().cloned().collect::<HashSet<_>>(), permanent, "the failures are the permanent faults");
    let calls = gw.sandbox.recorded();
    for (sent_by_then, recorded) in &recorded_before {
        let again: Vec<_> = calls[*sent_by_then..]
            .iter()
            .map(|c| c.body["controlNumber"].as_str().unwrap().to_string())
            .filter(|k| recorded.contains(k))
            .collect();
        assert!(again.is_empty(), "rows recorded before a kill were sent again: {again:?}");
    }
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["total"], 2400);
    assert_eq!(summary["failed"].as_u64(), Some(permanent.len() as u64));
}

/// A finished run of 50 rows, 20% of them failing for good: the gateway,
/// the run directory and the keys in results and in failures.
async fn finished_with_failures() -> (Gateway, std::path::PathBuf, Vec<String>, Vec<String>) {
    let faults = bulkcall::sandbox::Faults { bad_requests: 0.2, ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults, ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 50));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, bulkcall::error::ExitCode::RowsFailed);
    let (results, failures) = outcome_keys(&out);
    assert!(!failures.is_empty());
    (gw, out, results, failures)
}

/// As if the process had died before the ledger had any of the outcomes'
/// done marks on disk (their started marks are, written before the rows
/// were sent): `resume` (which finds some rows failed) starts again.
async fn resume_after_losing_the_marks(out: &std::path::Path) {
    let journal = std::fs::read_to_string(out.join("journal")).unwrap();
    let started: String = journal.lines().filter(|l| l.starts_with("S\t")).map(|l| format!("{l}\n")).collect();
    std::fs::write(out.join("journal"), started).unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_never_truncates_an_outcome_file() {
    let (gw, out, results, failures) = finished_with_failures().await;
    // As if the process died after writing the outcomes.
    resume_after_losing_the_marks(&out).await;
    assert_eq!(outcome_keys(&out), (results, failures), "the outcome files are kept as they were");
    assert_eq!(gw.sandbox.stats().api_calls, 50, "rows with an outcome on file are not sent again");
}

/// A kill between a failures file's creation and its first write leaves it
/// empty; resume gives it its header with the first failure it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_writes_the_header_of_a_failures_file_left_empty_by_a_kill() {
    let (gw, out, results, failures) = finished_with_failures().await;
    // As if the process died with the failures file just created: nothing
    // in it.
    std::fs::write(out.join("failures.csv"), "").unwrap();
    resume_after_losing_the_marks(&out).await;
    let text = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    assert!(text.starts_with("control_number,"), "the header first: {text}");
    let (results_now, mut failures_now) = outcome_keys(&out);
    let mut failed_before = failures.clone();
    failures_now.sort();
    failed_before.sort();
    assert_eq!(results_now, results, "results kept as they were");
    assert_eq!(failures_now, failed_before, "the failed rows sent again, failing again");
    assert_eq!(gw.sandbox.stats().api_calls, 50 + failures.len() as u64, "only rows with no outcome on file");
}

/// A run of 600 rows, `share` of them failing for good, stopped once the
/// gateway has had `calls` calls: the gateway and the run directory.
async fn stopped_with_failures(share: f64, calls: u64) -> (Gateway, std::path::PathBuf) {
    let faults = bulkcall::sandbox::Faults { bad_requests: share, ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults, latency: Duration::from_millis(10), ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 600));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let stop = tokio_util::sync::CancellationToken::new();
    let args = ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap(), "-j", "8"];
    let (code, ()) = tokio::join!(gw.run_until(&args, stop.clone()), async {
        gw.wait_for_calls(calls).await;
        stop.cancel();
    });
    assert_eq!(code, bulkcall::error::ExitCode::Interrupted);
    (gw, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_failures_as_a_share_judges_a_resumed_run_on_the_rows_it_sends() {
    // Most rows fail in the first session; none in the resumed one, which
    // the config sends to a gateway without faults.
    let (gw, out) = stopped_with_failures(0.6, 300).await;
    let earlier = json(&out.join("summary.json"));
    let (failed, total) = (earlier["failed"].as_u64().unwrap(), earlier["total"].as_u64().unwrap());
    // Judged on all the run's rows, 20% is crossed from the resume's first
    // row (the earlier rows alone are over it) and at its end (more than
    // 120 of 600 failed): that judgement would abort with exit 4.
    assert!(failed * 5 > total && failed * 5 > 600, "{earlier}");
    let healthy = Gateway::start(sandbox_config()).await;
    std::fs::copy(healthy.config(SECRET, ""), gw.path("bulkcall.toml")).unwrap();

    let code = gw.run(&["resume", out.to_str().unwrap(), "--max-failures", "20%"]).await;
    assert_eq!(code, bulkcall::error::ExitCode::RowsFailed, "this session's rows did not fail: 0% of them");
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["total"].as_u64(), summary["failed"].as_u64()), (Some(600), Some(failed)));
    assert_eq!(healthy.sandbox.stats().api_calls, 600 - total, "the rest went to the healthy gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_failures_as_a_count_judges_a_resumed_run_on_all_its_failures() {
    let (gw, out) = stopped_with_failures(0.3, 500).await;
    let earlier = json(&out.join("summary.json"));
    let (failed, total) = (earlier["failed"].as_u64().unwrap(), earlier["total"].as_u64().unwrap());
    // A cap this session alone could never reach: fewer rows are left than it.
    let cap = failed + 5;
    assert!(cap > 600 - total, "{earlier}");

    let code = gw.run(&["resume", out.to_str().unwrap(), "--max-failures", &cap.to_string()]).await;
    assert_eq!(code, bulkcall::error::ExitCode::MaxFailures, "the run's failures, earlier ones too, reach the cap");
    let summary = json(&out.join("summary.json"));
    assert!(summary["failed"].as_u64().unwrap() >= cap, "{summary}");
}

/// How long the calls a gateway received took to arrive, first to last.
fn arrival_span(gw: &Gateway) -> Duration {
    let times: Vec<Duration> = gw.sandbox.recorded().iter().map(|c| c.at).collect();
    times.iter().max().unwrap().saturating_sub(*times.iter().min().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_follows_the_config_as_it_is_now_with_the_runs_own_flags_unless_given_again() {
    let old = Gateway::start(SandboxConfig { latency: Duration::from_millis(50), ..sandbox_config() }).await;
    let new = Gateway::start(SandboxConfig { latency: Duration::from_millis(100), ..sandbox_config() }).await;
    // The config's default concurrency is 16; each run gives its own -j.
    let config = old.config(SECRET, "");
    let job = old.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = old.write("rows.csv", &eligibility_csv(1, 15));
    let interrupted = |out: &'static str, flags: &'static [&'static str]| {
        let (old, job, input) = (&old, &job, &input);
        async move {
            let out = old.path(out);
            let stop = tokio_util::sync::CancellationToken::new();
            let mut args = vec!["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()];
            args.extend_from_slice(flags);
            let calls = old.sandbox.stats().api_calls;
            let (code, ()) = tokio::join!(old.run_until(&args, stop.clone()), async {
                old.wait_for_calls(calls + 3).await;
                stop.cancel();
            });
            assert_eq!(code, bulkcall::error::ExitCode::Interrupted);
            out
        }
    };
    let first = interrupted("first", &["-j", "1", "-r", "50"]).await;
    let second = interrupted("second", &["-j", "4"]).await;
    let third = interrupted("third", &["-j", "1", "-r", "50"]).await;
    let run = json(&first.join("run.json"));
    assert_eq!(run["flags"]["settings"], serde_json::json!({"concurrency": 1, "rate": 50.0}));
    let sent_to_old = old.sandbox.stats().api_calls;

    // The gateway moved: the config now names the new one.
    let moved = new.config(SECRET, "");
    std::fs::copy(&moved, &config).unwrap();

    let code = old.run(&["resume", first.to_str().unwrap()]).await;
    assert_eq!(code, bulkcall::error::ExitCode::Success);
    assert_eq!(old.sandbox.stats().api_calls, sent_to_old, "nothing more went to the old gateway");
    let resent = new.sandbox.stats().api_calls;
    assert!(resent >= 10, "the rest went to the new gateway: {resent}");
    // One call at a time (the run's -j 1), 100 ms each; 16 at a time would take about 100 ms.
    let floor = Duration::from_millis(100 * (resent - 2));
    assert!(arrival_span(&new) >= floor, "{:?} for {resent} calls", arrival_span(&new));
    assert_eq!(jsonl(&first.join("results.jsonl")).len(), 15);

    // A flag given to resume wins over the run's own (-j 4).
    let before = new.sandbox.recorded().len();
    let code = old.run(&["resume", second.to_str().unwrap(), "-j", "1"]).await;
    assert_eq!(code, bulkcall::error::ExitCode::Success);
    let calls = &new.sandbox.recorded()[before..];
    assert!(calls.len() >= 8, "{}", calls.len());
    let span = calls.last().unwrap().at - calls.first().unwrap().at;
    assert!(span >= Duration::from_millis(100 * (calls.len() as u64 - 2)), "{span:?} for {} calls", calls.len());
    assert_eq!(jsonl(&second.join("results.jsonl")).len(), 15);

    // The config file itself moved: resume says how to name its new place,
    // and reads it from there with -c, the run's profile kept.
    let elsewhere = old.path("moved.toml");
    std::fs::rename(&config, &elsewhere).unwrap();
    let before = new.sandbox.stats().api_calls;
    let code = old.run(&["resume", third.to_str().unwrap()]).await;
    assert_eq!(code, bulkcall::error::ExitCode::Usage, "the run's config is gone");
    assert_eq!(new.sandbox.stats().api_calls, before, "nothing sent without a config");
    let code = old.run(&["resume", third.to_str().unwrap(), "-c", elsewhere.to_str().unwrap()]).await;
    assert_eq!(code, bulkcall::error::ExitCode::Success);
    assert!(new.sandbox.stats().api_calls >= before + 10, "the rest went to the moved config's gateway");
    assert_eq!(jsonl(&third.join("results.jsonl")).len(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_directory_is_locked_wherever_resume_is_started_from() {
    let gw = Gateway::start(SandboxConfig { latency: Duration::from_millis(100), ..sandbox_config() }).await;
    // A relative out_dir: the job's lock is in a different place for each current folder.
    let config = gw.config(SECRET, "out_dir = \"runs\"");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 200));
    let out = gw.path("run");
    for folder in ["a", "b"] {
        std::fs::create_dir(gw.path(folder)).unwrap();
    }
    let mut first =
        run_command(&job, &input, &out, &config).current_dir(gw.path("a")).args(["-j", "2"]).spawn().unwrap();
    let pid = first.id().unwrap();
    gw.wait_for_calls(2).await;
    let second = bulkcall().current_dir(gw.path("b")).args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    assert_eq!(second.status.code(), Some(75));
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(message.contains(&format!("pid {pid}")), "{message}");
    assert!(message.contains(out.to_str().unwrap()), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_needed_format_is_resumed_with_its_saved_format() {
    let gw = Gateway::start(sandbox_config()).await;
    // A regular file whose extension tells no format: the run needed --format.
    let input = gw.write("rows.dat", &eligibility_csv(1, 20));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &["--format", "csv"]).await, bulkcall::error::ExitCode::Success);
    // As if the process died before writing its summary.
    std::fs::remove_file(out.join("summary.json")).unwrap();

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(gw.sandbox.stats().api_calls, 20, "the recorded rows are not sent again");
    assert_eq!(json(&out.join("summary.json"))["total"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_a_crashed_run_as_resume_then_finds_it_and_writes_nothing() {
    let (_gw, out, results, failures) = finished_with_failures().await;
    // As if the process died after writing the last outcomes (results and
    // failures) but before their done marks: drop those of rows 31 to 50.
    let journal = std::fs::read_to_string(out.join("journal")).unwrap();
    let kept: Vec<&str> = journal
        .lines()
        .filter(|l| !(l.starts_with("D\t") && l.split('\t').nth(2).unwrap().parse::<u64>().unwrap() > 30))
        .collect();
    std::fs::write(out.join("journal"), kept.join("\n") + "\n").unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let before: Vec<Vec<u8>> =
        ["journal", "results.jsonl", "failures.csv"].iter().map(|f| std::fs::read(out.join(f)).unwrap()).collect();

    let output = bulkcall()
        .args(["status", out.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let shard = &status["shards"][0];
    let after: Vec<Vec<u8>> =
        ["journal", "results.jsonl", "failures.csv"].iter().map(|f| std::fs::read(out.join(f)).unwrap()).collect();
    assert!(before == after, "status writes nothing in the run directory");
    // Every outcome is on file: none in doubt, all 50 done, as resume finds.
    let counts = |s: &serde_json::Value| {
        ["done", "succeeded", "failed", "in_doubt"].map(|k| s[k].as_u64().unwrap_or_else(|| panic!("{k}: {s}")))
    };
    assert_eq!(counts(shard), [50, results.len() as u64, failures.len() as u64, 0], "{status}");

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nothing to resume") || stderr.contains("50 rows already have an outcome; 0 were in flight"),
        "{stderr}"
    );
}
