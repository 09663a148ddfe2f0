//! Custody of the master key: creating the keystore, unlocking and locking
//! it, its unlock slots, and the sealed PIN of a backend.

use protocol::{NewSlot, Reply, SecretBytes, UnlockSecret};

use super::{AuditSpec, Plan, Staged};
use crate::{
    audit::EventType,
    auth::permission::{KeystoreAction as A, Permission},
};

fn keystore(event: EventType, action: &'static str, risk: u8, security: bool) -> AuditSpec {
    AuditSpec::new(event, "keystore".to_owned(), action, risk, security)
}

pub(super) fn init(slot: NewSlot) -> Plan {
    Plan::custody(move |c| c.init(&slot).map(|slot| Reply::Initialized { slot }))
        .needs(Permission::Keystore(A::Init), None)
        .audited(keystore(EventType::KeystoreInitialized, "init", 5, true))
        .logged()
}

pub(super) fn unlock(secret: UnlockSecret) -> Plan {
    Plan::start(move |cx| {
        let uid = cx.caller.peer.creds.uid;
        cx.vault(move |v| {
            v.unlock(uid, &secret)
                .map(|(slot, warnings)| Reply::Unlocked { slot, warnings })
        })
    })
    .needs(Permission::Keystore(A::Unlock), None)
    .audited(keystore(EventType::Unlock, "unlock", 3, true))
    .logged()
}

/// The panic button: answered at once on the reactor, never queued behind
/// other work, and served while the audit log cannot be written.
pub(super) fn lock() -> Plan {
    Plan::start(|cx| {
        let result = cx.shared.vault.custody().lock().map_err(|e| e.to_wire());
        if result.is_ok() {
            tracing::info!(uid = cx.caller.peer.creds.uid, "locked: master key zeroized");
        }
        Staged::from(result.map(|()| Reply::Locked))
    })
    .needs(Permission::Keystore(A::Lock), None)
    .audited(keystore(EventType::Lock, "lock", 2, true).exempt())
}

pub(super) fn slot_list() -> Plan {
    Plan::custody(|c| c.slots().map(Reply::Slots))
        .needs(Permission::Keystore(A::SlotList), None)
        .audited(keystore(EventType::SlotList, "slot-list", 1, false))
}

pub(super) fn slot_add(slot: NewSlot) -> Plan {
    Plan::custody(move |c| c.add_slot(&slot).map(|slot| Reply::SlotAdded { slot }))
        .needs(Permission::Keystore(A::SlotAdd), None)
        .audited(keystore(EventType::SlotAdded, "slot-add", 6, true))
        .logged()
}

pub(super) fn slot_remove(id: u32) -> Plan {
    Plan::custody(move |c| c.remove_slot(id).map(|slot| Reply::SlotRemoved { slot }))
        .needs(Permission::Keystore(A::SlotRemove), None)
        .audited(keystore(EventType::SlotRemoved, "slot-remove", 6, true))
        .logged()
}

pub(super) fn backend_set_pin(backend: String, pin: SecretBytes) -> Plan {
    let spec = AuditSpec::new(
        EventType::BackendPinSet,
        format!("backend:{backend}"),
        "backend-pin",
        7,
        true,
    )
    .on_backend(Some(&backend));
    Plan::custody(move |c| {
        c.set_backend_pin(&backend, pin.expose())
            .map(|()| Reply::BackendPinSet { backend })
    })
    .needs(Permission::Keystore(A::BackendPin), None)
    .audited(spec)
    .logged()
}
