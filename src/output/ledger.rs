//! The ledger of a run (`journal`): which rows were started, released and done.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::committer::{Committer, Marked, Synced, ended, failed};
use super::{OutputError, Records, io, open_file, sync};
use crate::outcome::Outcome;
use crate::rows::RowSet;

/// The ledger of a run (`journal`): `S` when a row's first attempt is
/// about to go out, `D` with its outcome once that is written, `R` when the
/// run stopped before the row was finished and the gateway provably did
/// not act on it. Rows with `S` and no later `R` or `D` were in flight when
/// the run stopped: in doubt.
pub struct Ledger {
    path: PathBuf,
    /// Opened for appending: each batch of lines is one `write`, whole even
    /// when workers write at the same moment.
    file: File,
    /// `S` marks not yet written, and how many marks were ever queued.
    queued: std::sync::Mutex<(Vec<u8>, u64)>,
    /// Held while marks are written (and synced): the one writer at a time.
    writing: std::sync::Mutex<()>,
    /// How many queued marks have been written (and synced).
    written: std::sync::atomic::AtomicU64,
    /// For [`MarkStarted::Durable`]: the thread that makes each `S` mark
    /// durable before its row is sent, one `fdatasync` per
    /// [`COMMIT_WINDOW`](super::COMMIT_WINDOW) at most.
    committer: Option<Arc<Committer>>,
}

/// How a run marks its rows started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkStarted {
    /// Written before the row goes out: a job that is idempotent, whose
    /// row sent again does no harm after a power cut.
    Written,
    /// Durable before the row goes out (after a power cut, a row sent must
    /// be known as sent), with at most `in_doubt` rows at any moment whose
    /// mark is written and that are not [settled](Marked): the most a crash
    /// can leave in doubt.
    Durable { in_doubt: usize },
}

/// Where the workers of one thread (a lane) wait for their started marks to
/// be durable: one task there follows the committer and wakes, after each
/// sync, the workers whose marks it made durable, and only those. A sync
/// wakes each thread once, not each of its workers from the committer's
/// thread (a wake-up across threads is a system call).
pub struct Marks {
    ledger: Arc<Ledger>,
    waiting: Option<Arc<std::sync::Mutex<Waiting>>>,
}

/// The workers of one thread waiting for their marks, by ticket.
struct Waiting {
    /// The committer's progress, as the follower last saw it.
    synced: Synced,
    /// In ticket order.
    rows: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

impl Marks {
    /// Marks a row started, as [`Ledger::started`] does.
    pub async fn started(&self, input: usize, row: u64) -> Result<Marked, OutputError> {
        let (Some(committer), Some(waiting)) = (&self.ledger.committer, &self.waiting) else {
            return self.ledger.started(input, row).await;
        };
        let (mine, marked) = Ledger::queue_started(committer, input, row);
        let durable = {
            let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
            match &waiting.synced {
                Ok(upto) if *upto >= mine => None,
                Ok(_) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let at = waiting.rows.partition_point(|(ticket, _)| *ticket < mine);
                    waiting.rows.insert(at, (mine, tx));
                    Some(rx)
                }
                Err(why) => return Err(failed(&self.ledger.path, why)),
            }
        };
        if let Some(durable) = durable
            && durable.await.is_err()
        {
            // The follower is gone: the committer's thread failed, or ended.
            let synced = waiting.lock().unwrap_or_else(|e| e.into_inner()).synced.clone();
            return Err(failed(&self.ledger.path, &synced.err().unwrap_or_else(ended)));
        }
        Ok(marked)
    }

    /// Follows the committer: after each sync, wakes the workers whose
    /// marks it made durable. Ends with the committer's thread (every
    /// worker still waiting is then told), or when it fails.
    async fn follow(mut synced: tokio::sync::watch::Receiver<Synced>, waiting: Arc<std::sync::Mutex<Waiting>>) {
        loop {
            let now = synced.borrow_and_update().clone();
            let failed = now.is_err();
            {
                let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
                let upto = *now.as_ref().unwrap_or(&u64::MAX);
                while waiting.rows.front().is_some_and(|(ticket, _)| *ticket <= upto) {
                    let (_, durable) = waiting.rows.pop_front().expect("checked");
                    // An error leaves the sender dropped: its worker is told.
                    if !failed {
                        let _ = durable.send(());
                    }
                }
                waiting.synced = now;
            }
            if failed || synced.changed().await.is_err() {
                break;
            }
        }
        // Every worker still waiting is told (its sender dropped), and any
        // later one at once: the committer's error, or that its thread ended.
        let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.rows.clear();
        if waiting.synced.is_ok() {
            waiting.synced = Err(ended());
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Some(committer) = &self.committer {
            committer.close();
        }
    }
}

/// `write!` into a byte buffer.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::io::Write for ByteWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a run's ledger says: the rows with a recorded outcome, and the rows
/// started without one (in doubt), in order.
pub type LedgerState = (RowSet, Vec<(usize, u64)>);

/// What the ledger knows of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub status: Option<u16>,
    /// `None` for a success.
    pub error: Option<String>,
    pub attempts: u32,
    pub latency_us: u64,
    /// When the outcome was recorded, in ms since the Unix epoch (0 if unknown).
    pub at_ms: u64,
}

impl Ledger {
    /// Opens the ledger, marking rows started as `started` says.
    pub fn open(dir: &Path, append: bool, started: MarkStarted) -> Result<Ledger, OutputError> {
        let path = dir.join("journal");
        let file = open_file(&path, append, Records::Lines)?;
        let committer = match started {
            MarkStarted::Durable { in_doubt } => {
                Some(Committer::start(file.try_clone().map_err(io(&path))?, path.clone(), Some(in_doubt)))
            }
            MarkStarted::Written => None,
        };
        Ok(Ledger {
            file,
            path,
            queued: std::sync::Mutex::new((Vec::new(), 0)),
            writing: std::sync::Mutex::new(()),
            written: std::sync::atomic::AtomicU64::new(0),
            committer,
        })
    }

    /// Marks a row started, written (with [`MarkStarted::Durable`],
    /// durable) before this returns; the row is settled when the [`Marked`]
    /// returned is dropped. Workers that mark rows in the same moment share
    /// one `write` (and one sync): each queues its mark, lets the others run
    /// once, and the first back writes every mark queued.
    pub async fn started(self: &Arc<Self>, input: usize, row: u64) -> Result<Marked, OutputError> {
        use std::sync::atomic::Ordering;
        if let Some(committer) = &self.committer {
            let (mine, marked) = Self::queue_started(committer, input, row);
            committer.durable(mine, &self.path).await?;
            return Ok(marked);
        }
        let mine = {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(ByteWriter(&mut queued.0), "S\t{input}\t{row}");
            queued.1 += 1;
            queued.1
        };
        tokio::task::yield_now().await;
        if self.written.load(Ordering::Acquire) < mine {
            self.write_queued(mine)?;
        }
        Ok(Marked::unbounded())
    }

    /// Queues a started mark for the committer's next sync, which takes it
    /// once there is room: its ticket, and the row's [`Marked`] (which
    /// settles even when dropped while it waits).
    fn queue_started(committer: &Arc<Committer>, input: usize, row: u64) -> (u64, Marked) {
        let mine = committer.queue(|buf| {
            let _ = writeln!(ByteWriter(buf), "S\t{input}\t{row}");
        });
        (mine, committer.marked())
    }

    /// Where this thread's workers mark their rows started: for a ledger
    /// whose marks are durable first, a task on this thread's runtime
    /// follows the committer for them. Called on an async runtime.
    pub fn marks(self: &Arc<Self>) -> Marks {
        let waiting = self.committer.as_ref().map(|committer| {
            let synced = committer.subscribe();
            let waiting = Waiting { synced: synced.borrow().clone(), rows: Default::default() };
            let waiting = Arc::new(std::sync::Mutex::new(waiting));
            tokio::spawn(Marks::follow(synced, waiting.clone()));
            waiting
        });
        Marks { ledger: self.clone(), waiting }
    }

    /// Writes every mark queued, unless another writer already wrote `mine`
    /// (a job that is idempotent: its marks need not be durable first).
    fn write_queued(&self, mine: u64) -> Result<(), OutputError> {
        use std::sync::atomic::Ordering;
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if self.written.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        let (marks, upto) = {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut queued.0), queued.1)
        };
        (&self.file).write_all(&marks).map_err(io(&self.path))?;
        self.written.store(upto, Ordering::Release);
        Ok(())
    }

    /// Makes durable what an outcome line may not reach the disk before:
    /// its row's started mark. A ledger whose marks are durable before
    /// their rows go out ([`MarkStarted::Durable`]) has nothing left to do
    /// (its committer's syncs also carry the done marks written meanwhile),
    /// which spares the disk a sync per group.
    pub fn sync_started(&self) -> Result<(), OutputError> {
        match self.committer {
            Some(_) => Ok(()),
            None => self.sync(),
        }
    }

    /// Makes every mark written so far durable.
    pub fn sync(&self) -> Result<(), OutputError> {
        sync(&self.file, &self.path).map_err(io(&self.path))
    }

    /// Marks a started row released: the run stopped before the row was
    /// finished, and the gateway provably did not act on any of its
    /// attempts (none went out, or each was refused before processing), so
    /// `resume` sends it as a row never sent, not as one in doubt.
    pub fn released(&self, input: usize, row: u64) -> Result<(), OutputError> {
        (&self.file).write_all(format!("R\t{input}\t{row}\n").as_bytes()).map_err(io(&self.path))
    }

    /// Writes done marks ([`Ledger::push_done`]), in one `write`.
    pub(super) fn write_marks(&self, lines: &str) -> Result<(), OutputError> {
        (&self.file).write_all(lines.as_bytes()).map_err(io(&self.path))
    }

    /// Appends `outcome`'s done mark, stamped `at_ms`, to `marks`.
    pub(super) fn push_done(marks: &mut String, outcome: &Outcome, at_ms: u64) {
        let done = Done {
            status: outcome.status,
            error: outcome.result.as_ref().err().map(|f| f.kind.as_str().to_string()),
            attempts: outcome.attempts,
            latency_us: outcome.latency.as_micros() as u64,
            at_ms,
        };
        Self::push_mark(marks, outcome.input, outcome.number, &done);
    }

    /// The one place that writes a done mark's line.
    fn push_mark(marks: &mut String, input: usize, row: u64, done: &Done) {
        let mut number = itoa::Buffer::new();
        marks.push_str("D\t");
        marks.push_str(number.format(input));
        marks.push('\t');
        marks.push_str(number.format(row));
        marks.push('\t');
        match done.status {
            Some(status) => marks.push_str(number.format(status)),
            None => marks.push('-'),
        }
        marks.push('\t');
        marks.push_str(done.error.as_deref().unwrap_or("ok"));
        for n in [u64::from(done.attempts), done.latency_us, done.at_ms] {
            marks.push('\t');
            marks.push_str(number.format(n));
        }
        marks.push('\n');
    }

    /// Marks done, before a resumed run sends anything, the rows whose
    /// outcome is on file without a mark (a crash came between the two), so
    /// later resumes know them too. The marks are on disk when this returns.
    pub fn recovered(dir: &Path, rows: &[(usize, u64, Done)]) -> Result<(), OutputError> {
        if rows.is_empty() {
            return Ok(());
        }
        let path = dir.join("journal");
        let mut lines = String::new();
        for (input, row, done) in rows {
            Self::push_mark(&mut lines, *input, *row, done);
        }
        let file = open_file(&path, true, Records::Lines)?;
        (&file).write_all(lines.as_bytes()).and_then(|()| file.sync_data()).map_err(io(&path))
    }

    /// Reads a run's ledger: the rows done and the rows started but not
    /// done. `on_done` sees the outcome of each row done, once. Memory is
    /// two bits per row.
    pub fn read(dir: &Path, mut on_done: impl FnMut(&Done)) -> Result<LedgerState, OutputError> {
        let (mut done, mut started) = (RowSet::default(), RowSet::default());
        Ledger::scan(dir, |mark| match mark {
            Mark::Started(input, row) => {
                started.insert(input, row);
            }
            Mark::Released(input, row) => {
                started.remove(input, row);
            }
            Mark::Done(input, row, outcome) => {
                if done.insert(input, row) {
                    on_done(&outcome);
                }
            }
        })?;
        let in_doubt = started.difference(&done).collect();
        Ok((done, in_doubt))
    }

    /// Streams a run's ledger, mark by mark. The ledger's line format is
    /// known here alone.
    pub fn scan(dir: &Path, mut on_mark: impl FnMut(Mark)) -> Result<(), OutputError> {
        use std::io::BufRead;
        let path = dir.join("journal");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut reader = std::io::BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(io(&path))? == 0 {
                break;
            }
            // A line cut by a crash (only ever the last one) is ignored:
            // cut short, its row number could name another row.
            let Some(line) = line.strip_suffix(b"\n") else { break };
            if let Some(mark) = Mark::parse(line) {
                on_mark(mark);
            }
        }
        Ok(())
    }
}

/// One line of the ledger: (input, row) started, released (not sent after
/// all, or refused before processing), or done with its outcome.
pub enum Mark {
    Started(usize, u64),
    Released(usize, u64),
    Done(usize, u64, Done),
}

impl Mark {
    /// One line, without its newline; `None` for a line it does not know.
    fn parse(line: &[u8]) -> Option<Mark> {
        fn number<T: std::str::FromStr>(field: &[u8]) -> Option<T> {
            std::str::from_utf8(field).ok()?.parse().ok()
        }
        let mut fields = line.split(|&b| b == b'\t');
        let (kind, input, row) = (fields.next()?, number(fields.next()?)?, number(fields.next()?)?);
        match kind {
            b"S" => Some(Mark::Started(input, row)),
            b"R" => Some(Mark::Released(input, row)),
            b"D" => {
                let f: [&[u8]; 5] = [fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?];
                if fields.next().is_some() {
                    return None;
                }
                let done = Done {
                    status: number(f[0]),
                    error: (f[1] != b"ok").then(|| String::from_utf8_lossy(f[1]).into_owned()),
                    attempts: number(f[2]).unwrap_or(0),
                    latency_us: number(f[3]).unwrap_or(0),
                    at_ms: number(f[4]).unwrap_or(0),
                };
                Some(Mark::Done(input, row, done))
            }
            _ => None,
        }
    }
}
