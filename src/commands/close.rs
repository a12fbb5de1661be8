//! The closing lines of a run, and the commands they suggest.

use std::path::Path;
use std::time::SystemTime;

use serde_json::Value;

use crate::cli::*;
use crate::error::ExitCode;
use crate::outcome::ErrorKind;
use crate::runner::Finished;

use super::resolve::RunOptions;

/// Shows the first requests of a dry run: row, key and method; whole (URL,
/// headers, body: row values) only with -v.
pub(super) fn print_dry_run(dir: &Path, verbose: bool) {
    let path = dir.join("requests.jsonl");
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines().take(3) {
            if verbose {
                println!("{line}");
            } else if let Ok(request) = serde_json::from_str::<Value>(line) {
                let text = |field: &str| request[field].as_str().unwrap_or_default().to_string();
                println!("row {} (key {}): {}", request["row"], text("key"), text("method"));
            }
        }
        if verbose {
            eprintln!("(-v: the requests above show row values)");
        } else {
            eprintln!("  whole requests (URL, headers, body) in {}, readable by its owner only", path.display());
        }
    }
}

/// How to run the job again with the same configuration (for the hint
/// that sends the failures again).
pub(super) fn rerun_command(job: &Path, profile: Option<&str>, config: Option<&Path>) -> String {
    let mut command = format!("{} run {}", crate::options::program(), job.display());
    if let Some(config) = config {
        command.push_str(&format!(" -c {}", config.display()));
    }
    if let Some(profile) = profile {
        command.push_str(&format!(" -p {profile}"));
    }
    command
}

pub(super) fn plural(n: u64, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// Prints the closing lines and returns the exit code. `-q` keeps only the
/// first line; `--log-format json` prints one JSON object instead.
pub(super) fn close(finished: &Finished, dir: &Path, options: &RunOptions, idempotent: bool) -> ExitCode {
    let s = &finished.summary;
    if options.log.log_format == LogFormat::Json {
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "level": if finished.exit == ExitCode::Success { "INFO" } else { "WARN" },
            "message": "finished",
            "run_dir": dir,
            "summary": s,
        });
        eprintln!("{line}");
    } else if options.dry_run {
        eprintln!(
            "bulkcall: dry run: {} rendered into {} (nothing sent); {} cannot be sent",
            plural(finished.rendered, "request"),
            dir.join("requests.jsonl").display(),
            plural(s.failed, "row"),
        );
    } else {
        let how = match finished.exit {
            ExitCode::Interrupted | ExitCode::Locked => "stopped after",
            ExitCode::Auth | ExitCode::MaxFailures | ExitCode::Io | ExitCode::Usage | ExitCode::Internal => {
                "aborted after"
            }
            _ => "finished",
        };
        let errors: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let errors = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join(", ")) };
        eprintln!(
            "bulkcall: {how} {} in {:.1}s ({:.1} rows/s): {} succeeded, {} failed{errors}",
            plural(s.total, "row"),
            s.duration_s,
            s.rows_per_s,
            s.succeeded,
            s.failed,
        );
    }
    if !options.log.quiet && options.log.log_format == LogFormat::Text {
        if !options.dry_run {
            let throttled = s.throttled_rate.map(|r| format!("; throttled down to {r}/s")).unwrap_or_default();
            eprintln!(
                "  latency p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; {}, {}, {}{throttled}",
                s.latency_ms.p50,
                s.latency_ms.p90,
                s.latency_ms.p99,
                s.latency_ms.max,
                plural(s.attempts, "attempt"),
                plural(s.retries, "retry").replace("retrys", "retries"),
                plural(s.token_requests, "token request"),
            );
        }
        if !finished.first_failures.is_empty() {
            // Messages may quote server answers and row values: PHI stays in
            // the run directory unless -v asks for it here.
            let verbose = options.log.verbose > 0;
            eprintln!("  first failures:");
            for (brief, message) in &finished.first_failures {
                if verbose {
                    eprintln!("    {brief}: {message}");
                } else {
                    eprintln!("    {brief}");
                }
            }
            if verbose {
                eprintln!("  (-v: the messages above may quote server answers and row values)");
            } else {
                eprintln!("  why, with server answers and row values: the failures file, readable by its owner only");
            }
        }
        eprintln!("  run directory: {}", dir.display());
        if finished.failure_files.len() > 1 {
            for (input, file) in &finished.failure_files {
                eprintln!("  failures of {}: {}", input.display(), file.display());
            }
        }
        let files: Vec<String> = finished.failure_files.iter().map(|(_, f)| f.display().to_string()).collect();
        if !files.is_empty() {
            eprintln!("  send the failures again: {} {}", options.rerun, files.join(" "));
            let acted = s.errors.iter().filter(|(k, _)| ErrorKind::parse(k).is_some_and(ErrorKind::may_have_acted));
            let acted: Vec<String> = acted.map(|(k, n)| format!("{k} {n}")).collect();
            if !idempotent && !acted.is_empty() {
                eprintln!(
                    "    it leaves out the rows the gateway may have acted on ({}): the job is not idempotent; \
                     check them on the gateway, then add --in-doubt resend to send them too",
                    acted.join(", ")
                );
            }
        }
        if s.left_out > 0 {
            let rows = if s.left_out == 1 { "1 row".to_string() } else { format!("{} rows", s.left_out) };
            eprintln!(
                "  {rows} of the failures fed back left out, not sent: they had failed where the gateway may have \
                 acted on them (each one's _message says how); check on the gateway, then: {} --in-doubt resend {}",
                options.rerun,
                files.join(" ")
            );
        }
        if s.in_doubt > 0 {
            let rows = if s.in_doubt == 1 { "1 row was".to_string() } else { format!("{} rows were", s.in_doubt) };
            eprintln!("  {rows} sent without a recorded answer (in doubt)");
        }
        if matches!(
            finished.exit,
            ExitCode::Interrupted
                | ExitCode::Locked
                | ExitCode::MaxFailures
                | ExitCode::Auth
                | ExitCode::Io
                | ExitCode::Internal
        ) && !options.dry_run
        {
            if options.resumable {
                eprintln!(
                    "  rows not yet sent are in neither file; send them with: {} resume {}",
                    crate::options::program(),
                    dir.display()
                );
            } else {
                eprintln!("  the demo's sandbox is gone with it: run `{} demo` again", crate::options::program());
            }
        }
    }
    if options.json {
        println!("{}", serde_json::to_string_pretty(s).expect("serializable"));
    }
    finished.exit
}
