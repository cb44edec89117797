//! The human-unit parsers shared by CLI flags and the policy file, and the matching
//! formatters (a value prints the way it is written).
//!
//! Accepted spellings (anything else is one [`ParseError`] naming the value and
//! showing a valid example):
//!
//! * **duration** — one or more `<number><unit>` groups, units strictly
//!   decreasing: `500ms`, `2s`, `1m30s`, `1h30m`, `1.5s`, `250us`. Units: `h`, `m`,
//!   `s`, `ms`, `us` (or `µs`/`μs`), `ns`; case-sensitive (`m` is minutes, `ms`
//!   milliseconds). A number may have up to 9 decimal places. A bare `0` is zero.
//! * **timeout** — a duration > 0, or `off` / `none` to disable.
//! * **size** (bytes) — `<number>[unit]`, case-insensitive: none or `B` = 1;
//!   `k`/`KB`, `M`/`MB`, `G`/`GB`, `T`/`TB` = 1000^n; `Ki`/`KiB`, `Mi`/`MiB`,
//!   `Gi`/`GiB`, `Ti`/`TiB` = 1024^n. Decimals allowed (`1.5MiB`), rounded down to
//!   a whole byte. Bits (`Mbit`) are not accepted.
//! * **rate** — `<count>/<period>`, count a whole number ≥ 1, period `s`, `m`, `h`
//!   or a duration: `100/s`, `6000/m`, `5/10s`. Periods up to 24 h.
//! * **bandwidth** — `<size>/<period>`: `10MiB/s`, `1.5MB/s`, `100k/s`.
//!
//! Number and unit must be adjacent; surrounding whitespace is ignored.

use crate::policy::token_bucket::{Rate, MAX_RATE_PERIOD};
use std::fmt;
use std::time::Duration;

/// A value that does not parse. `Display` is the whole message, e.g.
/// `invalid duration "5x": unknown unit "x" (valid examples: 500ms, 2s, 1m30s)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub kind: &'static str,
    pub input: String,
    pub reason: String,
    pub example: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?}: {} (valid examples: {})",
            self.kind, self.input, self.reason, self.example
        )
    }
}

impl std::error::Error for ParseError {}

const DURATION_EX: &str = "500ms, 2s, 1m30s";
const TIMEOUT_EX: &str = "500ms, 3s, off";
const SIZE_EX: &str = "512KiB, 10MiB, 1MB";
const RATE_EX: &str = "100/s, 6000/m, 5/10s";
const BANDWIDTH_EX: &str = "10MiB/s, 1.5MB/s, 100k/s";

fn error(
    kind: &'static str,
    input: &str,
    reason: impl Into<String>,
    ex: &'static str,
) -> ParseError {
    ParseError {
        kind,
        input: input.to_string(),
        reason: reason.into(),
        example: ex,
    }
}

const DURATION_UNITS: [(&str, u64); 8] = [
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("µs", 1_000), // U+00B5 MICRO SIGN
    ("μs", 1_000), // U+03BC GREEK SMALL LETTER MU
    ("ns", 1),
];

pub fn parse_duration(input: &str) -> Result<Duration, ParseError> {
    let err = |reason: String| error("duration", input, reason, DURATION_EX);
    let s = input.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err("empty value".into()));
    }
    let mut rest = s;
    let mut total: u64 = 0;
    let mut previous_unit = u64::MAX;
    while !rest.is_empty() {
        let (number, after) = split_number(rest).map_err(err)?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        let scale = match DURATION_UNITS.iter().find(|(name, _)| *name == unit) {
            Some((_, scale)) => *scale,
            None if unit.is_empty() => return Err(err(format!("missing unit after {number}"))),
            None => {
                return Err(err(format!(
                    "unknown unit {unit:?}; use h, m, s, ms, us or ns"
                )))
            }
        };
        if scale >= previous_unit {
            return Err(err(format!(
                "unit {unit:?} repeated or out of order; largest first"
            )));
        }
        previous_unit = scale;
        let ns = scaled(number, scale).ok_or_else(|| err("too large".into()))?;
        total = total
            .checked_add(ns)
            .ok_or_else(|| err("too large".into()))?;
        rest = &after[unit_len..];
    }
    Ok(Duration::from_nanos(total))
}

/// A duration > 0, or `off` / `none` for a disabled timeout.
pub fn parse_timeout(input: &str) -> Result<Option<Duration>, ParseError> {
    let s = input.trim();
    if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let d = parse_duration(s).map_err(|e| error("timeout", input, e.reason, TIMEOUT_EX))?;
    if d.is_zero() {
        return Err(error(
            "timeout",
            input,
            "must be > 0; use off to disable",
            TIMEOUT_EX,
        ));
    }
    Ok(Some(d))
}

pub fn parse_size(input: &str) -> Result<u64, ParseError> {
    parse_size_as("size", input, SIZE_EX)
}

fn parse_size_as(kind: &'static str, input: &str, ex: &'static str) -> Result<u64, ParseError> {
    let err = |reason: String| error(kind, input, reason, ex);
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty value".into()));
    }
    let (number, unit) = split_number(s).map_err(err)?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => {
            return Err(err(format!(
                "unknown unit {unit:?}; use B, KB, MB, GB, KiB, MiB or GiB"
            )))
        }
    };
    scaled(number, scale).ok_or_else(|| err("too large".into()))
}

pub fn parse_rate(input: &str) -> Result<Rate, ParseError> {
    let err = |reason: String| error("rate", input, reason, RATE_EX);
    let (count, period) = split_rate(input.trim()).map_err(err)?;
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("count {count:?} must be a whole number")));
    }
    let tokens: u64 = count.parse().map_err(|_| err("count too large".into()))?;
    make_rate(tokens, period).map_err(err)
}

pub fn parse_bandwidth(input: &str) -> Result<Rate, ParseError> {
    let err = |reason: String| error("bandwidth", input, reason, BANDWIDTH_EX);
    let (size, period) = split_rate(input.trim()).map_err(err)?;
    let bytes = parse_size_as("bandwidth", size, BANDWIDTH_EX).map_err(|e| err(e.reason))?;
    make_rate(bytes, period).map_err(err)
}

/// `1h30m`, `1s500ms`, `0s`: the shortest spelling `parse_duration` reads back
/// exactly.
pub fn format_duration(d: Duration) -> String {
    let mut ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (name, scale) in DURATION_UNITS.iter().filter(|(n, _)| n.is_ascii()) {
        let scale = u128::from(*scale);
        if ns >= scale {
            out.push_str(&format!("{}{}", ns / scale, name));
            ns %= scale;
        }
    }
    out
}

/// Bytes in the largest unit that divides them exactly (`10MiB`, `1500B`).
#[cfg(test)]
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 8] = [
        ("TiB", 1 << 40),
        ("TB", 1_000_000_000_000),
        ("GiB", 1 << 30),
        ("GB", 1_000_000_000),
        ("MiB", 1 << 20),
        ("MB", 1_000_000),
        ("KiB", 1 << 10),
        ("KB", 1_000),
    ];
    UNITS
        .iter()
        .find(|(_, scale)| bytes != 0 && bytes.is_multiple_of(*scale))
        .map(|(name, scale)| format!("{}{}", bytes / scale, name))
        .unwrap_or_else(|| format!("{bytes}B"))
}

/// A parsed decimal number: integer digits and (possibly empty) fraction digits.
#[derive(Copy, Clone)]
struct Number<'a> {
    int: &'a str,
    frac: &'a str,
}

impl fmt::Display for Number<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.frac.is_empty() {
            f.write_str(self.int)
        } else {
            write!(f, "{}.{}", self.int, self.frac)
        }
    }
}

/// Splits a leading `digits[.digits]` off `s`.
fn split_number(s: &str) -> Result<(Number<'_>, &str), String> {
    let digits = |t: &str| t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (int, rest) = s.split_at(digits(s));
    if int.is_empty() {
        let found = rest
            .chars()
            .next()
            .map_or("end of input".to_string(), |c| format!("{c:?}"));
        return Err(format!("expected a number, found {found}"));
    }
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let len = digits(after);
            if len == 0 {
                return Err("missing digits after '.'".into());
            }
            if len > 9 {
                return Err("more than 9 decimal places".into());
            }
            after.split_at(len)
        }
        None => ("", rest),
    };
    Ok((Number { int, frac }, rest))
}

/// `number * scale`, rounded down, or `None` if it does not fit in a `u64`.
fn scaled(number: Number<'_>, scale: u64) -> Option<u64> {
    let int: u128 = number.int.parse().ok()?;
    let mut value = int.checked_mul(u128::from(scale))?;
    if !number.frac.is_empty() {
        let frac: u128 = number.frac.parse().ok()?;
        let denominator = 10u128.pow(number.frac.len() as u32);
        value = value.checked_add(frac * u128::from(scale) / denominator)?;
    }
    u64::try_from(value).ok()
}

fn split_rate(s: &str) -> Result<(&str, &str), String> {
    match s.split_once('/') {
        Some((amount, period)) if !amount.is_empty() && !period.is_empty() => Ok((amount, period)),
        _ => Err("expected <amount>/<period>".into()),
    }
}

fn make_rate(tokens: u64, period: &str) -> Result<Rate, String> {
    if tokens == 0 {
        return Err("amount must be at least 1; leave the limit unset to disable it".into());
    }
    let per = match period {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => parse_duration(period).map_err(|e| format!("period: {}", e.reason))?,
    };
    if per.is_zero() || per > MAX_RATE_PERIOD {
        return Err(format!(
            "period must be > 0 and at most {}",
            format_duration(MAX_RATE_PERIOD)
        ));
    }
    Rate::new(tokens, per).ok_or_else(|| "invalid rate".to_string())
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The same spelling `parse_rate` accepts: a bare unit for 1 s / 1 m / 1 h.
        match self.per().as_nanos() {
            1_000_000_000 => write!(f, "{}/s", self.tokens()),
            60_000_000_000 => write!(f, "{}/m", self.tokens()),
            3_600_000_000_000 => write!(f, "{}/h", self.tokens()),
            _ => write!(f, "{}/{}", self.tokens(), format_duration(self.per())),
        }
    }
}
