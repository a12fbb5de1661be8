//! Small values the command line, the commands and the runner all use. It
//! depends on nothing else in the crate, so `cli` and `runner` need not
//! depend on each other.

/// How to call bulkcall again in a hint: as it was called when that was a
/// path (`target/release/bulkcall`, `/usr/local/bin/bulkcall`), else
/// `bulkcall`, found on PATH.
pub fn program() -> String {
    std::env::args_os()
        .next()
        .map(|arg0| arg0.to_string_lossy().into_owned())
        .filter(|arg0| arg0.contains('/') && !arg0.contains(char::is_whitespace))
        .unwrap_or_else(|| "bulkcall".to_string())
}

#[cfg(test)]
mod tests {
    use super::shell_word;

    #[test]
    fn a_word_is_quoted_only_when_a_shell_would_split_or_expand_it() {
        assert_eq!(
            shell_word("out/claims/2026-12-02T030000Z/failures.csv"),
            "out/claims/2026-12-02T030000Z/failures.csv"
        );
        assert_eq!(shell_word("my jobs/claims.toml"), "'my jobs/claims.toml'");
        assert_eq!(shell_word("it's $HOME"), "'it'\\''s $HOME'");
        assert_eq!(shell_word(""), "''");
    }
}

/// A word of a printed command as a shell reads it back: as it is when
/// it holds only characters no shell treats specially, else in single
/// quotes (a path with a space: `'my jobs/claims.toml'`), so the command
/// works when copied as printed.
pub fn shell_word(word: impl std::fmt::Display) -> String {
    let word = word.to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) { word } else { format!("'{}'", word.replace('\'', "'\\''")) }
}

/// `--max-failures N` or `P%`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxFailures {
    Count(u64),
    /// A share of the rows done so far, judged once 100 rows are done.
    Percent(f64),
}

impl std::str::FromStr for MaxFailures {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is neither a count (50) nor a percentage (5%)");
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(MaxFailures::Percent(p)),
                Ok(_) => Err(format!("`{s}`: a percentage of failed rows is above 0% and at most 100%")),
                Err(_) => Err(bad()),
            },
            None => s.trim().parse::<u64>().ok().filter(|n| *n > 0).map(MaxFailures::Count).ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for MaxFailures {
    /// As given on the command line: `50` or `5%`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxFailures::Count(n) => write!(f, "{n}"),
            MaxFailures::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl MaxFailures {
    /// Whether `failed` of `done` rows reach the limit.
    pub fn reached(self, failed: u64, done: u64) -> bool {
        match self {
            MaxFailures::Count(n) => failed >= n,
            MaxFailures::Percent(p) => done >= 100 && failed as f64 * 100.0 >= p * done as f64,
        }
    }
}
