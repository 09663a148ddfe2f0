//! Secret bytes on the wire (passphrases, key-file contents): zeroized when
//! dropped and never shown by `Debug`.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes that must not outlive their use or reach a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(#[serde(with = "serde_bytes")] Vec<u8>);

impl SecretBytes {
    /// Takes ownership of `bytes`.
    #[must_use]
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The secret itself; keep the borrow short.
    #[must_use]
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret).
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Grows `v` to hold `extra` more bytes; if its allocation has to move, the
/// old one is zeroed before it is freed, so a buffer that carried secrets
/// leaves no copy behind when it grows.
pub fn reserve_wiped(v: &mut Vec<u8>, extra: usize) {
    let needed = v.len().saturating_add(extra);
    if needed <= v.capacity() {
        return;
    }
    let mut bigger = Vec::with_capacity(needed.max(v.capacity().saturating_mul(2)));
    bigger.extend_from_slice(v);
    // Zeroes the whole old allocation (its spare capacity too), then frees it.
    v.zeroize();
    *v = bigger;
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = SecretBytes::new(b"hunter2".to_vec());
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("104"), "{shown}");
        assert_eq!(shown, "SecretBytes([redacted; 7 bytes])");
    }
}
