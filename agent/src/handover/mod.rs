//! Upgrade handover: a new agent takes the old one's listening sockets (SCM_RIGHTS over a
//! root-only unix socket) so no connection is refused while agents change.
pub mod client;
pub mod proto;
pub mod serve;
pub mod transport;

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
};

/// Sockets received from the agent being replaced, by netns cookie, taken by each pod as it
/// is prepared (the cookie is only known inside the pod's namespace).
pub type Handed = Arc<Mutex<HashMap<u64, proto::PodSockets<OwnedFd>>>>;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
