//! The circuit breaker: an outage of the gateway is not a run with failures.
//!
//! An attempt that fails at the transport level (connection refused, DNS,
//! the TLS handshake, a timeout, a connection lost) or is answered 502, 503
//! or 504 without `Retry-After` is an outage attempt; any other answer, a
//! success, a 4xx or a 503 that says when to come back, shows the gateway
//! is there and ends the streak. When attempts of at least two rows have
//! failed that way for `outage_after` with no other answer in between, the
//! breaker opens: the run takes no more rows and stops with exit 75, try
//! again later. (One row alone failing is that row's failure: a row the
//! gateway always times out on must not stop every run that meets it.)
//!
//! A row whose last attempt was an outage attempt is not recorded as failed
//! while a streak lasts: it is held until the streak ends (another row got
//! an answer: the failure is the row's own, recorded) or the breaker opens
//! (the row is released to `resume`, as a stopped run's rows are: sent
//! again if the gateway provably did not act on it, else in doubt).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::outcome::{Outage, Verdict};

/// Whether an attempt's verdict says the gateway could not be reached or
/// answered for (a proxy's 502, 503 or 504).
pub(super) fn is_outage(verdict: &Verdict) -> bool {
    match verdict {
        Verdict::NotSent(_) | Verdict::NoAnswer(_) => true,
        // A 5xx with Retry-After is the gateway saying when: the pool pauses.
        Verdict::Answer { status, after, .. } => matches!(status, 502..=504) && after.is_none(),
        Verdict::Done | Verdict::Unauthorized | Verdict::Permanent(_) => false,
    }
}

/// What becomes of a row whose last attempt was an outage attempt.
pub(super) enum Hold {
    /// The gateway answered another call meanwhile: the failure is the row's own.
    Record,
    /// The breaker opened, or the run stopped: the row stays to resume.
    Release,
    /// This row's wait opened the breaker: stop the run with this.
    Opened(Outage),
}

#[derive(Default)]
struct Streak {
    /// The first outage attempt since the last other answer.
    since: Option<Instant>,
    calls: u64,
    /// The first row that failed in the streak, and whether another did.
    first_row: Option<(usize, u64)>,
    rows_more_than_one: bool,
    origin: String,
    last: String,
    open: bool,
}

impl Streak {
    fn count(&mut self, row: (usize, u64)) {
        match self.first_row {
            None => self.first_row = Some(row),
            Some(first) if first != row => self.rows_more_than_one = true,
            Some(_) => {}
        }
    }

    fn outage(&self, now: Instant) -> Outage {
        let lasted = self.since.map_or(Duration::ZERO, |s| now - s);
        // Whole seconds read better ("30s", not "30s 2ms 113us").
        let lasted = if lasted < Duration::from_secs(1) {
            Duration::from_millis(lasted.as_millis() as u64)
        } else {
            Duration::from_secs(lasted.as_secs())
        };
        Outage { origin: self.origin.clone(), lasted, calls: self.calls, last: self.last.clone() }
    }
}

pub(super) struct Breaker {
    /// How long calls may fail with no other answer; zero: never opens.
    window: Duration,
    streak: Mutex<Streak>,
    /// Whether a streak (or the open breaker) is on: an answer while none
    /// is, every call of a healthy run, is counted without the lock.
    on: std::sync::atomic::AtomicBool,
    /// Wakes the rows held when a streak ends or the breaker opens.
    changed: Notify,
}

impl Breaker {
    pub(super) fn new(window: Duration) -> Breaker {
        Breaker {
            window,
            streak: Mutex::new(Streak::default()),
            on: std::sync::atomic::AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn streak(&self) -> std::sync::MutexGuard<'_, Streak> {
        self.streak.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one attempt of `row`; `Some` when it opened the breaker.
    /// `origin` and `last` say where and what failed (called for outage
    /// attempts only: the hot path of a healthy run allocates nothing).
    pub(super) fn observe(
        &self,
        row: (usize, u64),
        verdict: &Verdict,
        origin: impl FnOnce() -> String,
        last: impl FnOnce() -> String,
    ) -> Option<Outage> {
        use std::sync::atomic::Ordering;
        let outage = is_outage(verdict);
        if self.window.is_zero() || (!outage && !self.on.load(Ordering::Relaxed)) {
            return None;
        }
        let mut streak = self.streak();
        if streak.open {
            return None;
        }
        if !outage {
            if streak.since.take().is_some() {
                *streak = Streak::default();
                self.on.store(false, Ordering::Relaxed);
                drop(streak);
                self.changed.notify_waiters();
            }
            return None;
        }
        let now = Instant::now();
        let since = *streak.since.get_or_insert(now);
        self.on.store(true, Ordering::Relaxed);
        streak.calls += 1;
        streak.count(row);
        streak.origin = origin();
        streak.last = last();
        if now - since < self.window || !streak.rows_more_than_one {
            return None;
        }
        streak.open = true;
        let outage = streak.outage(now);
        drop(streak);
        self.changed.notify_waiters();
        Some(outage)
    }

    /// Waits, for a row whose last attempt was an outage attempt, until the
    /// streak ends or the breaker opens (at the latest `outage_after` after
    /// the streak began), or the run stops.
    pub(super) async fn hold(&self, stop: &CancellationToken) -> Hold {
        if self.window.is_zero() {
            return Hold::Record;
        }
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the streak is read: no wake-up is missed.
            changed.as_mut().enable();
            let deadline = {
                let mut streak = self.streak();
                if streak.open {
                    return Hold::Release;
                }
                let Some(since) = streak.since else { return Hold::Record };
                let now = Instant::now();
                if now - since >= self.window && !streak.rows_more_than_one {
                    // This row alone has failed all along: its own failure.
                    return Hold::Record;
                }
                if now - since >= self.window {
                    streak.open = true;
                    let outage = streak.outage(now);
                    drop(streak);
                    self.changed.notify_waiters();
                    return Hold::Opened(outage);
                }
                since + self.window
            };
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = stop.cancelled() => return Hold::Release,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::ErrorKind;

    const REFUSED: Verdict = Verdict::NotSent(ErrorKind::Connection);
    const MINUTE: Duration = Duration::from_secs(60);
    const ANSWERED: Verdict =
        Verdict::Answer { kind: ErrorKind::ClientError, status: 400, retryable: false, after: None };

    fn observe(breaker: &Breaker, verdict: &Verdict) -> Option<Outage> {
        observe_row(breaker, 1, verdict)
    }

    fn observe_row(breaker: &Breaker, row: u64, verdict: &Verdict) -> Option<Outage> {
        breaker.observe((0, row), verdict, || "https://gw.example".into(), || "connection refused".into())
    }

    #[test]
    fn outage_attempts_are_the_transport_failures_and_a_proxys_5xx() {
        let answer = |status| Verdict::Answer { kind: ErrorKind::ServerError, status, retryable: true, after: None };
        assert!(is_outage(&REFUSED));
        assert!(is_outage(&Verdict::NoAnswer(ErrorKind::Timeout)));
        assert!(is_outage(&answer(502)) && is_outage(&answer(503)) && is_outage(&answer(504)));
        // A 503 that says when to come back is the gateway, answering: the pool pauses for it.
        let later = Verdict::Answer { kind: ErrorKind::ServerError, status: 503, retryable: true, after: Some(MINUTE) };
        assert!(!is_outage(&later));
        // The gateway is there: it answered.
        assert!(!is_outage(&answer(500)) && !is_outage(&ANSWERED) && !is_outage(&Verdict::Done));
        assert!(!is_outage(&Verdict::Unauthorized));
        // An untrusted certificate stops the run on its own (exit 3).
        assert!(!is_outage(&Verdict::Permanent(ErrorKind::Connection)));
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_window_with_no_other_answer_in_between() {
        let breaker = Breaker::new(Duration::from_secs(30));
        assert!(observe(&breaker, &REFUSED).is_none());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(observe(&breaker, &REFUSED).is_none(), "29 s is within the window");
        // An answer ends the streak; the window starts again with the next failure.
        assert!(observe(&breaker, &ANSWERED).is_none());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(observe(&breaker, &REFUSED).is_none());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(observe(&breaker, &REFUSED).is_none(), "one row alone failing is that row's failure");
        let outage = observe_row(&breaker, 2, &REFUSED).expect("30 s of failures of two rows open it");
        assert_eq!((outage.calls, outage.lasted), (3, Duration::from_secs(30)));
        assert_eq!(outage.origin, "https://gw.example");
        // Open, it stays open: the run is stopping.
        assert!(observe(&breaker, &REFUSED).is_none());
        assert!(matches!(breaker.hold(&CancellationToken::new()).await, Hold::Release));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_row_is_recorded_when_another_row_gets_an_answer() {
        let breaker = std::sync::Arc::new(Breaker::new(Duration::from_secs(30)));
        observe(&breaker, &REFUSED);
        let held = tokio::spawn({
            let breaker = breaker.clone();
            async move { breaker.hold(&CancellationToken::new()).await }
        });
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!held.is_finished(), "held while the streak lasts");
        observe(&breaker, &ANSWERED);
        assert!(matches!(held.await.unwrap(), Hold::Record));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_row_opens_the_breaker_when_the_window_ends() {
        let breaker = Breaker::new(Duration::from_secs(30));
        observe(&breaker, &REFUSED);
        observe_row(&breaker, 2, &REFUSED);
        let started = Instant::now();
        let Hold::Opened(outage) = breaker.hold(&CancellationToken::new()).await else { panic!("opened") };
        assert_eq!(started.elapsed(), Duration::from_secs(30), "no later than the window's end");
        assert_eq!(outage.calls, 2);
        // Every other row held now is released.
        assert!(matches!(breaker.hold(&CancellationToken::new()).await, Hold::Release));
    }

    #[tokio::test(start_paused = true)]
    async fn a_row_that_alone_fails_all_window_long_is_recorded_and_the_next_one_opens_it() {
        // -j 1: a row the gateway always times out on, then the next row.
        let breaker = Breaker::new(Duration::from_secs(30));
        let timeout = Verdict::NoAnswer(ErrorKind::Timeout);
        observe(&breaker, &timeout);
        let started = Instant::now();
        assert!(matches!(breaker.hold(&CancellationToken::new()).await, Hold::Record), "its own failure");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        // The next row answered: nothing more.
        assert!(observe_row(&breaker, 2, &ANSWERED).is_none());
        // Had it failed too, two rows in 30 s: an outage.
        observe(&breaker, &timeout);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(observe_row(&breaker, 3, &REFUSED).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_releases_a_held_row_and_off_never_holds() {
        let breaker = Breaker::new(Duration::from_secs(30));
        observe(&breaker, &REFUSED);
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(matches!(breaker.hold(&stop).await, Hold::Release));
        let off = Breaker::new(Duration::ZERO);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(observe(&off, &REFUSED).is_none());
        assert!(matches!(off.hold(&CancellationToken::new()).await, Hold::Record));
    }
}
