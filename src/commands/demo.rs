//! `bulkcall demo`: the example job against an in-process sandbox.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::cli::*;
use crate::config::{Credentials, Sources};
use crate::error::{Error, ExitCode};
use crate::job::Job;
use crate::output::RunFlags;
use crate::sandbox::{Sandbox, SandboxConfig};

use super::launch::run_resolved;
use super::resolve::RunOptions;
use super::resolve::resolve_inputs;

/// The example job, built in, so `bulkcall demo` works from anywhere.
pub(super) const DEMO_JOB: &str = include_str!("../../jobs/eligibility.toml");
pub(super) const DEMO_INPUT: &[u8] = include_bytes!("../../jobs/eligibility.csv");
/// `--async`: claims answered 202 and polled until final (`[poll]`).
const ASYNC_JOB: &str = include_str!("../../jobs/claims-async.toml");
const ASYNC_INPUT: &[u8] = include_bytes!("../../jobs/claims.jsonl");

pub(super) async fn demo(args: DemoArgs, log: LogArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let secret = "demo-secret";
    let sandbox_config = SandboxConfig {
        client_id: "demo-client".into(),
        client_secret: SecretString::from(secret),
        latency: Duration::from_millis(40),
        async_polls: 2,
        async_retry_after: Duration::from_secs(1),
        ..SandboxConfig::default()
    };
    let (job_text, input, job_name, input_name, demo_name, what) = match args.r#async {
        false => (DEMO_JOB, DEMO_INPUT, "eligibility.toml", "eligibility.csv", "demo", "the example's synthetic rows"),
        true => (
            ASYNC_JOB,
            ASYNC_INPUT,
            "claims-async.toml",
            "claims.jsonl",
            "demo-async",
            "synthetic claims, each answered 202 and polled until final,",
        ),
    };
    let addr = "127.0.0.1:0";
    let sandbox = Sandbox::start(sandbox_config, addr.parse().expect("valid address"))
        .await
        .map_err(|source| Error::Sandbox { addr: addr.into(), source })?;
    let folder = args.out_dir.join("demo");
    std::fs::create_dir_all(&folder).map_err(|e| Error::Usage(format!("cannot create {}: {e}", folder.display())))?;
    let job_path = folder.join(job_name);
    for (path, bytes) in [(&job_path, job_text.as_bytes()), (&folder.join(input_name), input)] {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| Error::Usage(format!("cannot write {}: {e}", path.display())))?;
    }
    let mut job = Job::parse(&job_path, job_text)?;
    // Demo runs go to out/demo/ (out/demo-async/), apart from real runs.
    job.name = demo_name.into();
    let mut flags = Map::new();
    flags.insert("base_url".into(), Value::from(sandbox.base_url()));
    flags.insert("concurrency".into(), Value::from(16));
    flags.insert("rate".into(), Value::from(250));
    flags.insert("burst".into(), Value::from(16));
    flags.insert("out_dir".into(), Value::from(args.out_dir.display().to_string()));
    flags.insert("headers".into(), serde_json::json!({"environment": "sandbox"}));
    flags.insert("auth".into(), serde_json::json!({"style": "json", "token_url": sandbox.token_url(), "cache": false}));
    let loaded = Sources { job: job.settings.clone(), flags, no_config: true, ..Sources::default() }.load()?;
    let resolved = resolve_inputs(job, loaded, &[], None, &[])?;
    eprintln!(
        "bulkcall demo: sandbox at {}; sending {what} from {} (16 workers, 250 calls/s)",
        sandbox.base_url(),
        resolved.inputs[0].path.display()
    );
    let credentials = Credentials::secret("demo-client".into(), SecretString::from(secret));
    let options = RunOptions {
        log: log.clone(),
        out: None,
        limit: None,
        dry_run: false,
        max_failures: None,
        grace: RunningArgs::DEFAULT_GRACE,
        flags: RunFlags::default(),
        progress: args.progress,
        json: args.json,
        rerun: format!("{} run {}", crate::options::program(), job_path.display()),
        resumable: false,
        sharding: None,
        in_doubt: None,
    };
    let exit = run_resolved(resolved, Some(credentials), options, None, stop).await;
    sandbox.shutdown().await;
    if exit.is_ok() && !log.quiet {
        let program = crate::options::program();
        eprintln!(
            "next: `{program} sandbox` in one terminal, then `{program} run jobs/{job_name} -p local` in another"
        );
    }
    exit
}
