//! Scenario errors: one line each, naming the file, line, column, field and what is wrong.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a scenario or defaults file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    pub position: Option<(usize, usize)>,
    /// Dotted field path (`guest.memory`, `steps[2].timeout`); empty for file-level problems.
    pub field: String,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ScenarioError {}

/// A source file being checked: its path and text, to turn byte spans into line:column.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path as given (kept relative when the user gave a relative path).
    pub path: PathBuf,
    /// The file's text.
    pub text: String,
}

impl SourceFile {
    /// The 1-based line and column (in characters) of byte offset `at`.
    pub fn line_col(&self, at: usize) -> (usize, usize) {
        let at = at.min(self.text.len());
        let before = self.text.get(..at).unwrap_or(&self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        (line, col)
    }

    /// An error at `span` (or at the file when `None`) about `field`.
    pub fn error(
        &self,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ScenarioError {
        ScenarioError {
            file: self.path.clone(),
            position: span.map(|s| self.line_col(s.start)),
            field: field.into(),
            message: message.into(),
        }
    }

    /// The directory relative paths in this file are resolved against.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or_else(|| Path::new("."))
    }
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" into a one-line message with a
/// "did you mean" suggestion (Jaro-Winkler over the expected names), keeping other messages as is.
pub fn explain_serde_message(message: &str) -> String {
    let message = message.trim_end();
    let Some(rest) = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))
    else {
        return message.replace('\n', " ");
    };
    let what = if message.starts_with("unknown field") {
        "field"
    } else {
        "value"
    };
    let Some((name, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let candidates: Vec<&str> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| !s.is_empty())
        .collect();
    let best = candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(name, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let expected_list = candidates
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match best {
        Some((_, suggestion)) => {
            format!("unknown {what} `{name}`; did you mean `{suggestion}`?")
        }
        None if expected_list.is_empty() => format!("unknown {what} `{name}`"),
        None => format!("unknown {what} `{name}`; expected one of {expected_list}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters_from_one() {
        let file = SourceFile {
            path: "a.toml".into(),
            text: "id = \"x\"\n[guest]\nmémory = 1\n".into(),
        };
        assert_eq!(file.line_col(0), (1, 1));
        assert_eq!(file.line_col(9), (2, 1));
        let at = file.text.find("= 1").unwrap_or(0);
        assert_eq!(file.line_col(at), (3, 8));
    }

    #[test]
    fn unknown_fields_get_a_suggestion_or_the_list() {
        assert_eq!(
            explain_serde_message("unknown field `memroy`, expected one of `kernel`, `memory`"),
            "unknown field `memroy`; did you mean `memory`?"
        );
        assert_eq!(
            explain_serde_message("unknown field `zzz`, expected `kernel` or `memory`"),
            "unknown field `zzz`; expected one of `kernel`, `memory`"
        );
        assert_eq!(
            explain_serde_message("invalid type: string \"x\", expected u64"),
            "invalid type: string \"x\", expected u64"
        );
    }
}
