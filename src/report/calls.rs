//! Every API answer by status and every call's duration: the live counters
//! the workers bump without a lock, read by `metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::HistogramOpts;

/// The upper bounds of `bulkcall_request_duration_seconds`, in seconds.
const DURATION_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Every API answer by status, and how long every call took: bumped by the
/// workers after each attempt (the token endpoint's answers are not counted).
pub struct Calls {
    /// Answers by status code, 100 to 599 (index `code - 100`).
    by_status: Box<[AtomicU64]>,
    pub(crate) duration: prometheus::Histogram,
}

impl Default for Calls {
    fn default() -> Calls {
        let opts =
            HistogramOpts::new("bulkcall_request_duration_seconds", "How long each API call took, every attempt")
                .buckets(DURATION_BUCKETS.to_vec());
        Calls {
            by_status: (100..600).map(|_| AtomicU64::new(0)).collect(),
            duration: prometheus::Histogram::with_opts(opts).expect("valid histogram options"),
        }
    }
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls").field("count", &self.duration.get_sample_count()).finish_non_exhaustive()
    }
}

impl Calls {
    /// An attempt that went out: its status, if it was answered, and how long it took.
    pub fn record(&self, status: Option<u16>, took: Duration) {
        if let Some(counter) = status.and_then(|s| self.by_status.get(usize::from(s).wrapping_sub(100))) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.duration.observe(took.as_secs_f64());
    }

    pub(crate) fn answers(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        let counts = self.by_status.iter().map(|c| c.load(Ordering::Relaxed));
        (100u16..).zip(counts).filter(|&(_, n)| n > 0)
    }
}
