//! Where each peer's policy comes from: the flags (`PolicyArgs`), the policy file and its
//! errors, the knobs' value parsers (shared by both, so both accept the same spellings), rule
//! matching (`PolicySet`: which rule wins for a pod, direction and peer), Istio
//! DestinationRules as a layer between the file's defaults and its rules (`istio`), and reload and the
//! file watch that swap the set while the agent runs. Below it, `crate::policy` applies the
//! resolved [`PeerPolicy`](crate::policy::PeerPolicy) and knows nothing of where it came from.

pub mod file;
mod file_error;
pub mod flags;
pub mod ident_match;
pub mod istio;
pub mod knobs;
pub mod reload;
pub mod set;
pub mod units;
pub mod watch;

#[cfg(test)]
mod tests;

pub use flags::{OrOff, PolicyArgs};
pub use reload::PolicyHandle;
pub use units::parse_duration;
pub use watch::PolicyWatcher;
