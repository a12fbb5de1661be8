//! Group commit: outcome lines made durable before their done marks.

use super::{Ledger, OutputError, Writer};
use crate::outcome::Outcome;

/// How long an outcome line may wait, written but not yet durable, for
/// others to share its sync. About a hundred syncs a second at most, however
/// fast rows come: a power cut can take back only this last moment's
/// outcomes (their rows are then in doubt, or unsent).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Records outcomes for good, in groups: [`GroupCommit::write`] writes their
/// lines at once (safe from a crash of the process, not yet from a power
/// cut) and keeps their done marks; [`GroupCommit::sync`] makes the ledger
/// durable (the started marks of these rows, written before they were
/// sent, and the done marks of earlier groups, whose lines were made
/// durable before them; nothing for a ledger whose started marks were
/// durable before their rows went out), then every line written so far, and only then
/// writes the group's done marks. A done mark is never on disk before its
/// outcome line, nor an outcome line before its row's started mark, at one
/// `fdatasync` per file per group; after a power cut, the rows with an
/// outcome on disk and no done mark are at most the last group's, each
/// marked started, and `resume` finds them at the end of the outcome files
/// (it trusts a line only for a row marked started).
#[derive(Default)]
pub struct GroupCommit {
    /// Done marks of the lines written and not yet synced.
    marks: String,
    /// When the oldest of those lines was written.
    since: Option<std::time::Instant>,
}

impl GroupCommit {
    /// Writes the outcomes' lines, one write per file; their done marks
    /// wait for the next [`GroupCommit::sync`].
    pub fn write(&mut self, writer: &mut Writer, outcomes: &[Outcome]) -> Result<(), OutputError> {
        outcomes.iter().try_for_each(|outcome| writer.record(outcome))?;
        writer.flush()?;
        // When these outcomes were recorded: one clock reading for all.
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        for outcome in outcomes {
            Ledger::push_done(&mut self.marks, outcome, at_ms as u64);
        }
        if !outcomes.is_empty() {
            self.since.get_or_insert_with(std::time::Instant::now);
        }
        Ok(())
    }

    /// When the lines written wait to be made durable: [`SYNC_EVERY`]
    /// after the oldest; `None` when none waits.
    pub fn due(&self) -> Option<std::time::Instant> {
        self.since.map(|since| since + SYNC_EVERY)
    }

    /// Makes the ledger and every line written durable, then writes their done marks.
    pub fn sync(&mut self, writer: &mut Writer, ledger: &Ledger) -> Result<(), OutputError> {
        if self.since.take().is_none() {
            return Ok(());
        }
        ledger.sync_started()?;
        writer.sync()?;
        ledger.write_marks(&std::mem::take(&mut self.marks))
    }
}
