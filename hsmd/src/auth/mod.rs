//! Who is on the other end of a connection, whether they may connect at all,
//! what they may do once connected (the policy), and how fast (rate limits).
//!
//! Identity comes only from the kernel (`SO_PEERCRED`) and the system user and
//! group databases; nothing a client says about itself is trusted.

mod access;
pub mod lookups;
mod peer;
pub mod permission;
pub mod policy;
pub mod rate;

pub use access::{AccessGate, Admission};
pub use peer::{Credentials, PeerIdentity};
