//! Process-wide memory hardening, done once at start before any secret exists:
//! lock all memory (present and future) so keys never reach swap, make the process
//! non-dumpable (no ptrace by same-uid processes, root-owned /proc entries), and
//! forbid core dumps.
//!
//! `mlockall(MCL_FUTURE)` under a small RLIMIT_MEMLOCK would make later
//! allocations (thread stacks, buffers) fail at random, which is worse than not
//! locking. So memory is locked only when the process may lock all of it:
//! CAP_IPC_LOCK, or an unlimited RLIMIT_MEMLOCK.

use std::fs;

use nix::sys::{
    mman::{mlockall, MlockAllFlags},
    prctl,
    resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY},
};
use thiserror::Error;

/// The stack of every thread hsmd starts (glibc's default is 8 MiB of
/// address space, Rust's 2 MiB). Under `mlockall` a thread's whole stack is
/// locked and resident from the start, so sixteen blocking threads and the
/// threads of sixteen file transfers at 2 MiB each would be over 100 MiB of
/// RAM; what these threads run (key operations, SQLite, sealing chunks, user
/// database lookups) needs a small part of this.
pub const THREAD_STACK: usize = 512 * 1024;

/// CAP_IPC_LOCK's bit in the capability sets (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

/// What hardening achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// Whether all memory is locked.
    pub locked: bool,
    /// Why it is not, when it is not.
    pub not_locked_because: Option<String>,
}

/// Hardening that must not be skipped failed.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Memory cannot be locked and the configuration requires it.
    #[error(
        "cannot lock memory: {0}. Run hsmd under hsmd.service (LimitMEMLOCK=infinity, \
         AmbientCapabilities=CAP_IPC_LOCK), or set memory.require_lock = false to run \
         with keys that may reach swap"
    )]
    Lock(String),
    /// The process could not be made non-dumpable or core dumps could not be disabled.
    #[error("cannot {what}: {source}")]
    Setting {
        /// What was attempted.
        what: &'static str,
        /// The system's error.
        #[source]
        source: nix::Error,
    },
}

/// Arenas glibc's allocator may keep (its default is 8 per core).
const ARENAS: i32 = 2;
/// Allocations from this size up are their own mappings, unmapped when
/// freed (glibc's default threshold starts at 128 KiB but rises after large
/// frees, up to 32 MiB, after which frame buffers stay in the heap for good).
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Bounds how much memory the allocator keeps. Every page hsmd touches is
/// locked (`mlockall`), so memory the allocator holds on to after a burst is
/// locked RAM: each thread arena reserves 64 MiB and keeps what it once
/// used, and large request buffers freed into the heap are never given
/// back. Two arenas and a fixed mmap threshold make the daemon's memory
/// follow what it uses now. Call before any thread starts.
pub fn bound_allocator() {
    // SAFETY: mallopt only sets glibc allocator parameters; it is called from
    // the main thread before any other thread exists, as glibc asks.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, ARENAS);
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Hardens the process. With `require_lock`, failure to lock memory is an error;
/// without it, a warning the caller logs.
///
/// # Errors
/// [`MemoryError`] when a required step fails.
pub fn harden(require_lock: bool) -> Result<Hardening, MemoryError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|source| MemoryError::Setting {
        what: "disable core dumps (RLIMIT_CORE=0)",
        source,
    })?;
    prctl::set_dumpable(false).map_err(|source| MemoryError::Setting {
        what: "make the process non-dumpable (PR_SET_DUMPABLE=0)",
        source,
    })?;
    let outcome = match lock_all() {
        Ok(()) => Hardening {
            locked: true,
            not_locked_because: None,
        },
        Err(why) if require_lock => return Err(MemoryError::Lock(why)),
        Err(why) => Hardening {
            locked: false,
            not_locked_because: Some(why),
        },
    };
    Ok(outcome)
}

fn lock_all() -> Result<(), String> {
    let capable = has_effective_capability(CAP_IPC_LOCK);
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|e| format!("cannot read RLIMIT_MEMLOCK: {e}"))?;
    if !capable && soft != RLIM_INFINITY {
        return Err(format!(
            "RLIMIT_MEMLOCK is {} KiB and the process lacks CAP_IPC_LOCK, too little to lock all of its memory",
            soft / 1024
        ));
    }
    mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE).map_err(|e| format!("mlockall failed: {e}"))
}

/// Whether the effective capability set (from /proc/self/status) holds `bit`.
fn has_effective_capability(bit: u32) -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_capabilities(&s))
        .is_some_and(|caps| caps & (1u64 << bit) != 0)
}

fn effective_capabilities(proc_status: &str) -> Option<u64> {
    proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_are_parsed_from_proc_status() {
        let root = "Name:\thsmd\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";
        let caps = effective_capabilities(root).unwrap();
        assert_ne!(caps & (1 << CAP_IPC_LOCK), 0);
        let user = "CapPrm:\t0000000000004000\nCapEff:\t0000000000000000\n";
        assert_eq!(
            effective_capabilities(user),
            Some(0),
            "CapPrm must not be mistaken for CapEff"
        );
        let ipc_only = "CapEff:\t0000000000004000\n";
        assert_eq!(effective_capabilities(ipc_only), Some(1 << CAP_IPC_LOCK));
        assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
        assert_eq!(effective_capabilities(""), None);
    }
}
