//! Processes that share Redis: one rate limit (GCRA on Redis's clock, slots
//! leased a few at a time), one pause, one adaptive rate; what happens
//! when Redis goes away and comes back; the shared token a 401 removes.
//! Each test starts its own redis-server on a free loopback port.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bulkcall::config::AuthSettings;
use bulkcall::coordination::{Redis, RedisUrl};
use bulkcall::events::Memory;
use bulkcall::limiter::Limiter;
use bulkcall::limiter::redis::RedisLimiter;
use bulkcall::token::shared::SharedStore;
use common::pace::{achieved_rate, busiest_second};
use common::redis::RedisServer;
use tokio::time::Instant;

async fn limiter(server: &RedisServer, key: &str, rate: f64, burst: u32, processes: u32) -> Arc<RedisLimiter> {
    told(server, key, rate, burst, processes).await.0
}

/// [`limiter`], with the events it tells.
async fn told(server: &RedisServer, key: &str, rate: f64, burst: u32, processes: u32) -> (Arc<RedisLimiter>, Memory) {
    let url = RedisUrl::parse(&server.url().into()).unwrap();
    let redis = Redis::connect(&url).await.expect("redis answers");
    let (events, memory) = Memory::events();
    (Arc::new(RedisLimiter::new(redis, key.into(), rate, burst, processes).with_events(events)), memory)
}

/// `workers` tasks on each limiter take `calls` permits in all; the times
/// they were let through (monotonic ns: the limiter's own, not this task's
/// wake-up after it), sorted.
async fn take(limiters: &[Arc<RedisLimiter>], workers: usize, calls: usize) -> Vec<u64> {
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(calls));
    let mut tasks = Vec::new();
    for limiter in limiters {
        for _ in 0..workers {
            let (limiter, left) = (limiter.clone(), left.clone());
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                while left
                    .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                        n.checked_sub(1)
                    })
                    .is_ok()
                {
                    let at = limiter.until_ready().await;
                    times.push(bulkcall::limiter::monotonic_ns_at(at.into_std()));
                }
                times
            }));
        }
    }
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await.unwrap());
    }
    times.sort();
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_keep_one_limit_between_them() {
    let Some(server) = RedisServer::start() else { return };
    let (rate, burst) = (200.0, 5);
    let mut limiters = Vec::new();
    for _ in 0..4 {
        limiters.push(limiter(&server, "bulkcall:{t}:limit", rate, burst, 4).await);
    }
    let times = take(&limiters, 8, 600).await;
    // The burst goes at once, then one call per period of the paced rate,
    // but for the slots given up by calls woken too late and those that
    // lapsed while no process leased.
    let lost: f64 = limiters.iter().map(|l| l.given_up() as f64 + l.lapsed()).sum();
    let span = (times[times.len() - 1] - times[0]) as f64 / 1e9;
    let paced = rate * (1.0 - bulkcall::limiter::HEADROOM);
    let achieved = achieved_rate(&times, burst as usize);
    let expected = paced - lost / span;
    assert!(
        achieved <= rate && (achieved - expected).abs() / paced < 0.01,
        "achieved {achieved:.1}/s paced at {paced:.1}/s with {lost:.1} slots given up or lapsed"
    );
    // However late the calls woke, a second holds at most the limit and the
    // burst: the headroom pays for the calls up to `LATE` late.
    let busiest = busiest_second(&times);
    let most = rate as usize + burst as usize;
    assert!(busiest <= most, "{busiest} calls in one second (at most {most})");
    let (round_trips, calls): (u64, u64) =
        limiters.iter().map(|l| l.round_trips()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(calls, 600);
    assert!(round_trips * 2 < calls, "{round_trips} round trips to Redis for {calls} calls: slots are leased");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_on_one_process_pauses_them_all() {
    let Some(server) = RedisServer::start() else { return };
    let (one, one_told) = told(&server, "bulkcall:{p}:limit", 100.0, 5, 2).await;
    let (other, other_told) = told(&server, "bulkcall:{p}:limit", 100.0, 5, 2).await;
    one.pause(Duration::from_millis(600));
    one.pause(Duration::from_millis(600));
    one.settled().await;
    let start = Instant::now();
    other.until_ready().await;
    assert!(start.elapsed() >= Duration::from_millis(550), "the other process waited {:?}", start.elapsed());
    // Each process tells the pause once: its own, and the one it found in Redis.
    let (one_told, other_told) = (one_told.0.lock().unwrap().clone(), other_told.0.lock().unwrap().clone());
    assert_eq!(one_told.len(), 1, "{one_told:?}");
    assert_eq!((&one_told[0]["kind"], &one_told[0]["shared"]), (&"pause".into(), &false.into()));
    assert_eq!(other_told.len(), 1, "{other_told:?}");
    assert_eq!((&other_told[0]["kind"], &other_told[0]["shared"]), (&"pause".into(), &true.into()));
    assert!((100..=600).contains(&other_told[0]["ms"].as_u64().unwrap()), "what was left of it: {other_told:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slow_down_after_429s_is_shared() {
    let Some(server) = RedisServer::start() else { return };
    let one = limiter(&server, "bulkcall:{a}:limit", 100.0, 5, 2).await;
    let (other, other_told) = told(&server, "bulkcall:{a}:limit", 100.0, 5, 2).await;
    one.until_ready().await;
    for _ in 0..5 {
        one.answered(true);
    }
    one.settled().await;
    assert_eq!(other.effective_rate(), None);
    for _ in 0..6 {
        // Past the lease it holds, the other process asks Redis again.
        other.until_ready().await;
    }
    assert_eq!(other.effective_rate(), Some(70.0), "the other process slowed down too");
    assert_eq!(other_told.kinds(), ["slow_down"], "and told it");
    assert_eq!(other_told.0.lock().unwrap()[0]["rate"], 70.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_process_keeps_its_share_and_comes_back() {
    let Some(mut server) = RedisServer::start() else { return };
    let (rate, processes) = (400.0, 4);
    let (limiter, told) = told(&server, "bulkcall:{l}:limit", rate, 1, processes).await;
    take(std::slice::from_ref(&limiter), 4, 20).await;
    server.stop();
    let times = take(std::slice::from_ref(&limiter), 4, 101).await;
    assert!(!limiter.is_shared());
    let span = (times[times.len() - 1] - times[0]) as f64 / 1e9;
    let share = rate / f64::from(processes);
    assert!(100.0 / span <= share, "{:.1} calls/s alone, above its share of {share}/s", 100.0 / span);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !limiter.is_shared() {
        assert!(Instant::now() < deadline, "still on its own 10 s after Redis came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (before, _) = limiter.round_trips();
    take(std::slice::from_ref(&limiter), 4, 20).await;
    assert!(limiter.is_shared());
    assert!(limiter.round_trips().0 > before, "leases from Redis again");
    assert_eq!(told.kinds(), ["redis_lost", "redis_back"], "lost once, however many calls found it lost");
}

/// Stalls both threads of the test's runtime for `stall` every `every`,
/// for `lasting`, as a loaded host stalls a process: the timers of the
/// calls waiting meanwhile fire late.
fn stall_the_host(stall: Duration, every: Duration, lasting: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let end = Instant::now() + lasting;
        while Instant::now() < end {
            tokio::time::sleep(every).await;
            let both: Vec<_> = (0..2).map(|_| tokio::spawn(async move { std::thread::sleep(stall) })).collect();
            for stalled in both {
                stalled.await.unwrap();
            }
        }
    })
}

/// Many workers waiting while Redis is lost book this process's own
/// schedule far ahead (96 workers at 25 calls/s: almost 4 s), and Redis is
/// back before every one of them found it lost. Calls booked alone still go
/// out at their own pace, outside the shared schedule: until they are gone
/// the process keeps to its share, and no call waiting for a lease takes
/// one from the fresh Redis on top of them. The host stalls meanwhile, so
/// calls booked alone wake too late for their slots and book others, after
/// the last one booked when Redis came back: those take a shared slot too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_booked_alone_are_out_before_redis_gives_the_whole_rate_again() {
    let Some(mut server) = RedisServer::start() else { return };
    let (rate, processes) = (100.0, 4);
    let limiter = limiter(&server, "bulkcall:{b}:limit", rate, 1, processes).await;
    take(std::slice::from_ref(&limiter), 4, 5).await;
    server.stop();
    let taking = tokio::spawn({
        let limiter = limiter.clone();
        async move { take(std::slice::from_ref(&limiter), 96, 500).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while limiter.is_shared() {
        assert!(Instant::now() < deadline, "Redis not found lost");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.restart();
    // 25 ms every 100 ms, while calls booked alone are still out.
    let stalls = stall_the_host(Duration::from_millis(25), Duration::from_millis(100), Duration::from_secs(3));
    let times = taking.await.unwrap();
    stalls.await.unwrap();
    assert!(limiter.is_shared(), "back on the shared limit");
    // This process is alone on Redis: the shared limit is all its own once
    // back, and never more (a burst of 1).
    let busiest = busiest_second(&times);
    assert!(busiest <= rate as usize + 1, "{busiest} calls in one second, above {rate}/s and a burst of 1");
}

/// Two processes' handles on the token shared in Redis (same token URL,
/// client, secret and key), each with a connection of its own.
async fn token_stores(server: &RedisServer) -> (SharedStore, SharedStore) {
    let settings =
        AuthSettings { token_url: Some("https://idp.example.com/oauth2/token".into()), ..AuthSettings::default() };
    let key = [7u8; 32];
    let mut stores = Vec::new();
    for _ in 0..2 {
        let redis = Redis::connect(&RedisUrl::parse(&server.url().into()).unwrap()).await.expect("redis answers");
        let credentials = bulkcall::config::Credentials::secret("client-1".into(), "secret-1".to_string().into());
        stores.push(SharedStore::new(redis, &bulkcall::token::request_key(&settings, &credentials), key));
    }
    let second = stores.pop().unwrap();
    (stores.pop().unwrap(), second)
}

/// What a store reads from Redis: the access token, if any.
async fn shared_token(store: &SharedStore) -> Option<String> {
    store.load().await.expect("redis answers").map(|entry| entry.access_token)
}

/// A 401 on one process removes the token it was refused with, and only
/// that one: after another process refreshed, the newer token stays for
/// every process, so a late 401 for an old token never costs them a refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_removes_only_the_token_that_was_refused() {
    let Some(server) = RedisServer::start() else { return };
    let (one, other) = token_stores(&server).await;
    let expires_at = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // The stored form (`token::cache::Entry`, not exported), as Redis holds it.
    let entry = |token: &str| {
        serde_json::from_value(serde_json::json!({
            "access_token": token, "token_type": "Bearer", "scope": null,
            "expires_at": expires_at, "lifetime_s": 3600.0,
        }))
        .unwrap()
    };

    one.store(&entry("token-A")).await.unwrap();
    assert_eq!(shared_token(&other).await.as_deref(), Some("token-A"), "the other process reads it");
    // The other process refreshed: token B replaces A in Redis.
    other.store(&entry("token-B")).await.unwrap();
    assert_eq!(shared_token(&one).await.as_deref(), Some("token-B"));

    // A call carrying A, sent before the refresh, comes back 401.
    one.remove_if("token-A").await.unwrap();
    assert_eq!(shared_token(&one).await.as_deref(), Some("token-B"), "B stays for this process");
    assert_eq!(shared_token(&other).await.as_deref(), Some("token-B"), "and for the other");

    // A 401 for B itself removes it: the next refresh fetches a new one.
    other.remove_if("token-B").await.unwrap();
    assert_eq!(shared_token(&one).await, None);
    assert_eq!(shared_token(&other).await, None);
    // Nothing to remove is no error.
    one.remove_if("token-B").await.unwrap();
}

/// The refresh lock: one holder at a time; the holder renews it while its
/// fetch takes long (a lock near its end gets its whole time again), and
/// nobody else can renew or release it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_lock_is_held_by_one_and_renewed_only_by_its_holder() {
    let Some(server) = RedisServer::start() else { return };
    let (one, other) = token_stores(&server).await;
    let lock = one.try_lock().await.unwrap().expect("nobody holds it yet");
    assert_eq!(other.try_lock().await.unwrap(), None, "held by the first");

    let url = RedisUrl::parse(&server.url().into()).unwrap();
    let mut conn = Redis::connect(&url).await.unwrap().conn;
    let keys: Vec<String> = ::redis::cmd("KEYS").arg("bulkcall:token:*:lock").query_async(&mut conn).await.unwrap();
    let [key] = &keys[..] else { panic!("one lock: {keys:?}") };
    let ttl = async |conn: &mut _| -> i64 { ::redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap() };
    // Its time nearly out, as after a long fetch.
    let _: i64 = ::redis::cmd("PEXPIRE").arg(key).arg(500).query_async(&mut conn).await.unwrap();

    assert!(!other.renew("not-the-holder").await.unwrap(), "only the holder renews");
    assert!(ttl(&mut conn).await <= 500);
    assert!(one.renew(&lock).await.unwrap());
    let renewed = ttl(&mut conn).await;
    assert!(renewed > 5_000, "renewed for its whole time: {renewed} ms left");

    other.unlock("not-the-holder").await;
    assert_eq!(other.try_lock().await.unwrap(), None, "only the holder releases");
    one.unlock(&lock).await;
    assert!(other.try_lock().await.unwrap().is_some(), "free once released");
}

/// A process that finds the shared token out of reach in Redis fetches its
/// own, and tells it once however many refreshes meet it, and once when
/// Redis answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_token_out_of_reach_is_told_once_and_so_is_its_return() {
    use bulkcall::token::TokenSource;
    let Some(mut server) = RedisServer::start() else { return };
    let gw = common::Gateway::start(common::sandbox_config()).await;
    let settings = AuthSettings { token_url: Some(gw.sandbox.token_url()), cache: false, ..AuthSettings::default() };
    let credentials =
        bulkcall::config::Credentials::secret(common::CLIENT_ID.into(), common::SECRET.to_string().into());
    let redis = Redis::connect(&RedisUrl::parse(&server.url().into()).unwrap()).await.expect("redis answers");
    let store = SharedStore::new(redis, &bulkcall::token::request_key(&settings, &credentials), [9u8; 32]);
    let (events, told) = Memory::events();
    let tokens =
        TokenSource::new(reqwest::Client::new(), &settings, credentials).with_shared(store).with_events(events);
    let mut token = tokens.get().await.expect("the first token");
    server.stop();
    // Two refreshes (after a 401 each) while Redis is out of reach.
    for _ in 0..2 {
        tokens.invalidate(token.generation);
        token = tokens.get().await.expect("a token fetched alone");
    }
    assert_eq!(told.kinds(), ["redis_lost", "token_refresh", "token_refresh"], "lost once");
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !told.kinds().contains(&"redis_back".to_string()) {
        assert!(Instant::now() < deadline, "Redis not found back: {:?}", told.kinds());
        tokens.invalidate(token.generation);
        token = tokens.get().await.expect("a token");
    }
    let kinds = told.kinds();
    assert_eq!(kinds.iter().filter(|k| *k == "redis_lost").count(), 1, "{kinds:?}");
    let told = told.0.lock().unwrap().clone();
    let refresh = told.iter().find(|e| e["kind"] == "token_refresh").unwrap();
    assert_eq!((&refresh["how"], &refresh["origin"]), (&"after_401".into(), &"fetched".into()));
}
