//! The recorder thread: every outcome written, made durable in groups, marked done.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::outcome::Outcome;
use crate::output::{GroupCommit, Marked, OutputError, Writer};
use crate::report::Stats;

use super::{SHOWN_FAILURES, Shared, describe_failure};

/// The run's files and statistics, owned by the recorder thread.
pub(super) struct Recorder {
    pub(super) writer: Writer,
    pub(super) group: GroupCommit,
    /// Shared with the metrics, which read it while the run goes on.
    pub(super) stats: Arc<Mutex<Stats>>,
    pub(super) first_failures: Vec<(String, String)>,
}

impl Recorder {
    /// Records outcomes: counted, and written with one write per file;
    /// made durable and marked done at the group's sync.
    fn record(&mut self, shared: &Shared, outcomes: &[Outcome]) -> Result<(), OutputError> {
        let live = &shared.live;
        // Held while counting, so the metrics see the statistics and `live` agree.
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        for outcome in outcomes {
            stats.add(outcome);
            if self.first_failures.len() < SHOWN_FAILURES {
                self.first_failures.extend(describe_failure(outcome));
            }
            live.done.fetch_add(1, Ordering::Relaxed);
            let counter = if outcome.result.is_ok() { &live.succeeded } else { &live.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            if let Some(max) = shared.max_failures {
                // A count caps the run's failures, earlier sessions' too, so
                // resuming with the same cap never piles up more; a share
                // judges this session's rows alone, failed and done alike.
                let done = live.done.load(Ordering::Relaxed);
                let failed = match max {
                    crate::options::MaxFailures::Count(_) => stats.failed(),
                    crate::options::MaxFailures::Percent(_) => live.failed.load(Ordering::Relaxed),
                };
                if max.reached(failed, done) && !shared.stop.is_cancelled() {
                    let of = match max {
                        crate::options::MaxFailures::Count(_) => "the run's rows".to_string(),
                        crate::options::MaxFailures::Percent(_) => format!("{done} rows sent"),
                    };
                    shared.abort(Error::MaxFailures(format!(
                        "{failed} of {of} failed, reaching --max-failures; `{} resume {}` sends the rest",
                        crate::options::program(),
                        shared.dir.display()
                    )));
                }
            }
        }
        drop(stats);
        // The outcomes first, durable, then the ledger's marks: a crash or
        // a power cut between the two leaves those rows in doubt, never lost.
        self.group.write(&mut self.writer, outcomes)
    }

    /// Makes the outcomes written durable and marks them done.
    fn sync(&mut self, shared: &Shared) -> Result<(), OutputError> {
        self.group.sync(&mut self.writer, &shared.ledger)
    }
}

/// An outcome on its way to the recorder, with its row's started mark:
/// settled once the outcome is written.
pub(super) type ToRecord = (Outcome, Marked);

/// How often a busy recorder takes the outcomes waiting: in a beat, rather
/// than woken by every one (a wake-up crosses threads).
pub(super) const RECORDER_BEAT: Duration = Duration::from_millis(1);

/// The beat for a job that is not idempotent: its rows hold their place
/// among those that may be in doubt until their outcome is written, so
/// they are written sooner.
pub(super) const CLAIM_BEAT: Duration = Duration::from_micros(200);

/// Starts the recorder: a thread that takes the outcomes waiting and writes
/// them at once, and makes what it wrote durable (with the done marks after
/// it) at most [`crate::output::SYNC_EVERY`] later, so one sync serves every
/// outcome of that moment and the syncs never hold up a call: workers wait
/// only when the channel is full. While outcomes keep coming it takes them
/// every [`RECORDER_BEAT`] ([`CLAIM_BEAT`] for a job that is not
/// idempotent, whose rows are settled once their outcome is written); when
/// none came, it waits to be woken. When a write fails, the run is aborted
/// and the channel closed (the workers stop: without a place for outcomes,
/// sending more would lose them). The thread hands the recorder back when
/// every sender is gone and the last outcomes are durable.
pub(super) fn start_recorder(
    mut recorder: Recorder,
    shared: Arc<Shared>,
    mut outcomes: mpsc::Receiver<ToRecord>,
) -> Result<oneshot::Receiver<Recorder>, Error> {
    use tokio::sync::mpsc::error::TryRecvError;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start an async runtime: {e}")))?;
    let (done_tx, done_rx) = oneshot::channel();
    let record = async move {
        let most = outcomes.max_capacity();
        let mut group = Vec::with_capacity(most);
        let (mut busy, mut open) = (false, true);
        let beat = if shared.requests.idempotent() { RECORDER_BEAT } else { CLAIM_BEAT };
        while open {
            if busy {
                // This thread's own: nothing else waits on its runtime.
                std::thread::sleep(beat);
                while group.len() < most {
                    match outcomes.try_recv() {
                        Ok(outcome) => group.push(outcome),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
            } else {
                tokio::select! {
                    taken = outcomes.recv_many(&mut group, most) => open = taken > 0,
                    () = sleep_until_some(recorder.group.due()) => {}
                }
            }
            busy = !group.is_empty();
            let (written, marks): (Vec<Outcome>, Vec<Marked>) = group.drain(..).unzip();
            if busy && let Err(e) = recorder.record(&shared, &written) {
                shared.abort(Error::Output(e));
                return recorder;
            }
            // Written: their rows are settled, and others may be marked.
            drop(marks);
            if recorder.group.due().is_some_and(|due| std::time::Instant::now() >= due)
                && let Err(e) = recorder.sync(&shared)
            {
                shared.abort(Error::Output(e));
                return recorder;
            }
        }
        // The last group, durable, then its done marks too: a run that
        // finished says so on disk. A failure here is the run's failure:
        // those outcomes may not be on disk.
        if let Err(e) = recorder.sync(&shared).and_then(|()| shared.ledger.sync()) {
            shared.abort(Error::Output(e));
        }
        recorder
    };
    std::thread::Builder::new()
        .name("bulkcall-recorder".into())
        .spawn(move || {
            let _ = done_tx.send(runtime.block_on(record));
        })
        .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?;
    Ok(done_rx)
}

/// Sleeps until `at`; forever when `None`.
pub(super) async fn sleep_until_some(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
