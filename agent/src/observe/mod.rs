//! The readers of what the agent and the kernel counted: `sockmesh stats|peers|pods` and
//! `/metrics`, built on one snapshot of the pinned maps, the metrics HTTP endpoint, and log
//! setup. What writes those figures (the recorder and its flush) is `crate::telemetry`.
pub mod cli;
pub mod group;
pub mod http;
pub mod logging;
pub mod maps;
pub mod prom;
pub mod table;
pub mod view;
