//! The pipeline without the network: read → render → record, on the
//! eligibility job. Prints rows/s and µs per row for each stage added.
//!
//!   cargo bench --bench pipeline [-- ROWS.csv]
//!
//! Without a file it generates 100,000 synthetic rows.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkcall::answer::Body;
use bulkcall::config::Settings;
use bulkcall::input::{Format, InputSpec, read_all};
use bulkcall::job::Job;
use bulkcall::outcome::{Outcome, Source, Success};
use bulkcall::output::{GroupCommit, InputInfo, Ledger, Writer};

// The allocator the binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ANSWER: &[u8] = br#"{"controlNumber":"000000001","tradingPartnerServiceId":"000050","planStatus":[{"status":"Active Coverage","statusCode":"1","serviceTypeCodes":["30"]}],"subscriber":{"firstName":"Pat","lastName":"Doe","dateOfBirth":"1980-01-02"},"payer":{"name":"Bench Payer"}}"#;

fn main() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let path = dir.path().join("rows.csv");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            writeln!(f, "control_number,payer_id,provider_name,npi,member_id,first_name,last_name,dob,service_type")
                .unwrap();
            for i in 1..=100_000 {
                writeln!(f, "{i:09},000050,Clinic {},0123456789,SYN{i:08},Pat,Doe{},19800102,30", i % 97, i % 1000)
                    .unwrap();
            }
            path
        }
    };
    let spec = InputSpec { path: path.clone(), format: Format::Csv, delimiter: b',', encoding: Default::default() };
    let job = Arc::new(
        Job::parse(std::path::Path::new("jobs/eligibility.toml"), include_str!("../jobs/eligibility.toml")).unwrap(),
    );
    let settings = Settings { base_url: Some("http://127.0.0.1:1".into()), ..Settings::default() };
    let requests = job.requests(&settings).unwrap();

    let report = |stage: &str, rows: u64, took: Duration| {
        let per_row = took.as_secs_f64() * 1e6 / rows.max(1) as f64;
        println!(
            "{stage:<28} {rows} rows in {:.3} s: {:>9.0} rows/s, {per_row:.2} µs/row",
            took.as_secs_f64(),
            rows as f64 / took.as_secs_f64()
        );
    };

    // Read only.
    let started = Instant::now();
    let mut rows = 0u64;
    read_all(std::slice::from_ref(&spec), &|_| {}, &mut |item| {
        rows += u64::from(item.is_ok());
        true
    })
    .unwrap();
    report("read", rows, started.elapsed());

    // Read and render.
    let started = Instant::now();
    let mut bytes = 0usize;
    read_all(std::slice::from_ref(&spec), &|_| {}, &mut |item| {
        let request = requests.render(&item.unwrap()).unwrap();
        bytes += request.body.map_or(0, |b| b.len());
        true
    })
    .unwrap();
    report("read + render", rows, started.elapsed());
    assert!(bytes > 0);

    // Read, render, judge the answer and record it (ledger and results), 64
    // rows at a time as 64 workers do under load: their started marks go out
    // together, then their outcomes; as the recorder does, what was written
    // is made durable (then marked done) once it has waited SYNC_EVERY.
    let out = dir.path().join("run");
    std::fs::create_dir(&out).unwrap();
    let mut writer = Writer::open(
        &out,
        vec![InputInfo { name: "rows.csv".into(), failures: "failures.csv".into() }],
        false,
        true,
        None,
    )
    .unwrap();
    let ledger = std::sync::Arc::new(Ledger::open(&out, false, bulkcall::output::MarkStarted::Written).unwrap());
    let mut group = GroupCommit::default();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut chunk = Vec::with_capacity(64);
    let mut record_chunk = |chunk: &mut Vec<bulkcall::input::Row>| {
        let requests_and_rows: Vec<_> = chunk.drain(..).map(|row| (requests.render(&row).unwrap(), row)).collect();
        runtime
            .block_on(futures::future::try_join_all(
                requests_and_rows.iter().map(|(_, row)| ledger.started(row.input, row.number)),
            ))
            .unwrap();
        let mut outcomes = Vec::with_capacity(requests_and_rows.len());
        for (request, row) in requests_and_rows {
            let body = Body::new(ANSWER, ANSWER.len() as u64);
            let judged = requests.judge(200, &body, &row);
            assert!(judged.ok);
            assert_eq!(judged.captured["plan_status"], "Active Coverage");
            let outcome = Outcome {
                input: row.input,
                number: row.number,
                line: row.line,
                key: request.key,
                attempts: 1,
                latency: Duration::from_millis(3),
                status: Some(200),
                result: Ok(Success::new(body, judged.captured)),
                source: Source::Record(row.record),
                origin: None,
                poll: None,
            };
            outcomes.push(outcome);
        }
        group.write(&mut writer, &outcomes).unwrap();
        if group.due().is_some_and(|due| Instant::now() >= due) {
            group.sync(&mut writer, &ledger).unwrap();
        }
    };
    let started = Instant::now();
    read_all(std::slice::from_ref(&spec), &|_| {}, &mut |item| {
        chunk.push(item.unwrap());
        if chunk.len() == 64 {
            record_chunk(&mut chunk);
        }
        true
    })
    .unwrap();
    record_chunk(&mut chunk);
    group.sync(&mut writer, &ledger).unwrap();
    report("read + render + record", rows, started.elapsed());
}
