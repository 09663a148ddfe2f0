//! Keys: their lifecycle (create, settings, rotation, states, delete) and
//! their use (sign, verify, encrypt, decrypt, MAC, rewrap, data keys).

use protocol::{
    DecryptAnyVersionArgs, DecryptArgs, EncryptArgs, HashAlg, KeyChanges, KeyOptions, KeyType, MacArgs, MacVerifyArgs,
    Reply, SecretBytes, SignArgs, SignMessageArgs, Transition, Usage, VerifyArgs, VerifyMessageArgs,
};

use super::{audit_line::compromised_use, AuditSpec, Plan};
use crate::{
    audit::EventType,
    auth::{
        permission::{KeyAction as A, Permission},
        policy::Policy,
        PeerIdentity,
    },
};

fn on_key(event: EventType, name: &str, action: &'static str, risk: u8, security: bool) -> AuditSpec {
    AuditSpec::new(event, format!("key:{name}"), action, risk, security)
}

pub(super) fn create(name: String, key_type: KeyType, usages: Vec<Usage>, options: KeyOptions) -> Plan {
    let spec = on_key(EventType::KeyCreated, &name, "create", 3, true).on_backend(options.backend.as_deref());
    // A new key is checked against the backend it asks for.
    let (key, backend) = (name.clone(), options.backend.clone());
    Plan::start(move |cx| {
        let (uid, user) = (cx.caller.peer.creds.uid, cx.caller.peer.user.clone());
        cx.keys(move |k| {
            k.create_key(&name, key_type, &usages, &options, uid, user.as_deref())
                .map(|k| Reply::KeyCreated(Box::new(k)))
        })
    })
    .needs(Permission::Keys(A::Create), Some(&key))
    .on_backend(backend)
    .audited(spec)
    .logged()
}

/// Whether the policy grants `peer` the key action `action` on the key
/// `info` describes (its backend and owner as the listing read them).
fn may(policy: &Policy, peer: &PeerIdentity, action: A, info: &protocol::KeyInfo) -> bool {
    policy
        .check(
            peer,
            Permission::Keys(action).on(Some(&info.name)),
            &info.backend,
            || info.owner_exists.then_some(info.owner_uid),
        )
        .is_ok()
}

/// Lists only the keys the caller may list.
pub(super) fn list() -> Plan {
    Plan::start(|cx| {
        let (policy, peer) = (cx.shared.policy(), cx.caller.peer.clone());
        cx.keys(move |k| {
            k.list_keys().map(|keys| {
                Reply::Keys(
                    keys.into_iter()
                        .filter(|info| may(&policy, &peer, A::List, info))
                        .collect(),
                )
            })
        })
    })
    .needs(Permission::Keys(A::List), None)
    .audited(AuditSpec::new(EventType::KeyList, "keys".into(), "list", 1, false))
}

/// The keys offered to SSH (labelled `ssh`, signing, active, of a type
/// OpenSSH takes) that the caller's `keys.sign` covers. A key whose public
/// half cannot be had now (its token absent) is left out, not an error: the
/// others still serve.
pub(super) fn ssh_identities() -> Plan {
    Plan::start(|cx| {
        let (policy, peer) = (cx.shared.policy(), cx.caller.peer.clone());
        cx.keys(move |k| {
            let offered = k.list_keys()?.into_iter().filter(|info| {
                info.labels.contains_key(protocol::SSH_LABEL)
                    && info.usages.contains(&Usage::Sign)
                    && info.state == protocol::KeyState::Active
                    && protocol::formats::openssh::has_ssh_form(info.key_type)
                    && may(&policy, &peer, A::Sign, info)
            });
            let mut identities = Vec::new();
            for info in offered {
                match k.public_key(&info.name) {
                    Ok((key_type, version, spki_der)) => identities.push(protocol::SshIdentity {
                        name: info.name,
                        key_type,
                        version,
                        spki_der,
                    }),
                    Err(e) => tracing::warn!(key = %info.name, error = %e, "not offered to SSH: no public key now"),
                }
            }
            Ok(Reply::SshIdentities(identities))
        })
    })
    .audited(AuditSpec::new(
        EventType::KeyList,
        "keys".into(),
        "ssh-identities",
        1,
        false,
    ))
}

pub(super) fn info(name: String) -> Plan {
    let spec = on_key(EventType::KeyInfo, &name, "info", 1, false);
    let need = Permission::Keys(A::Info);
    Plan::keys({
        let name = name.clone();
        move |k| k.key_info(&name).map(|k| Reply::Key(Box::new(k)))
    })
    .needs(need, Some(&name))
    .audited(spec)
}

/// Whether the key is there: any permission on it will do, as for its
/// metadata, so a caller with none learns nothing about it.
pub(super) fn exists(name: String) -> Plan {
    let spec = on_key(EventType::KeyInfo, &name, "exists", 1, false);
    Plan::keys({
        let name = name.clone();
        move |k| match k.find(&name, None) {
            Ok(_) => Ok(Reply::KeyExists { exists: true }),
            Err(crate::keystore::VaultError::NoSuchKey(_)) => Ok(Reply::KeyExists { exists: false }),
            Err(e) => Err(e),
        }
    })
    .needs(Permission::Keys(A::Info), Some(&name))
    .audited(spec)
}

pub(super) fn public(name: String) -> Plan {
    let spec = on_key(EventType::KeyPublic, &name, "public", 1, false);
    Plan::keys({
        let name = name.clone();
        move |k| {
            k.public_key(&name)
                .map(|(key_type, version, spki_der)| Reply::PublicKey {
                    key_type,
                    version,
                    spki_der,
                })
        }
    })
    .needs(Permission::Keys(A::Public), Some(&name))
    .audited(spec)
}

pub(super) fn delete(name: String) -> Plan {
    let spec = on_key(EventType::KeyDeleted, &name, "delete", 5, true);
    Plan::start({
        let name = name.clone();
        move |cx| {
            let window = cx.shared.recovery_window;
            cx.keys(move |k| k.delete_key(&name, window).map(|k| Reply::KeyUpdated(Box::new(k))))
        }
    })
    .needs(Permission::Keys(A::Delete), Some(&name))
    .audited(spec)
    .logged()
}

pub(super) fn rotate(name: String) -> Plan {
    let spec = on_key(EventType::KeyRotated, &name, "rotate", 3, true);
    Plan::keys({
        let name = name.clone();
        move |k| k.rotate_key(&name).map(|k| Reply::KeyUpdated(Box::new(k)))
    })
    .needs(Permission::Keys(A::Rotate), Some(&name))
    .audited(spec)
    .logged()
}

pub(super) fn set(name: String, changes: KeyChanges) -> Plan {
    let spec = on_key(EventType::KeyUpdated, &name, "set", 3, true);
    Plan::keys({
        let name = name.clone();
        move |k| k.set_key(&name, &changes).map(|k| Reply::KeyUpdated(Box::new(k)))
    })
    .needs(Permission::Keys(A::Set), Some(&name))
    .audited(spec)
    .logged()
}

pub(super) fn transition(name: String, to: Transition) -> Plan {
    let (action, risk) = match to {
        Transition::Disable => (A::Disable, 4),
        Transition::Enable => (A::Enable, 4),
        Transition::Deactivate => (A::Deactivate, 4),
        Transition::Compromise => (A::Compromise, 8),
        Transition::Destroy => (A::Destroy, 8),
    };
    let spec = on_key(EventType::KeyStateChanged, &name, action.into(), risk, true);
    Plan::keys({
        let name = name.clone();
        move |k| k.transition_key(&name, to).map(|k| Reply::KeyUpdated(Box::new(k)))
    })
    .needs(Permission::Keys(action), Some(&name))
    .audited(spec)
    .logged()
}

pub(super) fn restore(name: String) -> Plan {
    let spec = on_key(EventType::KeyRestored, &name, "restore", 4, true);
    Plan::keys({
        let name = name.clone();
        move |k| k.restore_key(&name).map(|k| Reply::KeyUpdated(Box::new(k)))
    })
    .needs(Permission::Keys(A::Restore), Some(&name))
    .audited(spec)
    .logged()
}

pub(super) fn purge(name: String) -> Plan {
    let spec = on_key(EventType::KeyPurged, &name, "purge", 8, true);
    Plan::keys({
        let name = name.clone();
        move |k| k.purge_key(&name).map(|()| Reply::KeyPurged { name })
    })
    .needs(Permission::Keys(A::Purge), Some(&name))
    .audited(spec)
    .logged()
}

pub(super) fn sign(SignArgs { name, digest }: SignArgs) -> Plan {
    let spec = on_key(EventType::Sign, &name, "sign", 1, false);
    let need = Permission::Keys(A::Sign);
    let later = digest.clone();
    Plan::key_use(name, None, digest.len(), move |k, key| {
        k.sign(key, &digest)
            .map(|(version, signature)| Reply::Signature { version, signature })
    })
    .or_later(move |k, key, then| {
        if !k.signs_later(key) {
            return Err(then);
        }
        let signed =
            |r: Result<(u32, Vec<u8>), _>| then(r.map(|(version, signature)| Reply::Signature { version, signature }));
        k.sign_later(key, &later, Box::new(signed));
        Ok(())
    })
    .needs_on_key(need)
    .audited(spec)
}

pub(super) fn verify(
    VerifyArgs {
        name,
        version,
        digest,
        signature,
        allow_compromised,
    }: VerifyArgs,
) -> Plan {
    let spec = compromised_use(EventType::Verify, format!("key:{name}"), "verify", allow_compromised);
    Plan::key_use(name, Some(version), digest.len(), move |k, key| {
        k.verify(key, &digest, &signature, allow_compromised)
            .map(|valid| Reply::Verified { valid })
    })
    .needs_on_key(Permission::Keys(A::Verify))
    .audited(spec)
}

pub(super) fn encrypt(
    EncryptArgs {
        name,
        version,
        plaintext,
        aad,
    }: EncryptArgs,
) -> Plan {
    let spec = on_key(EventType::Encrypt, &name, "encrypt", 1, false);
    let payload = plaintext.len() + aad.len();
    // The request's copy of the plaintext is wiped as it drops.
    Plan::key_use(name, version, payload, move |k, key| {
        k.encrypt(key, version, plaintext.expose(), &aad)
            .map(|(version, sealed)| Reply::Encrypted { version, sealed })
    })
    .needs_on_key(Permission::Keys(A::Encrypt))
    .audited(spec)
}

pub(super) fn decrypt(
    DecryptArgs {
        name,
        version,
        sealed,
        aad,
        allow_compromised,
    }: DecryptArgs,
) -> Plan {
    let spec = compromised_use(EventType::Decrypt, format!("key:{name}"), "decrypt", allow_compromised);
    let payload = sealed.len() + aad.len();
    Plan::key_use(name, Some(version), payload, move |k, key| {
        k.decrypt(key, &sealed, &aad, allow_compromised)
            .map(|p| Reply::Decrypted {
                plaintext: SecretBytes::new(p.to_vec()),
            })
    })
    .needs_on_key(Permission::Keys(A::Decrypt))
    .audited(spec)
}

pub(super) fn decrypt_any_version(
    DecryptAnyVersionArgs {
        name,
        sealed,
        aad,
        allow_compromised,
    }: DecryptAnyVersionArgs,
) -> Plan {
    let spec = compromised_use(EventType::Decrypt, format!("key:{name}"), "decrypt", allow_compromised);
    // On the pool: the older versions it may try are read from the keystore.
    Plan::keys({
        let name = name.clone();
        move |k| {
            k.decrypt_any_version(&name, &sealed, &aad, allow_compromised)
                .map(|(version, p)| Reply::DecryptedWith {
                    version,
                    plaintext: SecretBytes::new(p.to_vec()),
                })
        }
    })
    .needs(Permission::Keys(A::Decrypt), Some(&name))
    .audited(spec)
}

pub(super) fn mac(MacArgs { name, data }: MacArgs) -> Plan {
    let spec = on_key(EventType::Mac, &name, "mac", 1, false);
    Plan::key_use(name, None, data.len(), move |k, key| {
        k.mac(key, &data).map(|(version, tag)| Reply::MacTag { version, tag })
    })
    .needs_on_key(Permission::Keys(A::Mac))
    .audited(spec)
}

pub(super) fn mac_verify(
    MacVerifyArgs {
        name,
        version,
        data,
        tag,
        allow_compromised,
    }: MacVerifyArgs,
) -> Plan {
    let spec = compromised_use(
        EventType::MacVerify,
        format!("key:{name}"),
        "mac-verify",
        allow_compromised,
    );
    Plan::key_use(name, Some(version), data.len(), move |k, key| {
        k.mac_verify(key, &data, &tag, allow_compromised)
            .map(|valid| Reply::MacVerified { valid })
    })
    .needs_on_key(Permission::Keys(A::MacVerify))
    .audited(spec)
}

/// The hash an audit line names for a message signature: the one asked
/// for, or `default` for the key type's own (pure for Ed25519).
fn hash_label(hash: Option<HashAlg>) -> &'static str {
    hash.map_or("default", HashAlg::as_str)
}

/// Longest message signed from the reactor with a key whose device answers
/// later: an Ed25519 token signs the message itself, and what the reactor
/// sends the helper must stay far below the socket's buffer (see
/// `MAX_UNANSWERED_FROM_REACTOR`); longer ones are signed from the pool.
const LATER_MAX_MESSAGE: usize = 1024;

pub(super) fn sign_message(SignMessageArgs { name, message, hash }: SignMessageArgs) -> Plan {
    let spec = on_key(EventType::Sign, &name, "sign-message", 1, false).over_message(hash_label(hash), message.len());
    let later = (message.len() <= LATER_MAX_MESSAGE).then(|| message.clone());
    Plan::key_use(name, None, message.len(), move |k, key| {
        k.sign_message(key, &message, hash)
            .map(|(version, signature)| Reply::Signature { version, signature })
    })
    .or_later(move |k, key, then| {
        let Some(message) = later.filter(|_| k.signs_later(key)) else {
            return Err(then);
        };
        let signed =
            |r: Result<(u32, Vec<u8>), _>| then(r.map(|(version, signature)| Reply::Signature { version, signature }));
        k.sign_message_later(key, &message, hash, Box::new(signed));
        Ok(())
    })
    .needs_on_key(Permission::Keys(A::Sign))
    .audited(spec)
}

pub(super) fn verify_message(
    VerifyMessageArgs {
        name,
        version,
        message,
        hash,
        signature,
        allow_compromised,
    }: VerifyMessageArgs,
) -> Plan {
    let spec = compromised_use(
        EventType::Verify,
        format!("key:{name}"),
        "verify-message",
        allow_compromised,
    )
    .over_message(hash_label(hash), message.len());
    Plan::key_use(name, Some(version), message.len(), move |k, key| {
        k.verify_message(key, &message, hash, &signature, allow_compromised)
            .map(|valid| Reply::Verified { valid })
    })
    .needs_on_key(Permission::Keys(A::Verify))
    .audited(spec)
}

pub(super) fn rewrap(name: String, version: u32, sealed: Vec<u8>, aad: Vec<u8>, to_version: Option<u32>) -> Plan {
    let spec = on_key(EventType::Rewrap, &name, "rewrap", 2, false);
    Plan::keys({
        let name = name.clone();
        move |k| {
            k.rewrap(&name, version, &sealed, &aad, to_version)
                .map(|(version, sealed)| Reply::Encrypted { version, sealed })
        }
    })
    .needs(Permission::Keys(A::Rewrap), Some(&name))
    .audited(spec)
}

pub(super) fn datakey(name: String, aad: Vec<u8>, plaintext: bool) -> Plan {
    let (action, spec) = if plaintext {
        (
            A::DatakeyPlaintext,
            on_key(EventType::Datakey, &name, "datakey-plaintext", 6, true),
        )
    } else {
        (A::Datakey, on_key(EventType::Datakey, &name, "datakey", 2, false))
    };
    Plan::keys({
        let name = name.clone();
        move |k| {
            k.datakey(&name, &aad, plaintext).map(|k| Reply::DataKey {
                version: k.version,
                sealed: k.sealed,
                plaintext: k.plaintext.map(|p| SecretBytes::new(p.to_vec())),
            })
        }
    })
    .needs(Permission::Keys(action), Some(&name))
    .audited(spec)
}
