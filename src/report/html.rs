//! `report.html`: a self-contained page about one run, built from the files
//! of its run directory alone (`summary.json`, `run.json`, the ledger,
//! `events.jsonl` and the failures files), so `bulkcall report RUN_DIR` can rebuild it at any
//! time. Nothing is loaded from the network: styles and charts (SVG) are
//! inline. It shows no row data beyond what the failures file holds: row,
//! key, error kind, status and message.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;

use serde_json::Value;

use super::Summary;
use crate::output::{Ledger, Mark};
use crate::status::RunStatus;

/// Failures listed on the page.
const LISTED_FAILURES: usize = 20;
/// Groups of failures (kind, status, message shape) listed on the page, and
/// counted apart at most; the rest count as other shapes.
const LISTED_GROUPS: usize = 20;
const MAX_GROUPS: usize = 1000;
/// Bars in the throughput chart at most.
const MAX_BARS: usize = 240;
/// Events listed on the page.
const LISTED_EVENTS: usize = 50;

/// How the time charts mark each kind of event: its kind in
/// `events.jsonl`, its name on the page, its colour. Kinds not here
/// (`start`, `end`, kinds of later versions) are listed, not marked.
const MARKS: [(&str, &str, &str); 10] = [
    ("pause", "Retry-After pause", "#b8860b"),
    ("slow_down", "rate lowered", "#d2691e"),
    ("rate_restored", "rate restored", "#2e8b57"),
    ("token_refresh", "token refreshed", "#1e90ff"),
    ("token_refresh_failed", "token refresh failed", "#dc143c"),
    ("redis_lost", "Redis lost", "#8b008b"),
    ("redis_back", "Redis back", "#da70d6"),
    ("breaker_open", "circuit breaker open", "#000000"),
    ("abort", "aborted", "#800000"),
    ("stop", "stopped", "#696969"),
];

/// Latency histogram buckets: upper bounds in ms.
const BUCKETS_MS: [(f64, &str); 14] = [
    (1.0, "<1 ms"),
    (2.0, "1–2"),
    (5.0, "2–5"),
    (10.0, "5–10"),
    (20.0, "10–20"),
    (50.0, "20–50"),
    (100.0, "50–100"),
    (200.0, "100–200"),
    (500.0, "200–500"),
    (1000.0, "0.5–1 s"),
    (2000.0, "1–2 s"),
    (5000.0, "2–5 s"),
    (10000.0, "5–10 s"),
    (f64::INFINITY, ">10 s"),
];

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0} has no summary.json: the run has not ended yet, or this is not a run directory")]
    NoSummary(std::path::PathBuf),
    #[error("cannot read {path}: {message}")]
    Read { path: std::path::PathBuf, message: String },
}

/// What the ledger tells about the run's pace and latencies.
#[derive(Default)]
struct Timeline {
    /// Outcomes per second, keyed by Unix second, counted by kind (the
    /// index into `kinds`).
    per_second: BTreeMap<u64, Vec<u64>>,
    /// Latencies of the rows' last attempts, keyed by Unix second.
    latency_per_second: BTreeMap<u64, Latencies>,
    /// Kinds of outcome: `succeeded`, `succeeded after retries`, then each
    /// error kind as first met.
    kinds: Vec<String>,
    latency: [u64; BUCKETS_MS.len()],
    /// Rows by final status and by error kind, and attempts, of the rows done.
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    attempts: u64,
    /// The run's events (`events.jsonl`), in the order read.
    events: Vec<Happened>,
    /// Each events file (its path from the page) and how many events it holds.
    event_files: Vec<(String, u64)>,
}

/// Latencies (µs), each kept to three significant digits (within 0.1%)
/// and counted: memory grows with the distinct values, not with the rows,
/// so a run of ten million rows is drawn from kilobytes a second. Sparse,
/// not the `hdrhistogram` the run's [`Stats`](super::Stats) keep: one of
/// those at three digits up to an hour holds 23,552 counters (188 KB), and
/// a long run has one of these a second.
#[derive(Debug, Default, Clone)]
struct Latencies {
    /// (value, how many), by value.
    counts: Vec<(u64, u64)>,
}

impl Latencies {
    /// `us` to three significant digits, rounded down.
    fn rounded(us: u64) -> u64 {
        let digits = us.checked_ilog10().unwrap_or(0) + 1;
        let unit = 10u64.pow(digits.saturating_sub(3));
        us / unit * unit
    }

    fn record(&mut self, us: u64, count: u64) {
        let us = Self::rounded(us);
        match self.counts.binary_search_by_key(&us, |&(value, _)| value) {
            Ok(at) => self.counts[at].1 += count,
            Err(at) => self.counts.insert(at, (us, count)),
        }
    }

    fn merge(&mut self, other: &Latencies) {
        for &(us, count) in &other.counts {
            self.record(us, count);
        }
    }

    fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|&(_, count)| count).sum()
    }

    /// The value at quantile `q`: the one a sorted list of every latency
    /// holds at `(n - 1) * q`, rounded.
    fn quantile(&self, q: f64) -> u64 {
        let rank = ((self.total().saturating_sub(1)) as f64 * q).round() as u64;
        let mut seen = 0;
        for &(us, count) in &self.counts {
            seen += count;
            if seen > rank {
                return us;
            }
        }
        self.counts.last().map_or(0, |&(us, _)| us)
    }
}

impl FromIterator<u64> for Latencies {
    fn from_iter<I: IntoIterator<Item = u64>>(values: I) -> Latencies {
        let mut latencies = Latencies::default();
        values.into_iter().for_each(|us| latencies.record(us, 1));
        latencies
    }
}

/// One line of `events.jsonl`.
#[derive(Debug, Clone, PartialEq)]
struct Happened {
    at_ms: u64,
    kind: String,
    /// Its other fields, as they are in the file.
    fields: serde_json::Map<String, Value>,
    /// After the time: the shard it happened in (` (shard 0/2)`), if any.
    label: String,
}

impl Happened {
    /// The kind's place in [`MARKS`], if the charts mark it.
    fn mark(&self) -> Option<usize> {
        MARKS.iter().position(|(kind, _, _)| *kind == self.kind)
    }

    /// The kind's name on the page.
    fn name(&self) -> String {
        match (self.mark(), self.kind.as_str()) {
            (Some(m), _) => MARKS[m].1.to_string(),
            (None, "start") if self.fields.get("resume") == Some(&Value::Bool(true)) => "resumed".into(),
            (None, "start") => "started".into(),
            (None, "end") => "ended".into(),
            (None, kind) => kind.replace('_', " "),
        }
    }

    /// What the event says besides its kind, in words.
    fn detail(&self) -> String {
        let f = |k: &str| match self.fields.get(k) {
            Some(Value::String(s)) => s.replace('_', " "),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        match self.kind.as_str() {
            "pause" if self.fields.get("shared") == Some(&Value::Bool(true)) => {
                format!("{} ms, set by another process of the run", f("ms"))
            }
            "pause" => format!("{} ms: no call went out", f("ms")),
            "slow_down" => format!("to {} calls/s after a wave of 429s", f("rate")),
            "rate_restored" => "back to the configured rate".into(),
            "token_refresh" => format!("{}, {}, lives {} s", f("how"), f("origin"), f("lifetime_s")),
            "token_refresh_failed" => format!("{}: {}", f("how"), f("error")),
            "redis_lost" | "redis_back" => format!("for the {}", f("part")),
            "breaker_open" => format!("{} calls failed in a row for {} ms", f("calls"), f("lasted_ms")),
            "abort" => format!("{}, exit {}", f("reason"), f("exit")),
            "end" => format!("exit {}", f("exit")),
            "start" | "stop" => String::new(),
            _ => (self.fields.iter().map(|(k, _)| format!("{k} {}", f(k))).collect::<Vec<_>>()).join(", "),
        }
    }
}

impl Timeline {
    /// The index of an outcome kind; the two kinds of success come first.
    fn kind(&mut self, name: &str) -> usize {
        if self.kinds.is_empty() {
            self.kinds = vec!["succeeded".into(), "succeeded after retries".into()];
        }
        match self.kinds.iter().position(|k| k == name) {
            Some(i) => i,
            None => {
                self.kinds.push(name.to_string());
                self.kinds.len() - 1
            }
        }
    }
}

fn read_timeline(dir: &Path) -> Timeline {
    let mut t = Timeline::default();
    add_timeline(&mut t, dir);
    add_events(&mut t, dir, "", "");
    t
}

/// Adds a run directory's `events.jsonl` to `t`; `prefix` is the
/// directory's path from the page, `label` goes after each event's time.
/// A line that cannot be read is skipped.
fn add_events(t: &mut Timeline, dir: &Path, prefix: &str, label: &str) {
    let Ok(file) = std::fs::File::open(dir.join(crate::events::EVENTS_FILE)) else { return };
    let mut count = 0;
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(&line) else { continue };
        let (Some(at_ms), Some(Value::String(kind))) =
            (fields.remove("at_ms").and_then(|v| v.as_u64()), fields.remove("kind"))
        else {
            continue;
        };
        t.events.push(Happened { at_ms, kind, fields, label: label.to_string() });
        count += 1;
    }
    t.event_files.push((format!("{prefix}{}", crate::events::EVENTS_FILE), count));
}

/// Adds a run directory's ledger to `t` (the shards of a run share one page).
fn add_timeline(t: &mut Timeline, dir: &Path) {
    // An unreadable ledger leaves the charts empty; the page is still worth having.
    let _ = Ledger::scan(dir, |mark| {
        let Mark::Done(_, _, done) = mark else { return };
        if let Some(status) = done.status {
            *t.statuses.entry(status.to_string()).or_default() += 1;
        }
        if let Some(error) = &done.error {
            *t.errors.entry(error.clone()).or_default() += 1;
        }
        t.attempts += u64::from(done.attempts);
        if done.at_ms > 0 {
            let kind = match &done.error {
                None if done.attempts > 1 => t.kind("succeeded after retries"),
                None => t.kind("succeeded"),
                Some(error) => t.kind(error),
            };
            let counts = t.per_second.entry(done.at_ms / 1000).or_default();
            if counts.len() <= kind {
                counts.resize(kind + 1, 0);
            }
            counts[kind] += 1;
            if done.attempts > 0 {
                t.latency_per_second.entry(done.at_ms / 1000).or_default().record(done.latency_us, 1);
            }
        }
        if done.attempts > 0 {
            let ms = done.latency_us as f64 / 1000.0;
            let bucket = BUCKETS_MS.iter().position(|(max, _)| ms < *max).unwrap_or(BUCKETS_MS.len() - 1);
            t.latency[bucket] += 1;
        }
    });
}

/// What the failures files hold: the first failures listed on the page,
/// every failure counted by its kind, and the files themselves.
#[derive(Default)]
struct Failures {
    /// Row, key, error, status, message of the first ones.
    first: Vec<[String; 5]>,
    /// Failures by error kind, status and message shape (digits as `#`).
    groups: BTreeMap<(String, String, String), u64>,
    /// Each failures file (its path from the page) and how many records it holds.
    files: Vec<(String, u64)>,
}

impl Failures {
    /// Adds a run directory's failures files; `prefix` is the directory's
    /// path from the page (`shard-0/`) and `label` goes after each row number.
    fn add(&mut self, dir: &Path, prefix: &str, label: &str) {
        // A failures CSV is written with its input's delimiter, which run.json records.
        let run = read_run_json(dir);
        let delimiter_of = |name: &str| {
            let recorded =
                run["inputs"].as_array().into_iter().flatten().find(|i| i["failures"].as_str() == Some(name));
            match recorded.and_then(|i| i["delimiter"].as_str()).and_then(|d| d.bytes().next()) {
                Some(d) => d,
                None if name.ends_with(".tsv") => b'\t',
                None => b',',
            }
        };
        let mut files: Vec<std::path::PathBuf> =
            std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        files.sort();
        for path in files {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !name.starts_with("failures") {
                continue;
            }
            let mut records = 0;
            if name.ends_with(".jsonl") {
                let Ok(file) = std::fs::File::open(&path) else { continue };
                for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
                    let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                    let text = |k: &str| match &v[k] {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    };
                    self.push([text("_row"), text("_key"), text("_error"), text("_status"), text("_message")], label);
                    records += 1;
                }
            } else if name.ends_with(".csv") || name.ends_with(".tsv") {
                let Ok(mut reader) = csv::ReaderBuilder::new().delimiter(delimiter_of(name)).from_path(&path) else {
                    continue;
                };
                let Ok(headers) = reader.headers().cloned() else { continue };
                let at = |k: &str| headers.iter().position(|h| h == k);
                let columns = ["_row", "_key", "_error", "_status", "_message"].map(at);
                for record in reader.records().flatten() {
                    self.push(columns.map(|c| c.and_then(|i| record.get(i)).unwrap_or("").to_string()), label);
                    records += 1;
                }
            } else {
                continue;
            }
            self.files.push((format!("{prefix}{name}"), records));
        }
    }

    fn push(&mut self, mut failure: [String; 5], label: &str) {
        let [_, _, error, status, message] = &failure;
        let key = (error.clone(), status.clone(), message_shape(message));
        if self.groups.len() < MAX_GROUPS || self.groups.contains_key(&key) {
            *self.groups.entry(key).or_default() += 1;
        } else {
            *self.groups.entry((String::new(), String::new(), "(other shapes)".into())).or_default() += 1;
        }
        if self.first.len() < LISTED_FAILURES {
            failure[0].push_str(label);
            self.first.push(failure);
        }
    }

    /// The groups, the largest first (ties in the order of kind, status, shape).
    fn largest_groups(&self) -> Vec<(&(String, String, String), u64)> {
        let mut groups: Vec<_> = self.groups.iter().map(|(k, n)| (k, *n)).collect();
        groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        groups.truncate(LISTED_GROUPS);
        groups
    }
}

/// A message with every run of digits written `#`, so failures that differ
/// only in a number (a row, a byte count, a port) fall in one group; long
/// messages are cut at 160 characters.
fn message_shape(message: &str) -> String {
    let mut shape = String::with_capacity(message.len().min(160));
    let mut chars = 0;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !shape.ends_with('#') {
                shape.push('#');
                chars += 1;
            }
        } else {
            shape.push(c);
            chars += 1;
        }
        if chars >= 160 {
            shape.push('…');
            break;
        }
    }
    shape
}

fn read_run_json(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// The settings and versions a run used, from its `run.json`.
fn settings_rows(run: &Value) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    if let Some(version) = run["version"].as_str() {
        rows.push(("bulkcall".to_string(), version.to_string()));
    }
    if let Some(job) = run["job"].as_str() {
        rows.push(("Job file".into(), job.to_string()));
    }
    if let Some(profile) = run["profile"].as_str() {
        rows.push(("Profile".into(), profile.to_string()));
    }
    let settings = &run["settings"];
    if let Some(url) = settings["base_url"].as_str() {
        rows.push(("Base URL".into(), url.to_string()));
    }
    match settings["rate"].as_f64() {
        Some(rate) if rate > 0.0 => {
            rows.push(("Rate".into(), format!("{rate} calls/s, burst {}", text(&settings["burst"]))));
        }
        Some(_) => rows.push(("Rate".into(), "unlimited".into())),
        None => {}
    }
    for (name, key) in [
        ("Concurrency", "concurrency"),
        ("Max attempts", "max_attempts"),
        ("Timeout", "timeout"),
        ("Retry budget", "retry_budget"),
        ("Outage after", "outage_after"),
    ] {
        if !settings[key].is_null() {
            rows.push((name.into(), text(&settings[key])));
        }
    }
    for input in run["inputs"].as_array().into_iter().flatten() {
        rows.push((
            "Input".into(),
            format!("{} ({}, {} bytes)", text(&input["path"]), text(&input["format"]), text(&input["size"])),
        ));
    }
    if let Some(limit) = run["limit"].as_u64() {
        rows.push(("Limit".into(), format!("first {limit} rows")));
    }
    if let Some(id) = run["run_id"].as_str() {
        rows.push(("Run id".into(), id.to_string()));
    }
    rows
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Colours of a chart's series: blues for rows that succeeded, then warm
/// colours for each kind of failure.
const PALETTE: [&str; 8] = ["#3b6fd8", "#8fb0ee", "#b3261e", "#e07b39", "#c9a227", "#7b3fa0", "#2f8f83", "#5a6270"];
/// Colours of the kinds of failure but `throttled`, which has its own.
const FAILURE_COLOURS: [&str; 6] = ["#b3261e", "#e07b39", "#c9a227", "#2f8f83", "#5a6270", "#a0522d"];

/// The colour of the outcome kind `name`, the `k`th of [`Timeline::kinds`]:
/// each kind keeps its colour whichever kinds a run met, and rows that
/// failed throttled (429 through every attempt) are always purple.
fn kind_colour(k: usize, name: &str) -> &'static str {
    match name {
        "succeeded" => PALETTE[0],
        "succeeded after retries" => PALETTE[1],
        "throttled" => "#7b3fa0",
        _ => FAILURE_COLOURS[k.saturating_sub(2) % FAILURE_COLOURS.len()],
    }
}

/// The time axis the two time charts share: from the first second with an
/// outcome or a marked event to the last, `width` seconds a place.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Axis {
    /// The first second, in Unix seconds.
    first: u64,
    width: u64,
    places: usize,
}

impl Axis {
    fn of(t: &Timeline) -> Option<Axis> {
        let marked = t.events.iter().filter(|e| e.mark().is_some()).map(|e| e.at_ms / 1000);
        let seconds = t.per_second.keys().chain(t.latency_per_second.keys()).copied().chain(marked);
        let (first, last) = seconds.fold((u64::MAX, 0), |(first, last), s| (first.min(s), last.max(s)));
        let seconds = last.checked_sub(first)? + 1;
        let width = seconds.div_ceil(MAX_BARS as u64).max(1);
        Some(Axis { first, width, places: seconds.div_ceil(width) as usize })
    }

    /// The place of a second on the axis, if it is on it.
    fn place(&self, second: u64) -> Option<usize> {
        let place = (second.checked_sub(self.first)? / self.width) as usize;
        (place < self.places).then_some(place)
    }
}

/// A marker on a time chart: the events of one kind (its place in
/// [`MARKS`]) in one place, with the tooltip that tells them.
#[derive(Debug, PartialEq)]
struct Marker {
    place: usize,
    kind: usize,
    title: String,
}

/// The markers of the run's events on `axis`.
fn marks(t: &Timeline, axis: &Axis) -> Vec<Marker> {
    let mut grouped: BTreeMap<(usize, usize), Vec<&Happened>> = BTreeMap::new();
    for event in &t.events {
        if let (Some(kind), Some(place)) = (event.mark(), axis.place(event.at_ms / 1000)) {
            grouped.entry((place, kind)).or_default().push(event);
        }
    }
    let at = |e: &Happened| (e.at_ms / 1000 - axis.first).to_string();
    (grouped.into_iter())
        .map(|((place, kind), events)| {
            let first = events[0];
            let title = match events.len() {
                1 => format!("{} s · {}: {}", at(first), MARKS[kind].1, first.detail()),
                n => format!("{} s · {} ×{n}, the first: {}", at(first), MARKS[kind].1, first.detail()),
            };
            Marker { place, kind, title: title.trim_end_matches([':', ' ']).to_string() }
        })
        .collect()
}

/// Draws each marker as a dashed line from `top` to `bottom` at the middle
/// of its place (markers of several kinds in one place side by side, 5 px
/// apart), under a small triangle, with its tooltip.
fn draw_marks(svg: &mut String, marks: &[Marker], pad: f64, step: f64, top: f64, bottom: f64) {
    for (i, m) in marks.iter().enumerate() {
        let (kind, _, colour) = MARKS[m.kind];
        let before = marks[..i].iter().rev().take_while(|o| o.place == m.place).count();
        let in_place = before + 1 + marks[i + 1..].iter().take_while(|o| o.place == m.place).count();
        let nudge = (before as f64 - (in_place - 1) as f64 / 2.0) * 5.0;
        let x = pad + (m.place as f64 + 0.5) * step + nudge;
        let _ = write!(
            svg,
            r#"<g class="mark {kind}"><title>{}</title><line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="{colour}" stroke-width="1.5" stroke-opacity="0.8" stroke-dasharray="4 3"/><line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{bottom}" stroke="transparent" stroke-width="9"/><path d="M{:.1},{} h9 l-4.5,7 z" fill="{colour}"/></g>"#,
            escape(&m.title),
            top - 7.0,
            x - 4.5,
            top - 7.0,
        );
    }
}

/// The legend of the kinds of marker a chart shows, four a row from `y`;
/// how tall it is.
fn marks_legend(svg: &mut String, marks: &[Marker], pad: f64, y: f64) -> f64 {
    let kinds: std::collections::BTreeSet<usize> = marks.iter().map(|m| m.kind).collect();
    for (i, kind) in kinds.iter().enumerate() {
        let (_, name, colour) = MARKS[*kind];
        let (x, y) = (pad + (i % 4) as f64 * 180.0, y + (i / 4) as f64 * 20.0);
        let _ = write!(
            svg,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="2" stroke-dasharray="4 2"/><text x="{}" y="{y}" class="axis">{}</text>"#,
            x + 5.0,
            y - 11.0,
            x + 5.0,
            x + 14.0,
            escape(name)
        );
    }
    20.0 * kinds.len().div_ceil(4) as f64
}

/// A bar chart in SVG: one bar per place, each series stacked on the ones
/// before it, labels under some bars, a legend when there are several
/// series, and the events' markers with theirs.
fn bars(
    series: &[(String, &str, Vec<u64>)],
    labels: &[String],
    every: usize,
    (title, unit): (&str, &str),
    marked: &[Marker],
) -> String {
    let (width, height, pad) = (760.0, 200.0, 30.0);
    let places = series.iter().map(|(_, _, v)| v.len()).max().unwrap_or(0);
    let total = |i: usize| series.iter().map(|(_, _, v)| v.get(i).copied().unwrap_or(0)).sum::<u64>();
    let max = (0..places).map(total).max().unwrap_or(0).max(1) as f64;
    let step = (width - pad) / places.max(1) as f64;
    let legend = if series.len() > 1 { 20.0 * series.len().div_ceil(4) as f64 } else { 0.0 };
    let mut svg = String::new();
    let _ = write!(svg, r#"<text x="0" y="12" class="axis">{} {}</text>"#, max as u64, escape(unit));
    let _ = write!(svg, r#"<line x1="{pad}" y1="{height}" x2="{width}" y2="{height}" class="base"/>"#);
    for i in 0..places {
        let x = pad + i as f64 * step;
        let label = escape(labels.get(i).map_or("", String::as_str));
        let mut top = height;
        for (name, colour, values) in series {
            let v = values.get(i).copied().unwrap_or(0);
            if v == 0 {
                continue;
            }
            let h = (v as f64 / max) * (height - 20.0);
            top -= h;
            let _ = write!(
                svg,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{label} · {}: {v}</title></rect>"#,
                (step * 0.85).max(0.5),
                colour,
                escape(name),
            );
        }
        if every > 0 && i % every == 0 {
            let _ = write!(svg, r#"<text x="{x:.1}" y="{}" class="axis">{label}</text>"#, height + 16.0);
        }
    }
    draw_marks(&mut svg, marked, pad, step, 20.0, height);
    if series.len() > 1 {
        for (k, (name, colour, _)) in series.iter().enumerate() {
            let (x, y) = (pad + (k % 4) as f64 * 180.0, height + 36.0 + (k / 4) as f64 * 20.0);
            let _ = write!(
                svg,
                r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{y}" class="axis">{}</text>"#,
                y - 9.0,
                colour,
                x + 14.0,
                escape(name)
            );
        }
    }
    let marks_height = marks_legend(&mut svg, marked, pad, height + 36.0 + legend);
    format!(
        r#"<svg role="img" aria-label="{}" viewBox="0 0 {width} {}" width="100%" xmlns="http://www.w3.org/2000/svg">{svg}</svg>"#,
        escape(title),
        height + 40.0 + legend + marks_height
    )
}

/// Outcomes per second over the run, stacked by kind (succeeded at once,
/// succeeded after retries, failed by error kind), with the events marked.
fn throughput_chart(t: &Timeline) -> String {
    let Some(axis) = Axis::of(t).filter(|_| !t.per_second.is_empty()) else {
        return "<p>No outcomes were recorded.</p>".into();
    };
    let mut series: Vec<(String, &str, Vec<u64>)> = (t.kinds.iter().enumerate())
        .map(|(k, name)| (name.clone(), kind_colour(k, name), vec![0u64; axis.places]))
        .collect();
    for (s, counts) in &t.per_second {
        let place = axis.place(*s).expect("every second is on the axis");
        for (kind, n) in counts.iter().enumerate() {
            series[kind].2[place] += n;
        }
    }
    for (_, _, values) in &mut series {
        values.iter_mut().for_each(|v| *v /= axis.width);
    }
    // A kind no bar shows would only crowd the legend.
    series.retain(|(_, _, values)| values.iter().any(|&v| v > 0));
    let labels: Vec<String> = (0..axis.places).map(|i| format!("{} s", i as u64 * axis.width)).collect();
    let every = (axis.places / 8).max(1);
    bars(&series, &labels, every, ("rows per second over the run, by outcome", "rows/s"), &marks(t, &axis))
}

/// p50, p90 and p99 of the latency over the run, one point per place of the
/// throughput chart, as lines, with the events marked.
fn latency_over_time(t: &Timeline) -> String {
    let Some(axis) = Axis::of(t).filter(|_| !t.latency_per_second.is_empty()) else {
        return String::new();
    };
    let mut places: Vec<Latencies> = vec![Latencies::default(); axis.places];
    for (s, latencies) in &t.latency_per_second {
        places[axis.place(*s).expect("every second is on the axis")].merge(latencies);
    }
    const QUANTILES: [(f64, &str, &str); 3] =
        [(0.5, "p50", "#3b6fd8"), (0.9, "p90", "#e07b39"), (0.99, "p99", "#b3261e")];
    let points: Vec<Option<[f64; 3]>> = places
        .iter()
        .map(|l| (!l.is_empty()).then(|| QUANTILES.map(|(q, _, _)| l.quantile(q) as f64 / 1000.0)))
        .collect();
    let max = points.iter().flatten().map(|p| p[2]).fold(0.0, f64::max).max(0.001);
    let (w, h, pad) = (760.0, 160.0, 30.0);
    let step = (w - pad) / points.len().max(1) as f64;
    let mut svg = String::new();
    let _ = write!(svg, r#"<text x="0" y="12" class="axis">{max:.1} ms</text>"#);
    let _ = write!(svg, r#"<line x1="{pad}" y1="{h}" x2="{w}" y2="{h}" class="base"/>"#);
    for (k, (_, name, colour)) in QUANTILES.iter().enumerate() {
        let line: Vec<String> = points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, p[k])))
            .map(|(i, ms)| format!("{:.1},{:.1}", pad + (i as f64 + 0.5) * step, h - ms / max * (h - 20.0)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"><title>{name}</title></polyline>"#,
            line.join(" ")
        );
        let x = pad + k as f64 * 90.0;
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}" class="axis">{name}</text>"#,
            h + 18.0,
            x + 14.0,
            h + 27.0
        );
    }
    let marked = marks(t, &axis);
    draw_marks(&mut svg, &marked, pad, step, 20.0, h);
    let marks_height = marks_legend(&mut svg, &marked, pad, h + 47.0);
    format!(
        r#"<svg role="img" aria-label="latency p50, p90, p99 over the run" viewBox="0 0 {w} {}" width="100%" xmlns="http://www.w3.org/2000/svg">{svg}</svg>"#,
        h + 40.0 + marks_height
    )
}

/// The run's events in the order they happened: when (UTC, and the second
/// on the charts), what, and what it said; the events files linked.
fn events_table(t: &Timeline) -> String {
    let mut html = String::new();
    if t.events.is_empty() {
        html.push_str(if t.event_files.is_empty() {
            "<p>No events file (a dry run, or a run by an earlier version).</p>"
        } else {
            "<p>None.</p>"
        });
    } else {
        let axis = Axis::of(t);
        let mut events: Vec<&Happened> = t.events.iter().collect();
        events.sort_by_key(|e| e.at_ms);
        // How many of each, in the order first met: a long run's many
        // pauses at a glance, before the first of them one by one.
        let mut counts: Vec<(String, usize)> = Vec::new();
        for e in &events {
            match counts.iter_mut().find(|(name, _)| *name == e.name()) {
                Some((_, n)) => *n += 1,
                None => counts.push((e.name(), 1)),
            }
        }
        let counts: Vec<String> = counts.iter().map(|(name, n)| format!("{name} {n}")).collect();
        let _ = write!(html, "<p>{} events: {}.</p>", events.len(), escape(&counts.join(", ")));
        html.push_str("<table><tr><th>Time (UTC)</th><th>On the charts</th><th>Event</th><th>Details</th></tr>");
        for e in events.iter().take(LISTED_EVENTS) {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_ms);
            let on_charts = match axis.filter(|a| a.place(e.at_ms / 1000).is_some()) {
                Some(a) => format!("{} s", e.at_ms / 1000 - a.first),
                None => "–".into(),
            };
            let swatch =
                e.mark().map(|m| format!(r#"<span style="color:{}">&#9660;</span> "#, MARKS[m].2)).unwrap_or_default();
            let _ = write!(
                html,
                "<tr><td>{}{}</td><td>{on_charts}</td><td>{swatch}{}</td><td>{}</td></tr>",
                humantime::format_rfc3339_seconds(at),
                escape(&e.label),
                escape(&e.name()),
                escape(&e.detail())
            );
        }
        html.push_str("</table>");
        if events.len() > LISTED_EVENTS {
            let _ = write!(html, "<p>… and {} more in the events files.</p>", events.len() - LISTED_EVENTS);
        }
    }
    for (path, count) in &t.event_files {
        let _ = write!(html, r#"<p><a href="{0}">{0}</a>: {count} events</p>"#, escape(path));
    }
    html
}

fn latency_chart(t: &Timeline) -> String {
    let labels: Vec<String> = BUCKETS_MS.iter().map(|(_, l)| l.to_string()).collect();
    bars(
        &[("rows".into(), PALETTE[0], t.latency.to_vec())],
        &labels,
        1,
        ("latency of each row's last attempt", "rows"),
        &[],
    )
}

/// The largest groups of failures: how many, error kind, status, message shape.
fn failure_groups(failures: &Failures) -> String {
    let groups = failures.largest_groups();
    if groups.is_empty() {
        return "<p>None.</p>".into();
    }
    let mut html = String::from("<table><tr><th>Rows</th><th>Error</th><th>Status</th><th>Message</th></tr>");
    for ((error, status, shape), n) in &groups {
        let _ = write!(
            html,
            r#"<tr><td>{n}</td><td>{}</td><td>{}</td><td class="msg">{}</td></tr>"#,
            escape(error),
            escape(status),
            escape(shape)
        );
    }
    html.push_str("</table>");
    if failures.groups.len() > groups.len() {
        let _ = write!(html, "<p>… and {} smaller groups.</p>", failures.groups.len() - groups.len());
    }
    html
}

fn table(rows: &[(String, String)]) -> String {
    let mut html = String::from("<table>");
    for (k, v) in rows {
        let _ = write!(html, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    html.push_str("</table>");
    html
}

/// What a page shows: one run directory's, or every shard's of a run.
struct Page {
    title: String,
    /// Where the files are, as an HTML fragment.
    location: String,
    ok: bool,
    outcome: String,
    overview: Vec<(String, String)>,
    /// The shards' table, as an HTML fragment (sharded runs only).
    shards: Option<String>,
    timeline: Timeline,
    statuses: Vec<(String, String)>,
    errors: Vec<(String, String)>,
    /// The settings and versions the run used.
    settings: Vec<(String, String)>,
    failures: Failures,
    failed: u64,
}

/// Builds the page from the run directory's files.
pub fn render(dir: &Path) -> Result<String, ReportError> {
    let summary_path = dir.join("summary.json");
    let text = std::fs::read_to_string(&summary_path).map_err(|_| ReportError::NoSummary(dir.to_path_buf()))?;
    let s: Summary = serde_json::from_str(&text)
        .map_err(|e| ReportError::Read { path: summary_path.clone(), message: e.to_string() })?;
    let run = read_run_json(dir);
    let job = run["job_name"].as_str().unwrap_or("dry run");
    let started = run["started_at"].as_str().unwrap_or("");

    let outcome = match s.exit_code {
        0 => "every row succeeded",
        1 => "finished; some rows failed",
        3 => "aborted: credentials rejected or calls refused with 401",
        4 => "aborted: --max-failures reached",
        74 => "aborted: the run directory could not be written",
        75 => "stopped, to go on later: `bulkcall resume` goes on",
        130 => "interrupted; `bulkcall resume` finishes it",
        _ => "ended",
    };
    let mut overview = vec![
        ("Rows".to_string(), s.total.to_string()),
        ("Succeeded".into(), s.succeeded.to_string()),
        ("Failed".into(), s.failed.to_string()),
        ("In doubt".into(), s.in_doubt.to_string()),
        ("Attempts".into(), format!("{} ({} retries)", s.attempts, s.retries)),
        ("Token requests".into(), s.token_requests.to_string()),
        ("Duration".into(), format!("{:.1} s", s.duration_s)),
        ("Rows per second".into(), format!("{:.1}", s.rows_per_s)),
        (
            "Latency".into(),
            format!(
                "p50 {} ms · p90 {} ms · p99 {} ms · max {} ms",
                s.latency_ms.p50, s.latency_ms.p90, s.latency_ms.p99, s.latency_ms.max
            ),
        ),
        ("Exit code".into(), format!("{} ({outcome})", s.exit_code)),
    ];
    if let Some(rate) = s.throttled_rate {
        overview.push(("Throttled down to".into(), format!("{rate} calls/s")));
    }
    if s.polls > 0 || s.pending > 0 {
        // Before the exit code: pending rows are why a run ends 75.
        let at = overview.len() - 1;
        overview.insert(at, ("Polls".into(), s.polls.to_string()));
        overview.insert(at, ("Pending (accepted, not final)".into(), s.pending.to_string()));
    }
    let started = if started.is_empty() { String::new() } else { format!(" · started {}", escape(started)) };
    Ok(page(Page {
        title: job.to_string(),
        location: format!("Run directory <code>{}</code>{started}", escape(&dir.display().to_string())),
        ok: s.exit_code == 0,
        outcome: outcome.to_string(),
        overview,
        shards: None,
        timeline: read_timeline(dir),
        statuses: s.statuses.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
        errors: s.errors.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
        settings: settings_rows(&run),
        failures: {
            let mut failures = Failures::default();
            failures.add(dir, "", "");
            failures
        },
        failed: s.failed,
    }))
}

/// Builds one page over every shard of a run: the rows and outcomes of all
/// their ledgers, a table of the shards, and which have not finished.
pub fn render_shards(run: &RunStatus) -> Result<String, ReportError> {
    let mut timeline = Timeline::default();
    let mut failures = Failures::default();
    let mut token_requests = 0;
    for shard in &run.shards {
        add_timeline(&mut timeline, &shard.dir);
        let label = shard.shard.map(|s| format!(" (shard {s})")).unwrap_or_default();
        let prefix = match shard.dir.strip_prefix(&run.path) {
            Ok(from_page) if !from_page.as_os_str().is_empty() => format!("{}/", from_page.display()),
            _ => String::new(),
        };
        add_events(&mut timeline, &shard.dir, &prefix, &label);
        failures.add(&shard.dir, &prefix, &label);
        token_requests += shard.summary.as_ref().map_or(0, |s| s.token_requests);
    }
    let (done, succeeded, failed, in_doubt) = run.total();
    let finished = run.shards.iter().filter(|s| s.state.finished()).count();
    let unfinished: Vec<String> =
        run.shards.iter().filter(|s| !s.state.finished()).filter_map(|s| s.shard).map(|s| s.to_string()).collect();
    let outcome = match (unfinished.is_empty(), failed) {
        (true, 0) => "every shard finished; every row succeeded".to_string(),
        (true, _) => "every shard finished; some rows failed".to_string(),
        (false, _) => {
            format!("{finished} of {} shards finished; not finished: {}", run.shards.len(), unfinished.join(", "))
        }
    };
    let span = match (timeline.per_second.keys().next(), timeline.per_second.keys().next_back()) {
        (Some(first), Some(last)) => last - first + 1,
        _ => 0,
    };
    let mut overview = vec![
        ("Shards".to_string(), format!("{finished} of {} finished", run.shards.len())),
        ("Rows done".into(), done.to_string()),
        ("Succeeded".into(), succeeded.to_string()),
        ("Failed".into(), failed.to_string()),
        ("In doubt".into(), in_doubt.to_string()),
        ("Attempts".into(), timeline.attempts.to_string()),
        ("Token requests".into(), token_requests.to_string()),
        ("First to last outcome".into(), format!("{span} s")),
    ];
    if span > 0 {
        overview.push(("Rows per second".into(), format!("{:.1}", done as f64 / span as f64)));
    }
    let mut shards = String::from(
        "<table><tr><th>Shard</th><th>State</th><th>Done</th><th>Succeeded</th><th>Failed</th><th>In doubt</th>\
         <th>Latency p50 / p99</th><th>Report</th></tr>",
    );
    for s in &run.shards {
        let name = s.shard.map_or_else(|| "-".to_string(), |s| s.to_string());
        let latency = s
            .summary
            .as_ref()
            .map_or_else(|| "–".to_string(), |s| format!("{} / {} ms", s.latency_ms.p50, s.latency_ms.p99));
        let link = match (s.shard, s.dir.join("report.html").exists()) {
            (Some(shard), true) => format!(r#"<a href="{0}/report.html">{0}</a>"#, shard.dir_name()),
            _ => String::new(),
        };
        let _ = write!(
            shards,
            r#"<tr><td>{}</td><td class="{}">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{link}</td></tr>"#,
            escape(&name),
            if s.state.finished() { "ok" } else { "bad" },
            escape(&s.state.describe()),
            s.done,
            s.succeeded,
            s.failed,
            s.in_doubt,
            escape(&latency),
        );
    }
    shards.push_str("</table>");
    let id = run.run_id.as_deref().map(|id| format!("Run <code>{}</code> · ", escape(id))).unwrap_or_default();
    let pairs = |map: &BTreeMap<String, u64>| map.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
    Ok(page(Page {
        title: run.job.clone().unwrap_or_else(|| "run".into()),
        location: format!(
            "{id}{} shards in <code>{}</code>",
            run.shards.len(),
            escape(&run.path.display().to_string())
        ),
        ok: unfinished.is_empty() && failed == 0,
        outcome,
        overview,
        shards: Some(shards),
        statuses: pairs(&timeline.statuses),
        errors: pairs(&timeline.errors),
        timeline,
        settings: run.shards.first().map(|s| settings_rows(&read_run_json(&s.dir))).unwrap_or_default(),
        failures,
        failed,
    }))
}

fn page(p: Page) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bulkcall · {job}</title>
<style>
body {{ font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 820px; padding: 0 1rem; color: #1d2330; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }} h2 {{ font-size: 1.1rem; margin-top: 2rem; border-bottom: 1px solid #dde; }}
.sub {{ color: #5a6270; margin-top: 0; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: .2rem .8rem .2rem 0; vertical-align: top; }}
th {{ font-weight: 600; color: #3a4250; }} td.msg {{ font-family: ui-monospace, monospace; font-size: 13px; word-break: break-word; }}
.base {{ stroke: #99a; }} .axis {{ font-size: 11px; fill: #5a6270; }}
.ok {{ color: #1b7f3a; }} .bad {{ color: #b3261e; }}
</style></head><body>
<h1>{job}</h1>
<p class="sub">{location}</p>
<p class="{class}"><strong>{outcome}</strong></p>
<h2>Summary</h2>{overview}{shards}
<h2>Throughput</h2>{throughput}
<h2>Latency</h2>{latency}
<h2>Events</h2>{events}
<h2>Statuses</h2>{statuses}
<h2>Errors</h2>{errors}
<h2>Failures by kind</h2>{groups}
<h2>First failures</h2>"#,
        job = escape(&p.title),
        location = p.location,
        class = if p.ok { "ok" } else { "bad" },
        outcome = escape(&p.outcome),
        overview = table(&p.overview),
        shards = p.shards.map(|t| format!("\n<h2>Shards</h2>{t}")).unwrap_or_default(),
        throughput = throughput_chart(&p.timeline),
        latency = latency_over_time(&p.timeline) + &latency_chart(&p.timeline),
        events = events_table(&p.timeline),
        statuses = if p.statuses.is_empty() { "<p>None.</p>".into() } else { table(&p.statuses) },
        errors = if p.errors.is_empty() { "<p>None.</p>".into() } else { table(&p.errors) },
        groups = failure_groups(&p.failures),
    );
    if p.failures.first.is_empty() {
        html.push_str("<p>None.</p>");
    } else {
        html.push_str("<table><tr><th>Row</th><th>Key</th><th>Error</th><th>Status</th><th>Message</th></tr>");
        for [row, key, error, status, message] in &p.failures.first {
            let _ = write!(
                html,
                r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="msg">{}</td></tr>"#,
                escape(row),
                escape(key),
                escape(error),
                escape(status),
                escape(message)
            );
        }
        html.push_str("</table>");
        if p.failed as usize > p.failures.first.len() {
            let more = p.failed as usize - p.failures.first.len();
            let _ = write!(html, "<p>… and {more} more in the failures files.</p>");
        }
    }
    if !p.failures.files.is_empty() {
        html.push_str("\n<h2>Failures files</h2><ul>");
        for (path, records) in &p.failures.files {
            let _ = write!(html, r#"<li><a href="{0}">{0}</a>: {records} records</li>"#, escape(path));
        }
        html.push_str("</ul>");
    }
    let _ = write!(html, "\n<h2>Settings</h2>{}", table(&p.settings));
    html.push_str("\n</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_read_with_the_delimiter_run_json_records() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("run.json"),
            r#"{"inputs":[{"failures":"failures.csv","delimiter":";"},{"failures":"failures.b.csv","delimiter":"\t"}]}"#,
        )
        .unwrap();
        let header = ["id", "_row", "_key", "_error", "_status", "_attempts", "_message"];
        for (name, d) in [("failures.csv", ";"), ("failures.b.csv", "\t")] {
            let row = ["7", "3", "k7", "http_4xx", "422", "1", "no"];
            std::fs::write(dir.path().join(name), format!("{}\n{}\n", header.join(d), row.join(d))).unwrap();
        }
        let row = ["3", "k7", "http_4xx", "422", "no"].map(String::from);
        let mut failures = Failures::default();
        failures.add(dir.path(), "", "");
        assert_eq!(failures.first, [row.clone(), row]);
        assert_eq!(failures.files, [("failures.b.csv".to_string(), 1), ("failures.csv".to_string(), 1)]);
    }

    #[test]
    fn the_throughput_chart_stacks_outcomes_by_kind() {
        let mut t = Timeline::default();
        let (ok, retried, refused) = (t.kind("succeeded"), t.kind("succeeded after retries"), t.kind("client_error"));
        let mut counts = vec![0; 3];
        (counts[ok], counts[retried], counts[refused]) = (5, 2, 3);
        t.per_second.insert(1_000_000, counts);
        let svg = throughput_chart(&t);
        for title in ["0 s · succeeded: 5", "0 s · succeeded after retries: 2", "0 s · client_error: 3"] {
            assert!(svg.contains(title), "a layer {title} in {svg}");
        }
        assert!(svg.contains("10 rows/s"), "the scale is the stack's height: {svg}");
        assert!(svg.contains(">client_error</text>"), "the legend names each kind");
    }

    #[test]
    fn latency_over_time_draws_the_percentiles_of_each_second() {
        let mut t = Timeline::default();
        // Second 0: 1..=100 ms; second 1: 10x slower.
        t.latency_per_second.insert(1_000_000, (1..=100).map(|ms| ms * 1000).collect());
        t.latency_per_second.insert(1_000_001, (1..=100).map(|ms| ms * 10_000).collect());
        let svg = latency_over_time(&t);
        assert_eq!(svg.matches("<polyline").count(), 3, "p50, p90, p99");
        assert!(svg.contains(">990.0 ms</text>"), "the scale is the slowest p99 (990 ms): {svg}");
        // p99 of the second second is at the top (y = 20), p50 of the first near the base.
        assert!(svg.contains("577.5,20.0\"><title>p99"), "{svg}");
    }

    #[test]
    fn latencies_are_counted_to_three_significant_digits() {
        assert_eq!([7, 999, 1_000, 12_345, 987_654_321].map(Latencies::rounded), [7, 999, 1_000, 12_300, 987_000_000]);
        // A second's quantiles as a sorted list of its latencies gives them.
        let mut l: Latencies = [5_000, 1_000, 3_000, 2_000, 4_000].into_iter().collect();
        assert_eq!([0.0, 0.5, 0.9, 1.0].map(|q| l.quantile(q)), [1_000, 3_000, 5_000, 5_000]);
        l.merge(&[1_000; 5].into_iter().collect());
        assert_eq!((l.total(), l.counts.len(), l.quantile(0.5)), (10, 5, 1_000));
        // A million rows of a few distinct latencies hold a few places.
        let many: Latencies = (0..1_000_000u64).map(|i| 10_000 + i % 50).collect();
        assert_eq!((many.total(), many.counts.len()), (1_000_000, 1));
    }

    #[test]
    fn failures_differing_only_in_numbers_fall_in_one_group() {
        let mut failures = Failures::default();
        for (row, message) in [
            ("1", "body of 1024 bytes at row 1"),
            ("2", "body of 99 bytes at row 2"),
            ("3", "connection refused by 127.0.0.1:80"),
            ("4", "body of 7 bytes at row 4"),
        ] {
            failures.push([row, "k", "client_error", "400", message].map(String::from), "");
        }
        let groups = failures.largest_groups();
        let shape = |g: &(&(String, String, String), u64)| (g.0.2.clone(), g.1);
        assert_eq!(
            groups.iter().map(shape).collect::<Vec<_>>(),
            [("body of # bytes at row #".to_string(), 3), ("connection refused by #.#.#.#:#".to_string(), 1)]
        );
        assert_eq!(message_shape(&"x".repeat(500)).chars().count(), 161, "a long message is cut");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape(r#"<script>alert("x")</script>&"#), "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;");
    }

    fn happened(at_ms: u64, line: &str) -> Happened {
        let Value::Object(mut fields) = serde_json::from_str(line).unwrap() else { panic!("an object") };
        let Some(Value::String(kind)) = fields.remove("kind") else { panic!("a kind") };
        Happened { at_ms, kind, fields, label: String::new() }
    }

    /// Ten seconds of outcomes from Unix second 1,000,000, 5 succeeded and
    /// their latencies each second, and `events`.
    fn ten_seconds(events: Vec<Happened>) -> Timeline {
        let mut t = Timeline::default();
        let ok = t.kind("succeeded");
        for s in 0..10 {
            t.per_second.insert(1_000_000 + s, vec![5; ok + 1]);
            t.latency_per_second.insert(1_000_000 + s, std::iter::repeat_n(2_000, 5).collect());
        }
        t.events = events;
        t
    }

    #[test]
    fn each_event_is_a_marker_at_its_second_on_both_time_charts() {
        let t = ten_seconds(vec![
            happened(1_000_000_000, r#"{"kind":"start","resume":false}"#),
            happened(1_000_003_400, r#"{"kind":"pause","ms":2000,"shared":false}"#),
            happened(1_000_007_100, r#"{"kind":"token_refresh","how":"background","origin":"fetched","lifetime_s":2}"#),
            happened(1_000_009_900, r#"{"kind":"end","exit":0}"#),
        ]);
        for svg in [throughput_chart(&t), latency_over_time(&t)] {
            // Ten places 73 px wide from x = 30: second 3's middle is 285.5.
            assert_eq!(svg.matches(r#"<g class="mark pause">"#).count(), 1, "{svg}");
            assert!(
                svg.contains(r#"<title>3 s · Retry-After pause: 2000 ms: no call went out</title><line x1="285.5""#),
                "{svg}"
            );
            assert!(svg.contains("<title>7 s · token refreshed: background, fetched, lives 2 s</title>"), "{svg}");
            assert_eq!(svg.matches("<g class=\"mark").count(), 2, "start and end are listed, not marked");
            for name in [">Retry-After pause</text>", ">token refreshed</text>"] {
                assert_eq!(svg.matches(name).count(), 1, "one legend entry per kind of marker: {name}");
            }
        }
        assert!(!latency_chart(&t).contains("mark"), "the histogram has no time axis");

        let table = events_table(&t);
        assert!(
            table.contains("<p>4 events: started 1, Retry-After pause 1, token refreshed 1, ended 1.</p>"),
            "{table}"
        );
        assert_eq!(table.matches("<tr>").count(), 5, "a header and the four events: {table}");
        assert!(
            table.contains("<td>1970-01-12T13:46:43Z</td><td>3 s</td>"),
            "the time and the second on the charts: {table}"
        );
        for text in ["started", "Retry-After pause", "2000 ms: no call went out", "ended", "exit 0"] {
            assert!(table.contains(text), "{text} in {table}");
        }
    }

    #[test]
    fn events_of_one_kind_in_one_place_are_one_marker_and_the_axis_reaches_every_event() {
        // Three pauses in second 2; a stop a second after the last outcome.
        let mut events: Vec<Happened> =
            (0..3).map(|i| happened(1_000_002_000 + i * 100, r#"{"kind":"pause","ms":1000,"shared":false}"#)).collect();
        events.push(happened(1_000_010_500, r#"{"kind":"stop"}"#));
        let t = ten_seconds(events);
        let svg = throughput_chart(&t);
        assert_eq!(svg.matches(r#"<g class="mark pause">"#).count(), 1, "{svg}");
        assert!(svg.contains("2 s · Retry-After pause ×3, the first: 1000 ms"), "{svg}");
        assert!(svg.contains("<title>10 s · stopped</title>"), "an event after the last outcome is on the axis: {svg}");
        assert_eq!(Axis::of(&t), Some(Axis { first: 1_000_000, width: 1, places: 11 }));
    }

    #[test]
    fn rows_that_failed_throttled_have_a_colour_of_their_own() {
        let mut t = Timeline::default();
        let (refused, throttled) = (t.kind("client_error"), t.kind("throttled"));
        let mut counts = vec![0; throttled + 1];
        (counts[refused], counts[throttled]) = (1, 1);
        t.per_second.insert(1_000_000, counts);
        let svg = throughput_chart(&t);
        assert!(svg.contains(r##"fill="#7b3fa0"><title>0 s · throttled: 1</title>"##), "{svg}");
        assert!(!svg.contains(r##"fill="#7b3fa0"><title>0 s · client_error"##));
        assert_eq!(kind_colour(9, "throttled"), kind_colour(2, "throttled"), "whichever place it was met in");
    }

    #[test]
    fn the_events_file_is_read_line_by_line_and_a_bad_line_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("events.jsonl"),
            "{\"at_ms\":1000000001000,\"kind\":\"slow_down\",\"rate\":35.5}\nnot json\n{\"kind\":\"no time\"}\n{\"at_ms\":1000000002000,\"kind\":\"rate_restored\"}\n",
        )
        .unwrap();
        let t = read_timeline(dir.path());
        let kinds: Vec<&str> = t.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["slow_down", "rate_restored"]);
        assert_eq!(t.events[0].detail(), "to 35.5 calls/s after a wave of 429s");
        assert_eq!(t.event_files, [("events.jsonl".to_string(), 2)]);
        assert!(events_table(&t).contains(r#"<a href="events.jsonl">events.jsonl</a>: 2 events"#));
        let none = read_timeline(&dir.path().join("elsewhere"));
        assert!(events_table(&none).contains("No events file"));
    }

    #[test]
    fn the_throughput_chart_folds_long_runs() {
        let mut t = Timeline::default();
        for s in 0..1000u64 {
            let succeeded = t.kind("succeeded");
            let mut counts = vec![0; succeeded + 1];
            counts[succeeded] = 10;
            t.per_second.insert(1_000_000 + s, counts);
        }
        let svg = throughput_chart(&t);
        assert!(svg.matches("<rect").count() <= MAX_BARS);
        assert!(svg.contains("10 rows/s"), "the scale says the pace: {svg:.300}");
    }
}
