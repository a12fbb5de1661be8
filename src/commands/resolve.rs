//! The job, its configuration and its inputs, resolved into what a run needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cli::*;
use crate::config::{Loaded, Sources};
use crate::error::Error;
use crate::input::InputFingerprint;
use crate::input::{self, Format, InputSpec};
use crate::job::Job;
use crate::options::MaxFailures;
use crate::output::RunFlags;
use crate::report::ProgressMode;
use crate::shard::Shard;

/// The job, its settings and its inputs, resolved.
pub(super) struct Resolved {
    pub(super) job: Arc<Job>,
    pub(super) loaded: Loaded,
    pub(super) inputs: Vec<InputSpec>,
    /// Each input's failures file name in the run directory.
    pub(super) failures: Vec<String>,
    /// Inputs that were standard input or a pipe, read once into a 0600
    /// file (by input index), until the run directory keeps them.
    pub(super) spooled: Vec<(usize, tempfile::NamedTempFile)>,
}

pub(super) fn resolve(
    job_path: &Path,
    inputs: &[PathBuf],
    format: Option<Format>,
    config: &ConfigArgs,
    settings: &SettingArgs,
) -> Result<Resolved, Error> {
    let job = Job::load(job_path)?;
    let sources = Sources {
        config_file: config.config.clone(),
        profile: config.profile.clone(),
        job: job.settings.clone(),
        flags: settings.to_map(),
        env: true,
        ..Sources::default()
    };
    let loaded = sources.load()?;
    resolve_inputs(job, loaded, inputs, format, &[])
}

/// `saved`: each input's format and delimiter as a resumed run recorded
/// them; they win over the extension and the job.
pub(super) fn resolve_inputs(
    job: Job,
    loaded: Loaded,
    inputs: &[PathBuf],
    format: Option<Format>,
    saved: &[(Format, u8)],
) -> Result<Resolved, Error> {
    let paths = if inputs.is_empty() { job.inputs.clone() } else { inputs.to_vec() };
    if paths.is_empty() {
        return Err(Error::Usage(format!(
            "no input: give INPUT files after the job, or set `input` in {}",
            job.path.display()
        )));
    }
    let given = format.or(job.format);
    let mut spooled = Vec::new();
    let paths_given = paths.clone();
    let specs = paths
        .into_iter()
        .enumerate()
        .map(|(index, path)| {
            let (format, path) = if let Some(&(format, _)) = saved.get(index) {
                (format, path)
            } else if is_stream(&path) {
                let Some(format) = given else {
                    return Err(Error::Usage(format!(
                        "{} is {}: it has no file name to tell its format; give it with --format csv|json|jsonl or `format` in the job",
                        path.display(),
                        if path == Path::new("-") { "standard input" } else { "a pipe" },
                    )));
                };
                let spool = spool(&path)?;
                let spool_path = spool.path().to_path_buf();
                spooled.push((index, spool));
                (format, spool_path)
            } else {
                let format = match (given, Format::from_path(&path)) {
                    // A failures file fed back keeps its own format.
                    (_, Some(f)) if is_failures_file(&path) => f,
                    (Some(f), _) | (None, Some(f)) => f,
                    (None, None) => return Err(Error::Input(input::InputError::UnknownFormat(path))),
                };
                (format, path)
            };
            let is_tsv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
            let delimiter = match saved.get(index) {
                Some(&(_, delimiter)) => delimiter,
                None if is_tsv && job.delimiter == b',' => b'\t',
                None => job.delimiter,
            };
            Ok(InputSpec { path, format, delimiter, encoding: job.encoding })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let headers = input::preflight(&specs).map_err(|e| {
        // Name a spooled input as the user gave it, not by its spool file.
        let message = spooled.iter().fold(e.to_string(), |message, (index, spool)| {
            message.replace(&spool.path().display().to_string(), &paths_given[*index].display().to_string())
        });
        if spooled.is_empty() { Error::Input(e) } else { Error::Usage(message) }
    })?;
    // A field no column of a CSV input has would fail every row: say so once.
    for (spec, columns) in specs.iter().zip(&headers) {
        let Some(columns) = columns else { continue };
        let missing: Vec<String> = job
            .fields()
            .into_iter()
            .filter(|(field, _)| !columns.contains(field))
            .map(|(field, place)| format!("`{field}` (used in {place})"))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Usage(format!(
                "{} uses {} but {} has no such column; its columns are: {}",
                job.path.display(),
                missing.join(", "),
                spec.path.display(),
                columns.join(", ")
            )));
        }
    }
    let failures = crate::output::failure_file_names(
        &specs.iter().map(|i| (i.path.clone(), i.format, i.delimiter)).collect::<Vec<_>>(),
    );
    Ok(Resolved { job: Arc::new(job), loaded, inputs: specs, failures, spooled })
}

/// Standard input (`-`), a FIFO, `<(...)` or a device: anything that can be
/// read only once.
pub(super) fn is_stream(path: &Path) -> bool {
    // `/dev/stdin` or `/proc/self/fd/0` redirected from a regular file is
    // that file now, and something else (or nothing) when the run is resumed.
    let names_a_descriptor = path.starts_with("/dev/")
        || (path.starts_with("/proc/") && path.components().nth(3).is_some_and(|c| c.as_os_str() == "fd"));
    path == Path::new("-") || names_a_descriptor || std::fs::metadata(path).is_ok_and(|m| !m.is_file())
}

/// Reads a stream once into a 0600 file, so the preflight, the fingerprint
/// and the run (and a later `resume`) all read the same bytes.
pub(super) fn spool(path: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let failed = |e: std::io::Error| Error::Usage(format!("cannot read input {}: {e}", path.display()));
    let mut spool = tempfile::Builder::new()
        .prefix(".bulkcall-input-")
        .tempfile()
        .map_err(|e| Error::Usage(format!("cannot make a file to keep input {} in: {e}", path.display())))?;
    if path == Path::new("-") {
        std::io::copy(&mut std::io::stdin().lock(), spool.as_file_mut()).map_err(failed)?;
    } else {
        std::io::copy(&mut std::fs::File::open(path).map_err(failed)?, spool.as_file_mut()).map_err(failed)?;
    }
    Ok(spool)
}

/// Moves the spooled inputs into the run directory (`input-1.jsonl`, …),
/// 0600 like every file there, and reads them from there on.
pub(super) fn keep_spooled(dir: &Path, r: &mut Resolved) -> Result<(), Error> {
    for (index, spool) in r.spooled.drain(..) {
        let spec = &mut r.inputs[index];
        let ext = match spec.format {
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Jsonl => "jsonl",
        };
        let target = dir.join(format!("input-{}.{ext}", index + 1));
        let failed = |e: std::io::Error| Error::Usage(format!("cannot keep the input in {}: {e}", target.display()));
        if let Err(e) = spool.persist(&target) {
            // Another file system: copy it, and let the spool go.
            let spool = e.file;
            std::fs::copy(spool.path(), &target).map_err(failed)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
        }
        spec.path = target;
    }
    r.failures = crate::output::failure_file_names(
        &r.inputs.iter().map(|i| (i.path.clone(), i.format, i.delimiter)).collect::<Vec<_>>(),
    );
    Ok(())
}

pub(super) fn is_failures_file(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("failures."))
}

/// Each input's size and hash. Reads every input whole.
pub(super) async fn fingerprint(inputs: &[InputSpec]) -> Result<Vec<InputFingerprint>, Error> {
    let inputs = inputs.to_vec();
    tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .map(|i| InputFingerprint::of(&i.path, i.format, i.delimiter).map_err(|e| (i.path.clone(), e)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .expect("hashing does not panic")
    .map_err(|(path, e)| Error::Usage(format!("cannot read input {} to fingerprint it: {e}", path.display())))
}

pub(super) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Options of a run that are not settings.
pub(super) struct RunOptions {
    pub(super) log: LogArgs,
    pub(super) out: Option<PathBuf>,
    pub(super) limit: Option<u64>,
    pub(super) dry_run: bool,
    pub(super) max_failures: Option<MaxFailures>,
    pub(super) grace: Duration,
    /// The command-line flags to keep in run.json.
    pub(super) flags: RunFlags,
    pub(super) progress: ProgressMode,
    pub(super) json: bool,
    /// How the user would run this job again (for the closing hint).
    pub(super) rerun: String,
    /// Whether `bulkcall resume` can finish the run (not the demo's).
    pub(super) resumable: bool,
    /// This process's part of a run split over several.
    pub(super) sharding: Option<Sharding>,
    /// `--in-doubt`: whether rows of a failures file that the gateway may
    /// have acted on are sent again [default: by the job's idempotency].
    pub(super) in_doubt: Option<InDoubt>,
}

/// A shard of a run split over several processes.
#[derive(Debug, Clone)]
pub(super) struct Sharding {
    pub(super) shard: Shard,
    pub(super) run_id: String,
    /// The inputs as the run found them (the run id's default is their hash).
    pub(super) inputs: Vec<InputFingerprint>,
}
