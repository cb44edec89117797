//! The pods: each one's namespace, worker thread and in-pod listeners, and their
//! lifecycle: enrolment and removal at runtime, noticing a namespace go away, which of their
//! ports are captured, and finding a Kubernetes pod's namespace from its UID.
pub mod captured;
pub mod idle;
pub mod live_bytes;
pub mod liveness;
pub mod manager;
pub mod pod;
pub mod resolver;
