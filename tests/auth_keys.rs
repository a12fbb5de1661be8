//! private_key_jwt through the real binary: keys made by `openssl genpkey`,
//! registered with `bulkcall jwks`, assertions verified by the sandbox and,
//! independently, by `openssl dgst -verify`; a replayed assertion refused;
//! tokens of a few seconds; no key material in any output.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkcall::sandbox::SandboxConfig;
use common::*;
use serde_json::Value;

/// `openssl` on PATH; `None` (after saying how to install it) when it is
/// missing and this is not CI, where a missing one fails the test.
fn openssl() -> Option<()> {
    if std::process::Command::new("openssl").arg("version").output().is_ok() {
        return Some(());
    }
    let hint = "openssl is not installed: `apt-get install openssl`";
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{hint}");
    eprintln!("skipped: {hint}");
    None
}

fn sh(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A private key made as README says, 0600: `rsa` (3072 bits) or `p384`.
fn make_key(dir: &Path, name: &str, kind: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    match kind {
        "rsa" => sh(&["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out", p]),
        "p384" => sh(&["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", p]),
        _ => unreachable!(),
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn bulkcall_with(args: &[&str]) -> Output {
    let out = bulkcall().args(args).stdout(Stdio::piped()).output().await.unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `bulkcall jwks ARGS`, its JWKS parsed.
async fn jwks(args: &[&str]) -> (Value, Output) {
    let mut all = vec!["jwks"];
    all.extend_from_slice(args);
    let out = bulkcall_with(&all).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    (serde_json::from_str(&out.stdout).expect("a JWKS on stdout"), out)
}

/// A token endpoint in front of the sandbox's that keeps every request body.
async fn recording(sandbox_token_url: String) -> (String, Arc<Mutex<Vec<String>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let client = reqwest::Client::new();
    let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let (kept, client, url) = (kept.clone(), client.clone(), sandbox_token_url.clone());
        async move {
            kept.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
            let kind = headers.get(header::CONTENT_TYPE).cloned();
            let mut request = client.post(url).body(body);
            if let Some(kind) = kind {
                request = request.header(header::CONTENT_TYPE, kind);
            }
            let got = request.send().await.unwrap();
            let status = StatusCode::from_u16(got.status().as_u16()).unwrap();
            (status, [(header::CONTENT_TYPE, "application/json")], got.text().await.unwrap()).into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/oauth2/token"), bodies)
}

/// A `test` profile with `private_key_jwt` against the sandbox; `extra`
/// lines go into it.
fn key_config(gw: &Gateway, token_url: &str, extra: &str) -> PathBuf {
    let text = format!(
        "[default]\nrate = 0\nout_dir = \"{out}\"\n\n[test]\nbase_url = \"{base}\"\nheaders.environment = \"sandbox\"\n\
         auth.style = \"private_key_jwt\"\nauth.token_url = \"{token_url}\"\nauth.client_id = \"{CLIENT_ID}\"\n\
         auth.scope = \"system/Patient.read system/Coverage.read\"\nauth.cache = false\n{extra}\n",
        out = gw.path("out").display(),
        base = gw.sandbox.base_url(),
    );
    gw.write("bulkcall.toml", &text)
}

fn form(body: &str) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(body.as_bytes()).into_owned().collect()
}

/// A JWS ECDSA signature (`r || s`) as the DER `openssl dgst` verifies.
fn ecdsa_der(raw: &[u8]) -> Vec<u8> {
    let integer = |half: &[u8]| {
        let mut v: Vec<u8> = half.iter().copied().skip_while(|b| *b == 0).collect();
        if v.first().is_none_or(|b| b & 0x80 != 0) {
            v.insert(0, 0);
        }
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    };
    let (r, s) = raw.split_at(raw.len() / 2);
    let body = [integer(r), integer(s)].concat();
    let mut der = vec![0x30];
    if body.len() >= 0x80 {
        der.push(0x81);
    }
    der.push(body.len() as u8);
    der.extend(body);
    der
}

/// Verifies the assertion's signature with `openssl dgst`, against the
/// public key openssl derives from the private one itself.
fn openssl_verifies(dir: &Path, key: &Path, assertion: &str, digest: &str, ecdsa: bool) -> bool {
    let public = dir.join("public.pem");
    sh(&["openssl", "pkey", "-in", key.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    let (signed, signature) = assertion.rsplit_once('.').unwrap();
    let raw = URL_SAFE_NO_PAD.decode(signature).unwrap();
    let signature = if ecdsa { ecdsa_der(&raw) } else { raw };
    std::fs::write(dir.join("signed"), signed).unwrap();
    std::fs::write(dir.join("signature"), signature).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["dgst", &format!("-{digest}"), "-verify", public.to_str().unwrap(), "-signature"])
        .arg(dir.join("signature"))
        .arg(dir.join("signed"))
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK")
}

fn claims(assertion: &str) -> (Value, Value) {
    let mut parts = assertion.split('.');
    let mut part = || serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap()).unwrap();
    (part(), part())
}

/// Every file under `dir`, read whole.
fn all_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = vec![];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(all_files(&path));
        } else {
            found.push((path.clone(), String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned()));
        }
    }
    found
}

/// Lines of the key file that hold key material (the base64 body).
fn key_lines(key: &Path) -> Vec<String> {
    std::fs::read_to_string(key).unwrap().lines().filter(|l| !l.starts_with("-----")).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs384_and_es384_assertions_are_accepted_by_the_sandbox_and_verified_by_openssl() {
    let Some(()) = openssl() else { return };
    for (kind, alg, digest, ecdsa) in [("rsa", "RS384", "sha384", false), ("p384", "ES384", "sha384", true)] {
        let dir = tempfile::tempdir().unwrap();
        let key = make_key(dir.path(), "bulkcall.pem", kind);
        let (set, out) = jwks(&["--key", key.to_str().unwrap(), "--key-id", "2026-12"]).await;
        let jwk = &set["keys"][0];
        assert_eq!(
            (jwk["kid"].as_str(), jwk["alg"].as_str(), jwk["use"].as_str()),
            (Some("2026-12"), Some(alg), Some("sig"))
        );
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(jwk.get(private).is_none(), "{kind}: no private member {private}: {jwk}");
        }
        for line in key_lines(&key) {
            assert!(!out.stdout.contains(&line) && !out.stderr.contains(&line), "{kind}: no key material printed");
        }

        // The sandbox retries: its first two token requests answer 503.
        let gw = Gateway::start(SandboxConfig {
            jwks: Some(serde_json::from_value(set.clone()).unwrap()),
            fail_token_requests: 2,
            ..sandbox_config()
        })
        .await;
        let (url, bodies) = recording(gw.sandbox.token_url()).await;
        let extra = format!(
            "auth.private_key_file = \"{}\"\nauth.key_id = \"2026-12\"\nauth.assertion_audience = \"{}\"",
            key.display(),
            gw.sandbox.token_url()
        );
        let config = key_config(&gw, &url, &extra);
        let input = gw.write("rows.csv", &eligibility_csv(1, 20));
        let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
        let run_dir = gw.path("run");
        // A secret left in the environment is ignored, said once, never sent.
        let output = run_command(&job, &input, &run_dir, &config)
            .env("BULKCALL_CLIENT_SECRET", "left-over-secret-4b1d")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{kind}: {stderr}");
        assert_eq!(stderr.matches("sends none: it is ignored").count(), 1, "{kind}: one warning: {stderr}");
        assert!(!stderr.contains("left-over-secret"), "{kind}");
        assert_eq!(gw.sandbox.stats().token_requests, 3, "{kind}: two 503s, then a token");
        assert_eq!(gw.sandbox.stats().api_calls, 20);
        assert!(gw.sandbox.refused_assertions().is_empty(), "{kind}: {:?}", gw.sandbox.refused_assertions());

        let bodies = bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 3);
        let mut jtis = std::collections::HashSet::new();
        for body in &bodies {
            let f = form(body);
            assert_eq!(f["grant_type"], "client_credentials");
            assert_eq!(f["client_assertion_type"], "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
            assert_eq!(f["scope"], "system/Patient.read system/Coverage.read");
            assert!(!f.contains_key("client_secret") && !body.contains("left-over-secret"), "{kind}: no secret");
            let (header, claims) = claims(&f["client_assertion"]);
            assert_eq!(header["alg"], alg);
            assert_eq!(header["kid"], "2026-12");
            assert_eq!(header["typ"], "JWT");
            assert_eq!(claims["iss"], CLIENT_ID);
            assert_eq!(claims["sub"], CLIENT_ID);
            assert_eq!(claims["aud"], gw.sandbox.token_url().as_str());
            assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 240, "4m by default");
            assert!(jtis.insert(claims["jti"].as_str().unwrap().to_string()), "{kind}: a new jti for every attempt");
            assert!(
                openssl_verifies(dir.path(), &key, &f["client_assertion"], digest, ecdsa),
                "{kind}: openssl agrees"
            );
        }
        // A tampered assertion is refused by openssl too: the check can fail.
        let tampered = form(&bodies[0])["client_assertion"].replacen("eyJ", "eyK", 1);
        assert!(!openssl_verifies(dir.path(), &key, &tampered, digest, ecdsa));

        // No key material anywhere: stderr, the run directory.
        for line in key_lines(&key) {
            assert!(!stderr.contains(&line), "{kind}: stderr");
            for (path, text) in all_files(&run_dir) {
                assert!(!text.contains(&line) && !text.contains("PRIVATE KEY"), "{kind}: key material in {path:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_assertion_and_an_unregistered_key_are_refused() {
    let Some(()) = openssl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "registered.pem", "p384");
    let other = make_key(dir.path(), "other.pem", "p384");
    let (set, _) = jwks(&["--key", key.to_str().unwrap()]).await;
    let gw =
        Gateway::start(SandboxConfig { jwks: Some(serde_json::from_value(set).unwrap()), ..sandbox_config() }).await;
    let (url, bodies) = recording(gw.sandbox.token_url()).await;
    let extra = format!(
        "auth.private_key_file = \"{}\"\nauth.assertion_audience = \"{}\"",
        key.display(),
        gw.sandbox.token_url()
    );
    let config = key_config(&gw, &url, &extra);
    let out = bulkcall_with(&["token", "-c", config.to_str().unwrap(), "-p", "test"]).await;
    assert_eq!(out.code, Some(0), "the default kid (the thumbprint) is the one jwks printed: {}", out.stderr);
    // The same key from a variable (auth.private_key_env).
    let from_env =
        format!("auth.private_key_env = \"EHR_KEY\"\nauth.assertion_audience = \"{}\"", gw.sandbox.token_url());
    let env_config = key_config(&gw, &url, &from_env);
    let out = bulkcall()
        .args(["token", "-c", env_config.to_str().unwrap(), "-p", "test"])
        .env("EHR_KEY", std::fs::read_to_string(&key).unwrap())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(bodies.lock().unwrap().len(), 2);

    // The same assertion again, as an eavesdropper would send it.
    let body = bodies.lock().unwrap()[0].clone();
    let replay = reqwest::Client::new()
        .post(gw.sandbox.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status().as_u16(), 400);
    let answer: Value = replay.json().await.unwrap();
    assert_eq!(answer["error"], "invalid_client");
    assert!(gw.sandbox.refused_assertions()[0].contains("used before"), "{:?}", gw.sandbox.refused_assertions());

    // A key the server does not know: exit 3, not retried, no key material.
    let config = key_config(&gw, &url, &extra.replace(key.to_str().unwrap(), other.to_str().unwrap()));
    let before = gw.sandbox.stats().token_requests;
    let out = bulkcall_with(&["token", "-c", config.to_str().unwrap(), "-p", "test"]).await;
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(out.stderr.contains("invalid_client"), "{}", out.stderr);
    assert_eq!(gw.sandbox.stats().token_requests, before + 1);
    for line in key_lines(&other) {
        assert!(!out.stderr.contains(&line) && !out.stdout.contains(&line));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_from_the_profile_registers_what_runs_sign_with_and_a_readable_key_is_warned_about() {
    let Some(()) = openssl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "bulkcall.pem", "rsa");
    let gw = Gateway::start(sandbox_config()).await;
    let url = gw.sandbox.token_url();
    let config =
        key_config(&gw, &url, &format!("auth.private_key_file = \"{}\"\nauth.algorithm = \"RS256\"", key.display()));
    let (set, out) = jwks(&["-c", config.to_str().unwrap(), "-p", "test"]).await;
    assert_eq!(set["keys"][0]["alg"], "RS256");
    assert!(!out.stderr.contains("can be read by other users"), "0600: no warning: {}", out.stderr);

    let gw =
        Gateway::start(SandboxConfig { jwks: Some(serde_json::from_value(set).unwrap()), ..sandbox_config() }).await;
    let config = key_config(
        &gw,
        &gw.sandbox.token_url(),
        &format!("auth.private_key_file = \"{}\"\nauth.algorithm = \"RS256\"", key.display()),
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = bulkcall_with(&["token", "-c", config.to_str().unwrap(), "-p", "test"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("holds a private key and can be read by other users"), "{}", out.stderr);
    assert!(gw.sandbox.refused_assertions().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_three_seconds_are_refreshed_early_by_one_assertion_each() {
    let Some(()) = openssl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "bulkcall.pem", "p384");
    let (set, _) = jwks(&["--key", key.to_str().unwrap()]).await;
    let gw = Gateway::start(SandboxConfig {
        jwks: Some(serde_json::from_value(set).unwrap()),
        token_lifetime: Duration::from_secs(3),
        record: false,
        ..sandbox_config()
    })
    .await;
    let config = key_config(&gw, &gw.sandbox.token_url(), &format!("auth.private_key_file = \"{}\"", key.display()));
    let input = gw.write("rows.csv", &eligibility_csv(1, 400));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let output = run_command(&job, &input, &out, &config).args(["-j", "32", "--rate", "50"]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let stats = gw.sandbox.stats();
    assert_eq!((stats.expired_token_calls, stats.unauthorized), (0, 0), "no call carried an expired token");
    assert!(gw.sandbox.refused_assertions().is_empty(), "{:?}", gw.sandbox.refused_assertions());
    // 8 s of calls with 3 s tokens refreshed 1.1-1.5 s before expiry: a token
    // every 1.5-1.9 s, one request each, never one per worker.
    let seconds = json(&out.join("summary.json"))["duration_s"].as_f64().unwrap();
    let times = gw.sandbox.token_request_times();
    eprintln!("one process: {} token requests in {seconds} s", times.len());
    assert!(
        times.len() >= 4 && times.len() as f64 <= seconds / 1.5 + 2.0,
        "{} token requests in {seconds} s",
        times.len()
    );
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(1000), "two token requests close together: {times:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_share_one_short_lived_token_per_lifetime_through_redis() {
    let Some(()) = openssl() else { return };
    let Some(redis) = common::redis::RedisServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "bulkcall.pem", "p384");
    let (set, _) = jwks(&["--key", key.to_str().unwrap()]).await;
    let gw = Gateway::start(SandboxConfig {
        jwks: Some(serde_json::from_value(set).unwrap()),
        token_lifetime: Duration::from_secs(3),
        record: false,
        ..sandbox_config()
    })
    .await;
    let config = key_config(&gw, &gw.sandbox.token_url(), &format!("auth.private_key_file = \"{}\"", key.display()));
    let input = gw.write("rows.csv", &eligibility_csv(1, 600));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let shard = |k: u32| {
        let mut command = bulkcall();
        command
            .args(["run", job.to_str().unwrap(), input.to_str().unwrap(), "--shard", &format!("{k}/2")])
            .args(["--run-id", "r1", "-o", gw.path("run").to_str().unwrap(), "--rate", "80", "-j", "8"])
            .args(["-c", config.to_str().unwrap(), "-p", "test", "--progress", "never"])
            .env("BULKCALL_REDIS_URL", redis.url())
            .env("BULKCALL_TOKEN_KEY", "cd".repeat(32));
        command.spawn().unwrap()
    };
    let children = [shard(0), shard(1)];
    for child in children {
        let output = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        assert!(!stderr.contains("fetches its own token"), "{stderr}");
    }
    let stats = gw.sandbox.stats();
    assert_eq!((stats.api_calls, stats.expired_token_calls, stats.unauthorized), (600, 0, 0));
    assert!(gw.sandbox.refused_assertions().is_empty(), "{:?}", gw.sandbox.refused_assertions());
    // About 7.5 s of 3 s tokens refreshed 1.1-1.5 s before expiry, shared by
    // both shards: one assertion per token, never one per shard.
    let times = gw.sandbox.token_request_times();
    let span = *times.last().unwrap() - times[0];
    eprintln!("two shards: {} token requests over {span:?} for {} calls", times.len(), stats.api_calls);
    assert!(
        times.len() >= 3 && times.len() as f64 <= span.as_secs_f64() / 1.5 + 2.0,
        "{} token requests over {span:?}",
        times.len()
    );
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_secs(1), "two token requests close together: {times:?}");
    }
}
