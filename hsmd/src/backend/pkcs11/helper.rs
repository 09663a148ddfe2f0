//! The PKCS#11 helper process (`hsmd --pkcs11-helper`), after OpenSSH's
//! `ssh-pkcs11-helper`: the vendor module is loaded here and never inside
//! hsmd, so a module that crashes, hangs or scribbles over memory takes down
//! only this process, which hsmd restarts. It talks to hsmd over the
//! socketpair it was given as stdin and stdout, and exits when hsmd closes it.
//!
//! A pool of workers, each holding its own session (PKCS#11 sessions are
//! single-threaded), serves requests in parallel: the idle worker holding the
//! socket reads the next request and serves it itself, and answers go back
//! tagged with the request's id, in whatever order they finish.

use std::{
    collections::HashMap,
    io::{BufReader, BufWriter, Write as _},
    os::{fd::AsFd as _, unix::net::UnixStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::{
        aead::GcmParams,
        eddsa::{EddsaParams, EddsaSignatureScheme},
        rsa::{PkcsMgfType, PkcsPssParams},
        Mechanism, MechanismType,
    },
    object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::Slot,
    types::AuthPin,
};
use protocol::{KeyType, RsaScheme};
use zeroize::Zeroizing;

use super::super::rsa_public;
use super::wire::{self, Envelope, Failure, Open, Reply, Request, Response, TokenSummary};

/// DER of the named curves' OIDs, as CKA_EC_PARAMS wants them.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// Runs the helper on stdin/stdout until hsmd closes the pair. The exit
/// status says why it ended (hsmd logs it).
#[must_use]
pub fn run() -> std::process::ExitCode {
    // Key operations see plaintext and the PIN: no core files, no ptrace by
    // other processes of the same user, memory locked where allowed.
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = nix::sys::mman::mlockall(
        nix::sys::mman::MlockAllFlags::MCL_CURRENT | nix::sys::mman::MlockAllFlags::MCL_FUTURE,
    );
    match serve() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsmd pkcs11-helper: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn stdio_stream() -> std::io::Result<UnixStream> {
    // hsmd hands the socketpair over as stdin; stdout is the same socket.
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    Ok(UnixStream::from(fd))
}

fn serve() -> Result<(), String> {
    let stream = stdio_stream().map_err(|e| format!("stdin is not hsmd's socket: {e}"))?;
    let writer = Arc::new(Mutex::new(BufWriter::new(
        stream.try_clone().map_err(|e| e.to_string())?,
    )));
    let mut reader = BufReader::new(stream);
    let open: Open = match wire::read_frame(&mut reader) {
        Ok(Some(o)) => o,
        Ok(None) => return Ok(()),
        Err(e) => return Err(format!("bad first frame: {e}")),
    };
    let token = match Token::open(&open) {
        Ok(t) => t,
        Err(f) => {
            let mut w = lock(&writer);
            let _ = wire::write_frame(&mut *w, &Response { id: 0, result: Err(f) });
            let _ = w.flush();
            return Ok(());
        }
    };
    let (summary, sessions, p11, slot) = token;
    {
        let mut w = lock(&writer);
        wire::write_frame(
            &mut *w,
            &Response {
                id: 0,
                result: Ok(Reply::Token(summary.clone())),
            },
        )
        .and_then(|()| w.flush())
        .map_err(|e| e.to_string())?;
    }
    let shared = Arc::new(Shared {
        handles: Mutex::new(Handles::default()),
        summary,
        p11,
        slot,
    });
    // Each worker, holding its own session, reads the next request itself and
    // serves it: no thread stands between the socket and the token, so a
    // request costs one wake-up here, not two. The reader's lock passes the
    // socket from one idle worker to the next, but only when another request
    // is already waiting or the token is slow: a worker that finds nothing
    // more keeps the socket while it serves a quick request and reads the
    // next one itself, so one request at a time wakes no other thread, and a
    // request arriving meanwhile waits at most one quick operation.
    let reader = Arc::new(Mutex::new(reader));
    let quick = Arc::new(AtomicBool::new(true));
    let (ended_tx, ended_rx) = mpsc::channel::<Result<(), String>>();
    for session in sessions {
        let (reader, writer, shared, ended, quick) = (
            Arc::clone(&reader),
            Arc::clone(&writer),
            Arc::clone(&shared),
            ended_tx.clone(),
            Arc::clone(&quick),
        );
        std::thread::spawn(move || {
            let mut held = None;
            loop {
                let mut r = held.take().unwrap_or_else(|| lock(&reader));
                let job = match wire::read_frame::<Envelope>(&mut *r) {
                    Ok(Some(j)) => j,
                    Ok(None) => {
                        let _ = ended.send(Ok(()));
                        return;
                    }
                    Err(e) => {
                        let _ = ended.send(Err(format!("bad frame from hsmd: {e}")));
                        return;
                    }
                };
                // Key generation can take seconds: never with the socket held.
                let keep = matches!(
                    job.request,
                    Request::Sign { .. } | Request::Encrypt { .. } | Request::Decrypt { .. }
                );
                if keep && quick.load(Ordering::Relaxed) && !more_waiting(&r) {
                    held = Some(r);
                } else {
                    drop(r);
                }
                let started = Instant::now();
                let result = handle(&session, &shared, job.request);
                quick.store(started.elapsed() < QUICK, Ordering::Relaxed);
                let mut w = lock(&writer);
                if wire::write_frame(&mut *w, &Response { id: job.id, result })
                    .and_then(|()| w.flush())
                    .is_err()
                {
                    // hsmd is gone: nothing more to do.
                    let _ = ended.send(Ok(()));
                    return;
                }
            }
        });
    }
    drop(ended_tx);
    // The first worker to see the end (or a bad frame) ends the process; the
    // others may be inside the module, which the exit interrupts.
    ended_rx.recv().unwrap_or_else(|_| Err("every worker stopped".into()))
}

/// While the token's last key operation took under this long, the worker that
/// reads the next one may keep the socket while it serves it (see `serve`).
const QUICK: Duration = Duration::from_millis(1);

/// Whether another request has arrived: already read in, or on the socket.
fn more_waiting(reader: &BufReader<UnixStream>) -> bool {
    if !reader.buffer().is_empty() {
        return true;
    }
    let mut fds = [PollFd::new(reader.get_ref().as_fd(), PollFlags::POLLIN)];
    // An error says nothing is known to wait: the next read meets it.
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Object handles by CKA_ID, one map per class: handles of token objects are
/// valid in every session of this process. Looked up by the id's bytes as
/// the request carries them, with no copy.
#[derive(Default)]
struct Handles {
    private: HashMap<Vec<u8>, ObjectHandle>,
    secret: HashMap<Vec<u8>, ObjectHandle>,
}

impl Handles {
    fn of(&mut self, class: ObjectClass) -> &mut HashMap<Vec<u8>, ObjectHandle> {
        if class == ObjectClass::SECRET_KEY {
            &mut self.secret
        } else {
            &mut self.private
        }
    }

    fn forget(&mut self, id: &[u8]) {
        self.private.remove(id);
        self.secret.remove(id);
    }
}

struct Shared {
    handles: Mutex<Handles>,
    summary: TokenSummary,
    p11: Pkcs11,
    slot: Slot,
}

struct Token;

impl Token {
    /// Loads the module, finds the token, opens the sessions and logs in.
    fn open(open: &Open) -> Result<(TokenSummary, Vec<Session>, Pkcs11, Slot), Failure> {
        let p11 = Pkcs11::new(&open.module)
            .map_err(|e| Failure::Unavailable(format!("cannot load {}: {e}", open.module.display())))?;
        p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| Failure::Unavailable(format!("C_Initialize failed: {e}")))?;
        let slots = p11
            .get_slots_with_initialized_token()
            .map_err(|e| Failure::Unavailable(format!("cannot list slots: {e}")))?;
        let mut found: Option<(Slot, cryptoki::slot::TokenInfo)> = None;
        let mut seen = Vec::new();
        for slot in slots {
            let Ok(info) = p11.get_token_info(slot) else { continue };
            let label_ok = open.token_label.as_deref().is_none_or(|l| info.label().trim() == l);
            let serial_ok = open
                .token_serial
                .as_deref()
                .is_none_or(|s| info.serial_number().trim() == s);
            seen.push(format!(
                "{:?} (serial {})",
                info.label().trim(),
                info.serial_number().trim()
            ));
            if label_ok && serial_ok {
                found = Some((slot, info));
                break;
            }
        }
        let Some((slot, info)) = found else {
            return Err(Failure::Unavailable(format!(
                "no token {} in {} (tokens present: {})",
                describe(open),
                open.module.display(),
                if seen.is_empty() {
                    "none".to_owned()
                } else {
                    seen.join(", ")
                }
            )));
        };
        let mechanisms = p11
            .get_mechanism_list(slot)
            .map_err(|e| Failure::Unavailable(format!("cannot list mechanisms: {e}")))?;
        let has = |m: MechanismType| mechanisms.contains(&m);
        let mut key_types = Vec::new();
        if has(MechanismType::ECC_KEY_PAIR_GEN) && has(MechanismType::ECDSA) {
            key_types.extend([KeyType::EcdsaP256, KeyType::EcdsaP384]);
        }
        if has(MechanismType::ECC_EDWARDS_KEY_PAIR_GEN) && has(MechanismType::EDDSA) {
            key_types.push(KeyType::Ed25519);
        }
        if has(MechanismType::AES_KEY_GEN) && has(MechanismType::AES_GCM) {
            key_types.push(KeyType::Aes256Gcm);
        }
        if has(MechanismType::RSA_PKCS_KEY_PAIR_GEN) {
            // The sizes the token generates (in bits; some tokens say 0 for
            // "no limit stated").
            let (min, max) = p11
                .get_mechanism_info(slot, MechanismType::RSA_PKCS_KEY_PAIR_GEN)
                .map(|i| (i.min_key_size(), i.max_key_size()))
                .unwrap_or((0, 0));
            let fits = |bits: u32| {
                let bits = bits as usize;
                bits >= min && (max == 0 || bits <= max)
            };
            for t in KeyType::ALL {
                let Some((bits, scheme)) = t.rsa() else { continue };
                let signs = match scheme {
                    RsaScheme::Pss => has(MechanismType::RSA_PKCS_PSS),
                    RsaScheme::Pkcs1v15 => has(MechanismType::RSA_PKCS),
                };
                if signs && fits(bits) {
                    key_types.push(t);
                }
            }
        }
        // At most what the token allows, and at least one.
        let limit = Option::<u64>::from(info.max_rw_session_count()).unwrap_or(u64::MAX);
        let want = u64::from(open.sessions.max(1)).min(limit.max(1));
        let pin = AuthPin::new(open.pin.as_str().into());
        let mut sessions = Vec::new();
        for i in 0..want {
            let s = p11
                .open_rw_session(slot)
                .map_err(|e| Failure::Unavailable(format!("cannot open session {}: {e}", i + 1)))?;
            if i == 0 {
                match s.login(UserType::User, Some(&pin)) {
                    Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                    Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _)) => {
                        return Err(Failure::PinRefused(format!(
                            "the token {} refused the PIN (tokens lock after a few wrong tries)",
                            describe(open)
                        )))
                    }
                    Err(e) => return Err(Failure::Unavailable(format!("login failed: {e}"))),
                }
            }
            sessions.push(s);
        }
        Ok((
            TokenSummary {
                label: info.label().trim().to_owned(),
                serial: info.serial_number().trim().to_owned(),
                manufacturer: info.manufacturer_id().trim().to_owned(),
                model: info.model().trim().to_owned(),
                key_types,
                sessions: u32::try_from(sessions.len()).unwrap_or(u32::MAX),
            },
            sessions,
            p11,
            slot,
        ))
    }
}

fn describe(open: &Open) -> String {
    match (&open.token_label, &open.token_serial) {
        (Some(l), Some(s)) => format!("labelled {l:?} with serial {s}"),
        (Some(l), None) => format!("labelled {l:?}"),
        (None, Some(s)) => format!("with serial {s}"),
        (None, None) => "(any)".to_owned(),
    }
}

/// Errors that mean the token (or the session) is gone, not that this one
/// operation failed.
fn classify(what: &str, e: &CkError) -> Failure {
    let gone = matches!(
        e,
        CkError::Pkcs11(
            RvError::TokenNotPresent
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::CryptokiNotInitialized
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::SlotIdInvalid,
            _
        )
    );
    if gone {
        Failure::Unavailable(format!("{what}: {}", short(e)))
    } else {
        Failure::Failed(format!("{what}: {}", short(e)))
    }
}

/// The error's code name without the specification's paragraph.
fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

fn handle(session: &Session, shared: &Shared, request: Request) -> Result<Reply, Failure> {
    match request {
        Request::Generate { key_type, id, label } => generate(session, shared, key_type, &id, &label),
        Request::Sign { key_type, id, digest } => {
            let key = find(session, shared, &id, ObjectClass::PRIVATE_KEY)?;
            // Tokens sign the digest hsmd was given: ECDSA over it as the
            // hash, RSA-PSS with the hash named in the parameters, PKCS#1
            // v1.5 over the DigestInfo built here (many tokens, SoftHSM among
            // them, have no hashing ECDSA mechanism, and a digest is all hsmd
            // ever receives).
            let mut input = digest;
            let mechanism = match (key_type, key_type.rsa()) {
                (KeyType::EcdsaP256 | KeyType::EcdsaP384, _) => Mechanism::Ecdsa,
                (KeyType::Ed25519, _) => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                (_, Some((_, RsaScheme::Pss))) => Mechanism::RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: (rsa_public::PSS_SALT_LEN as u64).into(),
                }),
                (_, Some((_, RsaScheme::Pkcs1v15))) => {
                    // The digest's length names its hash (SHA-256/384/512).
                    let Some(prefix) = rsa_public::digest_info(input.len()) else {
                        return Err(Failure::Unsupported(format!(
                            "a {}-byte digest is not a SHA-2 digest an RSA signature can name",
                            input.len()
                        )));
                    };
                    let mut info = prefix.to_vec();
                    info.extend_from_slice(&input);
                    input = info;
                    Mechanism::RsaPkcs
                }
                (other, None) => return Err(Failure::Unsupported(format!("an {} key does not sign", other.as_str()))),
            };
            let raw = session
                .sign(&mechanism, key, &input)
                .map_err(|e| forget_on_error(shared, &id, classify("signing", &e)))?;
            Ok(Reply::Signature(match key_type {
                KeyType::EcdsaP256 => p256::ecdsa::Signature::from_slice(&raw)
                    .map_err(|e| Failure::Failed(format!("the token's P-256 signature is malformed: {e}")))?
                    .to_der()
                    .as_bytes()
                    .to_vec(),
                KeyType::EcdsaP384 => p384::ecdsa::Signature::from_slice(&raw)
                    .map_err(|e| Failure::Failed(format!("the token's P-384 signature is malformed: {e}")))?
                    .to_der()
                    .as_bytes()
                    .to_vec(),
                _ => raw,
            }))
        }
        Request::Encrypt {
            id,
            mut iv,
            plaintext,
            aad,
        } => {
            let key = find(session, shared, &id, ObjectClass::SECRET_KEY)?;
            let params = GcmParams::new(&mut iv, &aad, 128.into())
                .map_err(|e| Failure::Failed(format!("GCM parameters: {e}")))?;
            session
                .encrypt(&Mechanism::AesGcm(params), key, &plaintext)
                .map(Reply::Sealed)
                .map_err(|e| forget_on_error(shared, &id, classify("encrypting", &e)))
        }
        Request::Decrypt {
            id,
            mut iv,
            ciphertext,
            aad,
        } => {
            let key = find(session, shared, &id, ObjectClass::SECRET_KEY)?;
            let params = GcmParams::new(&mut iv, &aad, 128.into())
                .map_err(|e| Failure::Failed(format!("GCM parameters: {e}")))?;
            match session.decrypt(&Mechanism::AesGcm(params), key, &ciphertext) {
                Ok(p) => Ok(Reply::Plain(Some(Zeroizing::new(p)))),
                // A tag that does not verify: SoftHSM says GENERAL_ERROR,
                // others ENCRYPTED_DATA_INVALID or DATA_INVALID.
                Err(CkError::Pkcs11(
                    RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange
                    | RvError::DataInvalid
                    | RvError::GeneralError,
                    _,
                )) => Ok(Reply::Plain(None)),
                Err(e) => Err(forget_on_error(shared, &id, classify("decrypting", &e))),
            }
        }
        Request::Destroy { id } => {
            let objects = session
                .find_objects(&[Attribute::Token(true), Attribute::Id(id.clone())])
                .map_err(|e| classify("finding the key's objects", &e))?;
            let mut n = 0;
            for o in objects {
                session
                    .destroy_object(o)
                    .map_err(|e| classify("destroying an object", &e))?;
                n += 1;
            }
            lock(&shared.handles).forget(&id);
            Ok(Reply::Destroyed(n))
        }
        Request::Health => {
            session.get_session_info().map_err(|e| classify("the session", &e))?;
            token_present(shared)?;
            Ok(Reply::Token(shared.summary.clone()))
        }
    }
}

/// Checks the token is still in its slot and is still the one opened.
fn token_present(shared: &Shared) -> Result<(), Failure> {
    let info = shared.p11.get_token_info(shared.slot).map_err(|e| {
        Failure::Unavailable(format!(
            "the token {:?} is gone from its slot ({}); hsmd reconnects when it is back",
            shared.summary.label,
            short(&e)
        ))
    })?;
    if info.serial_number().trim() != shared.summary.serial {
        return Err(Failure::Unavailable(format!(
            "the slot now holds another token (serial {}, not {}); hsmd reconnects to the configured one when it is back",
            info.serial_number().trim(),
            shared.summary.serial
        )));
    }
    Ok(())
}

/// A failed operation may mean a stale handle: forget it, so the next try
/// looks the object up again. It may also mean the token went away (SoftHSM
/// then answers OBJECT_HANDLE_INVALID): that is reported as such.
fn forget_on_error(shared: &Shared, id: &[u8], f: Failure) -> Failure {
    lock(&shared.handles).forget(id);
    match (&f, token_present(shared)) {
        (Failure::Failed(_), Err(gone)) => gone,
        _ => f,
    }
}

fn find(session: &Session, shared: &Shared, id: &[u8], class: ObjectClass) -> Result<ObjectHandle, Failure> {
    if let Some(h) = lock(&shared.handles).of(class).get(id) {
        return Ok(*h);
    }
    let found = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Class(class),
            Attribute::Id(id.to_vec()),
        ])
        .map_err(|e| classify("looking the key up", &e))?;
    let Some(h) = found.first().copied() else {
        // A missing object may mean a missing token (SoftHSM keeps sessions
        // of a token whose files were removed, with no objects in it).
        token_present(shared)?;
        return Err(Failure::Failed(format!(
            "the token has no {class} object with CKA_ID {}: it was deleted outside hsmd, or this is another token",
            hex::encode(id)
        )));
    };
    lock(&shared.handles).of(class).insert(id.to_vec(), h);
    Ok(h)
}

fn generate(session: &Session, shared: &Shared, key_type: KeyType, id: &[u8], label: &str) -> Result<Reply, Failure> {
    if !shared.summary.key_types.contains(&key_type) {
        return Err(Failure::Unsupported(format!(
            "the token {:?} cannot make {} keys (its mechanisms allow {})",
            shared.summary.label,
            key_type.as_str(),
            shared
                .summary
                .key_types
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let common = |private: bool| {
        vec![
            Attribute::Token(true),
            Attribute::Private(private),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ]
    };
    // Private and secret keys never leave the token: sensitive, not extractable.
    let locked_in = [Attribute::Sensitive(true), Attribute::Extractable(false)];
    if key_type == KeyType::Aes256Gcm {
        let mut t = common(true);
        t.extend(locked_in);
        t.extend([
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            // Nothing but AES-GCM: no MACs, no wrapping other keys out.
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
        session
            .generate_key(&Mechanism::AesKeyGen, &t)
            .map_err(|e| classify("generating the key", &e))?;
        return Ok(Reply::Generated { public: None });
    }
    let mut public_t = common(false);
    let mechanism = if let Some((bits, _)) = key_type.rsa() {
        public_t.extend([
            Attribute::ModulusBits(u64::from(bits).into()),
            Attribute::PublicExponent(rsa_public::PUBLIC_EXPONENT.to_be_bytes()[1..].to_vec()),
        ]);
        Mechanism::RsaPkcsKeyPairGen
    } else {
        let (mechanism, params) = match key_type {
            KeyType::EcdsaP256 => (Mechanism::EccKeyPairGen, P256_OID),
            KeyType::EcdsaP384 => (Mechanism::EccKeyPairGen, P384_OID),
            _ => (Mechanism::EccEdwardsKeyPairGen, ED25519_OID),
        };
        public_t.push(Attribute::EcParams(params.to_vec()));
        mechanism
    };
    public_t.extend([
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
    ]);
    let mut private_t = common(true);
    private_t.extend(locked_in);
    // Signing only: no ECDH derivation, no decryption or unwrapping (an RSA
    // key that decrypts would be a padding oracle).
    private_t.extend([
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]);
    let (public, _private) = session
        .generate_key_pair(&mechanism, &public_t, &private_t)
        .map_err(|e| classify("generating the key pair", &e))?;
    if key_type.rsa().is_some() {
        let attrs = session
            .get_attributes(public, &[AttributeType::Modulus, AttributeType::PublicExponent])
            .map_err(|e| classify("reading the public key", &e))?;
        let (mut n, mut e) = (None, None);
        for a in attrs {
            match a {
                Attribute::Modulus(v) => n = Some(v),
                Attribute::PublicExponent(v) => e = Some(v),
                _ => {}
            }
        }
        let (Some(n), Some(e)) = (n, e) else {
            return Err(Failure::Failed(
                "the token gave no CKA_MODULUS or CKA_PUBLIC_EXPONENT".into(),
            ));
        };
        let spki = rsa_public::spki(key_type, &n, &e).ok_or_else(|| {
            Failure::Failed(format!(
                "the token made a key that is not {} (modulus of {} bytes, exponent {})",
                key_type.as_str(),
                n.len(),
                hex::encode(&e)
            ))
        })?;
        return Ok(Reply::Generated { public: Some(spki) });
    }
    let attrs = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(|e| classify("reading the public key", &e))?;
    let point = attrs.into_iter().find_map(|a| match a {
        Attribute::EcPoint(p) => Some(p),
        _ => None,
    });
    let point = point.ok_or_else(|| Failure::Failed("the token gave no CKA_EC_POINT".into()))?;
    let spki = spki_of(key_type, &point)
        .ok_or_else(|| Failure::Failed(format!("the token's {} public key is malformed", key_type.as_str())))?;
    Ok(Reply::Generated { public: Some(spki) })
}

/// SubjectPublicKeyInfo DER from a CKA_EC_POINT: a DER OCTET STRING around
/// the SEC1 point (or the 32-byte Ed25519 key); some tokens omit the wrapper.
fn spki_of(key_type: KeyType, ec_point: &[u8]) -> Option<Vec<u8>> {
    let unwrapped = match ec_point {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() => Some(rest),
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => Some(rest),
        _ => None,
    };
    // A bare uncompressed point also starts with 0x04: if the "wrapper" does
    // not hold a valid key, the whole value is the point.
    unwrapped
        .and_then(|inner| spki_of_point(key_type, inner))
        .or_else(|| spki_of_point(key_type, ec_point))
}

fn spki_of_point(key_type: KeyType, unwrapped: &[u8]) -> Option<Vec<u8>> {
    use p256::pkcs8::EncodePublicKey as _;
    let doc = match key_type {
        KeyType::EcdsaP256 => p256::PublicKey::from_sec1_bytes(unwrapped)
            .ok()?
            .to_public_key_der()
            .ok()?,
        KeyType::EcdsaP384 => p384::PublicKey::from_sec1_bytes(unwrapped)
            .ok()?
            .to_public_key_der()
            .ok()?,
        KeyType::Ed25519 => ed25519_dalek::VerifyingKey::from_bytes(unwrapped.try_into().ok()?)
            .ok()?
            .to_public_key_der()
            .ok()?,
        _ => return None,
    };
    Some(doc.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_points_with_and_without_the_octet_string_wrapper_give_the_same_spki() {
        let sk = p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap();
        let point = sk.verifying_key().to_encoded_point(false);
        let bare = point.as_bytes().to_vec();
        let mut wrapped = vec![0x04, u8::try_from(bare.len()).unwrap()];
        wrapped.extend_from_slice(&bare);
        let a = spki_of(KeyType::EcdsaP256, &bare).unwrap();
        let b = spki_of(KeyType::EcdsaP256, &wrapped).unwrap();
        assert_eq!(a, b);
        use p256::pkcs8::EncodePublicKey as _;
        assert_eq!(a, sk.verifying_key().to_public_key_der().unwrap().as_bytes());
        assert!(spki_of(KeyType::EcdsaP256, &[0x04, 3, 1, 2, 3]).is_none());
        let ed = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let mut w = vec![0x04, 32];
        w.extend_from_slice(ed.verifying_key().as_bytes());
        assert!(spki_of(KeyType::Ed25519, &w).is_some());
    }
}
