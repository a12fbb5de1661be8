//! How fast calls may go out: every attempt of every row passes a
//! [`Limiter`]. The runner holds it as `dyn Limiter` and does not know which
//! one it has: [`LocalLimiter`] paces this process alone; the Redis one
//! (`limiter/redis.rs`) shares one limit among every process of a run.
//!
//! The local limiter has three gates, in order:
//! - a pause set by `Retry-After`, which holds the whole pool, not one worker;
//! - the configured rate and burst (the ceiling): GCRA, paced [`HEADROOM`]
//!   below the rate. Each call books its slot before it sleeps, so a timer
//!   that wakes late does not push the later slots back; a call may go up
//!   to [`SLACK`] (at most half a period) before its slot, never so early
//!   that more than the burst start at once. A call woken more than
//!   [`LATE`] after its slot gives the slot up and books the next one:
//!   spent late, it would go on top of the calls booked after it, and a
//!   stalled process would send its missed calls in one clump. The
//!   headroom pays for the calls up to [`LATE`] late, and for as much
//!   jitter again between a call let through and its arrival, so no second
//!   holds more than the rate and the burst: where the calls are let
//!   through however late the host wakes, and at the gateway with the
//!   jitter of a loaded host;
//! - an adaptive gate, off until the server throttles: when more than a
//!   fifth of recent answers are 429s, each wave of them cuts the rate to
//!   70% (AWS SDK's adaptive mode), and it climbs back once the throttling
//!   stops, until it reaches the ceiling and turns off again. A few 429s
//!   among many answers only pause the pool for their `Retry-After`.
//!
//! And the retry budget ([`RetryBudget`]), which keeps retries from piling
//! onto a failing server: each first attempt earns a fifth of a retry, time
//! earns ten per second, and a retry spends one. It stays per process.

pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::events::{Event, Events};

/// How early a call may go before its slot, at most: the timer's
/// lateness, absorbed. Never more than half a period, so the slack never
/// lets one more call than the burst start at once.
pub const SLACK: Duration = Duration::from_millis(2);

/// A call woken later than this after its slot gives the slot up and
/// books another. Then a window of time holds at most the calls of its
/// slots and of the slots up to this long before it, plus the burst,
/// however late the host wakes the process.
pub const LATE: Duration = Duration::from_millis(10);

/// The limiters pace this share below the rate (2%: 392/s at 400/s). Half
/// of it is the room for the calls up to [`LATE`] late that a one-second
/// window may hold on top of its own (10 ms: 4 calls at 400/s), so a second
/// holds at most `rate + burst` calls let through. The other half is the
/// room for as much jitter on the way to the gateway: calls let through in
/// time and held before they reach it (the sender or the gateway preempted
/// on a loaded host) arrive up to 10 ms closer together than they left.
pub const HEADROOM: f64 = 0.02;

/// A wave of 429s cuts the rate once: cuts are at least this far apart.
const CUT_EVERY: Duration = Duration::from_millis(500);
/// The rate climbs again after this long without a 429, one step a second.
const CALM: Duration = Duration::from_secs(2);
/// The adaptive rate never goes below this.
const FLOOR: f64 = 0.5;
/// The share of 429s among recent answers above which the rate is lowered.
const THROTTLED_SHARE: f64 = 0.2;
/// Weight of one answer in that share (about the last 20 answers count).
const SHARE_WEIGHT: f64 = 0.05;

/// The pace of calls, as the runner sees it.
pub trait Limiter: Send + Sync {
    /// Waits until one more call may go out; the moment it was let through.
    fn until_ready(&self) -> Pin<Box<dyn Future<Output = Instant> + Send + '_>>;
    /// A `Retry-After`: no call goes out before `d` from now.
    fn pause(&self, d: Duration);
    /// Every answer from the server: a run of 429s lowers the rate.
    fn answered(&self, throttled: bool);
    /// The adaptive rate now, while it is lowering the rate.
    fn effective_rate(&self) -> Option<f64>;
    /// The lowest rate the server's 429s brought the run down to.
    fn lowest_rate(&self) -> Option<f64>;
}

/// The limit of one process: GCRA on its own clock.
pub struct LocalLimiter {
    started: Instant,
    /// The end of a `Retry-After` pause, in ms since `started`.
    paused_until_ms: AtomicU64,
    /// The configured rate's spacing in ns (0 for `rate = 0`), how early a
    /// call may go (the burst, plus the slack), and the next slot.
    fixed_period_ns: u64,
    fixed_tolerance_ns: u64,
    fixed_next_ns: AtomicU64,
    /// Slots given up because their call woke too late.
    given_up: AtomicU64,
    ceiling: f64,
    adaptive: Mutex<Adaptive>,
    /// The adaptive gate's spacing between calls in ns (0 = off) and its
    /// next free slot, read on every attempt without the mutex.
    period_ns: AtomicU64,
    next_ns: AtomicU64,
    /// Where a pause that starts and the rate's cuts and recovery are told.
    events: Events,
}

/// The adaptive gate's slow-changing state.
struct Adaptive {
    rate: f64,
    /// The lowest rate it came down to, for the summary.
    lowest: Option<f64>,
    /// The rate when the first 429 arrived; with no ceiling the gate turns
    /// off again above twice this.
    first: Option<f64>,
    last_cut: Option<Instant>,
    last_throttle: Option<Instant>,
    last_raise: Option<Instant>,
    /// Moving share of 429s among answers.
    share: f64,
    /// Calls sent in the current second, and in the last whole one.
    second: u64,
    count: u64,
    measured: f64,
}

/// The spacing of calls in ns at `rate` calls/s paced [`HEADROOM`] below
/// it; 0 for no limit.
fn paced_period_ns(rate: f64) -> u64 {
    if rate > 0.0 { (1e9 / (rate * (1.0 - HEADROOM))).max(1.0) as u64 } else { 0 }
}

/// Waits until a `Retry-After` pause is over: `paused_until_ms` is its end
/// in ms since `started`, and may move later while this waits.
async fn wait_unpaused(started: Instant, paused_until_ms: &AtomicU64) {
    loop {
        let until = Duration::from_millis(paused_until_ms.load(Ordering::Relaxed));
        let now = started.elapsed();
        if until <= now {
            return;
        }
        tokio::time::sleep(until - now).await;
    }
}

/// Whether moving a pause's end from `before` to `until` (ms, `now`
/// being now) starts a pause: none was on, and this one lasts.
fn pause_started(before: u64, until: u64, now: u64) -> bool {
    before <= now && until > now
}

/// A rate to a tenth of a call per second, as events and the summary show it.
fn tenth(rate: f64) -> f64 {
    (rate * 10.0).round() / 10.0
}

/// Retries left to spend; see the module doc.
pub struct RetryBudget(Mutex<Budget>);

struct Budget {
    balance: f64,
    refilled: Instant,
    /// What a first attempt earns, in fifths of a retry.
    per_call: f64,
}

// The budget counts fifths of a retry, so a call's share adds up exactly.
const BUDGET_MAX: f64 = 5000.0;
const BUDGET_PER_CALL: f64 = 1.0;
const BUDGET_PER_RETRY: f64 = 5.0;
const BUDGET_PER_SECOND: f64 = 50.0;

/// Where the moment each call is let through is logged (at trace level):
/// `RUST_LOG=info,bulkcall::pace=trace` shows one line per call with
/// `at_ns`, this host's monotonic clock (`CLOCK_MONOTONIC`, shared by every
/// process on the host), to set beside a gateway's arrival times.
pub const PACE_TARGET: &str = "bulkcall::pace";

/// This host's monotonic clock in ns, the clock `std::time::Instant` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the one timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `at` on the host's monotonic clock in ns ([`monotonic_ns`]).
pub fn monotonic_ns_at(at: std::time::Instant) -> u64 {
    static ANCHOR: LazyLock<(std::time::Instant, u64)> = LazyLock::new(|| (std::time::Instant::now(), monotonic_ns()));
    let (instant, ns) = *ANCHOR;
    if at >= instant {
        ns + (at - instant).as_nanos() as u64
    } else {
        ns.saturating_sub((instant - at).as_nanos() as u64)
    }
}

/// A call was let through `at`: logged for `bulkcall::pace` (see [`PACE_TARGET`]).
fn let_through(at: Instant) -> Instant {
    tracing::trace!(target: PACE_TARGET, at_ns = monotonic_ns_at(at.into_std()), "call let through");
    at
}

impl Limiter for LocalLimiter {
    fn until_ready(&self) -> Pin<Box<dyn Future<Output = Instant> + Send + '_>> {
        Box::pin(async move { let_through(LocalLimiter::until_ready(self).await) })
    }
    fn pause(&self, d: Duration) {
        LocalLimiter::pause(self, d)
    }
    fn answered(&self, throttled: bool) {
        LocalLimiter::answered(self, throttled)
    }
    fn effective_rate(&self) -> Option<f64> {
        LocalLimiter::effective_rate(self)
    }
    fn lowest_rate(&self) -> Option<f64> {
        LocalLimiter::lowest_rate(self)
    }
}

impl LocalLimiter {
    pub fn new(rate: f64, burst: u32) -> LocalLimiter {
        let period_ns = paced_period_ns(rate);
        let slack_ns = (SLACK.as_nanos() as u64).min(period_ns / 2);
        let tolerance_ns = u64::from(burst.max(1) - 1) * period_ns + slack_ns;
        let now = Instant::now();
        LocalLimiter {
            started: now,
            paused_until_ms: AtomicU64::new(0),
            fixed_period_ns: period_ns,
            fixed_tolerance_ns: tolerance_ns,
            fixed_next_ns: AtomicU64::new(0),
            given_up: AtomicU64::new(0),
            ceiling: rate,
            adaptive: Mutex::new(Adaptive {
                rate,
                lowest: None,
                first: None,
                last_cut: None,
                last_throttle: None,
                last_raise: None,
                share: 0.0,
                second: 0,
                count: 0,
                measured: 0.0,
            }),
            period_ns: AtomicU64::new(0),
            next_ns: AtomicU64::new(0),
            events: Events::default(),
        }
    }

    /// Tells `events` when a pause starts and when the rate is cut or restored.
    pub fn with_events(mut self, events: Events) -> LocalLimiter {
        self.events = events;
        self
    }

    /// Waits until one more call may go out; the moment it was let through.
    pub async fn until_ready(&self) -> Instant {
        wait_unpaused(self.started, &self.paused_until_ms).await;
        let mut at = if self.fixed_period_ns > 0 { self.fixed_slot().await } else { Instant::now() };
        if let Some(later) = self.adaptive_slot().await {
            at = later;
        }
        self.count_sent();
        at
    }

    /// Slots given up so far because their call woke too late.
    pub fn given_up(&self) -> u64 {
        self.given_up.load(Ordering::Relaxed)
    }

    /// Takes over from a limiter that was spending the same limit (Redis
    /// lost) and booked calls until `after`: the burst is spent, and calls
    /// go at the rate from `after` (or now), none early, so the switch adds
    /// no calls of its own to those already booked.
    pub fn start_empty(&self, after: Instant) {
        let from = after.max(Instant::now()).saturating_duration_since(self.started).as_nanos() as u64;
        self.fixed_next_ns.fetch_max(from + self.fixed_tolerance_ns + self.fixed_period_ns, Ordering::AcqRel);
    }

    /// When the last call booked so far may go out at the latest.
    pub fn booked_until(&self) -> Instant {
        self.started + Duration::from_nanos(self.fixed_next_ns.load(Ordering::Acquire))
    }

    /// A `Retry-After`: no call goes out before `d` from now.
    /// One event per pause: a `Retry-After` while one is on only lengthens it.
    pub fn pause(&self, d: Duration) {
        if self.hold_for(d) {
            self.events.emit(Event::Pause { ms: d.as_millis() as u64, shared: false });
        }
    }

    /// No call before `d` from now; whether that started a pause.
    fn hold_for(&self, d: Duration) -> bool {
        let now = self.started.elapsed();
        let until = (now + d).as_millis() as u64;
        let before = self.paused_until_ms.fetch_max(until, Ordering::Relaxed);
        pause_started(before, until, now.as_millis() as u64)
    }

    /// GCRA: a call takes the next slot; it may go `tolerance` before it,
    /// and gives it up (and takes the next) when woken too late for it.
    /// The moment it was let through.
    async fn fixed_slot(&self) -> Instant {
        let (period, tolerance) = (self.fixed_period_ns, self.fixed_tolerance_ns);
        loop {
            let now = Instant::now();
            let now_ns = (now - self.started).as_nanos() as u64;
            let next = self.fixed_next_ns.load(Ordering::Relaxed);
            // After a quiet spell the schedule starts again from now.
            let slot = next.max(now_ns);
            if self.fixed_next_ns.compare_exchange(next, slot + period, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            let earliest = slot.saturating_sub(tolerance);
            if earliest <= now_ns {
                return now;
            }
            tokio::time::sleep(Duration::from_nanos(earliest - now_ns)).await;
            let woke = Instant::now();
            let late = (woke - self.started).as_nanos() as u64 - earliest;
            if late <= LATE.as_nanos() as u64 {
                return woke;
            }
            self.given_up.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(target: PACE_TARGET, late_ms = late as f64 / 1e6, "slot given up");
        }
    }

    /// The adaptive gate's slot; when it had to wait for it, the moment it
    /// woke.
    async fn adaptive_slot(&self) -> Option<Instant> {
        loop {
            let period = self.period_ns.load(Ordering::Relaxed);
            if period == 0 {
                return None;
            }
            let now = self.started.elapsed().as_nanos() as u64;
            let next = self.next_ns.load(Ordering::Relaxed);
            let slot = next.max(now);
            if self.next_ns.compare_exchange(next, slot + period, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                if slot <= now {
                    return None;
                }
                tokio::time::sleep(Duration::from_nanos(slot - now)).await;
                return Some(Instant::now());
            }
        }
    }

    fn set_rate(&self, a: &mut Adaptive, rate: Option<f64>) {
        match rate {
            Some(rate) => {
                a.rate = rate;
                self.period_ns.store((1e9 / rate) as u64, Ordering::Relaxed);
            }
            None => {
                a.rate = self.ceiling;
                self.period_ns.store(0, Ordering::Relaxed);
            }
        }
    }

    fn count_sent(&self) {
        let mut a = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let second = self.started.elapsed().as_secs();
        if second != a.second {
            a.measured = if second == a.second + 1 { a.count as f64 } else { 0.0 };
            a.second = second;
            a.count = 0;
        }
        a.count += 1;
        // Climb back once the server has been calm for a while.
        let calm = a.last_throttle.is_some_and(|t| now - t >= CALM);
        let due = a.last_raise.is_none_or(|t| now - t >= Duration::from_secs(1));
        if self.period_ns.load(Ordering::Relaxed) != 0 && calm && due {
            a.last_raise = Some(now);
            let raised = a.rate * 1.2 + 1.0;
            let off =
                if self.ceiling > 0.0 { raised >= self.ceiling } else { a.first.is_some_and(|f| raised >= 2.0 * f) };
            self.set_rate(&mut a, (!off).then_some(raised));
            if off {
                self.events.emit(Event::RateRestored);
            }
        }
    }

    /// Every answer from the server: a run of 429s lowers the rate (once
    /// per wave of them).
    pub fn answered(&self, throttled: bool) {
        let mut a = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        a.share = a.share * (1.0 - SHARE_WEIGHT) + if throttled { SHARE_WEIGHT } else { 0.0 };
        if !throttled {
            return;
        }
        let now = Instant::now();
        a.last_throttle = Some(now);
        if a.share < THROTTLED_SHARE || a.last_cut.is_some_and(|t| now - t < CUT_EVERY) {
            return;
        }
        a.last_cut = Some(now);
        let current = if self.period_ns.load(Ordering::Relaxed) != 0 {
            a.rate
        } else {
            // First 429: start from what was really sent, under the ceiling.
            let measured = if a.measured > 0.0 { a.measured } else { a.count.max(1) as f64 };
            let current = if self.ceiling > 0.0 { measured.min(self.ceiling) } else { measured };
            a.first.get_or_insert(current);
            current
        };
        let cut = (current * 0.7).max(FLOOR);
        a.lowest = Some(a.lowest.map_or(cut, |l: f64| l.min(cut)));
        self.next_ns.store(self.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.set_rate(&mut a, Some(cut));
        drop(a);
        tracing::debug!(rate = cut, "throttled by the server: lowering the sending rate");
        self.events.emit(Event::SlowDown { rate: tenth(cut) });
    }

    /// The adaptive rate now, while it is lowering the rate.
    pub fn effective_rate(&self) -> Option<f64> {
        (self.period_ns.load(Ordering::Relaxed) != 0)
            .then(|| self.adaptive.lock().unwrap_or_else(|e| e.into_inner()).rate)
    }

    /// The lowest rate the server's 429s brought the run down to.
    pub fn lowest_rate(&self) -> Option<f64> {
        self.adaptive.lock().unwrap_or_else(|e| e.into_inner()).lowest
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(BUDGET_PER_CALL / BUDGET_PER_RETRY)
    }
}

impl RetryBudget {
    /// A budget where each first attempt earns `per_call` retries (the
    /// `retry_budget` setting; 0.2 by default), besides ten a second.
    pub fn new(per_call: f64) -> RetryBudget {
        let per_call = per_call.max(0.0) * BUDGET_PER_RETRY;
        RetryBudget(Mutex::new(Budget { balance: BUDGET_PER_SECOND, refilled: Instant::now(), per_call }))
    }

    /// A first attempt went out: it earns part of a retry.
    pub fn earn_retry(&self) {
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
        b.balance = (b.balance + b.per_call).min(BUDGET_MAX);
    }

    /// Spends one retry, if the budget has one.
    pub fn spend_retry(&self) -> bool {
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        b.balance = (b.balance + (now - b.refilled).as_secs_f64() * BUDGET_PER_SECOND).min(BUDGET_MAX);
        b.refilled = now;
        if b.balance >= BUDGET_PER_RETRY {
            b.balance -= BUDGET_PER_RETRY;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_kept_and_the_burst_only_after_a_quiet_spell() {
        let limiter = LocalLimiter::new(100.0, 1);
        let start = Instant::now();
        for _ in 0..101 {
            limiter.until_ready().await;
        }
        let took = start.elapsed();
        // 100 gaps at 98 calls/s (2% headroom): 1,020.4 ms, each call
        // allowed up to 2 ms early.
        assert!(took >= Duration::from_millis(1018) && took <= Duration::from_millis(1021), "{took:?}");

        let limiter = LocalLimiter::new(10.0, 5);
        tokio::time::advance(Duration::from_secs(5)).await;
        let start = Instant::now();
        for _ in 0..5 {
            limiter.until_ready().await;
        }
        assert!(start.elapsed() < Duration::from_millis(5), "a burst of 5 after a quiet spell");
        limiter.until_ready().await;
        assert!(start.elapsed() >= Duration::from_millis(99), "then the rate: {:?}", start.elapsed());
    }

    /// The times `calls` tasks, all waiting at once, were let through, in
    /// ns from `start`, sorted.
    async fn let_through_together(limiter: &Arc<LocalLimiter>, calls: usize, start: Instant) -> Vec<u64> {
        let tasks: Vec<_> = (0..calls)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.until_ready().await })
            })
            .collect();
        let mut times = Vec::new();
        for task in tasks {
            times.push((task.await.unwrap() - start).as_nanos() as u64);
        }
        times.sort_unstable();
        times
    }

    #[tokio::test(start_paused = true)]
    async fn at_high_rates_the_timer_slack_never_starts_more_than_the_burst_at_once() {
        for burst in [1, 5] {
            // 5,000 calls/s: 2 ms of slack would be ten calls at once.
            let limiter = Arc::new(LocalLimiter::new(5000.0, burst));
            tokio::time::advance(Duration::from_secs(5)).await;
            let start = Instant::now();
            let times = let_through_together(&limiter, 200, start).await;
            let at_once = times.iter().filter(|&&t| t == times[0]).count();
            assert_eq!((times[0], at_once), (0, burst as usize), "after a quiet spell, the burst goes at once");
            // Then the timer's 1 ms ticks: each lets through the calls whose
            // slots came since the last, the rate's worth of a millisecond.
            let per_tick = (5000.0 * (1.0 - HEADROOM) / 1000.0_f64).ceil() as usize;
            for tick in times.chunk_by(|a, b| a == b).skip(1) {
                assert!(tick.len() <= per_tick, "{} calls at {} ns", tick.len(), tick[0]);
            }
            let paced = Duration::from_nanos(paced_period_ns(5000.0) * (200 - u64::from(burst)));
            assert!(Duration::from_nanos(times[199]) >= paced - SLACK, "{:?} for 200 calls", times[199]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_woken_too_late_gives_its_slot_up_instead_of_going_with_the_next() {
        // 98 calls/s paced: slots 10.2 ms apart.
        let limiter = Arc::new(LocalLimiter::new(100.0, 1));
        let start = Instant::now();
        limiter.until_ready().await;
        // Five calls book the next five slots, 10.2 to 51 ms, and sleep…
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.until_ready().await })
            })
            .collect();
        tokio::task::yield_now().await;
        // …and the host wakes them only 35 ms on, as a stalled process.
        tokio::time::advance(Duration::from_millis(35)).await;
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap() - start);
        }
        times.sort_unstable();
        // Each may go 2 ms early: from 8.2, 18.4, 28.6, 38.8 and 49 ms.
        // The first two are more than `LATE` behind at 35 ms: given up,
        // their calls take the next free slots (from 59.2 and 69.4 ms)
        // instead of going with the third, which is late by less. The
        // timer wakes on whole milliseconds, after the slot.
        assert_eq!(limiter.given_up(), 2);
        let ms: Vec<u128> = times.iter().map(|t| t.as_millis()).collect();
        assert_eq!(ms, [35, 39, 50, 60, 70], "{times:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_limiter_taking_over_spends_no_burst_and_waits_for_calls_booked() {
        // Idle for long enough to fill a burst of 20, then taking over a
        // limit already spent elsewhere (Redis lost): 21 calls still take
        // 20 gaps of 10.2 ms (98 calls/s), none early beyond the timer slack.
        let limiter = LocalLimiter::new(100.0, 20);
        tokio::time::advance(Duration::from_secs(5)).await;
        let start = Instant::now();
        limiter.start_empty(start);
        for _ in 0..21 {
            limiter.until_ready().await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}: a burst was spent");

        // Calls booked elsewhere until 300 ms from now: the first of this
        // limiter's comes one gap after them.
        let limiter = LocalLimiter::new(100.0, 20);
        let start = Instant::now();
        limiter.start_empty(start + Duration::from_millis(300));
        limiter.until_ready().await;
        assert!(start.elapsed() >= Duration::from_millis(310) - SLACK, "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_pauses_everyone() {
        let limiter = LocalLimiter::new(0.0, 1);
        limiter.pause(Duration::from_secs(3));
        let start = Instant::now();
        limiter.until_ready().await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_cuts_the_rate_and_calm_restores_it() {
        let limiter = LocalLimiter::new(100.0, 1);
        for _ in 0..50 {
            limiter.until_ready().await;
            limiter.answered(false);
        }
        limiter.answered(true);
        assert_eq!(limiter.effective_rate(), None, "one 429 among many answers does not lower the rate");
        for _ in 0..4 {
            limiter.answered(true);
        }
        let cut = limiter.effective_rate().expect("throttled");
        assert!((0.5..=70.0).contains(&cut), "{cut}");
        limiter.answered(true);
        assert_eq!(limiter.effective_rate(), Some(cut), "one cut per wave of 429s");
        tokio::time::advance(CUT_EVERY).await;
        limiter.answered(true);
        assert!(limiter.effective_rate().unwrap() < cut, "a later wave cuts again");
        assert!(limiter.lowest_rate().unwrap() < cut);

        // Calm: the rate climbs back and the gate turns off at the ceiling.
        for _ in 0..40 {
            tokio::time::advance(Duration::from_secs(1)).await;
            limiter.until_ready().await;
        }
        assert_eq!(limiter.effective_rate(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_one_event_however_many_retry_afters_lengthen_it() {
        let (events, memory) = crate::events::Memory::events();
        let limiter = LocalLimiter::new(0.0, 1).with_events(events);
        limiter.pause(Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(10)).await;
        // Every call of the pool met the 429: the pause goes on.
        limiter.pause(Duration::from_secs(1));
        limiter.pause(Duration::from_millis(500));
        limiter.pause(Duration::ZERO);
        assert_eq!(memory.kinds(), ["pause"]);
        assert_eq!(memory.0.lock().unwrap()[0]["ms"], 1000);
        tokio::time::advance(Duration::from_secs(2)).await;
        limiter.pause(Duration::ZERO);
        assert_eq!(memory.kinds(), ["pause"], "a Retry-After of 0 is no pause");
        limiter.pause(Duration::from_secs(2));
        assert_eq!(memory.kinds(), ["pause", "pause"], "a pause after the last one ended is another");
    }

    #[tokio::test(start_paused = true)]
    async fn each_cut_of_the_rate_is_an_event_and_so_is_its_recovery() {
        let (events, memory) = crate::events::Memory::events();
        let limiter = LocalLimiter::new(100.0, 1).with_events(events);
        for _ in 0..50 {
            limiter.until_ready().await;
            limiter.answered(false);
        }
        for _ in 0..10 {
            limiter.answered(true);
        }
        assert_eq!(memory.kinds(), ["slow_down"], "one cut per wave of 429s");
        let rate = memory.0.lock().unwrap()[0]["rate"].as_f64().unwrap();
        assert_eq!(Some(rate), limiter.effective_rate().map(tenth));
        for _ in 0..40 {
            tokio::time::advance(Duration::from_secs(1)).await;
            limiter.until_ready().await;
        }
        assert_eq!(limiter.effective_rate(), None);
        assert_eq!(memory.kinds(), ["slow_down", "rate_restored"], "the climb back is one event, at its end");
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_runs_out_and_refills() {
        let budget = RetryBudget::default();
        let mut spent = 0;
        while budget.spend_retry() {
            spent += 1;
        }
        assert_eq!(spent, 10, "a reserve of ten retries");
        for _ in 0..10 {
            budget.earn_retry();
        }
        assert!(budget.spend_retry(), "ten calls earn two retries");
        assert!(budget.spend_retry());
        assert!(!budget.spend_retry());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(budget.spend_retry(), "time earns ten a second");
    }
}
