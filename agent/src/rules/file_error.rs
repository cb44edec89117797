//! Diagnostics for the policy file: the error type, and the line/column/section lookup
//! that turns a byte span (ours or the TOML parser's) into one message naming file, line,
//! field and value, with the fix where it is known. Kept apart from the parsing in
//! [`super::file`] so each stays readable on its own.

use super::units::ParseError;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::{Spanned, Value};

/// Why a policy file was rejected. `Display` is the whole one-line message:
///
/// ```text
/// /etc/sockmesh/policy.toml:12:19: rule #2 "payments db": connect_timeout = "5x": invalid timeout: unknown unit "x"; use h, m, s, ms, us or ns (valid examples: 500ms, 3s, off)
/// ```
///
/// The details are boxed (one pointer in every `Result`) and read through
/// `Deref`: `err.line`, `err.field`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError(Box<PolicyErrorDetail>);

/// Where and what: see [`PolicyError`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrorDetail {
    pub path: PathBuf,
    /// 1-based; 0 when the error is not about a place in the file (unreadable).
    pub line: usize,
    /// 1-based, in characters; 0 with `line`.
    pub column: usize,
    /// `[defaults]`, `rule #2 "payments db"`, or `None` at the top level.
    pub section: Option<String>,
    /// The key at fault (`connect_timeout`, `rule`, ...), when there is one.
    pub field: Option<String>,
    /// The offending value as written in the file (quotes included).
    pub value: Option<String>,
    /// What is wrong, with a valid example where one helps.
    pub message: String,
}

impl fmt::Display for PolicyErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if let Some(section) = &self.section {
            write!(f, ": {section}")?;
        }
        match (&self.field, &self.value) {
            // A table header is its own key: `[[rule]]`, not `rule = [[rule]]`.
            (_, Some(value)) if value.starts_with('[') => write!(f, ": {value}")?,
            (Some(field), Some(value)) => write!(f, ": {field} = {value}")?,
            (Some(field), None) => write!(f, ": {field}")?,
            (None, Some(value)) => write!(f, ": {value}")?,
            (None, None) => {}
        }
        write!(f, ": {}", self.message)
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for PolicyError {}

impl std::ops::Deref for PolicyError {
    type Target = PolicyErrorDetail;

    fn deref(&self) -> &PolicyErrorDetail {
        &self.0
    }
}

impl From<PolicyErrorDetail> for PolicyError {
    fn from(detail: PolicyErrorDetail) -> Self {
        PolicyError(Box::new(detail))
    }
}

impl PolicyError {
    /// The file could not be read at all (no place in it to point at).
    pub(super) fn unreadable(path: &Path, e: &std::io::Error) -> PolicyError {
        PolicyErrorDetail {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            section: None,
            field: None,
            value: None,
            message: format!("cannot read the policy file: {e}"),
        }
        .into()
    }
}

/// The file's text and path: what every located error needs.
pub(super) struct Doc<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
}

impl Doc<'_> {
    /// 1-based line and column (in characters) of a byte offset.
    pub(super) fn locate(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    pub(super) fn error(
        &self,
        span: Range<usize>,
        section: Option<&str>,
        field: &str,
        message: String,
    ) -> PolicyError {
        let (line, column) = self.locate(span.start);
        let value = self.text.get(span).map(|s| s.trim().to_string());
        PolicyErrorDetail {
            path: self.path.to_path_buf(),
            line,
            column,
            section: section.map(str::to_string),
            field: Some(field.to_string()),
            value: value.filter(|v| !v.is_empty()),
            message,
        }
        .into()
    }

    pub(super) fn value_error(
        &self,
        section: &str,
        field: &str,
        v: &Spanned<Value>,
        e: ParseError,
    ) -> PolicyError {
        self.error(
            v.span(),
            Some(section),
            field,
            format!(
                "invalid {}: {} (valid examples: {})",
                e.kind, e.reason, e.example
            ),
        )
    }

    /// A syntax or structure error from the TOML parser, located, with the key
    /// and value of the line it points at.
    pub(super) fn toml_error(&self, e: &toml::de::Error) -> PolicyError {
        let message = e.message().trim_end().to_string();
        let Some(span) = e.span() else {
            return PolicyErrorDetail {
                path: self.path.to_path_buf(),
                line: 0,
                column: 0,
                section: None,
                field: None,
                value: None,
                message,
            }
            .into();
        };
        let (line, column) = self.locate(span.start);
        let line_text = self.text.lines().nth(line - 1).unwrap_or("").trim();
        let (field, value) = key_and_value(line_text);
        let is_header = line_text.starts_with('[');
        let field = unknown_field(&message).or(field);
        let message = hint(&message, field.as_deref());
        PolicyErrorDetail {
            path: self.path.to_path_buf(),
            line,
            column,
            // On a header line the header is the value shown; naming it as the
            // section too would say it twice.
            section: if is_header {
                None
            } else {
                self.section_at(line)
            },
            field,
            value,
            message,
        }
        .into()
    }

    /// The table a line is in, from the headers above it (`[defaults]`,
    /// `rule #N`, or `None` at the top level).
    fn section_at(&self, line: usize) -> Option<String> {
        let mut section = None;
        let mut rules = 0;
        for l in self.text.lines().take(line) {
            let l = l.trim();
            if !l.starts_with('[') {
                continue;
            }
            let inner: String = l
                .split('#')
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            section = Some(if inner == "[[rule]]" {
                rules += 1;
                format!("rule #{rules}")
            } else {
                inner
            });
        }
        section
    }
}

/// `key = value` → (key, value); a `[header]` → (header name, header).
fn key_and_value(line: &str) -> (Option<String>, Option<String>) {
    if line.starts_with('[') {
        let name = line.trim_matches(|c: char| c == '[' || c == ']' || c.is_whitespace());
        return (Some(name.to_string()), Some(line.to_string()));
    }
    match line.split_once('=') {
        Some((k, v)) => {
            let k = k.trim().trim_matches('"');
            let v = v.trim();
            (
                (!k.is_empty()).then(|| k.to_string()),
                (!v.is_empty()).then(|| v.to_string()),
            )
        }
        None => (None, (!line.is_empty()).then(|| line.to_string())),
    }
}

/// The key named by serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(name, _)| name.to_string())
}

/// serde's wording made TOML's (keys, tables), plus the fix where it is known.
fn hint(message: &str, field: Option<&str>) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // "unknown field `x`, expected one of `a`, `b`" / "..., expected `a` or `b`"
        let (key, valid) = rest.split_once(", expected ").unwrap_or((rest, ""));
        let valid = valid.strip_prefix("one of ").unwrap_or(valid);
        let mut out = format!("unknown key {key}; valid keys here: {valid}");
        let names: Vec<&str> = valid.split('`').skip(1).step_by(2).collect();
        if let Some(close) = field.and_then(|f| closest(f, &names)) {
            out.push_str(&format!(" (did you mean `{close}`?)"));
        }
        return out;
    }
    match field {
        Some("rule") if message.starts_with("invalid type") => {
            format!("{message}; write each rule as a [[rule]] table (double brackets)")
        }
        Some("defaults") if message.contains("expected") => {
            "[defaults] is one table: write it with single brackets, once".to_string()
        }
        _ => message.to_string(),
    }
}

/// The valid key within edit distance 2 of `key`, if exactly one is closest.
fn closest<'a>(key: &str, valid: &[&'a str]) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for &v in valid {
        let d = edit_distance(key, v);
        if d <= 2 && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, v));
        }
    }
    best.map(|(_, v)| v)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::String(_) => "a string".into(),
        Value::Integer(_) => "an integer".into(),
        Value::Float(_) => "a float".into(),
        Value::Boolean(b) => format!("a boolean ({b})"),
        Value::Datetime(_) => "a date-time".into(),
        Value::Array(_) => "an array".into(),
        Value::Table(_) => "a table".into(),
    }
}
