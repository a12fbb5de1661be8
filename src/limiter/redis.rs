//! The limit shared by every process of a run: GCRA in Redis, on Redis's
//! own clock (`TIME`), so the hosts' clocks do not matter.
//!
//! A process does not ask Redis once per call: it leases a few slots of the
//! shared schedule at a time (about 50 ms of its share, never more than the
//! burst) and spends them locally, each at its own time. A lease reserves
//! its slots for good, so however the processes interleave, the slots they
//! all spend are the shared schedule's, and the sum of their rates is the
//! limit.
//!
//! What else is shared: a `Retry-After` on any process pushes the shared
//! pause forward, and the adaptive slow-down after waves of 429s sets one
//! shared rate (every process's next lease is spaced by it).
//!
//! When Redis is lost, this process goes on alone at `rate / N` (its share)
//! with a [`LocalLimiter`], warns once, and reconnects in the background.
//! Back on the shared schedule it keeps its share as a cap for a short
//! while, until every other process has had time to come back too, so the
//! processes together never exceed the limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ::redis::{FromRedisValue, Script, ScriptInvocation};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{
    CALM, CUT_EVERY, FLOOR, HEADROOM, LATE, Limiter, LocalLimiter, PACE_TARGET, SHARE_WEIGHT, THROTTLED_SHARE,
    let_through, pause_started, tenth, wait_unpaused,
};
use crate::coordination::{ROUND_TRIP_TIMEOUT, Redis};
use crate::events::{Event, Events};

/// How much of its share a process leases per round trip.
const LEASE_SPAN: Duration = Duration::from_millis(50);
/// How often a process that lost Redis checks whether it is back.
const RECONNECT_EVERY: Duration = Duration::from_millis(250);
/// After Redis is back, a process keeps to its share this long, while the
/// others, still on their own, find Redis again (a few of their checks).
const BACK_CAP: Duration = Duration::from_secs(1);
/// A shared pause found by a lease is told as an event only with at least
/// this much of it left: less is this process's own pause seen through
/// Redis's clock after it ended here.
const SHARED_PAUSE_NEWS: Duration = Duration::from_millis(100);
/// A run's limiter state is forgotten a day after its last use.
const STATE_TTL_MS: u64 = 86_400_000;

/// Leases `ARGV[3]` slots: returns the first slot's offset from Redis's
/// now (µs), the spacing (ns; 0 = no limit), the shared pause's offset from
/// now (µs; ≤ 0 = none), the shared adaptive rate (milli-calls/s; -1 =
/// off), Redis's now (µs since the epoch, its `TIME`), and how long the
/// shared schedule had lapsed (µs): from its last booked slot, or the end
/// of a pause, to now, when no process leased in between. Reports
/// `ARGV[4]` 429s seen since the last lease, and raises the adaptive rate
/// once the server has been calm.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ceiling = tonumber(ARGV[1])
local want = tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'tat', 'pause', 'rate', 'last_throttle', 'last_raise', 'first')
local tat = tonumber(s[1]) or 0
local pause = tonumber(s[2]) or 0
local rate = tonumber(s[3])
local last_throttle = tonumber(s[4]) or 0
local last_raise = tonumber(s[5]) or 0
local first = tonumber(s[6])
if tonumber(ARGV[4]) > 0 then
  last_throttle = now
  redis.call('HSET', KEYS[1], 'last_throttle', string.format('%.0f', now))
end
if rate and now - last_throttle >= {calm} and now - last_raise >= 1000000 then
  local raised = rate * 1.2 + 1
  redis.call('HSET', KEYS[1], 'last_raise', string.format('%.0f', now))
  if (ceiling > 0 and raised >= ceiling) or (ceiling <= 0 and first and raised >= 2 * first) then
    redis.call('HDEL', KEYS[1], 'rate')
    rate = nil
  else
    rate = raised
    redis.call('HSET', KEYS[1], 'rate', tostring(rate))
  end
end
local effective = rate or ceiling
local lapsed = 0
if tat > 0 then lapsed = math.max(0, now - math.max(tat, pause)) end
local start = math.max(tat, now, pause)
local period = 0
if effective > 0 then
  period = 1000000000 / effective
  redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', start + want * period / 1000))
end
redis.call('PEXPIRE', KEYS[1], {ttl})
local r = -1
if rate then r = math.floor(rate * 1000) end
return {{math.floor(start - now), math.floor(period), math.floor(pause - now), r, math.floor(now), math.floor(lapsed)}}
"#,
        calm = CALM.as_micros(),
        ttl = STATE_TTL_MS,
    ))
});

/// A `Retry-After` of `ARGV[1]` ms: no slot before then, for anyone.
static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause_end = now + tonumber(ARGV[1]) * 1000
local pause = tonumber(redis.call('HGET', KEYS[1], 'pause')) or 0
if pause_end > pause then
  redis.call('HSET', KEYS[1], 'pause', string.format('%.0f', pause_end))
end
redis.call('PEXPIRE', KEYS[1], {ttl})
return 1
"#,
        ttl = STATE_TTL_MS,
    ))
});

/// A wave of 429s: cuts the shared rate to 70%, at most once per
/// [`CUT_EVERY`] whichever process asks. The first cut starts from the
/// ceiling `ARGV[1]`, or with none from `ARGV[2]`, the asking process's
/// estimate of the rate all send at.
/// Returns the rate now in milli-calls/s.
static CUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ceiling = tonumber(ARGV[1])
local measured = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'rate', 'last_cut', 'lowest', 'first')
local rate = tonumber(s[1])
local last_cut = tonumber(s[2]) or 0
local lowest = tonumber(s[3])
redis.call('HSET', KEYS[1], 'last_throttle', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], {ttl})
if now - last_cut < {cut_every} then
  if rate then return math.floor(rate * 1000) end
  return -1
end
local current = rate
if not current then
  current = ceiling
  if current <= 0 then current = math.max(measured, 1) end
  if not s[4] then redis.call('HSET', KEYS[1], 'first', tostring(current)) end
end
local cut = math.max(current * 0.7, {floor})
if not lowest or cut < lowest then redis.call('HSET', KEYS[1], 'lowest', tostring(cut)) end
redis.call('HSET', KEYS[1], 'rate', tostring(cut), 'last_cut', string.format('%.0f', now))
return math.floor(cut * 1000)
"#,
        ttl = STATE_TTL_MS,
        cut_every = CUT_EVERY.as_micros(),
        floor = FLOOR,
    ))
});

/// How far Redis's clock may drift from this host's, at most (1 ms a
/// second: twice what NTP slews a clock by).
const DRIFT: f64 = 1e-3;

/// Redis's clock as this host sees it: Redis's time minus this process's
/// (ns since its start), never more than it is, as close as the quickest
/// recent round trip tells.
///
/// Redis reads its `TIME` between the lease's request and its answer, so
/// each answer bounds the offset: at least the reading minus the answer's
/// arrival, at most the reading minus the request's departure. The offset
/// kept is the highest lower bound seen, lowered by [`DRIFT`] as time goes
/// on; an answer whose upper bound is below it (Redis's clock stepped back)
/// starts again from that answer's lower bound. So an answer read late (the
/// process stalled while it waited) does not put its slots later on this
/// host than Redis put them in the shared schedule, on top of the slots the
/// other processes spend after them: they are found late, and given up.
#[derive(Default)]
struct RedisClock {
    offset: Option<(i128, Instant)>,
}

impl RedisClock {
    /// The moment on this host of Redis's reading `redis_us`, taken
    /// between `sent` and `received`: never after it was.
    fn local(&mut self, started: Instant, redis_us: i64, sent: Instant, received: Instant) -> Instant {
        let redis_ns = i128::from(redis_us) * 1000;
        let lowest = redis_ns - (received - started).as_nanos() as i128;
        let highest = redis_ns - (sent - started).as_nanos() as i128;
        let offset = match self.offset {
            Some((kept, at)) => {
                let kept = kept - ((received - at).as_nanos() as f64 * DRIFT) as i128;
                if kept > highest { lowest } else { kept.max(lowest) }
            }
            None => lowest,
        };
        self.offset = Some((offset, received));
        started + Duration::from_nanos((redis_ns - offset).max(0) as u64)
    }
}

/// Slots leased from Redis and not yet spent, as times on this host.
#[derive(Default)]
struct Lease {
    /// Redis's "now" when it answered, on this host's clock
    /// ([`RedisClock`]): a slot counted from here is never early.
    anchor: Option<Instant>,
    /// The next slot's earliest time, in ns from `anchor` (burst tolerance
    /// already taken off).
    next_ns: i128,
    period_ns: u64,
    left: u32,
}

impl Lease {
    /// The next slot.
    fn take(&mut self) -> Option<Instant> {
        let anchor = self.anchor?;
        if self.period_ns == 0 {
            // No limit: the lease is only good for its span.
            return (anchor.elapsed() < LEASE_SPAN).then(Instant::now);
        }
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = anchor + Duration::from_nanos(self.next_ns.max(0) as u64);
        self.next_ns += i128::from(self.period_ns);
        Some(at)
    }
}

/// Whether this process is on the shared schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Link {
    Shared,
    /// Redis is lost: this process keeps to its share alone.
    Lost,
    /// Redis is back: shared again, but still capped at the share until
    /// then (the calls booked alone are gone by then).
    Back(Instant),
}

/// The adaptive picture this process has.
#[derive(Default)]
struct Adaptive {
    /// Moving share of 429s among this process's answers.
    share: f64,
    last_cut: Option<Instant>,
    /// The shared adaptive rate, as the last lease told it.
    rate: Option<f64>,
    lowest: Option<f64>,
    /// Calls in the current second and in the last whole one.
    second: u64,
    count: u64,
    measured: f64,
}

/// The shared limit; see the module doc.
pub struct RedisLimiter {
    redis: Redis,
    /// The runtime Redis round trips run on (workers run on their lanes').
    rt: Handle,
    key: String,
    ceiling: f64,
    burst: u32,
    processes: u32,
    started: Instant,
    /// The end of a `Retry-After` pause, in ms since `started`.
    paused_until_ms: AtomicU64,
    /// The worker that finds the lease empty fetches the next one while
    /// holding this; the others wait for it instead of asking Redis too.
    lease: tokio::sync::Mutex<Lease>,
    clock: Mutex<RedisClock>,
    /// Paces this process at its share while Redis is lost.
    fallback: Arc<LocalLimiter>,
    link: Arc<Mutex<Link>>,
    /// 429s seen since the last lease, reported with the next one.
    throttled: AtomicU64,
    adaptive: Mutex<Adaptive>,
    /// Pauses and cuts sent to Redis and not yet answered.
    pending: Mutex<Vec<JoinHandle<()>>>,
    round_trips: Arc<AtomicU64>,
    calls: AtomicU64,
    given_up: AtomicU64,
    /// Slots of the shared schedule found lapsed, in millionths of a slot.
    lapsed_micro: AtomicU64,
    /// How far ahead of its answer the last lease's last slot was, in ns:
    /// with many workers waiting, every process's, the shared schedule is
    /// booked that far ahead.
    booked_ahead_ns: AtomicU64,
    /// Where Redis lost and back, shared pauses and rate changes are told
    /// (the fallback tells its own).
    events: Events,
}

impl RedisLimiter {
    /// The limiter of the run whose state is at `key`, one of `processes`
    /// that share `rate` (calls/s, 0 = none) and `burst`.
    pub fn new(redis: Redis, key: String, rate: f64, burst: u32, processes: u32) -> RedisLimiter {
        let processes = processes.max(1);
        RedisLimiter {
            redis,
            rt: Handle::current(),
            key,
            ceiling: rate,
            burst: burst.max(1),
            processes,
            started: Instant::now(),
            paused_until_ms: AtomicU64::new(0),
            lease: tokio::sync::Mutex::new(Lease::default()),
            clock: Mutex::new(RedisClock::default()),
            // The share of the rate and of the burst: the processes left
            // alone together spend no more than one burst.
            fallback: Arc::new(LocalLimiter::new(rate / f64::from(processes), (burst / processes).max(1))),
            link: Arc::new(Mutex::new(Link::Shared)),
            throttled: AtomicU64::new(0),
            adaptive: Mutex::new(Adaptive::default()),
            pending: Mutex::new(Vec::new()),
            round_trips: Arc::new(AtomicU64::new(0)),
            calls: AtomicU64::new(0),
            given_up: AtomicU64::new(0),
            lapsed_micro: AtomicU64::new(0),
            booked_ahead_ns: AtomicU64::new(0),
            events: Events::default(),
        }
    }

    /// Tells `events` when Redis is lost and back, when a pause starts
    /// and when the shared rate is cut or restored.
    pub fn with_events(mut self, events: Events) -> RedisLimiter {
        let fallback = Arc::get_mut(&mut self.fallback).expect("not shared yet");
        fallback.events = events.clone();
        self.events = events;
        self
    }

    /// Round trips to Redis so far, and calls let through.
    pub fn round_trips(&self) -> (u64, u64) {
        (self.round_trips.load(Ordering::Relaxed), self.calls.load(Ordering::Relaxed))
    }

    /// Whether this process is on the shared schedule now.
    pub fn is_shared(&self) -> bool {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) != Link::Lost
    }

    /// Waits until every pause and cut this process sent has reached Redis
    /// (or failed to).
    pub async fn settled(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for task in pending {
            let _ = task.await;
        }
    }

    async fn until_ready(&self) -> Instant {
        wait_unpaused(self.started, &self.paused_until_ms).await;
        self.count_sent();
        match self.link() {
            Link::Lost => {
                if let Some(at) = self.alone().await {
                    return at;
                }
            }
            Link::Back(until) if Instant::now() < until => {
                self.fallback.until_ready().await;
            }
            Link::Back(_) => *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Link::Shared,
            Link::Shared => {}
        }
        loop {
            let slot = {
                let mut lease = self.lease.lock().await;
                // Redis was found lost while this call waited for the lease: it
                // goes at this process's own pace, as every call does until
                // Redis is back (a lease taken now would add its calls to those).
                if self.link() == Link::Lost {
                    None
                } else {
                    match lease.take() {
                        Some(slot) => Some(slot),
                        None => match self.fetch_lease().await {
                            Ok(fresh) => {
                                *lease = fresh;
                                Some(lease.take().unwrap_or_else(Instant::now))
                            }
                            Err(reason) => {
                                self.lost(&reason);
                                None
                            }
                        },
                    }
                }
            };
            let Some(at) = slot else {
                match self.alone().await {
                    Some(at) => return at,
                    None => continue,
                }
            };
            // A slot inside a `Retry-After` pause is given up too: no call
            // goes before the pause ends, and none on top of the slots after.
            let paused = self.started + Duration::from_millis(self.paused_until_ms.load(Ordering::Relaxed));
            tokio::time::sleep_until(at.max(paused)).await;
            let woke = Instant::now();
            if at >= paused && woke <= at + LATE {
                return woke;
            }
            self.given_up.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(target: PACE_TARGET, late_ms = (woke - at).as_secs_f64() * 1e3, "slot given up");
        }
    }

    /// Whether this process is on the shared schedule, alone, or back.
    fn link(&self) -> Link {
        *self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call at this process's own pace, Redis lost: the moment the
    /// fallback let it through, or `None` when by then Redis is back and
    /// the cap is over (the call takes a slot of the shared schedule too).
    /// The cap lasts until the last call booked alone may go, but a call
    /// woken too late for its slot books another one, after that: spent
    /// alone, it would go on top of the whole shared rate.
    async fn alone(&self) -> Option<Instant> {
        let at = self.fallback.until_ready().await;
        match self.link() {
            Link::Lost => Some(at),
            Link::Back(until) if at < until => Some(at),
            Link::Back(_) | Link::Shared => None,
        }
    }

    /// Slots given up so far because their call woke too late (or inside
    /// a pause); the fallback's too.
    pub fn given_up(&self) -> u64 {
        self.given_up.load(Ordering::Relaxed) + self.fallback.given_up()
    }

    /// Slots of the shared schedule that lapsed unleased, found by this
    /// process's leases (each lapse is found by one process), fractions
    /// included: a lapse shorter than a period costs part of a slot.
    pub fn lapsed(&self) -> f64 {
        self.lapsed_micro.load(Ordering::Relaxed) as f64 / 1e6
    }

    fn count_sent(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut a = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        let second = self.started.elapsed().as_secs();
        if second != a.second {
            a.measured = if second == a.second + 1 { a.count as f64 } else { 0.0 };
            a.second = second;
            a.count = 0;
        }
        a.count += 1;
    }

    /// The rate the shared schedule is spaced by: [`HEADROOM`] below the
    /// configured one.
    fn paced_ceiling(&self) -> f64 {
        self.ceiling * (1.0 - HEADROOM)
    }

    /// One round trip: leases about [`LEASE_SPAN`] of this process's share.
    async fn fetch_lease(&self) -> Result<Lease, String> {
        let rate = self.adaptive.lock().unwrap_or_else(|e| e.into_inner()).rate.unwrap_or(self.ceiling);
        let share = rate / f64::from(self.processes);
        let want = ((share * LEASE_SPAN.as_secs_f64()).ceil() as u32).clamp(1, self.burst);
        let throttled = self.throttled.swap(0, Ordering::Relaxed);
        let mut invocation = LEASE.prepare_invoke();
        invocation.key(&self.key).arg(self.paced_ceiling()).arg(self.burst).arg(want).arg(throttled);
        let sent = Instant::now();
        let (start_us, period_ns, pause_us, rate_milli, redis_us, lapsed_us): (i64, u64, i64, i64, i64, u64) =
            self.round_trip(invocation).await.inspect_err(|_| {
                self.throttled.fetch_add(throttled, Ordering::Relaxed);
            })?;
        if period_ns > 0 && lapsed_us > 0 {
            // Slots nobody leased: every process was late, or had no call
            // waiting. Counted, so a rate below the limit can be explained:
            // to the fraction, for many lapses shorter than a period add
            // up (a slow gateway keeping every worker busy lapses it on
            // most leases).
            let slots = lapsed_us as f64 * 1000.0 / period_ns as f64;
            self.lapsed_micro.fetch_add((slots * 1e6).round() as u64, Ordering::Relaxed);
            tracing::trace!(target: PACE_TARGET, slots, "shared schedule lapsed");
        }
        let anchor =
            self.clock.lock().unwrap_or_else(|e| e.into_inner()).local(self.started, redis_us, sent, Instant::now());
        if pause_us > 0 {
            let until = (anchor - self.started + Duration::from_micros(pause_us as u64)).as_millis() as u64;
            let before = self.paused_until_ms.fetch_max(until, Ordering::Relaxed);
            let now = self.started.elapsed().as_millis() as u64;
            // Another process's pause: this one's own set `paused_until_ms` already.
            if pause_started(before, until, now) && until - now >= SHARED_PAUSE_NEWS.as_millis() as u64 {
                self.events.emit(Event::Pause { ms: until - now, shared: true });
            }
        }
        let changed = {
            let mut a = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
            let before = a.rate;
            a.rate = (rate_milli >= 0).then(|| rate_milli as f64 / 1000.0);
            if let Some(rate) = a.rate {
                a.lowest = Some(a.lowest.map_or(rate, |l| l.min(rate)));
            }
            match (before, a.rate) {
                (_, Some(rate)) if before.is_none_or(|b| rate < b) => Some(Event::SlowDown { rate: tenth(rate) }),
                (Some(_), None) => Some(Event::RateRestored),
                _ => None,
            }
        };
        if let Some(event) = changed {
            self.events.emit(event);
        }
        // GCRA: a slot may be spent `burst - 1` periods early. No timer
        // slack here: the timer's wake-up makes every slot a little late.
        let tolerance = i128::from(self.burst - 1) * i128::from(period_ns);
        let next_ns = i128::from(start_us) * 1000 - tolerance;
        let last = next_ns + i128::from(want - 1) * i128::from(period_ns);
        self.booked_ahead_ns.store(last.max(0) as u64, Ordering::Relaxed);
        Ok(Lease { anchor: Some(anchor), next_ns, period_ns, left: want })
    }

    async fn round_trip<T: FromRedisValue + Send + 'static>(
        &self,
        invocation: ScriptInvocation<'static>,
    ) -> Result<T, String> {
        let task = spawn_round_trip(&self.rt, &self.redis, &self.round_trips, invocation);
        task.await.map_err(|e| e.to_string())?
    }

    /// Redis failed: go on alone at this process's share, reconnect in the
    /// background.
    fn lost(&self, reason: &str) {
        {
            let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
            if *link == Link::Lost {
                return;
            }
            *link = Link::Lost;
        }
        self.events.emit(Event::RedisLost { part: "limiter" });
        // Slots leased before stay good: every process's workers wait for
        // theirs, up to as far ahead as the schedule was booked. This
        // process's own pace starts after that, with no burst, so its calls
        // never come on top of slots the others still spend.
        let booked = Duration::from_nanos(self.booked_ahead_ns.load(Ordering::Relaxed));
        self.fallback.start_empty(Instant::now() + booked);
        let share = self.ceiling / f64::from(self.processes);
        let pace = if share > 0.0 { format!("{share:.1} calls/s, this process's share") } else { "no limit".into() };
        tracing::warn!(
            "lost Redis at {} ({reason}): going on at {pace} and reconnecting in the background",
            self.redis.url
        );
        let (redis, link, fallback) = (self.redis.clone(), Arc::downgrade(&self.link), self.fallback.clone());
        let events = self.events.clone();
        self.rt.spawn(async move {
            loop {
                tokio::time::sleep(RECONNECT_EVERY).await;
                let Some(link) = link.upgrade() else { return };
                if redis.ping().await {
                    // Calls booked alone until now go out at their own pace,
                    // outside the shared schedule: capped at the share
                    // until the last of them has gone, and for a while after
                    // so the other processes find Redis again too.
                    let until = (Instant::now() + BACK_CAP).max(fallback.booked_until());
                    *link.lock().unwrap_or_else(|e| e.into_inner()) = Link::Back(until);
                    tracing::info!("Redis at {} is back: the shared rate limit again", redis.url);
                    events.emit(Event::RedisBack { part: "limiter" });
                    return;
                }
            }
        });
    }

    /// One event per pause, shared or this process's own.
    fn pause(&self, d: Duration) {
        let now = self.started.elapsed();
        let until = (now + d).as_millis() as u64;
        let before = self.paused_until_ms.fetch_max(until, Ordering::Relaxed);
        if pause_started(before, until, now.as_millis() as u64) {
            self.events.emit(Event::Pause { ms: d.as_millis() as u64, shared: false });
        }
        self.fallback.hold_for(d);
        if self.is_shared() {
            let mut invocation = PAUSE.prepare_invoke();
            invocation.key(&self.key).arg(d.as_millis() as u64);
            self.send(invocation);
        }
    }

    fn answered(&self, throttled: bool) {
        if !self.is_shared() {
            // Alone, the local gate slows down on its own; while shared it
            // must not (it sees no calls go out and would judge them all 429s).
            return self.fallback.answered(throttled);
        }
        let mut a = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        a.share = a.share * (1.0 - SHARE_WEIGHT) + if throttled { SHARE_WEIGHT } else { 0.0 };
        if !throttled {
            return;
        }
        self.throttled.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if a.share < THROTTLED_SHARE || a.last_cut.is_some_and(|t| now - t < CUT_EVERY) {
            return;
        }
        a.last_cut = Some(now);
        let measured = if a.measured > 0.0 { a.measured } else { a.count.max(1) as f64 };
        let mut invocation = CUT.prepare_invoke();
        invocation.key(&self.key).arg(self.ceiling).arg(measured * f64::from(self.processes));
        drop(a);
        self.send(invocation);
    }

    /// Sends a pause or a cut without waiting for it; a failure is found by
    /// the next lease.
    fn send(&self, invocation: ScriptInvocation<'static>) {
        let task = spawn_round_trip::<i64>(&self.rt, &self.redis, &self.round_trips, invocation);
        let done = self.rt.spawn(async move {
            let _ = task.await;
        });
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|t| !t.is_finished());
        pending.push(done);
    }
}

fn spawn_round_trip<T: FromRedisValue + Send + 'static>(
    rt: &Handle,
    redis: &Redis,
    round_trips: &AtomicU64,
    invocation: ScriptInvocation<'static>,
) -> JoinHandle<Result<T, String>> {
    round_trips.fetch_add(1, Ordering::Relaxed);
    let mut conn = redis.conn.clone();
    rt.spawn(async move {
        match tokio::time::timeout(ROUND_TRIP_TIMEOUT, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {}s", ROUND_TRIP_TIMEOUT.as_secs())),
        }
    })
}

impl Limiter for RedisLimiter {
    fn until_ready(&self) -> Pin<Box<dyn Future<Output = Instant> + Send + '_>> {
        Box::pin(async move { let_through(RedisLimiter::until_ready(self).await) })
    }
    fn pause(&self, d: Duration) {
        RedisLimiter::pause(self, d)
    }
    fn answered(&self, throttled: bool) {
        RedisLimiter::answered(self, throttled)
    }
    fn effective_rate(&self) -> Option<f64> {
        if self.is_shared() {
            self.adaptive.lock().unwrap_or_else(|e| e.into_inner()).rate
        } else {
            self.fallback.effective_rate()
        }
    }
    fn lowest_rate(&self) -> Option<f64> {
        let shared = self.adaptive.lock().unwrap_or_else(|e| e.into_inner()).lowest;
        match (shared, self.fallback.lowest_rate()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
