//! Integration tests of the built-in mock gateway, driven over HTTP with reqwest.

use std::time::Duration;

use bulkcall::sandbox::{Sandbox, SandboxConfig, Stats, TOKEN_PATH};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

const ELIGIBILITY: &str = "/medicalnetwork/eligibility/v3";

/// The fixture `eligibility-v3-sandbox-response.json` (synthetic sandbox data).
const FIXTURE: &str = r#"{"benefitsInformation":[{"benefitsDateInformation":{"benefit":"20160818-20160818"},"code":"1","coverageLevel":"Individual","coverageLevelCode":"IND","insuranceType":"Qualified Medicare Beneficiary","insuranceTypeCode":"QM","name":"Active Coverage","planCoverage":"QMB","serviceTypeCodes":["30"],"serviceTypes":["Health Benefit Plan Coverage"]},{"benefitsDateInformation":{"plan":"20160818-20160818"},"code":"R","coverageLevel":"Individual","coverageLevelCode":"IND","insuranceTypeCode":"WA","name":"Other or Additional Payor","planCoverage":"MEDICARE PART A","serviceTypeCodes":["30"],"serviceTypes":["Health Benefit Plan Coverage"]},{"benefitsDateInformation":{"plan":"20160818-20160818"},"code":"R","coverageLevel":"Individual","coverageLevelCode":"IND","insuranceType":"Medicare Part B","insuranceTypeCode":"MB","name":"Other or Additional Payor","planCoverage":"MEDICARE PART B","serviceTypeCodes":["30"],"serviceTypes":["Health Benefit Plan Coverage"]}],"controlNumber":"000000001","payer":{"entityIdentifier":"Payer","entityType":"Non-Person Entity","name":"Unknown","payorIdentification":"000001"},"planDateInformation":{"plan":"20160818-20160818"},"planInformation":{"socialSecurityNumber":"111111111"},"planStatus":[{"planDetails":"QMB","serviceTypeCodes":["30"],"status":"Active Coverage","statusCode":"1"}],"provider":{"entityIdentifier":"Provider","entityType":"Non-Person Entity","npi":"0123456789","providerName":"provider_name"},"reassociationKey":"000000001","subscriber":{"dateOfBirth":"1880-01-02","entityIdentifier":"Insured or Subscriber","entityType":"Person","firstName":"johnOne","gender":"M","lastName":"doeOne","provider":{},"ssn":"111111111"},"subscriberTraceNumbers":[{"originatingCompanyIdentifier":"9EMDEON999","referenceIdentification":"000000001","traceType":"Current Transaction Trace Numbers","traceTypeCode":"1"}],"tradingPartnerServiceId":"000001"}"#;

async fn start(config: SandboxConfig) -> Result<Sandbox> {
    Ok(Sandbox::start(config, "127.0.0.1:0".parse()?).await?)
}

fn eligibility_request() -> Value {
    json!({
        "controlNumber": "123456789",
        "tradingPartnerServiceId": "000050",
        "provider": { "organizationName": "Happy Doctors Group", "npi": "0123456789" },
        "subscriber": { "memberId": "0000000000", "firstName": "johnOne", "lastName": "doeOne", "dateOfBirth": "18800102" },
        "encounter": { "serviceTypeCodes": ["30"] },
    })
}

/// A token through the JSON style (Optum's).
async fn token(client: &Client, sandbox: &Sandbox) -> Result<String> {
    let answer: Value = client
        .post(sandbox.token_url())
        .json(&json!({ "client_id": "sandbox-client", "client_secret": "sandbox-secret", "grant_type": "client_credentials" }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(answer["access_token"].as_str().ok_or("no access_token")?.to_owned())
}

/// POST `body` to `path` with a bearer token and `environment: sandbox`.
async fn call(
    client: &Client,
    sandbox: &Sandbox,
    path: &str,
    token: &str,
    body: &Value,
) -> Result<(StatusCode, Value)> {
    let response = client
        .post(sandbox.base_url() + path)
        .bearer_auth(token)
        .header("environment", "sandbox")
        .json(body)
        .send()
        .await?;
    Ok((response.status(), response.json().await?))
}

/// Every key of every object in `shape` is in `value`, recursively (arrays by their first item).
fn assert_has_shape(value: &Value, shape: &Value, at: &str) {
    match (value, shape) {
        (Value::Object(value), Value::Object(shape)) => {
            for (key, inner) in shape {
                let found = value.get(key).unwrap_or_else(|| panic!("{at}/{key} is missing"));
                assert_has_shape(found, inner, &format!("{at}/{key}"));
            }
        }
        (Value::Array(value), Value::Array(shape)) if !shape.is_empty() => {
            assert_eq!(value.len(), shape.len(), "{at}: length");
            value.iter().zip(shape).for_each(|(v, s)| assert_has_shape(v, s, at));
        }
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => {
            panic!("{at}: {value} does not have the shape of {shape}")
        }
        _ => {}
    }
}

#[tokio::test]
async fn json_form_and_basic_token_requests_succeed() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let requests = [
        client
            .post(sandbox.token_url())
            .json(&json!({ "client_id": "sandbox-client", "client_secret": "sandbox-secret", "grant_type": "client_credentials", "audience": ["x"] })),
        client.post(sandbox.token_url()).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "sandbox-client"),
            ("client_secret", "sandbox-secret"),
            ("scope", "eligibility claims"),
        ]),
        client
            .post(sandbox.token_url())
            .basic_auth("sandbox-client", Some("sandbox-secret"))
            .form(&[("grant_type", "client_credentials")]),
        // A JSON body whose Content-Type was forgotten is still read as JSON.
        client
            .post(sandbox.token_url())
            .body(r#"{"client_id": "sandbox-client", "client_secret": "sandbox-secret", "grant_type": "client_credentials"}"#),
    ];
    let mut tokens = Vec::new();
    for request in requests {
        let response = request.send().await?;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["cache-control"], "no-store");
        let answer: Value = response.json().await?;
        assert_eq!(answer["token_type"], "bearer");
        assert_eq!(answer["expires_in"], 3600);
        let token = answer["access_token"].as_str().ok_or("no access_token")?.to_owned();
        assert!(token.len() >= 32, "{token} is too short");
        if answer.get("scope").is_some() {
            assert_eq!(answer["scope"], "eligibility claims");
        }
        tokens.push(token);
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 4, "every token is new");
    for token in &tokens {
        let (status, _) = call(&client, &sandbox, ELIGIBILITY, token, &eligibility_request()).await?;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(sandbox.stats().tokens_issued, 4);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_token_requests_answer_rfc6749_errors() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let wrong = "definitely-not-the-secret";
    let attempts = [
        client.post(sandbox.token_url()).json(
            &json!({ "client_id": "sandbox-client", "client_secret": wrong, "grant_type": "client_credentials" }),
        ),
        client
            .post(sandbox.token_url())
            .basic_auth("sandbox-client", Some(wrong))
            .form(&[("grant_type", "client_credentials")]),
        client.post(sandbox.token_url()).form(&[("grant_type", "client_credentials")]),
    ];
    for request in attempts {
        let response = request.send().await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body = response.text().await?;
        assert!(!body.contains(wrong), "the secret is echoed: {body}");
        assert_eq!(serde_json::from_str::<Value>(&body)?["error"], "invalid_client");
    }

    let response = client
        .post(sandbox.token_url())
        .json(&json!({ "client_id": "sandbox-client", "client_secret": "sandbox-secret", "grant_type": "password" }))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await?["error"], "unsupported_grant_type");

    let response = client
        .post(sandbox.token_url())
        .header("content-type", "application/json")
        .body(r#"{"client_id": "sandbox-client", "client_secret""#)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await?["error"], "invalid_request");

    assert_eq!(sandbox.stats(), Stats { token_requests: 5, ..Stats::default() });
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn calls_without_a_valid_token_get_401_and_are_counted() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let url = sandbox.base_url() + ELIGIBILITY;

    let response = client.post(&url).header("environment", "sandbox").json(&eligibility_request()).send().await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers()["www-authenticate"].to_str()?.contains(r#"error="invalid_token""#));
    assert_eq!(response.json::<Value>().await?["error"], "invalid_token");

    let (status, _) = call(&client, &sandbox, ELIGIBILITY, "made-up-token", &eligibility_request()).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let stats = sandbox.stats();
    assert_eq!(
        (stats.api_calls, stats.unauthorized, stats.unknown_token_calls, stats.expired_token_calls),
        (2, 2, 2, 0)
    );
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_expired_token_is_rejected() -> Result {
    let config = SandboxConfig { token_lifetime: Duration::from_secs(1), ..SandboxConfig::default() };
    let sandbox = start(config).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let (status, _) = call(&client, &sandbox, ELIGIBILITY, &token, &eligibility_request()).await?;
    assert_eq!(status, StatusCode::OK);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = call(&client, &sandbox, ELIGIBILITY, &token, &eligibility_request()).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(sandbox.stats().expired_token_calls, 1);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn revoked_tokens_are_rejected_and_new_ones_work() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let first = token(&client, &sandbox).await?;
    sandbox.revoke_all_tokens();
    let (status, _) = call(&client, &sandbox, ELIGIBILITY, &first, &eligibility_request()).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let second = token(&client, &sandbox).await?;
    let (status, _) = call(&client, &sandbox, ELIGIBILITY, &second, &eligibility_request()).await?;
    assert_eq!(status, StatusCode::OK);

    // The HTTP control endpoint does the same.
    let response = client.post(sandbox.base_url() + "/_sandbox/revoke").send().await?;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, _) = call(&client, &sandbox, ELIGIBILITY, &second, &eligibility_request()).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let stats = sandbox.stats();
    assert_eq!((stats.unauthorized, stats.expired_token_calls, stats.unknown_token_calls), (2, 2, 0));
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_environment_header_is_required() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let response =
        client.post(sandbox.base_url() + ELIGIBILITY).bearer_auth(&token).json(&eligibility_request()).send().await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await?;
    assert!(body["errors"][0]["description"].as_str().ok_or("no description")?.contains("environment: sandbox"));
    sandbox.shutdown().await;

    let sandbox = start(SandboxConfig { require_environment_header: false, ..SandboxConfig::default() }).await?;
    let token = self::token(&client, &sandbox).await?;
    let response =
        client.post(sandbox.base_url() + ELIGIBILITY).bearer_auth(&token).json(&eligibility_request()).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn eligibility_answers_in_the_fixture_shape_and_echoes_the_request() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let (status, answer) = call(&client, &sandbox, ELIGIBILITY, &token, &eligibility_request()).await?;
    assert_eq!(status, StatusCode::OK);

    let fixture: Value = serde_json::from_str(FIXTURE)?;
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
    assert_eq!(keys(&answer), keys(&fixture));
    assert_has_shape(&answer, &fixture, "");

    assert_eq!(answer["controlNumber"], "123456789");
    assert_eq!(answer["tradingPartnerServiceId"], "000050");
    assert_eq!(answer["subscriber"]["firstName"], "johnOne");
    assert_eq!(answer["subscriber"]["lastName"], "doeOne");
    assert_eq!(answer["subscriber"]["memberId"], "0000000000");
    assert_eq!(answer["subscriber"]["dateOfBirth"], "1880-01-02");
    assert_eq!(answer["provider"]["npi"], "0123456789");
    assert_eq!(answer["provider"]["providerName"], "Happy Doctors Group");
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn invalid_api_requests_get_400_in_the_gateway_style() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;

    for control_number in [json!("12345678"), json!("12345678x"), json!(123456789), Value::Null] {
        let mut request = eligibility_request();
        request["controlNumber"] = control_number;
        let (status, body) = call(&client, &sandbox, ELIGIBILITY, &token, &request).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["errors"][0]["field"], "controlNumber");
    }

    let mut request = eligibility_request();
    request["subscriber"]["memberId"] = json!("");
    let (status, body) = call(&client, &sandbox, ELIGIBILITY, &token, &request).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["errors"][0]["field"], "subscriber.memberId");

    for body in ["{not json", "", "[1, 2]"] {
        let response = client
            .post(sandbox.base_url() + ELIGIBILITY)
            .bearer_auth(&token)
            .header("environment", "sandbox")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let answer: Value = response.json().await?;
        assert!(answer["errors"][0]["description"].is_string(), "{answer}");
    }

    let response = client.get(sandbox.base_url() + ELIGIBILITY).bearer_auth(&token).send().await?;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(sandbox.stats().api_calls, 9);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn claim_status_and_submission_answer_mock_data() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;

    let request = json!({
        "controlNumber": "000000002",
        "tradingPartnerServiceId": "9496",
        "providers": [{ "organizationName": "Happy Doctors Group", "npi": "1760854442", "providerType": "BillingProvider" }],
        "subscriber": { "memberId": "0000000000", "firstName": "johnOne", "lastName": "doeOne", "dateOfBirth": "18800102" },
        "encounter": { "beginningDateOfService": "20240101", "endDateOfService": "20240102" },
        "patientControlNumber": "PCN-1",
    });
    let (status, answer) = call(&client, &sandbox, "/medicalnetwork/claimstatus/v2", &token, &request).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["controlNumber"], "000000002");
    assert_eq!(answer["tradingPartnerServiceId"], "9496");
    let claim_status = &answer["claims"][0]["claimStatus"];
    assert_eq!(claim_status["statusCategoryCode"], "F1");
    assert_eq!(claim_status["claimServiceDate"], "20240101-20240102");
    assert_eq!(claim_status["patientAccountNumber"], "PCN-1");

    let request = json!({
        "controlNumber": "000000003",
        "tradingPartnerServiceId": "9496",
        "claimInformation": { "patientControlNumber": "PCN-2", "claimChargeAmount": "28.75" },
    });
    let path = "/medicalnetwork/professionalclaims/v3/submission";
    let (status, answer) = call(&client, &sandbox, path, &token, &request).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["status"], "SUCCESS");
    assert_eq!(answer["controlNumber"], "000000003");
    assert_eq!(answer["claimReference"]["patientControlNumber"], "PCN-2");
    assert!(answer["claimReference"]["correlationId"].as_str().is_some_and(|id| !id.is_empty()));

    let (status, answer) = call(&client, &sandbox, path, &token, &json!({ "controlNumber": "3" })).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["errors"][0]["field"], "controlNumber");
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_first_token_requests_can_be_made_to_fail() -> Result {
    let sandbox = start(SandboxConfig { fail_token_requests: 2, ..SandboxConfig::default() }).await?;
    let client = Client::new();
    for expected in [StatusCode::SERVICE_UNAVAILABLE, StatusCode::SERVICE_UNAVAILABLE, StatusCode::OK] {
        let response = client
            .post(sandbox.token_url())
            .json(&json!({ "client_id": "sandbox-client", "client_secret": "sandbox-secret", "grant_type": "client_credentials" }))
            .send()
            .await?;
        assert_eq!(response.status(), expected);
        if expected != StatusCode::OK {
            assert_eq!(response.json::<Value>().await?["error"], "temporarily_unavailable");
        }
    }
    let stats = sandbox.stats();
    assert_eq!((stats.token_requests, stats.tokens_issued), (3, 1));
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn expires_in_can_be_a_string() -> Result {
    let config = SandboxConfig {
        expires_in_as_string: true,
        token_lifetime: Duration::from_secs(60),
        ..SandboxConfig::default()
    };
    let sandbox = start(config).await?;
    let answer: Value = Client::new()
        .post(sandbox.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "sandbox-client"),
            ("client_secret", "sandbox-secret"),
        ])
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(answer["expires_in"], "60");
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn stats_count_concurrent_calls() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let calls = (0..64).map(|_| async {
        for _ in 0..10 {
            let (status, _) = call(&client, &sandbox, ELIGIBILITY, &token, &eligibility_request()).await?;
            assert_eq!(status, StatusCode::OK);
        }
        Result::Ok(())
    });
    for outcome in futures::future::join_all(calls).await {
        outcome?;
    }
    call(&client, &sandbox, ELIGIBILITY, "nope", &eligibility_request()).await?;

    let expected = Stats {
        token_requests: 1,
        tokens_issued: 1,
        api_calls: 641,
        unauthorized: 1,
        expired_token_calls: 0,
        unknown_token_calls: 1,
        async_submissions: 0,
        polls: 0,
    };
    assert_eq!(sandbox.stats(), expected);
    let over_http: Value = client.get(sandbox.base_url() + "/_sandbox/stats").send().await?.json().await?;
    assert_eq!(over_http, serde_json::to_value(expected)?);
    assert!(sandbox.recorded().is_empty(), "nothing is recorded unless asked");
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn recording_keeps_headers_body_and_status() -> Result {
    let sandbox = start(SandboxConfig { record: true, ..SandboxConfig::default() }).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let response = client
        .post(sandbox.base_url() + ELIGIBILITY + "?trace=1")
        .bearer_auth(&token)
        .header("environment", "sandbox")
        .header("X-Request-Id", "123456789")
        .json(&eligibility_request())
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    call(&client, &sandbox, ELIGIBILITY, "nope", &json!({ "controlNumber": "1" })).await?;

    let recorded = sandbox.recorded();
    assert_eq!(recorded.len(), 2, "token requests are not recorded");
    let first = &recorded[0];
    assert_eq!(
        (first.method.as_str(), first.path.as_str(), first.query.as_deref()),
        ("POST", ELIGIBILITY, Some("trace=1"))
    );
    assert_eq!(first.status, 200);
    assert_eq!(first.body, eligibility_request());
    let header = |name: &str| first.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!(header("x-request-id"), Some("123456789"));
    assert_eq!(header("environment"), Some("sandbox"));
    assert_eq!(header("authorization"), Some(format!("Bearer {token}").as_str()));
    let names: Vec<&str> = first.headers.iter().map(|(n, _)| n.as_str()).collect();
    let position = |name| names.iter().position(|n| *n == name);
    assert!(position("environment") < position("x-request-id"), "headers keep their order: {names:?}");
    assert_eq!(recorded[1].status, 401);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn serve_runs_on_a_given_listener_until_shutdown() -> Result {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bulkcall::sandbox::serve(listener, SandboxConfig::default(), async {
        let _ = stopped.await;
    }));
    let client = Client::new();
    assert_eq!(client.get(format!("{base}/healthz")).send().await?.text().await?, "ok");
    let response = client
        .post(format!("{base}{TOKEN_PATH}"))
        .json(&json!({ "client_id": "sandbox-client", "client_secret": "sandbox-secret", "grant_type": "client_credentials" }))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let response = client.get(format!("{base}/no/such/api")).send().await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    stop.send(()).map_err(|()| "server already stopped")?;
    server.await??;
    Ok(())
}

/// How long [`arrival_while_blocked`] blocks the sandbox's only thread.
#[cfg(target_os = "linux")]
const BLOCKED: Duration = Duration::from_millis(200);

/// The raw client of [`arrival_while_blocked`]: one connection, a request
/// written in one `write`, its answer's start waited for.
#[cfg(target_os = "linux")]
mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// What the client reads and writes: a TCP stream, or TLS over one.
    pub trait Io: Read + Write {}
    impl<T: Read + Write> Io for T {}

    pub struct Conn {
        io: Box<dyn Io>,
        http2: bool,
        next_stream: u32,
    }

    /// An HTTP/2 frame: its header (length, type, flags, stream) and payload.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    impl Conn {
        /// Connected to `addr`, over TLS if `tls` has the server's
        /// certificate (PEM, for 127.0.0.1; no ALPN: HTTP/1.1); `http2`: h2c
        /// with prior knowledge.
        pub fn connect(addr: std::net::SocketAddr, http2: bool, tls: Option<&str>) -> Conn {
            use tokio_rustls::rustls;
            let tcp = TcpStream::connect(addr).unwrap();
            tcp.set_nodelay(true).unwrap();
            let mut io: Box<dyn Io> = match tls {
                None => Box::new(tcp),
                Some(pem) => {
                    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
                    let mut roots = rustls::RootCertStore::empty();
                    roots.add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()).unwrap();
                    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
                    let config = rustls::ClientConfig::builder_with_provider(provider)
                        .with_safe_default_protocol_versions()
                        .unwrap()
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                    let name = ServerName::try_from("127.0.0.1").unwrap();
                    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
                    Box::new(rustls::StreamOwned::new(conn, tcp))
                }
            };
            if http2 {
                let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                hello.extend(frame(0x4, 0, 0, &[])); // SETTINGS, none changed
                io.write_all(&hello).unwrap();
            }
            Conn { io, http2, next_stream: 1 }
        }

        /// Writes a request without a body in one `write`.
        pub fn send(&mut self, method: &str, path: &str) {
            let bytes = if self.http2 {
                // HPACK literals without indexing, names and values as they are.
                let mut block = Vec::new();
                for (name, value) in
                    [(":method", method), (":scheme", "http"), (":path", path), (":authority", "sandbox")]
                {
                    block.push(0);
                    block.push(name.len() as u8);
                    block.extend_from_slice(name.as_bytes());
                    block.push(value.len() as u8);
                    block.extend_from_slice(value.as_bytes());
                }
                // HEADERS with END_STREAM and END_HEADERS.
                frame(0x1, 0x5, self.next_stream, &block)
            } else {
                format!("{method} {path} HTTP/1.1\r\nhost: sandbox\r\ncontent-length: 0\r\n\r\n").into_bytes()
            };
            self.io.write_all(&bytes).unwrap();
            self.io.flush().unwrap();
        }

        /// Reads until the answer to the last request sent begins (HTTP/1.1:
        /// its head, and a body of `content-length`, read whole).
        pub fn answer(&mut self) {
            if self.http2 {
                let stream = self.next_stream;
                self.next_stream += 2;
                loop {
                    let mut head = [0u8; 9];
                    self.io.read_exact(&mut head).unwrap();
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0; len];
                    self.io.read_exact(&mut payload).unwrap();
                    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    if head[3] == 0x4 && head[4] & 1 == 0 {
                        self.io.write_all(&frame(0x4, 1, 0, &[])).unwrap(); // SETTINGS ACK
                    }
                    if head[3] == 0x1 && id == stream {
                        return;
                    }
                }
            }
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8];
                self.io.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
            let len = head
                .split("content-length: ")
                .nth(1)
                .map_or(0, |rest| rest.split("\r\n").next().unwrap().trim().parse().unwrap());
            self.io.read_exact(&mut vec![0; len]).unwrap();
        }
    }
}

/// A call sent while the sandbox's runtime (one thread) is blocked: how
/// long after its send (ms) the sandbox recorded its arrival (negative if
/// before), and how long the `write` of its bytes took (ms). The runtime blocks when asked, in a task that waits (blocking
/// its thread) until the client has written the call and then sleeps
/// [`BLOCKED`] more: the call's bytes wait in the kernel meanwhile,
/// whatever the machine's load. The client writes from this thread over a
/// connection it made, and had a call answered on, before (`http2`: h2c;
/// `tls`: HTTP/1.1 over TLS, the sandbox's stamps read under rustls).
#[cfg(target_os = "linux")]
fn arrival_while_blocked(http2: bool, tls: bool) -> (f64, f64, bulkcall::sandbox::RecordedCall) {
    use std::sync::mpsc;
    let (addr_tx, addr_rx) = mpsc::channel();
    let (block_tx, mut block_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (blocking_tx, blocking_rx) = mpsc::channel::<()>();
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (pem, key) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let client_pem = pem.clone();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let config = SandboxConfig { record: true, ..SandboxConfig::default() };
            let addr = "127.0.0.1:0".parse().unwrap();
            let sandbox = if tls {
                Sandbox::start_tls(config, addr, pem.as_bytes(), key.as_bytes()).await.unwrap()
            } else {
                Sandbox::start(config, addr).await.unwrap()
            };
            addr_tx.send(sandbox.addr()).unwrap();
            tokio::spawn(async move {
                block_rx.recv().await;
                blocking_tx.send(()).unwrap();
                // The runtime's one thread stops here: nothing reads the call.
                sent_rx.recv_timeout(Duration::from_secs(30)).expect("the client wrote the call");
                std::thread::sleep(BLOCKED);
            });
            done_rx.await.unwrap();
            (sandbox.recorded(), sandbox.started())
        })
    });
    let mut conn = raw::Conn::connect(addr_rx.recv().unwrap(), http2, tls.then_some(client_pem.as_str()));
    conn.send("GET", "/healthz");
    conn.answer();
    block_tx.send(()).unwrap();
    blocking_rx.recv().unwrap();
    let sent = std::time::Instant::now();
    // No token: answered 401, and recorded.
    conn.send("POST", ELIGIBILITY);
    let written = sent.elapsed();
    sent_tx.send(()).unwrap();
    conn.answer();
    let answered = sent.elapsed();
    assert!(answered >= BLOCKED, "answered {answered:?} after the send: the sandbox was not blocked");
    done_tx.send(()).unwrap();
    let (recorded, started) = server.join().unwrap();
    let call = recorded.into_iter().find(|c| c.path == ELIGIBILITY).expect("the call was recorded");
    assert_eq!(call.status, 401);
    let arrived = started + call.at;
    let lag = match arrived.checked_duration_since(sent) {
        Some(after) => after.as_secs_f64(),
        None => -sent.duration_since(arrived).as_secs_f64(),
    };
    (lag * 1e3, written.as_secs_f64() * 1e3, call)
}

/// Over HTTP/1.1, plain or over TLS, the call is stamped when the kernel
/// received it, during the `write` that sent it (loopback delivers within
/// it), not when the blocked runtime got to it 200 ms later. The clocks'
/// conversion is allowed 1 ms either side.
#[cfg(target_os = "linux")]
#[test]
fn an_arrival_is_the_kernels_receive_time_not_the_blocked_runtimes() {
    for tls in [false, true] {
        let (lag_ms, write_ms, call) = arrival_while_blocked(false, tls);
        let over = if tls { "HTTP/1.1 over TLS" } else { "HTTP/1.1" };
        eprintln!(
            "{over}: arrival recorded {lag_ms:.3} ms after the send began, its write took {write_ms:.3} ms, \
         the runtime blocked {BLOCKED:?}"
        );
        assert_eq!(call.version, "HTTP/1.1");
        assert!(
            (-1.0..=write_ms + 1.0).contains(&lag_ms),
            "{over}: arrival {lag_ms:.3} ms after the send began, not within its write ({write_ms:.3} ms)"
        );
    }
}

/// Over HTTP/2 a stream's arrival cannot be told from the connection's last
/// read, so the handler's clock stamps it: after the runtime woke.
#[cfg(target_os = "linux")]
#[test]
fn an_http2_arrival_falls_back_to_the_handlers_clock() {
    let (lag_ms, _, call) = arrival_while_blocked(true, false);
    eprintln!("HTTP/2: arrival recorded {lag_ms:.3} ms after the send, the runtime blocked {BLOCKED:?}");
    assert_eq!(call.version, "HTTP/2.0");
    assert!(lag_ms >= BLOCKED.as_secs_f64() * 1e3, "arrival {lag_ms:.3} ms after the send");
}
