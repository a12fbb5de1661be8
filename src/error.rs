//! The error of each layer meets here, and here alone errors become exit codes.

pub use crate::exit::ExitCode;

use crate::coordination::CoordinationError;
use crate::{
    config::ConfigError, input::InputError, job::JobError, output::OutputError, shard::ShardError, status::StatusError,
    token::TokenError,
};

/// Everything that can stop a command before or during a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    Coordination(#[from] CoordinationError),
    #[error("{0}")]
    Usage(String),
    #[error("aborted: {0}")]
    Unauthorized(String),
    #[error("aborted: {0}")]
    MaxFailures(String),
    /// The API's TLS certificate is not trusted: every call would fail alike.
    #[error("aborted: {0}")]
    Certificate(crate::outcome::UntrustedCertificate),
    /// The gateway asked for a pause longer than `retry_after_max` (a
    /// maintenance window): the rows not finished stay to resume.
    #[error("stopped: {0}")]
    Paused(String),
    /// Rows of a `[poll]` job still not final (at `max_wait`, or when the
    /// run stopped): they stay to resume, which polls them again.
    #[error("not finished: {0}")]
    Pending(String),
    /// The circuit breaker opened: the gateway is out, try again later.
    #[error("stopped: {0}")]
    Outage(#[from] crate::outcome::Outage),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Report(#[from] crate::report::html::ReportError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("could not start the sandbox on {addr}: {source}")]
    Sandbox { addr: String, source: std::io::Error },
}

impl Error {
    /// The exit code this error stops the process with.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Config(_)
            | Error::Job(_)
            | Error::Input(_)
            | Error::Usage(_)
            | Error::Shard(_)
            | Error::Status(_)
            | Error::Sandbox { .. }
            | Error::Metrics(_)
            | Error::Report(_) => ExitCode::Usage,
            // An outage of the token endpoint: the credentials may be fine.
            Error::Token(TokenError::Unavailable { .. }) => ExitCode::Locked,
            Error::Token(_) | Error::Unauthorized(_) | Error::Certificate(_) => ExitCode::Auth,
            Error::MaxFailures(_) => ExitCode::MaxFailures,
            Error::Internal(_) => ExitCode::Internal,
            Error::Output(crate::output::OutputError::Locked { .. } | crate::output::OutputError::RunLocked { .. })
            | Error::Paused(_)
            | Error::Pending(_)
            | Error::Outage(_) => ExitCode::Locked,
            Error::Output(crate::output::OutputError::Occupied(_) | crate::output::OutputError::NotOwned { .. }) => {
                ExitCode::Usage
            }
            Error::Output(_) => ExitCode::Io,
            Error::Coordination(CoordinationError::Unreachable { .. }) => ExitCode::Locked,
            Error::Coordination(CoordinationError::ManifestFile { .. }) => ExitCode::Io,
            Error::Coordination(_) => ExitCode::Usage,
        }
    }
}
