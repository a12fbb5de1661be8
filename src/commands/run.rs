//! `bulkcall run`.

use tokio_util::sync::CancellationToken;

use crate::cli::*;
use crate::error::{Error, ExitCode};
use crate::output::RunFlags;
use crate::shard::Shard;

use super::close::rerun_command;
use super::launch::{in_doubt_name, run_flags, run_resolved};
use super::resolve::{RunOptions, Sharding};
use super::resolve::{fingerprint, resolve};
use super::resume::resume;

impl ShardArgs {
    /// `--shard K/N`, or `--shards N` with K from the scheduler's environment.
    fn shard(&self) -> Result<Option<Shard>, Error> {
        let shard = match (self.shard, self.shards) {
            (Some(shard), _) => Some(shard),
            (None, Some(count)) => Some(Shard::from_env(count, |name| std::env::var(name).ok())?),
            (None, None) => None,
        };
        if shard.is_none() && self.run_id.is_some() {
            return Err(Error::Usage(
                "--run-id names the run that shards share: give --shard K/N or --shards N".into(),
            ));
        }
        if let Some(id) = &self.run_id {
            crate::shard::check_run_id(id)?;
        }
        Ok(shard)
    }
}

pub(super) async fn run(args: RunArgs, log: LogArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let shard = args.sharding.shard()?;
    let resolved = resolve(&args.job, &args.inputs, args.format, &args.config, &args.settings)?;
    let rerun = rerun_command(&args.job, args.config.profile.as_deref(), args.config.config.as_deref());
    let resumable = true;
    let (mut out, mut sharding) = (args.out, None);
    if let Some(shard) = shard {
        let inputs = fingerprint(&resolved.inputs).await?;
        let run_id = args.sharding.run_id.unwrap_or_else(|| crate::shard::default_run_id(&resolved.job.name, &inputs));
        let run = out.unwrap_or_else(|| resolved.loaded.settings.out_dir.join(&resolved.job.name).join(&run_id));
        let dir = shard.dir(&run);
        // A shard started again (a Kubernetes index retried, a host
        // rebooted) picks up where it left off.
        if dir.join("run.json").exists() && !args.dry_run {
            tracing::info!("shard {shard} of run {run_id} started before: resuming {}", dir.display());
            let again = ResumeArgs {
                run_dir: dir,
                // As `run` was told, else the same default as `bulkcall
                // resume`: by the job's idempotency.
                in_doubt: args.in_doubt,
                // Its pending rows are polled again.
                give_up_pending: false,
                // The config file this command names, as `resume -c` would.
                config: args.config.config,
                settings: args.settings,
                running: args.running,
            };
            return resume(again, log, stop).await;
        }
        out = Some(dir);
        sharding = Some(Sharding { shard, run_id, inputs });
    }
    let options = RunOptions {
        log,
        out,
        limit: args.limit,
        dry_run: args.dry_run,
        max_failures: args.running.max_failures,
        grace: args.running.grace.unwrap_or(RunningArgs::DEFAULT_GRACE),
        progress: args.running.progress,
        json: args.running.json,
        flags: RunFlags { in_doubt: args.in_doubt.map(in_doubt_name), ..run_flags(&args.settings, &args.running) },
        in_doubt: args.in_doubt,
        rerun,
        resumable,
        sharding,
    };
    run_resolved(resolved, None, options, None, stop).await
}
