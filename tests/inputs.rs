//! Inputs exactly as given, from wherever they come: numbers keep their
//! digits, pipes and compressed files are read, legacy encodings decoded,
//! row values cannot change the URL's path, and PHI stays off stderr.

mod common;

use bulkcall::error::ExitCode;
use bulkcall::sandbox::RecordedCall;
use common::*;
use serde_json::Value;

/// JSON Lines whose numbers a float would change or cannot hold. (An
/// exponent is sent in one form, `e` and its sign: `1E400` as `1e+400`.)
const AWKWARD: [&str; 3] = [
    r#"{"id":"a1","amount":3923.5950000000003,"price":125.50,"big":12345678901234567890123}"#,
    r#"{"id":"a2","huge":1e+400,"tiny":-0.000000000000000000001,"exp":1.0e-2,"nested":{"list":[0.10,2,-7]}}"#,
    r#"{"id":"a3","zero":0.0,"neg":-0,"many":[1.10,1.100,1.1000]}"#,
];

/// The bodies of calls as the gateway received them, as compact JSON
/// text, by `id`.
fn bodies_by_id(calls: &[RecordedCall]) -> Vec<String> {
    let mut bodies: Vec<(String, String)> = calls
        .iter()
        .map(|call| (call.body["id"].as_str().unwrap().to_string(), serde_json::to_string(&call.body).unwrap()))
        .collect();
    bodies.sort();
    bodies.into_iter().map(|(_, body)| body).collect()
}

#[tokio::test]
async fn json_numbers_reach_the_gateway_and_come_back_through_failures_as_written() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.jsonl", &(AWKWARD.join("\n") + "\n"));
    // The sandbox refuses a body without a controlNumber: every row fails.
    let job =
        gw.write("echo.toml", "url = \"/medicalnetwork/eligibility/v3\"\nkey = \"{{ id }}\"\nbody = \"{{ row }}\"\n");
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, ExitCode::RowsFailed);
    assert_eq!(bodies_by_id(&gw.sandbox.recorded()), AWKWARD, "sent with the input's digits");

    // Fed back as it is, the failures file sends the same bytes again.
    let failures = out.join("failures.jsonl");
    let text = std::fs::read_to_string(&failures).unwrap();
    assert_eq!(text.lines().count(), AWKWARD.len());
    for line in text.lines() {
        let original = AWKWARD.iter().any(|o| line.starts_with(&format!("{},\"_row\":", o.strip_suffix('}').unwrap())));
        assert!(original, "the record's fields as they were, then the failure's: {line}");
    }
    let again = gw.path("again");
    assert_eq!(gw.run_job(&job, &failures, &again, &[]).await, ExitCode::RowsFailed);
    assert_eq!(bodies_by_id(&gw.sandbox.recorded()[AWKWARD.len()..]), AWKWARD);
    let fed_back: Vec<Value> = jsonl(&again.join("failures.jsonl"));
    assert_eq!(fed_back.len(), 3);
}

#[tokio::test]
async fn a_row_value_cannot_change_the_path_the_call_goes_to() {
    let gw = Gateway::start(sandbox_config()).await;
    let ids = ["..", ".", "", "%2e%2e", ".%2E", "a/b", "a\\b", "x?y#z", "Zoë 1", "ok-1._~"];
    let mut text = String::from("id\n");
    for id in ids {
        text.push_str(&format!("\"{id}\"\n"));
    }
    let input = gw.write("ids.csv", &text);
    let job = gw.write("members.toml", "method = \"GET\"\nurl = \"/members/{{ id }}/claims\"\n");
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, ExitCode::RowsFailed);

    let mut paths: Vec<String> = gw.sandbox.recorded().into_iter().map(|call| call.path).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/members/Zo%C3%AB%201/claims",
            "/members/a%2Fb/claims",
            "/members/a%5Cb/claims",
            "/members/ok-1._~/claims",
            "/members/x%3Fy%23z/claims",
        ],
        "values stay within their segment, encoded"
    );
    let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    let invalid: Vec<&str> = failures.lines().filter(|l| l.contains("invalid_row")).collect();
    assert_eq!(invalid.len(), 5, "`..`, `.`, `%2e%2e` and an empty value fail their rows unsent: {failures}");
}

const ECHO_JOB: &str = "url = \"/medicalnetwork/eligibility/v3\"\nkey = \"{{ id }}\"\nbody = \"{{ row }}\"\n";

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn compressed_inputs_send_the_same_rows_as_the_plain_file() {
    let gw = Gateway::start(sandbox_config()).await;
    let jsonl = AWKWARD.join("\n") + "\n";
    let csv = "id,name\nc1,Zoë\nc2,\"a, b\"\n";
    let job = gw.write("echo.toml", ECHO_JOB);
    let inputs = [
        ("rows.jsonl.gz", gzip(jsonl.as_bytes())),
        ("rows.jsonl.zst", zstd::encode_all(jsonl.as_bytes(), 3).unwrap()),
        ("rows.csv.gz", gzip(csv.as_bytes())),
        ("rows.json.zst", zstd::encode_all(format!("[{}]", AWKWARD.join(",")).as_bytes(), 3).unwrap()),
    ];
    for (name, bytes) in &inputs {
        let before = gw.sandbox.recorded().len();
        let path = gw.path(name);
        std::fs::write(&path, bytes).unwrap();
        let out = gw.path(&format!("run-{name}"));
        assert_eq!(gw.run_job(&job, &path, &out, &[]).await, ExitCode::RowsFailed, "{name}");
        let sent = bodies_by_id(&gw.sandbox.recorded()[before..]);
        if name.starts_with("rows.csv") {
            assert_eq!(sent, [r#"{"id":"c1","name":"Zoë"}"#, r#"{"id":"c2","name":"a, b"}"#], "{name}");
        } else {
            assert_eq!(sent, AWKWARD, "{name}");
        }
        // resume fingerprints the compressed file: unchanged, it is accepted.
        let info = json(&out.join("run.json"));
        assert_eq!(info["inputs"][0]["size"], bytes.len() as u64, "{name}");
    }
}

#[tokio::test]
async fn a_pipe_is_read_once_and_kept_in_the_run_directory() {
    use std::os::unix::fs::PermissionsExt;
    let gw = Gateway::start(sandbox_config()).await;
    let fifo = gw.path("rows.pipe");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let text = AWKWARD.join("\n") + "\n";
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::write(&fifo, text).unwrap())
    };
    let job = gw.write("echo.toml", ECHO_JOB);
    let out = gw.path("run");
    let code = gw.run_job(&job, &fifo, &out, &["--format", "jsonl"]).await;
    writer.join().unwrap();
    assert_eq!(code, ExitCode::RowsFailed, "every row read and sent (and refused by the sandbox)");
    assert_eq!(bodies_by_id(&gw.sandbox.recorded()), AWKWARD);
    let kept = out.join("input-1.jsonl");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), AWKWARD.join("\n") + "\n");
    assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(json(&out.join("run.json"))["inputs"][0]["path"], kept.to_str().unwrap());
    // resume reads the kept copy: its fingerprint matches, and the run is found finished.
    assert_eq!(gw.run(&["resume", out.to_str().unwrap()]).await, ExitCode::RowsFailed);
    assert_eq!(gw.sandbox.recorded().len(), AWKWARD.len(), "nothing sent again");
}

#[tokio::test]
async fn a_pipe_without_a_format_is_refused_before_anything_is_sent() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("echo.toml", ECHO_JOB);
    let code = gw.run_job(&job, std::path::Path::new("/dev/null"), &gw.path("run"), &[]).await;
    assert_eq!(code, ExitCode::Usage);
    assert!(gw.sandbox.recorded().is_empty());
    let code = gw.run_job(&job, std::path::Path::new("/dev/null"), &gw.path("run2"), &["--format", "jsonl"]).await;
    assert_eq!(code, ExitCode::Usage, "an empty stream is an input error, not a run of 0 rows");
}

#[tokio::test]
async fn standard_input_is_an_input() {
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let job = gw.write("echo.toml", ECHO_JOB);
    let out = gw.path("run");
    let mut child = bulkcall()
        .args(["run", job.to_str().unwrap(), "-", "--format", "jsonl", "-o", out.to_str().unwrap()])
        .args(["-c", config.to_str().unwrap(), "-p", "test", "--progress", "never"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all((AWKWARD.join("\n") + "\n").as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(bodies_by_id(&gw.sandbox.recorded()), AWKWARD);
    assert!(out.join("input-1.jsonl").exists());
}

#[tokio::test]
async fn dev_stdin_redirected_from_a_file_is_kept_as_a_stream_is() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let job = gw.write("echo.toml", ECHO_JOB);
    let rows = gw.write("rows", &(AWKWARD.join("\n") + "\n"));
    let out = gw.path("run");
    for (input, out) in [("/dev/stdin", out.clone()), ("/proc/self/fd/0", gw.path("run2"))] {
        let output = bulkcall()
            .args(["run", job.to_str().unwrap(), input, "--format", "jsonl", "-o", out.to_str().unwrap()])
            .args(["-c", config.to_str().unwrap(), "-p", "test", "--progress", "never"])
            .stdin(std::fs::File::open(&rows).unwrap())
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
        assert!(out.join("input-1.jsonl").exists(), "{input} is kept in the run directory");
        let recorded = json(&out.join("run.json"))["inputs"][0]["path"].as_str().unwrap().to_string();
        assert!(recorded.ends_with("input-1.jsonl"), "resume reads the kept copy, not {recorded}");
    }
}

#[tokio::test]
async fn a_windows_1252_csv_is_decoded_when_the_job_says_so() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.path("excel.csv");
    std::fs::write(&input, b"id;name\r\nw1;Zo\xEB Caf\xE9 \x80\r\n").unwrap();
    let out = gw.path("plain");
    let job = gw.write("plain.toml", &format!("delimiter = \";\"\n{ECHO_JOB}"));
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, ExitCode::RowsFailed);
    assert!(gw.sandbox.recorded().is_empty(), "not UTF-8, not sent");
    let failures = std::fs::read(out.join("failures.csv")).unwrap();
    let failures = String::from_utf8_lossy(&failures);
    assert!(failures.contains("invalid_row") && failures.contains("encoding = "), "{failures}");
    assert!(failures.starts_with("id;name;_row;_key;_error"), "written with the input's delimiter: {failures}");

    let job = gw.write("1252.toml", &format!("delimiter = \";\"\nencoding = \"windows-1252\"\n{ECHO_JOB}"));
    let out = gw.path("decoded");
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, ExitCode::RowsFailed);
    assert_eq!(bodies_by_id(&gw.sandbox.recorded()), [r#"{"id":"w1","name":"Zoë Café €"}"#]);
}

#[tokio::test]
async fn failures_of_a_tab_separated_input_are_a_tsv_that_feeds_back() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.path("excel.tsv");
    std::fs::write(&input, b"id\tname\r\nw1\tZo\xEB Caf\xE9 \x80\r\n").unwrap();
    let out = gw.path("plain");
    let job = gw.write("plain.toml", ECHO_JOB);
    assert_eq!(gw.run_job(&job, &input, &out, &[]).await, ExitCode::RowsFailed);
    let failures = out.join("failures.tsv");
    assert!(String::from_utf8_lossy(&std::fs::read(&failures).unwrap()).starts_with("id\tname\t_row\t_key"));

    let job = gw.write("1252.toml", &format!("encoding = \"windows-1252\"\n{ECHO_JOB}"));
    assert_eq!(
        gw.run_job(&job, &failures, &gw.path("again"), &[]).await,
        ExitCode::RowsFailed,
        "sent, and judged by the gateway"
    );
    assert_eq!(bodies_by_id(&gw.sandbox.recorded()), [r#"{"id":"w1","name":"Zoë Café €"}"#]);
}

/// Runs the real binary, so its stderr can be read.
async fn run_binary(gw: &Gateway, args: &[&str]) -> (Option<i32>, String, String) {
    let config = gw.path("bulkcall.toml");
    let output = bulkcall()
        .args(args)
        .args(["-c", config.to_str().unwrap(), "-p", "test"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

#[tokio::test]
async fn stderr_names_failed_rows_without_their_values_or_the_answers() {
    let gw = Gateway::start(sandbox_config()).await;
    gw.config(SECRET, "auth.params.resource = \"tenant-7f3a-resource\"");
    let input = gw.write("rows.jsonl", "{\"id\":\"k1\",\"member\":\"PHI-Jane-Doe-1980\"}\n{\"id\":\"k2\"}\n");
    let job = gw.write("echo.toml", ECHO_JOB);
    let out = gw.path("run");
    let (code, _, stderr) =
        run_binary(&gw, &["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("client_error, status 400"), "row, key, kind and status are shown: {stderr}");
    assert!(!stderr.contains("PHI-Jane-Doe"), "no row value on stderr: {stderr}");
    assert!(!stderr.contains("controlNumber must be"), "no server answer on stderr: {stderr}");
    let failures = std::fs::read_to_string(out.join("failures.jsonl")).unwrap();
    assert!(
        failures.contains("PHI-Jane-Doe") && failures.contains("controlNumber must be"),
        "they are in the run directory"
    );
    let run_json = std::fs::read_to_string(out.join("run.json")).unwrap();
    assert!(!run_json.contains("tenant-7f3a-resource"), "auth.params are redacted in run.json: {run_json}");

    let (_, _, stderr) = run_binary(
        &gw,
        &["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", gw.path("v").to_str().unwrap(), "-v"],
    )
    .await;
    assert!(stderr.contains("controlNumber must be") && stderr.contains("-v:"), "-v shows more, and says so: {stderr}");

    // validate and a dry run: the row, not its values.
    let bad = gw.write("bad.toml", "url = \"/x/{{ member }}\"\nbody = \"{{ member | int }}\"\n");
    let (code, _, stderr) = run_binary(&gw, &["validate", bad.to_str().unwrap(), input.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("(row 1)") && !stderr.contains("PHI-Jane-Doe"), "{stderr}");
    let dry = gw.path("dry");
    let (code, stdout, stderr) = run_binary(
        &gw,
        &["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", dry.to_str().unwrap(), "--dry-run"],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("row 1 (key k1): POST") && !stdout.contains("PHI-Jane-Doe"), "{stdout}");
    assert!(std::fs::read_to_string(dry.join("requests.jsonl")).unwrap().contains("PHI-Jane-Doe"));
}
