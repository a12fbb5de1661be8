//! The ledger of a run (`journal`): which rows were started, released and done.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// For a job that is not idempotent (after a power cut, a row sent must
    /// be known as sent): the thread that makes each `S` mark durable before
    /// its row is sent, one `fdatasync` per [`COMMIT_WINDOW`] at most.
    committer: Option<Arc<Committer>>,
}

/// At most one sync of started marks per this long: the marks queued
/// meanwhile share it. A row waits at most this long (and the sync) more
/// before it goes out; its started mark is durable first, as ever.
pub const COMMIT_WINDOW: std::time::Duration = std::time::Duration::from_millis(1);

/// The started marks of a job that is not idempotent, on their way to the
/// disk: queued by the workers, written and synced by one thread.
pub(super) struct Committer {
    /// Marks queued and not yet taken, how many were ever queued, and
    /// whether the ledger is gone (the thread ends).
    queued: std::sync::Mutex<(Vec<u8>, u64, bool)>,
    wake: std::sync::Condvar,
    /// How many queued marks are durable, or why writing them failed.
    synced: tokio::sync::watch::Sender<Result<u64, (std::io::ErrorKind, String)>>,
}

impl Committer {
    pub(super) fn start(file: File, path: PathBuf) -> Arc<Committer> {
        let committer = Arc::new(Committer {
            queued: std::sync::Mutex::new((Vec::new(), 0, false)),
            wake: std::sync::Condvar::new(),
            synced: tokio::sync::watch::Sender::new(Ok(0)),
        });
        let shared = committer.clone();
        std::thread::Builder::new()
            .name("bulkcall-ledger".into())
            .spawn(move || shared.run(&file, &path))
            .expect("the ledger's thread starts");
        committer
    }

    /// Queues bytes for the next sync (`fill` appends them); returns the
    /// ticket [`Committer::durable`] waits for. Bytes queued one after
    /// another reach the file in that order.
    pub(super) fn queue(&self, fill: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let mine = {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            fill(&mut queued.0);
            queued.1 += 1;
            queued.1
        };
        self.wake.notify_one();
        mine
    }

    /// Waits until what was queued with ticket `mine` is durable.
    pub(super) async fn durable(&self, mine: u64, path: &Path) -> Result<(), OutputError> {
        let mut synced = self.synced.subscribe();
        let synced = synced.wait_for(|s| s.as_ref().map_or(true, |&upto| upto >= mine)).await;
        match synced.as_deref() {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((kind, message))) => Err(io(path)(std::io::Error::new(*kind, message.clone()))),
            Err(_) => Err(io(path)(std::io::Error::other("the committer's thread ended"))),
        }
    }

    /// Ends the thread once what is queued is written.
    pub(super) fn close(&self) {
        self.queued.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
        self.wake.notify_one();
    }

    fn run(&self, file: &File, path: &Path) {
        loop {
            let (marks, upto) = {
                let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
                while queued.0.is_empty() && !queued.2 {
                    queued = self.wake.wait(queued).unwrap_or_else(|e| e.into_inner());
                }
                if queued.0.is_empty() {
                    return;
                }
                (std::mem::take(&mut queued.0), queued.1)
            };
            let began = std::time::Instant::now();
            let written = (&*file).write_all(&marks).and_then(|()| sync(file, path));
            if let Err(e) = written {
                let _ = self.synced.send_replace(Err((e.kind(), e.to_string())));
                return;
            }
            let _ = self.synced.send_replace(Ok(upto));
            // The next marks gather for the rest of the window.
            if let Some(rest) = COMMIT_WINDOW.checked_sub(began.elapsed()) {
                std::thread::sleep(rest);
            }
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
    /// Opens the ledger; `sync_started` makes each `S` mark durable before
    /// [`Ledger::started`] returns.
    pub fn open(dir: &Path, append: bool, sync_started: bool) -> Result<Ledger, OutputError> {
        let path = dir.join("journal");
        let file = open_file(&path, append, Records::Lines)?;
        let committer = match sync_started {
            true => Some(Committer::start(file.try_clone().map_err(io(&path))?, path.clone())),
            false => None,
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

    /// Marks a row started, written (with `sync_started`, durable) before
    /// this returns. Workers that mark rows in the same moment share one
    /// `write` and one sync: each queues its mark, lets the others run once,
    /// and the first back writes every mark queued.
    pub async fn started(self: &Arc<Self>, input: usize, row: u64) -> Result<(), OutputError> {
        use std::sync::atomic::Ordering;
        if let Some(committer) = &self.committer {
            // Durable before it returns: queued for the committer's next sync.
            let mine = committer.queue(|buf| {
                let _ = writeln!(ByteWriter(buf), "S\t{input}\t{row}");
            });
            return committer.durable(mine, &self.path).await;
        }
        let mine = {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(ByteWriter(&mut queued.0), "S\t{input}\t{row}");
            queued.1 += 1;
            queued.1
        };
        tokio::task::yield_now().await;
        if self.written.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        self.write_queued(mine)
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
        use std::fmt::Write as _;
        let _ = write!(marks, "D\t{input}\t{row}\t");
        match done.status {
            Some(status) => {
                let _ = write!(marks, "{status}");
            }
            None => marks.push('-'),
        }
        let error = done.error.as_deref().unwrap_or("ok");
        let _ = writeln!(marks, "\t{error}\t{}\t{}\t{}", done.attempts, done.latency_us, done.at_ms);
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
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io(&path))? == 0 {
                break;
            }
            // A line cut by a crash (only ever the last one) is ignored:
            // cut short, its row number could name another row.
            let Some(line) = line.strip_suffix('\n') else { break };
            let f: Vec<&str> = line.split('\t').collect();
            let key = || Some((f.get(1)?.parse::<usize>().ok()?, f.get(2)?.parse::<u64>().ok()?));
            match (f[0], key()) {
                ("S", Some((input, row))) => on_mark(Mark::Started(input, row)),
                ("R", Some((input, row))) => on_mark(Mark::Released(input, row)),
                ("D", Some((input, row))) if f.len() == 8 => on_mark(Mark::Done(
                    input,
                    row,
                    Done {
                        status: f[3].parse().ok(),
                        error: (f[4] != "ok").then(|| f[4].to_string()),
                        attempts: f[5].parse().unwrap_or(0),
                        latency_us: f[6].parse().unwrap_or(0),
                        at_ms: f[7].parse().unwrap_or(0),
                    },
                )),
                _ => {}
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
