//! Deterministic tests for the policy configuration: flags, the policy file and its
//! errors, rule matching, reload and the file watch.

mod file;
mod flags;
mod hostile;
mod identity;
mod reload;
mod rules;
mod units;
mod watch;
