//! bulkcall sends every row of CSV, JSON and JSON Lines files as an HTTP call
//! through a rate-limited concurrent worker pool that shares one
//! auto-refreshing OAuth 2.0 client-credentials token, and records every
//! row's outcome in a results file or a failures file.
//!
//! Data flows one way: rows → requests → outcomes → files.
//!
//! - [`cli`]: the command line (clap).
//! - [`commands`]: what each command does, from flags to a finished run.
//! - [`config`]: figment sources → one resolved, validated [`config::Settings`].
//! - [`job`]: the job spec and its templates: a row in, a request out.
//! - [`input`]: streaming readers for CSV, JSON arrays and JSON Lines.
//! - [`key`]: the client's private key for `private_key_jwt` (a leaf below `config` and `token`).
//! - [`token`]: the one shared access token: fetch, early refresh, 401 invalidation.
//! - [`limiter`]: the rate limit, Retry-After pauses, adaptive rate and retry budget;
//!   local, or shared in Redis by every process of a run.
//! - [`coordination`]: Redis, where the processes of a run meet.
//! - [`options`]: the program's name for hints and `--max-failures`, shared by `cli` and `runner`.
//! - [`runner`]: rows → rate limiter → workers → outcomes.
//! - [`retry`]: the retry decision after each attempt, a pure function of the verdict, the row's attempts and the job's policy.
//! - [`outcome`]: what happened to one row, and the one function that classifies it.
//! - [`lifecycle`]: a row's states (unsent, in doubt, pending, done) and their transitions, read from a run directory by `resume` and `status`.
//! - [`output`]: the run directory; the only writer of files in it.
//! - [`rows`]: a set of rows as one bitset per input, for `resume`.
//! - [`metrics`]: Prometheus figures of a run: a textfile, `GET /metrics`, a Pushgateway push.
//! - [`events`]: what happened to the run as a whole (pauses, slow-downs, token refreshes, Redis, the breaker, stops), for `events.jsonl`.
//! - [`report`]: counters, latency histogram, `summary.json`, and progress display.
//! - [`shard`]: one run split over N processes: which rows are whose, the run id.
//! - [`status`]: where a run and each of its shards stand, read from their directories.
//! - [`sandbox`]: the built-in mock gateway (axum).
//! - [`error`]: the error type of each layer, mapped to exit codes.
//! - [`exit`]: the exit codes of the SPEC.

pub mod answer;
pub mod cli;
pub mod commands;
pub mod config;
pub mod coordination;
pub mod error;
pub mod events;
pub mod exit;
pub mod input;
pub mod job;
pub mod key;
pub mod lifecycle;
pub mod limiter;
pub mod metrics;
pub mod options;
pub mod outcome;
pub mod output;
pub mod report;
pub mod retry;
pub mod rows;
pub mod runner;
pub mod sandbox;
pub mod shard;
pub mod status;
pub mod token;
