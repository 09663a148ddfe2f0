//! The token file store: files of any size kept under the state directory,
//! each sealed chunk by chunk under its own data key, which a named key wraps.
//! `format` is the cryptography, `store` the on-disk layout, [`pipeline`]
//! the parallel path between a caller's descriptor and the store, [`service`]
//! the operations `ops::files` calls.

pub mod format;
pub mod pipeline;
pub mod service;
pub mod store;

pub use service::Files;
