use std::collections::BTreeMap;

use nix::unistd::{Group, User};

use super::PeerIdentity;
use crate::config::AccessConfig;

/// The connect-time gate, with names resolved to ids once at start.
#[derive(Debug, Clone)]
pub struct AccessGate {
    allow_root: bool,
    users: BTreeMap<u32, String>,
    groups: BTreeMap<u32, String>,
}

/// The gate's verdict on a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Let in, with the reason (shown by `hsmctl whoami`).
    Admitted(String),
    /// Refused, with what would have let them in.
    Refused(String),
}

impl AccessGate {
    /// Resolves the configured names. Entries that name no user or group are
    /// returned as warnings and admit nobody.
    #[must_use]
    pub fn from_config(config: &AccessConfig) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let mut users = BTreeMap::new();
        for entry in &config.users {
            match resolve_user(entry) {
                Some((uid, label)) => {
                    users.insert(uid, label);
                }
                None => warnings.push(format!(
                    "access.users: no user named {entry:?}; the entry admits nobody"
                )),
            }
        }
        let mut groups = BTreeMap::new();
        for entry in &config.groups {
            match resolve_group(entry) {
                Some((gid, label)) => {
                    groups.insert(gid, label);
                }
                None => warnings.push(format!(
                    "access.groups: no group named {entry:?}; the entry admits nobody (create it, e.g. with systemd-sysusers)"
                )),
            }
        }
        (
            Self {
                allow_root: config.allow_root,
                users,
                groups,
            },
            warnings,
        )
    }

    /// The `hsmd --dev` gate: the uid that started the daemon, and root.
    #[must_use]
    pub fn dev(owner_uid: u32) -> Self {
        Self {
            allow_root: true,
            ..Self::only(owner_uid)
        }
    }

    /// `hsmd --user`: its owner and no one else, root included.
    #[must_use]
    pub fn only(owner_uid: u32) -> Self {
        let label = resolve_user(&owner_uid.to_string()).map_or_else(|| format!("uid {owner_uid}"), |(_, l)| l);
        Self {
            allow_root: false,
            users: BTreeMap::from([(owner_uid, label)]),
            groups: BTreeMap::new(),
        }
    }

    /// Decides whether `peer` may connect.
    #[must_use]
    pub fn admit(&self, peer: &PeerIdentity) -> Admission {
        let uid = peer.creds.uid;
        if uid == 0 && self.allow_root {
            return Admission::Admitted("root is allowed (access.allow_root)".to_owned());
        }
        if let Some(label) = self.users.get(&uid) {
            return Admission::Admitted(format!("user {label} is listed in access.users"));
        }
        if let Some(label) = peer.groups.iter().find_map(|g| self.groups.get(&g.gid)) {
            return Admission::Admitted(format!("member of group {label} (access.groups)"));
        }
        Admission::Refused(format!(
            "{} may not use hsmd; an administrator can add the user to {} or to access.users in the daemon's config",
            peer.describe(),
            if self.groups.is_empty() {
                "access.groups".to_owned()
            } else {
                format!(
                    "group {}",
                    self.groups.values().cloned().collect::<Vec<_>>().join(" or ")
                )
            }
        ))
    }
}

fn resolve_user(entry: &str) -> Option<(u32, String)> {
    if let Ok(uid) = entry.parse::<u32>() {
        let name = User::from_uid(uid.into()).ok().flatten().map(|u| u.name);
        return Some((
            uid,
            name.map_or_else(|| format!("uid {uid}"), |n| format!("{n} (uid {uid})")),
        ));
    }
    let user = User::from_name(entry).ok().flatten()?;
    Some((user.uid.as_raw(), format!("{} (uid {})", user.name, user.uid)))
}

fn resolve_group(entry: &str) -> Option<(u32, String)> {
    if let Ok(gid) = entry.parse::<u32>() {
        let name = Group::from_gid(gid.into()).ok().flatten().map(|g| g.name);
        return Some((gid, name.unwrap_or_else(|| format!("gid {gid}"))));
    }
    let group = Group::from_name(entry).ok().flatten()?;
    Some((group.gid.as_raw(), group.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Credentials;
    use protocol::GroupInfo;

    fn peer(uid: u32, gids: &[u32]) -> PeerIdentity {
        let groups: Vec<GroupInfo> = gids.iter().map(|&gid| GroupInfo { gid, name: None }).collect();
        PeerIdentity {
            creds: Credentials {
                uid,
                gid: gids[0],
                pid: Some(1),
            },
            user: None,
            group: groups[0].clone(),
            groups,
            executable: None,
        }
    }

    #[test]
    fn root_is_admitted_only_when_allowed() {
        let mut cfg = AccessConfig {
            allow_root: true,
            users: vec![],
            groups: vec![],
        };
        let (gate, _) = AccessGate::from_config(&cfg);
        assert!(matches!(gate.admit(&peer(0, &[0])), Admission::Admitted(_)));
        cfg.allow_root = false;
        let (gate, _) = AccessGate::from_config(&cfg);
        assert!(matches!(gate.admit(&peer(0, &[0])), Admission::Refused(_)));
    }

    #[test]
    fn users_and_supplementary_groups_admit_by_id() {
        let cfg = AccessConfig {
            allow_root: false,
            users: vec!["4001".into()],
            groups: vec!["5001".into()],
        };
        let (gate, warnings) = AccessGate::from_config(&cfg);
        assert!(warnings.is_empty());
        assert!(matches!(gate.admit(&peer(4001, &[100])), Admission::Admitted(_)));
        assert!(matches!(gate.admit(&peer(4002, &[100, 5001])), Admission::Admitted(_)));
        match gate.admit(&peer(4002, &[100, 5002])) {
            Admission::Refused(why) => assert!(why.contains("uid 4002"), "{why}"),
            other => panic!("expected refusal, got {other:?}"),
        }
    }

    #[test]
    fn unknown_names_warn_and_admit_nobody() {
        let cfg = AccessConfig {
            allow_root: false,
            users: vec!["no-such-user-hsmd-test".into()],
            groups: vec!["no-such-group-hsmd-test".into()],
        };
        let (gate, warnings) = AccessGate::from_config(&cfg);
        assert_eq!(warnings.len(), 2);
        assert!(matches!(gate.admit(&peer(4001, &[4001])), Admission::Refused(_)));
    }
}
