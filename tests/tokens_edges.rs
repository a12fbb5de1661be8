//! The token endpoint at its edges, through the real binary: a redirect is
//! never followed, an outage is "try again later" (75) while a rejection
//! stays 3, no URL path or query reaches stderr, the answer is read up to
//! 64 KiB, and a cached or shared token is never reused for another
//! token request.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkcall::sandbox::SandboxConfig;
use common::*;
use std::time::Duration;

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A token endpoint of the test's own at `http://ADDR/oauth2/token`: every
/// request is counted and answered by `answer`.
async fn token_endpoint<F>(answer: F) -> (String, Arc<AtomicU64>)
where
    F: Fn() -> Response + Clone + Send + Sync + 'static,
{
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    let app = Router::new().fallback(move || {
        let (counted, answer) = (counted.clone(), answer.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            answer()
        }
    });
    (format!("http://{}/oauth2/token", serve(app).await), hits)
}

/// A config whose `test` profile calls the sandbox with tokens from `token_url`.
fn config(gw: &Gateway, token_url: &str, extra: &str) -> PathBuf {
    let text = format!(
        "[default]\nrate = 0\nout_dir = \"{out}\"\n\n[test]\nbase_url = \"{base}\"\nauth.token_url = \"{token_url}\"\n\
         auth.client_id = \"{CLIENT_ID}\"\nauth.client_secret = \"{SECRET}\"\nauth.cache_dir = \"{cache}\"\n\
         headers.environment = \"sandbox\"\n{extra}\n",
        out = gw.path("out").display(),
        base = gw.sandbox.base_url(),
        cache = gw.path("token-cache").display(),
    );
    gw.write("bulkcall.toml", &text)
}

struct Ran {
    code: Option<i32>,
    stderr: String,
}

async fn run(gw: &Gateway, config: &std::path::Path, rows: u64, out: &str) -> Ran {
    let input = gw.write("rows.csv", &eligibility_csv(1, rows));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let output = run_command(&job, &input, &gw.path(out), config).output().await.unwrap();
    Ran { code: output.status.code(), stderr: String::from_utf8_lossy(&output.stderr).into_owned() }
}

async fn token_command(config: &std::path::Path) -> Ran {
    let output = bulkcall().args(["token", "-c", config.to_str().unwrap(), "-p", "test"]).output().await.unwrap();
    Ran { code: output.status.code(), stderr: String::from_utf8_lossy(&output.stderr).into_owned() }
}

fn answer(status: u16, headers: &[(header::HeaderName, &str)], body: &str) -> Response {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(name, HeaderValue::from_str(value).unwrap());
    }
    map.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    (StatusCode::from_u16(status).unwrap(), map, body.to_string()).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_redirect_stops_the_run_naming_the_token_url_and_the_locations_origin() {
    let (target, target_hits) =
        token_endpoint(|| answer(200, &[], r#"{"access_token":"stolen","expires_in":60}"#)).await;
    let target_origin = target.trim_end_matches("/oauth2/token").to_string();
    for status in [301u16, 302, 303, 307, 308] {
        let gw = Gateway::start(sandbox_config()).await;
        let location = format!("{target}?client_secret_goes=here");
        let (token_url, hits) = {
            let location = location.clone();
            token_endpoint(move || answer(status, &[(header::LOCATION, &location)], "")).await
        };
        let config = config(&gw, &token_url, "");
        let ran = run(&gw, &config, 3, "run").await;
        assert_eq!(ran.code, Some(3), "{status}: {}", ran.stderr);
        assert_eq!(hits.load(Ordering::SeqCst), 1, "{status}: one request, not retried");
        assert!(ran.stderr.contains(&token_url), "{status}: names the token URL: {}", ran.stderr);
        assert!(
            ran.stderr.contains(&format!("{status} with a redirect to {target_origin};")),
            "{status}: names the Location's origin alone: {}",
            ran.stderr
        );
        assert!(!ran.stderr.contains("client_secret_goes"), "{status}: not the Location's query: {}", ran.stderr);
        assert!(!ran.stderr.contains(SECRET));
        assert_eq!(gw.sandbox.stats().api_calls, 0, "{status}: no call without a token");
    }
    assert_eq!(target_hits.load(Ordering::SeqCst), 0, "the redirect's target was never asked for a token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_outage_exits_75_and_a_rejection_stays_3() {
    let gw = Gateway::start(sandbox_config()).await;

    // Unreachable, with a key in the token URL's query: 75, the query never shown.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("http://{closed}/oauth2/v1/token?tenant=TENANT-KEY-93a1");
    let ran = run(&gw, &config(&gw, &url, ""), 3, "unreachable").await;
    assert_eq!(ran.code, Some(75), "{}", ran.stderr);
    assert!(ran.stderr.contains("try again later"), "{}", ran.stderr);
    assert!(!ran.stderr.contains("TENANT-KEY"), "no query on stderr: {}", ran.stderr);
    assert!(ran.stderr.contains(&format!("http://{closed}/oauth2/v1/token?...")), "{}", ran.stderr);
    // The transport errors themselves name the origin alone.
    let transport: Vec<&str> = ran.stderr.lines().filter(|l| l.contains("token request")).collect();
    assert_eq!(transport.len(), 5, "each of the five attempts warned: {}", ran.stderr);
    for line in transport {
        let (_, error) = line.split_once("failed: ").expect("the error follows");
        assert!(error.contains(&format!("http://{closed}")), "{line}");
        assert!(!error.contains("/oauth2") && !error.contains("tenant"), "no path or query: {line}");
    }
    assert!(!gw.path("unreachable").join("summary.json").exists());

    // 503 through every attempt: 75 after five requests.
    let (url, hits) =
        token_endpoint(|| answer(503, &[(header::RETRY_AFTER, "0")], r#"{"error":"temporarily_unavailable"}"#)).await;
    let ran = run(&gw, &config(&gw, &url, ""), 3, "unavailable").await;
    assert_eq!(ran.code, Some(75), "{}", ran.stderr);
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    assert!(ran.stderr.contains("after 5 attempts") && ran.stderr.contains("HTTP 503"), "{}", ran.stderr);

    // Rejected credentials: 3, one request.
    let (url, hits) =
        token_endpoint(|| answer(401, &[], r#"{"error":"invalid_client","error_description":"bad secret"}"#)).await;
    let ran = run(&gw, &config(&gw, &url, ""), 3, "rejected").await;
    assert_eq!(ran.code, Some(3), "{}", ran.stderr);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert!(ran.stderr.contains("rejected the credentials"), "{}", ran.stderr);

    // Not a token endpoint (404): 3, one request, the URL to check named.
    let (url, hits) = token_endpoint(|| answer(404, &[], "no such page")).await;
    let ran = run(&gw, &config(&gw, &url, ""), 3, "not-found").await;
    assert_eq!(ran.code, Some(3), "{}", ran.stderr);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert!(ran.stderr.contains("HTTP 404") && ran.stderr.contains("check auth.token_url"), "{}", ran.stderr);
    assert_eq!(gw.sandbox.stats().api_calls, 0);
}

/// A token endpoint in front of the sandbox's that can be taken down: then
/// it answers 503.
async fn switchable(sandbox_token_url: String) -> (String, Arc<AtomicBool>, Arc<AtomicU64>) {
    let down = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let (is_down, counted) = (down.clone(), refused.clone());
    let client = reqwest::Client::new();
    let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let (is_down, counted, client, url) =
            (is_down.clone(), counted.clone(), client.clone(), sandbox_token_url.clone());
        async move {
            if is_down.load(Ordering::SeqCst) {
                counted.fetch_add(1, Ordering::SeqCst);
                return answer(503, &[(header::RETRY_AFTER, "0")], r#"{"error":"temporarily_unavailable"}"#);
            }
            let mut request = client.post(url).body(body);
            if let Some(kind) = headers.get(header::CONTENT_TYPE) {
                request = request.header(header::CONTENT_TYPE, kind);
            }
            let got = request.send().await.unwrap();
            let status = got.status().as_u16();
            answer(status, &[], &got.text().await.unwrap())
        }
    });
    (format!("http://{}/oauth2/token", serve(app).await), down, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_outage_mid_run_exits_75_and_resume_finishes_every_row_once() {
    let gw = Gateway::start(SandboxConfig { token_lifetime: Duration::from_secs(2), ..sandbox_config() }).await;
    let (url, down, refused) = switchable(gw.sandbox.token_url()).await;
    // Two-second tokens, ten rows a second: the outage meets a refresh.
    let config = config(&gw, &url, "auth.cache = false\nrate = 10\nburst = 1");
    let input = gw.write("rows.csv", &eligibility_csv(1, 40));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let outage = async {
        gw.wait_for_calls(5).await;
        down.store(true, Ordering::SeqCst);
    };
    let (output, ()) = tokio::join!(run_command(&job, &input, &out, &config).output(), outage);
    let output = output.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("try again later"), "{stderr}");
    assert!(refused.load(Ordering::SeqCst) >= 5, "the refresh tried its five attempts");
    let sent = gw.sandbox.stats().api_calls;
    assert!((5..40).contains(&sent), "stopped part way: {sent} calls");
    // What happened when: the refresh that failed and the abort it caused.
    let events = jsonl(&out.join("events.jsonl"));
    let failed: Vec<&serde_json::Value> = events.iter().filter(|e| e["kind"] == "token_refresh_failed").collect();
    assert!(!failed.is_empty() && failed.iter().all(|e| e["error"] == "unavailable"), "{events:?}");
    // Each event is a refresh of its own (five refused requests), not a
    // call that waited for one.
    let refused = refused.load(Ordering::SeqCst);
    assert!(failed.len() as u64 * 5 <= refused, "{} failed refreshes, {refused} requests: {events:?}", failed.len());
    let abort = events.iter().find(|e| e["kind"] == "abort").expect("an abort event");
    assert_eq!((abort["reason"].as_str(), abort["exit"].as_u64()), (Some("token"), Some(75)));
    assert!(failed.iter().all(|e| e["at_ms"].as_u64() <= abort["at_ms"].as_u64()), "{events:?}");

    down.store(false, Ordering::SeqCst);
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let received = gw.received_by_control_number();
    assert_eq!(received.len(), 40, "every row reached the gateway");
    assert!(received.values().all(|calls| calls.len() == 1), "each once");
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_answer_is_read_up_to_64_kib() {
    let gw = Gateway::start(sandbox_config()).await;
    let padded = |size: usize| {
        let token = "t".repeat(size);
        format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":600}}"#)
    };
    let small = padded(60 * 1024);
    let (url, _) = token_endpoint(move || answer(200, &[], &small)).await;
    let ran = token_command(&config(&gw, &url, "auth.cache = false")).await;
    assert_eq!(ran.code, Some(0), "a 60 KiB answer is a token: {}", ran.stderr);

    let large = padded(65 * 1024);
    let (url, hits) = token_endpoint(move || answer(200, &[], &large)).await;
    let ran = token_command(&config(&gw, &url, "auth.cache = false")).await;
    assert_eq!(ran.code, Some(3), "{}", ran.stderr);
    assert!(ran.stderr.contains("longer than 64 KiB"), "{}", ran.stderr);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_token_is_never_reused_for_another_token_request() {
    let gw = Gateway::start(sandbox_config()).await;
    let url = gw.sandbox.token_url();
    let requests = || gw.sandbox.stats().token_requests;
    let a = "auth.audience = \"https://fhir-a.example.com\"";
    let b = "auth.audience = \"https://fhir-b.example.com\"";
    for (extra, expected, what) in [
        (a, 1, "first token for audience a"),
        (a, 1, "audience a again: from the cache"),
        (b, 2, "another audience: another token"),
        ("auth.audience = \"https://fhir-a.example.com\"\nauth.params.resource = \"urn:x\"", 3, "an extra parameter"),
        ("auth.audience = \"https://fhir-a.example.com\"\nauth.style = \"form\"", 4, "another style"),
        (a, 4, "audience a once more: still cached"),
    ] {
        let ran = token_command(&config(&gw, &url, extra)).await;
        assert_eq!(ran.code, Some(0), "{what}: {}", ran.stderr);
        assert_eq!(requests(), expected, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_token_is_never_reused_for_another_token_request() {
    let Some(redis) = common::redis::RedisServer::start() else { return };
    let gw = Gateway::start(sandbox_config()).await;
    let url = gw.sandbox.token_url();
    let input = gw.write("rows.csv", &eligibility_csv(1, 3));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let a = "auth.audience = \"https://fhir-a.example.com\"";
    let b = "auth.audience = \"https://fhir-b.example.com\"";
    let c = "auth.audience = \"https://fhir-a.example.com\"\nauth.params.resource = \"urn:x\"";
    for (n, (extra, expected)) in [(a, 1), (a, 1), (b, 2), (c, 3), (a, 3)].into_iter().enumerate() {
        let config = config(&gw, &url, &format!("auth.cache = false\n{extra}"));
        let out = gw.path(&format!("run{n}"));
        let output = run_command(&job, &input, &out, &config)
            .env("BULKCALL_REDIS_URL", redis.url())
            .env("BULKCALL_TOKEN_KEY", "ab".repeat(32))
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "run {n}: {stderr}");
        assert_eq!(gw.sandbox.stats().token_requests, expected, "run {n} ({extra})");
    }
}
