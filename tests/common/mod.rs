//! Shared by the integration tests: an in-process sandbox, a fresh folder
//! per test, and the real command line run in-process.

#![allow(dead_code)]

pub mod pace;
pub mod redis;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bulkcall::cli::Cli;
use bulkcall::error::ExitCode;
use bulkcall::sandbox::{RecordedCall, Sandbox, SandboxConfig};
use clap::Parser;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const CLIENT_ID: &str = "test-client";
pub const SECRET: &str = "s3cr3t-Do-Not-Leak-7f1e";

/// Whether this is CI (`CI=true`), where a test never skips: what it
/// needs must be there.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The running test cannot run here, for `why`: under CI that fails it;
/// elsewhere it says so on stderr even when the test's output is captured
/// (one `SKIPPED` line each: `cargo test 2>&1 | grep -c '^SKIPPED'` counts
/// them), and the caller returns.
pub fn skip(why: &str) {
    // libtest names each test's thread after the test.
    let thread = std::thread::current();
    let name = format!("{}::{}", env!("CARGO_CRATE_NAME"), thread.name().unwrap_or("?"));
    assert!(!in_ci(), "{name} cannot be skipped under CI=true: {why}");
    use std::io::Write as _;
    // Straight to the process's stderr: libtest captures only `eprintln!`.
    let _ = writeln!(std::io::stderr(), "SKIPPED {name}: {why}");
}

/// A sandbox gateway and a folder for one test's files.
pub struct Gateway {
    pub sandbox: Sandbox,
    pub dir: tempfile::TempDir,
}

/// Sandbox settings for tests: recording on, the test credentials.
pub fn sandbox_config() -> SandboxConfig {
    SandboxConfig {
        client_id: CLIENT_ID.into(),
        client_secret: SECRET.to_string().into(),
        record: true,
        ..SandboxConfig::default()
    }
}

impl Gateway {
    pub async fn start(config: SandboxConfig) -> Gateway {
        let sandbox = Sandbox::start(config, "127.0.0.1:0".parse().unwrap()).await.expect("sandbox starts");
        Gateway { sandbox, dir: tempfile::tempdir().unwrap() }
    }

    /// Waits until the gateway has received at least `n` calls. Panics after
    /// two minutes instead of hanging the suite when the run it waits for
    /// ended (or died) before sending that many.
    pub async fn wait_for_calls(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        while self.sandbox.stats().api_calls < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway received {} calls in two minutes, expected at least {n}",
                self.sandbox.stats().api_calls
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    /// A config file with a `test` profile pointing at the sandbox, with a
    /// token cache of its own.
    /// `extra` lines go into that profile.
    pub fn config(&self, secret: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[default]
rate = 0
concurrency = 16
out_dir = "{out_dir}"

[test]
base_url = "{base}"
auth.token_url = "{token}"
auth.client_id = "{CLIENT_ID}"
auth.client_secret = "{secret}"
auth.cache_dir = "{cache}"
headers.environment = "sandbox"
{extra}
"#,
            base = self.sandbox.base_url(),
            token = self.sandbox.token_url(),
            cache = self.path("token-cache").display(),
            out_dir = self.path("out").display(),
        );
        self.write("bulkcall.toml", &text)
    }

    /// Runs `bulkcall <args>` in-process with `-c <config> -p test`.
    pub async fn run(&self, args: &[&str]) -> ExitCode {
        self.run_until(args, CancellationToken::new()).await
    }

    /// Runs `bulkcall run JOB INPUT -o OUT <extra>` in-process.
    pub async fn run_job(&self, job: &Path, input: &Path, out: &Path, extra: &[&str]) -> ExitCode {
        let mut args = vec!["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run(&args).await
    }

    pub async fn run_until(&self, args: &[&str], stop: CancellationToken) -> ExitCode {
        let config = self.path("bulkcall.toml");
        let mut argv: Vec<String> = vec!["bulkcall".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        if matches!(args[0], "run" | "validate" | "token") {
            if !config.exists() {
                self.config(SECRET, "");
            }
            argv.extend(["-c".into(), config.display().to_string(), "-p".into(), "test".into()]);
        }
        if args[0] == "run" {
            argv.extend(["--progress".into(), "never".into()]);
        }
        let cli = Cli::try_parse_from(&argv).expect("valid arguments");
        match bulkcall::commands::execute(cli, stop).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                e.exit_code()
            }
        }
    }

    /// Waits until the gateway has answered every call it received (calls
    /// whose sender was killed are answered all the same), and returns how
    /// many that is. Panics after a minute instead of hanging the suite.
    pub async fn settled(&self) -> usize {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let received = self.sandbox.stats().api_calls;
            let recorded = self.sandbox.recorded().len();
            if recorded as u64 == received {
                return recorded;
            }
            assert!(tokio::time::Instant::now() < deadline, "{recorded} of {received} calls answered in a minute");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// The bodies the gateway received, by `controlNumber`.
    pub fn received_by_control_number(&self) -> HashMap<String, Vec<RecordedCall>> {
        let mut map: HashMap<String, Vec<RecordedCall>> = HashMap::new();
        for call in self.sandbox.recorded() {
            let key = call.body["controlNumber"].as_str().unwrap_or("").to_string();
            map.entry(key).or_default().push(call);
        }
        map
    }
}

/// The lines of a JSON Lines file.
pub fn jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("whole JSON line in {path:?}: {e}: {l}")))
        .collect()
}

pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The rows the journal in the run directory `dir` marks started and not
/// done, as (input, row): after a stop, the rows in doubt and those whose
/// outcome was written just before it without its done mark. A line cut
/// short by a kill is not a mark.
pub fn started_not_done(dir: &Path) -> std::collections::HashSet<(usize, u64)> {
    let journal = std::fs::read_to_string(dir.join("journal")).unwrap_or_default();
    let mut open = std::collections::HashSet::new();
    for line in journal.lines() {
        let mut fields = line.split('\t');
        let (Some(kind), Some(input), Some(row)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let (Ok(input), Ok(row)) = (input.parse::<usize>(), row.parse::<u64>()) else { continue };
        match kind {
            "S" => open.insert((input, row)),
            "D" => open.remove(&(input, row)),
            _ => false,
        };
    }
    open
}

/// The most rows a stop may leave in doubt at `-j concurrency`, README's
/// bound ("What a crash or power cut can lose"): the calls in flight, and
/// for an idempotent job twice the recorder channel's places (eight per
/// worker, at least 64: the outcomes waiting in it and the group the
/// recorder holds).
pub fn in_doubt_at_most(concurrency: usize, idempotent: bool) -> usize {
    if idempotent { concurrency + 2 * (8 * concurrency).max(64) } else { concurrency }
}

/// The records of a CSV file, each as its fields by column name.
pub fn csv_records(path: &Path) -> Vec<HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let headers = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|r| headers.iter().zip(r.unwrap().iter()).map(|(h, v)| (h.to_string(), v.to_string())).collect())
        .collect()
}

/// The control number of row `row` (1-based) of [`eligibility_csv`] from 1:
/// its key in the job specs here.
pub fn key_of_row(row: u64) -> String {
    format!("{row:09}")
}

/// A CSV of `n` eligibility rows with 9-digit control numbers from `first`.
pub fn eligibility_csv(first: u64, n: u64) -> String {
    let mut text = String::from("control_number,payer_id,provider_name,npi,member_id,first_name,last_name,dob\n");
    for i in first..first + n {
        text.push_str(&format!("{i:09},000050,\"Clinic {i}, LLC\",0123456789,M{i},Pat,Doe{i},19800102\n"));
    }
    text
}

/// `bulkcall run JOB INPUT -o OUT -c CONFIG -p test` as a child process
/// ([`bulkcall`]); more flags with `.args`.
pub fn run_command(job: &Path, input: &Path, out: &Path, config: &Path) -> tokio::process::Command {
    let mut command = bulkcall();
    command.args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()]).args([
        "-c",
        config.to_str().unwrap(),
        "-p",
        "test",
    ]);
    command
}

/// The real `bulkcall` binary as a child process: no log filter or array
/// index from the test's own environment, stdout dropped, stderr kept,
/// killed if the test drops it.
pub fn bulkcall() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkcall"));
    command
        .env_remove("RUST_LOG")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("AWS_BATCH_JOB_ARRAY_INDEX")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A query: `idempotent = true`, so timeouts and 5xx are retried and rows
/// in doubt are sent again on resume.
pub const ELIGIBILITY_JOB: &str = r#"
url = "/medicalnetwork/eligibility/v3"
key = "{{ control_number }}"
idempotent = true
[headers]
x-request-id = "req-{{ control_number }}"
[body]
controlNumber = "{{ control_number }}"
tradingPartnerServiceId = "{{ payer_id }}"
provider = { organizationName = "{{ provider_name }}", npi = "{{ npi }}" }
subscriber = { memberId = "{{ member_id }}", firstName = "{{ first_name }}", lastName = "{{ last_name }}", dateOfBirth = "{{ dob }}" }
"#;

/// A claim submission: a POST without `idempotency_key`, so not idempotent.
/// Takes the rows of [`eligibility_csv`].
pub const CLAIMS_JOB: &str = r#"
url = "/medicalnetwork/professionalclaims/v3/submission"
key = "{{ control_number }}"
[body]
controlNumber = "{{ control_number }}"
tradingPartnerServiceId = "{{ payer_id }}"
subscriber = { memberId = "{{ member_id }}", firstName = "{{ first_name }}", lastName = "{{ last_name }}", dateOfBirth = "{{ dob }}" }
claimInformation = { patientControlNumber = "PCN{{ control_number }}", claimChargeAmount = "100.00" }
"#;

/// [`CLAIMS_JOB`] with an `Idempotency-Key` per row: idempotent.
pub fn claims_job_with_key() -> String {
    CLAIMS_JOB.replacen("key = ", "idempotency_key = \"claim-{{ control_number }}\"\nkey = ", 1)
}

/// The `kind` of each line of a run directory's `events.jsonl`, in order.
pub fn event_kinds(dir: &Path) -> Vec<String> {
    jsonl(&dir.join("events.jsonl")).iter().map(|e| e["kind"].as_str().unwrap_or("?").to_string()).collect()
}

/// A claim job on the sandbox's asynchronous endpoint (`[poll]`): rows
/// with `control_number` and `charge` (0 is rejected by the payer), polled
/// every `every` until the answer is not 202, for at most `max_wait`.
pub fn async_claims_job(every: &str, max_wait: &str) -> String {
    format!(
        r#"
url = "{path}"
key = "{{{{ control_number }}}}"
[body]
controlNumber = "{{{{ control_number }}}}"
tradingPartnerServiceId = "9496"
claimInformation = {{ patientControlNumber = "PCN{{{{ control_number }}}}", claimChargeAmount = "{{{{ charge }}}}" }}
[capture]
correlation_id = "{{{{ response.claimReference.correlationId }}}}"
[poll]
every = "{every}"
max_wait = "{max_wait}"
success = "{{{{ status == 200 and response.claimStatus == 'ACCEPTED' }}}}"
[poll.capture]
claim_status = "{{{{ response.claimStatus }}}}"
"#,
        path = bulkcall::sandbox::ASYNC_SUBMISSION_PATH
    )
}
