//! Over TLS: HTTP/2 when the gateway offers it, and certificates trusted
//! only from the built-in roots or `ca_file`.

mod common;

use bulkcall::error::ExitCode;
use bulkcall::sandbox::Sandbox;
use common::*;

/// A sandbox over TLS with a self-signed certificate for 127.0.0.1, and
/// that certificate in PEM.
async fn tls_gateway() -> (Gateway, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("a certificate");
    let pem = cert.cert.pem();
    let key = cert.key_pair.serialize_pem();
    let sandbox = Sandbox::start_tls(sandbox_config(), "127.0.0.1:0".parse().unwrap(), pem.as_bytes(), key.as_bytes())
        .await
        .expect("the TLS sandbox starts");
    assert!(sandbox.base_url().starts_with("https://"));
    (Gateway { sandbox, dir: tempfile::tempdir().unwrap() }, pem)
}

/// Runs the binary, expects exit 3 naming the untrusted certificate and
/// `ca_file`, and returns its stderr.
async fn refused_for_its_certificate(args: &[&str]) -> String {
    let output = bulkcall().args(args).env("NO_COLOR", "1").output().await.expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("is not trusted") && stderr.contains("ca_file"), "says what to do: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_over_http2_when_the_gateway_offers_it() {
    let (gw, pem) = tls_gateway().await;
    let ca = gw.write("ca.pem", &pem);
    gw.config(SECRET, &format!("ca_file = \"{}\"", ca.display()));
    let input = gw.write("rows.csv", &eligibility_csv(300_000_001, 300));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");

    // 48 workers: more than one lane on a machine with several cores.
    let code = gw.run_job(&job, &input, &out, &["-j", "48"]).await;
    assert_eq!(code, ExitCode::Success);
    let calls = gw.sandbox.recorded();
    assert_eq!(calls.len(), 300, "every row sent once");
    assert!(calls.iter().all(|c| c.version == "HTTP/2.0"), "every call over HTTP/2");
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 300);
    assert_eq!(gw.sandbox.stats().token_requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_outside_the_trusted_roots_is_refused_at_once() {
    let (gw, _) = tls_gateway().await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(300_000_001, 5));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);

    let args = ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "test"];
    let stderr = refused_for_its_certificate(&args).await;
    assert!(!stderr.contains("token request 1/"), "a refused certificate is not retried: {stderr}");
    assert_eq!(gw.sandbox.stats().token_requests, 0, "the TLS handshake failed before any request");
    assert_eq!(gw.sandbox.stats().api_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_without_certificates_is_a_config_error() {
    let (gw, _) = tls_gateway().await;
    let ca = gw.write("ca.pem", "not a certificate\n");
    gw.config(SECRET, &format!("ca_file = \"{}\"", ca.display()));
    let input = gw.write("rows.csv", &eligibility_csv(300_000_001, 5));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);

    let code = gw.run_job(&job, &input, &gw.path("run"), &[]).await;
    assert_eq!(code, ExitCode::Usage);
    assert_eq!(gw.sandbox.stats().token_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_certificate_outside_the_trusted_roots_stops_the_run() {
    // The token comes over plain HTTP from one sandbox; the API is another
    // one, over TLS with a certificate nothing trusts.
    let token_gw = Gateway::start(sandbox_config()).await;
    let (gw, _) = tls_gateway().await;
    let config = gw.write(
        "bulkcall.toml",
        &format!(
            "[test]\nrate = 0\nbase_url = \"{}\"\nauth.token_url = \"{}\"\nauth.client_id = \"{CLIENT_ID}\"\n\
             auth.client_secret = \"{SECRET}\"\nauth.cache = false\nheaders.environment = \"sandbox\"\n",
            gw.sandbox.base_url(),
            token_gw.sandbox.token_url()
        ),
    );
    let input = gw.write("rows.csv", &eligibility_csv(300_000_001, 500));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");

    let args = [job.to_str().unwrap(), input.to_str().unwrap(), out.to_str().unwrap(), config.to_str().unwrap()];
    refused_for_its_certificate(&["run", args[0], args[1], "-o", args[2], "-c", args[3], "-p", "test", "-j", "4"])
        .await;
    assert_eq!(gw.sandbox.stats().api_calls, 0);
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["total"], 0, "no row failed for a call that never reached the server: {summary}");
    assert!(!out.join("failures.csv").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_trust_store_is_used_too() {
    let (gw, pem) = tls_gateway().await;
    let config = gw.config(SECRET, "");
    let ca = gw.write("system-ca.pem", &pem);

    // SSL_CERT_FILE stands in for a CA installed system-wide.
    let trusted = bulkcall()
        .args(["token", "-c", config.to_str().unwrap(), "-p", "test"])
        .env("NO_COLOR", "1")
        .env("SSL_CERT_FILE", &ca)
        .output()
        .await
        .unwrap();
    assert_eq!(trusted.status.code(), Some(0), "{}", String::from_utf8_lossy(&trusted.stderr));
    assert_eq!(gw.sandbox.stats().token_requests, 1);
}
