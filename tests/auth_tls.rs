//! Mutual TLS through the real binary: a test CA (rcgen) for the sandbox's
//! server certificate and the client's, `tls_client_auth` and a secret over
//! mTLS for the token endpoint and every call, a certificate from another CA
//! (or none) refused with exit 3 naming the certificate file, never the key.

mod common;

use std::path::PathBuf;

use bulkcall::sandbox::{Sandbox, SandboxConfig};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A CA and the certificates it signed, as PEM.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    /// A certificate for `names` (empty: a client's), and its key.
    fn issue(&self, names: &[&str], client: bool) -> (String, String) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, if client { CLIENT_ID } else { "127.0.0.1" });
        if client {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Setup {
    gw: Gateway,
    tls: Sandbox,
    ca_file: PathBuf,
    ca: Ca,
}

/// A TLS sandbox whose certificate and required client certificates come
/// from one test CA.
async fn setup() -> Setup {
    let ca = Ca::new("bulkcall test CA");
    let (server_cert, server_key) = ca.issue(&["127.0.0.1"], false);
    let config = SandboxConfig { client_ca: Some(ca.cert.pem().into_bytes()), ..sandbox_config() };
    let tls = Sandbox::start_tls(config, "127.0.0.1:0".parse().unwrap(), server_cert.as_bytes(), server_key.as_bytes())
        .await
        .unwrap();
    let gw = Gateway::start(sandbox_config()).await;
    let ca_file = gw.write("ca.pem", &ca.cert.pem());
    Setup { gw, tls, ca_file, ca }
}

impl Setup {
    /// The client's certificate and key files, issued by `ca`.
    fn client(&self, ca: &Ca, name: &str) -> (PathBuf, PathBuf, String) {
        let (cert, key) = ca.issue(&[], true);
        let cert_file = self.gw.write(&format!("{name}.crt"), &cert);
        let key_file = self.gw.write(&format!("{name}.key"), &key);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_file, key_file, key)
    }

    fn config(&self, auth: &str, tls: &str) -> PathBuf {
        let text = format!(
            "[default]\nrate = 0\nout_dir = \"{out}\"\n\n[test]\nbase_url = \"{base}\"\nheaders.environment = \"sandbox\"\n\
             auth.token_url = \"{token}\"\nauth.client_id = \"{CLIENT_ID}\"\nauth.cache = false\n\
             tls.ca_file = \"{ca}\"\n{auth}\n{tls}\n",
            out = self.gw.path("out").display(),
            base = self.tls.base_url(),
            token = self.tls.token_url(),
            ca = self.ca_file.display(),
        );
        self.gw.write("bulkcall.toml", &text)
    }

    async fn run(&self, config: &std::path::Path, out: &str) -> (Option<i32>, String) {
        let input = self.gw.write("rows.csv", &eligibility_csv(1, 20));
        let job = self.gw.write("eligibility.toml", ELIGIBILITY_JOB);
        let output = run_command(&job, &input, &self.gw.path(out), config).output().await.unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn client_tls(cert: &std::path::Path, key: &std::path::Path) -> String {
    format!("tls.client_cert = \"{}\"\ntls.client_key = \"{}\"", cert.display(), key.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_auth_gets_the_token_and_sends_every_call_over_mutual_tls() {
    let s = setup().await;
    let (cert, key, key_pem) = s.client(&s.ca, "client");
    let config = s.config("auth.style = \"tls_client_auth\"", &client_tls(&cert, &key));
    let (code, stderr) = s.run(&config, "run").await;
    assert_eq!(code, Some(0), "{stderr}");
    let stats = s.tls.stats();
    assert_eq!((stats.token_requests, stats.tokens_issued, stats.api_calls), (1, 1, 20));
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!stderr.contains(line), "no key material on stderr");
        let run_json = std::fs::read_to_string(s.gw.path("run").join("run.json")).unwrap();
        assert!(!run_json.contains(line), "nor in run.json");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_over_mutual_tls_works_too() {
    let s = setup().await;
    let (cert, key, _) = s.client(&s.ca, "client");
    let auth = format!("auth.style = \"form\"\nauth.client_secret = \"{SECRET}\"");
    let (code, stderr) = s.run(&s.config(&auth, &client_tls(&cert, &key)), "run").await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(s.tls.stats().api_calls, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_or_none_stops_the_run_with_exit_3_naming_the_file() {
    let s = setup().await;
    let other = Ca::new("someone else's CA");
    let (cert, key, key_pem) = s.client(&other, "foreign");
    let config = s.config("auth.style = \"tls_client_auth\"", &client_tls(&cert, &key));
    let (code, stderr) = s.run(&config, "foreign").await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains(&cert.display().to_string()), "names the certificate file: {stderr}");
    assert!(stderr.contains("refused the client certificate"), "{stderr}");
    assert_eq!(stderr.matches("token request 1/").count(), 0, "not retried: {stderr}");
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!stderr.contains(line), "never the key");
    }

    // No certificate at all, to a server that requires one.
    let config = s.config(&format!("auth.style = \"form\"\nauth.client_secret = \"{SECRET}\""), "");
    let (code, stderr) = s.run(&config, "none").await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("no client certificate is configured"), "{stderr}");
    assert_eq!(s.tls.stats().tokens_issued, 0);
    assert_eq!(s.tls.stats().api_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_command_verifies_assertions_and_requires_client_certificates() {
    use tokio::io::AsyncBufReadExt as _;
    let ca = Ca::new("bulkcall test CA");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let (server_cert, server_key) = ca.issue(&["127.0.0.1"], false);
    let (client_cert, client_key) = ca.issue(&[], true);
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap().serialize_pem();
    let paths = [
        write("ca.pem", &ca.cert.pem()),
        write("server.crt", &server_cert),
        write("server.key", &server_key),
        write("client.crt", &client_cert),
        write("client.key", &client_key),
        write("signing.pem", &signing),
    ];
    let [ca_file, server_crt, server_key, client_crt, client_key, signing_key] = paths.map(|p| p.display().to_string());
    let out =
        bulkcall().args(["jwks", "--key", &signing_key]).stdout(std::process::Stdio::piped()).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let jwks = write("jwks.json", &String::from_utf8(out.stdout).unwrap());

    let mut sandbox = bulkcall()
        .args(["sandbox", "--port", "0", "--client-id", CLIENT_ID, "--client-secret", SECRET, "--jwks"])
        .arg(&jwks)
        .args(["--tls-cert", &server_crt, "--tls-key", &server_key, "--client-ca", &ca_file])
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(sandbox.stderr.take().unwrap()).lines();
    let mut said = String::new();
    let base = loop {
        let line = lines.next_line().await.unwrap().expect("the sandbox says where it listens");
        said.push_str(&line);
        said.push('\n');
        if let Some(base) = line.strip_prefix("bulkcall sandbox listening on ") {
            break base.to_string();
        }
    };
    while !said.contains("mutual TLS") {
        said.push_str(&lines.next_line().await.unwrap().unwrap());
    }
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    assert!(said.contains("1 registered key"), "{said}");

    let gw = Gateway::start(sandbox_config()).await;
    let input = gw.write("rows.csv", &eligibility_csv(1, 10));
    let job = gw.write("eligibility.toml", ELIGIBILITY_JOB);
    let config = |auth: &str, tls: &str| {
        gw.write(
            "bulkcall.toml",
            &format!(
                "[default]\nrate = 0\n[test]\nbase_url = \"{base}\"\nheaders.environment = \"sandbox\"\n\
                 auth.token_url = \"{base}/apip/auth/sntl/v1/token\"\nauth.client_id = \"{CLIENT_ID}\"\n\
                 auth.cache = false\ntls.ca_file = \"{ca_file}\"\n{auth}\n{tls}\n"
            ),
        )
    };
    let mutual = format!("tls.client_cert = \"{client_crt}\"\ntls.client_key = \"{client_key}\"");
    let keyed = format!("auth.style = \"private_key_jwt\"\nauth.private_key_file = \"{signing_key}\"");
    let output = run_command(&job, &input, &gw.path("keyed"), &config(&keyed, &mutual)).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(jsonl(&gw.path("keyed").join("results.jsonl")).len(), 10);

    // Without a client certificate the handshake is refused: exit 3.
    let output = run_command(&job, &input, &gw.path("bare"), &config(&keyed, "")).output().await.unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));
    sandbox.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_refusing_the_client_certificate_stops_the_run_with_exit_3_and_resume_sends_the_rows() {
    let s = setup().await;
    let other = Ca::new("someone else's CA");
    let (foreign, foreign_key, _) = s.client(&other, "foreign");
    // No token endpoint: the API's handshake is the first to judge the certificate.
    let config = s.config("auth.style = \"none\"", &client_tls(&foreign, &foreign_key));
    let (code, stderr) = s.run(&config, "run").await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("the API") && stderr.contains(&foreign.display().to_string()), "{stderr}");
    assert_eq!(s.tls.stats().api_calls, 0, "nothing reached the API");
    let failures = std::fs::read_to_string(s.gw.path("run").join("failures.csv")).unwrap_or_default();
    assert!(failures.lines().count() <= 1, "no row was failed for it: {failures}");

    // The right certificate in place, resume sends every row.
    let (cert, key, _) = s.client(&s.ca, "client");
    s.config("auth.style = \"tls_client_auth\"", &client_tls(&cert, &key));
    let out = s.gw.path("run");
    let output = bulkcall().args(["resume", out.to_str().unwrap()]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(s.tls.stats().api_calls, 20, "{stderr}");
    assert_eq!(jsonl(&out.join("results.jsonl")).len(), 20);
}
