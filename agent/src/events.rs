//! Lifecycle events as JSON lines on stdout (logs go to stderr): a supervisor, a test or a
//! script can wait for `ready` or `inbound_listening` without scraping logs.
use std::io::Write;

pub fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}
