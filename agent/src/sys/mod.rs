//! Operating-system primitives every layer above may use, and which use nothing of the agent:
//! network namespaces and the threads that live in them, the agent's own sockets, a
//! namespace's listening sockets and idle connections (sock_diag), datagrams with the kernel's drop count, inotify,
//! clocks, the open-file limit, capabilities, and the one way the agent takes a lock.
pub mod caps;
pub mod clock;
pub mod dgram;
pub mod inotify;
pub mod lock;
pub mod netns;
pub mod rlimit;
pub mod sockdiag;
pub mod sockdiag_idle;
pub mod sockets;
