//! The metrics writer: what the proxy records per connection and per peer ([`recorder`],
//! [`conn`]), what each pod's caps and shares refused ([`refusals`]), and the flush that
//! writes it into the pinned maps about once a second ([`flush`]), with each peer's names
//! ([`names`]). The readers (`sockmesh
//! stats|peers|pods`, `/metrics`) are in `crate::observe`, above the proxy; this sits below
//! it, so the proxy can record without knowing who reads.
pub mod conn;
pub mod flush;
pub mod names;
pub mod recorder;
pub mod refusals;
