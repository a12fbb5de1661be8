//! The examples in README.md and docs/ are checked against the code, so the
//! docs cannot drift from it. Each fenced block is judged by its info string
//! (the words after the opening fence; GitHub colours by the first and shows
//! none of them):
//!
//! - ` ```toml job `: a whole job spec, compiled by `bulkcall::job::Job::parse`
//!   (as if it were a file in `jobs/`).
//! - ` ```toml config `: a config file, or profile sections of one, written to
//!   a temporary file and loaded by the config loader once per profile it
//!   holds (`[default]` alone when it holds no other), environment left out.
//! - ` ```toml partial `: a fragment on purpose (a few keys out of a bigger
//!   file): parsed as TOML only. A ` ```toml ` block with none of these three
//!   words fails the test, so a new example is given a role.
//! - ` ```sh `, ` ```bash `, ` ```console `, ` ```cron `, ` ```ini `: every
//!   command in them that runs bulkcall (`bulkcall`, `…/bulkcall` such as
//!   `target/release/bulkcall` or `ExecStart=/usr/local/bin/bulkcall`, and
//!   `cargo run --release --`) is parsed by `bulkcall::cli::Cli::try_parse_from`.
//!   A command is cut at `|`, `&&`, `||`, `;`, `&`, a redirection or a `#`
//!   comment; a line ending in `\` goes on on the next one. Any other
//!   program (`openssl`, `export`, `zcat`) is not checked.
//! - Code spans in the prose that start with `bulkcall ` (such as
//!   `` `bulkcall resume RUN_DIR` ``) are parsed the same way, but may leave
//!   out a required argument: the text names a command (`bulkcall status`)
//!   or the flags that matter (`bulkcall run --rate 0 -j 64`). An unknown
//!   command or flag, or a value the flag refuses, fails all the same.
//! - Placeholders are substituted first: `<run id>` becomes `nightly-1` and
//!   `<run>` becomes `RUN` in the text (before it is cut into words, `<`
//!   being a redirection), then by whole word: `RUN_DIR`, `RUN`, `DIR` become
//!   a temporary directory; `JOB` becomes
//!   `jobs/eligibility.toml`; `PROFILE` becomes `local`; `NEW_PATH` becomes
//!   `config/bulkcall.toml`. An argument naming a file under `jobs/`,
//!   `config/` or `deploy/` must exist in the repository.
//! - ` ```json `: parsed as JSON; an array of strings is bulkcall's arguments
//!   (a container's command) and parsed by `Cli`. ` ```json partial `: a
//!   member cut out of a bigger object (`"retryStrategy": {…}`), parsed
//!   inside `{ }`.
//! - ` ```yaml `: every document parsed as YAML.
//! - ` ```text `, ` ``` ` with no info string, and other languages: a
//!   synopsis or sample output, not checked.
//!
//! README's "Try it" commands that use the `local` profile are also run, as
//! written, by the real binary from the repository's root against the
//! built-in sandbox (see `the_readme_quick_start_runs_against_the_sandbox`).
//!
//! Links between the pages (`[text](docs/x.md#anchor)`) must reach a file
//! that exists and, with an anchor, a heading of it.

mod common;

use std::path::{Path, PathBuf};

use bulkcall::sandbox::{Sandbox, SandboxConfig};
use clap::Parser;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page of docs/, as (path from the repo, text).
fn pages() -> Vec<(String, String)> {
    let mut names = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    names.extend(docs);
    names.into_iter().map(|n| (n.clone(), std::fs::read_to_string(repo().join(&n)).unwrap())).collect()
}

/// A fenced block: where it is, its info string's words, its text.
struct Block {
    page: String,
    line: usize,
    info: Vec<String>,
    text: String,
}

impl Block {
    fn lang(&self) -> &str {
        self.info.first().map_or("", String::as_str)
    }
    fn has(&self, word: &str) -> bool {
        self.info.iter().skip(1).any(|w| w == word)
    }
    fn at(&self) -> String {
        format!("{} line {} (```{})", self.page, self.line, self.info.join(" "))
    }
}

/// The fenced blocks of a page (also those indented in a list item), and
/// its prose with the blocks left out.
fn split(page: &str, text: &str) -> (Vec<Block>, String) {
    let mut blocks = vec![];
    let mut prose = String::new();
    let mut open: Option<(usize, usize, Vec<String>, String)> = None; // line, indent, info, text
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None if trimmed.starts_with("```") => {
                let info = trimmed[3..].split_whitespace().map(str::to_string).collect();
                open = Some((i + 1, indent, info, String::new()));
            }
            None => {
                prose.push_str(line);
                prose.push('\n');
            }
            Some(_) if trimmed.starts_with("```") => {
                let (line, _, info, text) = open.take().unwrap();
                blocks.push(Block { page: page.to_string(), line, info, text });
            }
            Some((_, indent, _, body)) => {
                let cut = line.len().min(*indent).min(line.len() - line.trim_start().len());
                body.push_str(&line[cut..]);
                body.push('\n');
            }
        }
    }
    assert!(open.is_none(), "{page}: a fenced block is never closed");
    (blocks, prose)
}

fn blocks() -> Vec<Block> {
    pages().iter().flat_map(|(page, text)| split(page, text).0).collect()
}

/// A shell line's words, cut into commands at `|`, `&&`, `||`, `;` and `&`;
/// words after a redirection or a comment are dropped.
fn commands(line: &str) -> Vec<Vec<String>> {
    let mut all = vec![];
    let mut words: Vec<String> = vec![];
    let mut word = String::new();
    let mut in_word = false;
    let mut redirected = false;
    let mut chars = line.chars().peekable();
    let end_word = |words: &mut Vec<String>, word: &mut String, in_word: &mut bool, redirected: bool| {
        if *in_word && !redirected {
            words.push(std::mem::take(word));
        }
        word.clear();
        *in_word = false;
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            '#' if !in_word => break,
            c if c.is_whitespace() => end_word(&mut words, &mut word, &mut in_word, redirected),
            '>' | '<' => {
                // `2>&1`: the digits before it are the redirection's own.
                if in_word && word.chars().all(|c| c.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                }
                end_word(&mut words, &mut word, &mut in_word, redirected);
                while chars.next_if(|c| matches!(c, '>' | '&') || c.is_ascii_digit()).is_some() {}
                redirected = true;
            }
            '|' | '&' | ';' => {
                end_word(&mut words, &mut word, &mut in_word, redirected);
                chars.next_if(|n| *n == c);
                all.push(std::mem::take(&mut words));
                redirected = false;
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut words, &mut word, &mut in_word, redirected);
    all.push(words);
    all.retain(|w| !w.is_empty());
    all
}

/// bulkcall's arguments in a command, if it runs bulkcall.
fn bulkcall_args(words: &[String]) -> Option<Vec<String>> {
    if let Some(at) = words.windows(4).position(|w| w == ["cargo", "run", "--release", "--"]) {
        return Some(words[at + 4..].to_vec());
    }
    // The program is the first word, after a crontab line's five time fields;
    // `ExecStart=` (a systemd unit) names it after the `=`.
    let at = words.iter().position(|w| !w.chars().all(|c| c.is_ascii_digit() || "*/,-".contains(c)))?;
    let program = match words[at].split_once('=') {
        Some((key, program)) if key.starts_with("Exec") => program,
        Some(_) => return None,
        None => &words[at],
    };
    (program == "bulkcall" || program.ends_with("/bulkcall")).then(|| words[at + 1..].to_vec())
}

/// The code spans of a text, as Markdown reads them: a run of backticks
/// opens one, the next run of as many closes it (`` ` ``` ` `` holds three).
fn code_spans(text: &str) -> Vec<String> {
    let mut spans = vec![];
    let mut rest = text;
    while let Some(open) = rest.find('`') {
        let run = rest[open..].len() - rest[open..].trim_start_matches('`').len();
        let after = &rest[open + run..];
        let fence = "`".repeat(run);
        // The closing run is exactly as long: not part of a longer one.
        let close = after
            .match_indices(&fence)
            .map(|(i, _)| i)
            .find(|&i| !after[..i].ends_with('`') && !after[i + run..].starts_with('`'));
        let Some(close) = close else { break };
        spans.push(after[..close].trim().to_string());
        rest = &after[close + run..];
    }
    spans
}

/// The commands of a shell block, its `\` continuations joined.
fn block_commands(text: &str) -> Vec<Vec<String>> {
    placeholders(&text.replace("\\\n", " ")).lines().flat_map(commands).filter_map(|w| bulkcall_args(&w)).collect()
}

/// The placeholders in angle brackets, which a shell would take for redirections.
fn placeholders(text: &str) -> String {
    text.replace("<run id>", "nightly-1").replace("<run>", "RUN")
}

/// Placeholders replaced by whole word (see the top of this file).
fn substitute(args: &[String], tmp: &Path) -> Vec<String> {
    let tmp = tmp.display().to_string();
    args.iter()
        .map(|arg| {
            let mut out = String::new();
            for (i, part) in arg.split('/').enumerate() {
                if i > 0 {
                    out.push('/');
                }
                out.push_str(match part {
                    "RUN_DIR" | "RUN" | "<run>" | "DIR" => &tmp,
                    "JOB" => "jobs/eligibility.toml",
                    "PROFILE" => "local",
                    "NEW_PATH" => "config/bulkcall.toml",
                    other => other,
                });
            }
            out
        })
        .collect()
}

/// Parses one command with bulkcall's own command line; what is wrong, if
/// anything. `whole`: a required argument left out is wrong too.
fn check_command(args: &[String], tmp: &Path, whole: bool) -> Result<(), String> {
    let args = substitute(args, tmp);
    let argv = std::iter::once("bulkcall".to_string()).chain(args.iter().cloned());
    if let Err(e) = bulkcall::cli::Cli::try_parse_from(argv) {
        // --help and --version "fail" with what they print; both are fine.
        use clap::error::ErrorKind::{DisplayHelp, DisplayVersion, MissingRequiredArgument};
        let fine = matches!(e.kind(), DisplayHelp | DisplayVersion) || (!whole && e.kind() == MissingRequiredArgument);
        if !fine {
            return Err(format!("`bulkcall {}`: {}", args.join(" "), e.render()));
        }
    }
    for arg in &args {
        if ["jobs/", "config/", "deploy/"].iter().any(|p| arg.starts_with(p)) && !repo().join(arg).exists() {
            return Err(format!("`bulkcall {}`: {arg} is not in the repository", args.join(" ")));
        }
    }
    Ok(())
}

fn report(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n{}", problems.join("\n"));
}

#[test]
fn toml_examples_are_jobs_and_configs_that_load() {
    let tmp = tempfile::tempdir().unwrap();
    let mut problems = vec![];
    let (mut jobs, mut configs) = (0, 0);
    for b in blocks().iter().filter(|b| b.lang() == "toml") {
        let table: toml::Table = match toml::from_str(&b.text) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{}: not TOML: {e}", b.at()));
                continue;
            }
        };
        if b.has("job") {
            jobs += 1;
            // As if it were a file beside the example jobs: `input` resolves there.
            let path = repo().join("jobs").join(format!("{}-line-{}.toml", b.page.replace('/', "-"), b.line));
            if let Err(e) = bulkcall::job::Job::parse(&path, &b.text) {
                problems.push(format!("{}: not a job spec: {e}", b.at()));
            }
        } else if b.has("config") {
            configs += 1;
            let file = tmp.path().join(format!("config-{configs}.toml"));
            std::fs::write(&file, &b.text).unwrap();
            let mut profiles: Vec<String> =
                table.iter().filter(|(_, v)| v.is_table()).map(|(k, _)| k.clone()).filter(|k| k != "default").collect();
            if profiles.is_empty() {
                profiles.push("default".into());
            }
            for profile in profiles {
                let sources = bulkcall::config::Sources {
                    config_file: Some(file.clone()),
                    profile: Some(profile.clone()),
                    ..Default::default()
                };
                if let Err(e) = sources.load() {
                    problems.push(format!("{}: profile {profile} does not load: {e}", b.at()));
                }
            }
        } else if !b.has("partial") {
            problems.push(format!("{}: say which: ```toml job, ```toml config or ```toml partial", b.at()));
        }
    }
    report("TOML examples", &problems);
    // What the docs hold today; fewer means a block lost its role or the parsing above broke.
    assert!(jobs >= 2 && configs >= 4, "found {jobs} job specs and {configs} configs");
}

#[test]
fn every_bulkcall_command_in_the_docs_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut problems = vec![];
    let mut checked = 0;
    for b in blocks() {
        if !["sh", "bash", "console", "cron", "ini"].contains(&b.lang()) || b.has("partial") {
            continue;
        }
        for args in block_commands(&b.text) {
            checked += 1;
            if let Err(e) = check_command(&args, tmp.path(), true) {
                problems.push(format!("{}: {e}", b.at()));
            }
        }
    }
    let mut spans = 0;
    for (page, text) in pages() {
        let (_, prose) = split(&page, &text);
        for span in code_spans(&prose) {
            let span = span.replace('\n', " ");
            if span.starts_with("bulkcall ") {
                spans += 1;
                for args in commands(&placeholders(&span)).iter().filter_map(|w| bulkcall_args(w)) {
                    if let Err(e) = check_command(&args, tmp.path(), false) {
                        problems.push(format!("{page}, in the text: {e}"));
                    }
                }
            }
        }
    }
    report("bulkcall commands", &problems);
    assert!(checked >= 18 && spans >= 25, "found {checked} commands in blocks and {spans} in the text");
}

#[test]
fn json_and_yaml_examples_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let mut problems = vec![];
    let mut commands = 0;
    for b in blocks() {
        match b.lang() {
            "json" if b.has("partial") => {
                if let Err(e) = serde_json::from_str::<serde_json::Value>(&format!("{{{}}}", b.text)) {
                    problems.push(format!("{}: not a JSON member: {e}", b.at()));
                }
            }
            "json" => match serde_json::from_str::<serde_json::Value>(&b.text) {
                Err(e) => problems.push(format!("{}: not JSON: {e}", b.at())),
                Ok(serde_json::Value::Array(items)) if items.iter().all(|v| v.is_string()) => {
                    commands += 1;
                    let args: Vec<String> = items.iter().map(|v| v.as_str().unwrap().to_string()).collect();
                    if let Err(e) = check_command(&args, tmp.path(), true) {
                        problems.push(format!("{}: {e}", b.at()));
                    }
                }
                Ok(_) => {}
            },
            "yaml" | "yml" => {
                for doc in serde_yaml_ng::Deserializer::from_str(&b.text) {
                    if let Err(e) = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc) {
                        problems.push(format!("{}: not YAML: {e}", b.at()));
                    }
                }
            }
            _ => {}
        }
    }
    report("JSON and YAML examples", &problems);
    assert!(commands >= 1, "the AWS Batch command is checked");
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn links_between_the_pages_reach_a_file_and_a_heading() {
    let mut problems = vec![];
    for (page, text) in pages() {
        let (_, prose) = split(&page, &text);
        let dir = Path::new(&page).parent().unwrap().to_path_buf();
        for (i, _) in prose.match_indices("](") {
            let rest = &prose[i + 2..];
            let target = &rest[..rest.find(')').unwrap_or(rest.len())];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let path: PathBuf = if file.is_empty() { PathBuf::from(&page) } else { dir.join(file) };
            let Ok(linked) = std::fs::read_to_string(repo().join(&path))
                .or_else(|e| if repo().join(&path).is_dir() { Ok(String::new()) } else { Err(e) })
            else {
                problems.push(format!("{page}: a link to {target}: {} does not exist", path.display()));
                continue;
            };
            if !fragment.is_empty() {
                let headings: Vec<String> = split(&path.display().to_string(), &linked)
                    .1
                    .lines()
                    .filter(|l| l.starts_with('#'))
                    .map(|l| anchor(l.trim_start_matches('#')))
                    .collect();
                if !headings.iter().any(|h| h == fragment) {
                    problems.push(format!("{page}: a link to {target}: no such heading in {}", path.display()));
                }
            }
        }
    }
    report("links", &problems);
}

#[test]
fn the_readme_opens_with_the_two_commands_and_links_every_page_of_the_docs() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (blocks, _) = split("README.md", &readme);
    let first = &blocks[0];
    assert!(first.line <= 5, "the README opens with its commands");
    let commands: Vec<&str> = first.text.lines().map(|l| l.split('#').next().unwrap().trim()).collect();
    // CI (.ci/run) runs the README's test command.
    assert_eq!(commands, ["cargo run --release -- demo", "cargo test"], "README's first block");
    for (page, _) in pages().iter().skip(1) {
        assert!(readme.contains(&format!("]({page})")), "README links {page}");
    }
}

#[test]
fn the_shell_words_are_cut_as_a_shell_would() {
    let words = |line: &str| commands(line);
    assert_eq!(
        words("*/5 * * * * cd /srv && bulkcall run jobs/x.toml -q >>log/x.log 2>&1"),
        [vec!["*/5", "*", "*", "*", "*", "cd", "/srv"], vec!["bulkcall", "run", "jobs/x.toml", "-q"]]
    );
    assert_eq!(
        words("zcat a.gz | bulkcall run j.toml - --format jsonl"),
        [vec!["zcat", "a.gz"], vec!["bulkcall", "run", "j.toml", "-", "--format", "jsonl"]]
    );
    assert_eq!(
        words("bulkcall jwks -p smart > jwks.json   # or: bulkcall jwks"),
        [vec!["bulkcall", "jwks", "-p", "smart"]]
    );
    assert_eq!(words("bulkcall run 'a b' \"c d\" || true"), [vec!["bulkcall", "run", "a b", "c d"], vec!["true"]]);
    assert_eq!(
        block_commands("target/release/bulkcall sandbox --port 8787 &   # the mock\nbulkcall run j \\\n  -q\n"),
        [vec!["sandbox", "--port", "8787"], vec!["run", "j", "-q"]]
    );
    assert_eq!(code_spans("a `b` c `` d ` e `` f ` ```g ` `h\ni`"), ["b", "d ` e", "```g", "h\ni"]);
    assert_eq!(bulkcall_args(&["ExecStart=/usr/local/bin/bulkcall".into(), "run".into()]).unwrap(), ["run"]);
    assert_eq!(
        bulkcall_args(&["*/10", "*", "*", "*", "*", "bulkcall", "resume"].map(String::from)).unwrap(),
        ["resume"]
    );
    assert_eq!(bulkcall_args(&["cd".into(), "/srv/bulkcall".into()]), None);
    assert_eq!(bulkcall_args(&["WorkingDirectory=/srv/bulkcall".into()]), None);
    assert_eq!(bulkcall_args(&["cargo", "run", "--release", "--", "demo"].map(String::from)).unwrap(), ["demo"]);
}

/// docs/commands.md's list of commands (a ```text synopsis, not parsed as
/// commands) names every command bulkcall has, and no other.
#[test]
fn the_list_of_commands_names_every_command() {
    let text = std::fs::read_to_string(repo().join("docs/commands.md")).unwrap();
    let (blocks, _) = split("docs/commands.md", &text);
    let synopsis = blocks.iter().find(|b| b.lang() == "text").expect("docs/commands.md lists the commands");
    let mut listed: Vec<&str> =
        synopsis.text.lines().filter_map(|l| l.strip_prefix("bulkcall ")?.split_whitespace().next()).collect();
    listed.sort_unstable();
    let cli = <bulkcall::cli::Cli as clap::CommandFactory>::command();
    let mut commands: Vec<&str> = cli.get_subcommands().map(|c| c.get_name()).filter(|n| *n != "help").collect();
    commands.sort_unstable();
    assert_eq!(listed, commands, "docs/commands.md lists every command");
}

/// README's "Try it" commands with `-p local`, run as written by the real
/// binary from the repository's root, against the built-in sandbox on a free
/// port (`BULKCALL_BASE_URL` and `BULKCALL_AUTH__TOKEN_URL` move the `local`
/// profile there, as the precedence in docs/configuration.md allows), each
/// `run` with `-o` into a temporary folder and `--limit 20` added: each
/// exits 0, and the sandbox got their calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_runs_against_the_sandbox() {
    let sandbox = Sandbox::start(SandboxConfig::default(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (blocks, _) = split("README.md", &readme);
    let try_it = blocks.iter().find(|b| b.text.contains("bulkcall sandbox --port")).expect("README's Try it block");
    let mut ran = vec![];
    for (n, mut args) in block_commands(&try_it.text).into_iter().enumerate() {
        if !args.windows(2).any(|w| w == ["-p", "local"]) {
            continue; // `bulkcall sandbox` itself: started above
        }
        if args[0] == "run" {
            let out = tmp.path().join(format!("run-{n}"));
            args.extend(["-o".into(), out.display().to_string(), "--limit".into(), "20".into()]);
        }
        let done = common::bulkcall()
            .args(&args)
            .current_dir(repo())
            .env("BULKCALL_BASE_URL", sandbox.base_url())
            .env("BULKCALL_AUTH__TOKEN_URL", sandbox.token_url())
            .env("XDG_CACHE_HOME", tmp.path().join("cache"))
            .env_remove("BULKCALL_CONFIG")
            .env_remove("BULKCALL_PROFILE")
            .output()
            .await
            .unwrap();
        assert_eq!(
            done.status.code(),
            Some(0),
            "`bulkcall {}` (README line {}): {}",
            args.join(" "),
            try_it.line,
            String::from_utf8_lossy(&done.stderr)
        );
        ran.push(args[0].clone());
    }
    assert_eq!(ran, ["run", "run", "run", "run", "validate", "token"], "README's Try it commands");
    let calls = sandbox.stats().api_calls;
    assert!(calls >= 4 * 20, "four runs of 20 rows reached the sandbox: {calls} calls");
}
