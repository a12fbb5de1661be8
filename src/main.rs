//! The bulkcall binary: parse flags, set up logging and signals, run the
//! command, and turn its result into an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::SystemTime;

use bulkcall::cli::{Cli, Color, LogArgs, LogFormat};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

// Every row allocates a little (a request, an answer, an outcome line):
// mimalloc made the end-to-end run a good deal faster than glibc's malloc.
// Its 2.x line (Cargo.toml's `v2`), not 3.x: 2-4 MiB less at the peak with
// 2,000 calls in flight and at -j 64, at the same speed (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // No transparent huge pages: the allocator (mimalloc) asks for them on
    // its arenas, and each touched 2 MiB page then counts whole in the
    // resident set. Without them a run at -j 64 peaks at about 26 MiB
    // instead of 55-60 (BENCHMARKS.md), at the same speed.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(2) with integer arguments only; it changes this
    // process's memory policy and nothing Rust relies on.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let cli = Cli::parse();
    init_logging(&cli.log);
    let json = cli.log.log_format == LogFormat::Json;
    let quiet = cli.log.quiet;
    // Under -q (or in a JSON log) an error line is all a cron log may get
    // of a run: it says when, which job and the exit code, as the closing
    // line does.
    let subject = (cli.log.quiet || json).then(|| bulkcall::commands::subject(&cli)).flatten();
    // The main thread's runtime handles signals, progress and token
    // requests. A run's calls go out from lanes, each a thread with a
    // runtime of its own (runner.rs): a row never changes threads, which
    // costs less per row than a work-stealing pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulkcall: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn(watch_signals(stop.clone()));
        match bulkcall::commands::execute(cli, stop).await {
            Ok(code) => code,
            Err(e) => {
                let code = e.exit_code();
                if json {
                    // One JSON object per line, this one too, with its time:
                    // a log collector (or a cron log read the morning after)
                    // gets the reason a run never started.
                    let job = subject.as_ref().and_then(|s| s.job.as_deref());
                    let place = subject.as_ref().map(|s| s.place.as_str());
                    tracing::error!(exit_code = code.code(), job, place, "{e}");
                } else if quiet {
                    eprintln!("{}", bulkcall::commands::quiet_error_line(subject.as_ref(), &e, SystemTime::now()));
                } else {
                    eprintln!("bulkcall: error: {e}");
                }
                code
            }
        }
    });
    // Do not wait for a blocked reader thread on the way out.
    runtime.shutdown_background();
    ExitCode::from(code.code())
}

/// The first SIGINT, SIGTERM or SIGHUP (the terminal or ssh session went
/// away) stops taking rows and lets calls in flight finish; a second one
/// exits at once.
async fn watch_signals(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
    else {
        return;
    };
    for n in 0.. {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        if n == 0 {
            // Through the log, so it prints above a progress bar.
            tracing::warn!("stopping: no new rows; calls in flight may finish (signal again to stop at once)");
            stop.cancel();
        } else {
            match bulkcall::runner::last_words() {
                Some(words) => eprintln!("bulkcall: stopped at once: {words}"),
                None => eprintln!("bulkcall: stopped at once"),
            }
            std::process::exit(130);
        }
    }
}

fn init_logging(args: &LogArgs) {
    let default = match (args.quiet, args.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = if args.quiet || args.verbose > 0 {
        EnvFilter::new(format!("{default},hyper=info,reqwest=info,h2=info"))
    } else {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
    };
    let color = match args.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(bulkcall::report::LogWriter)
        .with_target(false)
        .with_ansi(color);
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
