//! Counting and showing: live counters, the statistics the collector keeps,
//! `summary.json`'s shape, the progress display (a bar at a terminal, a
//! plain line at an interval otherwise) and `report.html` ([`html`]).

mod calls;
pub mod html;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use calls::Calls;

use crate::limiter::Limiter;
use crate::outcome::{ErrorKind, Outcome};
use crate::token::TokenSource;

/// Counters that workers and the collector bump and the display reads.
#[derive(Debug)]
pub struct Live {
    pub bytes_read: AtomicU64,
    /// Rows read to be sent (rows skipped on resume not counted).
    pub rows_read: AtomicU64,
    /// Rows a resume skips because they are done: so far, and in all.
    pub rows_skipped: AtomicU64,
    pub rows_to_skip: AtomicU64,
    /// `--limit`: the reader stops after this many rows (skipped ones included).
    pub rows_limit: AtomicU64,
    /// The input being read, by index, when there are several.
    pub current_input: AtomicU64,
    pub done: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub in_flight: AtomicU64,
    pub retrying: AtomicU64,
    /// Polls sent (`[poll]`) in this part of the run.
    pub polls: AtomicU64,
    /// Rows accepted by the gateway and waiting on their polls (`[poll]`).
    pub waiting: AtomicU64,
    /// Every API answer by status and every call's duration, for the metrics.
    pub calls: Calls,
}

impl Default for Live {
    fn default() -> Live {
        Live {
            bytes_read: AtomicU64::new(0),
            rows_read: AtomicU64::new(0),
            rows_skipped: AtomicU64::new(0),
            rows_to_skip: AtomicU64::new(0),
            rows_limit: AtomicU64::new(u64::MAX),
            current_input: AtomicU64::new(0),
            done: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            retrying: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            calls: Calls::default(),
        }
    }
}

impl Live {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Rows done and the rows the run holds, earlier sessions' included (a
    /// resume starts where they left off): the rows the inputs hold are
    /// estimated from the bytes read so far (exact once read to the end).
    pub(crate) fn rows_of_run(&self, total_bytes: u64) -> (u64, u64) {
        let (done, expected) = self.rows(total_bytes);
        let earlier = Self::get(&self.rows_to_skip);
        (done + earlier, expected + earlier)
    }

    /// Rows done, and the rows this session sends by the bytes read so far
    /// (exact once they are read to the end).
    pub(crate) fn rows(&self, total_bytes: u64) -> (u64, u64) {
        let (done, read, bytes) = (Self::get(&self.done), Self::get(&self.rows_read), Self::get(&self.bytes_read));
        let (skipped, to_skip) = (Self::get(&self.rows_skipped), Self::get(&self.rows_to_skip));
        let expected = if bytes == 0 || bytes >= total_bytes {
            read
        } else {
            // All the rows the inputs hold, less those a resume skips.
            let all = (read + skipped) as f64 * total_bytes as f64 / bytes as f64;
            let all = (all as u64).min(Self::get(&self.rows_limit).max(read + skipped));
            all.saturating_sub(to_skip).max(read)
        };
        (done, expected.max(done))
    }
}

/// The collector's statistics over all outcomes.
pub struct Stats {
    started: Instant,
    /// Time spent in earlier parts of a resumed run.
    earlier: Duration,
    total: u64,
    succeeded: u64,
    failed: u64,
    attempts: u64,
    /// Rows that were sent at least once.
    attempted: u64,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    /// Rows sent with no recorded answer when the run stopped.
    in_doubt: u64,
    /// Rows of a failures file not sent again (no attempt, a kind the
    /// gateway may have acted on).
    left_out: u64,
    /// Rows the retry budget stopped, this run's and its earlier parts'.
    budget_stopped: u64,
    /// Latency of each row's last attempt, in microseconds.
    latency: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            earlier: Duration::ZERO,
            total: 0,
            succeeded: 0,
            failed: 0,
            attempts: 0,
            attempted: 0,
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            in_doubt: 0,
            left_out: 0,
            budget_stopped: 0,
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Summary {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub in_doubt: u64,
    /// Rows of a failures file not sent again: the gateway may have acted
    /// on them (`--in-doubt fail`, the default for a job that is not idempotent).
    #[serde(default)]
    pub left_out: u64,
    pub attempts: u64,
    pub retries: u64,
    pub token_requests: u64,
    pub duration_s: f64,
    pub rows_per_s: f64,
    pub latency_ms: Latency,
    pub statuses: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// The lowest sending rate the server's 429s brought the run down to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled_rate: Option<f64>,
    pub exit_code: u8,
    /// Rows that failed without another attempt because the retry budget was spent.
    #[serde(default)]
    pub budget_stopped: u64,
    /// Rows of a `[poll]` job accepted by the gateway and not final yet:
    /// neither results nor failures; `resume` polls them.
    #[serde(default)]
    pub pending: u64,
    /// Polls sent (`[poll]`), over every part of the run; `attempts` counts first calls only.
    #[serde(default)]
    pub polls: u64,
    /// Where the run's files are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<std::path::PathBuf>,
}

impl Stats {
    pub fn add(&mut self, outcome: &Outcome) {
        let error = outcome.result.as_ref().err().map(|f| f.kind.as_str());
        self.add_recorded(outcome.status, error, outcome.attempts, outcome.latency.as_micros() as u64);
    }

    /// Counts an outcome: this run's, or one an earlier part of a resumed
    /// run left in the ledger.
    pub fn add_recorded(&mut self, status: Option<u16>, error: Option<&str>, attempts: u32, latency_us: u64) {
        self.total += 1;
        self.attempts += u64::from(attempts);
        if let Some(status) = status {
            *self.statuses.entry(status).or_default() += 1;
        }
        match error {
            None => self.succeeded += 1,
            Some(kind) => {
                self.failed += 1;
                *self.errors.entry(kind.to_string()).or_default() += 1;
                if kind == ErrorKind::InDoubt.as_str() {
                    self.in_doubt += 1;
                }
                if attempts == 0 && ErrorKind::parse(kind).is_some_and(ErrorKind::may_have_acted) {
                    self.left_out += 1;
                }
            }
        }
        if attempts > 0 {
            self.attempted += 1;
            self.latency.saturating_record(latency_us.max(1));
        }
    }

    /// Rows that failed without another attempt: the retry budget was spent.
    pub fn add_budget_stopped(&mut self, rows: u64) {
        self.budget_stopped += rows;
    }

    /// A row abandoned in flight at the end of the grace period.
    pub fn add_abandoned(&mut self) {
        self.in_doubt += 1;
    }

    /// Starts counting this run's time now (statistics of a resumed run's
    /// earlier parts are gathered before it starts).
    pub fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    /// Counts the time earlier parts of a resumed run took.
    pub fn add_earlier_time(&mut self, earlier: Duration) {
        self.earlier += earlier;
    }

    pub fn failed(&self) -> u64 {
        self.failed
    }

    pub fn summary(&self, token_requests: u64, exit_code: u8) -> Summary {
        let duration = (self.started.elapsed() + self.earlier).as_secs_f64();
        let ms = |us: u64| (us as f64 / 1000.0 * 10.0).round() / 10.0;
        let empty = self.latency.is_empty();
        let q = |q: f64| if empty { 0.0 } else { ms(self.latency.value_at_quantile(q)) };
        Summary {
            total: self.total,
            succeeded: self.succeeded,
            failed: self.failed,
            in_doubt: self.in_doubt,
            left_out: self.left_out,
            attempts: self.attempts,
            retries: self.attempts - self.attempted,
            token_requests,
            duration_s: (duration * 1000.0).round() / 1000.0,
            rows_per_s: if duration > 0.0 { (self.total as f64 / duration * 10.0).round() / 10.0 } else { 0.0 },
            latency_ms: Latency {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                max: if empty { 0.0 } else { ms(self.latency.max()) },
            },
            statuses: self.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            errors: self.errors.clone(),
            throttled_rate: None,
            exit_code,
            budget_stopped: self.budget_stopped,
            pending: 0,
            polls: 0,
            run_dir: None,
            failures: Vec::new(),
            report: None,
        }
    }
}

/// When to draw the progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, a progress line at an interval otherwise.
    Auto,
    /// A bar even when stderr is not a terminal.
    Always,
    /// No bar: a progress line at an interval.
    Never,
}

/// The bar being drawn, if any, so log lines can print above it.
static ACTIVE_BAR: RwLock<Option<ProgressBar>> = RwLock::new(None);

/// A `tracing` writer for stderr that prints above the progress bar.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE_BAR.read().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) if !bar.is_hidden() => bar.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            _ => std::io::stderr().write_all(buf).map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

/// The running progress display.
pub struct Progress {
    stop: CancellationToken,
    /// Set when every row is done, so the bar ends full; otherwise it stays where it is.
    completed: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// What the display shows besides the counters.
pub struct ProgressSource {
    pub live: Arc<Live>,
    pub total_bytes: u64,
    pub tokens: Option<TokenSource>,
    pub limiter: Option<Arc<dyn Limiter>>,
    /// The inputs' names; with several, the current one is shown.
    pub inputs: Vec<String>,
    pub interval: Duration,
}

impl Progress {
    pub fn start(mode: ProgressMode, source: ProgressSource) -> Progress {
        let stop = CancellationToken::new();
        let completed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let draw = match mode {
            ProgressMode::Always => true,
            ProgressMode::Never => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        };
        let task = if draw {
            let target = if mode == ProgressMode::Always {
                // Drawn even where stderr is no terminal.
                ProgressDrawTarget::term_like_with_hz(Box::new(console::Term::stderr()), 10)
            } else {
                ProgressDrawTarget::stderr_with_hz(10)
            };
            tokio::spawn(draw_bar(source, target, stop.clone(), completed.clone()))
        } else {
            // No bar: a plain line at an interval, for logs and cron.
            tokio::spawn(log_lines(source, stop.clone()))
        };
        Progress { stop, completed, task }
    }

    /// Stops the display; `completed` when every row was done.
    pub async fn finish(self, completed: bool) {
        self.completed.store(completed, Ordering::Relaxed);
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn counters(source: &ProgressSource, elapsed: Duration) -> String {
    let (live, tokens) = (&source.live, source.tokens.as_ref());
    let current = if source.inputs.len() > 1 {
        let i = Live::get(&live.current_input) as usize;
        source.inputs.get(i).map(|name| format!("{name} ({}/{}) · ", i + 1, source.inputs.len())).unwrap_or_default()
    } else {
        String::new()
    };
    let done = Live::get(&live.done);
    let rate = if elapsed.as_secs_f64() > 0.0 { done as f64 / elapsed.as_secs_f64() } else { 0.0 };
    let mut text = format!(
        "{current}{} rows · {rate:.0}/s · ok {} · failed {} · in flight {}",
        done,
        Live::get(&live.succeeded),
        Live::get(&live.failed),
        Live::get(&live.in_flight)
    );
    let retrying = Live::get(&live.retrying);
    if retrying > 0 {
        text.push_str(&format!(" · retrying {retrying}"));
    }
    let waiting = Live::get(&live.waiting);
    if waiting > 0 {
        text.push_str(&format!(" · waiting on polls {waiting}"));
    }
    if let Some(rate) = source.limiter.as_ref().and_then(|l| l.effective_rate()) {
        text.push_str(&format!(" · throttled to {rate:.1}/s"));
    }
    if let Some(left) = tokens.and_then(TokenSource::time_left) {
        text.push_str(&format!(" · token {}", short_duration(left)));
    }
    text
}

fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

async fn draw_bar(
    source: ProgressSource,
    target: ProgressDrawTarget,
    stop: CancellationToken,
    completed: Arc<std::sync::atomic::AtomicBool>,
) {
    let bar = ProgressBar::with_draw_target(Some(source.total_bytes.max(1)), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner:.cyan} {elapsed_precise} [{wide_bar:.cyan/blue}] {percent:>3}% eta {eta} \n  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    if let Ok(mut active) = ACTIVE_BAR.write() {
        *active = Some(bar.clone());
    }
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut first = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Rows, not bytes: the reader's read-ahead would run the share ahead.
        let (done, expected) = source.live.rows_of_run(source.total_bytes);
        bar.set_length(expected.max(1));
        bar.set_position(done);
        if first {
            // A resume starts at the rows done before: the ETA counts from here.
            bar.reset_eta();
            first = false;
        }
        bar.set_message(counters(&source, started.elapsed()));
    }
    if completed.load(Ordering::Relaxed) {
        let (done, expected) = source.live.rows_of_run(source.total_bytes);
        bar.set_length(expected.max(1));
        bar.set_position(done);
        bar.set_message(counters(&source, started.elapsed()));
        bar.finish();
    } else {
        // Stopped: the closing lines say where it stopped; no stale bar.
        bar.finish_and_clear();
    }
    if let Ok(mut active) = ACTIVE_BAR.write() {
        *active = None;
    }
}

async fn log_lines(source: ProgressSource, stop: CancellationToken) {
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(started + source.interval, source.interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (done, expected) = source.live.rows_of_run(source.total_bytes);
        let share = if expected > 0 { done as f64 * 100.0 / expected as f64 } else { 0.0 };
        tracing::info!("progress: {} · {share:.0}% of about {expected} rows", counters(&source, started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_expected_count_only_the_rows_left_to_send() {
        let live = Live::default();
        let set = |counter: &AtomicU64, v| counter.store(v, Ordering::Relaxed);
        // 4,000 rows in 400 kB; a resume skips the 3,000 done, spread evenly.
        set(&live.rows_to_skip, 3000);
        set(&live.bytes_read, 100_000);
        set(&live.rows_skipped, 750);
        set(&live.rows_read, 250);
        set(&live.done, 200);
        assert_eq!(live.rows(400_000), (200, 1000));
        // Read to the end: exact.
        set(&live.bytes_read, 400_000);
        set(&live.rows_read, 1000);
        assert_eq!(live.rows(400_000), (200, 1000));
        // --limit 3,500: 500 of them left to send.
        set(&live.rows_limit, 3500);
        set(&live.bytes_read, 100_000);
        set(&live.rows_read, 250);
        assert_eq!(live.rows(400_000), (200, 500));
        // The bar counts the run's rows: the 3,000 done before are done.
        assert_eq!(live.rows_of_run(400_000), (3200, 3500));
    }
}
