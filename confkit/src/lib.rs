//! What lb's and app's configurations share: the error a person reads (`FILE: KEY: REASON`),
//! the exit status it gives ([`EXIT_CONFIG`]), reading and parsing a TOML file with the parser's
//! complaint on one line that quotes the line at fault, and the value checks both binaries
//! make (addresses, durations, counts).
//!
//! Each binary keeps its own raw structs (serde, `deny_unknown_fields`) and its own `validate`
//! step; they call [`read`] and [`parse`] for the text and a [`Checker`] for each key, so every
//! error has the same shape whichever binary reports it.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

/// Exit status for an unusable configuration (EX_USAGE in sysexits.h, as `haproxy -c`).
pub const EXIT_CONFIG: u8 = 64;

/// Why a configuration was rejected. The display form is `FILE: KEY: REASON`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: could not read the file: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the expected shape (an unknown key, a
    /// string where a number belongs): `line N `the line`: ` where the parser points, then its
    /// explanation, on one line.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// The parser's message.
        message: String,
    },
    /// A key has a value that is not acceptable.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The file (or the flag the value came from).
        file: String,
        /// The key, like `backends[1].addr`.
        key: String,
        /// What is wrong and, where useful, what would be right.
        reason: String,
    },
}

impl ConfigError {
    /// `key` of `file` is wrong for `reason`.
    pub fn invalid(file: &str, key: impl Into<String>, reason: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            file: file.to_owned(),
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}

/// The text of the file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })
}

/// TOML `text` (named `file` in errors) as `T`.
pub fn parse<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_owned(),
        message: toml_message(text, &e),
    })
}

/// The parser's explanation of `e` on one line, after `line N `the line`: ` when it points at a
/// place, so the key is named even when the message itself does not name it. The line is
/// trimmed and cut to 80 characters; inside a multi-line value (an array) it is the element at
/// fault, which no key name would describe.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    let Some(before) = e.span().and_then(|span| text.get(..span.start)) else {
        return message;
    };
    let number = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line: String = text
        .get(start..)
        .and_then(|rest| rest.lines().next())
        .unwrap_or("")
        .trim()
        .chars()
        .take(80)
        .collect();
    format!("line {number} `{line}`: {message}")
}

/// A duration the way a file writes it (`"1s"`, `"10m"`), for messages.
pub fn show(duration: Duration) -> impl fmt::Display {
    humantime::format_duration(duration)
}

/// The checks of one file's keys: each error names the file and the key.
#[derive(Debug, Clone, Copy)]
pub struct Checker<'a> {
    file: &'a str,
}

impl<'a> Checker<'a> {
    /// Checks for the keys of `file` (or of a flag, named as such).
    pub fn new(file: &'a str) -> Self {
        Checker { file }
    }

    /// The file (or flag) errors name.
    pub fn file(&self) -> &'a str {
        self.file
    }

    /// An error about `key`.
    pub fn err(&self, key: impl Into<String>, reason: impl fmt::Display) -> ConfigError {
        ConfigError::invalid(self.file, key, reason)
    }

    /// An `ip:port` socket address.
    pub fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.err(
                key,
                format!(
                    "{value:?} is not an IP:port address (examples: \"0.0.0.0:443\", \
                     \"127.0.0.1:8443\", \"[::]:443\")"
                ),
            )
        })
    }

    /// A humantime duration written as text (`"500ms"`, `"2s"`, `"1h 30m"`), non-zero, or
    /// `default` when absent.
    pub fn duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(text) = value else {
            return Ok(default);
        };
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => Err(self.err(key, "must be greater than zero")),
            Ok(d) => Ok(d),
            Err(e) => Err(self.err(
                key,
                format!("{text:?} is not a duration ({e}); examples: \"500ms\", \"2s\", \"1h\""),
            )),
        }
    }

    /// An integer within `min..=max`, or `default` when absent.
    pub fn count(
        &self,
        key: &str,
        value: Option<i64>,
        default: u32,
        min: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) => match u32::try_from(n) {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(self.err(key, format!("{n} is out of range {min}..={max}"))),
            },
        }
    }

    /// A number of at least `min`, or `default` when absent.
    pub fn at_least<T>(
        &self,
        key: &str,
        value: Option<T>,
        default: T,
        min: T,
    ) -> Result<T, ConfigError>
    where
        T: PartialOrd + fmt::Display + Copy,
    {
        let value = value.unwrap_or(default);
        if value < min {
            return Err(self.err(key, format!("{value} is too small; the minimum is {min}")));
        }
        Ok(value)
    }

    /// A duration of at least `min`, or `default` when absent; printed as the file writes it.
    pub fn duration_at_least(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
        min: Duration,
    ) -> Result<Duration, ConfigError> {
        let value = value.unwrap_or(default);
        if value < min {
            return Err(self.err(
                key,
                format!("{} is too small; the minimum is {}", show(value), show(min)),
            ));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Raw {
        name: Option<String>,
        list: Option<Vec<String>>,
    }

    #[test]
    fn a_parse_error_quotes_the_line_the_parser_points_at() {
        let err = parse::<Raw>("name = \"a\"\nnmae = \"b\"\n", "x.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("x.toml: line 2 `nmae = \"b\"`: "),
            "{text}"
        );
        assert!(text.contains("unknown field"), "{text}");
        // Inside a multi-line array, the element at fault.
        let err = parse::<Raw>("list = [\n  \"a\",\n  5,\n]\n", "x.toml").unwrap_err();
        assert!(
            err.to_string().starts_with("x.toml: line 3 `5,`: "),
            "{err}"
        );
    }

    #[test]
    fn a_missing_file_names_it() {
        let err = read(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/x.toml: could not read the file: "),
            "{err}"
        );
    }

    #[test]
    fn checks_name_the_file_and_the_key() {
        let check = Checker::new("f.toml");
        assert_eq!(
            check.addr("listen", "127.0.0.1:80").unwrap().port(),
            80,
            "a good address passes"
        );
        let err = check.addr("listen", "localhost").unwrap_err().to_string();
        assert!(
            err.starts_with("f.toml: listen: \"localhost\" is not an IP:port address"),
            "{err}"
        );
        assert_eq!(
            check.duration("t", None, Duration::from_secs(3)).unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(
            check.duration("t", Some("1h 30m"), Duration::ZERO).unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            check
                .duration("t", Some("0s"), Duration::ZERO)
                .unwrap_err()
                .to_string(),
            "f.toml: t: must be greater than zero"
        );
        assert!(check.duration("t", Some("soon"), Duration::ZERO).is_err());
        assert_eq!(check.count("n", Some(5), 1, 1, 9).unwrap(), 5);
        assert_eq!(check.count("n", None, 7, 1, 9).unwrap(), 7);
        for bad in [0, 10, -1, i64::MAX] {
            assert_eq!(
                check
                    .count("n", Some(bad), 1, 1, 9)
                    .unwrap_err()
                    .to_string(),
                format!("f.toml: n: {bad} is out of range 1..=9")
            );
        }
        assert_eq!(check.at_least("q", Some(4), 1, 1).unwrap(), 4);
        assert_eq!(
            check.at_least("q", Some(0), 1, 1).unwrap_err().to_string(),
            "f.toml: q: 0 is too small; the minimum is 1"
        );
        assert_eq!(
            check
                .duration_at_least(
                    "p",
                    Some(Duration::from_millis(50)),
                    Duration::from_secs(1),
                    Duration::from_millis(100)
                )
                .unwrap_err()
                .to_string(),
            "f.toml: p: 50ms is too small; the minimum is 100ms"
        );
    }
}
