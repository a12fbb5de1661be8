//! `run.json`: what a run was started with, for `resume`.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::input::InputFingerprint;

/// `run.json`: what `resume` needs, written before the first call goes out.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub version: String,
    pub job: PathBuf,
    pub job_name: String,
    pub inputs: Vec<InputFingerprint>,
    pub profile: String,
    pub config: Option<PathBuf>,
    /// The resolved settings, secrets left out.
    pub settings: Value,
    pub limit: Option<u64>,
    pub started_at: String,
    pub pid: u32,
    /// The command-line flags the run was started with: `resume` applies
    /// them again (its own flags win); everything else comes from the
    /// config and the environment as they are when it resumes.
    #[serde(default)]
    pub flags: RunFlags,
    /// The run this directory is one shard of, and which shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::shard::Shard>,
}

/// The flags of a run that `resume` applies again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct RunFlags {
    /// Setting flags (`-j`, `-r`, `--burst`, `--max-attempts`, `--timeout`), by setting name.
    #[serde(default)]
    pub settings: Map<String, Value>,
    /// `--max-failures` as given (`50`, `5%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<String>,
    /// `--grace` as given (`45s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
    /// `--in-doubt` as given (`resend`, `fail`) for a run over a failures file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_doubt: Option<String>,
}
