//! The token file store: files sealed under a key's data key, stored and
//! retrieved in chunks over the socket or whole through a passed descriptor.

use std::{os::fd::OwnedFd, sync::Arc};

use protocol::{ErrorCode, Reply, SecretBytes, WireError};

use super::{AuditSpec, Ctx, Need, Plan, Staged};
use crate::{
    audit::EventType,
    auth::permission::{FileAction as A, KeyAction, Permission},
    filestore::Files,
    keystore::Vault,
    shares::Share,
};

/// What a file operation is given when it runs.
struct FileCx {
    files: Arc<Files>,
    vault: Arc<Vault>,
    /// The caller's uid and connection (chunked sessions belong to both).
    who: (u32, u64),
    /// Whether the caller has `files:admin`: may use files others stored.
    any: bool,
    attached: Option<OwnedFd>,
    place: Option<Share>,
    /// The daemon's frame limit, which a chunk must fit.
    max_frame: u32,
}

impl FileCx {
    /// The descriptor the request came with.
    fn passed(&mut self, what: &str) -> Result<std::fs::File, WireError> {
        super::passed(self.attached.take(), what)
    }

    fn place(&mut self) -> Result<Share, WireError> {
        self.place
            .take()
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "a descriptor transfer came without its place"))
    }
}

/// Whether a file operation waits on a descriptor the caller passed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Pool,
    Descriptor,
}

/// A file operation, run on the pool (or, for a descriptor, a thread of its own).
fn file_op(via: Via, f: impl FnOnce(FileCx) -> Result<Reply, WireError> + Send + 'static) -> Plan {
    Plan::start(move |cx: Ctx<'_>| {
        let Some(files) = cx.shared.files.clone() else {
            return Err(WireError::new(ErrorCode::NotAvailable, "the file store is not open")).into();
        };
        let uid = cx.caller.peer.creds.uid;
        let any = cx
            .shared
            .policy()
            .check(&cx.caller.peer, Permission::Files(A::Admin).on(None), "soft", || None)
            .is_ok();
        let mut fcx = FileCx {
            files: Arc::clone(&files),
            vault: Arc::clone(&cx.shared.vault),
            who: (uid, cx.caller.connection_id),
            any,
            attached: cx.attached,
            place: None,
            max_frame: cx.shared.limits.max_frame_bytes,
        };
        if via == Via::Descriptor {
            // Its place is taken here, so a uid over its share is told at
            // once and no thread is started for it.
            match files.transfer_place(uid) {
                Ok(p) => fcx.place = Some(p),
                Err(busy) => return Err(busy).into(),
            }
            return Staged::Transfer(Box::new(move || f(fcx).into()));
        }
        Staged::Blocking(Box::new(move || f(fcx).into()))
    })
}

/// Storing wraps the file's data key with the key it names: that is
/// encrypting with it, so it takes `keys:encrypt` on that key too.
fn store_needs(plan: Plan, key: &str) -> Plan {
    let mut plan = plan.needs(Permission::Files(A::Store), None);
    plan.also = Some(Need {
        permission: Permission::Keys(KeyAction::Encrypt),
        key: Some(key.to_owned()),
        backend: None,
    });
    plan
}

/// The wrapping key is the resource: `audit show --key K` finds the files K
/// wrapped, and a refusal names the key it was about.
pub(super) fn store_fd(name: String, key: String, chunk_size: u32) -> Plan {
    let spec = AuditSpec::new(EventType::FileStored, format!("key:{key}"), "store", 2, false);
    let plan = file_op(Via::Descriptor, {
        let key = key.clone();
        move |mut f| {
            let input = f.passed("file-store")?;
            let place = f.place()?;
            f.files
                .store_fd(f.vault.keys(), f.who.0, (&name, &key, chunk_size), &input, place)
                .map(Reply::File)
        }
    });
    store_needs(plan, &key).audited(spec)
}

pub(super) fn retrieve_fd(token: String) -> Plan {
    let spec = AuditSpec::new(EventType::FileRetrieved, format!("file:{token}"), "retrieve", 2, false);
    file_op(Via::Descriptor, move |mut f| {
        let output = f.passed("file-retrieve")?;
        let place = f.place()?;
        f.files
            .retrieve_fd(f.vault.keys(), f.who.0, &token, f.any, &output, place)
            .map(Reply::File)
    })
    .needs(Permission::Files(A::Retrieve), None)
    .audited(spec)
}

pub(super) fn store_begin(name: String, key: String, chunk_size: u32) -> Plan {
    let spec = AuditSpec::new(EventType::FileStoreStarted, format!("key:{key}"), "store", 1, false);
    let plan = file_op(Via::Pool, {
        let key = key.clone();
        move |f| {
            let room = f.max_frame.saturating_sub(1024);
            if chunk_size > room {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "a chunk of {chunk_size} bytes does not fit hsmd's frame limit of {} bytes; use at most \
                         {room} (or raise limits.max_frame_bytes)",
                        f.max_frame
                    ),
                ));
            }
            f.files
                .begin_store(f.vault.keys(), f.who, &name, &key, chunk_size)
                .map(|(session, info)| Reply::FileSession { session, info })
        }
    });
    store_needs(plan, &key).audited(spec)
}

pub(super) fn store_chunk(session: u64, index: u64, last: bool, bytes: SecretBytes) -> Plan {
    file_op(Via::Pool, move |f| {
        f.files
            .store_chunk(f.who.0, session, index, last, bytes.expose())
            .map(|index| Reply::FileChunkStored { index })
    })
    .needs(Permission::Files(A::Store), None)
}

pub(super) fn store_finish(session: u64) -> Plan {
    file_op(Via::Pool, move |f| {
        f.files.finish_store(f.who.0, session).map(Reply::File)
    })
    .needs(Permission::Files(A::Store), None)
    .audited(AuditSpec::new(EventType::FileStored, "files".into(), "store", 2, false))
}

pub(super) fn retrieve_begin(token: String) -> Plan {
    let spec = AuditSpec::new(EventType::FileRetrieved, format!("file:{token}"), "retrieve", 2, false);
    file_op(Via::Pool, move |f| {
        f.files
            .begin_retrieve(f.vault.keys(), f.who, &token, f.any)
            .map(|(session, info)| Reply::FileSession { session, info })
    })
    .needs(Permission::Files(A::Retrieve), None)
    .audited(spec)
}

pub(super) fn retrieve_next(session: u64) -> Plan {
    file_op(Via::Pool, move |f| {
        f.files
            .retrieve_next(f.who.0, session)
            .map(|(index, last, bytes)| Reply::FileChunk {
                index,
                last,
                bytes: SecretBytes::new(bytes.to_vec()),
            })
    })
    .needs(Permission::Files(A::Retrieve), None)
}

pub(super) fn list() -> Plan {
    file_op(Via::Pool, |f| f.files.list(f.who.0, f.any).map(Reply::Files))
        .needs(Permission::Files(A::List), None)
        .audited(AuditSpec::new(EventType::FileList, "files".into(), "list", 1, false))
}

pub(super) fn info(token: String) -> Plan {
    let spec = AuditSpec::new(EventType::FileInfo, format!("file:{token}"), "info", 1, false);
    file_op(Via::Pool, move |f| {
        f.files.info(f.who.0, &token, f.any).map(Reply::File)
    })
    .needs(Permission::Files(A::Info), None)
    .audited(spec)
}

pub(super) fn delete(token: String) -> Plan {
    let spec = AuditSpec::new(EventType::FileDeleted, format!("file:{token}"), "delete", 4, true);
    file_op(Via::Pool, move |f| {
        f.files
            .delete(f.who.0, &token, f.any)
            .map(|()| Reply::FileDeleted { token })
    })
    .needs(Permission::Files(A::Delete), None)
    .audited(spec)
}
