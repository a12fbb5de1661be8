//! The process exit codes of the SPEC.

/// The process exit codes of the SPEC, decided in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u8)]
pub enum ExitCode {
    /// Every row succeeded.
    Success = 0,
    /// The run finished; some rows failed.
    RowsFailed = 1,
    /// Usage, config or input-file error: nothing was sent.
    Usage = 2,
    /// The token endpoint rejected the credentials (or redirected, or is not
    /// a token endpoint), calls keep failing with 401, or a server's TLS
    /// certificate is not trusted.
    Auth = 3,
    /// `--max-failures` was reached.
    MaxFailures = 4,
    /// A bug: a part of bulkcall stopped unexpectedly.
    Internal = 70,
    /// The run directory could not be written (disk full, permissions).
    Io = 74,
    /// Try again later: the gateway is out (the circuit breaker opened),
    /// the token endpoint is unreachable or answers 5xx through its retries,
    /// another run of the same job holds its lock, Redis is unreachable at
    /// start, or the gateway asked for a pause longer than
    /// `retry_after_max`; `status`: a shard has not finished.
    Locked = 75,
    /// Stopped by SIGINT/SIGTERM/SIGHUP after a graceful stop.
    Interrupted = 130,
}

impl ExitCode {
    pub fn code(self) -> u8 {
        self as u8
    }
}
