//! Everything that lives inside a pod's network namespace: the namespace handle and its
//! worker thread, the agent's marked sockets, and the pod's listeners; and the pods'
//! lifecycle: enrolment and removal at runtime, noticing a namespace go away, and finding a
//! Kubernetes pod's namespace from its UID.
pub mod liveness;
pub mod manager;
pub mod netns;
pub mod pod;
pub mod resolver;
pub mod sockets;
