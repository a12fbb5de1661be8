//! `events.jsonl`: the run's events ([`crate::events`]), one JSON line
//! each, in the order they happened. Every session of a run appends to it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{OutputError, Records, open_file};
use crate::events::{EVENTS_FILE, Sink};

/// The events file of a run directory, open for appending.
pub struct EventsFile {
    file: File,
    path: PathBuf,
    warned: bool,
}

impl EventsFile {
    /// Creates the file (0600), or opens it to append to (`resume`), a
    /// line a crash cut short dropped first.
    pub fn open(dir: &Path, append: bool) -> Result<EventsFile, OutputError> {
        let path = dir.join(EVENTS_FILE);
        let file = open_file(&path, append, Records::Lines)?;
        Ok(EventsFile { file, path, warned: false })
    }
}

impl Sink for EventsFile {
    /// One `write` per line, in append mode: a line is never torn by another.
    /// An event that cannot be written is warned about once: the run goes on.
    fn write_line(&mut self, line: &[u8]) {
        if let Err(e) = self.file.write_all(line)
            && !std::mem::replace(&mut self.warned, true)
        {
            tracing::warn!("cannot write {}: {e}; the run goes on without its events", self.path.display());
        }
    }
}
