//! Metrics for scheduled runs: the textfile checked by the real promtool and
//! held to summary.json, `/metrics` scraped while a run goes on, the final
//! figures pushed into a real prometheus-pushgateway, a push that fails, and
//! the last success carried over from the file's previous content.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bulkcall::error::ExitCode;
use bulkcall::sandbox::{Faults, SandboxConfig};
use common::*;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Whether `tool` runs; when it does not, CI fails and elsewhere the test is
/// skipped, saying how to install it.
fn have(tool: &str, package: &str) -> bool {
    if std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    let hint = format!("{tool} is not installed: `apt-get install {package}` (Debian); .ci/run installs it");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{hint}");
    eprintln!("skipped: {hint}");
    false
}

/// `promtool check metrics` over `text`: panics with its complaints.
fn promtool_accepts(text: &str, what: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics on {what}: {said}\n{text}");
}

/// One sample: its name, labels and value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a text exposition (label values here hold no quotes or commas).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            Sample { name: name.to_string(), labels, value: value.parse().unwrap() }
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `with`.
fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert!(found.len() <= 1, "{name} {with:?} is ambiguous: {found:?}");
    found.first().map(|s| s.value)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every label of every sample is one bulkcall names, and none holds a row value.
fn labels_hold_no_row_values(samples: &[Sample], allowed_extra: &[&str]) {
    let allowed = ["job_name", "shard", "outcome", "code", "kind", "le"];
    for sample in samples {
        for (name, value) in &sample.labels {
            assert!(
                allowed.contains(&name.as_str()) || allowed_extra.contains(&name.as_str()),
                "label {name} on {sample:?}"
            );
            assert!(!value.contains("M1") && !value.contains("Doe") && !value.contains("Clinic"), "{sample:?}");
        }
    }
}

fn faulty(faults: Faults) -> SandboxConfig {
    SandboxConfig { faults, ..sandbox_config() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_file_passes_promtool_and_agrees_with_the_summary() {
    if !have("promtool", "prometheus") {
        return;
    }
    // Some rows fail for good, some are retried after a 500 or a 429.
    let faults =
        Faults { broken: 0.1, server_errors: 0.1, throttles: 0.05, retry_after: Duration::ZERO, ..Faults::default() };
    let gw = Gateway::start(faulty(faults)).await;
    gw.config(SECRET, "backoff_base = \"1ms\"\nthrottle_base = \"1ms\"");
    let input = gw.write("rows.csv", &eligibility_csv(1, 300));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let (out, file) = (gw.path("run"), gw.path("bulkcall.prom"));

    let code = gw.run_job(&job, &input, &out, &["--metrics-file", file.to_str().unwrap()]).await;
    assert_eq!(code, ExitCode::RowsFailed);

    let text = std::fs::read_to_string(&file).unwrap();
    promtool_accepts(&text, "the final metrics file");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644, "the textfile collector (another user) can read it");
    let leftovers: Vec<_> = std::fs::read_dir(gw.dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary file left: {leftovers:?}");

    let s = samples(&text);
    labels_hold_no_row_values(&s, &[]);
    let summary = json(&out.join("summary.json"));
    let n = |v: &Value| v.as_f64().unwrap();
    let job_name = [("job_name", "eligibility")];
    let rows = |outcome| value(&s, "bulkcall_rows", &[("job_name", "eligibility"), ("outcome", outcome)]);
    assert_eq!(rows("succeeded"), Some(n(&summary["succeeded"])));
    assert_eq!(rows("failed"), Some(n(&summary["failed"])));
    assert_eq!((rows("in_doubt"), rows("pending")), (Some(0.0), Some(0.0)));
    assert!(n(&summary["failed"]) > 0.0 && n(&summary["retries"]) > 0.0, "{summary}");
    assert_eq!(value(&s, "bulkcall_rows_expected", &job_name), Some(300.0));
    assert_eq!(value(&s, "bulkcall_attempts_total", &job_name), Some(n(&summary["attempts"])));
    assert_eq!(value(&s, "bulkcall_retries_total", &job_name), Some(n(&summary["retries"])));
    assert_eq!(value(&s, "bulkcall_token_requests_total", &job_name), Some(n(&summary["token_requests"])));
    assert_eq!(value(&s, "bulkcall_exit_code", &job_name), Some(1.0));
    for (kind, count) in summary["errors"].as_object().unwrap() {
        assert_eq!(value(&s, "bulkcall_errors_total", &[("kind", kind)]), Some(n(count)), "errors {kind}");
    }
    // Every answer counted, the retried ones too: summary.json's statuses count each row's last.
    let answers: f64 = s.iter().filter(|x| x.name == "bulkcall_responses_total").map(|x| x.value).sum();
    assert_eq!(answers, n(&summary["attempts"]), "one answer per attempt");
    assert!(value(&s, "bulkcall_responses_total", &[("code", "429")]).unwrap() > 0.0);
    assert!(
        value(&s, "bulkcall_responses_total", &[("code", "200")]).unwrap() >= n(&summary["statuses"]["200"]),
        "{summary}"
    );
    assert_eq!(value(&s, "bulkcall_request_duration_seconds_count", &job_name), Some(answers));
    assert_eq!(value(&s, "bulkcall_request_duration_seconds_bucket", &[("le", "+Inf")]), Some(answers));
    let (start, end) = (
        value(&s, "bulkcall_run_start_timestamp_seconds", &job_name).unwrap(),
        value(&s, "bulkcall_run_end_timestamp_seconds", &job_name).unwrap(),
    );
    assert!(start <= end && end - start < 120.0, "{start} {end}");
    let expiry = value(&s, "bulkcall_token_expiry_timestamp_seconds", &job_name).unwrap();
    assert!(expiry > end, "the token was still valid at the end");
    assert_eq!(value(&s, "bulkcall_last_success_timestamp_seconds", &job_name), None, "no run succeeded yet");
}

/// A claim job (not idempotent): every started mark durable before its
/// call, and the syncs counted: never more than one per millisecond of the
/// run (rows that start in the same moment share one), and at least one
/// per `-j` rows (no more rows marked and without an outcome than `-j`).
/// How many rows share a sync depends on how fast they come (the unit
/// tests of `output` hold the sharing itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_job_makes_at_most_one_sync_per_millisecond_and_counts_them() {
    if !have("promtool", "prometheus") {
        return;
    }
    let gw = Gateway::start(sandbox_config()).await;
    gw.config(SECRET, "");
    let rows = 3000;
    let input = gw.write("rows.csv", &eligibility_csv(1, rows));
    let job = gw.write("claims.toml", CLAIMS_JOB);
    let (out, file) = (gw.path("run"), gw.path("bulkcall.prom"));
    let code = gw.run_job(&job, &input, &out, &["-j", "16", "--metrics-file", file.to_str().unwrap()]).await;
    assert_eq!(code, ExitCode::Success);
    let text = std::fs::read_to_string(&file).unwrap();
    promtool_accepts(&text, "the metrics file of a claim job");
    let s = samples(&text);
    let job_name = [("job_name", "claims")];
    let syncs = value(&s, "bulkcall_disk_syncs_total", &job_name).expect("the syncs are counted");
    let (start, end) = (
        value(&s, "bulkcall_run_start_timestamp_seconds", &job_name).unwrap(),
        value(&s, "bulkcall_run_end_timestamp_seconds", &job_name).unwrap(),
    );
    let run_ms = (end - start) * 1000.0;
    eprintln!("{syncs} syncs for {rows} rows in {run_ms:.0} ms");
    // At least one sync per 16 rows (no more rows marked and not settled
    // than -j), the outcomes' too.
    assert!(syncs >= rows as f64 / 16.0, "{syncs} syncs for {rows} rows");
    // The clock's millisecond, rounded at both ends.
    assert!(syncs <= run_ms + 2.0, "{syncs} syncs in {run_ms} ms");
}

/// A run paced at 20 calls per second lasts; `/metrics` is scraped until
/// its counters rise, and the file, written at the start and rewritten
/// after 10 s, passes promtool both times while the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_run_goes_on_the_endpoint_shows_rising_counters_and_the_file_is_rewritten() {
    if !have("promtool", "prometheus") {
        return;
    }
    let gw = std::sync::Arc::new(Gateway::start(sandbox_config()).await);
    let input = gw.write("rows.csv", &eligibility_csv(1, 1000));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let (out, file) = (gw.path("run"), gw.path("bulkcall.prom"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let stop = CancellationToken::new();
    let run = {
        let (gw, stop) = (gw.clone(), stop.clone());
        let args: Vec<String> = [
            "run",
            job.to_str().unwrap(),
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--rate",
            "20",
            "--metrics-listen",
            &listen,
            "--metrics-file",
            file.to_str().unwrap(),
        ]
        .map(String::from)
        .into();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            gw.run_until(&args, stop).await
        })
    };

    let client = reqwest::Client::new();
    let url = format!("http://{listen}/metrics");
    let deadline = Instant::now() + Duration::from_secs(60);
    let succeeded = |text: &str| value(&samples(text), "bulkcall_rows", &[("outcome", "succeeded")]).unwrap_or(-1.0);
    let mut first: Option<f64> = None;
    let (mut last_scrape, mut last_file) = (String::new(), String::new());
    let (mut rose, mut rewritten) = (false, false);
    while !(rose && rewritten) {
        assert!(Instant::now() < deadline, "in 60 s: counters rose {rose}, file rewritten {rewritten}");
        assert!(!run.is_finished(), "the run ended before it was watched");
        if let Ok(answer) = client.get(&url).send().await {
            assert_eq!(answer.headers()["content-type"], "text/plain; version=0.0.4");
            let text = answer.text().await.unwrap();
            let now = succeeded(&text);
            // Each scrape that says something new is checked whole.
            if now != succeeded(&last_scrape) {
                promtool_accepts(&text, "a scrape");
                let s = samples(&text);
                labels_hold_no_row_values(&s, &[]);
                assert_eq!(value(&s, "bulkcall_exit_code", &[]), None, "no exit code while the run goes on");
                if now > 0.0 {
                    assert!(value(&s, "bulkcall_rows", &[("outcome", "pending")]).unwrap() > 0.0);
                }
                match first {
                    None if now > 0.0 => first = Some(now),
                    Some(before) if now > before => rose = true,
                    _ => {}
                }
                last_scrape = text;
            }
        }
        // The file: written at the start, then rewritten after 10 s; each
        // version read is checked whole.
        if let Ok(text) = std::fs::read_to_string(&file)
            && text != last_file
        {
            promtool_accepts(&text, "the metrics file during the run");
            if !last_file.is_empty() {
                assert!(succeeded(&text) > 0.0, "the rewrite holds the rows done: {text}");
                rewritten = true;
            }
            last_file = text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    assert_eq!(run.await.unwrap(), ExitCode::Interrupted);
    let text = std::fs::read_to_string(&file).unwrap();
    promtool_accepts(&text, "the metrics file after a stop");
    let s = samples(&text);
    assert_eq!(value(&s, "bulkcall_exit_code", &[]), Some(130.0));
    let summary = json(&out.join("summary.json"));
    assert_eq!(value(&s, "bulkcall_rows", &[("outcome", "succeeded")]), summary["succeeded"].as_f64());
    assert!(client.get(&url).send().await.is_err(), "the endpoint lasts as long as the run");
}

/// A real Pushgateway on a free loopback port, named by `metrics.push` in
/// the config: the final figures land in the group job=bulkcall, job_name,
/// shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_figures_land_in_a_pushgateway_grouped_by_job_name_and_shard() {
    if !have("prometheus-pushgateway", "prometheus-pushgateway") {
        return;
    }
    let port = free_port();
    let _pushgateway = tokio::process::Command::new("prometheus-pushgateway")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus-pushgateway starts");
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.get(format!("{base}/-/ready")).send().await.is_ok_and(|a| a.status().is_success()) {
        assert!(Instant::now() < deadline, "the Pushgateway was not ready in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 40));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    // From the config this time: `metrics.push` in the profile.
    gw.config(SECRET, &format!("metrics.push = \"{base}\""));
    let code = gw.run_job(&job, &input, &out, &["--shard", "1/2", "--run-id", "nightly"]).await;
    assert_eq!(code, ExitCode::Success);

    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let s = samples(&text);
    let group = [("job", "bulkcall"), ("job_name", "eligibility"), ("shard", "1/2")];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = group.to_vec();
        labels.push(extra);
        labels
    };
    assert_eq!(value(&s, "bulkcall_rows", &with(("outcome", "succeeded"))), Some(20.0), "{text}");
    assert_eq!(value(&s, "bulkcall_rows_expected", &group), Some(20.0));
    assert_eq!(value(&s, "bulkcall_exit_code", &group), Some(0.0));
    assert_eq!(value(&s, "bulkcall_responses_total", &with(("code", "200"))), Some(20.0));
    let end = value(&s, "bulkcall_run_end_timestamp_seconds", &group).unwrap();
    assert_eq!(value(&s, "bulkcall_last_success_timestamp_seconds", &group), Some(end));
    let pushed: Vec<&Sample> = s.iter().filter(|x| x.name.starts_with("bulkcall_")).collect();
    assert!(
        pushed.iter().all(|x| x.labels.get("job").map(String::as_str) == Some("bulkcall")),
        "every sample in the group"
    );
    let pushed: Vec<Sample> = pushed.into_iter().cloned().collect();
    labels_hold_no_row_values(&pushed, &["job", "instance"]);
}

/// A push to a closed port: one warning, and the exit code the run had.
#[tokio::test]
async fn a_push_that_fails_warns_once_and_keeps_the_exit_code() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 10));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = run_command(&job, &input, &gw.path("run"), &config)
        .args(["--progress", "never", "--metrics-push", &closed])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("Pushgateway")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("WARN") && warnings[0].contains(&closed), "{}", warnings[0]);
}

fn last_success(file: &Path) -> Option<f64> {
    value(&samples(&std::fs::read_to_string(file).unwrap()), "bulkcall_last_success_timestamp_seconds", &[])
}

/// The last success survives a failing run and one its token endpoint
/// stops: it is carried over from the file's previous content, and a later
/// success moves it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_success_is_carried_over_a_failing_run() {
    if !have("promtool", "prometheus") {
        return;
    }
    let good = Gateway::start(sandbox_config()).await;
    let file = good.path("bulkcall.prom");
    let input = good.write("rows.csv", &eligibility_csv(1, 10));
    let good_job = good.write("eligibility.toml", ELIGIBILITY_JOB);
    let flag = ["--metrics-file", file.to_str().unwrap()];
    assert_eq!(good.run_job(&good_job, &input, &good.path("run-1"), &flag).await, ExitCode::Success);
    let first = last_success(&file).expect("a success is recorded");
    let s = samples(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(Some(first), value(&s, "bulkcall_run_end_timestamp_seconds", &[]));

    // The same job against a gateway where every row fails.
    let bad = Gateway::start(faulty(Faults { broken: 1.0, ..Faults::default() })).await;
    bad.config(SECRET, "max_attempts = 1");
    let input = bad.write("rows.csv", &eligibility_csv(1, 10));
    let job = bad.write("eligibility.toml", ELIGIBILITY_JOB);
    assert_eq!(bad.run_job(&job, &input, &bad.path("run-2"), &flag).await, ExitCode::RowsFailed);
    let text = std::fs::read_to_string(&file).unwrap();
    promtool_accepts(&text, "the file after a failing run");
    let s = samples(&text);
    assert_eq!(value(&s, "bulkcall_exit_code", &[]), Some(1.0));
    assert_eq!(value(&s, "bulkcall_rows", &[("outcome", "failed")]), Some(10.0));
    assert_eq!(last_success(&file), Some(first), "carried over the failing run");

    // Credentials rejected: the run stops before the pool (exit 3), and says so.
    bad.config("not-the-secret", "");
    assert_eq!(bad.run_job(&job, &input, &bad.path("run-2b"), &flag).await, ExitCode::Auth);
    let text = std::fs::read_to_string(&file).unwrap();
    promtool_accepts(&text, "the file after a run stopped by its token endpoint");
    assert_eq!(value(&samples(&text), "bulkcall_exit_code", &[]), Some(3.0));
    assert_eq!(last_success(&file), Some(first), "carried over the stopped run");

    let input = good.write("rows-3.csv", &eligibility_csv(100, 5));
    assert_eq!(good.run_job(&good_job, &input, &good.path("run-3"), &flag).await, ExitCode::Success);
    let third = last_success(&file).unwrap();
    assert!(third > first, "a later success moves it on: {first} then {third}");
}

/// deploy/prometheus/alerts.yaml passes promtool, and its rules fire as
/// docs/metrics.md says: no success in 26 hours, a run that stopped (exit > 1).
#[test]
fn the_alert_rules_fire_on_a_stale_success_and_a_stopped_run() {
    if !have("promtool", "prometheus") {
        return;
    }
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yaml");
    let checked = std::process::Command::new("promtool").arg("check").arg("rules").arg(&rules).output().unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
    let dir = tempfile::tempdir().unwrap();
    let test = dir.path().join("alerts.test.yaml");
    std::fs::write(
        &test,
        format!(
            r#"rule_files:
  - {rules}
evaluation_interval: 1h
tests:
  - interval: 1h
    input_series:
      # The last success at 1h, carried over by every later run.
      - series: 'bulkcall_last_success_timestamp_seconds{{job_name="eligibility"}}'
        values: '3600+0x40'
      - series: 'bulkcall_exit_code{{job_name="eligibility"}}'
        values: '0 0 1 1 75'
    alert_rule_test:
      - eval_time: 26h
        alertname: BulkcallNoRecentSuccess
        exp_alerts: []
      - eval_time: 28h
        alertname: BulkcallNoRecentSuccess
        exp_alerts:
          - exp_labels: {{severity: page, job_name: eligibility}}
            exp_annotations: {{summary: "bulkcall eligibility: no successful run in 26 hours"}}
      - eval_time: 3h
        alertname: BulkcallRunStopped
        exp_alerts: []
      - eval_time: 4h
        alertname: BulkcallRunStopped
        exp_alerts:
          - exp_labels: {{severity: ticket, job_name: eligibility}}
            exp_annotations: {{summary: "bulkcall eligibility: the last run exited 75"}}
"#,
            rules = rules.display()
        ),
    )
    .unwrap();
    let tested = std::process::Command::new("promtool").arg("test").arg("rules").arg(&test).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&tested.stdout), String::from_utf8_lossy(&tested.stderr));
    assert!(tested.status.success() && said.contains("SUCCESS"), "{said}");

    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md")).unwrap();
    let alerts = std::fs::read_to_string(&rules).unwrap();
    let expr = "time() - bulkcall_last_success_timestamp_seconds > 26 * 3600";
    assert!(alerts.contains(expr) && readme.contains(expr), "docs/metrics.md shows the rule alerts.yaml holds");
}

/// An address that cannot be bound stops the run before anything is sent
/// or any run directory is made (exit 2), naming the setting.
#[tokio::test]
async fn a_metrics_address_in_use_stops_the_run_before_it_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 5));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &["--metrics-listen", &addr]).await, ExitCode::Usage);
    assert!(!out.exists(), "no run directory");
    assert_eq!(gw.sandbox.stats().api_calls, 0, "nothing sent");
}

/// `resume` writes the metrics file the run named (its flags come back
/// from run.json), and its figures count the earlier session's rows, as its
/// summary.json does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_writes_the_same_file_with_every_session_counted() {
    let gw = std::sync::Arc::new(Gateway::start(sandbox_config()).await);
    let input = gw.write("rows.csv", &eligibility_csv(1, 200));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let (out, file) = (gw.path("run"), gw.path("bulkcall.prom"));
    let stop = CancellationToken::new();
    let run = {
        let (gw, stop) = (gw.clone(), stop.clone());
        let args: Vec<String> = [
            "run",
            job.to_str().unwrap(),
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--rate",
            "50",
            "--metrics-file",
            file.to_str().unwrap(),
        ]
        .map(String::from)
        .into();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            gw.run_until(&args, stop).await
        })
    };
    gw.wait_for_calls(20).await;
    stop.cancel();
    assert_eq!(run.await.unwrap(), ExitCode::Interrupted);
    let first = samples(&std::fs::read_to_string(&file).unwrap());
    let done_first = value(&first, "bulkcall_rows", &[("outcome", "succeeded")]).unwrap();
    assert!(done_first > 0.0 && done_first < 200.0, "stopped part way: {done_first}");
    assert_eq!(value(&first, "bulkcall_exit_code", &[]), Some(130.0));

    let output = bulkcall().args(["resume", out.to_str().unwrap(), "--progress", "never"]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let text = std::fs::read_to_string(&file).unwrap();
    let s = samples(&text);
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["succeeded"], 200);
    assert_eq!(value(&s, "bulkcall_rows", &[("outcome", "succeeded")]), Some(200.0), "{text}");
    assert_eq!(value(&s, "bulkcall_rows_expected", &[]), Some(200.0));
    assert_eq!(value(&s, "bulkcall_attempts_total", &[]), summary["attempts"].as_f64());
    assert_eq!(value(&s, "bulkcall_exit_code", &[]), Some(0.0));
    assert!(value(&s, "bulkcall_last_success_timestamp_seconds", &[]).is_some());
}
