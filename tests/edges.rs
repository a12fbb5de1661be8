//! Where bulkcall meets the outside: redirects, files read back on resume,
//! errors that could quote row values, the run directory's mode.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header::LOCATION};
use common::*;

/// A server on a port of its own that counts every request it gets and
/// answers 200: where a redirect points.
async fn elsewhere() -> (String, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    let app = Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            "<html>login</html>"
        }
    });
    (format!("http://{}", serve(app).await), hits)
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A gateway whose API answers every call with `status` and a Location on
/// another origin, and counts the calls.
async fn redirecting(status: StatusCode, to: String) -> (String, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let app = Router::new().fallback(move || {
        let (counted, to) = (counted.clone(), to.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut headers = HeaderMap::new();
            headers.insert(LOCATION, format!("{to}/login?next=claims").parse().unwrap());
            (status, headers, "moved")
        }
    });
    (format!("http://{}", serve(app).await), calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_an_answer_never_followed() {
    for status in [301u16, 302, 303, 307, 308] {
        let gw = Gateway::start(sandbox_config()).await;
        let (target, hits) = elsewhere().await;
        let (api, calls) = redirecting(StatusCode::from_u16(status).unwrap(), target.clone()).await;
        // The token from the sandbox, the calls to the redirecting gateway,
        // with a header that must not travel.
        let config = gw.config(SECRET, "headers.x-api-key = \"k-3f9a\"");
        let job = gw.write("claims.toml", &CLAIMS_JOB.replace("url = \"", &format!("url = \"{api}")));
        let input = gw.write("rows.csv", &eligibility_csv(100_000_001, 5));
        let out = gw.path("run");
        let output = run_command(&job, &input, &out, &config).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{status}: the rows failed, the run finished: {stderr}");
        assert_eq!(calls.load(Ordering::SeqCst), 5, "{status}: each row sent once, not retried");
        assert_eq!(hits.load(Ordering::SeqCst), 0, "{status}: nothing reached the redirect's target");

        let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap();
        let mut reader = csv::Reader::from_reader(failures.as_bytes());
        let headers = reader.headers().unwrap().clone();
        let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
        let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(records.len(), 5, "{status}: every row in failures");
        for record in &records {
            assert_eq!(&record[column("_error")], "client_error", "{status}");
            assert_eq!(&record[column("_status")], status.to_string());
            let message = &record[column("_message")];
            assert!(
                message.contains(&format!("{target}/login?next=claims")),
                "{status}: names the Location: {message}"
            );
            assert!(message.contains("not followed"), "{status}: {message}");
        }
        assert!(!out.join("results.jsonl").exists() || jsonl(&out.join("results.jsonl")).is_empty());
    }
}
