//! Everything that lives inside a pod's network namespace: the namespace handle and its
//! worker thread, the agent's marked sockets, and the pod's listeners.
pub mod netns;
pub mod pod;
pub mod sockets;
