//! The commands: resolve the job, its configuration and inputs, fetch the
//! first token, create the run directory, hand a plan to the runner, and
//! print the closing lines.

mod close;
mod demo;
mod jwks;
mod launch;
mod resolve;
mod resume;
mod run;
mod runs;
mod sandbox;
mod token;
mod validate;

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::cli::*;
use crate::error::{Error, ExitCode};

/// Runs a command to its exit code. `stop` is cancelled on SIGINT/SIGTERM/SIGHUP.
pub async fn execute(cli: Cli, stop: CancellationToken) -> Result<ExitCode, Error> {
    let log = cli.log;
    match cli.command {
        Command::Run(args) => run::run(args, log, stop).await,
        Command::Resume(args) => resume::resume(args, log, stop).await,
        Command::Validate(args) => validate::validate(args, &log).await,
        Command::Token(args) => token::token(args).await,
        Command::Jwks(args) => jwks::jwks(args).await,
        Command::Sandbox(args) => sandbox::sandbox(args, stop).await,
        Command::Demo(args) => demo::demo(args, log, stop).await,
        Command::Report(args) => {
            let path = write_report(&through_link(args.run_dir))?;
            eprintln!("bulkcall: wrote {}", path.display());
            Ok(ExitCode::Success)
        }
        Command::Status(args) => {
            let run = crate::status::RunStatus::read(&through_link(args.run))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&run).expect("serializable"));
            } else {
                print!("{}", run.render());
            }
            Ok(run.exit_code())
        }
        Command::Runs(args) => runs::runs(args),
        Command::Completions(args) => {
            use clap::CommandFactory as _;
            clap_complete::generate(args.shell, &mut Cli::command(), "bulkcall", &mut std::io::stdout());
            Ok(ExitCode::Success)
        }
        Command::Man(args) => man(args),
    }
}

/// What a command works on, for the error line that ends it in a cron log
/// (`-q`) or a JSON log: the job's name, and its file or (`resume`) the
/// run directory; `None` for commands without a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The spec's `name`, else its file's stem, as a run names it; for
    /// `resume`, the name in run.json (if it can be read).
    pub job: Option<String>,
    /// `jobs/eligibility.toml`, or `resume out/eligibility/2026-12-02T030000Z`.
    pub place: String,
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.job {
            Some(job) => write!(f, "{job} ({})", self.place),
            None => write!(f, "{}", self.place),
        }
    }
}

pub fn subject(cli: &Cli) -> Option<Subject> {
    let job = |path: &Path| {
        let named = std::fs::read_to_string(path).ok().and_then(|text| {
            let table: toml::Table = toml::from_str(&text).ok()?;
            table.get("name")?.as_str().map(str::to_string)
        });
        let job = named.or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()));
        Subject { job, place: path.display().to_string() }
    };
    match &cli.command {
        Command::Run(args) => Some(job(&args.job)),
        Command::Validate(args) => Some(job(&args.job)),
        Command::Resume(args) => {
            let job = std::fs::read(args.run_dir.join("run.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .and_then(|info| info["job_name"].as_str().map(str::to_string));
            Some(Subject { job, place: format!("resume {}", args.run_dir.display()) })
        }
        _ => None,
    }
}

/// The one line an error that ends a command gets under `-q`: `bulkcall:
/// 2026-12-03T19:11:46Z eligibility (jobs/eligibility.toml): error: ...;
/// exit 3`.
pub fn quiet_error_line(subject: Option<&Subject>, error: &Error, now: std::time::SystemTime) -> String {
    let when = humantime::format_rfc3339_seconds(now);
    let code = error.exit_code().code();
    match subject {
        Some(subject) => format!("bulkcall: {when} {subject}: error: {error}; exit {code}"),
        None => format!("bulkcall: {when} error: {error}; exit {code}"),
    }
}

/// The run a link such as `out/<job>/latest` points to, so what is shown
/// and advised names that run, not a link that will move to the next one.
fn through_link(path: std::path::PathBuf) -> std::path::PathBuf {
    match path.is_symlink() {
        true => std::fs::canonicalize(&path).unwrap_or(path),
        false => path,
    }
}

/// Builds and writes a run's `report.html`; in the folder of a sharded
/// run, one page over every shard.
pub(super) fn write_report(dir: &Path) -> Result<PathBuf, Error> {
    let html = if dir.join("run.json").exists() || dir.join("summary.json").exists() {
        crate::report::html::render(dir)?
    } else {
        crate::report::html::render_shards(&crate::status::RunStatus::read(dir)?)?
    };
    Ok(crate::output::write_report(dir, &html)?)
}

/// `bulkcall man`: the top page, one command's page, or (`--dir`) every page.
fn man(args: ManArgs) -> Result<ExitCode, Error> {
    use clap::CommandFactory as _;
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    if let Some(dir) = &args.dir {
        std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(cli, dir))
            .map_err(|e| Error::Usage(format!("cannot write the man pages into {}: {e}", dir.display())))?;
        eprintln!("bulkcall: wrote the man pages into {}", dir.display());
        return Ok(ExitCode::Success);
    }
    let page = match &args.command {
        None => cli,
        Some(name) => cli.find_subcommand(name).cloned().ok_or_else(|| {
            let names: Vec<&str> = cli.get_subcommands().map(|c| c.get_name()).collect();
            Error::Usage(format!("`{name}` is not a bulkcall command: {}", names.join(", ")))
        })?,
    };
    clap_mangen::Man::new(page)
        .render(&mut std::io::stdout())
        .map_err(|e| Error::Usage(format!("cannot print the man page: {e}")))?;
    Ok(ExitCode::Success)
}
