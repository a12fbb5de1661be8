//! The committer: a thread that writes lines queued by many and makes
//! them durable in groups, one `fdatasync` per [`COMMIT_WINDOW`] at most,
//! before their waiters go on; for started marks, never more rows marked
//! and not settled than may be left in doubt.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{OutputError, io, sync};

/// At most one sync of started marks per this long: the marks queued
/// meanwhile share it. A row waits at most this long (and the sync) more
/// before it goes out; its started mark is durable first, as ever. With
/// the recorder's syncs of the outcome files (one per file per 10 ms), a
/// claim job makes at most one `fdatasync` per millisecond in all.
pub const COMMIT_WINDOW: std::time::Duration = std::time::Duration::from_micros(1250);

/// How many queued lines are durable, or why writing them failed.
pub(super) type Synced = Result<u64, (std::io::ErrorKind, String)>;

/// Why lines queued for `path` did not become durable: the write that
/// failed, or the committer's thread gone ([`ended`]).
pub(super) fn failed(path: &Path, (kind, message): &(std::io::ErrorKind, String)) -> OutputError {
    io(path)(std::io::Error::new(*kind, message.clone()))
}

/// The committer's thread ended: nothing queued now becomes durable.
pub(super) fn ended() -> (std::io::ErrorKind, String) {
    (std::io::ErrorKind::Other, "the committer's thread ended".into())
}

/// Lines on their way to the disk: queued by many, written and synced by
/// one thread, one `fdatasync` per [`COMMIT_WINDOW`] at most. For started
/// marks (`at_most`), the thread takes a mark only while fewer than that
/// many rows are marked and not [settled](Marked): the rows a crash would
/// leave in doubt never outnumber it, however many wait for their mark.
pub(crate) struct Committer {
    queue: std::sync::Mutex<Queue>,
    wake: std::sync::Condvar,
    /// How many queued lines are durable, or why writing them failed.
    synced: tokio::sync::watch::Sender<Synced>,
    /// At most this many lines taken and not settled (started marks).
    at_most: Option<u64>,
    /// How many lines were settled ([`Marked`] dropped).
    settled: std::sync::atomic::AtomicU64,
    /// The thread waits for a line to be settled: a settle wakes it.
    starved: std::sync::atomic::AtomicBool,
}

/// The lines queued and not yet taken, in order.
#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    /// Where each line queued ends in `bytes`.
    ends: std::collections::VecDeque<usize>,
    /// How many lines were ever queued, and taken.
    queued: u64,
    taken: u64,
    /// The file is closed: the thread ends once every line is written.
    closed: bool,
    /// The thread waits on the condition variable: a line queued wakes it.
    idle: bool,
}

impl Queue {
    /// Takes the first `count` lines.
    fn take(&mut self, count: usize) -> Vec<u8> {
        self.taken += count as u64;
        if count == self.ends.len() {
            self.ends.clear();
            return std::mem::take(&mut self.bytes);
        }
        let end = self.ends[count - 1];
        let rest = self.bytes.split_off(end);
        self.ends.drain(..count);
        self.ends.iter_mut().for_each(|e| *e -= end);
        std::mem::replace(&mut self.bytes, rest)
    }
}

impl Committer {
    /// Starts the thread writing to `file`; with `at_most`, the lines are
    /// started marks, each settled by the [`Marked`] it is handed back as.
    pub(super) fn start(file: File, path: PathBuf, at_most: Option<usize>) -> Arc<Committer> {
        let committer = Arc::new(Committer {
            queue: std::sync::Mutex::new(Queue::default()),
            wake: std::sync::Condvar::new(),
            synced: tokio::sync::watch::Sender::new(Ok(0)),
            at_most: at_most.map(|n| n.max(1) as u64),
            settled: std::sync::atomic::AtomicU64::new(0),
            starved: std::sync::atomic::AtomicBool::new(false),
        });
        let shared = committer.clone();
        std::thread::Builder::new()
            .name("bulkcall-ledger".into())
            .spawn(move || shared.run(&file, &path))
            .expect("the ledger's thread starts");
        committer
    }

    /// Queues one line (`fill` appends it) for the next sync; returns the
    /// ticket [`Committer::durable`] waits for. Lines queued one after
    /// another reach the file in that order.
    pub(super) fn queue(&self, fill: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let mine = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            fill(&mut queue.bytes);
            let end = queue.bytes.len();
            queue.ends.push_back(end);
            queue.queued += 1;
            // A wake-up is a system call: only for a thread that waits.
            (queue.queued, std::mem::take(&mut queue.idle))
        };
        if mine.1 {
            self.wake.notify_one();
        }
        mine.0
    }

    /// Waits until what was queued with ticket `mine` is durable.
    pub(super) async fn durable(&self, mine: u64, path: &Path) -> Result<(), OutputError> {
        Committer::wait(self.synced.subscribe(), mine, path).await
    }

    /// Waits until `synced` says ticket `mine` is durable.
    pub(super) async fn wait(
        mut synced: tokio::sync::watch::Receiver<Synced>,
        mine: u64,
        path: &Path,
    ) -> Result<(), OutputError> {
        let synced = synced.wait_for(|s| s.as_ref().map_or(true, |&upto| upto >= mine)).await;
        match synced.as_deref() {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(why)) => Err(failed(path, why)),
            Err(_) => Err(failed(path, &ended())),
        }
    }

    /// The committer's progress, for a follower.
    pub(super) fn subscribe(&self) -> tokio::sync::watch::Receiver<Synced> {
        self.synced.subscribe()
    }

    /// The [`Marked`] of a started mark queued: settled when dropped.
    pub(super) fn marked(self: &Arc<Self>) -> Marked {
        Marked(Some(self.clone()))
    }

    /// One line settled: its row no longer counts against `at_most`.
    fn settle(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.settled.fetch_add(1, SeqCst);
        if self.starved.load(SeqCst) {
            // Taken while the thread checks for room, so the wake-up cannot
            // fall between its check and its wait.
            drop(self.queue.lock().unwrap_or_else(|e| e.into_inner()));
            self.wake.notify_one();
        }
    }

    /// How many more lines may be taken now.
    fn room(&self, queue: &Queue) -> usize {
        use std::sync::atomic::Ordering::SeqCst;
        let waiting = (queue.queued - queue.taken) as usize;
        let Some(at_most) = self.at_most else { return waiting };
        // A line settled before it was taken (its waiter gone) counts as
        // settled early: the difference, signed, is what is open.
        self.starved.store(true, SeqCst);
        let open = queue.taken as i64 - self.settled.load(SeqCst) as i64;
        let room = (at_most as i64 - open).clamp(0, waiting as i64) as usize;
        if room > 0 || queue.closed {
            self.starved.store(false, SeqCst);
        }
        if queue.closed { waiting } else { room }
    }

    /// Ends the thread once what is queued is written.
    pub(super) fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.wake.notify_one();
    }

    fn run(&self, file: &File, path: &Path) {
        loop {
            let (lines, upto) = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if queue.queued == queue.taken && queue.closed {
                        return;
                    }
                    match self.room(&queue) {
                        0 => {
                            queue.idle = true;
                            queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                        }
                        room => break (queue.take(room), queue.taken),
                    }
                }
            };
            let began = std::time::Instant::now();
            let written = (&*file).write_all(&lines).and_then(|()| sync(file, path));
            if let Err(e) = written {
                let _ = self.synced.send_replace(Err((e.kind(), e.to_string())));
                return;
            }
            let _ = self.synced.send_replace(Ok(upto));
            // The next lines gather for the rest of the window.
            if let Some(rest) = COMMIT_WINDOW.checked_sub(began.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
}

/// A row marked started, until it is settled (this dropped): its outcome
/// written, its accepted line durable, or the run done with it. For a job
/// that is not idempotent, at most [`MarkStarted::Durable`]'s `in_doubt`
/// rows are marked and not settled at any moment.
#[must_use = "dropping it settles the row"]
pub struct Marked(Option<Arc<Committer>>);

impl Marked {
    /// A row whose mark counts against no bound (a job that is idempotent,
    /// or a row marked in an earlier part of the run).
    pub fn unbounded() -> Marked {
        Marked(None)
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        if let Some(committer) = self.0.take() {
            committer.settle();
        }
    }
}
