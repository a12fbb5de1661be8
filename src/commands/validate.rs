//! `bulkcall validate`: read every row and render every request; send nothing.

use crate::cli::*;
use crate::error::{Error, ExitCode};
use crate::input::{self};

use super::resolve::resolve;

pub(super) async fn validate(args: ValidateArgs, log: &LogArgs) -> Result<ExitCode, Error> {
    // A reason may quote a row's values (PHI): only -v shows it whole.
    let verbose = log.verbose > 0;
    let r = resolve(&args.job, &args.inputs, args.format, &args.config, &SettingArgs::default())?;
    let requests = r.job.requests(&r.loaded.settings)?;
    let names: Vec<String> = r.inputs.iter().map(|i| i.path.display().to_string()).collect();
    let inputs = r.inputs.clone();
    let (rows, bad) = tokio::task::spawn_blocking(move || {
        let (mut rows, mut bad) = (0u64, Vec::new());
        let result = input::read_all(&inputs, &|_| {}, &mut |item| {
            rows += 1;
            match item {
                Err(b) => bad.push(format!("{} row {}: {}", names[b.input], b.number, b.message)),
                Ok(row) => {
                    if let Err(e) = requests.render(&row) {
                        let why = if verbose { &e.message } else { e.brief() };
                        bad.push(format!("{} line {} (row {}): {why}", names[row.input], row.line, row.number));
                    }
                }
            }
            true
        });
        result.map(|()| (rows, bad))
    })
    .await
    .expect("validation does not panic")?;
    const SHOWN: usize = 50;
    for line in bad.iter().take(SHOWN) {
        eprintln!("{line}");
    }
    if bad.len() > SHOWN {
        eprintln!("... and {} more", bad.len() - SHOWN);
    }
    if verbose && !bad.is_empty() {
        eprintln!("(-v: the reasons above may quote row values)");
    }
    eprintln!("bulkcall: {rows} rows read: {} ready to send, {} cannot be sent", rows - bad.len() as u64, bad.len());
    Ok(if bad.is_empty() { ExitCode::Success } else { ExitCode::RowsFailed })
}
