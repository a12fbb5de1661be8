//! The run directory. This module is the only writer of files in it:
//! `results.jsonl`, `failures.csv` / `failures.jsonl`, `requests.jsonl`,
//! `summary.json`, `run.json` and `events.jsonl`.
//!
//! Files hold PHI: the directory is created 0700 and every file 0600.
//! Records are serialized whole into a buffer that [`Writer::flush`] hands
//! to the operating system in one `write` per file, so a line is never torn
//! and `kill -9` loses no outcome that was recorded (flushed). `journal` is the ledger that makes `resume` exact: a row is
//! marked started before its first attempt goes out, and done after its
//! outcome is written.

mod accepted;
mod commit;
mod committer;
mod events;
mod ledger;
mod lock;
mod recover;
mod run_info;
mod writer;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use accepted::{ACCEPTED, AcceptedFile, AcceptedRow, Place, StoredRecord};
pub use commit::{GroupCommit, SYNC_EVERY};
pub use committer::{COMMIT_WINDOW, Marked};
pub use events::EventsFile;
pub use ledger::{Done, Ledger, LedgerState, Mark, MarkStarted, Marks};
pub use lock::{JobLock, lock_job, lock_run_dir, run_dir_holder};
pub use recover::{Recent, recent_outcomes};
pub use run_info::{RunFlags, RunInfo};
pub use writer::{InputInfo, RequestsFile, Writer, failure_file_names};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{0} already holds a run (it has a run.json); choose another --out, or finish that run with `bulkcall resume {0}`"
    )]
    Occupied(PathBuf),
    #[error("another run of job `{job}` is going on (pid {pid}, lock {path}); wait for it, or stop it first")]
    Locked { job: String, pid: String, path: PathBuf },
    #[error("another bulkcall process (pid {pid}) is working on {dir}; wait for it, or stop it first")]
    RunLocked { dir: PathBuf, pid: String },
    #[error(
        "{path} belongs to another user (uid {owner}); a run directory holds PHI and must be yours alone: choose another --out"
    )]
    NotOwned { path: PathBuf, owner: u32 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io { path: path.to_path_buf(), source }
}

/// How many times this process made a run's file durable ([`sync`]).
static SYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many `fdatasync`s this process made to keep its run's files durable
/// (started marks, outcome lines, done marks, accepted rows).
pub fn disk_syncs() -> u64 {
    SYNCS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Makes what was written to `file` durable: on disk, not only handed to
/// the operating system. Tests record the order files were synced in.
fn sync(file: &File, path: &Path) -> std::io::Result<()> {
    SYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    #[cfg(test)]
    tests::SYNCED.lock().unwrap().push((path.to_path_buf(), file.metadata().map_or(0, |m| m.len())));
    #[cfg(not(test))]
    let _ = path;
    file.sync_data()
}

/// Makes a new file's name durable in its directory.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Creates the run directory (mode 0700) and its parents. A directory that
/// already exists is made 0700, whatever it was (its files hold PHI); one
/// that belongs to another user is refused.
/// Points `latest` in a folder of runs at `run` (a name in that folder),
/// replacing the link whole: `out/<job>/latest` is the newest run. A link
/// that cannot be made is only a convenience lost: warned, not fatal.
pub fn point_latest(folder: &Path, run: &Path) {
    let Some(name) = run.file_name() else { return };
    let temp = folder.join(format!(".latest.{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let made = std::os::unix::fs::symlink(name, &temp).and_then(|()| std::fs::rename(&temp, folder.join("latest")));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&temp);
        tracing::warn!("could not point {} at {}: {e}", folder.join("latest").display(), run.display());
    }
}

pub fn create_run_dir(path: &Path) -> Result<(), OutputError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if path.join("run.json").exists() {
        return Err(OutputError::Occupied(path.to_path_buf()));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {
            let meta = std::fs::metadata(path).map_err(io(path))?;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me {
                return Err(OutputError::NotOwned { path: path.to_path_buf(), owner: meta.uid() });
            }
            if meta.permissions().mode() & 0o777 != 0o700 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
            }
            Ok(())
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// Creates a folder and its parents, those it creates 0700.
fn create_dirs(path: &Path) -> Result<(), OutputError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(io(path))
}

fn create_file(path: &Path) -> Result<File, OutputError> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io(path))
}

/// How the records of a file end, to find where the last whole one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Records {
    /// One record a line (JSON Lines, the ledger).
    Lines,
    /// CSV as the csv crate writes it: a record may hold newlines inside
    /// quotes, so it ends at a newline outside them.
    Csv,
}

/// Opens a file for appending (resume) or creates it empty (a new run), in
/// append mode either way.
/// Appending, a record a crash cut short (after a partial write) is
/// dropped first, so the next one does not run into it.
fn open_file(path: &Path, append: bool, records: Records) -> Result<File, OutputError> {
    let new = !append || !path.exists();
    if append {
        trim_torn_tail(path, records).map_err(io(path))?;
    } else {
        create_file(path)?;
    }
    // Always in append mode: each write lands whole at the end, whichever
    // thread makes it.
    let file = OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(io(path))?;
    if new {
        sync_dir(path).map_err(io(path))?;
    }
    Ok(file)
}

/// Cuts what follows the last whole record, however far back it is.
fn trim_torn_tail(path: &Path, records: Records) -> std::io::Result<()> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let keep = match records {
        Records::Lines => last_line_end(&mut file, len)?,
        Records::Csv => whole_csv_len(&mut file)?,
    };
    if keep < len { file.set_len(keep) } else { Ok(()) }
}

/// Where the file's last line ends: just past its last newline (0 if none).
fn last_line_end(file: &mut File, len: u64) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 1 << 20;
    let mut end = len;
    let mut chunk = Vec::new();
    while end > 0 {
        let from = end.saturating_sub(CHUNK);
        chunk.resize((end - from) as usize, 0);
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        if let Some(i) = memchr::memrchr(b'\n', &chunk) {
            return Ok(from + i as u64 + 1);
        }
        end = from;
    }
    Ok(0)
}

/// How long the part of a CSV file is that holds whole records: up to the
/// last newline outside quotes. The csv crate quotes a field holding a
/// quote, a delimiter or a line break and doubles the quotes in it, so
/// outside a field a record has an even number of quotes, and a newline
/// after an even number ends a record; a record cut short is cut inside a
/// quoted value (an odd count) or before its newline.
fn whole_csv_len(file: &mut File) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut offset, mut quoted, mut whole) = (0u64, false, 0u64);
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(whole);
        }
        for i in memchr::memchr2_iter(b'"', b'\n', &buf[..n]) {
            match buf[i] {
                b'"' => quoted = !quoted,
                _ if !quoted => whole = offset + i as u64 + 1,
                _ => {}
            }
        }
        offset += n as u64;
    }
}

/// Writes a JSON document whole: to a temporary file, then renamed.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), OutputError> {
    let tmp = path.with_extension("json.tmp");
    let mut file = create_file(&tmp)?;
    let mut text = serde_json::to_vec_pretty(value).expect("serializable");
    text.push(b'\n');
    file.write_all(&text).and_then(|()| file.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Writes `report.html` whole (temporary file, then renamed), mode 0600.
pub fn write_report(dir: &Path, html: &str) -> Result<PathBuf, OutputError> {
    let path = dir.join("report.html");
    let tmp = dir.join("report.html.tmp");
    let mut file = create_file(&tmp)?;
    file.write_all(html.as_bytes()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests;
