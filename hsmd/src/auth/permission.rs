//! The permissions a request may need, as types: each resource's actions are
//! an enum, so an operation names its permission in a way the compiler
//! checks, and the list the policy file is validated against (and `hsmctl
//! policy show` prints) is derived from the same enums.

use std::sync::LazyLock;

use strum::IntoEnumIterator;

use super::policy::Ask;

/// What may be done with keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "kebab-case")]
#[allow(missing_docs)] // The names are the policy file's words, listed in the README.
pub enum KeyAction {
    List,
    Info,
    Public,
    Create,
    Sign,
    Verify,
    Encrypt,
    Decrypt,
    Mac,
    MacVerify,
    Rewrap,
    Datakey,
    DatakeyPlaintext,
    Rotate,
    Set,
    Disable,
    Enable,
    Deactivate,
    Compromise,
    Destroy,
    Delete,
    Restore,
    Purge,
}

/// What may be done with the keystore's custody.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "kebab-case")]
#[allow(missing_docs)]
pub enum KeystoreAction {
    Init,
    Unlock,
    Lock,
    SlotList,
    SlotAdd,
    SlotRemove,
    Backup,
    Restore,
    BackendPin,
}

/// What may be done with stored files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "kebab-case")]
#[allow(missing_docs)]
pub enum FileAction {
    Store,
    Retrieve,
    List,
    Info,
    Delete,
    /// Use files other users stored.
    Admin,
}

/// A permission: a resource and one of its actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `keys:…`, checked against the key named (its pattern, owner, backend).
    Keys(KeyAction),
    /// `keystore:…`.
    Keystore(KeystoreAction),
    /// `files:…`.
    Files(FileAction),
    /// `audit:read`.
    AuditRead,
    /// `policy:read`.
    PolicyRead,
    /// `metrics:read`.
    MetricsRead,
}

impl Permission {
    /// The resource's name in the policy file.
    #[must_use]
    pub fn resource(self) -> &'static str {
        match self {
            Self::Keys(_) => "keys",
            Self::Keystore(_) => "keystore",
            Self::Files(_) => "files",
            Self::AuditRead => "audit",
            Self::PolicyRead => "policy",
            Self::MetricsRead => "metrics",
        }
    }

    /// The action's name in the policy file.
    #[must_use]
    pub fn action(self) -> &'static str {
        match self {
            Self::Keys(a) => a.into(),
            Self::Keystore(a) => a.into(),
            Self::Files(a) => a.into(),
            Self::AuditRead | Self::PolicyRead | Self::MetricsRead => "read",
        }
    }

    /// Asking for this permission, on `key` for key permissions.
    #[must_use]
    pub fn on(self, key: Option<&str>) -> Ask<'_> {
        Ask {
            resource: self.resource(),
            action: self.action(),
            key,
        }
    }

    /// Every permission, resource by resource in the order the policy lists them.
    pub fn all() -> impl Iterator<Item = Self> {
        KeyAction::iter()
            .map(Self::Keys)
            .chain(KeystoreAction::iter().map(Self::Keystore))
            .chain(FileAction::iter().map(Self::Files))
            .chain([Self::AuditRead, Self::PolicyRead, Self::MetricsRead])
    }

    /// The permission named `resource:action` in text (`hsmctl policy check`).
    #[must_use]
    pub fn parse(resource: &str, action: &str) -> Option<Self> {
        Self::all().find(|p| p.resource() == resource && p.action() == action)
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.resource(), self.action())
    }
}

/// Resources and the actions each has, in the order `hsmctl policy show`
/// lists them: derived from [`Permission::all`].
pub static RESOURCES: LazyLock<Vec<(&'static str, Vec<&'static str>)>> = LazyLock::new(|| {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for p in Permission::all() {
        match out.last_mut() {
            Some((r, actions)) if *r == p.resource() => actions.push(p.action()),
            _ => out.push((p.resource(), vec![p.action()])),
        }
    }
    out
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_permission_parses_back_from_its_text() {
        let all: Vec<Permission> = Permission::all().collect();
        assert_eq!(all.len(), 23 + 9 + 6 + 3);
        for p in all {
            assert_eq!(Permission::parse(p.resource(), p.action()), Some(p), "{p}");
        }
        assert_eq!(Permission::parse("keys", "read"), None);
        assert_eq!(
            RESOURCES.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            ["keys", "keystore", "files", "audit", "policy", "metrics"]
        );
    }
}
