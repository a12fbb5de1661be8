//! When calls were let through by the sender's rate limiter and when they
//! arrived at the gateway, on one clock: the host's monotonic clock, which
//! every process on the host shares. The limiter is judged on its own
//! times; the gateway's arrival times add the hop: the sandbox stamps a
//! call (HTTP/1.1, on Linux) with the kernel's receive time of its bytes,
//! so a stall of its own runtime does not move them.

use std::time::Duration;

use bulkcall::sandbox::{RecordedCall, Sandbox};

/// `RUST_LOG` for a child whose let-through times are wanted: its usual
/// lines, and one `call let through at_ns=…` line per call.
pub const PACE_LOG: &str = "info,bulkcall::pace=trace";

/// The let-through times (monotonic ns) a child logged on stderr under
/// [`PACE_LOG`].
pub fn let_through_times(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|line| line.contains("call let through"))
        .map(|line| {
            let at = line.split("at_ns=").nth(1).unwrap_or_else(|| panic!("no at_ns in {line}"));
            at.trim().parse().unwrap_or_else(|e| panic!("at_ns in {line}: {e}"))
        })
        .collect()
}

/// How many slots a child gave up because its call woke too late.
pub fn slots_given_up(stderr: &str) -> usize {
    stderr.matches("slot given up").count()
}

/// How many slots of the shared schedule lapsed unleased, as a child's
/// Redis limiter found them (fractions of a slot included).
pub fn slots_lapsed(stderr: &str) -> f64 {
    stderr
        .lines()
        .filter(|line| line.contains("shared schedule lapsed"))
        .map(|line| {
            let slots = line.split("slots=").nth(1).unwrap_or_else(|| panic!("no slots in {line}"));
            slots.split_whitespace().next().unwrap().parse::<f64>().unwrap_or_else(|e| panic!("slots in {line}: {e}"))
        })
        .sum::<f64>()
        // An empty sum is -0.0.
        + 0.0
}

/// The child's stderr without the per-call lines, for an assertion message.
pub fn without_pace_lines(stderr: &str) -> String {
    stderr.lines().filter(|l| !l.contains("bulkcall::pace") && !l.contains("at_ns=")).collect::<Vec<_>>().join("\n")
}

/// A recorded call's arrival on the monotonic clock, in ns.
pub fn arrival_ns(sandbox: &Sandbox, call: &RecordedCall) -> u64 {
    bulkcall::limiter::monotonic_ns_at(sandbox.started()) + call.at.as_nanos() as u64
}

/// The most times (ns, sorted) in any window of `window`, and where that
/// window starts.
pub fn busiest(times: &[u64], window: Duration) -> (usize, u64) {
    let window = window.as_nanos() as u64;
    let (mut most, mut from, mut start) = (0, times.first().copied().unwrap_or(0), 0);
    for (end, t) in times.iter().enumerate() {
        while *t - times[start] >= window {
            start += 1;
        }
        if end - start + 1 > most {
            most = end - start + 1;
            from = times[start];
        }
    }
    (most, from)
}

/// The most times (ns, sorted) in any one-second window.
pub fn busiest_second(times: &[u64]) -> usize {
    busiest(times, Duration::from_secs(1)).0
}

/// The times (ns, sorted) in `[from, from + window)`.
pub fn within(times: &[u64], from: u64, window: Duration) -> usize {
    let to = from + window.as_nanos() as u64;
    times.partition_point(|&t| t < to) - times.partition_point(|&t| t < from)
}

/// Calls per second from the first time to the last, the first `burst`
/// (which go at once) not counted.
pub fn achieved_rate(times: &[u64], burst: usize) -> f64 {
    let span = (times[times.len() - 1] - times[0]) as f64 / 1e9;
    (times.len() - burst) as f64 / span
}
