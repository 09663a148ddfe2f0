//! Key lifecycle rules, after NIST SP 800-57 part 1 (section 5.3): which state
//! allows which use, and which changes of state an operator may make. Pure
//! functions of the stored state, the activation and expiry times, and the
//! clock, so the table in the README can be tested row by row.

use protocol::{KeyState, Transition};

/// What a request wants to do with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Make a signature.
    Sign,
    /// Check a signature.
    Verify,
    /// Seal data.
    Encrypt,
    /// Open sealed data.
    Decrypt,
    /// Make an HMAC tag.
    Mac,
    /// Check an HMAC tag.
    MacVerify,
    /// Open and re-seal under a newer version.
    Rewrap,
    /// Seal a fresh data key.
    DataKey,
    /// Add a version.
    Rotate,
    /// Read the public key.
    PublicKey,
}

impl Action {
    /// The verb, as the refusal says it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sign => "sign",
            Self::Verify => "verify",
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Mac => "mac",
            Self::MacVerify => "mac-verify",
            Self::Rewrap => "rewrap",
            Self::DataKey => "datakey",
            Self::Rotate => "rotate",
            Self::PublicKey => "export its public key",
        }
    }

    /// Whether the action only checks or opens what the key made before
    /// (NIST: "process"), as opposed to making something new ("apply").
    #[must_use]
    pub fn processes_only(self) -> bool {
        matches!(self, Self::Verify | Self::Decrypt | Self::MacVerify)
    }
}

/// Every action, in the README table's column order.
pub const ACTIONS: [Action; 10] = [
    Action::Sign,
    Action::Verify,
    Action::Encrypt,
    Action::Decrypt,
    Action::Mac,
    Action::MacVerify,
    Action::Rewrap,
    Action::DataKey,
    Action::Rotate,
    Action::PublicKey,
];

/// The state in force at `now`: a pre-active key whose activation time has
/// come is active, and any key not compromised or destroyed is deactivated
/// once its expiry time has come.
#[must_use]
pub fn effective(stored: KeyState, activate_at: Option<u64>, expire_at: Option<u64>, now: u64) -> KeyState {
    let state = match stored {
        KeyState::PreActive if activate_at.is_some_and(|t| t <= now) => KeyState::Active,
        s => s,
    };
    match state {
        KeyState::PreActive | KeyState::Active | KeyState::Suspended if expire_at.is_some_and(|t| t <= now) => {
            KeyState::Deactivated
        }
        s => s,
    }
}

/// How an allowed use is to be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Normally.
    Yes,
    /// Allowed because the request asked explicitly; log it at high risk.
    HighRisk,
}

/// Whether a key in `state` may perform `action`; the error says why not, and
/// how to get on.
///
/// # Errors
/// The reason, naming the state and what it forbids.
pub fn check(name: &str, state: KeyState, action: Action, allow_compromised: bool) -> Result<Allowed, String> {
    let verb = action.as_str();
    let refuse = |rule: &str| Err(format!("key {name:?} is {}: {rule}; it cannot {verb}", state.as_str()));
    match state {
        KeyState::Active => Ok(Allowed::Yes),
        KeyState::PreActive => match action {
            Action::PublicKey | Action::Rotate => Ok(Allowed::Yes),
            _ => refuse("a pre-active key is used for nothing until its activation time or `hsmctl key enable`"),
        },
        KeyState::Suspended => match action {
            Action::PublicKey => Ok(Allowed::Yes),
            _ => refuse("a suspended key is used for nothing until `hsmctl key enable`"),
        },
        KeyState::Deactivated => match action {
            Action::PublicKey => Ok(Allowed::Yes),
            a if a.processes_only() => Ok(Allowed::Yes),
            _ => refuse("a deactivated key may only verify and decrypt"),
        },
        KeyState::Compromised => match action {
            Action::PublicKey => Ok(Allowed::HighRisk),
            a if a.processes_only() && allow_compromised => Ok(Allowed::HighRisk),
            a if a.processes_only() => {
                refuse("a compromised key verifies and decrypts only when the request allows it explicitly (hsmctl --allow-compromised)")
            }
            _ => refuse("a compromised key may never again sign or encrypt"),
        },
        KeyState::Destroyed => refuse("its material has been erased"),
    }
}

/// The stored state after `to`, from the state in force now.
///
/// # Errors
/// Why the change is not allowed from `now_state`.
pub fn transition(name: &str, now_state: KeyState, to: Transition) -> Result<KeyState, String> {
    use KeyState as S;
    let refuse = |what: &str, from: &str| {
        Err(format!(
            "key {name:?} is {}; only {from} can be {what}",
            now_state.as_str()
        ))
    };
    match (to, now_state) {
        (Transition::Disable, S::Active) => Ok(S::Suspended),
        (Transition::Disable, _) => refuse("disabled", "an active key"),
        (Transition::Enable, S::Suspended | S::PreActive) => Ok(S::Active),
        (Transition::Enable, _) => refuse("enabled", "a suspended or pre-active key"),
        (Transition::Deactivate, S::PreActive | S::Active | S::Suspended) => Ok(S::Deactivated),
        (Transition::Deactivate, _) => refuse("deactivated", "a pre-active, active or suspended key"),
        (Transition::Compromise, S::Destroyed) => refuse("marked compromised", "a key that is not destroyed"),
        (Transition::Compromise, _) => Ok(S::Compromised),
        (Transition::Destroy, S::Destroyed) => Err(format!("key {name:?} is destroyed already")),
        (Transition::Destroy, _) => Ok(S::Destroyed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_and_expiry_times_move_the_state_in_force() {
        assert_eq!(effective(KeyState::PreActive, Some(100), None, 99), KeyState::PreActive);
        assert_eq!(effective(KeyState::PreActive, Some(100), None, 100), KeyState::Active);
        assert_eq!(effective(KeyState::PreActive, None, None, 1_000), KeyState::PreActive);
        assert_eq!(effective(KeyState::Active, None, Some(50), 49), KeyState::Active);
        assert_eq!(effective(KeyState::Active, None, Some(50), 50), KeyState::Deactivated);
        assert_eq!(
            effective(KeyState::Suspended, None, Some(50), 60),
            KeyState::Deactivated
        );
        assert_eq!(
            effective(KeyState::PreActive, Some(10), Some(5), 20),
            KeyState::Deactivated
        );
        // Expiry does not soften a compromise or undo a destruction.
        assert_eq!(
            effective(KeyState::Compromised, None, Some(1), 9),
            KeyState::Compromised
        );
        assert_eq!(effective(KeyState::Destroyed, None, Some(1), 9), KeyState::Destroyed);
    }

    #[test]
    fn compromised_keys_process_only_when_asked_and_then_at_high_risk() {
        assert!(check("k", KeyState::Compromised, Action::Decrypt, false).is_err());
        assert_eq!(
            check("k", KeyState::Compromised, Action::Decrypt, true),
            Ok(Allowed::HighRisk)
        );
        assert!(check("k", KeyState::Compromised, Action::Sign, true).is_err());
    }

    #[test]
    fn refusals_name_the_key_the_state_and_the_verb() {
        let e = check("ci-sign", KeyState::Suspended, Action::Sign, false).unwrap_err();
        assert!(
            e.contains("\"ci-sign\" is suspended") && e.contains("cannot sign"),
            "{e}"
        );
        let e = check("old", KeyState::Deactivated, Action::Encrypt, false).unwrap_err();
        assert!(e.contains("may only verify and decrypt"), "{e}");
    }

    #[test]
    fn transitions_follow_the_lifecycle() {
        use KeyState as S;
        assert_eq!(transition("k", S::Active, Transition::Disable), Ok(S::Suspended));
        assert!(transition("k", S::Suspended, Transition::Disable).is_err());
        assert_eq!(transition("k", S::Suspended, Transition::Enable), Ok(S::Active));
        assert_eq!(transition("k", S::PreActive, Transition::Enable), Ok(S::Active));
        assert!(transition("k", S::Deactivated, Transition::Enable).is_err());
        assert!(transition("k", S::Compromised, Transition::Enable).is_err());
        assert_eq!(
            transition("k", S::Deactivated, Transition::Compromise),
            Ok(S::Compromised)
        );
        assert!(transition("k", S::Destroyed, Transition::Compromise).is_err());
        assert_eq!(transition("k", S::Compromised, Transition::Destroy), Ok(S::Destroyed));
        assert!(transition("k", S::Destroyed, Transition::Destroy).is_err());
    }
}
