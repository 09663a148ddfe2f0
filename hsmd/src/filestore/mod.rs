//! The token file store (issue 6): files of any size kept under the state
//! directory, each sealed chunk by chunk under its own data key, which a named
//! key wraps. This first part is the format ([`format`]) and the on-disk
//! layout ([`store`]); the protocol operations and `hsmctl file …` follow.

pub mod format;
pub mod service;
pub mod store;

pub use service::Files;
