//! The one-run-per-job lock and the run directory's own lock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{OutputError, io};

#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

/// Takes the job's lock in its output folder, or says who holds it.
pub fn lock_job(folder: &Path, job: &str) -> Result<JobLock, OutputError> {
    super::create_dirs(folder)?;
    let path = folder.join(format!(".{job}.lock"));
    lock(&path).map_err(|held| match held {
        Held::By(pid) => OutputError::Locked { job: job.to_string(), pid, path: path.clone() },
        Held::Error(e) => e,
    })
}

/// Takes the run directory's own lock (`.lock` in it), or says who holds
/// it. Every process that works on the directory takes it, whatever its
/// current folder and config.
pub fn lock_run_dir(dir: &Path) -> Result<JobLock, OutputError> {
    let path = dir.join(".lock");
    lock(&path).map_err(|held| match held {
        Held::By(pid) => OutputError::RunLocked { dir: dir.to_path_buf(), pid },
        Held::Error(e) => e,
    })
}

/// The pid of the process working on a run directory now, if one is: it
/// holds the directory's lock. The lock is tried shared for an instant and
/// never kept, so `status` reads a run without stopping anyone.
pub fn run_dir_holder(dir: &Path) -> Option<String> {
    let path = dir.join(".lock");
    let file = File::open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            None
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            Some(std::fs::read_to_string(&path).unwrap_or_default().trim().to_string())
        }
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// Why a lock was not taken.
enum Held {
    /// Another process holds it: its pid, as it wrote it.
    By(String),
    Error(OutputError),
}

fn lock(path: &Path) -> Result<JobLock, Held> {
    let io = |e| Held::Error(io(path)(e));
    let mut file =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io)?;
    // A lock this process took and let go can still be held for a moment
    // by a child it is starting (a fork shares the open file until its
    // exec closes it): waited for, briefly. Another process's is not.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)
                    .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
                    .map_err(io)?;
                return Ok(JobLock { _file: file });
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(path).unwrap_or_default().trim().to_string();
                if holder != std::process::id().to_string() || std::time::Instant::now() >= deadline {
                    return Err(Held::By(holder));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_this_process_let_go_is_waited_for_while_a_child_still_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_job(dir.path(), "job").unwrap();
        // What a forked child holds between fork and exec: the same open file.
        let child = first._file.try_clone().unwrap();
        drop(first);
        let exec = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(child);
        });
        let started = std::time::Instant::now();
        let again = lock_job(dir.path(), "job");
        assert!(again.is_ok(), "taken once the child let go");
        assert!(started.elapsed() >= std::time::Duration::from_millis(150), "it waited for the child");
        exec.join().unwrap();
    }

    #[test]
    fn another_process_lock_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_job(dir.path(), "job").unwrap();
        // As another process would have written it.
        std::fs::write(dir.path().join(".job.lock"), "4194305\n").unwrap();
        let started = std::time::Instant::now();
        match lock_job(dir.path(), "job") {
            Err(OutputError::Locked { pid, .. }) => assert_eq!(pid, "4194305"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "not waited for");
        drop(held);
    }
}
