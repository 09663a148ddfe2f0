//! FIDO2 unlock slots, the client's half: the authenticator is on the
//! operator's machine, so hsmctl talks to it. Enrolment makes a credential
//! for the relying party `hsmd` with the hmac-secret extension, draws a random
//! 32-byte salt and asks for the hmac-secret output over it (a touch, and the
//! PIN where one is set); the output is the slot's secret, which hsmd expands
//! and seals the master key under. Unlocking asks the authenticator again for
//! each FIDO2 slot's credential and salt (from `SlotList`, none of it secret);
//! the same authenticator gives the same output.
//!
//! The device is reached through ctap-hid-fido2 (feature `fido2`, which needs
//! libudev-dev to build). The feature `fido2-emulator` adds an emulated
//! authenticator for the tests, chosen by `HSMCTL_FIDO2_EMULATOR` (the hex of
//! its 32-byte credential key): it computes hmac-secret as an authenticator
//! does, HMAC-SHA-256(CredRandom, salt).

use protocol::{Fido2Challenge, SecretBytes, SlotInfo};
use zeroize::Zeroizing;

/// The relying party id hsmd's credentials are made for.
pub const RP_ID: &str = "hsmd";

/// What hsmctl needs from an authenticator.
pub trait Authenticator {
    /// Makes a credential with hmac-secret for `rp_id`; returns its id.
    ///
    /// # Errors
    /// The device's refusal, in words.
    fn make_credential(&mut self, rp_id: &str, pin: Option<&str>) -> Result<Vec<u8>, String>;

    /// The hmac-secret output of `credential_id` over `salt`; `Ok(None)` if
    /// this authenticator does not hold that credential.
    ///
    /// # Errors
    /// The device's refusal, in words.
    fn hmac_secret(
        &mut self,
        rp_id: &str,
        credential_id: &[u8],
        salt: &[u8; 32],
        pin: Option<&str>,
    ) -> Result<Option<Zeroizing<[u8; 32]>>, String>;
}

/// A new slot's challenge and secret.
pub struct Enrolment {
    /// What to ask at unlock.
    pub challenge: Fido2Challenge,
    /// The hmac-secret output.
    pub secret: SecretBytes,
}

/// Enrols `auth`: a credential, a random salt, the output over it.
///
/// # Errors
/// The authenticator's refusal, or no randomness.
pub fn enrol(auth: &mut dyn Authenticator, pin: Option<&str>) -> Result<Enrolment, String> {
    let credential_id = auth.make_credential(RP_ID, pin)?;
    let mut salt = [0u8; 32];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness for the salt: {e}"))?;
    let secret = auth
        .hmac_secret(RP_ID, &credential_id, &salt, pin)?
        .ok_or("the authenticator does not recognise the credential it just made")?;
    Ok(Enrolment {
        challenge: Fido2Challenge {
            rp_id: RP_ID.to_owned(),
            credential_id,
            salt: salt.to_vec(),
        },
        secret: SecretBytes::new(secret.to_vec()),
    })
}

/// Asks `auth` for each FIDO2 slot's output; the first credential it holds
/// gives (credential id, output).
///
/// # Errors
/// No FIDO2 slot, or none the authenticator holds.
pub fn unlock_secret(
    auth: &mut dyn Authenticator,
    slots: &[SlotInfo],
    pin: Option<&str>,
) -> Result<(Vec<u8>, SecretBytes), String> {
    let challenges: Vec<&Fido2Challenge> = slots.iter().filter_map(|s| s.fido2.as_ref()).collect();
    if challenges.is_empty() {
        return Err("hsmd has no fido2 slot; add one with `hsmctl slot add --fido2`".into());
    }
    for c in challenges {
        let Ok(salt) = <[u8; 32]>::try_from(c.salt.as_slice()) else {
            continue;
        };
        if let Some(out) = auth.hmac_secret(&c.rp_id, &c.credential_id, &salt, pin)? {
            return Ok((c.credential_id.clone(), SecretBytes::new(out.to_vec())));
        }
    }
    Err(
        "this authenticator holds none of hsmd's fido2 slot credentials; use the one you enrolled, or another slot"
            .into(),
    )
}

/// The authenticator to use: the emulator where built in and asked for,
/// else the one FIDO2 device plugged in.
///
/// # Errors
/// "no FIDO2 authenticator found" (and why, when hsmctl cannot look).
pub fn open() -> Result<Box<dyn Authenticator>, String> {
    #[cfg(feature = "fido2-emulator")]
    if let Ok(hex_key) = std::env::var("HSMCTL_FIDO2_EMULATOR") {
        return Ok(Box::new(Emulator::from_hex(&hex_key)?));
    }
    #[cfg(feature = "fido2")]
    {
        hid::open()
    }
    #[cfg(not(feature = "fido2"))]
    {
        Err("no FIDO2 authenticator found: this hsmctl was built without FIDO2 support (build it with --features fido2)".into())
    }
}

#[cfg(feature = "fido2")]
mod hid {
    use ctap_hid_fido2::{
        fidokey::{
            get_assertion::get_assertion_params::Extension as Gext,
            make_credential::make_credential_params::Extension as Mext, GetAssertionArgsBuilder,
            MakeCredentialArgsBuilder,
        },
        verifier, FidoKeyHid, FidoKeyHidFactory, LibCfg,
    };
    use zeroize::Zeroizing;

    use super::Authenticator;

    pub struct Hid(FidoKeyHid);

    pub fn open() -> Result<Box<dyn Authenticator>, String> {
        if ctap_hid_fido2::get_fidokey_devices().is_empty() {
            return Err("no FIDO2 authenticator found: plug one in (or use another slot)".into());
        }
        let cfg = LibCfg::init().with_keep_alive_msg_to_stderr(true);
        // The crate's errors carry a backtrace in their Debug form: print Display.
        FidoKeyHidFactory::create(&cfg)
            .map(|d| Box::new(Hid(d)) as Box<dyn Authenticator>)
            .map_err(|e| format!("cannot open the FIDO2 authenticator: {e}"))
    }

    impl Authenticator for Hid {
        fn make_credential(&mut self, rp_id: &str, pin: Option<&str>) -> Result<Vec<u8>, String> {
            let challenge = verifier::create_challenge();
            let ext = [Mext::HmacSecret(Some(true))];
            let mut args = MakeCredentialArgsBuilder::new(rp_id, &challenge).extensions(&ext);
            args = match pin {
                Some(p) => args.pin(p),
                None => args.without_pin_and_uv(),
            };
            eprintln!("hsmctl: touch the authenticator to make the credential");
            let att = self
                .0
                .make_credential_with_args(&args.build())
                .map_err(|e| format!("the authenticator refused to make a credential: {e}"))?;
            if !att.extensions.iter().any(|e| matches!(e, Mext::HmacSecret(Some(true)))) {
                return Err("the authenticator does not support the hmac-secret extension".into());
            }
            Ok(att.credential_descriptor.id)
        }

        fn hmac_secret(
            &mut self,
            rp_id: &str,
            credential_id: &[u8],
            salt: &[u8; 32],
            pin: Option<&str>,
        ) -> Result<Option<Zeroizing<[u8; 32]>>, String> {
            let challenge = verifier::create_challenge();
            let ext = [Gext::HmacSecret(Some(*salt))];
            let mut args = GetAssertionArgsBuilder::new(rp_id, &challenge)
                .credential_id(credential_id)
                .extensions(&ext);
            args = match pin {
                Some(p) => args.pin(p),
                None => args.without_pin_and_uv(),
            };
            eprintln!("hsmctl: touch the authenticator");
            let assertions = match self.0.get_assertion_with_args(&args.build()) {
                Ok(a) => a,
                // CTAP2_ERR_NO_CREDENTIALS: not this authenticator's credential.
                Err(e) if e.to_string().contains("NO_CREDENTIALS") || e.to_string().contains("0x2E") => {
                    return Ok(None)
                }
                Err(e) => return Err(format!("the authenticator refused: {e}")),
            };
            let out = assertions
                .iter()
                .flat_map(|a| a.extensions.iter())
                .find_map(|e| match e {
                    Gext::HmacSecret(Some(o)) => Some(Zeroizing::new(*o)),
                    _ => None,
                });
            out.map(Some)
                .ok_or_else(|| "the authenticator gave no hmac-secret output".into())
        }
    }
}

/// An emulated authenticator (tests): one credential whose CredRandom is the
/// configured key; hmac-secret = HMAC-SHA-256(CredRandom, salt), as CTAP 2.1
/// section 12.5 defines it.
#[cfg(any(test, feature = "fido2-emulator"))]
pub struct Emulator {
    cred_random: Zeroizing<[u8; 32]>,
}

#[cfg(any(test, feature = "fido2-emulator"))]
impl Emulator {
    /// From the hex of a 32-byte CredRandom.
    ///
    /// # Errors
    /// Not 64 hex digits.
    pub fn from_hex(hex_key: &str) -> Result<Self, String> {
        let bytes = hex::decode(hex_key.trim()).map_err(|e| format!("HSMCTL_FIDO2_EMULATOR: {e}"))?;
        let cred_random = <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| "HSMCTL_FIDO2_EMULATOR must be 32 bytes of hex".to_owned())?;
        Ok(Self {
            cred_random: Zeroizing::new(cred_random),
        })
    }

    fn credential_id(&self) -> Vec<u8> {
        use sha2::Digest as _;
        sha2::Sha256::digest(self.cred_random.as_ref())[..16].to_vec()
    }
}

#[cfg(any(test, feature = "fido2-emulator"))]
impl Authenticator for Emulator {
    fn make_credential(&mut self, _rp_id: &str, _pin: Option<&str>) -> Result<Vec<u8>, String> {
        Ok(self.credential_id())
    }

    fn hmac_secret(
        &mut self,
        _rp_id: &str,
        credential_id: &[u8],
        salt: &[u8; 32],
        _pin: Option<&str>,
    ) -> Result<Option<Zeroizing<[u8; 32]>>, String> {
        use hmac::Mac as _;
        if credential_id != self.credential_id() {
            return Ok(None);
        }
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(self.cred_random.as_ref()).map_err(|e| e.to_string())?;
        mac.update(salt);
        Ok(Some(Zeroizing::new(mac.finalize().into_bytes().into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: u32, challenge: Fido2Challenge) -> SlotInfo {
        SlotInfo {
            id,
            kind: "fido2".into(),
            label: String::new(),
            created_unix: 0,
            kdf: None,
            fido2: Some(challenge),
        }
    }

    #[test]
    fn enrolment_and_unlock_give_the_same_secret_from_the_same_authenticator_only() {
        let mut key = Emulator::from_hex(&"11".repeat(32)).unwrap();
        let e = enrol(&mut key, None).unwrap();
        assert_eq!(e.challenge.rp_id, "hsmd");
        assert_eq!(e.challenge.salt.len(), 32);
        // The output is the hmac-secret of the CTAP 2.1 spec: HMAC-SHA-256(CredRandom, salt).
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&[0x11; 32]).unwrap();
        mac.update(&e.challenge.salt);
        assert_eq!(e.secret.expose(), mac.finalize().into_bytes().as_slice());

        let slots = vec![
            SlotInfo {
                id: 1,
                kind: "passphrase".into(),
                label: String::new(),
                created_unix: 0,
                kdf: None,
                fido2: None,
            },
            slot(2, e.challenge.clone()),
        ];
        let (cred, secret) = unlock_secret(&mut key, &slots, None).unwrap();
        assert_eq!(cred, e.challenge.credential_id);
        assert_eq!(secret.expose(), e.secret.expose());

        // Another authenticator holds none of the credentials.
        let mut other = Emulator::from_hex(&"22".repeat(32)).unwrap();
        let err = unlock_secret(&mut other, &slots, None).unwrap_err();
        assert!(err.contains("holds none"), "{err}");
        // No FIDO2 slot at all.
        let err = unlock_secret(&mut key, &slots[..1], None).unwrap_err();
        assert!(err.contains("no fido2 slot"), "{err}");
        // A fresh enrolment draws a fresh salt, so a fresh secret.
        let e2 = enrol(&mut key, None).unwrap();
        assert_ne!(e2.challenge.salt, e.challenge.salt);
        assert_ne!(e2.secret.expose(), e.secret.expose());
    }
}
