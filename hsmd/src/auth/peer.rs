use std::{ffi::CString, fs, path::PathBuf};

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
use protocol::GroupInfo;

/// What the kernel reported for the peer at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Process id (may be absent on exotic sockets).
    pub pid: Option<u32>,
}

/// The peer resolved against the system databases.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// Kernel-reported credentials.
    pub creds: Credentials,
    /// User name, if the uid has one.
    pub user: Option<String>,
    /// Primary group.
    pub group: GroupInfo,
    /// Every group the user is in (primary first).
    pub groups: Vec<GroupInfo>,
    /// The peer's executable, read from /proc (best effort: it may have exited).
    pub executable: Option<PathBuf>,
}

impl PeerIdentity {
    /// Looks the peer up in the user and group databases. Blocking (NSS may go to
    /// disk or the network): call it off the reactor.
    #[must_use]
    pub fn resolve(creds: Credentials) -> Self {
        let user = User::from_uid(Uid::from_raw(creds.uid)).ok().flatten();
        let primary = Gid::from_raw(creds.gid);
        // The kernel's gid is authoritative for the primary group; the database
        // adds supplementary groups, as the login process would have set them.
        let mut gids = vec![primary];
        if let Some(name) = user.as_ref().and_then(|u| CString::new(u.name.as_bytes()).ok()) {
            if let Ok(list) = getgrouplist(&name, primary) {
                gids.extend(list.into_iter().filter(|g| *g != primary));
            }
        }
        let groups: Vec<GroupInfo> = gids.into_iter().map(group_info).collect();
        let executable = creds.pid.and_then(|pid| fs::read_link(format!("/proc/{pid}/exe")).ok());
        Self {
            creds,
            user: user.map(|u| u.name),
            group: groups[0].clone(),
            groups,
            executable,
        }
    }

    /// Resolves a user given by name or uid, as if they had connected (for
    /// `hsmctl policy check`). Blocking, as [`PeerIdentity::resolve`].
    #[must_use]
    pub fn lookup(user: &str) -> Option<Self> {
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
            Err(_) => User::from_name(user).ok().flatten(),
        };
        let (uid, gid) = match (found, user.parse::<u32>()) {
            (Some(u), _) => (u.uid.as_raw(), u.gid.as_raw()),
            // A uid without a user entry still has an identity.
            (None, Ok(uid)) => (uid, uid),
            (None, Err(_)) => return None,
        };
        let mut peer = Self::resolve(Credentials { uid, gid, pid: None });
        peer.executable = None;
        Some(peer)
    }

    /// `name (uid N)` or `uid N`, for logs.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.user {
            Some(name) => format!("{name} (uid {})", self.creds.uid),
            None => format!("uid {}", self.creds.uid),
        }
    }
}

fn group_info(gid: Gid) -> GroupInfo {
    GroupInfo {
        gid: gid.as_raw(),
        name: Group::from_gid(gid).ok().flatten().map(|g| g.name),
    }
}
