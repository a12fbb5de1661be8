//! Shards: one run split over N processes (a Kubernetes Indexed Job, an AWS
//! Batch array job, several hosts). Shard K of N takes the logical rows whose
//! 0-based position across all inputs is K modulo N, so the shards of one
//! input cover every row exactly once whatever the rows hold (a quoted CSV
//! field may span lines: rows are split, never bytes). Each shard has its
//! own run directory, `<run>/shard-K-of-N/`, and the run id ties them
//! together.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::input::InputFingerprint;

/// The environment variables an array-job scheduler sets to the index of
/// the process, in the order they are read.
pub const INDEX_VARIABLES: [&str; 2] = ["JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"];

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("--shards {count}: none of {vars} is set, so this process does not know its index; use --shard K/{count}", vars = INDEX_VARIABLES.join(" or "))]
    NoIndex { count: u32 },
    #[error("--shards {count}: {var}={value} is not an index from 0 to {last}", last = count - 1)]
    BadIndex { count: u32, var: &'static str, value: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "--run-id `{0}`: use letters, digits, `.`, `_` and `-` only (at most 100, not starting with `.`): it names a folder"
    )]
    BadRunId(String),
}

/// This process's part of a run: rows at positions `index`, `index + count`, …
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// From 0.
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub fn new(index: u32, count: u32) -> Result<Shard, ShardError> {
        if count == 0 {
            return Err(ShardError::Invalid("a run has at least 1 shard".into()));
        }
        if index >= count {
            return Err(ShardError::Invalid(format!(
                "shard {index}/{count}: shards are numbered from 0, so the last of {count} is {}",
                count - 1
            )));
        }
        Ok(Shard { index, count })
    }

    /// `--shards N`: the index comes from the scheduler's environment.
    pub fn from_env(count: u32, var: impl Fn(&str) -> Option<String>) -> Result<Shard, ShardError> {
        let (name, value) = INDEX_VARIABLES
            .iter()
            .find_map(|name| var(name).map(|v| (*name, v)))
            .ok_or(ShardError::NoIndex { count })?;
        let bad = || ShardError::BadIndex { count, var: name, value: value.clone() };
        let index = value.trim().parse::<u32>().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// Whether the row at this 0-based position across all inputs is this shard's.
    pub fn takes(self, position: u64) -> bool {
        position % u64::from(self.count) == u64::from(self.index)
    }

    /// How many of the first `rows` positions are this shard's.
    pub fn share_of(self, rows: u64) -> u64 {
        let (k, n) = (u64::from(self.index), u64::from(self.count));
        if rows <= k { 0 } else { (rows - k).div_ceil(n) }
    }

    /// The shard's run directory inside the run's folder.
    pub fn dir(self, run: &Path) -> PathBuf {
        run.join(self.dir_name())
    }

    pub fn dir_name(self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }

    /// Reads a shard directory's name back.
    pub fn from_dir_name(name: &str) -> Option<Shard> {
        let (k, n) = name.strip_prefix("shard-")?.split_once("-of-")?;
        Shard::new(k.parse().ok()?, n.parse().ok()?).ok()
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// `K/N`, K from 0.
    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("`{s}` is not K/N (this shard's index from 0, then the number of shards), such as 0/4");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        Shard::new(k, n).map_err(|e| e.to_string())
    }
}

/// Checks a run id given with `--run-id`: it names a folder.
pub fn check_run_id(id: &str) -> Result<(), ShardError> {
    let fine = !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if fine { Ok(()) } else { Err(ShardError::BadRunId(id.to_string())) }
}

/// The default run id: the job's name and a hash of its inputs, so every
/// shard started with the same command (on any host) finds the same one,
/// and a restarted shard finds its own directory again.
pub fn default_run_id(job_name: &str, inputs: &[InputFingerprint]) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for input in inputs {
        hasher.update(input.sha256.as_bytes());
        hasher.update(b"\n");
    }
    let hash = hasher.finalize();
    let hex: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let name: String =
        job_name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') { c } else { '_' }).collect();
    format!("{name}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_of_a_run_take_every_position_exactly_once() {
        let shards: Vec<Shard> = (0..3).map(|k| Shard::new(k, 3).unwrap()).collect();
        for position in 0..100 {
            assert_eq!(shards.iter().filter(|s| s.takes(position)).count(), 1, "position {position}");
        }
        for rows in 0..20 {
            assert_eq!(shards.iter().map(|s| s.share_of(rows)).sum::<u64>(), rows);
            for s in &shards {
                assert_eq!(s.share_of(rows), (0..rows).filter(|&p| s.takes(p)).count() as u64);
            }
        }
    }

    #[test]
    fn k_slash_n_is_parsed_and_checked() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert!("4/4".parse::<Shard>().unwrap_err().contains("the last of 4 is 3"));
        assert!("0/0".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().unwrap_err().contains("K/N"));
        assert!("-1/4".parse::<Shard>().is_err());
    }

    #[test]
    fn the_index_comes_from_the_scheduler() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
        };
        assert_eq!(Shard::from_env(4, env(&[("JOB_COMPLETION_INDEX", "3")])).unwrap(), Shard { index: 3, count: 4 });
        assert_eq!(
            Shard::from_env(4, env(&[("AWS_BATCH_JOB_ARRAY_INDEX", "1")])).unwrap(),
            Shard { index: 1, count: 4 }
        );
        assert!(matches!(Shard::from_env(4, env(&[])), Err(ShardError::NoIndex { .. })));
        let err = Shard::from_env(4, env(&[("JOB_COMPLETION_INDEX", "4")])).unwrap_err();
        assert!(err.to_string().contains("JOB_COMPLETION_INDEX=4"), "{err}");
    }

    #[test]
    fn directory_names_read_back() {
        let shard = Shard::new(2, 8).unwrap();
        assert_eq!(shard.dir_name(), "shard-2-of-8");
        assert_eq!(Shard::from_dir_name("shard-2-of-8"), Some(shard));
        assert_eq!(Shard::from_dir_name("shard-8-of-8"), None);
        assert_eq!(Shard::from_dir_name("report.html"), None);
    }

    #[test]
    fn run_ids_name_folders_safely() {
        assert!(check_run_id("eligibility-2026-12-01").is_ok());
        for bad in ["", "..", "a/b", ".hidden", "a b"] {
            assert!(check_run_id(bad).is_err(), "{bad:?}");
        }
        let fingerprint = |sha: &str| InputFingerprint {
            path: "a.csv".into(),
            format: crate::input::Format::Csv,
            delimiter: ",".into(),
            size: 1,
            sha256: sha.into(),
            failures: None,
        };
        let id = default_run_id("claim status", &[fingerprint("ab")]);
        assert!(id.starts_with("claim_status-") && check_run_id(&id).is_ok(), "{id}");
        assert_eq!(id, default_run_id("claim status", &[fingerprint("ab")]));
        assert_ne!(id, default_run_id("claim status", &[fingerprint("cd")]));
    }
}
