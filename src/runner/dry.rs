//! Dry runs: every row rendered into `requests.jsonl`, nothing sent.

use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ExitCode};
use crate::input::{Item, Row};
use crate::job::Request;
use crate::outcome::Outcome;
use crate::output::{RequestsFile, Writer};
use crate::report::{Live, Stats};
use crate::rows::RowSet;

use super::reader::spawn_reader;
use super::{Finished, Plan, SHOWN_FAILURES, describe_failure, failure_files, input_infos, input_names};

/// A dry run: renders every row into `requests.jsonl`; fetches no token and
/// sends nothing. Rows that cannot be rendered go to failures.
pub async fn dry_run(plan: Plan, authorized: bool) -> Result<Finished, Error> {
    let live = Arc::new(Live::default());
    let (tx, rx) = async_channel::bounded::<Vec<Item>>(16);
    let reader = spawn_reader(
        plan.inputs.clone(),
        plan.limit,
        plan.shard,
        RowSet::default(),
        live,
        CancellationToken::new(),
        tx,
    );
    let mut writer = Writer::open(&plan.dir, input_infos(&plan), false, false, None)?;
    let mut requests = RequestsFile::create(&plan.dir)?;
    let names = input_names(&plan.inputs);
    let mut stats = Stats::default();
    let (mut rendered, mut first_failures) = (0u64, Vec::new());
    while let Ok(batch) = rx.recv().await {
        for item in batch {
            let outcome = match item {
                Err(bad) => Some(Outcome::bad_row(bad)),
                Ok(row) => match plan.requests.render(&row) {
                    Ok(request) => {
                        requests.write(&dry_request(&row, &request, authorized))?;
                        rendered += 1;
                        // Ready to send: counted in the summary's total (and succeeded), no attempt.
                        stats.add_recorded(None, None, 0, 0);
                        None
                    }
                    Err(e) => {
                        let message = format!("{} line {}: {e}", names[row.input], row.line);
                        Some(Outcome::invalid(&row, plan.requests.key(&row), message))
                    }
                },
            };
            if let Some(outcome) = outcome {
                stats.add(&outcome);
                if first_failures.len() < SHOWN_FAILURES {
                    first_failures.extend(describe_failure(&outcome));
                }
                writer.record(&outcome)?;
                writer.flush()?;
            }
        }
    }
    reader.await.expect("the reader thread does not panic")?;
    requests.flush()?;
    let exit = if stats.failed() > 0 { ExitCode::RowsFailed } else { ExitCode::Success };
    let summary = stats.summary(0, exit.code());
    Ok(Finished { summary, exit, abort: None, failure_files: failure_files(&plan, &writer), first_failures, rendered })
}

fn dry_request(row: &Row, request: &Request, authorized: bool) -> Value {
    let mut headers = serde_json::Map::new();
    if authorized {
        headers.insert("authorization".into(), Value::from("Bearer <redacted>"));
    }
    for (name, value) in &request.headers {
        let shown = if crate::config::is_sensitive_header(name.as_str()) {
            "<redacted>"
        } else {
            value.to_str().unwrap_or("<binary>")
        };
        headers.insert(name.as_str().to_string(), Value::from(shown));
    }
    let body = request.body.as_ref().map(|b| serde_json::from_slice::<Value>(b).unwrap_or(Value::Null));
    serde_json::json!({
        "row": row.number,
        "key": request.key,
        "method": request.method.as_str(),
        "url": request.url.as_str(),
        "headers": headers,
        "body": body,
    })
}
