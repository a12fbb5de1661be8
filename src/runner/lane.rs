//! A lane: a thread with its own runtime and connections, running workers.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::error::Error;
use crate::input::Item;
use crate::output::Marked;

use super::Shared;
use super::http::ApiClient;
use super::reader::BATCH;
use super::recorder::Outcomes;
use super::worker::{Lane, process};

/// Starts one lane: a thread running `workers` workers and their collector
/// on an async runtime of its own. The receiver says whether every worker
/// ended cleanly.
pub(super) fn start_lane(
    number: usize,
    workers: usize,
    shared: Arc<Shared>,
    batches: async_channel::Receiver<Vec<Item>>,
    outcomes: Outcomes,
    client: ApiClient,
) -> Result<oneshot::Receiver<bool>, Error> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("bulkcall-lane-{number}"))
        .spawn(move || {
            // Built here: a runtime must not be dropped on an async thread.
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    shared.abort(Error::Internal(format!("cannot start an async runtime: {e}")));
                    let _ = done_tx.send(false);
                    return;
                }
            };
            let clean = runtime.block_on(lane(workers, shared, batches, outcomes, client));
            // Do not wait for connections' tasks on the way out.
            runtime.shutdown_background();
            let _ = done_tx.send(clean);
        })
        .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?;
    Ok(done_rx)
}

pub(super) async fn lane(
    workers: usize,
    shared: Arc<Shared>,
    batches: async_channel::Receiver<Vec<Item>>,
    outcomes: Outcomes,
    // The lane's own: its connections' I/O stays on this thread.
    client: ApiClient,
) -> bool {
    let (row_tx, row_rx) = async_channel::bounded::<Item>(BATCH);
    let feeder = tokio::spawn(async move {
        while let Ok(batch) = batches.recv().await {
            for item in batch {
                if row_tx.send(item).await.is_err() {
                    return;
                }
            }
        }
    });

    let lane = Arc::new(Lane { marks: shared.ledger.marks(), client });
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (shared, rows, out, lane) = (shared.clone(), row_rx.clone(), outcomes.clone(), lane.clone());
        set.spawn(async move {
            while !shared.stop.is_cancelled() {
                let Ok(item) = rows.recv().await else { break };
                if shared.stop.is_cancelled() {
                    break;
                }
                // The row's started mark, once it has one: settled once its
                // outcome is written (the recorder drops it then), or here
                // when the row ends without an outcome.
                let mut marked = Marked::unbounded();
                let Some(outcome) = process(&shared, &lane, item, &mut marked).await else { continue };
                if out.send(outcome, marked).await.is_err() {
                    // The recorder stopped: nowhere to put outcomes.
                    break;
                }
            }
        });
    }
    drop((row_rx, outcomes));
    let mut clean = true;
    while let Some(joined) = set.join_next().await {
        clean &= joined.is_ok();
    }
    feeder.abort();
    clean
}
