//! The sandbox's asynchronous claim endpoint, driven over HTTP with reqwest:
//! a submission answered 202 with `Location` and `Retry-After`, polls
//! answered 202 a configured number of times, then 200 with the outcome.

use std::time::Duration;

use bulkcall::sandbox::{ASYNC_STATUS_PATH, ASYNC_SUBMISSION_PATH, Faults, Sandbox, SandboxConfig};
use reqwest::header::{LOCATION, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

async fn start(config: SandboxConfig) -> Result<Sandbox> {
    Ok(Sandbox::start(config, "127.0.0.1:0".parse()?).await?)
}

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

fn claim(control_number: &str, amount: &str) -> Value {
    json!({
        "controlNumber": control_number,
        "tradingPartnerServiceId": "9496",
        "claimInformation": { "patientControlNumber": "PCN-7", "claimChargeAmount": amount },
    })
}

async fn submit(client: &Client, sandbox: &Sandbox, token: &str, body: &Value) -> Result<Response> {
    Ok(client
        .post(sandbox.base_url() + ASYNC_SUBMISSION_PATH)
        .bearer_auth(token)
        .header("environment", "sandbox")
        .json(body)
        .send()
        .await?)
}

/// Submits and checks the 202, giving back the `Location`.
async fn submit_accepted(client: &Client, sandbox: &Sandbox, token: &str, body: &Value) -> Result<String> {
    let response = submit(client, sandbox, token, body).await?;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    Ok(response.headers().get(LOCATION).ok_or("no Location")?.to_str()?.to_owned())
}

async fn poll(client: &Client, location: &str, token: &str) -> Result<Response> {
    Ok(client.get(location).bearer_auth(token).header("environment", "sandbox").send().await?)
}

fn retry_after(response: &Response) -> Option<&str> {
    response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_claim_is_accepted_after_the_configured_polls() -> Result {
    let config =
        SandboxConfig { async_polls: 3, async_retry_after: Duration::from_secs(4), ..SandboxConfig::default() };
    let sandbox = start(config).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;

    let response = submit(&client, &sandbox, &token, &claim("000000011", "28.75")).await?;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(retry_after(&response), Some("4"));
    let location = response.headers().get(LOCATION).ok_or("no Location")?.to_str()?.to_owned();
    let prefix = format!("{}{ASYNC_STATUS_PATH}/", sandbox.base_url());
    assert!(location.starts_with(&prefix), "{location} is not under {prefix}");
    let answer: Value = response.json().await?;
    assert_eq!(answer["status"], "PENDING");
    assert_eq!(answer["controlNumber"], "000000011");
    assert_eq!(answer["claimReference"]["statusUrl"], location.as_str());

    for n in 1..=3 {
        let response = poll(&client, &location, &token).await?;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "poll {n}");
        assert_eq!(retry_after(&response), Some("4"), "poll {n}");
        let answer: Value = response.json().await?;
        assert_eq!(answer["status"], "PENDING");
        assert_eq!(answer["polls"], n);
    }
    let response = poll(&client, &location, &token).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(retry_after(&response), None, "a final answer asks for no wait");
    let answer: Value = response.json().await?;
    assert_eq!(answer["status"], "SUCCESS");
    assert_eq!(answer["claimStatus"], "ACCEPTED");
    assert_eq!(answer["controlNumber"], "000000011");
    assert_eq!(answer["tradingPartnerServiceId"], "9496");
    assert_eq!(answer["claimReference"]["patientControlNumber"], "PCN-7");
    assert_eq!(answer["polls"], 4);

    // The outcome stays: a poll sent again (a client resuming) gets it again.
    let again = poll(&client, &location, &token).await?;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await?["status"], "SUCCESS");

    let stats = sandbox.stats();
    assert_eq!((stats.async_submissions, stats.polls, stats.api_calls), (1, 5, 6));
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_claim_charge_of_zero_is_rejected_and_claims_are_apart() -> Result {
    let config = SandboxConfig { async_polls: 1, ..SandboxConfig::default() };
    let sandbox = start(config).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let rejected = submit_accepted(&client, &sandbox, &token, &claim("000000012", "0.00")).await?;
    let accepted = submit_accepted(&client, &sandbox, &token, &claim("000000013", "10")).await?;
    assert_ne!(rejected, accepted);

    for location in [&rejected, &accepted] {
        assert_eq!(poll(&client, location, &token).await?.status(), StatusCode::ACCEPTED);
    }
    let response = poll(&client, &rejected, &token).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await?;
    assert_eq!(answer["status"], "REJECTED");
    assert_eq!(answer["controlNumber"], "000000012");
    assert_eq!(answer["errors"][0]["field"], "claimInformation.claimChargeAmount");
    let answer: Value = poll(&client, &accepted, &token).await?.json().await?;
    assert_eq!(answer["status"], "SUCCESS");
    assert_eq!(answer["controlNumber"], "000000013");

    // An invalid submission is refused at once, with nothing to poll.
    let response = submit(&client, &sandbox, &token, &json!({ "controlNumber": "12" })).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.headers().get(LOCATION).is_none());
    assert_eq!(sandbox.stats().async_submissions, 2);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn unknown_and_forgotten_ids_answer_404() -> Result {
    let config = SandboxConfig { async_capacity: 2, ..SandboxConfig::default() };
    let sandbox = start(config).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let base = sandbox.base_url() + ASYNC_STATUS_PATH;
    for id in ["00000000000000FF", "nope", ""] {
        let response = poll(&client, &format!("{base}/{id}"), &token).await?;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "id {id:?}");
    }

    let first = submit_accepted(&client, &sandbox, &token, &claim("000000021", "1")).await?;
    let second = submit_accepted(&client, &sandbox, &token, &claim("000000022", "1")).await?;
    assert_eq!(poll(&client, &first, &token).await?.status(), StatusCode::ACCEPTED);
    // A third claim past the capacity of two: the oldest is forgotten.
    let third = submit_accepted(&client, &sandbox, &token, &claim("000000023", "1")).await?;
    assert_eq!(poll(&client, &first, &token).await?.status(), StatusCode::NOT_FOUND);
    assert_eq!(poll(&client, &second, &token).await?.status(), StatusCode::ACCEPTED);
    assert_eq!(poll(&client, &third, &token).await?.status(), StatusCode::ACCEPTED);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_poll_needs_a_valid_token() -> Result {
    let sandbox = start(SandboxConfig::default()).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let location = submit_accepted(&client, &sandbox, &token, &claim("000000031", "1")).await?;

    let response = poll(&client, &location, "not-a-token").await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = client.get(&location).header("environment", "sandbox").send().await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    sandbox.revoke_all_tokens();
    let response = poll(&client, &location, &token).await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let answer: Value = response.json().await?;
    assert_eq!(answer["error"], "invalid_token");
    let stats = sandbox.stats();
    assert_eq!((stats.unauthorized, stats.expired_token_calls, stats.unknown_token_calls), (3, 1, 2));

    // A refused poll does not count towards the claim's polls; a fresh token goes on.
    let token = self::token(&client, &sandbox).await?;
    let answer: Value = poll(&client, &location, &token).await?.json().await?;
    assert_eq!(answer["polls"], 1);
    // A submission with the revoked token is refused like any call.
    sandbox.revoke_all_tokens();
    let response = submit(&client, &sandbox, &token, &claim("000000032", "1")).await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn fault_flags_apply_to_polls() -> Result {
    // Every key meets a transient 500: its first submission and its claim's first poll fail.
    let faults = Faults { server_errors: 1.0, ..Faults::default() };
    let config = SandboxConfig { faults, async_polls: 1, ..SandboxConfig::default() };
    let sandbox = start(config).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;

    let body = claim("000000041", "1");
    assert_eq!(submit(&client, &sandbox, &token, &body).await?.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let location = submit_accepted(&client, &sandbox, &token, &body).await?;
    assert_eq!(poll(&client, &location, &token).await?.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let response = poll(&client, &location, &token).await?;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.json::<Value>().await?["polls"], 1, "the failed poll did not count");
    assert_eq!(poll(&client, &location, &token).await?.status(), StatusCode::OK);
    sandbox.shutdown().await;

    // A transient 429 with Retry-After, the same way.
    let faults =
        Faults { throttles: 1.0, retry_after: Duration::from_secs(7), transient_attempts: 2, ..Faults::default() };
    let sandbox = start(SandboxConfig { faults, async_polls: 1, ..SandboxConfig::default() }).await?;
    let token = self::token(&client, &sandbox).await?;
    let body = claim("000000042", "1");
    for _ in 0..2 {
        assert_eq!(submit(&client, &sandbox, &token, &body).await?.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    let location = submit_accepted(&client, &sandbox, &token, &body).await?;
    for _ in 0..2 {
        let response = poll(&client, &location, &token).await?;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry_after(&response), Some("7"));
    }
    assert_eq!(poll(&client, &location, &token).await?.status(), StatusCode::ACCEPTED);
    assert_eq!(poll(&client, &location, &token).await?.status(), StatusCode::OK);
    assert_eq!(sandbox.stats().polls, 4);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn latency_applies_to_polls() -> Result {
    let config = SandboxConfig { latency: Duration::from_millis(300), ..SandboxConfig::default() };
    let sandbox = start(config).await?;
    let client = Client::new();
    let token = token(&client, &sandbox).await?;
    let location = submit_accepted(&client, &sandbox, &token, &claim("000000051", "1")).await?;
    let started = std::time::Instant::now();
    assert_eq!(poll(&client, &location, &token).await?.status(), StatusCode::ACCEPTED);
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    sandbox.shutdown().await;
    Ok(())
}
