//! deploy/kubernetes/ and the Dockerfile say what docs/many-hosts.md
//! ("Running on many hosts") promises: the manifests are parsed and their fields checked, and
//! the configuration and job they ship are checked by `bulkcall validate`.

mod common;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every YAML document of a file, as JSON values.
fn yaml(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}")))
        .collect()
}

fn one(path: &str, kind: &str) -> Value {
    let docs: Vec<Value> = yaml(path).into_iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(docs.len(), 1, "{path} holds one {kind}");
    docs.into_iter().next().unwrap()
}

/// A page of docs/, whole.
fn doc(name: &str) -> String {
    let path = format!("docs/{name}");
    std::fs::read_to_string(repo(&path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The value after `flag` in the container's arguments.
fn arg<'a>(args: &'a [Value], flag: &str) -> &'a str {
    let at = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("the container runs with {flag}"));
    args[at + 1].as_str().unwrap()
}

#[test]
fn the_indexed_job_maps_exit_codes_and_shares_a_volume_as_the_docs_say() {
    let job = one("deploy/kubernetes/job.yaml", "Job");
    assert_eq!(job["apiVersion"], "batch/v1");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    assert_eq!(spec["podReplacementPolicy"], "Failed");
    assert!(spec["backoffLimitPerIndex"].as_u64().is_some_and(|n| n >= 1), "backoffLimitPerIndex: {spec:#}");
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never", "podFailurePolicy and backoffLimitPerIndex need it");

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let args = container["args"].as_array().unwrap();
    assert_eq!(args[0], "run");
    // One pod per shard: the index Kubernetes gives is the shard.
    let shards: u64 = arg(args, "--shards").parse().unwrap();
    assert_eq!(spec["completions"].as_u64(), Some(shards), "completions = --shards");
    assert_eq!(spec["parallelism"].as_u64(), Some(shards), "parallelism = --shards");
    assert!(!args.iter().any(|a| a == "--shard"), "K comes from JOB_COMPLETION_INDEX");
    let run_id = arg(args, "--run-id");
    bulkcall::shard::check_run_id(run_id).unwrap();

    // Exit codes: 2 and 3 fail the index, 75 is retried; only the actions
    // the Kubernetes API knows.
    let rules = spec["podFailurePolicy"]["rules"].as_array().unwrap();
    let rule_for = |code: u64| {
        rules
            .iter()
            .find(|r| {
                let codes = &r["onExitCodes"];
                codes["operator"] == "In" && codes["values"].as_array().unwrap().iter().any(|v| v == code)
            })
            .unwrap_or_else(|| panic!("a rule for exit code {code}"))
    };
    for rule in rules {
        let action = rule["action"].as_str().unwrap();
        assert!(["FailJob", "FailIndex", "Ignore", "Count"].contains(&action), "unknown action {action}");
        if let Some(codes) = rule["onExitCodes"].as_object() {
            assert_eq!(codes["containerName"], container["name"]);
            let values: Vec<u64> = codes["values"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert!(values.windows(2).all(|w| w[0] < w[1]) && !values.contains(&0), "sorted, unique, no 0");
        }
    }
    assert_eq!(rule_for(2)["action"], "FailIndex", "usage or input error: another try changes nothing");
    assert_eq!(rule_for(3)["action"], "FailIndex", "credentials rejected");
    assert_eq!(rule_for(75)["action"], "Count", "try again later: retried, counted against backoffLimitPerIndex");
    let disruption = rules
        .iter()
        .find(|r| r["onPodConditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "DisruptionTarget")))
        .expect("a rule for a lost or drained node");
    assert_eq!(disruption["action"], "Ignore");

    // The run's folder is on a ReadWriteMany volume: one directory per index under it.
    let out = arg(args, "--out");
    assert!(out.contains(run_id), "-o {out} is the run's own folder");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| out.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{out} is on a mounted volume"));
    let volume =
        pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).expect("the mounted volume");
    let claim = volume["persistentVolumeClaim"]["claimName"].as_str().expect("a PersistentVolumeClaim");
    let pvc = one("deploy/kubernetes/volume.yaml", "PersistentVolumeClaim");
    assert_eq!(pvc["metadata"]["name"], claim);
    assert_eq!(pvc["spec"]["accessModes"], serde_json::json!(["ReadWriteMany"]));

    // Secrets from a Secret, never written into the manifest; Redis by BULKCALL_REDIS_URL.
    let env = container["env"].as_array().unwrap();
    let from_secret = |name: &str| {
        let var = env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("env {name}"));
        assert!(var.get("value").is_none(), "{name} is not written in the manifest");
        assert!(var["valueFrom"]["secretKeyRef"]["name"].is_string(), "{name} comes from a Secret");
    };
    for name in ["BULKCALL_REDIS_URL", "BULKCALL_TOKEN_KEY", "OPTUM_CLIENT_ID", "OPTUM_CLIENT_SECRET"] {
        from_secret(name);
    }

    // Non-root.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(pod["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u > 0));
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);

    // What docs/many-hosts.md promises is what the manifest holds.
    let readme = doc("many-hosts.md");
    for promise in [
        "completionMode: Indexed",
        "podReplacementPolicy: Failed",
        &format!("backoffLimitPerIndex: {}", spec["backoffLimitPerIndex"]),
        "`FailIndex` for 1, 2, 3 and 4",
        "`Count` for 75",
        "`DisruptionTarget`",
        "ReadWriteMany",
        "BULKCALL_REDIS_URL",
        "JOB_COMPLETION_INDEX",
        "AWS_BATCH_JOB_ARRAY_INDEX",
        "shard-K-of-N",
    ] {
        assert!(readme.contains(promise), "docs/many-hosts.md says {promise}");
    }
    assert_eq!(rule_for(1)["action"], "FailIndex");
    assert_eq!(rule_for(4)["action"], "FailIndex");
}

/// Each shard's `GET /metrics` is reachable from outside its pod on the
/// port the container declares and the scrape annotations name, as
/// docs/metrics.md ("Watching scheduled runs") says.
#[test]
fn the_indexed_job_serves_metrics_where_its_scrape_annotations_point() {
    let job = one("deploy/kubernetes/job.yaml", "Job");
    let template = &job["spec"]["template"];
    let container = &template["spec"]["containers"][0];
    let listen: std::net::SocketAddr = arg(container["args"].as_array().unwrap(), "--metrics-listen").parse().unwrap();
    assert!(listen.ip().is_unspecified(), "a scrape comes from outside the pod: {listen}");
    let port = container["ports"]
        .as_array()
        .expect("the container declares its ports")
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(port["containerPort"].as_u64(), Some(u64::from(listen.port())));
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], listen.port().to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let section = doc("metrics.md");
    for promise in ["prometheus.io/scrape", &format!("--metrics-listen 0.0.0.0:{}", listen.port()), "--metrics-push"] {
        assert!(section.contains(promise), "docs/metrics.md says {promise}");
    }
}

#[test]
fn the_kustomization_lists_every_manifest_but_the_example_secret() {
    let kustomization = &yaml("deploy/kubernetes/kustomization.yaml")[0];
    let mut listed: Vec<&str> =
        kustomization["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    listed.sort();
    assert_eq!(listed, ["configmap.yaml", "job.yaml", "volume.yaml"]);
    let secret = one("deploy/kubernetes/secret.example.yaml", "Secret");
    let job = one("deploy/kubernetes/job.yaml", "Job");
    let env = job["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
    for var in env {
        let reference = &var["valueFrom"]["secretKeyRef"];
        assert_eq!(reference["name"], secret["metadata"]["name"]);
        let key = reference["key"].as_str().unwrap();
        assert!(secret["stringData"].get(key).is_some(), "the example Secret shows the key {key}");
    }
}

/// The ConfigMap's configuration and job spec load, and the job renders
/// rows of the columns it names: `bulkcall validate` with its profile.
#[tokio::test]
async fn the_configmap_holds_a_configuration_and_job_that_validate() {
    let map = one("deploy/kubernetes/configmap.yaml", "ConfigMap");
    let job = one("deploy/kubernetes/job.yaml", "Job");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].as_array().unwrap();
    let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "config").unwrap();
    let mount_path = mount["mountPath"].as_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = |flag_value: &str| {
        let name = flag_value.strip_prefix(mount_path).unwrap().trim_start_matches('/');
        let text = map["data"][name].as_str().unwrap_or_else(|| panic!("the ConfigMap holds {name}"));
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let config = file(arg(args, "--config"));
    let job_spec = file(args[1].as_str().unwrap());
    let input = dir.path().join("rows.csv");
    std::fs::write(
        &input,
        "control_number,payer_id,provider_name,npi,member_id,first_name,last_name,dob\n\
         100000001,87726,Happy Valley Clinic,1788165021,SYN22804559,Avery,Fictus,19900712\n",
    )
    .unwrap();
    let output = common::bulkcall()
        .args(["validate", job_spec.to_str().unwrap(), input.to_str().unwrap()])
        .args(["-c", config.to_str().unwrap(), "-p", arg(args, "--profile")])
        .env_remove("BULKCALL_PROFILE")
        .env_remove("BULKCALL_CONFIG")
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains("client_secret ="), "no secret in the ConfigMap");
}

#[test]
fn the_image_is_multi_stage_non_root_and_holds_only_the_release_binary() {
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let stages: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.starts_with("FROM ")).map(|(i, _)| i).collect();
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    assert!(lines.iter().any(|l| l.contains("cargo build --release --locked")));
    let last = &lines[*stages.last().unwrap()..];
    let copies: Vec<&&str> = last.iter().filter(|l| l.starts_with("COPY") || l.starts_with("ADD")).collect();
    assert_eq!(copies.len(), 1, "the runtime stage copies one thing: {copies:?}");
    assert!(copies[0].starts_with("COPY --from=") && copies[0].contains("bulkcall"), "{}", copies[0]);
    assert!(!last.iter().any(|l| l.starts_with("RUN ")), "nothing else is installed in the runtime stage");
    let user = last.iter().rev().find(|l| l.starts_with("USER ")).expect("a USER in the runtime stage");
    let user = user.trim_start_matches("USER ").split(':').next().unwrap();
    assert!(user != "root" && user != "0", "USER {user}");
    let ignore = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim_end_matches('/') == "target"), "target/ stays out of the build context");
}

/// Whether `tool` runs; when it does not, CI fails and elsewhere the test is
/// skipped, saying how to install it.
fn have(tool: &str, install: &str) -> bool {
    if std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    common::skip(&format!("{tool} is not installed: {install}; .ci/run installs it"));
    false
}

/// Every manifest validates against the API schemas of Kubernetes 1.30 (the
/// oldest the Job's fields work on with their default feature gates) and of
/// every later version kubernetes-validate knows, strictly: a field the API
/// does not know, or one it requires and the manifest lacks, fails.
#[test]
fn every_manifest_validates_against_the_kubernetes_api_schemas_from_1_30_on() {
    if !have("kubernetes-validate", "`pip install kubernetes-validate`") {
        return;
    }
    let kustomization = &yaml("deploy/kubernetes/kustomization.yaml")[0];
    assert_eq!(kustomization["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(kustomization["kind"], "Kustomization");
    let mut files: Vec<PathBuf> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| repo(&format!("deploy/kubernetes/{}", r.as_str().unwrap())))
        .collect();
    files.push(repo("deploy/kubernetes/secret.example.yaml"));
    let mut validated = vec![];
    for minor in 30.. {
        let version = format!("1.{minor}");
        let output = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--no-warn", "-k", &version])
            .args(&files)
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if text.contains("does not support kubernetes version") {
            break;
        }
        assert!(output.status.success(), "the manifests do not validate against Kubernetes {version}:\n{text}");
        for file in &files {
            let name = file.display().to_string();
            assert!(
                text.lines().any(|l| l.contains(&name) && l.contains("passed")),
                "{name} against {version}:\n{text}"
            );
        }
        validated.push(version);
    }
    assert!(validated.len() >= 5, "validated against 1.30 to 1.34 at least, got {validated:?}");
}
