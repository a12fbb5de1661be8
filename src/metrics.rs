//! Metrics for scheduled runs: the figures operators alert on, in the
//! Prometheus text exposition format 0.0.4, written to a file for
//! node_exporter's textfile collector (`--metrics-file`), served on
//! `GET /metrics` while the run lasts (`--metrics-listen`) and pushed to a
//! Pushgateway at the end (`--metrics-push`).
//!
//! The figures are read, never kept twice: the runner attaches its live
//! counters and the recorder's statistics (the ones `summary.json` is made
//! of) to a [`Board`], and every render reads them there. Among the live
//! counters are [`crate::report::Calls`]: every API answer by status and the
//! duration of every call, bumped by the workers without a lock.
//!
//! Labels are `job_name` and, for a shard, `shard` (`K/N`), plus the fixed
//! words `outcome`, `code` and `kind`: no label ever holds a row value.
//!
//! The text is written by the `prometheus` crate's `TextEncoder`, which
//! writes format 0.0.4 (what node_exporter and `promtool check metrics`
//! read); `prometheus-client` writes OpenMetrics, whose `_total` samples
//! promtool 2.42 rejects in a textfile.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use prometheus::TextEncoder;
use prometheus::core::Metric as _;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use tokio_util::sync::CancellationToken;

use crate::config::MetricsSettings;
use crate::report::{Live, Stats};
use crate::shard::Shard;
use crate::token::TokenSource;

/// How often `--metrics-file` is written while the run goes on.
pub const FILE_EVERY: Duration = Duration::from_secs(10);

/// How long a push to the Pushgateway may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the end waits for the file's timer and the server to stop.
const STOP_WITHIN: Duration = Duration::from_secs(5);

const LAST_SUCCESS: &str = "bulkcall_last_success_timestamp_seconds";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr} (metrics.listen): {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot write the metrics file {path} (metrics.file): {source}")]
    File { path: PathBuf, source: std::io::Error },
}

/// Where the runner's figures are read from, once it has started.
pub struct Source {
    pub live: Arc<Live>,
    /// The recorder's statistics, earlier parts of a resumed run included.
    pub stats: Arc<Mutex<Stats>>,
    /// The inputs' size, to estimate the rows expected before they are read.
    pub total_bytes: u64,
    pub tokens: Option<TokenSource>,
}

/// The handle the runner attaches its figures to; cheap to clone.
#[derive(Clone, Default)]
pub struct Board(Arc<OnceLock<Source>>);

impl Board {
    /// Called once by the runner as it starts.
    pub fn attach(&self, source: Source) {
        let _ = self.0.set(source);
    }
}

/// The run's figures at one moment.
#[derive(Debug, Default, PartialEq)]
struct Figures {
    succeeded: u64,
    failed: u64,
    in_doubt: u64,
    pending: u64,
    expected: u64,
    attempts: u64,
    retries: u64,
    errors: BTreeMap<String, u64>,
    token_requests: u64,
}

impl Source {
    fn figures(&self) -> Figures {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let token_requests = self.tokens.as_ref().map_or(0, TokenSource::requests);
        let summary = stats.summary(token_requests, 0);
        // Read under the recorder's lock, so done and the statistics agree.
        let (done, expected_now) = self.live.rows(self.total_bytes);
        drop(stats);
        // A row failed as in_doubt counts in doubt, not failed: the outcomes
        // are a partition of the rows expected (summary.json's `failed`
        // counts both).
        let failed_in_doubt = summary.errors.get(crate::outcome::ErrorKind::InDoubt.as_str()).copied().unwrap_or(0);
        let expected = summary.total.saturating_sub(done) + expected_now;
        let failed = summary.failed - failed_in_doubt;
        let finished = summary.succeeded + failed + summary.in_doubt;
        Figures {
            succeeded: summary.succeeded,
            failed,
            in_doubt: summary.in_doubt,
            pending: expected.saturating_sub(finished),
            expected: expected.max(finished),
            attempts: summary.attempts,
            retries: summary.retries,
            errors: summary.errors,
            token_requests,
        }
    }
}

/// What is known of the run besides the runner's figures.
struct Run {
    board: Board,
    /// `job_name`, and `shard` when the run is split.
    labels: Vec<(&'static str, String)>,
    started: f64,
    /// The end of the last run of this job that exited 0, before this one.
    last_success: Option<f64>,
    /// The end and the exit code, once the run is over.
    ended: Mutex<Option<(f64, u8)>>,
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

impl Run {
    fn label_pairs(&self, extra: Option<(&str, &str)>) -> Vec<LabelPair> {
        let pair = |name: &str, value: &str| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        };
        let mut pairs: Vec<LabelPair> = self.labels.iter().map(|(n, v)| pair(n, v)).collect();
        pairs.extend(extra.map(|(n, v)| pair(n, v)));
        pairs
    }

    fn sample(&self, extra: Option<(&str, &str)>) -> Metric {
        let mut metric = Metric::default();
        metric.set_label(self.label_pairs(extra));
        metric
    }

    fn gauge(&self, extra: Option<(&str, &str)>, value: f64) -> Metric {
        let mut metric = self.sample(extra);
        let mut gauge = Gauge::default();
        gauge.set_value(value);
        metric.set_gauge(gauge);
        metric
    }

    fn counter(&self, extra: Option<(&str, &str)>, value: f64) -> Metric {
        let mut metric = self.sample(extra);
        let mut counter = Counter::default();
        counter.set_value(value);
        metric.set_counter(counter);
        metric
    }

    /// Every family, in the text format.
    fn render(&self) -> String {
        let source = self.board.0.get();
        let figures = source.map(Source::figures).unwrap_or_default();
        let ended = *self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let mut families = Vec::new();
        let mut family = |name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>| {
            let mut family = MetricFamily::default();
            family.set_name(name.to_string());
            family.set_help(help.to_string());
            family.set_field_type(kind);
            family.set_metric(metrics);
            families.push(family);
        };
        let rows = [
            ("succeeded", figures.succeeded),
            ("failed", figures.failed),
            ("in_doubt", figures.in_doubt),
            ("pending", figures.pending),
        ];
        family(
            "bulkcall_rows",
            "Rows by outcome: succeeded, failed for good, in doubt (sent, no answer known), pending (no outcome yet)",
            MetricType::GAUGE,
            rows.iter().map(|(outcome, n)| self.gauge(Some(("outcome", outcome)), *n as f64)).collect(),
        );
        family(
            "bulkcall_rows_expected",
            "Rows the run is to send (estimated from the bytes read until the inputs are read to the end)",
            MetricType::GAUGE,
            vec![self.gauge(None, figures.expected as f64)],
        );
        family(
            "bulkcall_attempts_total",
            "API calls sent, every attempt counted",
            MetricType::COUNTER,
            vec![self.counter(None, figures.attempts as f64)],
        );
        family(
            "bulkcall_retries_total",
            "Attempts after a row's first",
            MetricType::COUNTER,
            vec![self.counter(None, figures.retries as f64)],
        );
        let polls = source.map_or(0, |s| s.live.polls.load(std::sync::atomic::Ordering::Relaxed));
        family(
            "bulkcall_polls_total",
            "Status polls sent after an accepted call",
            MetricType::COUNTER,
            vec![self.counter(None, polls as f64)],
        );
        let answers: Vec<Metric> = source
            .map(|s| s.live.calls.answers().map(|(code, n)| self.counter(Some(("code", &code.to_string())), n as f64)))
            .into_iter()
            .flatten()
            .collect();
        if !answers.is_empty() {
            family(
                "bulkcall_responses_total",
                "API answers by status code (the token endpoint's not counted)",
                MetricType::COUNTER,
                answers,
            );
        }
        if !figures.errors.is_empty() {
            family(
                "bulkcall_errors_total",
                "Rows failed, by their final error",
                MetricType::COUNTER,
                figures.errors.iter().map(|(kind, n)| self.counter(Some(("kind", kind)), *n as f64)).collect(),
            );
        }
        family(
            "bulkcall_token_requests_total",
            "Requests to the token endpoint",
            MetricType::COUNTER,
            vec![self.counter(None, figures.token_requests as f64)],
        );
        let expiry = source.and_then(|s| s.tokens.as_ref()).and_then(TokenSource::time_left);
        if let Some(left) = expiry {
            family(
                "bulkcall_token_expiry_timestamp_seconds",
                "When the token in use expires",
                MetricType::GAUGE,
                vec![self.gauge(None, unix_seconds(SystemTime::now() + left).round())],
            );
        }
        if let Some(source) = source {
            let mut histogram = source.live.calls.duration.metric();
            histogram.set_label(self.label_pairs(None));
            family(
                "bulkcall_request_duration_seconds",
                "How long each API call took, every attempt",
                MetricType::HISTOGRAM,
                vec![histogram],
            );
        }
        family(
            "bulkcall_disk_syncs_total",
            "fdatasync calls made to keep the run's files durable (started marks, outcomes, done marks); \
             a slow disk shows here first",
            MetricType::COUNTER,
            vec![self.counter(None, crate::output::disk_syncs() as f64)],
        );
        family(
            "bulkcall_run_start_timestamp_seconds",
            "When the run started",
            MetricType::GAUGE,
            vec![self.gauge(None, self.started)],
        );
        if let Some((end, exit)) = ended {
            family(
                "bulkcall_run_end_timestamp_seconds",
                "When the run ended",
                MetricType::GAUGE,
                vec![self.gauge(None, end)],
            );
            family(
                "bulkcall_exit_code",
                "The run's exit code (0: every row succeeded)",
                MetricType::GAUGE,
                vec![self.gauge(None, f64::from(exit))],
            );
        }
        if let Some(last) = self.last_success() {
            family(
                LAST_SUCCESS,
                "When the last run of this job that exited 0 ended",
                MetricType::GAUGE,
                vec![self.gauge(None, last)],
            );
        }
        let mut text = String::new();
        TextEncoder::new().encode_utf8(&families, &mut text).expect("every family is well formed");
        text
    }

    /// This run's end if it exited 0, else the one carried over.
    fn last_success(&self) -> Option<f64> {
        match *self.ended.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((end, 0)) => Some(end),
            _ => self.last_success,
        }
    }
}

/// The value of `bulkcall_last_success_timestamp_seconds` in a metrics
/// file's text, if it has one.
fn carried_last_success(text: &str) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.strip_prefix(LAST_SUCCESS).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .find(|v| v.is_finite())
}

/// Writes `text` to `path` atomically: a temporary file in the same folder,
/// synced, renamed over it; never half-written. Readable by all (the
/// textfile collector runs as another user; no figure is PHI).
fn write_atomically(path: &Path, text: &str) -> Result<(), MetricsError> {
    use std::os::unix::fs::PermissionsExt;
    let error = |source| MetricsError::File { path: path.to_path_buf(), source };
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut file =
        tempfile::Builder::new().prefix(".bulkcall-metrics").suffix(".tmp").tempfile_in(folder).map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)?;
    file.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(error)?;
    file.as_file().sync_all().map_err(error)?;
    file.persist(path).map_err(|e| error(e.error))?;
    // The rename itself made durable.
    if let Ok(dir) = std::fs::File::open(folder) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The metrics of one run: started before the pool, finished after it.
pub struct Exporter {
    run: Arc<Run>,
    file: Option<PathBuf>,
    push: Option<String>,
    /// Stops the file's timer and the `/metrics` server.
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Exporter {
    /// Reads the last success out of the metrics file, binds `metrics.listen`,
    /// writes the file once and then every [`FILE_EVERY`].
    pub async fn start(
        settings: &MetricsSettings,
        job_name: &str,
        shard: Option<Shard>,
    ) -> Result<Exporter, MetricsError> {
        let mut labels = vec![("job_name", job_name.to_string())];
        labels.extend(shard.map(|s| ("shard", s.to_string())));
        let last_success = settings
            .file
            .as_deref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|t| carried_last_success(&t));
        let run = Arc::new(Run {
            board: Board::default(),
            labels,
            started: unix_seconds(SystemTime::now()),
            last_success,
            ended: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        if let Some(addr) = settings.listen {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Listen { addr, source })?;
            tracing::info!("metrics on http://{}/metrics", listener.local_addr().unwrap_or(addr));
            tasks.push(tokio::spawn(serve(listener, run.clone(), stop.clone())));
        }
        if let Some(path) = &settings.file {
            // The first write now: a path that cannot be written stops the run before it starts.
            write_atomically(path, &run.render())?;
            tasks.push(tokio::spawn(write_every(path.clone(), run.clone(), stop.clone())));
        }
        Ok(Exporter { run, file: settings.file.clone(), push: settings.push.clone(), stop, tasks })
    }

    /// The handle the runner attaches its figures to.
    pub fn board(&self) -> Board {
        self.run.board.clone()
    }

    /// The run is over: the final figures written and pushed, the server
    /// stopped. A failure here is warned about once and never changes the
    /// run's exit code.
    pub async fn finish(self, exit: u8) {
        *self.run.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some((unix_seconds(SystemTime::now()), exit));
        self.stop.cancel();
        // A scrape still being answered may finish; none holds up the end.
        for task in self.tasks {
            let _ = tokio::time::timeout(STOP_WITHIN, task).await;
        }
        let text = self.run.render();
        if let Some(path) = &self.file
            && let Err(e) = write_atomically(path, &text)
        {
            tracing::warn!("{e}");
        }
        if let Some(url) = &self.push
            && let Err(e) = push(url, &self.run.labels, text).await
        {
            tracing::warn!("could not push the metrics to the Pushgateway (metrics.push): {e}");
        }
    }
}

async fn write_every(path: PathBuf, run: Arc<Run>, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + FILE_EVERY, FILE_EVERY);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (path, text) = (path.clone(), run.render());
        let written = tokio::task::spawn_blocking(move || write_atomically(&path, &text)).await;
        if let Ok(Err(e)) = written
            && !warned
        {
            tracing::warn!("{e}");
            warned = true;
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, run: Arc<Run>, stop: CancellationToken) {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let run = run.clone();
            async move { ([(CONTENT_TYPE, prometheus::TEXT_FORMAT)], run.render()) }
        }),
    );
    let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
    if let Err(e) = served {
        tracing::warn!("the metrics server stopped: {e}");
    }
}

/// The Pushgateway path of the run's group: `job=bulkcall`, then `job_name`
/// and `shard`, base64url-encoded so any name fits in a path segment.
fn push_path(labels: &[(&'static str, String)]) -> String {
    let mut path = String::from("/metrics/job/bulkcall");
    for (name, value) in labels {
        let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value);
        path.push_str(&format!("/{name}@base64/{value}"));
    }
    path
}

/// Pushes the final figures with POST: the families pushed replace theirs
/// in the group, and one left out (the last success, after a failed run)
/// keeps the value an earlier push gave it.
async fn push(url: &str, labels: &[(&'static str, String)], text: String) -> Result<(), String> {
    let base = url::Url::parse(url).map_err(|e| format!("{url} is not a URL: {e}"))?;
    let origin = base.origin().ascii_serialization();
    let target = format!("{}{}", url.trim_end_matches('/'), push_path(labels));
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(PUSH_TIMEOUT)
        .build()
        .map_err(|e| e.without_url().to_string())?;
    let answer = client
        .post(&target)
        .header(reqwest::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
        .body(text)
        .send()
        .await
        .map_err(|e| format!("{origin}: {}", crate::outcome::describe(&e)))?;
    let status = answer.status();
    if !status.is_success() {
        let body = answer.text().await.unwrap_or_default();
        let body: String = body.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(300).collect();
        return Err(format!("{origin} answered {status}: {body}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_success_is_read_back_with_or_without_labels() {
        let text = "# HELP bulkcall_last_success_timestamp_seconds x\n\
                    # TYPE bulkcall_last_success_timestamp_seconds gauge\n\
                    bulkcall_last_success_timestamp_seconds_other 5\n\
                    bulkcall_last_success_timestamp_seconds{job_name=\"a b\"} 1764650000.25\n";
        assert_eq!(carried_last_success(text), Some(1764650000.25));
        assert_eq!(carried_last_success("bulkcall_last_success_timestamp_seconds 17\n"), Some(17.0));
        assert_eq!(carried_last_success("bulkcall_exit_code 0\n"), None);
    }

    #[test]
    fn the_push_path_holds_any_name() {
        let labels = vec![("job_name", "nightly/eligibility".to_string()), ("shard", "1/4".to_string())];
        assert_eq!(
            push_path(&labels),
            "/metrics/job/bulkcall/job_name@base64/bmlnaHRseS9lbGlnaWJpbGl0eQ/shard@base64/MS80"
        );
    }
}
