//! The token: one slot holding one hsmd, its sessions, and what each PKCS#11
//! call does, in safe Rust (`ffi` turns the C arguments into these).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
    },
};

use cryptoki_sys::*;
use protocol::{ClientError, ErrorCode, KeyInfo, KeyOptions, KeyType, ServiceState, Usage};
use sha2::Digest as _;

use crate::{
    cipher::{self, DecryptOp, Direction, MessageOp},
    error::{Error, Result},
    mechanism::{Mechanism, Request, SignOp},
    objects::{has_public, is_served, Class, Object, Objects},
    pool::Pool,
};

/// The one slot's id.
pub const SLOT: CK_SLOT_ID = 1;

/// The loaded module between `C_Initialize` and `C_Finalize`.
static MODULE: RwLock<Option<Arc<Token>>> = RwLock::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `C_Initialize`: connects lazily to the socket [`crate::config::socket`]
/// chooses.
///
/// # Errors
/// `CKR_CRYPTOKI_ALREADY_INITIALIZED`; a configuration file that is not valid.
pub fn initialize() -> Result<()> {
    let mut module = MODULE.write().unwrap_or_else(PoisonError::into_inner);
    if module.is_some() {
        return Err(Error::call(CKR_CRYPTOKI_ALREADY_INITIALIZED, "already initialized"));
    }
    *module = Some(Arc::new(Token::new(crate::config::socket()?)));
    Ok(())
}

/// `C_Finalize`.
///
/// # Errors
/// `CKR_CRYPTOKI_NOT_INITIALIZED`.
pub fn finalize() -> Result<()> {
    let token = MODULE
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .ok_or_else(not_initialized)?;
    token.pool.clear();
    Ok(())
}

fn not_initialized() -> Error {
    Error::call(CKR_CRYPTOKI_NOT_INITIALIZED, "C_Initialize has not been called")
}

/// The token, if the module is initialized.
///
/// # Errors
/// `CKR_CRYPTOKI_NOT_INITIALIZED`.
pub fn token() -> Result<Arc<Token>> {
    MODULE
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .ok_or_else(not_initialized)
}

/// A session's open operations.
#[derive(Debug, Default)]
pub struct Session {
    read_write: bool,
    find: Option<std::vec::IntoIter<CK_OBJECT_HANDLE>>,
    sign: Option<SignOp>,
    verify: Option<SignOp>,
    decrypt: Option<DecryptOp>,
    message_encrypt: Option<MessageOp>,
    message_decrypt: Option<MessageOp>,
}

/// Which of a session's two signature operations a call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `C_Sign*`: a private key object makes a signature through hsmd.
    Sign,
    /// `C_Verify*`: hsmd checks a signature with the object's key version.
    Verify,
}

impl Purpose {
    fn verb(self) -> &'static str {
        match self {
            Self::Sign => "sign",
            Self::Verify => "verify",
        }
    }
}

impl Session {
    fn op(&mut self, purpose: Purpose) -> &mut Option<SignOp> {
        match purpose {
            Purpose::Sign => &mut self.sign,
            Purpose::Verify => &mut self.verify,
        }
    }

    fn message(&mut self, direction: Direction) -> &mut Option<MessageOp> {
        match direction {
            Direction::Encrypt => &mut self.message_encrypt,
            Direction::Decrypt => &mut self.message_decrypt,
        }
    }
}

/// What `C_GetTokenInfo` says beyond fixed strings.
#[derive(Debug, Clone)]
pub struct TokenFacts {
    /// Whether hsmd has a keystore.
    pub initialized: bool,
    /// hsmd's version, `major.minor`.
    pub version: (u8, u8),
    /// A serial number stable for the socket path.
    pub serial: String,
}

/// hsmd as a PKCS#11 token.
#[derive(Debug)]
pub struct Token {
    pool: Pool,
    objects: Mutex<Objects>,
    sessions: Mutex<HashMap<CK_SESSION_HANDLE, Arc<Mutex<Session>>>>,
    next_session: AtomicU64,
    logged_in: AtomicBool,
}

impl Token {
    fn new(socket: PathBuf) -> Self {
        Self {
            pool: Pool::new(socket),
            objects: Mutex::default(),
            sessions: Mutex::default(),
            next_session: AtomicU64::new(1),
            logged_in: AtomicBool::new(false),
        }
    }

    /// The socket the token talks to (for the slot's description).
    #[must_use]
    pub fn socket(&self) -> &std::path::Path {
        self.pool.socket()
    }

    /// Whether hsmd answers now.
    #[must_use]
    pub fn present(&self) -> bool {
        self.pool.call(|c| c.ping(Vec::new())).is_ok()
    }

    /// What the token info reports.
    ///
    /// # Errors
    /// `CKR_TOKEN_NOT_PRESENT` when hsmd cannot be reached.
    pub fn facts(&self) -> Result<TokenFacts> {
        let status = self.pool.call(|c| c.status()).map_err(|e| match e {
            ClientError::Daemon(_) => Error::Hsmd(e),
            e => Error::call(CKR_TOKEN_NOT_PRESENT, format!("hsmd is not reachable: {e}")),
        })?;
        let mut parts = status.daemon_version.split('.').map(|p| p.parse::<u8>().unwrap_or(0));
        let digest = sha2::Sha256::digest(self.socket().as_os_str().as_encoded_bytes());
        Ok(TokenFacts {
            initialized: status.state != ServiceState::Uninitialized,
            version: (parts.next().unwrap_or(0), parts.next().unwrap_or(0)),
            serial: hex::encode(&digest[..8]),
        })
    }

    /// `C_OpenSession`.
    #[must_use]
    pub fn open_session(&self, read_write: bool) -> CK_SESSION_HANDLE {
        let handle = self.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            read_write,
            ..Session::default()
        };
        lock(&self.sessions).insert(handle, Arc::new(Mutex::new(session)));
        handle
    }

    fn session(&self, handle: CK_SESSION_HANDLE) -> Result<Arc<Mutex<Session>>> {
        lock(&self.sessions)
            .get(&handle)
            .cloned()
            .ok_or_else(|| Error::call(CKR_SESSION_HANDLE_INVALID, format!("no session has handle {handle}")))
    }

    /// `C_CloseSession`.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`.
    pub fn close_session(&self, handle: CK_SESSION_HANDLE) -> Result<()> {
        let mut sessions = lock(&self.sessions);
        sessions
            .remove(&handle)
            .ok_or_else(|| Error::call(CKR_SESSION_HANDLE_INVALID, format!("no session has handle {handle}")))?;
        // The login state belongs to the application; it ends with its last session.
        if sessions.is_empty() {
            self.logged_in.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// `C_CloseAllSessions`.
    pub fn close_all(&self) {
        lock(&self.sessions).clear();
        self.logged_in.store(false, Ordering::Relaxed);
    }

    /// `C_GetSessionInfo`: the state and whether the session is read-write.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`.
    pub fn session_info(&self, handle: CK_SESSION_HANDLE) -> Result<(CK_STATE, bool)> {
        let read_write = lock(&*self.session(handle)?).read_write;
        let user = self.logged_in.load(Ordering::Relaxed);
        let state = match (read_write, user) {
            (true, true) => CKS_RW_USER_FUNCTIONS,
            (true, false) => CKS_RW_PUBLIC_SESSION,
            (false, true) => CKS_RO_USER_FUNCTIONS,
            (false, false) => CKS_RO_PUBLIC_SESSION,
        };
        Ok((state, read_write))
    }

    /// `C_Login`. hsmd knows the caller by its uid, which the kernel vouches
    /// for, so there is no PIN to check: any PIN (or none) is accepted and
    /// changes nothing hsmd allows. The state is kept so that programs that
    /// log in see the session states they expect.
    ///
    /// # Errors
    /// `CKR_USER_ALREADY_LOGGED_IN`; `CKR_USER_TYPE_INVALID` for the security
    /// officer, whom hsmd does not have (its administrators are uids in its
    /// policy).
    pub fn login(&self, session: CK_SESSION_HANDLE, user: CK_USER_TYPE) -> Result<()> {
        self.session(session)?;
        match user {
            CKU_USER if self.logged_in.swap(true, Ordering::Relaxed) => {
                Err(Error::call(CKR_USER_ALREADY_LOGGED_IN, "already logged in"))
            }
            CKU_USER | CKU_CONTEXT_SPECIFIC => Ok(()),
            _ => Err(Error::call(
                CKR_USER_TYPE_INVALID,
                "hsmd has no security officer: its policy names who administers it",
            )),
        }
    }

    /// `C_Logout`.
    ///
    /// # Errors
    /// `CKR_USER_NOT_LOGGED_IN`.
    pub fn logout(&self, session: CK_SESSION_HANDLE) -> Result<()> {
        self.session(session)?;
        if !self.logged_in.swap(false, Ordering::Relaxed) {
            return Err(Error::call(CKR_USER_NOT_LOGGED_IN, "not logged in"));
        }
        Ok(())
    }

    /// The keys this process may see, each asymmetric one with its newest
    /// public key. A locked or uninitialized hsmd, or a caller hsmd lets list
    /// nothing, has no objects (as an empty token), not an error.
    fn listing(&self) -> Result<Vec<(KeyInfo, Option<Vec<u8>>)>> {
        let keys = match self.pool.call(|c| c.key_list()) {
            Ok(keys) => keys,
            Err(ClientError::Daemon(w))
                if matches!(
                    w.code,
                    ErrorCode::Locked | ErrorCode::NotInitialized | ErrorCode::PermissionDenied
                ) =>
            {
                crate::log(&format!("hsmd lists no keys: {w}"));
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for info in keys.into_iter().filter(is_served) {
            if !has_public(info.key_type) {
                out.push((info, None));
                continue;
            }
            let cached = lock(&self.objects).cached_spki(&info).map(<[u8]>::to_vec);
            let spki = match cached {
                Some(spki) => spki,
                None => match self.pool.call(|c| c.key_public(info.name.clone())) {
                    Ok(public) => public.spki_der,
                    // A key whose state or policy withholds its public half
                    // (pre-active, say) is not offered.
                    Err(ClientError::Daemon(w)) => {
                        crate::log(&format!("key {:?} left out: {w}", info.name));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            out.push((info, Some(spki)));
        }
        Ok(out)
    }

    /// `C_FindObjectsInit`.
    ///
    /// # Errors
    /// `CKR_OPERATION_ACTIVE`; hsmd's errors.
    pub fn find_init(&self, session: CK_SESSION_HANDLE, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Result<()> {
        let session = self.session(session)?;
        let mut session = lock(&session);
        if session.find.is_some() {
            return Err(Error::call(CKR_OPERATION_ACTIVE, "a search is already active"));
        }
        // Only key objects live here: a search for certificates or data
        // objects needs no request.
        let keys_wanted = template.iter().all(|(kind, value)| {
            *kind != CKA_CLASS
                || [CKO_PRIVATE_KEY, CKO_PUBLIC_KEY, CKO_SECRET_KEY]
                    .iter()
                    .any(|c| c.to_ne_bytes().as_slice() == value.as_slice())
        });
        let found = if keys_wanted {
            let listing = self.listing()?;
            lock(&self.objects).refresh(listing, template)?
        } else {
            Vec::new()
        };
        session.find = Some(found.into_iter());
        Ok(())
    }

    /// `C_FindObjects`: up to `max` more handles.
    ///
    /// # Errors
    /// `CKR_OPERATION_NOT_INITIALIZED`.
    pub fn find(&self, session: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>> {
        let session = self.session(session)?;
        let mut session = lock(&session);
        let found = session
            .find
            .as_mut()
            .ok_or_else(|| Error::call(CKR_OPERATION_NOT_INITIALIZED, "no search is active"))?;
        Ok(found.take(max).collect())
    }

    /// `C_FindObjectsFinal`.
    ///
    /// # Errors
    /// `CKR_OPERATION_NOT_INITIALIZED`.
    pub fn find_final(&self, session: CK_SESSION_HANDLE) -> Result<()> {
        let session = self.session(session)?;
        let ended = lock(&session).find.take();
        ended
            .map(|_| ())
            .ok_or_else(|| Error::call(CKR_OPERATION_NOT_INITIALIZED, "no search is active"))
    }

    /// The object behind a handle, for a session.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OBJECT_HANDLE_INVALID`.
    pub fn object(&self, session: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
        self.session(session)?;
        lock(&self.objects).get(handle)
    }

    /// The key object behind a handle an operation names.
    ///
    /// # Errors
    /// `CKR_KEY_HANDLE_INVALID`.
    fn key_object(&self, key: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
        lock(&self.objects)
            .get(key)
            .map_err(|e| Error::call(CKR_KEY_HANDLE_INVALID, e.to_string()))
    }

    /// `C_SignInit` or `C_VerifyInit`.
    ///
    /// # Errors
    /// `CKR_OPERATION_ACTIVE`; `CKR_KEY_FUNCTION_NOT_PERMITTED` for signing
    /// with a public key object; the mechanism's errors ([`SignOp::new`]).
    pub fn signature_init(
        &self,
        session: CK_SESSION_HANDLE,
        purpose: Purpose,
        mech: &Mechanism,
        key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let session = self.session(session)?;
        let mut session = lock(&session);
        if session.op(purpose).is_some() {
            return Err(Error::call(
                CKR_OPERATION_ACTIVE,
                format!("a {purpose:?} operation is active"),
            ));
        }
        let key = self.key_object(key)?;
        match (purpose, key.class) {
            (_, Class::Secret) => {
                return Err(Error::call(
                    CKR_KEY_TYPE_INCONSISTENT,
                    format!(
                        "{:?} is an AES key: it encrypts and decrypts, and signs nothing",
                        key.name
                    ),
                ))
            }
            (Purpose::Sign, Class::Public) => {
                return Err(Error::call(
                    CKR_KEY_FUNCTION_NOT_PERMITTED,
                    format!(
                        "the object for {:?} is a public key; sign with its private key object",
                        key.name
                    ),
                ))
            }
            _ => {}
        }
        // Refused here, as the object's attributes say, rather than by hsmd
        // at the end (which a program would see as CKR_FUNCTION_FAILED).
        let permitted = match purpose {
            Purpose::Sign => key.flag(CKA_SIGN),
            Purpose::Verify => {
                let objects = lock(&self.objects);
                let public = match key.class {
                    Class::Public => Some(Arc::clone(&key)),
                    _ => objects
                        .handle_of(&key.name, Class::Public)
                        .and_then(|h| objects.get(h).ok()),
                };
                public.is_none_or(|p| p.flag(CKA_VERIFY))
            }
        };
        if !permitted {
            return Err(Error::call(
                CKR_KEY_FUNCTION_NOT_PERMITTED,
                format!(
                    "key {:?} may not {}: hsmd's key lacks that usage",
                    key.name,
                    purpose.verb()
                ),
            ));
        }
        *session.op(purpose) = Some(SignOp::new(mech, key)?);
        Ok(())
    }

    /// `C_SignUpdate` or `C_VerifyUpdate`. An error ends the operation.
    ///
    /// # Errors
    /// `CKR_OPERATION_NOT_INITIALIZED`; [`SignOp::update`]'s.
    pub fn signature_update(&self, session: CK_SESSION_HANDLE, purpose: Purpose, data: &[u8]) -> Result<()> {
        let session = self.session(session)?;
        let mut session = lock(&session);
        let slot = session.op(purpose);
        let op = slot.as_mut().ok_or_else(|| {
            Error::call(
                CKR_OPERATION_NOT_INITIALIZED,
                format!("no {purpose:?} operation is active"),
            )
        })?;
        let result = op.update(data);
        if result.is_err() {
            *slot = None;
        }
        result
    }

    /// `C_Verify` (with `data`) or `C_VerifyFinal` (without): hsmd checks
    /// `signature` with the key version the object shows. Ends the operation.
    ///
    /// # Errors
    /// `CKR_SIGNATURE_INVALID`, `CKR_SIGNATURE_LEN_RANGE`; hsmd's refusals.
    pub fn verify(&self, session: CK_SESSION_HANDLE, data: Option<&[u8]>, signature: &[u8]) -> Result<()> {
        let session = self.session(session)?;
        let mut op = lock(&session)
            .verify
            .take()
            .ok_or_else(|| Error::call(CKR_OPERATION_NOT_INITIALIZED, "C_VerifyInit first"))?;
        if let Some(data) = data {
            op.update(data)?;
        }
        let (name, key_type, version) = (op.key.name.clone(), op.key.key_type, op.key.version);
        let signature = crate::mechanism::decode(key_type, signature)?;
        let valid = match op.request()? {
            Request::Digest(digest) => self
                .pool
                .call(|c| c.verify(name.clone(), version, digest.clone(), signature.clone(), false))?,
            Request::Message(message, hash) => self
                .pool
                .call(|c| c.verify_message(name.clone(), version, message.clone(), hash, signature.clone(), false))?,
        };
        if !valid {
            return Err(Error::call(
                CKR_SIGNATURE_INVALID,
                format!("the signature does not verify with {name:?} version {version}"),
            ));
        }
        Ok(())
    }

    /// `C_Sign` (with `data`) or `C_SignFinal` (without): the signature's
    /// length when `out` is `None` or too short, which leaves the operation
    /// open; otherwise signs through hsmd, writes the signature and ends the
    /// operation, whatever the outcome.
    ///
    /// # Errors
    /// `CKR_BUFFER_TOO_SMALL` (with the length needed); hsmd's refusals.
    pub fn sign(
        &self,
        session: CK_SESSION_HANDLE,
        data: Option<&[u8]>,
        out: Option<&mut [u8]>,
    ) -> std::result::Result<usize, (Error, usize)> {
        let session = self.session(session).map_err(|e| (e, 0))?;
        let mut session = lock(&session);
        let Some(op) = session.sign.as_ref() else {
            return Err((Error::call(CKR_OPERATION_NOT_INITIALIZED, "C_SignInit first"), 0));
        };
        let len = op.signature_len();
        let Some(out) = out else { return Ok(len) };
        if out.len() < len {
            return Err((
                Error::call(CKR_BUFFER_TOO_SMALL, format!("a signature takes {len} bytes")),
                len,
            ));
        }
        let Some(mut op) = session.sign.take() else {
            return Err((Error::call(CKR_OPERATION_NOT_INITIALIZED, "C_SignInit first"), 0));
        };
        drop(session);
        let signed = (|| {
            if let Some(data) = data {
                op.update(data)?;
            }
            let (name, key_type) = (op.key.name.clone(), op.key.key_type);
            let signed = match op.request()? {
                Request::Digest(digest) => self.pool.call(|c| c.sign(name.clone(), digest.clone()))?,
                Request::Message(message, hash) => self
                    .pool
                    .call(|c| c.sign_message(name.clone(), message.clone(), hash))?,
            };
            crate::mechanism::encode(key_type, &signed.signature)
        })()
        .map_err(|e| (e, len))?;
        out[..signed.len()].copy_from_slice(&signed);
        Ok(signed.len())
    }

    /// `C_EncryptInit`: refused, saying why (see [`cipher`]), once the
    /// session and key are known to be valid.
    ///
    /// # Errors
    /// Always; [`cipher::refuse_single_part_encrypt`].
    pub fn encrypt_init(&self, session: CK_SESSION_HANDLE, mech: &Mechanism, key: CK_OBJECT_HANDLE) -> Result<()> {
        self.session(session)?;
        self.key_object(key)?;
        Err(cipher::refuse_single_part_encrypt(mech))
    }

    /// `C_DecryptInit`.
    ///
    /// # Errors
    /// `CKR_OPERATION_ACTIVE`; [`DecryptOp::new`]'s.
    pub fn decrypt_init(&self, session: CK_SESSION_HANDLE, mech: &Mechanism, key: CK_OBJECT_HANDLE) -> Result<()> {
        let session = self.session(session)?;
        let mut session = lock(&session);
        if session.decrypt.is_some() {
            return Err(Error::call(CKR_OPERATION_ACTIVE, "a decryption is active"));
        }
        session.decrypt = Some(DecryptOp::new(mech, self.key_object(key)?)?);
        Ok(())
    }

    /// `C_DecryptUpdate`: collects the part; no plaintext comes out before
    /// the tag has checked out. An error ends the operation.
    ///
    /// # Errors
    /// `CKR_OPERATION_NOT_INITIALIZED`; [`DecryptOp::update`]'s.
    pub fn decrypt_update(&self, session: CK_SESSION_HANDLE, data: &[u8]) -> Result<()> {
        let session = self.session(session)?;
        let mut session = lock(&session);
        let op = session
            .decrypt
            .as_mut()
            .ok_or_else(|| Error::call(CKR_OPERATION_NOT_INITIALIZED, "C_DecryptInit first"))?;
        let result = op.update(data);
        if result.is_err() {
            session.decrypt = None;
        }
        result
    }

    /// `C_Decrypt` (with `data`) or `C_DecryptFinal` (without): the
    /// plaintext's length when `out` is `None` or too short, which leaves the
    /// operation open; otherwise hsmd opens the ciphertext with whichever
    /// version of the key made it, the plaintext is written, and the
    /// operation ends, whatever the outcome.
    ///
    /// # Errors
    /// `CKR_BUFFER_TOO_SMALL` (with the length needed);
    /// `CKR_ENCRYPTED_DATA_INVALID` when no version authenticates it; hsmd's
    /// refusals.
    pub fn decrypt(
        &self,
        session: CK_SESSION_HANDLE,
        data: Option<&[u8]>,
        out: Option<&mut [u8]>,
    ) -> std::result::Result<usize, (Error, usize)> {
        let session = self.session(session).map_err(|e| (e, 0))?;
        let mut session = lock(&session);
        let tail = data.unwrap_or_default();
        let Some(op) = session.decrypt.as_ref() else {
            return Err((Error::call(CKR_OPERATION_NOT_INITIALIZED, "C_DecryptInit first"), 0));
        };
        let len = match op.plaintext_len(tail) {
            Ok(len) => len,
            Err(e) => {
                session.decrypt = None;
                return Err((e, 0));
            }
        };
        let Some(out) = out else { return Ok(len) };
        if out.len() < len {
            return Err((
                Error::call(CKR_BUFFER_TOO_SMALL, format!("the plaintext takes {len} bytes")),
                len,
            ));
        }
        let Some(op) = session.decrypt.take() else {
            return Err((Error::call(CKR_OPERATION_NOT_INITIALIZED, "C_DecryptInit first"), 0));
        };
        drop(session);
        let (sealed, aad) = op.sealed(tail).map_err(|e| (e, len))?;
        let opened = self
            .pool
            .call(|c| c.decrypt_any_version(op.key.name.clone(), sealed.clone(), aad.clone(), false))
            .map_err(|e| (e.into(), len))?;
        let plaintext = opened.plaintext.expose();
        if plaintext.len() != len {
            return Err((
                Error::call(CKR_DEVICE_ERROR, "hsmd opened a plaintext of another length"),
                len,
            ));
        }
        out[..len].copy_from_slice(plaintext);
        Ok(len)
    }

    /// `C_MessageEncryptInit` or `C_MessageDecryptInit`.
    ///
    /// # Errors
    /// `CKR_OPERATION_ACTIVE`; [`MessageOp::new`]'s.
    pub fn message_init(
        &self,
        session: CK_SESSION_HANDLE,
        direction: Direction,
        mech: &Mechanism,
        key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let session = self.session(session)?;
        let mut session = lock(&session);
        let slot = session.message(direction);
        if slot.is_some() {
            return Err(Error::call(
                CKR_OPERATION_ACTIVE,
                format!("a message {direction:?} operation is active"),
            ));
        }
        *slot = Some(MessageOp::new(mech, self.key_object(key)?, direction)?);
        Ok(())
    }

    /// `C_MessageEncryptFinal` or `C_MessageDecryptFinal`.
    ///
    /// # Errors
    /// `CKR_OPERATION_NOT_INITIALIZED`.
    pub fn message_final(&self, session: CK_SESSION_HANDLE, direction: Direction) -> Result<()> {
        let session = self.session(session)?;
        let ended = lock(&session).message(direction).take();
        ended.map(|_| ()).ok_or_else(|| {
            Error::call(
                CKR_OPERATION_NOT_INITIALIZED,
                format!("no message {direction:?} operation is active"),
            )
        })
    }

    /// The key of the session's message operation.
    fn message_key(&self, session: CK_SESSION_HANDLE, direction: Direction) -> Result<Arc<Object>> {
        let session = self.session(session)?;
        let mut session = lock(&session);
        session
            .message(direction)
            .as_ref()
            .map(|op| Arc::clone(&op.key))
            .ok_or_else(|| {
                Error::call(
                    CKR_OPERATION_NOT_INITIALIZED,
                    format!("C_Message{direction:?}Init first"),
                )
            })
    }

    /// `C_EncryptMessage`: hsmd seals `plaintext` with a fresh random IV
    /// under the key's newest version; the answer is IV, ciphertext and tag.
    /// The operation stays open for the next message.
    ///
    /// # Errors
    /// `CKR_OPERATION_NOT_INITIALIZED`; hsmd's refusals.
    pub fn encrypt_message(&self, session: CK_SESSION_HANDLE, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let key = self.message_key(session, Direction::Encrypt)?;
        let plaintext = protocol::SecretBytes::new(plaintext.to_vec());
        let sealed = self
            .pool
            .call(|c| c.encrypt(key.name.clone(), None, plaintext.clone(), aad.to_vec()))?;
        Ok(sealed.sealed)
    }

    /// `C_DecryptMessage`: hsmd opens IV, ciphertext and tag with whichever
    /// version of the key made them.
    ///
    /// # Errors
    /// `CKR_OPERATION_NOT_INITIALIZED`; `CKR_ENCRYPTED_DATA_INVALID` when no
    /// version authenticates it; hsmd's refusals.
    pub fn decrypt_message(
        &self,
        session: CK_SESSION_HANDLE,
        iv: &[u8],
        tag: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<protocol::SecretBytes> {
        let key = self.message_key(session, Direction::Decrypt)?;
        let sealed = [iv, ciphertext, tag].concat();
        let opened = self
            .pool
            .call(|c| c.decrypt_any_version(key.name.clone(), sealed.clone(), aad.to_vec(), false))?;
        Ok(opened.plaintext)
    }

    /// `C_GenerateKey`: creates an hsmd AES-256-GCM key named by
    /// `CKA_LABEL`, allowed to encrypt and decrypt unless the template sets
    /// `CKA_ENCRYPT` or `CKA_DECRYPT` false.
    ///
    /// # Errors
    /// `CKR_MECHANISM_INVALID` for a mechanism other than `CKM_AES_KEY_GEN`;
    /// `CKR_ATTRIBUTE_VALUE_INVALID` for another key length or type, a
    /// session object or a key that could leave; `CKR_ATTRIBUTE_READ_ONLY`
    /// for a `CKA_ID`; `CKR_TEMPLATE_INCOMPLETE` without a `CKA_LABEL`;
    /// hsmd's refusals.
    pub fn generate_key(
        &self,
        session: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<CK_OBJECT_HANDLE> {
        if mech != CKM_AES_KEY_GEN {
            return Err(Error::call(
                CKR_MECHANISM_INVALID,
                format!("mechanism {mech:#x} does not make hsmd secret keys; CKM_AES_KEY_GEN does"),
            ));
        }
        let new = NewKey::read(template)?;
        let invalid = |why: &str| Error::call(CKR_ATTRIBUTE_VALUE_INVALID, why.to_owned());
        if new.ulong(CKA_VALUE_LEN).is_some_and(|len| len != 32) {
            return Err(invalid("hsmd's AES keys are 256 bits: CKA_VALUE_LEN 32"));
        }
        if new.ulong(CKA_KEY_TYPE).is_some_and(|t| t != CKK_AES) {
            return Err(invalid("CKM_AES_KEY_GEN makes CKK_AES keys"));
        }
        if new.ulong(CKA_CLASS).is_some_and(|c| c != CKO_SECRET_KEY) {
            return Err(invalid("CKM_AES_KEY_GEN makes CKO_SECRET_KEY objects"));
        }
        let usages: Vec<Usage> = [(CKA_ENCRYPT, Usage::Encrypt), (CKA_DECRYPT, Usage::Decrypt)]
            .into_iter()
            .filter(|(attr, _)| new.flag(*attr) != Some(false))
            .map(|(_, usage)| usage)
            .collect();
        if usages.is_empty() {
            return Err(Error::call(
                CKR_TEMPLATE_INCONSISTENT,
                "a key that may neither encrypt nor decrypt does nothing: leave CKA_ENCRYPT or CKA_DECRYPT true",
            ));
        }
        self.create(&new.name, KeyType::Aes256Gcm, usages, session)?;
        let [secret] = self.handles_after_create(&new.name, [Class::Secret])?;
        Ok(secret)
    }

    /// Creates the key in hsmd, in a read-write session.
    fn create(&self, name: &str, key_type: KeyType, usages: Vec<Usage>, session: CK_SESSION_HANDLE) -> Result<()> {
        if !lock(&*self.session(session)?).read_write {
            return Err(Error::call(
                CKR_SESSION_READ_ONLY,
                "key generation needs a read-write session",
            ));
        }
        self.pool
            .call(|c| c.key_create(name.to_owned(), key_type, usages.clone(), KeyOptions::default()))?;
        Ok(())
    }

    /// The handles of a key's objects of `classes` just after it was created.
    fn handles_after_create<const N: usize>(&self, name: &str, classes: [Class; N]) -> Result<[CK_OBJECT_HANDLE; N]> {
        let listing = self.listing()?;
        let mut objects = lock(&self.objects);
        objects.refresh(listing, &[])?;
        let mut handles = [0; N];
        for (handle, class) in handles.iter_mut().zip(classes) {
            *handle = objects.handle_of(name, class).ok_or_else(|| {
                Error::call(
                    CKR_FUNCTION_FAILED,
                    format!("hsmd created key {name:?} but does not list it for this caller"),
                )
            })?;
        }
        Ok(handles)
    }

    /// `C_GenerateKeyPair`: creates an hsmd key named by `CKA_LABEL` (hsmd
    /// picks its id) of the type the mechanism and template ask for.
    ///
    /// # Errors
    /// `CKR_SESSION_READ_ONLY`; `CKR_TEMPLATE_INCOMPLETE` without a curve or
    /// modulus size; `CKR_ATTRIBUTE_READ_ONLY` for a `CKA_ID` (hsmd assigns
    /// ids); hsmd's refusals.
    pub fn generate_key_pair(
        &self,
        session: CK_SESSION_HANDLE,
        mech: CK_MECHANISM_TYPE,
        public: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
        private: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        let both: Vec<_> = private.iter().chain(public).cloned().collect();
        let new = NewKey::read(&both)?;
        let key_type = generated_type(mech, new.value(CKA_EC_PARAMS), new.ulong(CKA_MODULUS_BITS))?;
        self.create(&new.name, key_type, vec![Usage::Sign, Usage::Verify], session)?;
        let [public, private] = self.handles_after_create(&new.name, [Class::Public, Class::Private])?;
        Ok((public, private))
    }

    /// `C_DestroyObject`: deletes the key in hsmd (recoverable with `hsmctl
    /// key restore` until it is purged).
    ///
    /// # Errors
    /// `CKR_SESSION_READ_ONLY`; `CKR_ACTION_PROHIBITED` for a public key
    /// object (it goes with its key); hsmd's refusals.
    pub fn destroy(&self, session: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE) -> Result<()> {
        if !lock(&*self.session(session)?).read_write {
            return Err(Error::call(
                CKR_SESSION_READ_ONLY,
                "deleting needs a read-write session",
            ));
        }
        let object = lock(&self.objects).get(handle)?;
        // A key pair is one hsmd key: it goes with its private half. An AES
        // key is one object.
        if object.class == Class::Public {
            return Err(Error::call(
                CKR_ACTION_PROHIBITED,
                format!(
                    "the public key of {:?} goes with its key: destroy the private key object",
                    object.name
                ),
            ));
        }
        self.pool.call(|c| c.key_delete(object.name.clone()))?;
        let mut objects = lock(&self.objects);
        objects.remove(handle);
        if let Some(public) = objects.handle_of(&object.name, Class::Public) {
            objects.remove(public);
        }
        Ok(())
    }
}

/// A key generation's template, checked against what hsmd keys are.
struct NewKey<'t> {
    name: String,
    template: &'t [(CK_ATTRIBUTE_TYPE, Vec<u8>)],
}

impl<'t> NewKey<'t> {
    /// Reads the name and refuses what hsmd cannot make.
    ///
    /// # Errors
    /// `CKR_TEMPLATE_INCOMPLETE` without a `CKA_LABEL`;
    /// `CKR_ATTRIBUTE_READ_ONLY` for a `CKA_ID` (hsmd assigns ids);
    /// `CKR_ATTRIBUTE_VALUE_INVALID` for a session object (`CKA_TOKEN`
    /// false: hsmd keeps every key it makes) or a key that could leave
    /// (`CKA_EXTRACTABLE` true, `CKA_SENSITIVE` false).
    fn read(template: &'t [(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Result<Self> {
        let partial = Self {
            name: String::new(),
            template,
        };
        let invalid = |why: &str| Error::call(CKR_ATTRIBUTE_VALUE_INVALID, why.to_owned());
        if partial.value(CKA_ID).is_some() {
            return Err(Error::call(
                CKR_ATTRIBUTE_READ_ONLY,
                "hsmd assigns each key its id (CKA_ID); name the key with CKA_LABEL",
            ));
        }
        if partial.flag(CKA_TOKEN) == Some(false) {
            return Err(invalid(
                "hsmd keeps every key it makes: it has no session objects (CKA_TOKEN false); \
                 delete the key with C_DestroyObject when done",
            ));
        }
        if partial.flag(CKA_EXTRACTABLE) == Some(true) || partial.flag(CKA_SENSITIVE) == Some(false) {
            return Err(invalid(
                "an hsmd key never leaves hsmd: CKA_EXTRACTABLE true and CKA_SENSITIVE false cannot be \
                 honoured (pkcs11-tool: add --sensitive)",
            ));
        }
        let name = match partial.value(CKA_LABEL) {
            Some(label) => String::from_utf8(label.to_vec())
                .map_err(|_| Error::call(CKR_ATTRIBUTE_VALUE_INVALID, "CKA_LABEL is not UTF-8"))?,
            None => {
                return Err(Error::call(
                    CKR_TEMPLATE_INCOMPLETE,
                    "an hsmd key needs a name: give CKA_LABEL",
                ))
            }
        };
        Ok(Self { name, ..partial })
    }

    fn value(&self, kind: CK_ATTRIBUTE_TYPE) -> Option<&'t [u8]> {
        self.template
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    fn flag(&self, kind: CK_ATTRIBUTE_TYPE) -> Option<bool> {
        self.value(kind).map(|v| v.iter().any(|b| *b != CK_FALSE))
    }

    fn ulong(&self, kind: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
        self.value(kind)
            .and_then(|b| <[u8; std::mem::size_of::<CK_ULONG>()]>::try_from(b).ok())
            .map(CK_ULONG::from_ne_bytes)
    }
}

/// The hsmd key type `C_GenerateKeyPair` makes.
fn generated_type(mech: CK_MECHANISM_TYPE, ec_params: Option<&[u8]>, bits: Option<CK_ULONG>) -> Result<KeyType> {
    let invalid = |why: &str| Error::call(CKR_ATTRIBUTE_VALUE_INVALID, why.to_owned());
    match mech {
        CKM_EC_KEY_PAIR_GEN => match ec_params {
            Some(p) if p == crate::objects::P256_PARAMS => Ok(KeyType::EcdsaP256),
            Some(p) if p == crate::objects::P384_PARAMS => Ok(KeyType::EcdsaP384),
            Some(_) => Err(invalid("hsmd's ECDSA curves are P-256 and P-384 (CKA_EC_PARAMS)")),
            None => Err(Error::call(CKR_TEMPLATE_INCOMPLETE, "give the curve in CKA_EC_PARAMS")),
        },
        CKM_EC_EDWARDS_KEY_PAIR_GEN => Ok(KeyType::Ed25519),
        CKM_RSA_PKCS_KEY_PAIR_GEN => {
            let bits = bits.ok_or_else(|| Error::call(CKR_TEMPLATE_INCOMPLETE, "give CKA_MODULUS_BITS"))?;
            // PKCS#1 v1.5, what CKM_RSA_PKCS and TLS 1.2 and SSH sign with;
            // an RSA-PSS key is made with `hsmctl key create`.
            match bits {
                2048 => Ok(KeyType::RsaPkcs1_2048),
                3072 => Ok(KeyType::RsaPkcs1_3072),
                4096 => Ok(KeyType::RsaPkcs1_4096),
                _ => Err(invalid("hsmd's RSA keys have 2048, 3072 or 4096 bits")),
            }
        }
        other => Err(Error::call(
            CKR_MECHANISM_INVALID,
            format!("mechanism {other:#x} does not make hsmd keys"),
        )),
    }
}
