//! `hsmd-bench --suite pkcs11`: signatures through hsmd's PKCS#11 module
//! (`libhsmd_pkcs11.so`) beside SoftHSM2's own module, in the same run and
//! the same process, driven the same way through cryptoki: a thread per
//! client, each with its own session, calling `C_Sign` over a 32-byte digest
//! (ECDSA P-256) or a 32-byte message (Ed25519), one at a time, as a program
//! signing through `pkcs11-tool` or OpenSSL's engine would. The hsmd key is
//! in hsmd's soft backend; the SoftHSM2 key is in SoftHSM2's token. Beside
//! them, the same signature made in this process with the crates hsmd's soft
//! backend signs with, on as many threads: the ceiling for hsmd's figure.

use std::{sync::Arc, thread};

use anyhow::{Context as _, Result};
use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    mechanism::{
        eddsa::{EddsaParams, EddsaSignatureScheme},
        Mechanism,
    },
    object::{Attribute, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::Slot,
    types::AuthPin,
};

use crate::{
    measure::{in_process_ed25519, in_process_p256, measure, median, Figures, LATENCIES},
    Daemon, SoftHsm, SOFTHSM_MODULE,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct Pkcs11Bench {
    /// Seconds per measured run.
    pub seconds: f64,
    /// Runs per figure (the median is printed).
    pub rounds: usize,
    /// Client counts, one row each.
    pub clients: Vec<usize>,
    /// hsmd's `limits.reactor_threads`.
    pub reactor_threads: u32,
}

/// DER of the P-256 and Ed25519 curve OIDs (`CKA_EC_PARAMS`).
const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// One loaded and initialized module, and the slot whose token holds the keys.
#[derive(Debug)]
pub struct Module {
    p11: Pkcs11,
    slot: Slot,
    pin: Option<String>,
}

/// Loads and initializes the module at `path` and finds the token labelled
/// `token`; `pin` logs each session in (SoftHSM2's user PIN; none for hsmd).
///
/// # Errors
/// A module that does not load or initialize, or no such token.
pub fn load(path: &std::path::Path, token: &str, pin: Option<String>) -> Result<Module> {
    let p11 = Pkcs11::new(path).with_context(|| format!("load {}", path.display()))?;
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = p11
        .get_slots_with_token()?
        .into_iter()
        .find(|s| p11.get_token_info(*s).is_ok_and(|t| t.label().trim() == token))
        .with_context(|| format!("no token {token:?} in {}", path.display()))?;
    Ok(Module { p11, slot, pin })
}

impl Module {
    /// A new session (logged in where the token needs it) and the private key
    /// labelled `label` in it: what each signing thread starts with.
    ///
    /// # Errors
    /// A session that does not open or log in, or no such key.
    pub fn signing_session(&self, label: &str) -> Result<(Session, ObjectHandle)> {
        let session = self.p11.open_ro_session(self.slot)?;
        self.login(&session)?;
        let key = *session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])?
            .first()
            .with_context(|| format!("no private key {label:?}"))?;
        Ok((session, key))
    }

    /// Logs the application in, once: a token that needs a PIN (SoftHSM2)
    /// answers that any later session is logged in already.
    fn login(&self, session: &Session) -> Result<()> {
        let Some(pin) = &self.pin else { return Ok(()) };
        match session.login(UserType::User, Some(&AuthPin::new(pin.clone().into()))) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Makes the SoftHSM2 key pairs the benchmark signs with.
fn softhsm_keys(m: &Module) -> Result<()> {
    let session = m.p11.open_rw_session(m.slot)?;
    m.login(&session)?;
    for (label, mechanism, params) in [
        ("bench-p256", Mechanism::EccKeyPairGen, P256),
        ("bench-ed25519", Mechanism::EccEdwardsKeyPairGen, ED25519),
    ] {
        session.generate_key_pair(
            &mechanism,
            &[
                Attribute::Token(true),
                Attribute::EcParams(params.to_vec()),
                Attribute::Verify(true),
                Attribute::Label(label.into()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
                Attribute::Label(label.into()),
            ],
        )?;
    }
    Ok(())
}

fn sign_rate(m: &Arc<Module>, label: &str, ed: bool, clients: usize, secs: f64) -> Result<Figures> {
    let m = Arc::clone(m);
    let label = label.to_owned();
    measure(clients, secs, move || {
        let (session, key) = m.signing_session(&label)?;
        Ok(move || -> Result<()> {
            // Built per call: cryptoki's Mechanism holds raw pointers and may
            // not cross threads; building it costs nothing beside C_Sign.
            let mechanism = if ed {
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure))
            } else {
                Mechanism::Ecdsa
            };
            session.sign(&mechanism, key, &[7; 32])?;
            Ok(())
        })
    })
}

/// Runs the suite and prints its table.
///
/// # Errors
/// A daemon, module or token that fails.
pub fn run(b: &Pkcs11Bench) -> Result<()> {
    let daemon = Daemon::builder()
        .dev()
        .limit("max_connections", "128")
        .limit("reactor_threads", &b.reactor_threads.to_string())
        .start();
    for (name, key_type) in [
        ("bench-p256", protocol::KeyType::EcdsaP256),
        ("bench-ed25519", protocol::KeyType::Ed25519),
    ] {
        daemon.client().call(protocol::Operation::KeyCreate {
            name: name.into(),
            key_type,
            usages: Vec::new(),
            options: protocol::KeyOptions::default(),
        })?;
    }
    let hsm = SoftHsm::new("hsmd-bench-p11");
    // Both modules read their configuration at C_Initialize, here, before any
    // client thread exists.
    std::env::set_var("SOFTHSM2_CONF", hsm.conf());
    std::env::set_var("HSMD_SOCKET", &daemon.socket);
    let ours = Arc::new(load(&crate::pkcs11_module(), "hsmd", None)?);
    let theirs = Arc::new(load(
        std::path::Path::new(SOFTHSM_MODULE),
        &hsm.label,
        Some(hsm.pin.clone()),
    )?);
    softhsm_keys(&theirs)?;
    println!(
        "\nPKCS#11 module signing benchmark: {} s per run, median of {} round{}, {} cores, a session per client thread, one C_Sign at a time",
        b.seconds,
        b.rounds,
        if b.rounds == 1 { "" } else { "s" },
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    for (title, label, ed) in [
        ("ecdsa-p256 (CKM_ECDSA over a 32-byte digest)", "bench-p256", false),
        ("ed25519 (CKM_EDDSA over 32 bytes)", "bench-ed25519", true),
    ] {
        println!("{title}:");
        println!(
            "{:>7} | {:>12} {:>22} | {:>12} {:>22} | {:>12} | {:>12}",
            "clients", "hsmd .so/s", LATENCIES, "softhsm2/s", LATENCIES, "hsmd/softhsm", "in-proc/s"
        );
        for &clients in &b.clients {
            let (mut h, mut s, mut l) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..b.rounds {
                h.push(sign_rate(&ours, label, ed, clients, b.seconds)?);
                s.push(sign_rate(&theirs, label, ed, clients, b.seconds)?);
                let make = if ed { in_process_ed25519 } else { in_process_p256 };
                l.push(measure(clients, b.seconds, move || Ok(make()))?);
            }
            let (h, s, l) = (median(h), median(s), median(l));
            println!(
                "{clients:>7} | {:>12.0} {:>22} | {:>12.0} {:>22} | {:>11.1}% | {:>12.0}",
                h.per_sec,
                h.latencies(),
                s.per_sec,
                s.latencies(),
                h.per_sec / s.per_sec * 100.0,
                l.per_sec
            );
        }
    }
    Ok(())
}
