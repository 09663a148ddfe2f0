//! Backups of the keystore, and the transfers that carry archives in and out
//! in frame-sized parts.

use std::sync::Arc;

use protocol::{BackupProtection, Reply, UnlockSecret};

use super::{AuditSpec, Plan};
use crate::{
    audit::EventType,
    auth::permission::{KeystoreAction as A, Permission},
    keystore::{VaultError, MAX_ARCHIVE},
};

fn keystore(event: EventType, action: &'static str, risk: u8, security: bool) -> AuditSpec {
    AuditSpec::new(event, "keystore".to_owned(), action, risk, security)
}

pub(super) fn create(protection: BackupProtection) -> Plan {
    Plan::start(move |cx| {
        let (transfers, uid) = (Arc::clone(&cx.shared.transfers), cx.caller.peer.creds.uid);
        cx.vault(move |v| {
            let (archive, manifest) = v.create_backup(&protection)?;
            let size = archive.len() as u64;
            let transfer = transfers.offer(uid, archive).map_err(VaultError::Wire)?;
            Ok(Reply::BackupReady {
                transfer,
                size,
                manifest,
            })
        })
    })
    .needs(Permission::Keystore(A::Backup), None)
    .audited(keystore(EventType::BackupCreated, "backup", 6, true))
    .logged()
}

/// Reading a transfer offered to the caller needs no permission: only its
/// uid can read it.
pub(super) fn transfer_read(transfer: u64, offset: u64, len: u32) -> Plan {
    Plan::start(move |cx| {
        // Room for the reply's framing within the frame limit.
        let max = (cx.shared.limits.max_frame_bytes as usize).saturating_sub(1024);
        cx.shared
            .transfers
            .read(cx.caller.peer.creds.uid, transfer, offset, len, max)
            .map(|bytes| Reply::TransferData { bytes })
            .into()
    })
}

/// Starting an upload takes the permission the archive will be used with.
pub(super) fn transfer_begin(size: u64) -> Plan {
    Plan::start(move |cx| {
        cx.shared
            .transfers
            .begin(cx.caller.peer.creds.uid, size, MAX_ARCHIVE)
            .map(|transfer| Reply::TransferStarted { transfer })
            .into()
    })
    .needs(Permission::Keystore(A::Backup), None)
}

pub(super) fn transfer_write(transfer: u64, offset: u64, bytes: Vec<u8>) -> Plan {
    Plan::start(move |cx| {
        cx.shared
            .transfers
            .write(cx.caller.peer.creds.uid, transfer, offset, &bytes)
            .map(|received| Reply::TransferAck { received })
            .into()
    })
}

pub(super) fn verify(transfer: u64, secret: Option<UnlockSecret>) -> Plan {
    Plan::start(move |cx| {
        let uid = cx.caller.peer.creds.uid;
        let archive = match cx.shared.transfers.take(uid, transfer) {
            Ok(a) => a,
            Err(e) => return Err(e).into(),
        };
        cx.vault(move |v| {
            v.verify_backup(uid, &archive, secret.as_ref())
                .map(Reply::BackupVerified)
        })
    })
    .needs(Permission::Keystore(A::Backup), None)
    .audited(keystore(EventType::BackupVerified, "backup-verify", 1, false))
}

pub(super) fn restore(transfer: u64, secret: UnlockSecret, force: bool) -> Plan {
    Plan::start(move |cx| {
        let uid = cx.caller.peer.creds.uid;
        let archive = match cx.shared.transfers.take(uid, transfer) {
            Ok(a) => a,
            Err(e) => return Err(e).into(),
        };
        cx.vault(move |v| v.restore_backup(uid, &archive, &secret, force).map(Reply::Restored))
    })
    .needs(Permission::Keystore(A::Restore), None)
    .audited(keystore(EventType::BackupRestored, "restore", 9, true))
    .logged()
}

/// What a whole-state backup copies from and a restore writes to.
fn sources(cx: &super::Ctx) -> crate::backup::Sources {
    crate::backup::Sources {
        vault: Arc::clone(&cx.shared.vault),
        files: cx.shared.files.clone(),
        audit: cx.shared.audit.clone(),
    }
}

/// A format-3 archive of the whole state, written to the caller's descriptor
/// on a thread of its own.
pub(super) fn write(protection: BackupProtection, contents: protocol::BackupContents) -> Plan {
    Plan::start(move |mut cx| {
        let out = match super::passed(cx.attached.take(), "backup-write") {
            Ok(f) => f,
            Err(e) => return Err(e).into(),
        };
        let sources = sources(&cx);
        cx.transfer(move || crate::backup::write(&sources, &protection, contents, out).map(Reply::BackupWritten))
    })
    .needs(Permission::Keystore(A::Backup), None)
    .audited(keystore(EventType::BackupCreated, "backup", 6, true))
    .logged()
}

/// A format-3 archive read from the caller's descriptor and checked.
pub(super) fn check(secret: Option<UnlockSecret>) -> Plan {
    Plan::start(move |mut cx| {
        let input = match super::passed(cx.attached.take(), "backup-check") {
            Ok(f) => f,
            Err(e) => return Err(e).into(),
        };
        let (vault, uid) = (Arc::clone(&cx.shared.vault), cx.caller.peer.creds.uid);
        cx.transfer(move || crate::backup::check(&vault, uid, input, secret.as_ref()).map(Reply::BackupChecked))
    })
    .needs(Permission::Keystore(A::Backup), None)
    .audited(keystore(EventType::BackupVerified, "backup-verify", 1, false))
}

/// A format-3 archive read from the caller's descriptor and restored.
pub(super) fn restore_archive(secret: UnlockSecret, force: bool, accept_unusable: bool) -> Plan {
    Plan::start(move |mut cx| {
        let input = match super::passed(cx.attached.take(), "backup-restore-archive") {
            Ok(f) => f,
            Err(e) => return Err(e).into(),
        };
        let sources = sources(&cx);
        let uid = cx.caller.peer.creds.uid;
        cx.transfer(move || {
            let asked = crate::backup::restore::Asked {
                secret: &secret,
                force,
                accept_unusable,
            };
            crate::backup::restore::restore(&sources, uid, input, &asked)
                .map(|r| Reply::BackupRestoredArchive(Box::new(r)))
        })
    })
    .needs(Permission::Keystore(A::Restore), None)
    .audited(keystore(EventType::BackupRestored, "restore", 9, true))
    .logged()
}
