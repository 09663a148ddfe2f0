//! Unlock slots, as LUKS2 has them: the master key is stored once per slot,
//! sealed under a key derived from that slot's secret. Each kind of slot is one
//! variant of [`SlotParams`]: passphrase (Argon2id), key file and TPM2 (HKDF
//! over 32 random bytes, for TPM2 sealed in the TPM).

use argon2::{Algorithm, Argon2, Params, Version};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::crypto::Key256;

pub use crate::config::Argon2Cost;

/// How a slot's key is derived from its secret; stored as JSON in the slot row
/// and bound into the sealed master key's associated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kdf", rename_all = "kebab-case")]
pub enum SlotParams {
    /// A passphrase stretched with Argon2id.
    Argon2id {
        /// Cost.
        #[serde(flatten)]
        cost: Argon2Cost,
        /// 16 random bytes, hex.
        salt: String,
    },
    /// 32 random key-file bytes expanded with HKDF-SHA256.
    HkdfSha256 {
        /// 16 random bytes, hex.
        salt: String,
    },
    /// 32 random bytes sealed in the TPM (the blobs below, which only that
    /// TPM can load), expanded with HKDF-SHA256.
    Tpm2 {
        /// 16 random bytes, hex.
        salt: String,
        /// PCRs (SHA-256 bank) the sealed secret is bound to.
        pcrs: Vec<u8>,
        /// The sealed object's public area, marshalled, hex.
        public: String,
        /// Its private blob, hex.
        private: String,
    },
    /// A FIDO2 authenticator's 32-byte hmac-secret output, expanded with
    /// HKDF-SHA256.
    Fido2 {
        /// 16 random bytes, hex.
        salt: String,
        /// Relying party id of the credential.
        rp_id: String,
        /// The credential's id, hex.
        credential_id: String,
        /// The 32-byte hmac-secret salt the authenticator is asked over, hex.
        hmac_salt: String,
    },
}

/// Why a slot key could not be derived.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The stored parameters are not ones hsmd writes.
    #[error("slot parameters are invalid: {0}")]
    BadParams(String),
    /// The secret has the wrong shape for this kind of slot.
    #[error("{0}")]
    BadSecret(String),
}

impl SlotParams {
    /// The slot kind these parameters belong to.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Argon2id { .. } => "passphrase",
            Self::HkdfSha256 { .. } => "keyfile",
            Self::Tpm2 { .. } => "tpm2",
            Self::Fido2 { .. } => "fido2",
        }
    }

    /// A one-line description for `slot list`.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Argon2id { cost, .. } => format!(
                "argon2id m={} t={} p={}",
                cost.memory_kib, cost.iterations, cost.parallelism
            ),
            Self::HkdfSha256 { .. } => "hkdf-sha256".to_owned(),
            Self::Fido2 {
                rp_id, credential_id, ..
            } => format!(
                "fido2 hmac-secret, rp {rp_id}, credential {}…",
                credential_id.get(..16).unwrap_or(credential_id)
            ),
            Self::Tpm2 { pcrs, .. } if pcrs.is_empty() => "tpm2, no PCR policy".to_owned(),
            Self::Tpm2 { pcrs, .. } => format!(
                "tpm2, sealed to PCRs {}",
                pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
            ),
        }
    }

    fn salt(&self) -> Result<Vec<u8>, SlotError> {
        let hex = match self {
            Self::Argon2id { salt, .. }
            | Self::HkdfSha256 { salt }
            | Self::Tpm2 { salt, .. }
            | Self::Fido2 { salt, .. } => salt,
        };
        let salt = hex::decode(hex).map_err(|e| SlotError::BadParams(format!("salt: {e}")))?;
        if salt.len() != 16 {
            return Err(SlotError::BadParams(format!("salt is {} bytes, not 16", salt.len())));
        }
        Ok(salt)
    }

    /// Derives the slot key from `secret`. Slow for passphrase slots (by design):
    /// call it off the reactor and without holding locks.
    ///
    /// # Errors
    /// [`SlotError`] for unusable parameters or a secret of the wrong shape.
    pub fn derive(&self, secret: &[u8]) -> Result<Key256, SlotError> {
        let salt = self.salt()?;
        let mut out = Zeroizing::new([0u8; 32]);
        match self {
            Self::Argon2id { cost, .. } => {
                if let Some(problem) = cost.problem() {
                    return Err(SlotError::BadParams(problem));
                }
                let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, Some(32))
                    .map_err(|e| SlotError::BadParams(e.to_string()))?;
                Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                    .hash_password_into(secret, &salt, out.as_mut())
                    .map_err(|e| SlotError::BadParams(e.to_string()))?;
            }
            Self::HkdfSha256 { .. } | Self::Tpm2 { .. } | Self::Fido2 { .. } => {
                let (what, info): (&str, &[u8]) = match self {
                    Self::Tpm2 { .. } => ("a TPM2 slot's sealed secret", b"hsmd tpm2 slot v1"),
                    Self::Fido2 { .. } => ("an hmac-secret output", b"hsmd fido2 slot v1"),
                    _ => ("a key file", b"hsmd keyfile slot v1"),
                };
                if secret.len() != 32 {
                    return Err(SlotError::BadSecret(format!(
                        "{what} holds exactly 32 bytes; this one has {}",
                        secret.len()
                    )));
                }
                Hkdf::<Sha256>::new(Some(&salt), secret)
                    .expand(info, out.as_mut())
                    .map_err(|e| SlotError::BadParams(e.to_string()))?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argon(cost: Argon2Cost) -> SlotParams {
        SlotParams::Argon2id {
            cost,
            salt: "00112233445566778899aabbccddeeff".into(),
        }
    }

    #[test]
    fn argon2id_matches_the_reference_parameters_and_depends_on_every_input() {
        let p = argon(Argon2Cost::FLOOR);
        let a = p.derive(b"correct horse").unwrap();
        assert_eq!(a, p.derive(b"correct horse").unwrap(), "deterministic");
        assert_ne!(a, p.derive(b"correct horsf").unwrap());
        let other_salt = SlotParams::Argon2id {
            cost: Argon2Cost::FLOOR,
            salt: "ff112233445566778899aabbccddeeff".into(),
        };
        assert_ne!(a, other_salt.derive(b"correct horse").unwrap());
        let costlier = argon(Argon2Cost {
            iterations: 3,
            ..Argon2Cost::FLOOR
        });
        assert_ne!(a, costlier.derive(b"correct horse").unwrap());
    }

    #[test]
    fn stored_costs_outside_the_bounds_are_refused_before_any_work() {
        for cost in [
            Argon2Cost {
                memory_kib: 1024,
                ..Argon2Cost::FLOOR
            },
            Argon2Cost {
                iterations: 1,
                ..Argon2Cost::FLOOR
            },
            Argon2Cost {
                memory_kib: u32::MAX,
                ..Argon2Cost::FLOOR
            },
        ] {
            assert!(
                matches!(argon(cost).derive(b"x"), Err(SlotError::BadParams(_))),
                "{cost:?}"
            );
        }
        assert!(Argon2Cost::default().problem().is_none());
    }

    #[test]
    fn keyfile_slots_take_exactly_32_bytes() {
        let p = SlotParams::HkdfSha256 {
            salt: "00112233445566778899aabbccddeeff".into(),
        };
        assert!(p.derive(&[7; 32]).is_ok());
        assert!(matches!(p.derive(&[7; 31]), Err(SlotError::BadSecret(_))));
    }

    #[test]
    fn params_round_trip_as_json_and_unknown_kdfs_are_refused() {
        let p = argon(Argon2Cost::default());
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"kdf":"argon2id","memory_kib":65536,"iterations":3,"parallelism":1,"salt":"00112233445566778899aabbccddeeff"}"#
        );
        assert_eq!(serde_json::from_str::<SlotParams>(&json).unwrap(), p);
        assert!(serde_json::from_str::<SlotParams>(r#"{"kdf":"md5","salt":"00"}"#).is_err());
    }
}
