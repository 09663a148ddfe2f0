//! The keystore keeps the audit log's anchors (see [`crate::audit`]): where
//! the chain ends and where the retained log begins, so a log cut at either
//! end is found.

use crate::audit::{AnchorStore, Anchors, Head, Start};

use super::{lock, Vault};

impl AnchorStore for Vault {
    fn load(&self) -> Result<Anchors, String> {
        let (head, start) = lock(&self.store).audit_anchors().map_err(|e| e.to_string())?;
        Ok(Anchors {
            head: head.map(|(seq, hash)| Head { seq, hash }),
            start: start.map(|(seq, prev_hash)| Start { seq, prev_hash }),
        })
    }

    fn store(&self, head: &Head, start: &Start) -> Result<(), String> {
        lock(&self.store)
            .set_audit_anchors((head.seq, &head.hash), (start.seq, &start.prev_hash))
            .map_err(|e| e.storage_cause().unwrap_or_else(|| e.to_string()))
    }
}
