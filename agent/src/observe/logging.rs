//! Log setup: `--log-level` (a level or a tracing filter) and `--log-format text|json`, always
//! on stderr (stdout carries the JSON lifecycle events).
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, message and every field (state
    /// changes carry an `event` field such as `breaker_opened`).
    Json,
}

/// The filter for `level`, with aya's BTF complaints kept quiet (bpf-linker 0.10 leaves BTF
/// the kernel rejects; aya then loads without it and says so at length on every start).
pub fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(format!("{level},aya::bpf=error"))
        .unwrap_or_else(|_| EnvFilter::new("info,aya::bpf=error"))
}

pub fn init(level: &str, format: LogFormat) {
    // Colours only for a person at a terminal: in a pod, stderr is the container log that
    // `kubectl logs` and log shippers read, where escape codes are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}
