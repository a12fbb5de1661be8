//! The morning after: what a cron log, a JSON log and the closing lines
//! tell the on-call person, and that the command they print works when
//! followed literally.

mod common;

use bulkcall::sandbox::{Faults, SandboxConfig};
use common::*;
use serde_json::Value;

/// Claims sent one at a time, each attempt once.
const FLAGS: [&str; 6] = ["-j", "1", "--max-attempts", "1", "--timeout", "5s"];

fn claims_input(gw: &Gateway, n: u64) -> std::path::PathBuf {
    let rows: String = (1..=n).map(|i| format!("{{\"controlNumber\":\"{i:09}\"}}\n")).collect();
    gw.write("claims.jsonl", &rows)
}

const ECHO_JOB: &str =
    "url = \"/medicalnetwork/professionalclaims/v3/submission\"\nkey = \"{{ controlNumber }}\"\nbody = \"{{ row }}\"\n";

/// Runs a printed command as it stands (words split on spaces: the paths
/// here have none).
async fn follow(command: &str) -> (Option<i32>, String) {
    let words: Vec<&str> = command.split(' ').collect();
    assert_eq!(words[0], env!("CARGO_BIN_EXE_bulkcall"), "the command names this binary: {command}");
    let output = bulkcall().args(&words[1..]).output().await.unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_q_one_line_says_when_what_where_and_what_next() {
    let faults = Faults { bad_requests: 0.3, ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults, ..sandbox_config() }).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let input = claims_input(&gw, 40);
    let out = gw.path("run");
    let output = run_command(&job, &input, &out, &gw.config(SECRET, "")).args(FLAGS).arg("-q").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line for the cron log: {stderr}");
    let line = lines[0];
    // bulkcall: 2026-12-02T03:00:14Z claims: finished 40 rows ...
    let stamp = line.strip_prefix("bulkcall: ").unwrap().split(' ').next().unwrap();
    assert!(humantime::parse_rfc3339(stamp).is_ok() && stamp.ends_with('Z'), "a UTC time first: {line}");
    let failures = out.join("failures.jsonl");
    let failed = jsonl(&failures).len();
    assert!(failed > 0 && failed < 40, "{failed}");
    for part in [
        " claims: finished 40 rows".to_string(),
        format!("{} failed (client_error {failed})", failed),
        "; exit 1".to_string(),
        format!("; run directory {}", out.display()),
        format!("; failures {}", failures.display()),
        format!("; report {}", out.join("report.html").display()),
    ] {
        assert!(line.contains(&part), "{part:?} in {line}");
    }
    // The next command carries the run's flags, and works as printed.
    let next = line.split("; next: ").nth(1).expect("a next command");
    assert!(next.ends_with(&format!("-j 1 --max-attempts 1 --timeout 5s {}", failures.display())), "{next}");
    let again = gw.path("again");
    let (code, stderr) = follow(&format!("{next} -o {} -q", again.display())).await;
    assert_eq!(code, Some(1), "the same rows fail again at this gateway: {stderr}");
    assert_eq!(jsonl(&again.join("failures.jsonl")).len(), failed, "{stderr}");

    // summary.json says where everything is.
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["run_dir"], Value::from(out.display().to_string()));
    assert_eq!(summary["failures"], serde_json::json!([failures.display().to_string()]));
    assert_eq!(summary["report"], Value::from(out.join("report.html").display().to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_log_ends_with_one_event_holding_the_same() {
    let faults = Faults { bad_requests: 0.3, ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults, ..sandbox_config() }).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let input = claims_input(&gw, 20);
    let out = gw.path("run");
    let config = gw.config(SECRET, "");
    let output =
        run_command(&job, &input, &out, &config).args(FLAGS).args(["--log-format", "json"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last: Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(last["message"], "finished", "{last}");
    assert_eq!(last["job"], "claims");
    assert_eq!(last["exit_code"], 1);
    assert_eq!(last["run_dir"], Value::from(out.display().to_string()));
    assert_eq!(last["failures"][0], Value::from(out.join("failures.jsonl").display().to_string()));
    assert_eq!(last["report"], Value::from(out.join("report.html").display().to_string()));
    assert!(last["next"].as_str().unwrap().ends_with("failures.jsonl"), "{last}");
    assert_eq!(last["summary"]["total"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_max_failures_the_printed_resume_goes_on() {
    let broken = Faults { bad_requests: 1.0, ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults: broken, ..sandbox_config() }).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let input = claims_input(&gw, 30);
    let out = gw.path("run");
    let config = gw.config(SECRET, "");
    let output =
        run_command(&job, &input, &out, &config).args(FLAGS).args(["--max-failures", "5"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    let failed = json(&out.join("summary.json"))["failed"].as_u64().unwrap();
    let next = stderr.lines().find_map(|l| l.split("it counts this run's ").nth(1)).expect("advice on the cap");
    let next = next.split(": ").nth(1).unwrap();
    let cap = (2 * 5).max(failed + 5);
    assert_eq!(next, format!("{} resume {} --max-failures {cap}", env!("CARGO_BIN_EXE_bulkcall"), out.display()));

    // The cause fixed (the config now points at a gateway that takes the
    // claims), the printed command sends the rest instead of aborting again.
    let gw2 = Gateway::start(sandbox_config()).await;
    let text = std::fs::read_to_string(&config).unwrap().replace(&gw.sandbox.base_url(), &gw2.sandbox.base_url());
    std::fs::write(&config, text.replace(&gw.sandbox.token_url(), &gw2.sandbox.token_url())).unwrap();
    let (code, stderr) = follow(next).await;
    assert_eq!(code, Some(1), "finished, with the first session's failures: {stderr}");
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["total"].as_u64(), summary["failed"].as_u64()), (Some(30), Some(failed)), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_json_stdout_holds_one_json_document() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let mut rows: String = (1..=8).map(|i| format!("{{\"controlNumber\":\"{i:09}\"}}\n")).collect();
    rows.push_str("{\"other\":1}\n");
    let input = gw.write("claims.jsonl", &rows);
    let config = gw.config(SECRET, "");
    for verbose in [false, true] {
        let out = gw.path(&format!("dry-{verbose}"));
        let mut command = run_command(&job, &input, &out, &config);
        command.args(["--dry-run", "--json"]).stdout(std::process::Stdio::piped());
        if verbose {
            command.arg("-v");
        }
        let output = command.output().await.unwrap();
        let summary: Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON document");
        assert_eq!((summary["total"].as_u64(), summary["failed"].as_u64()), (Some(9), Some(1)), "{summary}");
    }
    let output = bulkcall()
        .args(["validate", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap()])
        .args(["-p", "test", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let counts: Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON document");
    assert_eq!(
        (counts["rows"].as_u64(), counts["ready"].as_u64(), counts["invalid"].as_u64()),
        (Some(9), Some(8), Some(1))
    );
    assert!(counts["first_invalid"][0].as_str().unwrap().contains("line 9 (row 9)"), "{counts}");
    assert_eq!(gw.sandbox.stats().api_calls, 0, "nothing sent");
}

/// `bulkcall status DIR`: its exit code and what it prints.
async fn status(dir: &std::path::Path) -> (Option<i32>, String) {
    let output =
        bulkcall().args(["status", dir.to_str().unwrap()]).stdout(std::process::Stdio::piped()).output().await.unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_a_run_going_on_from_one_that_crashed() {
    // Calls of 10 s: the run is going on while status reads it.
    let gw = Gateway::start(SandboxConfig { latency: std::time::Duration::from_secs(10), ..sandbox_config() }).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 20));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let mut child = run_command(&job, &input, &out, &gw.config(SECRET, "")).args(["-j", "2"]).spawn().unwrap();
    gw.wait_for_calls(2).await;
    let (code, text) = status(&out).await;
    assert_eq!(code, Some(75), "{text}");
    let pid = child.id().unwrap();
    assert!(text.contains(&format!("running (pid {pid})")), "{text}");
    assert!(text.contains(&format!("pid {pid} is working on it; wait for it to end")), "{text}");
    assert!(!text.contains("resume"), "no resume while it runs: {text}");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let (code, text) = status(&out).await;
    assert_eq!(code, Some(75), "{text}");
    assert!(text.contains("crashed (no process on it)"), "{text}");
    // Not a shard: no advice to start "the shard" again.
    let resume = format!("send the rest: {} resume {}\n", env!("CARGO_BIN_EXE_bulkcall"), out.display());
    assert!(text.contains(&resume) && !text.contains("shard again"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_lists_a_jobs_runs_newest_first_and_latest_points_at_the_newest() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let config = gw.config(SECRET, "");
    let good = claims_input(&gw, 5);
    let mixed = gw.write("mixed.jsonl", "{\"controlNumber\":\"000000001\"}\n{\"other\":1}\n{\"other\":2}\n");
    // (Read with output(): a child whose stderr pipe is dropped dies writing to it.)
    let run = |input: &std::path::Path, extra: &[&str]| {
        let mut command = bulkcall();
        command.args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap()]);
        command.args(["-p", "test", "-j", "1"]).args(extra);
        command
    };
    // No -o: into out/claims/<start time>/, as a scheduled run does.
    let o = run(&good, &[]).output().await.unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&mixed, &[]).output().await.unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&mixed, &["--max-failures", "1"]).output().await.unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", String::from_utf8_lossy(&o.stderr));

    let output = bulkcall()
        .args(["runs", "claims", "-c", config.to_str().unwrap(), "-p", "test"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three runs: {text}");
    let states = ["aborted", "finished, rows failed", "finished"];
    for (line, (state, exit)) in lines[1..].iter().zip(states.iter().zip(["4", "1", "0"])) {
        assert!(line.contains(" claims ") && line.contains(state), "{state} in {line}");
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[words.len() - 2], exit, "{line}");
    }
    let output = bulkcall()
        .args(["runs", job.to_str().unwrap(), "--json", "-c", config.to_str().unwrap(), "-p", "test"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    let listed: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!((listed[0]["done"].as_u64(), listed[0]["exit_code"].as_u64()), (Some(2), Some(4)), "{listed:?}");
    assert_eq!((listed[2]["succeeded"].as_u64(), listed[2]["failed"].as_u64()), (Some(5), Some(0)));
    let newest = std::path::PathBuf::from(listed[0]["path"].as_str().unwrap());
    let latest = std::fs::read_link(gw.path("out").join("claims").join("latest")).unwrap();
    assert_eq!(latest, newest.file_name().unwrap(), "latest names the newest run");
    // Through the link, status and report name the run itself, not `latest`.
    let link = gw.path("out").join("claims").join("latest");
    let output = bulkcall().args(["status", link.to_str().unwrap()]).stdout(std::process::Stdio::piped()).output();
    let status = String::from_utf8_lossy(&output.await.unwrap().stdout).to_string();
    let run_dir = std::fs::canonicalize(&link).unwrap();
    assert!(status.contains(&format!("resume {}", run_dir.display())), "{status}");
    assert!(!status.contains("latest"), "{status}");
    let output = bulkcall().args(["report", link.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    let page = std::fs::read_to_string(run_dir.join("report.html")).unwrap();
    assert!(page.contains(&run_dir.display().to_string()) && !page.contains("/latest"), "the page names the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_failure_may_have_been_acted_on_next_resends_them_once_checked() {
    // A claim job (not idempotent): the slow rows time out, in doubt (the
    // breaker off: timeouts alone at the end of a run are no outage here).
    let faults = Faults { slow: 0.3, slow_delay: std::time::Duration::from_millis(1500), ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults: faults.clone(), ..sandbox_config() }).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let input = claims_input(&gw, 20);
    let out = gw.path("run");
    let flags = ["-j", "4", "--max-attempts", "1", "--timeout", "300ms"];
    let config = gw.config(SECRET, "outage_after = \"0s\"");
    let output = run_command(&job, &input, &out, &config).args(flags).arg("-q").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let failures = out.join("failures.jsonl");
    let failed = jsonl(&failures);
    let slow = (1..=20u64).filter(|i| faults.fault_for(&format!("{i:09}")).is_some()).count();
    assert!(slow > 0 && failed.len() == slow, "the slow rows failed: {stderr}");
    assert!(failed.iter().all(|f| f["_error"] == "in_doubt"), "{failed:?}");
    let line = stderr.lines().last().unwrap();
    let check = format!(
        "; {} the gateway may have acted on (in_doubt {slow}): check each there and remove from the failures file \
         those it processed before the next command sends them again; next: ",
        if slow == 1 { "1 row".to_string() } else { format!("{slow} rows") }
    );
    assert!(line.contains(&check), "{line}");
    // The next command sends them (the file as it is, without --in-doubt
    // resend, would leave every row out and send nothing).
    let next = line.split("; next: ").nth(1).unwrap();
    assert!(next.ends_with(&format!("--timeout 300ms --in-doubt resend {}", failures.display())), "{next}");
    gw.settled().await;
    let before = gw.sandbox.stats().api_calls;
    let again = gw.path("again");
    let (code, stderr) = follow(&format!("{next} -o {} -q", again.display())).await;
    assert_eq!(code, Some(0), "sent again, answered at once this time: {stderr}");
    assert_eq!(gw.sandbox.stats().api_calls - before, slow as u64, "each checked row sent once more");
    assert_eq!(jsonl(&again.join("results.jsonl")).len(), slow);

    // At a terminal, the closing lines say the same (a fresh gateway: the
    // slow rows are slow on their first call only).
    let gw = Gateway::start(SandboxConfig { faults, ..sandbox_config() }).await;
    let out = gw.path("terminal");
    let config = gw.config(SECRET, "outage_after = \"0s\"");
    let output = run_command(&job, &input, &out, &config).args(flags).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("every failed row is one the gateway may have acted on (in_doubt"), "{stderr}");
    assert!(stderr.contains(&format!("--in-doubt resend {}", out.join("failures.jsonl").display())), "{stderr}");
    assert!(!stderr.contains("that leaves out the rows"), "{stderr}");

    // Fed back as it is: every row left out, and said to be in doubt from
    // before, not sent by this run.
    let failures = out.join("failures.jsonl");
    let output = run_command(&job, &failures, &gw.path("fed"), &config).args(flags).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("of the failures fed back left out, not sent: the job is not idempotent"), "{stderr}");
    assert!(
        stderr.contains("sent, by this run or the one whose failures were fed back, without a recorded answer"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_printed_command_works_pasted_into_a_shell_when_its_paths_have_spaces() {
    let faults = Faults { bad_requests: 0.3, ..Default::default() };
    let gw = Gateway::start(SandboxConfig { faults, ..sandbox_config() }).await;
    std::fs::create_dir(gw.path("my jobs")).unwrap();
    let job = gw.write("my jobs/claims job.toml", ECHO_JOB);
    let input = claims_input(&gw, 20);
    let out = gw.path("my runs/it's the first");
    let config = gw.config(SECRET, "");
    let output = run_command(&job, &input, &out, &config).args(FLAGS).arg("-q").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let failed = jsonl(&out.join("failures.jsonl")).len();
    let next = stderr.lines().last().unwrap().split("; next: ").nth(1).expect("a next command");
    assert!(next.contains("'"), "quoted: {next}");
    // As a person pasting it would: through a shell.
    let again = gw.path("again");
    let pasted = format!("{next} -o {} -q", again.display());
    let output = tokio::process::Command::new("sh").args(["-c", &pasted]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "the same rows fail again at this gateway: {pasted}: {stderr}");
    assert_eq!(jsonl(&again.join("failures.jsonl")).len(), failed, "{stderr}");
}
