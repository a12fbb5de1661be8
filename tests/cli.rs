//! The real binary: exit codes, messages on stderr, and secrets kept out of
//! everything it prints and writes.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

async fn bulkcall(dir: &Path, args: &[&str]) -> Output {
    common::bulkcall()
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .expect("the binary runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test]
async fn help_lists_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let output = bulkcall(dir.path(), &["--help"]).await;
    assert!(output.status.success());
    let help = text(&output);
    for command in ["run", "validate", "token", "sandbox", "demo"] {
        assert!(help.contains(command), "{command} in --help");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_exits_3_and_never_shows_the_secret() {
    let gw = Gateway::start(sandbox_config()).await;
    let wrong = "WrOnG-sEcReT-9b2d";
    gw.config(wrong, "");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 5));
    let config = gw.path("bulkcall.toml");
    let args =
        ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "test", "-vv"];
    let output = bulkcall(gw.dir.path(), &args).await;
    assert_eq!(output.status.code(), Some(3));
    let all = text(&output);
    assert!(all.contains(&gw.sandbox.token_url()), "names the token URL: {all}");
    assert!(all.contains("invalid_client"), "names the OAuth error: {all}");
    assert!(!all.contains(wrong), "the secret never appears, even at trace level");
    assert!(!all.contains("panicked"));
    assert_eq!(gw.sandbox.stats().api_calls, 0);

    let output = bulkcall(gw.dir.path(), &["token", "-c", config.to_str().unwrap(), "-p", "test"]).await;
    assert_eq!(output.status.code(), Some(3));
    assert!(!text(&output).contains(wrong));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_secret_names_the_profile_and_where_the_id_and_secret_came_from() {
    let gw = Gateway::start(sandbox_config()).await;
    let wrong = "WrOnG-sEcReT-4c1a";
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 5));
    let config = gw.path("bulkcall.toml");
    let run = ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "test"];

    // Both in the config file's [test] table.
    gw.config(wrong, "");
    let output = bulkcall(gw.dir.path(), &run).await;
    assert_eq!(output.status.code(), Some(3));
    let all = text(&output);
    assert!(
        all.contains(
            "profile `test`: client id from auth.client_id in [test] of bulkcall.toml, client secret from \
             auth.client_secret in [test] of bulkcall.toml"
        ),
        "{all}"
    );
    assert!(!all.contains(wrong), "never the secret: {all}");

    // The secret from a variable the profile names: the variable's name, never its value.
    gw.config(SECRET, "auth.client_secret_env = \"TEST_GATEWAY_CLIENT_SECRET\"");
    let output = common::bulkcall()
        .args(run)
        .current_dir(gw.dir.path())
        .env("TEST_GATEWAY_CLIENT_SECRET", wrong)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let all = text(&output);
    assert!(all.contains("client secret from the environment variable TEST_GATEWAY_CLIENT_SECRET"), "{all}");
    assert!(!all.contains(wrong), "never the secret: {all}");

    // From a file: the file's name.
    let file = gw.write("secret.txt", &format!("{wrong}\n"));
    gw.config(SECRET, &format!("auth.client_secret_file = \"{}\"", file.display()));
    let output = bulkcall(gw.dir.path(), &["token", "-c", config.to_str().unwrap(), "-p", "test"]).await;
    assert_eq!(output.status.code(), Some(3));
    let all = text(&output);
    assert!(
        all.contains(&format!("client secret from the file {} (auth.client_secret_file)", file.display())),
        "{all}"
    );
    assert!(!all.contains(wrong), "never the secret: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_credential_names_the_profile_and_the_variable() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let input = gw.write("rows.csv", &eligibility_csv(1, 5));
    let config = gw.write(
        "bulkcall.toml",
        &format!(
            "[nightly]\nbase_url = \"{}\"\nauth.token_url = \"{}\"\nauth.client_id_env = \"NIGHTLY_CLIENT_ID\"\n",
            gw.sandbox.base_url(),
            gw.sandbox.token_url()
        ),
    );
    let run = ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "nightly"];
    let output = bulkcall(gw.dir.path(), &run).await;
    assert_eq!(output.status.code(), Some(2));
    let all = text(&output);
    assert!(
        all.contains("no client id for profile `nightly`: set the environment variable NIGHTLY_CLIENT_ID"),
        "{all}"
    );
    assert_eq!(gw.sandbox.stats().token_requests, 0);
}

#[tokio::test]
async fn a_mistyped_environment_variable_is_named_with_the_setting_it_resembles() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("eligibility.toml"), ELIGIBILITY_JOB).unwrap();
    std::fs::write(dir.path().join("rows.csv"), eligibility_csv(1, 2)).unwrap();
    for (variable, says) in [
        ("BULKCALL_CONCURENCY", "BULKCALL_CONCURENCY names no setting (did you mean BULKCALL_CONCURRENCY?)"),
        (
            "BULKCALL_AUTH__TOKN_URL",
            "BULKCALL_AUTH__TOKN_URL names no setting (did you mean BULKCALL_AUTH__TOKEN_URL?)",
        ),
        ("BULKCALL_NIGHTLY", "BULKCALL_NIGHTLY names no setting: unset it, or rename it BULKCALL_<SETTING> for one of"),
    ] {
        let output = common::bulkcall()
            .args(["run", "eligibility.toml", "rows.csv", "--dry-run"])
            .current_dir(dir.path())
            .env(variable, "8")
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}");
        let all = text(&output);
        assert!(all.contains(says), "{variable}: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_q_an_error_line_says_when_which_job_and_the_exit_code() {
    let gw = Gateway::start(sandbox_config()).await;
    let job = gw.write("claims-nightly.toml", &format!("name = \"claims\"\n{CLAIMS_JOB}"));
    let input = gw.write("rows.csv", &eligibility_csv(1, 5));
    let config = gw.config("not-the-secret", "");
    let run = ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "test"];
    let output = bulkcall(gw.dir.path(), &[&run[..], &["-q"]].concat()).await;
    assert_eq!(output.status.code(), Some(3), "the exit code stays");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line for the cron log: {stderr}");
    // bulkcall: 2026-12-03T19:11:46Z claims (/tmp/.../claims-nightly.toml): error: ...; exit 3
    let rest = lines[0].strip_prefix("bulkcall: ").expect("the program first");
    let (stamp, rest) = rest.split_once(' ').unwrap();
    assert!(humantime::parse_rfc3339(stamp).is_ok() && stamp.ends_with('Z'), "a UTC time first: {stderr}");
    let subject = format!("claims ({}): error: the token endpoint", job.display());
    assert!(rest.starts_with(&subject), "the job's name and file: {stderr}");
    assert!(rest.ends_with("; exit 3"), "{stderr}");

    // A JSON log's error line names the job too.
    let output = bulkcall(gw.dir.path(), &[&run[..], &["--log-format", "json"]].concat()).await;
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!((&last["job"], &last["exit_code"]), (&"claims".into(), &3.into()), "{last}");
    assert_eq!(last["place"], job.display().to_string(), "{last}");

    // Without -q the line stays as it was.
    let output = bulkcall(gw.dir.path(), &run).await;
    assert!(String::from_utf8_lossy(&output.stderr).contains("bulkcall: error: the token endpoint"));

    // resume names the run directory.
    let missing = gw.path("no-such-run");
    let output = bulkcall(gw.dir.path(), &["resume", missing.to_str().unwrap(), "-q"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("Z resume {}: error: ", missing.display())), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_shows_the_expiry_and_prints_the_token_only_when_asked() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let output = bulkcall(gw.dir.path(), &["token", "-c", config.to_str().unwrap(), "-p", "test"]).await;
    assert!(output.status.success(), "{}", text(&output));
    let shown = text(&output);
    assert!(shown.contains("expires"), "{shown}");
    assert!(output.stdout.is_empty(), "no token on stdout without --print");

    let output = bulkcall(gw.dir.path(), &["token", "-c", config.to_str().unwrap(), "-p", "test", "--print"]).await;
    let token = String::from_utf8(output.stdout).unwrap();
    assert!(token.trim().len() >= 32, "the token itself: {token}");
    assert!(!String::from_utf8_lossy(&output.stderr).contains(token.trim()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_exit_2_with_the_file_named() {
    let gw = Gateway::start(sandbox_config()).await;
    let config = gw.config(SECRET, "");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let cases: Vec<(&str, &[u8], &str)> = vec![
        ("empty.csv", b"", "empty"),
        ("header-only.csv", b"control_number,npi\n", "no data rows"),
        ("object.json", b"{\"a\": 1}", "array of objects"),
        ("missing.csv", b"", "cannot read input"),
        ("rows.xml", b"<rows/>", "cannot tell the format"),
    ];
    for (name, content, expected) in cases {
        if name != "missing.csv" {
            gw.write(name, std::str::from_utf8(content).unwrap());
        }
        let input = gw.path(name);
        let args =
            ["run", job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "test"];
        let output = bulkcall(gw.dir.path(), &args).await;
        let all = text(&output);
        assert_eq!(output.status.code(), Some(2), "{name}: {all}");
        assert!(all.contains(name) && all.contains(expected), "{name}: {all}");
        assert!(!all.contains("panicked"), "{name}: {all}");
    }
    assert_eq!(gw.sandbox.stats().api_calls + gw.sandbox.stats().token_requests, 0, "nothing sent");

    let broken_job = gw.write("broken.toml", "url = \"/x\"\n[body]\na = \"{{ b \"\n");
    let input = gw.write("ok.csv", "b\n1\n");
    let args =
        ["run", broken_job.to_str().unwrap(), input.to_str().unwrap(), "-c", config.to_str().unwrap(), "-p", "test"];
    let output = bulkcall(gw.dir.path(), &args).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output).contains("broken.toml") && text(&output).contains("body.a"), "{}", text(&output));
}

#[tokio::test]
async fn http_to_a_remote_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "[default]\nbase_url = \"http://api.example.com\"\nauth.token_url = \"http://idp.example.com/token\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("j.toml"), "url = \"/x\"\n").unwrap();
    std::fs::write(dir.path().join("r.csv"), "a\n1\n").unwrap();
    let output = bulkcall(dir.path(), &["run", "j.toml", "r.csv", "-c", "c.toml"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output).contains("https"), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_with_the_same_file_name_keep_their_own_failures_file() {
    let faults = bulkcall::sandbox::Faults { bad_requests: 0.2, ..Default::default() };
    let gw = Gateway::start(bulkcall::sandbox::SandboxConfig { faults: faults.clone(), ..sandbox_config() }).await;
    let config = gw.config(SECRET, "");
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let mut inputs = Vec::new();
    for (folder, first) in [("a", 1), ("b", 101)] {
        std::fs::create_dir_all(gw.path(folder)).unwrap();
        inputs.push(gw.write(&format!("{folder}/claims.csv"), &eligibility_csv(first, 50)));
    }
    let out = gw.path("run");
    let (a, b) = (inputs[0].to_str().unwrap(), inputs[1].to_str().unwrap());
    let args = ["run", job.to_str().unwrap(), a, b, "-o", out.to_str().unwrap(), "-c", config.to_str().unwrap()];
    let output = bulkcall(gw.dir.path(), &[&args[..], &["-p", "test"]].concat()).await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));

    let failing = |first: u64| -> Vec<String> {
        (first..first + 50)
            .map(|i| format!("{i:09}"))
            .filter(|k| faults.fault_for(k) == Some(bulkcall::sandbox::Fault::BadRequest))
            .collect()
    };
    let keys_in = |name: &str| -> Vec<String> {
        let mut reader = csv::Reader::from_path(out.join(name)).unwrap();
        let mut keys: Vec<String> = reader.records().map(|r| r.unwrap()[0].to_string()).collect();
        keys.sort();
        keys
    };
    assert!(!failing(1).is_empty() && !failing(101).is_empty());
    assert_eq!(keys_in("failures.csv"), failing(1), "a/claims.csv's failures");
    assert_eq!(keys_in("failures.claims.csv"), failing(101), "b/claims.csv's failures, in a file of their own");
    let run: serde_json::Value = json(&out.join("run.json"));
    assert_eq!(run["inputs"][1]["failures"], "failures.claims.csv");
    let closing = text(&output);
    for (input, file) in [(a, "failures.csv"), (b, "failures.claims.csv")] {
        let line = format!("failures of {input}: {}", out.join(file).display());
        assert!(closing.contains(&line), "`{line}` in {closing}");
    }
}

/// `bulkcall ARGS` with stdout read.
async fn stdout_of(args: &[&str]) -> (Option<i32>, String) {
    let output = common::bulkcall().args(args).stdout(std::process::Stdio::piped()).output().await.unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test]
async fn every_command_has_a_man_page_with_every_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _) = stdout_of(&["man", "--dir", dir.path().to_str().unwrap()]).await;
    assert_eq!(code, Some(0));
    for command in ["run", "resume", "validate", "token", "jwks", "sandbox", "demo", "report", "status", "runs"] {
        let page = std::fs::read_to_string(dir.path().join(format!("bulkcall-{command}.1"))).unwrap();
        assert!(page.contains(&format!(".TH bulkcall-{command} 1")), "{command}");
        let (code, printed) = stdout_of(&["man", command]).await;
        assert_eq!((code, printed.as_str()), (Some(0), page.as_str()), "`man {command}` prints the same page");
    }
    let run = std::fs::read_to_string(dir.path().join("bulkcall-run.1")).unwrap();
    for flag in ["max\\-failures", "in\\-doubt", "dry\\-run", "metrics\\-file", "shard", "grace", "log\\-format"] {
        assert!(run.contains(&format!("\\-\\-{flag}")), "--{flag} in bulkcall-run(1)");
    }
    let top = std::fs::read_to_string(dir.path().join("bulkcall.1")).unwrap();
    assert!(top.contains("bulkcall\\-run(1)"), "the top page names the pages it points to");
}

#[tokio::test]
async fn run_help_groups_flags_under_their_own_headings_and_completions_offer_formats() {
    let (_, help) = stdout_of(&["run", "--help"]).await;
    let heading_of = |flag: &str| {
        let at = help.find(&format!("--{flag}")).unwrap();
        help[..at].lines().rfind(|l| !l.starts_with(' ') && l.ends_with(':')).unwrap().to_string()
    };
    assert_eq!(heading_of("shard "), "Many hosts:");
    for flag in ["max-failures", "grace", "progress", "json"] {
        assert_eq!(heading_of(flag), "Running and stopping:", "--{flag}");
    }
    let (_, bash) = stdout_of(&["completions", "bash"]).await;
    assert!(bash.contains("compgen -W \"csv json jsonl ndjson\""), "--format offers its values, not file names");
}
