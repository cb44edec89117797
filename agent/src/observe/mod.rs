//! Observability: per-peer figures recorded by the proxy and flushed to the pinned maps, the
//! readers (`sockmesh stats|peers|pods`, `/metrics`) built on one snapshot of those maps, the
//! metrics HTTP endpoint, and log setup.
pub mod cli;
pub mod flush;
pub mod http;
pub mod logging;
pub mod prom;
pub mod recorder;
pub mod sink;
pub mod table;
pub mod view;
