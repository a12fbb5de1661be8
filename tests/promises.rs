//! README promises held on the real binary that no other test file covers:
//! SIGTERM, a second signal, `--grace` running out, `--log-format json`,
//! `token --refresh`, proxies and `demo`.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bulkcall::sandbox::SandboxConfig;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Sends `signal` to the child this test started.
fn signal(child: &tokio::process::Child, signal: libc::c_int) {
    let pid = child.id().expect("the child runs") as libc::pid_t;
    // SAFETY: a plain kill(2) of the child this test started.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Reads the child's stderr until a line holding `wanted`; the lines read.
async fn read_until(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>, wanted: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no `{wanted}` on stderr in 30 s: {seen}"))
            .unwrap()
            .unwrap_or_else(|| panic!("stderr ended before `{wanted}`: {seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(wanted) {
            return seen;
        }
    }
}

/// A run of 100 rows at `-j 4` against a gateway answering each call after
/// `latency`, started and left until all four workers have a call in
/// flight: the gateway, the run directory and the child.
async fn four_calls_in_flight(
    latency: Duration,
    flags: &[&str],
) -> (Gateway, std::path::PathBuf, tokio::process::Child) {
    let gw = Gateway::start(SandboxConfig { latency, ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 100));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let out = gw.path("run");
    let child = run_command(&job, &input, &out, &config).args(["-j", "4"]).args(flags).spawn().unwrap();
    gw.wait_for_calls(4).await;
    (gw, out, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_takes_no_new_row_and_records_every_call_in_flight() {
    // Each call takes 300 ms: after the first four, four more are in flight
    // when the signal comes.
    let (gw, out, child) = four_calls_in_flight(Duration::from_millis(300), &[]).await;
    gw.wait_for_calls(8).await;
    signal(&child, libc::SIGTERM);
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "a graceful stop, not death by SIGTERM: {stderr}");
    assert!(stderr.contains("stopping: no new rows"), "{stderr}");
    let sent = gw.settled().await;
    // Every call that went out finished within the grace (30 s by default)
    // and has its outcome; no row was taken after the signal.
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), sent, "every call in flight recorded");
    assert!(started_not_done(&out).is_empty(), "nothing in doubt");
    assert!(sent < 100, "the run stopped: {sent} calls");
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["exit_code"].as_u64(), summary["total"].as_u64()), (Some(130), Some(sent as u64)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    // Calls take 10 s: a run that waited for them would take that long.
    let latency = Duration::from_secs(10);
    let (gw, out, mut child) = four_calls_in_flight(latency, &[]).await;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    signal(&child, libc::SIGTERM);
    read_until(&mut lines, "stopping: no new rows").await;
    let second = Instant::now();
    signal(&child, libc::SIGINT);
    let said = read_until(&mut lines, "stopped at once").await;
    let status = child.wait().await.unwrap();
    // Well under the calls' 10 s, even on a busy machine.
    assert!(second.elapsed() < Duration::from_secs(3), "exited {:?} after the second signal", second.elapsed());
    assert_eq!(status.code(), Some(130), "{said}");
    // It says what it leaves and what to run next.
    assert!(said.contains("stopped at once: 4 rows were in flight or waiting to retry"), "{said}");
    assert!(
        said.contains(&format!("send the rest with: {} resume {}", env!("CARGO_BIN_EXE_bulkcall"), out.display())),
        "{said}"
    );
    // The four calls in flight have no outcome: in doubt, for resume.
    assert!(jsonl(&out.join("results.jsonl")).is_empty());
    // (The gateway records a call once it answered it, 10 s on: counted here
    // as it arrived.)
    let in_doubt = started_not_done(&out);
    assert_eq!((in_doubt.len(), gw.sandbox.stats().api_calls), (4, 4), "the calls in flight are the rows in doubt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_runs_out_calls_in_flight_are_left_in_doubt_and_resumed() {
    let latency = Duration::from_secs(10);
    let grace = Duration::from_millis(500);
    let (gw, out, child) = four_calls_in_flight(latency, &["--grace", "500ms"]).await;
    let signalled = Instant::now();
    signal(&child, libc::SIGTERM);
    let output = child.wait_with_output().await.unwrap();
    let took = signalled.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    // It waited for the grace, and not for the calls' 10 s.
    assert!(took >= grace && took < Duration::from_secs(5), "stopped {took:?} after the signal, --grace 500ms");
    assert_eq!(stderr.matches("call abandoned at the end of the grace period").count(), 4, "{stderr}");
    let summary = json(&out.join("summary.json"));
    assert_eq!((summary["in_doubt"].as_u64(), summary["exit_code"].as_u64()), (Some(4), Some(130)), "{summary}");
    assert!(jsonl(&out.join("results.jsonl")).is_empty());
    // (The gateway records a call once it answered it, 10 s on: counted here
    // as it arrived.)
    let in_doubt: HashSet<String> = started_not_done(&out).iter().map(|&(_, row)| key_of_row(row)).collect();
    assert_eq!((in_doubt.len(), gw.sandbox.stats().api_calls), (4, 4), "the calls abandoned are the rows in doubt");

    // An idempotent job's rows in doubt are sent again by resume (quick
    // answers now: the same gateway, its latency kept, would take 10 s).
    let quick = Gateway::start(sandbox_config()).await;
    std::fs::copy(quick.config(SECRET, ""), gw.path("bulkcall.toml")).unwrap();
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 100);
    let again: HashSet<String> = quick.received_by_control_number().into_keys().collect();
    assert!(in_doubt.is_subset(&again), "the rows in doubt were sent again");
    assert_eq!(quick.sandbox.stats().api_calls, 100, "and every row not recorded, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_makes_every_line_a_json_object() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    // A claim job (a warning at start) with a row the gateway refuses (a
    // failure named at the end).
    let mut rows = eligibility_csv(1, 20);
    rows.push_str("77,000050,C,0123456789,M77,P,D,19800102\n");
    let input = gw.write("rows.csv", &rows);
    let job = gw.write("claims.toml", CLAIMS_JOB);
    let out = gw.path("run");
    let output = run_command(&job, &input, &out, &config).args(["--log-format", "json", "-v"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()), "{stderr}");
    assert!(lines.iter().any(|l| l["level"] == "WARN"), "the warning is a JSON line too: {stderr}");
    let finished = lines.iter().find(|l| l["message"] == "finished").expect("a closing line");
    assert_eq!(finished["summary"]["failed"], 1, "{finished}");
    assert!(!stderr.contains(SECRET));

    // A run that never starts (the credentials rejected) says why in a
    // JSON line too, with its time and exit code.
    let wrong = gw.config("not-the-secret-91c2", "");
    let out = gw.path("refused");
    let output = run_command(&job, &input, &out, &wrong).args(["--log-format", "json", "-q"]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}")))
        .collect();
    let [error] = &lines[..] else { panic!("one line: {stderr}") };
    assert_eq!((&error["level"], &error["exit_code"]), (&"ERROR".into(), &3.into()), "{error}");
    assert!(error["timestamp"].is_string(), "{error}");
    assert!(error["message"].as_str().unwrap().contains("rejected the credentials"), "{error}");
    assert!(!stderr.contains("not-the-secret-91c2"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refresh_replaces_the_cached_token() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let token = |extra: &'static [&'static str]| {
        let config = config.clone();
        async move {
            let output = bulkcall()
                .args(["token", "-c", config.to_str().unwrap(), "-p", "test", "--print"])
                .args(extra)
                .stdout(std::process::Stdio::piped())
                .output()
                .await
                .unwrap();
            assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8(output.stdout).unwrap().trim().to_string()
        }
    };
    let first = token(&[]).await;
    assert_eq!(token(&[]).await, first, "a still-valid token comes from the cache");
    assert_eq!(gw.sandbox.stats().token_requests, 1);
    let refreshed = token(&["--refresh"]).await;
    assert_eq!(gw.sandbox.stats().token_requests, 2, "--refresh asks the token endpoint");
    assert_ne!(refreshed, first);
    assert_eq!(token(&[]).await, refreshed, "and replaces the cached token");
    assert_eq!(gw.sandbox.stats().token_requests, 2);
}

/// An HTTP proxy on loopback that forwards each connection to the host its
/// first request names, counting the requests' first lines.
async fn proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; 8192];
                let n = client.read(&mut head).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&head[..n]).into_owned();
                let first = text.lines().next().unwrap_or_default().to_string();
                log.lock().unwrap().push(first.clone());
                // "POST http://127.0.0.1:PORT/path HTTP/1.1": absolute form.
                let Some(host) = first.split(' ').nth(1).and_then(|u| u.strip_prefix("http://")) else { return };
                let host = host.split('/').next().unwrap_or_default().to_string();
                let Ok(mut server) = tokio::net::TcpStream::connect(&host).await else { return };
                if server.write_all(&head[..n]).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_carry_the_token_request_and_the_calls_unless_no_proxy_names_the_host() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let input = gw.write("rows.csv", &eligibility_csv(1, 5));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let (url, seen) = proxy().await;
    let run = |out: &str, no_proxy: &str| {
        let mut command = run_command(&job, &input, &gw.path(out), &config);
        command.env("HTTP_PROXY", &url).env("http_proxy", &url).env("NO_PROXY", no_proxy).env("no_proxy", no_proxy);
        command.env_remove("HTTPS_PROXY").env_remove("https_proxy").env_remove("ALL_PROXY").env_remove("all_proxy");
        command.output()
    };
    let output = run("through", "").await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let through = seen.lock().unwrap().clone();
    let base = gw.sandbox.base_url();
    assert!(through.iter().any(|l| l.contains(&gw.sandbox.token_url())), "the token request went through: {through:?}");
    assert!(through.iter().any(|l| l.contains(&format!("{base}/medicalnetwork"))), "the calls did: {through:?}");
    assert_eq!(gw.sandbox.stats().api_calls, 5);

    let output = run("around", "127.0.0.1").await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(seen.lock().unwrap().len(), through.len(), "NO_PROXY: nothing more through the proxy");
    assert_eq!(gw.sandbox.stats().api_calls, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_sends_the_example_rows_through_its_own_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let output = bulkcall()
        .args(["demo", "--out-dir", out.to_str().unwrap(), "--progress", "never"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("sandbox at http://127.0.0.1:"), "{stderr}");
    // README: the 1,200 synthetic rows of jobs/eligibility.csv, in out/demo/.
    let runs: Vec<_> =
        std::fs::read_dir(out.join("demo")).unwrap().flatten().filter(|e| e.file_type().unwrap().is_dir()).collect();
    assert_eq!(runs.len(), 1, "one run directory under out/demo");
    let summary = json(&runs[0].path().join("summary.json"));
    assert_eq!((summary["total"].as_u64(), summary["succeeded"].as_u64()), (Some(1200), Some(1200)), "{summary}");
    assert_eq!(jsonl(&runs[0].path().join("results.jsonl")).len(), 1200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cache_locked_elsewhere_is_waited_for_10_s_then_done_without() {
    use std::os::unix::fs::DirBuilderExt;
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    // Another process holds the cache's refresh lock and is stopped: the
    // lock file is named by the token request's key, as the cache file is.
    let settings = bulkcall::config::AuthSettings {
        token_url: Some(gw.sandbox.token_url()),
        client_id: Some(CLIENT_ID.into()),
        client_secret: Some(SECRET.to_string().into()),
        ..Default::default()
    };
    let key = bulkcall::token::request_key(&settings, &settings.credentials().unwrap());
    let cache = gw.path("token-cache");
    std::fs::DirBuilder::new().mode(0o700).create(&cache).unwrap();
    let held = std::fs::File::create(cache.join(format!("{key}.lock"))).unwrap();
    held.lock().unwrap();

    let started = Instant::now();
    let output = bulkcall().args(["token", "-c", config.to_str().unwrap(), "-p", "test"]).output().await.unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "a token all the same: {stderr}");
    assert!(stderr.contains("for 10s; going on without the token cache"), "{stderr}");
    assert_eq!(gw.sandbox.stats().token_requests, 1);
    // It waited the 10 s, and not much more (a token request on loopback
    // and the binary's start take well under 5 s on a busy host).
    assert!(took >= Duration::from_secs(10) && took < Duration::from_secs(15), "took {took:?}");
    assert!(!cache.join(format!("{key}.json")).exists(), "the cache was left alone");
}
