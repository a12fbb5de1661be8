//! Where bulkcall meets the outside: redirects, files read back on resume,
//! errors that could quote row values, the run directory's mode.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header::LOCATION};
use bulkcall::error::ExitCode;
use common::*;
use serde_json::Value;

/// A server on a port of its own that counts every request it gets and
/// answers 200: where a redirect points.
async fn elsewhere() -> (String, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    let app = Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            "<html>login</html>"
        }
    });
    (format!("http://{}", serve(app).await), hits)
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A gateway whose API answers every call with `status` and a Location on
/// another origin, and counts the calls.
async fn redirecting(status: StatusCode, to: String) -> (String, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let app = Router::new().fallback(move || {
        let (counted, to) = (counted.clone(), to.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut headers = HeaderMap::new();
            headers.insert(LOCATION, format!("{to}/login?next=claims").parse().unwrap());
            (status, headers, "moved")
        }
    });
    (format!("http://{}", serve(app).await), calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_an_answer_never_followed() {
    for status in [301u16, 302, 303, 307, 308] {
        let gw = Gateway::start(sandbox_config()).await;
        let (target, hits) = elsewhere().await;
        let (api, calls) = redirecting(StatusCode::from_u16(status).unwrap(), target.clone()).await;
        // The token from the sandbox, the calls to the redirecting gateway,
        // with a header that must not travel.
        let config = gw.config(SECRET, "headers.x-api-key = \"k-3f9a\"");
        let job = gw.write("claims.toml", &CLAIMS_JOB.replace("url = \"", &format!("url = \"{api}")));
        let input = gw.write("rows.csv", &eligibility_csv(100_000_001, 5));
        let out = gw.path("run");
        let output = run_command(&job, &input, &out, &config).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{status}: the rows failed, the run finished: {stderr}");
        assert_eq!(calls.load(Ordering::SeqCst), 5, "{status}: each row sent once, not retried");
        assert_eq!(hits.load(Ordering::SeqCst), 0, "{status}: nothing reached the redirect's target");

        let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap();
        let mut reader = csv::Reader::from_reader(failures.as_bytes());
        let headers = reader.headers().unwrap().clone();
        let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
        let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(records.len(), 5, "{status}: every row in failures");
        for record in &records {
            assert_eq!(&record[column("_error")], "client_error", "{status}");
            assert_eq!(&record[column("_status")], status.to_string());
            let message = &record[column("_message")];
            assert!(
                message.contains(&format!("{target}/login?next=claims")),
                "{status}: names the Location: {message}"
            );
            assert!(message.contains("not followed"), "{status}: {message}");
        }
        assert!(!out.join("results.jsonl").exists() || jsonl(&out.join("results.jsonl")).is_empty());
        // The advice is where the redirect points, not a resend that meets it again.
        assert!(
            stderr.contains("5 rows answered with a redirect (3xx), not followed: see where it points"),
            "{stderr}"
        );
        assert!(stderr.contains("change base_url or the job's url"), "{stderr}");
        assert!(!stderr.contains("fix the rows that failed"), "{stderr}");
    }
}

/// The on-disk state a `kill -9` leaves in a run directory that finished:
/// no summary, the ledger holding started marks for the rows up to
/// `started` and done marks up to `done`, and each outcome file cut after
/// its records of rows up to `started` (whole records: each is one write).
fn as_if_killed(out: &std::path::Path, started: u64, done: u64) {
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let journal = std::fs::read_to_string(out.join("journal")).unwrap();
    let kept: String = journal
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let row: u64 = f[2].parse().unwrap();
            (f[0] == "S" && row <= started) || (f[0] == "D" && row <= done)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(out.join("journal"), kept).unwrap();
    // Failures CSV: keep the header and the records of rows up to `started`.
    let path = out.join("failures.csv");
    let text = std::fs::read(&path).unwrap();
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(&text[..]);
    let row = reader.headers().unwrap().iter().position(|h| h == "_row").unwrap();
    let (mut record, mut cut) = (csv::StringRecord::new(), reader.position().byte());
    while reader.read_record(&mut record).unwrap() {
        if record[row].parse::<u64>().unwrap() > started {
            break;
        }
        cut = reader.position().byte();
    }
    std::fs::write(&path, &text[..cut as usize]).unwrap();
}

/// A job that sends each input record whole as its body.
const ECHO_JOB: &str = r#"
url = "/medicalnetwork/professionalclaims/v3/submission"
key = "{{ controlNumber }}"
body = "{{ row }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_reads_a_failures_csv_record_by_record() {
    let faults = bulkcall::sandbox::Faults { bad_requests: 1.0, ..Default::default() };
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig { faults, ..sandbox_config() }).await;
    // Row 3's note holds lines that look like the end of failure records:
    // one naming row 12 (not sent when the run stopped), one a row number
    // no memory could hold.
    let mut csv = String::from("controlNumber,note\n");
    for id in 1..=20 {
        let note = match id {
            3 => "first line\n9,9,12,k12,client_error,400,1,fake\n9,9,2305843009213693951,k,client_error,400,1,x\nlast"
                .to_string(),
            _ => format!("note {id}"),
        };
        csv.push_str(&format!("{id:09},\"{note}\"\n"));
    }
    let input = gw.write("rows.csv", &csv);
    let job = gw.write("claims.toml", ECHO_JOB);
    let config = gw.config(SECRET, "");
    let out = gw.path("run");
    let output = run_command(&job, &input, &out, &config).args(["-j", "1"]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    // Killed after row 5's outcome was written and row 2's marked done.
    as_if_killed(&out, 5, 2);
    let before = gw.sandbox.recorded().len();

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let sent: Vec<String> =
        gw.sandbox.recorded()[before..].iter().map(|c| c.body["controlNumber"].as_str().unwrap().to_string()).collect();
    let expected: Vec<String> = (6..=20).map(|i| format!("{i:09}")).collect();
    assert_eq!(sent, expected, "resume sends exactly the rows never sent, row 12 among them");

    let mut reader = csv::Reader::from_path(out.join("failures.csv")).unwrap();
    let ids: Vec<String> = reader.records().map(|r| r.unwrap()[0].to_string()).collect();
    assert_eq!(ids, (1..=20).map(|i| format!("{i:09}")).collect::<Vec<_>>(), "every row once in failures");
    assert_eq!(json(&out.join("summary.json"))["total"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_cut_however_long() {
    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 10));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    assert_eq!(gw.run_job(&job, &input, &out, &["-j", "1"]).await, bulkcall::error::ExitCode::Success);
    // Killed after row 5's outcome, in the middle of writing row 6's long
    // answer: 1.9 MB without its newline.
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let mut kept: String = results.lines().take(5).map(|l| format!("{l}\n")).collect();
    kept.push_str(&format!(r#"{{"row":6,"key":"000000006","status":200,"response":"{}"#, "x".repeat(1_900_000)));
    std::fs::write(out.join("results.jsonl"), kept).unwrap();
    let journal = std::fs::read_to_string(out.join("journal")).unwrap();
    let marks: String = journal
        .lines()
        .filter(|l| l.split('\t').nth(2).unwrap().parse::<u64>().unwrap() <= 5 || *l == "S\t0\t6")
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(out.join("journal"), marks).unwrap();

    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let lines = jsonl(&out.join("results.jsonl"));
    let rows: Vec<u64> = lines.iter().map(|l| l["row"].as_u64().unwrap()).collect();
    assert_eq!(rows, (1..=10).collect::<Vec<_>>(), "every line whole, every row once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failures_file_keeps_every_input_field_and_feeds_back_the_original_rows() {
    let failing = bulkcall::sandbox::Faults { bad_requests: 1.0, ..Default::default() };
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig { faults: failing, ..sandbox_config() }).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let config = gw.config(SECRET, "");
    // Fields with the names of bulkcall's columns, and a ragged row with
    // two fields more than the header.
    let csv = "controlNumber,_status,_message,note\n\
               000000001,open,\"see, you\",a\n\
               000000002,closed,,b\n\
               000000003,x,y,z,extra 1,extra 2\n";
    let records = [
        r#"{"controlNumber":"000000004","_status":"open","_error":null,"amount":125.50}"#,
        r#"{"controlNumber":"000000005","_record":{"x":1}}"#,
        r#"{"controlNumber":"000000006","_raw":"not mine","plain":true}"#,
        r#"{"controlNumber":"000000007","plain":false}"#,
    ];
    let inputs = [gw.write("rows.csv", csv), gw.write("rows.jsonl", &(records.join("\n") + "\n"))];
    let runs = [gw.path("csv-run"), gw.path("jsonl-run")];
    for (input, out) in inputs.iter().zip(&runs) {
        let output = run_command(&job, input, out, &config).args(["-j", "1"]).output().await.unwrap();
        assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let failures_csv = std::fs::read_to_string(runs[0].join("failures.csv")).unwrap();
    let lines: Vec<&str> = failures_csv.lines().collect();
    assert_eq!(lines[0], "controlNumber,_status,_message,note,_row,_key,_error,_status,_attempts,_message");
    assert!(lines[1].starts_with("000000001,open,\"see, you\",a,1,000000001,client_error,400,1,"), "{}", lines[1]);
    // The ragged row whole, in the header's columns: its extra fields
    // joined into the last one, so the record lines up with the header.
    let ragged = "000000003,x,y,\"z,extra 1,extra 2\",3,3,invalid_row,,0,";
    assert!(lines[3].starts_with(ragged), "the ragged row whole: {}", lines[3]);
    let mut reader = csv::Reader::from_reader(failures_csv.as_bytes());
    assert!(reader.records().all(|r| r.is_ok_and(|r| r.len() == 10)), "every record as wide as the header");

    // Fed back to a gateway that takes them: the very rows of the inputs.
    let gw2 = Gateway::start(sandbox_config()).await;
    let config2 = gw2.config(SECRET, "");
    let again = [gw2.path("csv-again"), gw2.path("jsonl-again")];
    let fed = [runs[0].join("failures.csv"), runs[1].join("failures.jsonl")];
    let expected = [1, 0];
    for ((input, out), failed) in fed.iter().zip(&again).zip(expected) {
        let output = run_command(&job, input, out, &config2).args(["-j", "1"]).output().await.unwrap();
        let code = if failed > 0 { 1 } else { 0 };
        assert_eq!(output.status.code(), Some(code), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let bodies: Vec<String> = gw2.sandbox.recorded().iter().map(|c| c.body.to_string()).collect();
    let mut expected = vec![
        r#"{"controlNumber":"000000001","_status":"open","_message":"see, you","note":"a"}"#.to_string(),
        r#"{"controlNumber":"000000002","_status":"closed","_message":"","note":"b"}"#.to_string(),
    ];
    expected.extend(records.iter().map(|r| r.to_string()));
    assert_eq!(bodies, expected, "each row as it stood in its input, the ragged one not sent");
    let ragged = std::fs::read_to_string(again[0].join("failures.csv")).unwrap();
    assert!(ragged.lines().nth(1).unwrap().starts_with("000000003,x,y,\"z,extra 1,extra 2\","), "{ragged}");
    assert!(ragged.contains("has 6 fields but the header has 4 (the extra fields joined into the last column)"));
}

/// A job whose URL carries row values in its path and query.
const MEMBER_JOB: &str = r#"
method = "GET"
url = "BASE/members/{{ member_id }}/eligibility"
key = "{{ control_number }}"
[query]
dob = "{{ dob }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_errors_name_the_server_never_the_path() {
    let gw = Gateway::start(sandbox_config()).await;
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let tls = bulkcall::sandbox::Sandbox::start_tls(
        sandbox_config(),
        "127.0.0.1:0".parse().unwrap(),
        cert.cert.pem().as_bytes(),
        cert.key_pair.serialize_pem().as_bytes(),
    )
    .await
    .unwrap();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // The circuit breaker off: each row's own failure is recorded.
    let config = gw.config(SECRET, "max_attempts = 2\nbackoff_base = \"1ms\"\noutage_after = \"0s\"");
    let mut csv = String::from("control_number,member_id,dob\n");
    csv.push_str("000000001,SYN-PHI-MEMBER-42,19800102\n000000002,SYN-PHI-MEMBER-43,19800103\n");
    let input = gw.write("rows.csv", &csv);
    for (base, code) in [(tls.base_url(), 3), (format!("http://{closed}"), 1)] {
        let job = gw.write("members.toml", &MEMBER_JOB.replace("BASE", &base));
        for verbose in [false, true] {
            let out = gw.path(&format!("run-{code}-{verbose}"));
            let mut command = run_command(&job, &input, &out, &config);
            if verbose {
                command.arg("-v");
            }
            let output = command.output().await.unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(code), "{stderr}");
            let origin = base.trim_end_matches('/');
            for phi in ["SYN-PHI-MEMBER", "1980010"] {
                assert!(!stderr.contains(phi), "{base} -v={verbose}: no row value on stderr: {stderr}");
                let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap_or_default();
                let messages: Vec<&str> = failures.lines().skip(1).map(|l| l.rsplit(',').next().unwrap()).collect();
                assert!(messages.iter().all(|m| !m.contains(phi)), "{base}: no row value in the message: {messages:?}");
            }
            assert!(stderr.contains(origin) || code == 1, "{base}: names the server: {stderr}");
        }
    }
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_directory_is_the_owners_alone_and_nothing_lands_in_the_current_folder() {
    use std::os::unix::fs::PermissionsExt;
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 3));
    // An existing world-readable folder given with -o, from a current
    // folder that must stay empty.
    let out = gw.path("existing");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cwd = gw.path("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let output = run_command(&job, &input, &out, &config).current_dir(&cwd).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(mode(&out), 0o700, "made the owner's alone");
    assert_eq!(std::fs::read_dir(&cwd).unwrap().count(), 0, "nothing written to the current folder");
    for name in ["results.jsonl", "journal", "run.json", "summary.json", "events.jsonl"] {
        assert_eq!(mode(&out.join(name)), 0o600, "{name}");
    }

    // The default run directory: out/<job>/<time>/, every folder made 0700.
    let output = bulkcall()
        .args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "test"])
        .current_dir(&cwd)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let folder = gw.path("out").join("eligibility");
    let run =
        std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir() && !p.is_symlink()).unwrap();
    for dir in [gw.path("out"), folder.clone(), run] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }

    // A folder of another user is refused before anything is sent.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = gw.path("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let calls = gw.sandbox.stats().api_calls;
        let output = run_command(&job, &input, &theirs, &config).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("belongs to another user"), "{stderr}");
        assert_eq!(gw.sandbox.stats().api_calls, calls, "nothing sent");
    }
}

/// Sends `job` over `inputs` (more than one file: `run JOB A B`), returning
/// the exit code and stderr.
async fn run_over(
    job: &std::path::Path,
    inputs: &[std::path::PathBuf],
    out: &std::path::Path,
    config: &std::path::Path,
    extra: &[&str],
) -> (Option<i32>, String) {
    let mut command = run_command(job, &inputs[0], out, config);
    command.args(&inputs[1..]).args(["-j", "1", "--max-attempts", "1"]).args(extra);
    let output = command.output().await.unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_the_gateway_may_have_processed_is_not_sent_again_unless_told() {
    // Claims the gateway answered 500: it may have processed them.
    let broken = bulkcall::sandbox::Faults { broken: 1.0, ..Default::default() };
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig { faults: broken, ..sandbox_config() }).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let answered = gw.write("answered.jsonl", "{\"controlNumber\":\"000000001\"}\n{\"controlNumber\":\"000000002\"}\n");
    let (code, stderr) = run_over(&job, &[answered], &gw.path("broken"), &gw.config(SECRET, ""), &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    // Claims that never left: the gateway's port is closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let unreached =
        gw.write("unreached.jsonl", "{\"controlNumber\":\"000000003\"}\n{\"controlNumber\":\"000000004\"}\n");
    let nowhere = gw.write("nowhere.toml", &ECHO_JOB.replace("url = \"", &format!("url = \"http://{closed}")));
    // The circuit breaker off: a claim that never left is a failure of its own.
    let off = gw.config(SECRET, "outage_after = \"0s\"");
    let (code, stderr) = run_over(&nowhere, &[unreached], &gw.path("closed"), &off, &[]).await;
    assert_eq!(code, Some(1), "{stderr}");

    // Both failures files fed back, as the closing lines print it.
    let gw2 = Gateway::start(sandbox_config()).await;
    let config2 = gw2.config(SECRET, "");
    let fed = [gw.path("broken").join("failures.jsonl"), gw.path("closed").join("failures.jsonl")];
    let (code, stderr) = run_over(&job, &fed, &gw2.path("again"), &config2, &[]).await;
    assert_eq!(code, Some(1), "the claims left out are failures still: {stderr}");
    let sent: Vec<String> = gw2.sandbox.recorded().iter().map(|c| c.body["controlNumber"].to_string()).collect();
    assert_eq!(
        sent,
        ["\"000000003\"", "\"000000004\""],
        "only the claims that never reached the gateway are sent again"
    );
    let summary = json(&gw2.path("again").join("summary.json"));
    assert_eq!(summary["left_out"], 2, "{summary}");
    assert!(stderr.contains("2 rows of the failures fed back left out"), "says what was left out: {stderr}");
    assert!(stderr.contains("--in-doubt resend"), "and how to send them: {stderr}");
    let left: Vec<Value> = jsonl(&gw2.path("again").join("failures.jsonl"));
    assert_eq!(left.len(), 2);
    for line in &left {
        assert_eq!(line["_error"], "server_error", "{line}");
        assert_eq!(line["_attempts"], 0, "{line}");
        assert!(line["_message"].as_str().unwrap().starts_with("left out: it failed as server_error before"), "{line}");
    }

    // Told: the claims left out go, and only they.
    let (code, stderr) = run_over(
        &job,
        &[gw2.path("again").join("failures.jsonl")],
        &gw2.path("told"),
        &config2,
        &["--in-doubt", "resend"],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let sent: Vec<String> = gw2.sandbox.recorded().iter().map(|c| c.body["controlNumber"].to_string()).collect();
    assert_eq!(sent, ["\"000000003\"", "\"000000004\"", "\"000000001\"", "\"000000002\""]);

    // An idempotent job sends them again unasked: the gateway keeps one copy.
    let keyed =
        gw.write("keyed.toml", &ECHO_JOB.replace("key = ", "idempotency_key = \"c-{{ controlNumber }}\"\nkey = "));
    let gw3 = Gateway::start(sandbox_config()).await;
    let (code, stderr) = run_over(&keyed, &fed[..1], &gw3.path("keyed"), &gw3.config(SECRET, ""), &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(gw3.sandbox.recorded().len(), 2);
}

/// An API of its own, without authentication, that records the key of each
/// call (`controlNumber`) and its answer: 200, or 502 (a proxy whose
/// upstream is down) while `down`. It goes down by itself after `up_for`
/// calls.
#[derive(Clone, Default)]
struct Api {
    down: Arc<std::sync::atomic::AtomicBool>,
    up_for: Arc<AtomicU64>,
    calls: Arc<std::sync::Mutex<Vec<(String, u16)>>>,
}

impl Api {
    async fn serve(&self, listener: tokio::net::TcpListener) {
        let api = self.clone();
        let app = Router::new().fallback(move |body: axum::body::Bytes| {
            let api = api.clone();
            async move {
                let row: Value = serde_json::from_slice(&body).unwrap();
                let mut calls = api.calls.lock().unwrap();
                if calls.len() as u64 >= api.up_for.load(Ordering::SeqCst) {
                    api.down.store(true, Ordering::SeqCst);
                }
                let status = if api.down.load(Ordering::SeqCst) { StatusCode::BAD_GATEWAY } else { StatusCode::OK };
                calls.push((row["controlNumber"].as_str().unwrap().to_string(), status.as_u16()));
                (status, "{}")
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }

    /// How many 200s each key got.
    fn successes(&self) -> std::collections::BTreeMap<String, u64> {
        let mut by_key = std::collections::BTreeMap::new();
        for (key, status) in self.calls.lock().unwrap().iter() {
            *by_key.entry(key.clone()).or_default() += u64::from(*status == 200);
        }
        by_key
    }
}

fn claims(n: u64) -> String {
    (1..=n).map(|i| format!("{{\"controlNumber\":\"{i:09}\",\"member\":\"SYN-PHI-{i}\"}}\n")).collect()
}

/// Failure records in a run directory's failures file (none if it is absent).
fn failure_count(dir: &std::path::Path) -> usize {
    std::fs::read_to_string(dir.join("failures.jsonl")).map_or(0, |f| f.lines().count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_unreachable_from_the_start_is_try_again_later_and_resume_sends_every_row() {
    let gw = Gateway::start(sandbox_config()).await;
    // A port nothing listens on, until the API comes back there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let job = gw.write("claims.toml", &ECHO_JOB.replace("url = \"", &format!("url = \"http://{addr}")));
    let input = gw.write("claims.jsonl", &claims(20));
    let config = gw.config(SECRET, "outage_after = \"1s\"\nbackoff_base = \"1ms\"\nbackoff_max = \"20ms\"");
    let out = gw.path("run");
    let output = run_command(&job, &input, &out, &config).args(["-j", "4"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "an outage is try again later, not rows failed: {stderr}");
    assert!(stderr.contains(&format!("the gateway at http://{addr} has not answered")), "{stderr}");
    assert!(stderr.contains(&format!("resume {}", out.display())), "says what to run next: {stderr}");
    assert!(!stderr.contains("SYN-PHI"), "no row value on stderr: {stderr}");
    assert_eq!(failure_count(&out), 0, "no row is recorded as failed because of the outage");
    assert_eq!(json(&out.join("summary.json"))["exit_code"], 75);

    // The API is back: resume sends every row, each once (none was sent before).
    let api = Api { up_for: Arc::new(AtomicU64::new(u64::MAX)), ..Api::default() };
    api.serve(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let successes = api.successes();
    assert_eq!(successes.len(), 20, "{successes:?}");
    assert!(successes.values().all(|&n| n == 1), "each row once: {successes:?}");
    assert_eq!(api.calls.lock().unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_goes_down_during_the_run_stops_it_and_resume_finishes_it() {
    let gw = Gateway::start(sandbox_config()).await;
    let api = Api { up_for: Arc::new(AtomicU64::new(10)), ..Api::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    api.serve(listener).await;
    // An idempotent job: a 502 may have reached the upstream, so only such a
    // job's rows are sent again by resume (a claim's would be in doubt).
    let job = ECHO_JOB
        .replace("url = \"", &format!("url = \"http://{addr}"))
        .replace("key = ", "idempotency_key = \"c-{{ controlNumber }}\"\nkey = ");
    let job = gw.write("keyed.toml", &job);
    let input = gw.write("claims.jsonl", &claims(40));
    let config = gw.config(SECRET, "outage_after = \"1s\"\nbackoff_base = \"1ms\"\nbackoff_max = \"20ms\"");
    let out = gw.path("run");
    let output = run_command(&job, &input, &out, &config).args(["-j", "2"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("HTTP 502"), "says what the calls got: {stderr}");
    assert_eq!(failure_count(&out), 0, "rows the outage stopped are not failures: {stderr}");
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["succeeded"].as_u64(), summary["failed"].as_u64()), (Some(10), Some(0)), "{summary}");
    assert_eq!(event_kinds(&out), ["start", "breaker_open", "abort", "end"], "the breaker's opening is told");
    let events = jsonl(&out.join("events.jsonl"));
    assert!(events[1]["calls"].as_u64().unwrap() >= 2 && events[1]["lasted_ms"].as_u64().unwrap() >= 1000);
    assert_eq!((events[2]["reason"].as_str(), events[3]["exit"].as_u64()), (Some("outage"), Some(75)));

    // Back up: resume sends the other 30, and only them.
    api.down.store(false, Ordering::SeqCst);
    api.up_for.store(u64::MAX, Ordering::SeqCst);
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let successes = api.successes();
    assert_eq!(successes.len(), 40);
    assert!(successes.values().all(|&n| n == 1), "each row succeeded once: {successes:?}");
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 40);
    let events = jsonl(&out.join("events.jsonl"));
    assert_eq!(event_kinds(&out)[4..], ["start", "end"], "the resume appends its own: {events:?}");
    assert_eq!((&events[4]["resume"], &events[5]["exit"]), (&Value::Bool(true), &Value::from(0)));
}

#[tokio::test]
async fn validate_counts_every_bad_row_and_shows_the_first_fifty() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    // 130 rows without the key's field, and 20 good ones.
    let mut rows: String = (1..=130).map(|i| format!("{{\"other\":{i}}}\n")).collect();
    rows.extend((1..=20).map(|i| format!("{{\"controlNumber\":\"{i:09}\"}}\n")));
    let input = gw.write("rows.jsonl", &rows);
    let config = gw.config(SECRET, "");
    let output = bulkcall()
        .args([
            "validate",
            job.to_str().unwrap(),
            input.to_str().unwrap(),
            "-c",
            config.to_str().unwrap(),
            "-p",
            "test",
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let named: Vec<&str> = stderr.lines().filter(|l| l.contains("rows.jsonl line")).collect();
    assert_eq!(named.len(), 50, "{stderr}");
    assert!(named[0].contains("line 1 (row 1)") && named[49].contains("line 50 (row 50)"), "{stderr}");
    assert!(stderr.contains("... and 80 more"), "{stderr}");
    assert!(stderr.contains("150 rows read: 20 ready to send, 130 cannot be sent"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_split_another_way_never_share_a_run_folder() {
    let gw = Gateway::start(sandbox_config()).await;
    gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 12));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let run = gw.path("run");
    let shard = |k: &'static str, extra: &'static [&'static str]| {
        let mut args = vec!["--shard", k, "--run-id", "nightly"];
        args.extend(extra);
        args
    };
    assert_eq!(gw.run_job(&job, &input, &run, &shard("0/2", &[])).await, ExitCode::Success);
    assert_eq!(gw.sandbox.stats().api_calls, 6);
    // No Redis: the run folder's own record refuses another split, before any call.
    for (k, extra) in [("1/3", &[][..]), ("1/2", &["--limit", "4"][..]), ("0/3", &["--limit", "12"][..])] {
        let code = gw.run_job(&job, &input, &run, &shard(k, extra)).await;
        assert_eq!(code, ExitCode::Usage, "shard {k} {extra:?} is refused");
    }
    assert_eq!(gw.sandbox.stats().api_calls, 6, "nothing sent by the refused shards");
    assert!(!run.join("shard-1-of-3").exists() && !run.join("shard-0-of-3").exists());
    // The other half of the same split goes.
    assert_eq!(gw.run_job(&job, &input, &run, &shard("1/2", &[])).await, ExitCode::Success);
    let by_key = gw.received_by_control_number();
    assert_eq!(by_key.len(), 12);
    assert!(by_key.values().all(|calls| calls.len() == 1), "each row once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_are_held_to_the_open_files_limit_raised_to_its_hard_one() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("claims.toml", ECHO_JOB);
    let input = gw.write("rows.jsonl", "{\"controlNumber\":\"000000001\"}\n");
    let config = gw.config(SECRET, "");
    let run = |limits: &str, out: &std::path::Path| {
        let script = format!(
            "{limits}; exec {} run {} {} -o {} -c {} -p test -j 500",
            env!("CARGO_BIN_EXE_bulkcall"),
            job.display(),
            input.display(),
            out.display(),
            config.display()
        );
        std::process::Command::new("bash").args(["-c", &script]).output().unwrap()
    };
    // A hard limit of 150 open files: 500 calls in flight cannot fit.
    let refused = gw.path("refused");
    let output = run("ulimit -Sn 100 && ulimit -Hn 150", &refused);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("-j 500 needs about 564 open files, and this process may open 150"), "{stderr}");
    assert!(!refused.exists(), "refused before the run directory");
    // A soft limit of 100 under a higher hard one: raised, and the run goes.
    let output = run("ulimit -Sn 100", &gw.path("raised"));
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}
