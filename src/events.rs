//! The run's events: what happened to the run as a whole, as it happened
//! (a `Retry-After` pause, the adaptive rate lowered, a token refreshed,
//! Redis lost, the circuit breaker opening, a stop), for `events.jsonl`
//! and the markers of `report.html`.
//!
//! A leaf: the limiter, the token and the runner emit through an
//! [`Events`] handle (cheap to clone); `output::EventsFile` is the [`Sink`]
//! that writes them into the run directory. An [`Event`] holds numbers and
//! fixed words only (`&'static str`), never a token, a secret, a URL, a row
//! value or a server's answer, so no event can carry one to the file.
//!
//! Events are rare: a handful a run. Nothing emits one per call: a caller
//! that meets the same thing on every call (every 429 of a pause) emits
//! only when it changes (the pause starts).

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

/// The file the events go to, in the run directory.
pub const EVENTS_FILE: &str = "events.jsonl";

/// Events held until a sink is attached (emitted before the run directory
/// existed); more are dropped.
const PENDING: usize = 32;

/// One thing that happened to the run; `kind` in the file.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind")]
pub enum Event {
    /// A session of the run began; `resume` when it continues an earlier one.
    #[serde(rename = "start")]
    Started { resume: bool },
    /// A `Retry-After` paused every call for `ms`: one event per pause (a
    /// 429 that comes while a pause is on lengthens it and adds none);
    /// `shared` when another process of the run set it (through Redis).
    #[serde(rename = "pause")]
    Pause { ms: u64, shared: bool },
    /// A wave of 429s lowered the sending rate, to `rate` calls/s.
    #[serde(rename = "slow_down")]
    SlowDown { rate: f64 },
    /// The server was calm long enough: the rate is the configured one again.
    #[serde(rename = "rate_restored")]
    RateRestored,
    /// A new token. `how`: `background` (in its advisory window; calls went
    /// on with the old one), `waiting` (calls waited for it), `after_401`
    /// (the token was refused); `origin`: `fetched`, `cache` or `shared`.
    #[serde(rename = "token_refresh")]
    TokenRefresh { how: &'static str, origin: &'static str, lifetime_s: u64 },
    /// A token refresh failed; `error` is the kind of failure
    /// (`unavailable`, `rejected`, …).
    #[serde(rename = "token_refresh_failed")]
    TokenRefreshFailed { how: &'static str, error: &'static str },
    /// Redis is out of reach for `part`: `limiter` (this process goes on
    /// alone at its share of the rate) or `token` (it fetches its own).
    #[serde(rename = "redis_lost")]
    RedisLost { part: &'static str },
    /// Redis answers again for `part`.
    #[serde(rename = "redis_back")]
    RedisBack { part: &'static str },
    /// The circuit breaker opened: `calls` failed in a row for `lasted_ms`.
    #[serde(rename = "breaker_open")]
    BreakerOpen { calls: u64, lasted_ms: u64 },
    /// The run stopped taking rows because of `reason`, to exit with `exit`.
    #[serde(rename = "abort")]
    Abort { reason: &'static str, exit: u8 },
    /// A signal stopped the run: no new rows; calls in flight may finish.
    #[serde(rename = "stop")]
    Stop,
    /// The session ended with `exit`.
    #[serde(rename = "end")]
    End { exit: u8 },
}

/// One line of the file: the moment, then the event.
#[derive(Serialize)]
struct Line<'a> {
    at_ms: u64,
    #[serde(flatten)]
    event: &'a Event,
}

/// Where events are written: one call per event, each with its whole line
/// (a JSON object and its newline).
pub trait Sink: Send {
    fn write_line(&mut self, line: &[u8]);
}

/// The handle every part of a run emits through; cheap to clone. Until a
/// sink is attached, the first [`PENDING`] events are held for it.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    sink: Option<Box<dyn Sink>>,
    pending: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Events {
    /// Writes `event`, stamped now.
    pub fn emit(&self, event: Event) {
        self.emit_at(now_ms(), event);
    }

    /// Writes `event`, stamped `at_ms` (ms since the Unix epoch).
    pub fn emit_at(&self, at_ms: u64, event: Event) {
        let mut line = serde_json::to_vec(&Line { at_ms, event: &event }).expect("an event serializes");
        line.push(b'\n');
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let State { sink, pending } = &mut *state;
        match sink {
            Some(sink) => sink.write_line(&line),
            None if pending.len() < PENDING => pending.push(line),
            None => {}
        }
    }

    /// Events go to `sink` from now on, the ones held first.
    pub fn attach(&self, mut sink: Box<dyn Sink>) {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for line in std::mem::take(&mut state.pending) {
            sink.write_line(&line);
        }
        state.sink = Some(sink);
    }

    /// The sink is closed: later events are dropped (a background token
    /// refresh that ends after the run).
    pub fn detach(&self) {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        state.sink = Some(Box::new(Discard));
    }
}

struct Discard;

impl Sink for Discard {
    fn write_line(&mut self, _: &[u8]) {}
}

/// Keeps every line in memory: for tests.
#[derive(Clone, Default)]
pub struct Memory(pub Arc<Mutex<Vec<serde_json::Value>>>);

impl Sink for Memory {
    fn write_line(&mut self, line: &[u8]) {
        let value = serde_json::from_slice(line).expect("a JSON line");
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(value);
    }
}

impl Memory {
    /// A handle writing into a new memory sink, and the sink.
    pub fn events() -> (Events, Memory) {
        let (events, memory) = (Events::default(), Memory::default());
        events.attach(Box::new(memory.clone()));
        (events, memory)
    }

    /// The `kind` of each event so far.
    pub fn kinds(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|l| l["kind"].as_str().unwrap_or("").to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_the_moment_the_kind_and_the_fields() {
        let (events, memory) = Memory::events();
        events.emit_at(1_700_000_000_123, Event::Pause { ms: 1000, shared: false });
        events.emit_at(1_700_000_000_456, Event::Stop);
        let lines = memory.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            [
                serde_json::json!({"at_ms": 1_700_000_000_123u64, "kind": "pause", "ms": 1000, "shared": false}),
                serde_json::json!({"at_ms": 1_700_000_000_456u64, "kind": "stop"}),
            ]
        );
    }

    #[test]
    fn events_before_the_sink_are_held_for_it_and_after_the_end_dropped() {
        let events = Events::default();
        for _ in 0..PENDING + 5 {
            events.emit(Event::RateRestored);
        }
        let memory = Memory::default();
        events.attach(Box::new(memory.clone()));
        assert_eq!(memory.kinds().len(), PENDING, "the first ones held, the rest dropped");
        events.emit(Event::End { exit: 0 });
        events.detach();
        events.emit(Event::Stop);
        assert_eq!(memory.kinds().last().map(String::as_str), Some("end"));
        assert_eq!(memory.kinds().len(), PENDING + 1);
    }
}
