//! The rules every key meets whatever its backend: its name, and the usages
//! its type allows. (The software backend's key material is in
//! `backend::material`.)

use protocol::{KeyType, Usage};

/// Longest key name.
pub const MAX_NAME: usize = 64;

/// Checks a key name against the documented rule: 1 to 64 characters from
/// `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
///
/// # Errors
/// The rule, naming the name.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid key name {name:?}: use 1 to {MAX_NAME} characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        ))
    }
}

/// Checks requested usages against the type; empty means the type's defaults.
///
/// # Errors
/// Which usage the type cannot have.
pub fn check_usages(key_type: KeyType, requested: &[Usage]) -> Result<Vec<Usage>, String> {
    let allowed = key_type.allowed_usages();
    if requested.is_empty() {
        return Ok(allowed.to_vec());
    }
    let mut usages = requested.to_vec();
    usages.sort_unstable();
    usages.dedup();
    if let Some(bad) = usages.iter().find(|u| !allowed.contains(u)) {
        return Err(format!(
            "an {} key cannot be used to {}; it allows {}",
            key_type.as_str(),
            bad.as_str(),
            allowed.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(usages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_rule() {
        for good in ["a", "ci-release.2026", "A_b-c.d", &"x".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-lead",
            ".hidden",
            "has space",
            "slash/y",
            "ünï",
            &"x".repeat(65),
            "semi;colon",
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains("A-Z a-z 0-9 . _ -"), "{e}");
        }
    }

    #[test]
    fn usages_default_per_type_and_foreign_ones_are_refused() {
        assert_eq!(
            check_usages(KeyType::Ed25519, &[]).unwrap(),
            vec![Usage::Sign, Usage::Verify]
        );
        assert_eq!(
            check_usages(KeyType::Ed25519, &[Usage::Verify, Usage::Verify]).unwrap(),
            vec![Usage::Verify]
        );
        let e = check_usages(KeyType::Aes256Gcm, &[Usage::Sign]).unwrap_err();
        assert!(e.contains("cannot be used to sign"), "{e}");
    }
}
