//! The reader thread: rows out of the inputs, in batches.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::input::{InputSpec, Item, read_all};
use crate::report::Live;
use crate::rows::RowSet;
use crate::shard::Shard;

/// Rows cross from the reader thread to the lanes in batches: one
/// wake-up per batch instead of one per row.
pub(super) const BATCH: usize = 64;

/// Starts the reader thread: it feeds `tx` batches of rows until the inputs
/// end, `limit` rows were read, or `stop` is cancelled. Only `shard`'s rows
/// are taken (`limit` counts every row, so the shards of a limited run
/// share its first rows); rows in `skip` are not sent.
pub(super) fn spawn_reader(
    inputs: Vec<InputSpec>,
    limit: Option<u64>,
    shard: Option<Shard>,
    skip: RowSet,
    live: Arc<Live>,
    stop: CancellationToken,
    tx: async_channel::Sender<Vec<Item>>,
) -> tokio::task::JoinHandle<Result<(), crate::input::InputError>> {
    tokio::task::spawn_blocking(move || {
        let mut count = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        let progress = |bytes| live.bytes_read.store(bytes, Ordering::Relaxed);
        let result = read_all(&inputs, &progress, &mut |item| {
            if stop.is_cancelled() || limit.is_some_and(|l| count >= l) {
                return false;
            }
            count += 1;
            if shard.is_some_and(|s| !s.takes(count - 1)) {
                return true;
            }
            let key = match &item {
                Ok(row) => (row.input, row.number),
                Err(bad) => (bad.input, bad.number),
            };
            live.current_input.store(key.0 as u64, Ordering::Relaxed);
            if skip.contains(key.0, key.1) {
                live.rows_skipped.fetch_add(1, Ordering::Relaxed);
            } else {
                live.rows_read.fetch_add(1, Ordering::Relaxed);
                batch.push(item);
            }
            batch.len() < BATCH || tx.send_blocking(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))).is_ok()
        });
        if !batch.is_empty() && !stop.is_cancelled() {
            let _ = tx.send_blocking(batch);
        }
        result
    })
}
