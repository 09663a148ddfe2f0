//! The `mock` backend: software keys (as `soft`) behind injected latency and
//! failures, to see how clients and operators cope with a slow or failing
//! device (a simulated test scenario). Development and
//! tests only: the production profile refuses to start with it configured.

use std::{sync::Arc, time::Duration};

use protocol::KeyType;
use zeroize::Zeroizing;

use super::{soft::Soft, Backend, BackendError, Health, KeyHandle, KeyLabel, NewKey};

/// The backend's name.
pub const NAME: &str = "mock";

/// What the mock injects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Injection {
    /// Added to every generation and key operation.
    pub latency: Duration,
    /// Fraction of generations and key operations that fail, 0.0 to 1.0.
    pub failure_rate: f64,
}

impl Injection {
    /// Sleeps the latency, then fails with the configured probability.
    fn apply(&self, what: &str) -> Result<(), BackendError> {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
        if self.failure_rate <= 0.0 {
            return Ok(());
        }
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| BackendError::Failed {
            backend: NAME,
            reason: format!("no randomness for the failure draw: {e}"),
        })?;
        // 53 random bits, uniform in [0, 1).
        let draw = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
        if draw < self.failure_rate {
            return Err(BackendError::Failed {
                backend: NAME,
                reason: format!(
                    "injected failure of {what} (backends.mock.failure_rate = {})",
                    self.failure_rate
                ),
            });
        }
        Ok(())
    }
}

/// The mock backend.
#[derive(Debug, Clone, Copy)]
pub struct Mock {
    injection: Injection,
}

impl Mock {
    /// A mock that injects `injection`.
    #[must_use]
    pub fn new(injection: Injection) -> Self {
        Self { injection }
    }
}

impl Backend for Mock {
    fn name(&self) -> &'static str {
        NAME
    }

    fn generate(&self, key_type: KeyType, label: KeyLabel<'_>) -> Result<NewKey, BackendError> {
        self.injection.apply("key generation")?;
        Soft.generate(key_type, label)
    }

    fn load(&self, key_type: KeyType, reference: &[u8]) -> Result<Arc<dyn KeyHandle>, BackendError> {
        let inner = Soft
            .load(key_type, reference)
            .map_err(|_| BackendError::BadReference { backend: NAME })?;
        Ok(Arc::new(MockKey {
            inner,
            injection: self.injection,
        }))
    }

    fn health(&self) -> Health {
        Health {
            healthy: true,
            detail: format!(
                "software keys with injected latency {:?} and failure rate {} (development only)",
                self.injection.latency, self.injection.failure_rate
            ),
        }
    }
}

#[derive(Debug)]
struct MockKey {
    inner: Arc<dyn KeyHandle>,
    injection: Injection,
}

impl KeyHandle for MockKey {
    fn key_type(&self) -> KeyType {
        self.inner.key_type()
    }

    fn public_spki(&self) -> Option<Vec<u8>> {
        self.inner.public_spki()
    }

    fn sign(&self, digest: &[u8]) -> Result<Vec<u8>, BackendError> {
        self.injection.apply("sign")?;
        self.inner.sign(digest)
    }

    fn verify(&self, digest: &[u8], signature: &[u8]) -> Result<bool, BackendError> {
        self.injection.apply("verify")?;
        self.inner.verify(digest, signature)
    }

    fn any_hash(&self) -> bool {
        self.inner.any_hash()
    }

    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, BackendError> {
        self.injection.apply("encrypt")?;
        self.inner.encrypt(plaintext, aad)
    }

    fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, BackendError> {
        self.injection.apply("decrypt")?;
        self.inner.decrypt(sealed, aad)
    }

    fn mac(&self, data: &[u8]) -> Result<Vec<u8>, BackendError> {
        self.injection.apply("mac")?;
        self.inner.mac(data)
    }

    fn mac_verify(&self, data: &[u8], tag: &[u8]) -> Result<bool, BackendError> {
        self.injection.apply("mac verify")?;
        self.inner.mac_verify(data, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label() -> KeyLabel<'static> {
        KeyLabel {
            key_id: "00",
            name: "k",
            version: 1,
        }
    }

    #[test]
    fn failure_rate_one_always_fails_and_zero_never_does() {
        let always = Mock::new(Injection {
            latency: Duration::ZERO,
            failure_rate: 1.0,
        });
        let e = always.generate(KeyType::Ed25519, label()).unwrap_err();
        assert!(matches!(e, BackendError::Failed { backend: "mock", .. }), "{e}");
        assert!(e.to_string().contains("failure_rate = 1"), "{e}");

        let never = Mock::new(Injection {
            latency: Duration::ZERO,
            failure_rate: 0.0,
        });
        let k = never.generate(KeyType::Ed25519, label()).unwrap();
        let handle = never.load(KeyType::Ed25519, &k.reference).unwrap();
        for _ in 0..100 {
            let sig = handle.sign(&[7; 64]).unwrap();
            assert!(handle.verify(&[7; 64], &sig).unwrap());
        }
    }

    #[test]
    fn half_the_operations_fail_at_rate_one_half() {
        let m = Mock::new(Injection {
            latency: Duration::ZERO,
            failure_rate: 0.5,
        });
        let k = Soft.generate(KeyType::HmacSha256, label()).unwrap();
        let h = m.load(KeyType::HmacSha256, &k.reference).unwrap();
        let failed = (0..2000).filter(|_| h.mac(b"x").is_err()).count();
        // Binomial(2000, 0.5): mean 1000, sd ~22; ±150 is ~7 sd.
        assert!((850..=1150).contains(&failed), "{failed} of 2000 failed");
    }

    #[test]
    fn latency_is_added_to_each_operation() {
        let m = Mock::new(Injection {
            latency: Duration::from_millis(20),
            failure_rate: 0.0,
        });
        let k = Soft.generate(KeyType::HmacSha256, label()).unwrap();
        let h = m.load(KeyType::HmacSha256, &k.reference).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..3 {
            h.mac(b"x").unwrap();
        }
        assert!(t.elapsed() >= Duration::from_millis(60), "{:?}", t.elapsed());
    }
}
