//! The policy: roles made of permissions `(resource, action, keys, backend)`,
//! and bindings from users and groups to roles. Every request is checked
//! against it before it reaches the keystore.
//!
//! ```toml
//! [roles.ci-signer]
//! permissions = [
//!   { resource = "keys", action = "sign", keys = "ci-*" },
//!   { resource = "keys", action = "*", owned = true },   # anything on keys I created
//! ]
//! rate = { per_second = 50, burst = 100 }                # optional
//!
//! [[bind]]
//! users = ["alice", "1001"]
//! groups = ["ci"]
//! roles = ["ci-signer", "viewer"]
//! ```
//!
//! `viewer`, `operator` and `admin` are built in. Without a policy file every admitted peer is `admin`: the connection
//! gate is then the only check (the production profile refuses that).

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::PeerIdentity;

pub use super::permission::RESOURCES;

/// One permission.
#[derive(Debug, Clone)]
pub struct Permission {
    resource: String,
    action: String,
    keys: glob::Pattern,
    backend: glob::Pattern,
    owned: bool,
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.resource, self.action)?;
        if self.resource == "keys" || self.resource == "*" {
            write!(f, " on {}", self.keys.as_str())?;
            if self.owned {
                f.write_str(" (owned)")?;
            }
            if self.backend.as_str() != "*" {
                write!(f, " backend {}", self.backend.as_str())?;
            }
        }
        Ok(())
    }
}

pub use crate::config::Rate;

/// A named set of permissions.
#[derive(Debug, Clone)]
pub struct Role {
    /// Its name.
    pub name: String,
    permissions: Vec<Permission>,
    /// Rate override for its members.
    pub rate: Option<Rate>,
}

/// Users and groups given roles.
#[derive(Debug, Clone)]
struct Binding {
    users: Vec<String>,
    groups: Vec<String>,
    roles: Vec<String>,
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask<'a> {
    /// `keys`, `keystore`, …
    pub resource: &'static str,
    /// `sign`, `unlock`, …
    pub action: &'static str,
    /// The key, for key actions.
    pub key: Option<&'a str>,
}

impl fmt::Display for Ask<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.resource, self.action)?;
        if let Some(k) = self.key {
            write!(f, " on key {k:?}")?;
        }
        Ok(())
    }
}

/// Why a policy file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file cannot be read.
    #[error("policy {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("policy {}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePermission {
    resource: String,
    action: String,
    #[serde(default = "star")]
    keys: String,
    #[serde(default = "star")]
    backend: String,
    #[serde(default)]
    owned: bool,
}

fn star() -> String {
    "*".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRole {
    #[serde(default)]
    permissions: Vec<FilePermission>,
    rate: Option<Rate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBinding {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    roles: BTreeMap<String, FileRole>,
    #[serde(default)]
    bind: Vec<FileBinding>,
}

/// Where the policy came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// No policy file is configured.
    Open,
    /// This file.
    File(PathBuf),
}

/// The policy in force.
#[derive(Debug, Clone)]
pub struct Policy {
    source: Source,
    roles: BTreeMap<String, Role>,
    bindings: Vec<Binding>,
    text: String,
    /// Whether any permission names a backend (checked on every request).
    restricts_backends: bool,
}

/// Why a peer has a role: which binding, and which of its entries matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why<'a> {
    /// No policy file.
    Open,
    /// Binding `index` (from 1) names the user.
    User(usize, &'a str),
    /// Binding `index` names one of the user's groups.
    Group(usize, &'a str),
}

impl fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("no policy file: every admitted peer is admin"),
            Self::User(i, u) => write!(f, "binding {i} (user {u})"),
            Self::Group(i, g) => write!(f, "binding {i} (group {g})"),
        }
    }
}

/// An allowed request: which role, permission and binding allowed it.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// The role.
    pub role: &'a Role,
    /// The permission.
    pub permission: &'a Permission,
    /// Why the peer has the role.
    pub why: Why<'a>,
}

fn perm(resource: &str, action: &str, keys: &str) -> Permission {
    Permission {
        resource: resource.to_owned(),
        action: action.to_owned(),
        keys: glob::Pattern::new(keys).unwrap_or_default(),
        backend: glob::Pattern::new("*").unwrap_or_default(),
        owned: false,
    }
}

fn builtin_roles() -> BTreeMap<String, Role> {
    let viewer = ["list", "info", "public"];
    let operator = [
        "list",
        "info",
        "public",
        "create",
        "sign",
        "verify",
        "encrypt",
        "decrypt",
        "mac",
        "mac-verify",
        "rewrap",
        "datakey",
        "rotate",
        "set",
        "disable",
        "enable",
        "deactivate",
        "delete",
        "restore",
    ];
    let mut roles = BTreeMap::new();
    let mut add = |name: &str, permissions: Vec<Permission>| {
        roles.insert(
            name.to_owned(),
            Role {
                name: name.to_owned(),
                permissions,
                rate: None,
            },
        );
    };
    let mut v: Vec<Permission> = viewer.iter().map(|a| perm("keys", a, "*")).collect();
    v.push(perm("keystore", "slot-list", "*"));
    v.extend(["list", "info"].iter().map(|a| perm("files", a, "*")));
    add("viewer", v);
    let mut o: Vec<Permission> = operator.iter().map(|a| perm("keys", a, "*")).collect();
    o.extend(["unlock", "lock", "slot-list"].iter().map(|a| perm("keystore", a, "*")));
    o.extend(
        ["store", "retrieve", "list", "info", "delete"]
            .iter()
            .map(|a| perm("files", a, "*")),
    );
    add("operator", o);
    add("admin", vec![perm("*", "*", "*")]);
    roles
}

fn glob_match(p: &glob::Pattern, s: &str) -> bool {
    p.matches_with(
        s,
        glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: false,
            require_literal_leading_dot: false,
        },
    )
}

impl Policy {
    /// No policy file: every admitted peer is admin.
    #[must_use]
    pub fn open() -> Self {
        Self {
            source: Source::Open,
            roles: builtin_roles(),
            bindings: Vec::new(),
            text: String::new(),
            restricts_backends: false,
        }
    }

    /// Reads and checks a policy file.
    ///
    /// # Errors
    /// [`PolicyError`] naming the file and the first problem.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks policy text; `path` is for messages.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let invalid = |problem: String| PolicyError::Invalid {
            path: path.to_owned(),
            problem,
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut roles = builtin_roles();
        for (name, role) in file.roles {
            if roles.contains_key(&name) {
                return Err(invalid(format!(
                    "role {name:?} is built in (viewer, operator, admin) and cannot be redefined; choose another name"
                )));
            }
            let mut permissions = Vec::new();
            for (i, p) in role.permissions.iter().enumerate() {
                let at = format!("role {name:?} permission {}", i + 1);
                let actions = if p.resource == "*" {
                    None
                } else {
                    Some(
                        RESOURCES
                            .iter()
                            .find(|(r, _)| *r == p.resource)
                            .map(|(_, a)| a.as_slice())
                            .ok_or_else(|| {
                                invalid(format!(
                                    "{at}: unknown resource {:?}; resources are {}, or *",
                                    p.resource,
                                    RESOURCES.iter().map(|(r, _)| *r).collect::<Vec<_>>().join(", ")
                                ))
                            })?,
                    )
                };
                if let Some(actions) = actions {
                    if p.action != "*" && !actions.contains(&p.action.as_str()) {
                        return Err(invalid(format!(
                            "{at}: unknown action {:?} for {}; its actions are {}, or *",
                            p.action,
                            p.resource,
                            actions.join(", ")
                        )));
                    }
                }
                let pattern = |what: &str, s: &str| {
                    glob::Pattern::new(s).map_err(|e| invalid(format!("{at}: {what} pattern {s:?}: {e}")))
                };
                permissions.push(Permission {
                    resource: p.resource.clone(),
                    action: p.action.clone(),
                    keys: pattern("keys", &p.keys)?,
                    backend: pattern("backend", &p.backend)?,
                    owned: p.owned,
                });
            }
            if let Some(rate) = role.rate {
                if rate.per_second == 0 || rate.burst == 0 {
                    return Err(invalid(format!(
                        "role {name:?}: rate.per_second and rate.burst must be at least 1"
                    )));
                }
            }
            roles.insert(
                name.clone(),
                Role {
                    name,
                    permissions,
                    rate: role.rate,
                },
            );
        }
        let mut bindings = Vec::new();
        for (i, b) in file.bind.into_iter().enumerate() {
            if b.users.is_empty() && b.groups.is_empty() {
                return Err(invalid(format!("binding {} names no users and no groups", i + 1)));
            }
            if let Some(unknown) = b.roles.iter().find(|r| !roles.contains_key(*r)) {
                return Err(invalid(format!(
                    "binding {} refers to unknown role {unknown:?}; roles are {}",
                    i + 1,
                    roles.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            bindings.push(Binding {
                users: b.users,
                groups: b.groups,
                roles: b.roles,
            });
        }
        let restricts_backends = roles
            .values()
            .flat_map(|r| r.permissions.iter())
            .any(|p| p.backend.as_str() != "*");
        Ok(Self {
            source: Source::File(path.to_owned()),
            roles,
            bindings,
            text: text.to_owned(),
            restricts_backends,
        })
    }

    /// Where it came from.
    #[must_use]
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Every role's name.
    #[must_use]
    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// The file's text (empty without a file).
    #[must_use]
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether no binding exists (with a file): then nobody may do anything.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.source != Source::Open && self.bindings.is_empty()
    }

    /// The peer's roles, each with the binding entry that gives it.
    #[must_use]
    pub fn roles_of(&self, peer: &PeerIdentity) -> Vec<(&Role, Why<'_>)> {
        if self.source == Source::Open {
            return self.roles.get("admin").map(|r| (r, Why::Open)).into_iter().collect();
        }
        let is_uid = |s: &str| s.parse::<u32>().ok() == Some(peer.creds.uid);
        let mut out: Vec<(&Role, Why<'_>)> = Vec::new();
        for (i, b) in self.bindings.iter().enumerate() {
            let why = b
                .users
                .iter()
                .find(|u| is_uid(u) || peer.user.as_deref() == Some(u.as_str()))
                .map(|u| Why::User(i + 1, u))
                .or_else(|| {
                    b.groups
                        .iter()
                        .find(|g| {
                            peer.groups.iter().any(|pg| {
                                g.parse::<u32>().ok() == Some(pg.gid) || pg.name.as_deref() == Some(g.as_str())
                            })
                        })
                        .map(|g| Why::Group(i + 1, g))
                });
            if let Some(why) = why {
                for r in &b.roles {
                    if let Some(role) = self.roles.get(r) {
                        if !out.iter().any(|(have, _)| have.name == role.name) {
                            out.push((role, why));
                        }
                    }
                }
            }
        }
        out
    }

    /// The peer's permissions, as text (for `hsmctl whoami`).
    #[must_use]
    pub fn permissions_of(&self, peer: &PeerIdentity) -> Vec<String> {
        self.roles_of(peer)
            .iter()
            .flat_map(|(r, _)| r.permissions.iter().map(move |p| format!("{p} (role {})", r.name)))
            .collect()
    }

    /// The most generous rate override among the peer's roles.
    #[must_use]
    pub fn rate_of(&self, peer: &PeerIdentity) -> Option<Rate> {
        self.roles_of(peer)
            .iter()
            .filter_map(|(r, _)| r.rate)
            .max_by_key(|r| (r.per_second, r.burst))
    }

    /// Whether any permission is limited to some backends (so a check needs
    /// the key's backend, not a guess).
    #[must_use]
    pub fn restricts_backends(&self) -> bool {
        self.restricts_backends
    }

    /// Whether `peer` may do `ask`. `owner` gives the key's owner uid when a
    /// permission is limited to owned keys (it is called at most once, and only
    /// then).
    ///
    /// # Errors
    /// The refusal, naming who, what, and what would allow it.
    pub fn check(
        &self,
        peer: &PeerIdentity,
        ask: Ask<'_>,
        backend: &str,
        owner: impl FnOnce() -> Option<u32>,
    ) -> Result<Grant<'_>, String> {
        self.decide(peer, ask, backend, owner, true)
    }

    /// As [`Policy::check`], worded for `hsmctl policy check` about someone
    /// else when `own` is false ("their roles", not "your roles").
    ///
    /// # Errors
    /// The refusal, naming who, what, and what would allow it.
    pub fn decide(
        &self,
        peer: &PeerIdentity,
        ask: Ask<'_>,
        backend: &str,
        owner: impl FnOnce() -> Option<u32>,
        own: bool,
    ) -> Result<Grant<'_>, String> {
        let roles = self.roles_of(peer);
        let mut owner = Some(owner);
        let mut owner_uid: Option<Option<u32>> = None;
        // Whoever may do anything with a key may read its metadata: `hsmctl
        // sign` reads the key's type before it hashes.
        let any_action = ask.resource == "keys" && ask.action == "info";
        for (role, why) in &roles {
            for p in &role.permissions {
                if !(p.resource == "*" || p.resource == ask.resource)
                    || !(any_action || p.action == "*" || p.action == ask.action)
                {
                    continue;
                }
                if let Some(key) = ask.key {
                    if !glob_match(&p.keys, key) || !glob_match(&p.backend, backend) {
                        continue;
                    }
                    // A key being created will be the caller's own.
                    if p.owned && ask.action != "create" {
                        let o = *owner_uid.get_or_insert_with(|| owner.take().and_then(|f| f()));
                        if o != Some(peer.creds.uid) {
                            continue;
                        }
                    }
                }
                return Ok(Grant {
                    role,
                    permission: p,
                    why: *why,
                });
            }
        }
        let (you, your, whoami) = if own {
            ("you have", "your", "`hsmctl whoami` lists your permissions")
        } else {
            (
                "they have",
                "their",
                "`hsmctl whoami`, run as them, lists their permissions",
            )
        };
        let have = if roles.is_empty() {
            format!("{you} no roles: no binding in the policy names {your} user or groups")
        } else {
            format!(
                "{your} roles are {}",
                roles
                    .iter()
                    .map(|(r, _)| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        if let (true, Some(k)) = (any_action, ask.key) {
            return Err(format!(
                "{} may not use key {k:?}: no role grants any keys permission on it; {have} ({whoami})",
                peer.describe()
            ));
        }
        Err(format!(
            "{} may not {}: no role grants the permission {}; {have} ({whoami})",
            peer.describe(),
            match ask.key {
                Some(k) => format!("{} key {k:?}", ask.action),
                None => format!("{} ({})", ask.action, ask.resource),
            },
            ask
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Credentials;
    use protocol::GroupInfo;

    fn peer(uid: u32, user: &str, groups: &[(u32, &str)]) -> PeerIdentity {
        let groups: Vec<GroupInfo> = groups
            .iter()
            .map(|(gid, name)| GroupInfo {
                gid: *gid,
                name: Some((*name).to_owned()),
            })
            .collect();
        PeerIdentity {
            creds: Credentials {
                uid,
                gid: groups[0].gid,
                pid: None,
            },
            user: Some(user.to_owned()),
            group: groups[0].clone(),
            groups,
            executable: None,
        }
    }

    const TEXT: &str = r#"
        [roles.ci]
        permissions = [
          { resource = "keys", action = "sign", keys = "ci-*" },
          { resource = "keys", action = "*", owned = true },
        ]
        rate = { per_second = 5, burst = 10 }

        [[bind]]
        users = ["alice"]
        roles = ["ci"]

        [[bind]]
        groups = ["ops"]
        roles = ["viewer"]
    "#;

    fn ask<'a>(action: &'static str, key: &'a str) -> Ask<'a> {
        Ask {
            resource: "keys",
            action,
            key: Some(key),
        }
    }

    #[test]
    fn patterns_ownership_and_groups_decide() {
        let p = Policy::parse(TEXT, Path::new("p.toml")).unwrap();
        let alice = peer(1001, "alice", &[(1001, "alice")]);
        assert!(p.check(&alice, ask("sign", "ci-release"), "soft", || None).is_ok());
        let e = p
            .check(&alice, ask("sign", "prod-root"), "soft", || Some(0))
            .unwrap_err();
        assert!(
            e.contains("keys:sign on key \"prod-root\"") && e.contains("your roles are ci"),
            "{e}"
        );
        // Her own key: any action.
        assert!(p.check(&alice, ask("delete", "mine"), "soft", || Some(1001)).is_ok());
        let bob = peer(1002, "bob", &[(1002, "bob"), (50, "ops")]);
        assert!(p.check(&bob, ask("info", "prod-root"), "soft", || None).is_ok());
        let e = p.check(&bob, ask("sign", "ci-release"), "soft", || None).unwrap_err();
        assert!(e.contains("your roles are viewer"), "{e}");
        let eve = peer(1003, "eve", &[(1003, "eve")]);
        let e = p.check(&eve, ask("info", "x"), "soft", || None).unwrap_err();
        assert!(e.contains("you have no roles"), "{e}");
        assert_eq!(
            p.rate_of(&alice),
            Some(Rate {
                per_second: 5,
                burst: 10
            })
        );
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        let bad = |t: &str| Policy::parse(t, Path::new("p.toml")).unwrap_err().to_string();
        assert!(bad("[[bind]]\nusers=[\"a\"]\nroles=[\"nope\"]").contains("unknown role \"nope\""));
        assert!(bad("[roles.x]\npermissions=[{resource=\"keys\",action=\"sgn\"}]").contains("unknown action \"sgn\""));
        assert!(bad("[roles.x]\npermissions=[{resource=\"kyes\",action=\"*\"}]").contains("unknown resource"));
        assert!(bad("[roles.admin]\npermissions=[]").contains("built in"));
        assert!(bad("[[bind]]\nroles=[\"admin\"]").contains("names no users and no groups"));
        assert!(bad("colour = 1").contains("unknown field"));
    }

    #[test]
    fn without_a_file_everyone_admitted_is_admin() {
        let p = Policy::open();
        let eve = peer(1003, "eve", &[(1003, "eve")]);
        let g = p.check(&eve, ask("purge", "x"), "soft", || None).unwrap();
        assert_eq!(g.role.name, "admin");
    }
}
