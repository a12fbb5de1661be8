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
    // Every bad row is counted; only the first few are kept to show, so a
    // file of millions of bad rows needs no more memory than a good one.
    const SHOWN: usize = 50;
    let (rows, bad, shown) = tokio::task::spawn_blocking(move || {
        let (mut rows, mut bad, mut shown) = (0u64, 0u64, Vec::new());
        let result = input::read_all(&inputs, &|_| {}, &mut |item| {
            rows += 1;
            let why = match item {
                Err(b) => Some(format!("{} row {}: {}", names[b.input], b.number, b.message)),
                Ok(row) => requests.render(&row).err().map(|e| {
                    let why = if verbose { &e.message } else { e.brief() };
                    format!("{} line {} (row {}): {why}", names[row.input], row.line, row.number)
                }),
            };
            if let Some(why) = why {
                bad += 1;
                if shown.len() < SHOWN {
                    shown.push(why);
                }
            }
            true
        });
        result.map(|()| (rows, bad, shown))
    })
    .await
    .expect("validation does not panic")?;
    if args.json {
        let json = serde_json::json!({ "rows": rows, "ready": rows - bad, "invalid": bad, "first_invalid": shown });
        println!("{}", serde_json::to_string_pretty(&json).expect("serializable"));
    }
    for line in &shown {
        eprintln!("{line}");
    }
    if bad > shown.len() as u64 {
        eprintln!("... and {} more", bad - shown.len() as u64);
    }
    if verbose && bad > 0 {
        eprintln!("(-v: the reasons above may quote row values)");
    }
    eprintln!("bulkcall: {rows} rows read: {} ready to send, {bad} cannot be sent", rows - bad);
    Ok(if bad == 0 { ExitCode::Success } else { ExitCode::RowsFailed })
}
