//! A lane: a thread with its own runtime and connections, running workers.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::input::Item;
use crate::outcome::Outcome;
use crate::output::{Marked, Writer};

use super::Shared;
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
    writer: Arc<Mutex<Writer>>,
    client: reqwest::Client,
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
            let clean = runtime.block_on(lane(workers, shared, batches, outcomes, writer, client));
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
    writer: Arc<Mutex<Writer>>,
    // The lane's own: its connections' I/O stays on this thread.
    client: reqwest::Client,
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

    // A job that is not idempotent: this lane writes its outcomes itself.
    let (to_write, scribe) = match shared.requests.idempotent() {
        true => (None, None),
        false => {
            let (tx, rx) = mpsc::channel(workers.max(1));
            (Some(tx), Some(tokio::spawn(scribe(shared.clone(), writer, rx, outcomes.clone()))))
        }
    };
    let lane = Arc::new(Lane { marks: shared.ledger.marks(), client });
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (shared, rows, lane) = (shared.clone(), row_rx.clone(), lane.clone());
        let (out, to_write) = (outcomes.clone(), to_write.clone());
        set.spawn(async move {
            while !shared.stop.is_cancelled() {
                let Ok(item) = rows.recv().await else { break };
                if shared.stop.is_cancelled() {
                    break;
                }
                // The row's started mark, once it has one: settled once its
                // outcome is written (the scribe or the recorder drops it
                // then), or here when the row ends without an outcome.
                let mut marked = Marked::unbounded();
                let Some(outcome) = process(&shared, &lane, item, &mut marked).await else { continue };
                let sent = match &to_write {
                    Some(scribe) => scribe.send((outcome, marked)).await.is_ok(),
                    None => out.send(outcome, marked).await.is_ok(),
                };
                if !sent {
                    // The recorder (or the scribe) stopped: nowhere to put outcomes.
                    break;
                }
            }
        });
    }
    drop((row_rx, outcomes, to_write));
    let mut clean = true;
    while let Some(joined) = set.join_next().await {
        clean &= joined.is_ok();
    }
    feeder.abort();
    // Every worker is gone: the scribe writes what they left, and ends.
    if let Some(scribe) = scribe {
        clean &= scribe.await.is_ok();
    }
    clean
}

/// The lane's scribe, for a job that is not idempotent, whose rows hold
/// their place among those that may be in doubt (`-j` at most) until their
/// outcome is written: a task on the lane's own thread that writes its
/// workers' outcome lines (every outcome that came meanwhile in one
/// `write` per file), settles their rows at once, so that others may be
/// marked, and then hands them to the recorder, which counts them and
/// marks them done at its next sync. The hop to the recorder's thread is
/// thus off the path of the next row's mark. A failure of a run with
/// `--max-failures` goes to the recorder unwritten: counted before its row
/// is settled, it stops the run before another row is marked.
async fn scribe(
    shared: Arc<Shared>,
    writer: Arc<Mutex<Writer>>,
    mut outcomes: mpsc::Receiver<(Outcome, Marked)>,
    recorder: Outcomes,
) {
    let most = outcomes.max_capacity();
    let mut group = Vec::with_capacity(most);
    let counted_first = |outcome: &Outcome| shared.max_failures.is_some() && outcome.result.is_err();
    while outcomes.recv_many(&mut group, most).await > 0 {
        let written = Writer::lock(&writer).write_all(group.iter().map(|(o, _)| o).filter(|o| !counted_first(o)));
        if let Err(e) = written {
            // Their rows stay in doubt; without a place for outcomes, the
            // run stops (the workers' next send fails).
            shared.abort(Error::Output(e));
            return;
        }
        // Written: the rows are settled (their marks dropped) before any wait.
        let to_record: Vec<(Outcome, Option<Marked>)> = group
            .drain(..)
            .map(|(outcome, marked)| {
                let marked = counted_first(&outcome).then_some(marked);
                (outcome, marked)
            })
            .collect();
        for (outcome, marked) in to_record {
            let sent = match marked {
                Some(marked) => recorder.send(outcome, marked).await,
                None => recorder.send_written(outcome).await,
            };
            if sent.is_err() {
                return;
            }
        }
    }
}
