//! An input as it was when a run started: its size and hash, so `resume`
//! and the shards of a run can tell it is the same file.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Format;

/// An input as it was when the run started.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct InputFingerprint {
    pub path: PathBuf,
    pub format: Format,
    pub delimiter: String,
    pub size: u64,
    pub sha256: String,
    /// The input's failures file in the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<String>,
}

impl InputFingerprint {
    /// Reads the whole file to fingerprint it. Blocking.
    pub fn of(path: &Path, format: Format, delimiter: u8) -> std::io::Result<InputFingerprint> {
        use sha2::Digest;
        let mut file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok(InputFingerprint {
            path: std::path::absolute(path)?,
            format,
            delimiter: (delimiter as char).to_string(),
            size,
            sha256: format!("{:x}", hasher.finalize()),
            failures: None,
        })
    }
}
