//! The recorder thread: every outcome written, made durable in groups, marked done.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

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
                        crate::options::shell_word(shared.dir.display())
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

/// An outcome on its way to the recorder, with its row's started mark
/// (settled once the outcome is written) and its share of the bytes that
/// may wait (given back then too).
pub(super) type ToRecord = (Outcome, Marked, OwnedSemaphorePermit);

/// How many bytes the outcomes waiting for the recorder may hold in all
/// (each outcome holds its answer, up to `max_response_bytes`): with
/// eight places per worker and answers of a megabyte, places alone would
/// let gigabytes wait while the recorder syncs.
pub(super) const WAITING_BYTES: usize = 16 << 20;

/// Where workers (and the poller) hand their outcomes to the recorder:
/// bounded by places and by bytes; a sender waits while either is full.
#[derive(Clone)]
pub(super) struct Outcomes {
    places: mpsc::Sender<ToRecord>,
    bytes: Arc<Semaphore>,
    /// The whole budget: an outcome weighing more waits until nothing else
    /// waits, then goes alone.
    most: u32,
}

/// The recorder is gone: nowhere to put outcomes.
#[derive(Debug)]
pub(super) struct Closed;

impl Outcomes {
    /// A channel of `places` outcomes holding `bytes` at most in all.
    pub(super) fn channel(places: usize, bytes: usize) -> (Outcomes, mpsc::Receiver<ToRecord>) {
        let (places, receiver) = mpsc::channel(places);
        let most = u32::try_from(bytes).unwrap_or(u32::MAX).min(Semaphore::MAX_PERMITS as u32);
        (Outcomes { places, bytes: Arc::new(Semaphore::new(most as usize)), most }, receiver)
    }

    /// Hands an outcome to the recorder once its bytes and a place are free.
    pub(super) async fn send(&self, outcome: Outcome, marked: Marked) -> Result<(), Closed> {
        let weight = u32::try_from(outcome.weight()).unwrap_or(u32::MAX).min(self.most);
        let bytes = self.bytes.clone().acquire_many_owned(weight).await.map_err(|_| Closed)?;
        self.places.send((outcome, marked, bytes)).await.map_err(|_| Closed)
    }
}

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
            let (written, held): (Vec<Outcome>, Vec<(Marked, OwnedSemaphorePermit)>) =
                group.drain(..).map(|(outcome, marked, bytes)| (outcome, (marked, bytes))).unzip();
            if busy && let Err(e) = recorder.record(&shared, &written) {
                shared.abort(Error::Output(e));
                return recorder;
            }
            // Written: their rows are settled, and others may be marked;
            // their bytes are free for outcomes to come.
            drop(held);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt as _;
    use serde_json::{Map, Value};

    use super::*;
    use crate::input::Record;
    use crate::outcome::{Source, Success};

    /// A row's outcome holding an answer of `bytes` bytes.
    fn answered(number: u64, bytes: usize) -> Outcome {
        Outcome {
            input: 0,
            number,
            line: number + 1,
            key: number.to_string(),
            attempts: 1,
            latency: Duration::from_millis(1),
            status: Some(200),
            result: Ok(Success {
                response: Value::Null,
                raw: Some(vec![b'1'; bytes]),
                truncated: None,
                captured: Map::new(),
            }),
            source: Source::Record(Record::Json(Map::new())),
            origin: None,
            poll: None,
        }
    }

    #[tokio::test]
    async fn outcomes_waiting_for_the_recorder_are_bounded_by_their_bytes_as_well_as_by_places() {
        let (outcomes, mut recorder) = Outcomes::channel(64, 100_000);
        // Places for 64, bytes for one of these.
        outcomes.send(answered(1, 60_000), Marked::unbounded()).now_or_never().expect("room").unwrap();
        let mut second = Box::pin(outcomes.send(answered(2, 60_000), Marked::unbounded()));
        assert!(futures::poll!(&mut second).is_pending(), "63 places free, but not the bytes");
        // A small one waits its turn behind it: bytes are handed out in order.
        let mut small = Box::pin(outcomes.send(answered(3, 10), Marked::unbounded()));
        assert!(futures::poll!(&mut small).is_pending());

        // The recorder takes the first and writes it: its bytes are free.
        let (first, marked, bytes) = recorder.recv().await.unwrap();
        assert_eq!(first.number, 1);
        assert!(futures::poll!(&mut second).is_pending(), "taken, not written yet");
        drop((marked, bytes));
        second.await.unwrap();
        small.await.unwrap();
        assert_eq!(recorder.recv().await.unwrap().0.number, 2);
        assert_eq!(recorder.recv().await.unwrap().0.number, 3);
    }

    #[tokio::test]
    async fn an_outcome_heavier_than_every_byte_allowed_goes_alone() {
        let (outcomes, mut recorder) = Outcomes::channel(64, 100_000);
        outcomes.send(answered(1, 10), Marked::unbounded()).now_or_never().expect("room").unwrap();
        let mut heavy = Box::pin(outcomes.send(answered(2, 1 << 20), Marked::unbounded()));
        assert!(futures::poll!(&mut heavy).is_pending(), "it waits for the one before it");
        drop(recorder.recv().await.unwrap());
        heavy.await.unwrap();
        let next = outcomes.send(answered(3, 10), Marked::unbounded());
        assert!(next.now_or_never().is_none(), "nothing else while it waits");
        drop(recorder.recv().await.unwrap());
        outcomes.send(answered(4, 10), Marked::unbounded()).now_or_never().expect("room again").unwrap();
    }

    #[test]
    fn an_outcome_weighs_its_answer_and_its_row() {
        let small = answered(1, 0).weight();
        assert!(small >= std::mem::size_of::<Outcome>());
        assert!(answered(1, 50_000).weight() >= small + 50_000);
        let mut row = Map::new();
        row.insert("name".into(), Value::String("x".repeat(1000)));
        let mut with_row = answered(1, 0);
        with_row.source = Source::Record(Record::Json(row));
        assert!(with_row.weight() >= small + 1000);
    }

    #[tokio::test]
    async fn a_sender_learns_the_recorder_is_gone() {
        let (outcomes, recorder) = Outcomes::channel(64, 100_000);
        drop(recorder);
        assert!(outcomes.send(answered(1, 10), Marked::unbounded()).await.is_err());
    }
}
