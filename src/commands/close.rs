//! The closing lines of a run, and the commands they suggest.

use std::path::Path;
use std::time::SystemTime;

use serde_json::Value;

use crate::cli::*;
use crate::error::ExitCode;
use crate::options::{MaxFailures, shell_word};
use crate::outcome::ErrorKind;
use crate::output::RunFlags;
use crate::runner::Finished;

use super::resolve::RunOptions;

/// Shows the first requests of a dry run: row, key and method; whole (URL,
/// headers, body: row values) only with -v.
/// Under `--json` they go to stderr: stdout holds the summary alone.
pub(super) fn print_dry_run(dir: &Path, verbose: bool, json: bool) {
    let path = dir.join("requests.jsonl");
    let show = |line: &str| if json { eprintln!("{line}") } else { println!("{line}") };
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines().take(3) {
            if verbose {
                show(line);
            } else if let Ok(request) = serde_json::from_str::<Value>(line) {
                let text = |field: &str| request[field].as_str().unwrap_or_default().to_string();
                show(&format!("row {} (key {}): {}", request["row"], text("key"), text("method")));
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
    let mut command = format!("{} run {}", crate::options::program(), shell_word(job.display()));
    if let Some(config) = config {
        command.push_str(&format!(" -c {}", shell_word(config.display())));
    }
    if let Some(profile) = profile {
        command.push_str(&format!(" -p {}", shell_word(profile)));
    }
    command
}

/// Paths as words of a printed command, each quoted if a shell would split it.
fn words(paths: &[String]) -> String {
    paths.iter().map(shell_word).collect::<Vec<_>>().join(" ")
}

pub(super) fn plural(n: u64, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// The run's own flags as a command line carries them (` -j 4 --timeout 5s`),
/// so a printed command runs the way this run did.
pub(super) fn flags_text(flags: &RunFlags) -> String {
    let mut text = String::new();
    let names = [("concurrency", "-j"), ("rate", "-r"), ("burst", "--burst"), ("max_attempts", "--max-attempts")];
    for (setting, flag) in names.into_iter().chain([("timeout", "--timeout")]) {
        match flags.settings.get(setting) {
            Some(Value::String(v)) => text.push_str(&format!(" {flag} {}", v.replace(' ', ""))),
            // A rate is kept as a float: `-r 300`, as it was typed, not `-r 300.0`.
            Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < 1e15) => {
                text.push_str(&format!(" {flag} {}", n.as_f64().unwrap_or_default() as i64))
            }
            Some(v) => text.push_str(&format!(" {flag} {v}")),
            None => {}
        }
    }
    if let Some(max) = &flags.max_failures {
        text.push_str(&format!(" --max-failures {max}"));
    }
    if let Some(grace) = &flags.grace {
        text.push_str(&format!(" --grace {}", grace.replace(' ', "")));
    }
    text
}

/// A cap that lets a resumed run go on: the resumed run counts this run's
/// failures too, so a count is raised past them.
fn raised(cap: MaxFailures, failed: u64) -> MaxFailures {
    match cap {
        MaxFailures::Count(n) => MaxFailures::Count((2 * n).max(failed + n)),
        MaxFailures::Percent(p) => MaxFailures::Percent((2.0 * p).min(100.0)),
    }
}

/// The failed rows the gateway may have acted on (`in_doubt`, `server_error`,
/// a timeout or a lost connection), by kind: `in_doubt 4, server_error 1`.
fn acted_on(s: &crate::report::Summary) -> (u64, String) {
    let acted: Vec<(&String, &u64)> =
        s.errors.iter().filter(|(k, _)| ErrorKind::parse(k).is_some_and(ErrorKind::may_have_acted)).collect();
    let text: Vec<String> = acted.iter().map(|(k, n)| format!("{k} {n}")).collect();
    (acted.iter().map(|(_, n)| **n).sum(), text.join(", "))
}

/// Whether every failed row is one the gateway may have acted on, in a job
/// that is not idempotent: fed back as it is, the failures file would send
/// nothing (such rows are left out), so the command to send them again
/// needs `--in-doubt resend`, once the operator has checked them.
fn all_may_have_acted(s: &crate::report::Summary, idempotent: bool) -> bool {
    !idempotent && s.failed > 0 && acted_on(s).0 == s.failed
}

/// The one command to run next, if there is one.
fn next_command(
    finished: &Finished,
    dir: &Path,
    options: &RunOptions,
    files: &[String],
    idempotent: bool,
) -> Option<String> {
    let program = crate::options::program();
    let resume = format!("{program} resume {}", shell_word(dir.display()));
    match finished.exit {
        _ if options.dry_run => None,
        ExitCode::Success | ExitCode::Usage => None,
        ExitCode::RowsFailed if files.is_empty() => None,
        ExitCode::RowsFailed => {
            let resend = if all_may_have_acted(&finished.summary, idempotent) { " --in-doubt resend" } else { "" };
            Some(format!("{}{}{resend} {}", options.rerun, flags_text(&options.flags), words(files)))
        }
        _ if !options.resumable => Some(format!("{program} demo")),
        ExitCode::MaxFailures => {
            let cap = options.max_failures.unwrap_or(MaxFailures::Count(finished.summary.failed.max(1)));
            Some(format!("{resume} --max-failures {}", raised(cap, finished.summary.failed)))
        }
        ExitCode::Interrupted | ExitCode::Locked | ExitCode::Auth | ExitCode::Io | ExitCode::Internal => Some(resume),
    }
}

/// Prints the closing lines and returns the exit code. `-q` prints one line
/// with everything a cron log needs; `--log-format json` one JSON object.
pub(super) fn close(finished: &Finished, dir: &Path, options: &RunOptions, job: &str, idempotent: bool) -> ExitCode {
    let s = &finished.summary;
    let files: Vec<String> = finished.failure_files.iter().map(|(_, f)| f.display().to_string()).collect();
    let report = dir.join("report.html");
    let report = report.exists().then_some(report);
    let next = next_command(finished, dir, options, &files, idempotent);
    // Rows to check on the gateway before the next command sends them again.
    let check_first = (finished.exit == ExitCode::RowsFailed && !files.is_empty() && all_may_have_acted(s, idempotent))
        .then(|| {
            format!(
                "{} the gateway may have acted on ({}): check each there and remove from the failures file those it \
                 processed before the next command sends them again",
                plural(s.failed, "row"),
                acted_on(s).1
            )
        });
    let now = SystemTime::now();
    let how = match finished.exit {
        _ if options.dry_run => "dry run of",
        ExitCode::Interrupted | ExitCode::Locked => "stopped after",
        ExitCode::Auth | ExitCode::MaxFailures | ExitCode::Io | ExitCode::Usage | ExitCode::Internal => "aborted after",
        _ => "finished",
    };
    if options.log.log_format == LogFormat::Json {
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(now).to_string(),
            "level": if finished.exit == ExitCode::Success { "INFO" } else { "WARN" },
            "message": how.split(' ').next().unwrap_or(how),
            "job": job,
            "exit_code": finished.exit.code(),
            "run_dir": dir,
            "failures": files,
            "report": report,
            "next": next,
            "check_first": check_first,
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
        let errors: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let errors = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join(", ")) };
        let mut line = format!(
            "bulkcall: {how} {} in {:.1}s ({:.1} rows/s): {} succeeded, {} failed{errors}",
            plural(s.total, "row"),
            s.duration_s,
            s.rows_per_s,
            s.succeeded,
            s.failed,
        );
        if s.pending > 0 {
            line.push_str(&format!(", {} pending (accepted by the gateway, not final)", s.pending));
        }
        if options.log.quiet {
            // One line for a cron log: when, which job, where, what next.
            line = format!("{} {job}: {}", humantime::format_rfc3339_seconds(now), &line["bulkcall: ".len()..]);
            line = format!("bulkcall: {line}; exit {}", finished.exit.code());
            if s.in_doubt > 0 {
                line.push_str(&format!("; {} in doubt", s.in_doubt));
            }
            line.push_str(&format!("; run directory {}", dir.display()));
            if !files.is_empty() {
                line.push_str(&format!("; failures {}", files.join(" ")));
            }
            if let Some(report) = &report {
                line.push_str(&format!("; report {}", report.display()));
            }
            if let Some(check) = &check_first {
                line.push_str(&format!("; {check}"));
            }
            if let Some(next) = &next {
                line.push_str(&format!("; next: {next}"));
            }
        }
        eprintln!("{line}");
    }
    if !options.log.quiet && options.log.log_format == LogFormat::Text {
        closing_lines(finished, dir, options, idempotent, &files, next.as_deref(), check_first.is_some());
    }
    if options.json {
        println!("{}", serde_json::to_string_pretty(s).expect("serializable"));
    }
    finished.exit
}

/// The lines after the first: figures, the first failures, where things
/// are and the command to run next.
fn closing_lines(
    finished: &Finished,
    dir: &Path,
    options: &RunOptions,
    idempotent: bool,
    files: &[String],
    next: Option<&str>,
    check_first: bool,
) {
    let s = &finished.summary;
    if !options.dry_run {
        let mut throttled = s.throttled_rate.map(|r| format!("; throttled down to {r}/s")).unwrap_or_default();
        if s.polls > 0 {
            throttled.push_str(&format!("; {}", plural(s.polls, "poll")));
        }
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
    if s.budget_stopped > 0 {
        eprintln!(
            "  {} not retried because the retry budget was spent (too many calls failing at once; \
             retry_budget in the config sets it)",
            plural(s.budget_stopped, "row")
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
    let rerun = format!("{}{}", options.rerun, flags_text(&options.flags));
    if let (true, Some(next)) = (check_first, next) {
        // Fed back as it is the file would send nothing: every row in it
        // would be left out again. Say so, and what sends them once checked.
        let (_, acted) = acted_on(s);
        let left_out = if s.left_out > 0 {
            format!("; {} of the failures fed back left out, not sent", plural(s.left_out, "row"))
        } else {
            String::new()
        };
        eprintln!(
            "  every failed row is one the gateway may have acted on ({acted}){left_out}: the job is not idempotent, \
             so the failures file fed back as it is would send none of them; check each on the gateway (by its \
             _key), remove from the failures file those it processed, then send the rest again with: {next}"
        );
    } else if !files.is_empty() && finished.exit == ExitCode::RowsFailed {
        // A 4xx or an invalid row fails the same way when sent as it is;
        // a redirect, until base_url is where it points.
        let redirected: u64 = s.statuses.iter().filter(|(code, _)| code.starts_with('3')).map(|(_, n)| n).sum();
        if redirected > 0 {
            eprintln!(
                "  {} answered with a redirect (3xx), not followed: see where it points (the Location in each \
                 _message); if the API moved there, change base_url or the job's url to match (a login page or \
                 another site means base_url is not the API's address), then send them again",
                plural(redirected, "row")
            );
        }
        let refused: u64 = ["client_error", "invalid_row"].iter().filter_map(|k| s.errors.get(*k)).sum();
        let fix_first = refused > redirected;
        let first = if fix_first {
            "fix the rows that failed with client_error or invalid_row (_message says why), then "
        } else {
            ""
        };
        eprintln!("  {first}send the failures again: {rerun} {}", words(files));
    }
    if !files.is_empty() && !check_first {
        let (acted, kinds) = acted_on(s);
        if !idempotent && acted > 0 {
            eprintln!(
                "    that leaves out the rows the gateway may have acted on ({kinds}): the job is not idempotent; \
                 check them on the gateway, then add --in-doubt resend to send them too"
            );
        }
    }
    if s.left_out > 0 && !check_first {
        let rows = if s.left_out == 1 { "1 row".to_string() } else { format!("{} rows", s.left_out) };
        eprintln!(
            "  {rows} of the failures fed back left out, not sent: they had failed where the gateway may have \
             acted on them (each one's _message says how); check on the gateway, then: {rerun} --in-doubt resend {}",
            words(files)
        );
    }
    if s.in_doubt > 0 {
        let rows = if s.in_doubt == 1 { "1 row was".to_string() } else { format!("{} rows were", s.in_doubt) };
        // Rows left out were not sent now: they are in doubt from before.
        let when = if s.left_out > 0 { ", by this run or the one whose failures were fed back," } else { "" };
        eprintln!("  {rows} sent{when} without a recorded answer (in doubt)");
    }
    match (finished.exit, next) {
        (ExitCode::MaxFailures, Some(next)) => eprintln!(
            "  --max-failures stopped it: fix what fails (the failures file says why), then send the rest \
             with a cap the resumed run can go on under (it counts this run's {} failed rows too): {next}",
            s.failed
        ),
        (ExitCode::RowsFailed, _) | (_, None) => {}
        (_, Some(next)) if options.resumable && s.pending > 0 => eprintln!(
            "  {} accepted by the gateway and not final: polled again (never sent again), with the rows not yet \
             sent, by: {next}  (--give-up-pending writes them to failures instead)",
            plural(s.pending, "row")
        ),
        (_, Some(next)) if options.resumable => {
            eprintln!("  rows not yet sent are in neither file; send them with: {next}")
        }
        (_, Some(next)) => eprintln!("  the demo's sandbox is gone with it: run `{next}` again"),
    }
}
