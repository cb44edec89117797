//! Upgrade handover: a new agent takes the old one's listening sockets (SCM_RIGHTS over a
//! root-only unix socket) so no connection is refused while agents change.
pub mod proto;
pub mod transport;

#[cfg(test)]
mod tests;
