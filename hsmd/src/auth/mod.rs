//! Who is on the other end of a connection, and whether they may connect at all.
//!
//! Identity comes only from the kernel (`SO_PEERCRED`) and the system user and
//! group databases; nothing a client says about itself is trusted.

mod access;
mod peer;

pub use access::{AccessGate, Admission};
pub use peer::{Credentials, PeerIdentity};
