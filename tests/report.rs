//! What an operator reads: the log under cron, `--json`, `success` and
//! captures, `results.csv`, and `report.html`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use bulkcall::error::ExitCode;
use bulkcall::sandbox::SandboxConfig;
use common::*;

const CAPTURE_JOB: &str = r#"
url = "/medicalnetwork/eligibility/v3"
key = "{{ control_number }}"
results_csv = true
success = "{{ status == 200 and response.subscriber.lastName != 'Reject' }}"
[body]
controlNumber = "{{ control_number }}"
subscriber = { memberId = "{{ member_id }}", lastName = "{{ last_name }}" }
[capture]
plan = "{{ response.planStatus[0].status }}"
echoed = "{{ response.controlNumber }}"
nothing = "{{ response.not.there }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_captures_results_csv_and_the_report() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("capture.toml", CAPTURE_JOB);
    let mut csv = eligibility_csv(1, 5);
    csv.push_str("000000006,000050,C,0123456789,M6,Pat,Reject,19800102\n");
    csv.push_str("12,000050,C,0123456789,M7,Pat,<b>Bold</b>,19800102\n");
    let input = gw.write("rows.csv", &csv);
    let out = gw.path("run");
    let code = gw.run_job(&job, &input, &out, &[]).await;
    assert_eq!(code, ExitCode::RowsFailed);

    let results = jsonl(&out.join("results.jsonl"));
    assert_eq!(results.len(), 5);
    let first = &results.iter().find(|r| r["row"] == 1).unwrap()["capture"];
    assert_eq!(first["plan"], "Active Coverage");
    assert_eq!(first["echoed"], "000000001");
    assert!(first.get("nothing").is_none(), "a missing response field is left out, not an error");

    let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    let mut reader = csv::Reader::from_reader(failures.as_bytes());
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let rejected = rows.iter().find(|r| &r[0] == "000000006").unwrap();
    assert_eq!(&rejected[10], "rejected", "a 200 the success expression refuses");
    assert_eq!(gw.received_by_control_number()["000000006"].len(), 1, "a rejected row is not retried");

    let table = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("row,key,status,attempts,latency_ms,plan,echoed,nothing"));
    assert!(lines.any(|l| l.starts_with("1,000000001,200,1,") && l.ends_with(",Active Coverage,000000001,")));

    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for expected in ["<svg", "Succeeded", "rejected", "client_error", "000000006", "Throughput", "Latency"] {
        assert!(html.contains(expected), "report.html shows {expected}");
    }
    assert!(!html.contains("<b>Bold</b>"), "row data is escaped");
    assert!(html.contains("<h2>Failures by kind</h2>"), "failures grouped by kind");
    assert!(
        html.contains(&format!(r#"<a href="failures.csv">failures.csv</a>: {} records"#, rows.len())),
        "a link to the failures file with its count"
    );
    let settings = &html[html.find("<h2>Settings</h2>").expect("a settings section")..];
    for expected in ["Concurrency", "Profile", "Input", env!("CARGO_PKG_VERSION")] {
        assert!(settings.contains(expected), "the settings section shows {expected}");
    }
    for external in ["src=\"http", "href=\"http", "@import", "url("] {
        assert!(!html.contains(external), "report.html loads nothing from the network ({external})");
    }

    // `bulkcall report` rebuilds it from the run directory.
    std::fs::remove_file(out.join("report.html")).unwrap();
    let code = gw.run(&["report", out.to_str().unwrap()]).await;
    assert_eq!(code, ExitCode::Success);
    assert_eq!(std::fs::read_to_string(out.join("report.html")).unwrap(), html);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_the_log_is_plain_lines_at_an_interval() {
    let gw =
        Gateway::start(SandboxConfig { latency: Duration::from_millis(20), record: false, ..sandbox_config() }).await;
    let config = gw.config(SECRET, "progress_interval = \"500ms\"");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 300));
    let out = gw.path("run");
    let output = bulkcall()
        .args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["-c", config.to_str().unwrap(), "-p", "test", "--rate", "150", "--json"])
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let log = String::from_utf8(output.stderr).unwrap();
    assert!(!log.contains('\r') && !log.contains('\x1b'), "no carriage returns or escapes: {log:?}");
    let progress = log.lines().filter(|l| l.contains("progress:")).count();
    assert!(progress >= 2, "a progress line every interval: {log}");
    assert!(log.lines().any(|l| l.starts_with("bulkcall: finished 300 rows")), "{log}");

    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("--json prints summary.json");
    assert_eq!(summary["total"], 300);
    assert_eq!(summary, json(&out.join("summary.json")));
}
