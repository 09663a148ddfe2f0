//! hsmd, the local hardware-security-module daemon, as a library so tests can
//! drive its parts; `main.rs` is a thin command line over [`daemon`].
//!
//! A request flows one way: [`server`] (listener, connection) → [`auth`] (who is
//! it, may they connect) → [`ops::pipeline`] (may they do this; run it; audit
//! it; count it) → the operation's entry in [`ops`] → [`keystore`],
//! [`filestore`], [`backend`] → the response.

/// The daemon's package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod aead;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod backup;
pub mod budget;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod filestore;
pub mod keystore;
pub mod logging;
pub mod maintenance;
pub mod manpage;
pub mod metrics;
pub mod ops;
pub mod reload;
pub mod secure_mem;
pub mod server;
pub mod shares;
pub mod systemd;
