//! `hsmctl key …`: creating keys and managing their lives.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Subcommand;
use protocol::{Client, KeyChanges, KeyInfo, KeyOptions, KeyType, Transition, Usage};
use serde_json::json;

use crate::{
    failure::{Failure, Local},
    keys, print_json,
};

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate a key inside hsmd (hsmd must be unlocked)
    #[command(
        after_help = "Names: 1 to 64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit.\n\
        Types: ed25519, ecdsa-p256, ecdsa-p384, aes256-gcm, hmac-sha256; in the pkcs11 and tpm backends\n\
        also rsa-pss-2048, rsa-pss-3072, rsa-pss-4096, rsa-pkcs1-2048, rsa-pkcs1-3072, rsa-pkcs1-4096.\n\
        Times: an RFC 3339 date (2027-01-31T00:00:00Z) or a span from now (90d, 12h).\n\n\
        Examples:\n  hsmctl key create release --type ed25519 --rotate-every 90d\n  \
        hsmctl key create audit-mac --type hmac-sha256 --label team=sec\n  \
        hsmctl key create code-sign --type rsa-pss-3072 --backend pkcs11\n  \
        hsmctl key create next-year --type ecdsa-p256 --activate-at 2027-01-01T00:00:00Z --expire-at 2028-01-01T00:00:00Z"
    )]
    Create {
        /// The key's name
        name: String,
        /// ed25519, ecdsa-p256, ecdsa-p384, aes256-gcm, hmac-sha256, rsa-pss-{2048,3072,4096}
        /// or rsa-pkcs1-{2048,3072,4096} (RSA in the pkcs11 and tpm backends only)
        #[arg(long = "type", value_name = "TYPE", value_parser = parse_key_type)]
        key_type: KeyType,
        /// sign, verify, encrypt, decrypt, mac (repeat or comma-separate); default: all the type allows
        #[arg(long = "usage", value_name = "USAGE", value_delimiter = ',', value_parser = parse_usage)]
        usages: Vec<Usage>,
        /// Rotate automatically this often (e.g. 90d); at least 1h, or what the daemon's
        /// keys.min_rotation_period allows
        #[arg(long, value_name = "PERIOD", value_parser = parse_period)]
        rotate_every: Option<u64>,
        /// Stay pre-active (unusable) until then
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        activate_at: Option<u64>,
        /// Become deactivated (verify/decrypt only) then
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        expire_at: Option<u64>,
        /// Free text
        #[arg(long, default_value = "")]
        description: String,
        /// A label NAME=VALUE (repeatable)
        #[arg(long = "label", value_name = "NAME=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Let `hsmctl datakey --plaintext-out` return data keys in plain (aes256-gcm)
        #[arg(long)]
        allow_plaintext_datakey: bool,
        /// Where the key lives: soft, pkcs11, tpm or mock (`hsmctl status` lists the
        /// configured ones) [default: the daemon's backends.default]
        #[arg(long, value_name = "BACKEND")]
        backend: Option<String>,
    },
    /// List keys, deleted ones included (with their purge date)
    List,
    /// Show one key's metadata, versions and use counts; warns when rotation is due
    Info {
        /// The key's name
        name: String,
    },
    /// Exit 0 if a key by this name is in the keystore (deleted but recoverable
    /// ones count: the name is taken), 1 if not; for scripts
    Exists {
        /// The key's name
        name: String,
    },
    /// Print the public key of an asymmetric key
    Public {
        /// The key's name
        name: String,
        /// pem (SubjectPublicKeyInfo), der, raw (32-byte Ed25519 key, SEC1 point,
        /// PKCS#1 RSAPublicKey DER), or openssh (an authorized_keys line; not for
        /// rsa-pss keys)
        #[arg(long, default_value = "pem", value_parser = ["pem", "der", "raw", "openssh"])]
        format: String,
        /// Write here instead of stdout
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
    },
    /// Add a version; new signatures and ciphertexts use it, old ones still check
    #[command(after_help = "Example:\n  hsmctl key rotate release")]
    Rotate {
        /// The key's name
        name: String,
    },
    /// Change a key's settings
    #[command(after_help = "Examples:\n  hsmctl key set release --rotate-every 30d\n  \
        hsmctl key set backup --min-decrypt-version 3\n  hsmctl key set release --rotate-every never --label owner=ci")]
    Set {
        /// The key's name
        name: String,
        /// Rotation period (e.g. 90d; at least 1h, or what the daemon's
        /// keys.min_rotation_period allows), or `never`
        #[arg(long, value_name = "PERIOD|never")]
        rotate_every: Option<String>,
        /// Expiry time, or `never`
        #[arg(long, value_name = "TIME|never")]
        expire_at: Option<String>,
        /// Oldest version that may still verify or decrypt
        #[arg(long, value_name = "N")]
        min_decrypt_version: Option<u32>,
        /// Oldest version a request may name to encrypt with
        #[arg(long, value_name = "N")]
        min_encrypt_version: Option<u32>,
        /// New description
        #[arg(long)]
        description: Option<String>,
        /// Add or replace a label NAME=VALUE (repeatable)
        #[arg(long = "label", value_name = "NAME=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Remove a label (repeatable)
        #[arg(long = "remove-label", value_name = "NAME")]
        remove_labels: Vec<String>,
        /// Whether data keys may be returned in plain
        #[arg(long, value_name = "true|false")]
        allow_plaintext_datakey: Option<bool>,
    },
    /// Suspend a key: usable for nothing until enabled
    Disable {
        /// The key's name
        name: String,
    },
    /// Make a suspended or pre-active key active
    Enable {
        /// The key's name
        name: String,
    },
    /// Retire a key: from now on it only verifies and decrypts
    Deactivate {
        /// The key's name
        name: String,
    },
    /// Mark a key compromised: never signs or encrypts again; verify and decrypt
    /// only with --allow-compromised, each use logged at high risk
    Compromise {
        /// The key's name
        name: String,
    },
    /// Erase every version's material now; only the metadata remains
    Destroy {
        /// The key's name
        name: String,
        /// Go ahead without asking (this cannot be undone); without it hsmctl
        /// asks on a terminal and refuses elsewhere
        #[arg(long)]
        yes: bool,
    },
    /// Delete a key: unusable at once, restorable until its recovery window ends,
    /// then purged by hsmd
    Delete {
        /// The key's name
        name: String,
    },
    /// Bring a deleted key back
    Restore {
        /// The key's name
        name: String,
    },
    /// Destroy a deleted key for good, now
    Purge {
        /// The key's name
        name: String,
        /// Go ahead without asking (this cannot be undone); without it hsmctl
        /// asks on a terminal and refuses elsewhere
        #[arg(long)]
        yes: bool,
    },
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    KeyType::parse(s).ok_or_else(|| {
        format!(
            "unknown key type {s:?}; use one of {}",
            KeyType::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
        )
    })
}

fn parse_usage(s: &str) -> Result<Usage, String> {
    Usage::parse(s).ok_or_else(|| format!("unknown usage {s:?}; use sign, verify, encrypt, decrypt or mac"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

fn parse_period(s: &str) -> Result<u64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{s:?} is not a period like 90d or 12h: {e}"))
        .and_then(|secs| {
            if secs == 0 {
                Err("a period must be at least 1s".to_owned())
            } else {
                Ok(secs)
            }
        })
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .map_err(|_| format!("{s:?} is before 1970"));
    }
    humantime::parse_duration(s)
        .map(|d| now_unix().saturating_add(d.as_secs()))
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time (2027-01-31T00:00:00Z) nor a span from now (30d)"))
}

fn never_or<T>(s: Option<&String>, parse: fn(&str) -> Result<T, String>) -> Result<Option<Option<T>>, Failure> {
    match s.map(String::as_str) {
        None => Ok(None),
        Some("never") => Ok(Some(None)),
        Some(v) => parse(v).map(|t| Some(Some(t))).map_err(|e| Local::Usage.fail(e)),
    }
}

/// A Unix time as RFC 3339 (UTC, seconds).
pub fn time(t: u64) -> String {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(t))
        .filter(|_| t <= 253_402_300_799)
        .map_or_else(
            || format!("{t} (seconds since 1970)"),
            |at| humantime::format_rfc3339_seconds(at).to_string(),
        )
}

fn span(secs: u64) -> String {
    protocol::format_period(secs)
}

/// The rotation warning `key info` prints: overdue, or due within a tenth of
/// the period (at most 7 days).
fn rotation_note(k: &KeyInfo, now: u64) -> Option<String> {
    let (every, next) = (k.rotate_every_secs?, k.next_rotation_unix?);
    if next <= now {
        return Some(format!(
            "WARNING: rotation OVERDUE by {} (hsmd rotates it while unlocked)",
            span(now - next)
        ));
    }
    let soon = (every / 10).min(7 * 86_400);
    (next - now <= soon).then(|| format!("note: rotation due soon, in {}", span(next - now)))
}

fn opt_time(t: Option<u64>) -> String {
    t.map_or_else(|| "-".to_owned(), time)
}

fn print_info(k: &KeyInfo) {
    let now = now_unix();
    println!("name:         {}", k.name);
    println!("id:           {}", k.id);
    println!("type:         {}", k.key_type.as_str());
    println!("backend:      {}", k.backend);
    println!("usages:       {}", usages(k));
    if let (Some(del), Some(purge)) = (k.deleted_unix, k.purge_at_unix) {
        println!(
            "DELETED:      {} (purged at {}; `hsmctl key restore {}` brings it back)",
            time(del),
            time(purge),
            k.name
        );
    }
    println!(
        "state:        {} (since {})",
        k.state.as_str(),
        time(k.state_changed_unix)
    );
    println!("created:      {}", time(k.created_unix));
    println!("activated:    {}", opt_time(k.activated_unix));
    if let Some(a) = k.activate_at_unix {
        println!("activates:    {}", time(a));
    }
    println!("expires:      {}", opt_time(k.expire_at_unix));
    println!("version:      {}", k.version);
    println!("last used:    {}", opt_time(k.last_used_unix));
    println!("last rotated: {}", opt_time(k.last_rotated_unix));
    match (k.rotate_every_secs, k.next_rotation_unix) {
        (Some(e), Some(n)) => println!("rotation:     every {}, next at {}", span(e), time(n)),
        (Some(e), None) => println!("rotation:     every {} (paused: the key is not active)", span(e)),
        _ => println!("rotation:     manual"),
    }
    if let Some(note) = rotation_note(k, now) {
        println!("{note}");
    }
    println!(
        "min versions: decrypt/verify {}, encrypt {}",
        k.min_decrypt_version, k.min_encrypt_version
    );
    match (&k.owner_name, k.owner_exists) {
        (Some(n), true) => println!("owner:        uid {} ({n})", k.owner_uid),
        (None, true) => println!("owner:        uid {}", k.owner_uid),
        (n, false) => println!(
            "owner:        uid {} ({}) NO LONGER EXISTS: the key is an admin's to delete",
            k.owner_uid,
            n.as_deref().unwrap_or("no name")
        ),
    }
    if !k.description.is_empty() {
        println!("description:  {}", k.description);
    }
    if !k.labels.is_empty() {
        let l: Vec<String> = k.labels.iter().map(|(a, b)| format!("{a}={b}")).collect();
        println!("labels:       {}", l.join(", "));
    }
    if k.allow_plaintext_datakey {
        println!("datakeys:     may be returned in plain");
    }
    println!("versions:");
    let rows = k
        .versions
        .iter()
        .map(|v| {
            vec![
                format!("  v{}", v.version),
                time(v.created_unix),
                v.use_count.to_string(),
                opt_time(v.last_used_unix),
            ]
        })
        .collect();
    crate::table::print(&["  version", "created", "uses", "last used"], rows, &[2]);
}

fn usages(k: &KeyInfo) -> String {
    k.usages.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(",")
}

/// Runs one `hsmctl key …` command.
pub fn run(json: bool, client: &mut Client, cmd: &KeyCommand) -> Result<(), Failure> {
    let say = |k: &KeyInfo, text: String| {
        if json {
            print_json(k);
        } else {
            println!("{text}");
        }
    };
    match cmd {
        KeyCommand::Create {
            name,
            key_type,
            usages,
            rotate_every,
            activate_at,
            expire_at,
            description,
            labels,
            allow_plaintext_datakey,
            backend,
        } => {
            let k = client.key_create(
                name.clone(),
                *key_type,
                usages.clone(),
                KeyOptions {
                    description: description.clone(),
                    labels: labels.iter().cloned().collect::<BTreeMap<_, _>>(),
                    rotate_every_secs: *rotate_every,
                    activate_at_unix: *activate_at,
                    expire_at_unix: *expire_at,
                    allow_plaintext_datakey: *allow_plaintext_datakey,
                    backend: backend.clone(),
                },
            )?;
            say(
                &k,
                format!(
                    "created key {} ({}, backend {}, version {}, {})",
                    k.name,
                    k.key_type.as_str(),
                    k.backend,
                    k.version,
                    k.state.as_str()
                ),
            );
        }
        KeyCommand::List => {
            let list = client.key_list()?;
            {
                if json {
                    print_json(&list);
                } else {
                    let now = now_unix();
                    let mut rows = Vec::new();
                    for k in &list {
                        let mut notes = Vec::new();
                        if let Some(p) = k.purge_at_unix {
                            notes.push(format!("DELETED, purged at {}", time(p)));
                        }
                        if let Some(n) = rotation_note(k, now) {
                            notes.push(n);
                        }
                        if !k.owner_exists {
                            notes.push(format!(
                                "OWNER GONE (uid {} is no longer {}): an admin's to delete",
                                k.owner_uid,
                                k.owner_name.as_deref().unwrap_or("the user it was")
                            ));
                        }
                        rows.push(vec![
                            k.name.clone(),
                            k.key_type.as_str().to_owned(),
                            k.version.to_string(),
                            k.state.as_str().to_owned(),
                            usages(k),
                            k.owner_uid.to_string(),
                            notes.join("; "),
                        ]);
                    }
                    crate::table::print(
                        &["name", "type", "version", "state", "usages", "owner", "notes"],
                        rows,
                        &[2, 5],
                    );
                }
            }
        }
        KeyCommand::Info { name } => {
            let k = keys::info(client, name)?;
            if json {
                print_json(&k);
            } else {
                print_info(&k);
            }
        }
        KeyCommand::Exists { name } => {
            if !client.key_exists(name.clone())? {
                let e = Local::Absent.fail(format!("there is no key {name:?}"));
                if !json {
                    return Err(e);
                }
                let mut doc = e.to_json();
                doc["key"] = json!(name);
                doc["exists"] = json!(false);
                print_json(&doc);
                return Err(Failure::Quiet);
            }
            if json {
                print_json(&json!({ "key": name, "exists": true }));
            } else {
                println!("key {name} exists");
            }
        }
        KeyCommand::Public {
            name,
            format,
            output,
            force,
        } => {
            let to_stdout = crate::output::is_stdout(output.as_deref());
            // Checked before asking, so a refused output is said first.
            let mut out = if json && to_stdout {
                None
            } else {
                Some(crate::output::Output::open(
                    output.as_deref(),
                    *force,
                    matches!(format.as_str(), "der" | "raw"),
                )?)
            };
            let protocol::calls::PublicKey { key_type, spki_der, .. } = client.key_public(name.clone())?;
            {
                {
                    let bytes =
                        keys::format_public(key_type, &spki_der, format, name).map_err(|e| Local::Usage.fail(e))?;
                    if json {
                        let text = |f: &str| {
                            keys::format_public(key_type, &spki_der, f, name)
                                .ok()
                                .map(|b| String::from_utf8_lossy(&b).trim_end().to_owned())
                        };
                        print_json(&json!({
                            "key": name,
                            "type": key_type.as_str(),
                            "pem": text("pem"),
                            "openssh": text("openssh"),
                            "output": output.as_ref().filter(|_| !to_stdout),
                            "format": format,
                        }));
                    }
                    if let Some(mut out) = out.take() {
                        out.write(&bytes)?;
                        out.finish()?;
                    }
                }
            }
        }
        KeyCommand::Rotate { name } => {
            let k = client.key_rotate(name.clone())?;
            say(
                &k,
                format!(
                    "rotated key {}: new signatures and ciphertexts use version {}",
                    k.name, k.version
                ),
            );
        }
        KeyCommand::Set {
            name,
            rotate_every,
            expire_at,
            min_decrypt_version,
            min_encrypt_version,
            description,
            labels,
            remove_labels,
            allow_plaintext_datakey,
        } => {
            let changes = KeyChanges {
                description: description.clone(),
                set_labels: labels.iter().cloned().collect(),
                remove_labels: remove_labels.clone(),
                rotate_every_secs: never_or(rotate_every.as_ref(), parse_period)?,
                expire_at_unix: never_or(expire_at.as_ref(), parse_time)?,
                min_decrypt_version: *min_decrypt_version,
                min_encrypt_version: *min_encrypt_version,
                allow_plaintext_datakey: *allow_plaintext_datakey,
            };
            if changes == KeyChanges::default() {
                return Err(Local::Usage.fail("nothing to change; see `hsmctl key set --help`"));
            }
            let k = client.key_set(name.clone(), changes)?;
            say(&k, format!("updated key {}", k.name));
        }
        KeyCommand::Disable { name }
        | KeyCommand::Enable { name }
        | KeyCommand::Deactivate { name }
        | KeyCommand::Compromise { name }
        | KeyCommand::Destroy { name, .. } => {
            let to = match cmd {
                KeyCommand::Disable { .. } => Transition::Disable,
                KeyCommand::Enable { .. } => Transition::Enable,
                KeyCommand::Deactivate { .. } => Transition::Deactivate,
                KeyCommand::Compromise { .. } => Transition::Compromise,
                _ => Transition::Destroy,
            };
            if let KeyCommand::Destroy { yes, .. } = cmd {
                crate::confirm::confirm(&format!("destroying erases every version of {name:?} for good"), *yes)?;
            }
            let k = client.key_transition(name.clone(), to)?;
            say(&k, format!("key {} is now {}", k.name, k.state.as_str()));
        }
        KeyCommand::Delete { name } => {
            let k = client.key_delete(name.clone())?;
            say(
                &k,
                format!(
                    "deleted key {}: unusable now, restorable with `hsmctl key restore {}` until {}, then purged",
                    k.name,
                    k.name,
                    opt_time(k.purge_at_unix)
                ),
            );
        }
        KeyCommand::Restore { name } => {
            let k = client.key_restore(name.clone())?;
            say(&k, format!("restored key {} ({})", k.name, k.state.as_str()));
        }
        KeyCommand::Purge { name, yes } => {
            crate::confirm::confirm(&format!("purging destroys {name:?} and every version for good"), *yes)?;
            let name = client.key_purge(name.clone())?;
            if json {
                println!("{}", json!({ "purged": name }));
            } else {
                println!("purged key {name}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_spans_from_now() {
        assert_eq!(parse_time("1970-01-02T00:00:00Z"), Ok(86_400));
        let t = parse_time("1h").unwrap();
        assert!(t >= now_unix() + 3599 && t <= now_unix() + 3601);
        assert!(parse_time("next tuesday").is_err());
        assert_eq!(parse_period("90d"), Ok(90 * 86_400));
        assert!(parse_period("0s").is_err());
    }

    #[test]
    fn rotation_notes_say_overdue_or_soon() {
        let mut k: KeyInfo = serde_json::from_value(serde_json::json!({
            "name": "k", "id": "i", "key_type": "ed25519", "backend": "soft", "usages": [],
            "version": 1, "created_unix": 0, "owner_uid": 0, "owner_name": null, "owner_exists": true,
            "state": "active", "state_changed_unix": 0,
            "activated_unix": null, "activate_at_unix": null, "expire_at_unix": null, "last_used_unix": null,
            "last_rotated_unix": null, "rotate_every_secs": 1000, "next_rotation_unix": 5000,
            "min_decrypt_version": 1, "min_encrypt_version": 1, "versions": [], "description": "",
            "labels": {}, "allow_plaintext_datakey": false, "deleted_unix": null, "purge_at_unix": null
        }))
        .unwrap();
        assert!(rotation_note(&k, 6000).unwrap().contains("OVERDUE"));
        assert!(rotation_note(&k, 4950).unwrap().contains("due soon"));
        assert!(rotation_note(&k, 1000).is_none());
        k.rotate_every_secs = None;
        assert!(rotation_note(&k, 6000).is_none());
    }
}
