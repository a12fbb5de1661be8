//! A row's life, and where a run directory says each row stands: read here
//! alone, by `resume` (what to send, poll or fail) and `status` (what to
//! count).
//!
//! ```text
//!  Unsent ──▶ started ──▶ answered ───────────────────────────────▶ done: succeeded or failed
//!    ▲        (S mark)       │                                     (D mark, once its outcome
//!    │          │            │ a [poll] job                         line is durable)
//!    │          │            └──▶ accepted ──▶ polled ──(final)──▶ done
//!    │          │                 (its line in    │  ▲
//!    │          │                 accepted.jsonl, └──┘ not final yet: polled again
//!    │          │                 durable before  │
//!    │          │                 the first poll) └──▶ pending (at max_wait, or a stop)
//!    │          ├──▶ in doubt (the run stopped or crashed after S, before D)
//!    └──────────┴─── released (R mark: the run stopped and the gateway provably
//!                    did not act on the row: sent again as a row never sent)
//! ```
//!
//! Who writes each step: `S` by a worker (`Ledger::started`, durable before
//! the call for a job that is not idempotent), `R` by a worker when the run
//! stops (`Ledger::released`), an outcome line and then its `D` mark by the
//! recorder's group commit (`output::commit`), an accepted row's line by
//! the poller (`AcceptedFile::commit`). The ledger's format is
//! `output/ledger.rs`'s alone.
//!
//! What a run directory tells apart is [`RowState`]. A row is in doubt when
//! it is started and not done, unless its acceptance is on file: then it is
//! pending, and `resume` polls it, never sending its first call again.
//! `resume` first takes the recovery step ([`RowStates::recover`]): an
//! outcome line a crash left without its `D` mark makes its row done, for a
//! row marked started and not done only, and the marks are written before
//! anything is sent. `--in-doubt` decides what becomes of the rows still in
//! doubt (sent again, or failed as `in_doubt`), `--give-up-pending` of the
//! pending ones (failed as `pending`).

use std::collections::HashSet;
use std::path::Path;

use crate::output::{AcceptedFile, Done, Ledger, OutputError, Place, recent_outcomes};
use crate::rows::RowSet;

/// Where a row stands, as its run directory tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    /// Never started, or released (an `R` mark after its `S`): sent as a
    /// row never sent.
    Unsent,
    /// Started (`S`) with no outcome and no acceptance on file: the gateway
    /// may have acted on it.
    InDoubt,
    /// Accepted (its line in `accepted.jsonl`) with no outcome yet: polled,
    /// never sent again.
    Pending,
    /// Its outcome is recorded (a `D` mark, or the recovery found its
    /// outcome line): never sent again.
    Done,
}

/// The recovery step's inputs: the run's outcome files.
pub struct Recovery<'a> {
    /// Each input's failures file and the delimiter it is written with, by
    /// input index.
    pub failures: &'a [(String, u8)],
    /// How many inputs the run has: a line that names no input of the run
    /// (or none at all, with several) could be another input's row.
    pub inputs: usize,
}

/// A row the recovery step made done: (input, row, its outcome on file).
pub type Recovered = (usize, u64, Done);

/// Every row's state in a run directory: memory is a few bits per row
/// (bitsets), plus the rows in doubt or pending.
#[derive(Debug, Default)]
pub struct RowStates {
    /// Rows with a recorded outcome.
    pub done: RowSet,
    /// Rows started with no outcome and no acceptance on file.
    pub in_doubt: HashSet<(usize, u64)>,
    /// Rows accepted with no outcome, in `accepted.jsonl`'s order, with
    /// the place of their line.
    pub pending: Vec<(usize, u64, Place)>,
    pending_rows: RowSet,
}

impl RowStates {
    /// Reads a run directory as it is, writing nothing (a process may be
    /// working on it): the ledger (`on_done` sees each done row's outcome,
    /// once), then `accepted.jsonl`.
    pub fn read(dir: &Path, on_done: impl FnMut(&Done)) -> Result<RowStates, OutputError> {
        let (done, started) = Ledger::read(dir, on_done)?;
        Self::accepted(dir, done, started.into_iter().collect())
    }

    /// Reads a run directory as [`RowStates::read`] does, with the recovery
    /// step between the ledger and `accepted.jsonl`: an outcome line found
    /// without its done mark (a crash came between the two), for a row the
    /// ledger marked started and not done, makes that row done (matched on
    /// (input, row), never the row alone), and its done mark is durable
    /// when this returns. Returns the rows so recovered too, with their
    /// outcomes (not shown to `on_done`). Only the process that holds the
    /// run directory's lock may call this.
    pub fn recover(
        dir: &Path,
        recovery: Recovery<'_>,
        on_done: impl FnMut(&Done),
    ) -> Result<(RowStates, Vec<Recovered>), OutputError> {
        let (done, in_doubt, recovered) = Self::scan(dir, recovery, on_done)?;
        Ledger::recovered(dir, &recovered)?;
        Ok((Self::accepted(dir, done, in_doubt)?, recovered))
    }

    /// What [`RowStates::recover`] would find, writing nothing: the rows
    /// whose outcome is on file without its done mark count as done, and
    /// are returned, but stay unmarked. `status` reads a run so (a process
    /// may be working on it), and its counts agree with what `resume`
    /// then finds.
    pub fn read_recovering(
        dir: &Path,
        recovery: Recovery<'_>,
        on_done: impl FnMut(&Done),
    ) -> Result<(RowStates, Vec<Recovered>), OutputError> {
        let (done, in_doubt, recovered) = Self::scan(dir, recovery, on_done)?;
        Ok((Self::accepted(dir, done, in_doubt)?, recovered))
    }

    /// The ledger, then the outcomes on file it has no done mark for: the
    /// rows done (those outcomes included), the rows started and not done
    /// otherwise, and those outcomes. Writes nothing.
    #[allow(clippy::type_complexity)]
    fn scan(
        dir: &Path,
        recovery: Recovery<'_>,
        on_done: impl FnMut(&Done),
    ) -> Result<(RowSet, HashSet<(usize, u64)>, Vec<Recovered>), OutputError> {
        let (mut done, started) = Ledger::read(dir, on_done)?;
        let mut in_doubt: HashSet<(usize, u64)> = started.into_iter().collect();
        let mut recovered = Vec::new();
        for (input, row, outcome) in recent_outcomes(dir, recovery.failures, |i, row| done.contains(i, row)) {
            let Some(input) = input.filter(|&i| i < recovery.inputs) else { continue };
            // Only a row the ledger marked started and not done can have an
            // outcome the ledger does not know: any other row number a file
            // holds is not one of this run's outcomes to trust.
            if in_doubt.remove(&(input, row)) {
                done.insert(input, row);
                recovered.push((input, row, outcome));
            }
        }
        Ok((done, in_doubt, recovered))
    }

    /// Splits the rows started and not done into pending (their acceptance
    /// is on file) and in doubt.
    fn accepted(dir: &Path, done: RowSet, mut in_doubt: HashSet<(usize, u64)>) -> Result<RowStates, OutputError> {
        let (mut pending, mut pending_rows) = (Vec::new(), RowSet::default());
        for (input, row, place, _) in AcceptedFile::scan(dir)? {
            if !done.contains(input, row) && in_doubt.remove(&(input, row)) {
                pending_rows.insert(input, row);
                pending.push((input, row, place));
            }
        }
        Ok(RowStates { done, in_doubt, pending, pending_rows })
    }

    /// Where one row stands.
    pub fn state(&self, input: usize, row: u64) -> RowState {
        if self.done.contains(input, row) {
            RowState::Done
        } else if self.pending_rows.contains(input, row) {
            RowState::Pending
        } else if self.in_doubt.contains(&(input, row)) {
            RowState::InDoubt
        } else {
            RowState::Unsent
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory with a row in each state, and two a crash left
    /// with their outcome line written and no done mark.
    fn run_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let journal = [
            "S\t0\t1",
            "D\t0\t1\t200\tok\t1\t5\t9",
            "S\t0\t2",
            "S\t0\t3",
            "R\t0\t3",
            "S\t0\t4",
            "S\t0\t5",
            "S\t1\t7",
            "D\t1\t7\t200\tok\t1\t5\t9",
            "S\t0\t8",
        ];
        std::fs::write(dir.path().join("journal"), journal.map(|l| format!("{l}\n")).concat()).unwrap();
        let accepted = [(0, 4), (1, 7), (0, 8), (0, 4)]
            .map(|(input, row)| format!("{}\n", serde_json::json!({"input": input, "row": row, "at_ms": 1})));
        std::fs::write(dir.path().join(crate::output::ACCEPTED), accepted.concat()).unwrap();
        // Rows 5 and 8 were answered; row 9 was never started: its line is not trusted.
        let results = [5, 8, 9].map(|row| {
            format!("{}\n", serde_json::json!({"row": row, "input_index": 0, "status": 200, "attempts": 1}))
        });
        std::fs::write(dir.path().join("results.jsonl"), results.concat()).unwrap();
        dir
    }

    const EVERY: [(usize, u64); 8] = [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (1, 7), (0, 8)];

    fn states(read: &RowStates) -> Vec<RowState> {
        EVERY.iter().map(|&(input, row)| read.state(input, row)).collect()
    }

    #[test]
    fn reading_tells_each_state_and_writes_nothing() {
        use RowState::*;
        let dir = run_dir();
        let journal = std::fs::read(dir.path().join("journal")).unwrap();
        let mut outcomes = 0;
        let read = RowStates::read(dir.path(), |_| outcomes += 1).unwrap();
        assert_eq!(states(&read), [Done, InDoubt, Unsent, Pending, InDoubt, Unsent, Done, Pending]);
        assert_eq!(outcomes, 2);
        assert_eq!(read.pending.iter().map(|&(i, r, _)| (i, r)).collect::<Vec<_>>(), [(0, 4), (0, 8)]);
        assert_eq!(std::fs::read(dir.path().join("journal")).unwrap(), journal);
    }

    #[test]
    fn reading_with_the_recovery_finds_what_it_would_and_writes_nothing() {
        use RowState::*;
        let dir = run_dir();
        let journal = std::fs::read(dir.path().join("journal")).unwrap();
        let failures = [("failures.jsonl".to_string(), b','), ("failures-2.jsonl".to_string(), b',')];
        let (read, recovered) =
            RowStates::read_recovering(dir.path(), Recovery { failures: &failures, inputs: 2 }, |_| {}).unwrap();
        assert_eq!(states(&read), [Done, InDoubt, Unsent, Pending, Done, Unsent, Done, Done]);
        assert_eq!(recovered.len(), 2);
        assert_eq!(std::fs::read(dir.path().join("journal")).unwrap(), journal, "nothing marked");
    }

    #[test]
    fn the_recovery_makes_rows_done_whose_outcome_is_on_file_and_marks_them() {
        use RowState::*;
        let dir = run_dir();
        let failures = [("failures.jsonl".to_string(), b','), ("failures-2.jsonl".to_string(), b',')];
        let mut outcomes = 0;
        let (read, recovered) =
            RowStates::recover(dir.path(), Recovery { failures: &failures, inputs: 2 }, |_| outcomes += 1).unwrap();
        assert_eq!(states(&read), [Done, InDoubt, Unsent, Pending, Done, Unsent, Done, Done]);
        assert_eq!(outcomes, 2);
        let mut rows: Vec<_> = recovered.iter().map(|&(i, r, _)| (i, r)).collect();
        rows.sort_unstable();
        assert_eq!(rows, [(0, 5), (0, 8)]);
        assert_eq!(read.state(0, 9), Unsent, "a line for a row never started is not trusted");
        // The marks are on file: the next reading knows them without a recovery.
        let again = RowStates::read(dir.path(), |_| {}).unwrap();
        assert_eq!(states(&again), [Done, InDoubt, Unsent, Pending, Done, Unsent, Done, Done]);
    }
}
