//! The PKCS#11 module (`libhsmd_pkcs11.so`'s code, linked in) called as a
//! program calls it, with the arguments the input makes: mechanisms with and
//! without parameters (PSS, EdDSA, GCM, raw bytes of any length), attribute
//! templates of any type, length and value, GCM message parameters, output
//! buffers too short, and keys generated, used and destroyed, against a real
//! hsmd server in this process.
//!
//! Every pointer the module is given is valid for the length it is told (the
//! module may trust that; a program that lies about lengths corrupts its own
//! memory). What must hold:
//! - no call panics (`CKR_GENERAL_ERROR`) or finds hsmd failing
//!   (`CKR_DEVICE_ERROR`);
//! - the module never writes past the length a buffer was given, and a
//!   length it reports with `CKR_OK` fits the buffer;
//! - what it signs verifies, and no longer does with a byte changed; what it
//!   encrypts decrypts to the same bytes, by the message interface and by
//!   `C_Decrypt`.

// The module's interface is C's; calling it is unsafe by definition.
#![allow(unsafe_code)]

use std::{ptr, sync::OnceLock};

use cryptoki_sys::*;
use serde::{Deserialize, Serialize};

/// The mechanisms the module knows, and some it does not.
const MECHANISMS: &[CK_MECHANISM_TYPE] = &[
    CKM_ECDSA,
    CKM_ECDSA_SHA256,
    CKM_ECDSA_SHA384,
    CKM_ECDSA_SHA512,
    CKM_EDDSA,
    CKM_RSA_PKCS,
    CKM_SHA256_RSA_PKCS,
    CKM_SHA384_RSA_PKCS,
    CKM_SHA512_RSA_PKCS,
    CKM_RSA_PKCS_PSS,
    CKM_SHA256_RSA_PKCS_PSS,
    CKM_EC_KEY_PAIR_GEN,
    CKM_EC_EDWARDS_KEY_PAIR_GEN,
    CKM_RSA_PKCS_KEY_PAIR_GEN,
    CKM_AES_GCM,
    CKM_AES_KEY_GEN,
    CKM_AES_CBC,
    CKM_SHA256,
    CKM_SHA512,
];

/// The attribute types the module reads or answers, and some it does not.
const ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_LABEL,
    CKA_ID,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_ALWAYS_SENSITIVE,
    CKA_NEVER_EXTRACTABLE,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_MODULUS,
    CKA_MODULUS_BITS,
    CKA_PUBLIC_EXPONENT,
    CKA_VALUE,
    CKA_VALUE_LEN,
    CKA_LOCAL,
    CKA_KEY_GEN_MECHANISM,
    CKA_ALLOWED_MECHANISMS,
];

/// CKA_EC_PARAMS values: P-256, P-384, Ed25519 (by OID and by name), P-521.
const CURVES: &[&[u8]] = &[
    &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
    &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
    &[0x06, 0x03, 0x2b, 0x65, 0x70],
    b"\x13\x0cedwards25519",
    &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23],
];

/// A value picked from a list (by index, wrapping), or any.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub enum Pick {
    /// The list's entry at this index (modulo its length).
    Known(u8),
    /// This value.
    Any(u64),
}

impl Pick {
    fn from(self, known: &[CK_ULONG]) -> CK_ULONG {
        match self {
            Self::Known(i) => known[usize::from(i) % known.len()],
            Self::Any(v) => v,
        }
    }
}

/// An attribute's value.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Value {
    /// `CK_TRUE`, one byte.
    True,
    /// `CK_FALSE`, one byte.
    False,
    /// A `CK_ULONG`.
    Ulong(u64),
    /// A small `CK_ULONG`.
    Small(u8),
    /// These bytes.
    Bytes(Vec<u8>),
    /// A curve's `CKA_EC_PARAMS` (P-256, P-384, Ed25519 by OID and by name,
    /// P-521).
    Curve(u8),
    /// A key name the module may create (and the input may name again).
    Label(u8),
    /// A null value pointer with this length.
    Null(u16),
}

/// A template's attribute.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Attr {
    /// `CKA_*`, from the ones the module knows.
    pub kind: Pick,
    /// Its value.
    pub value: Value,
}

/// A mechanism's parameter.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Param {
    /// None: a null pointer, length 0.
    None,
    /// A null parameter pointer with this length.
    Null(u16),
    /// These bytes (never the size of a structure with pointers the module
    /// follows: a byte shorter, then).
    Bytes(Vec<u8>),
    /// A `CK_RSA_PKCS_PSS_PARAMS`.
    Pss {
        /// `hashAlg`, from the mechanisms.
        hash: Pick,
        /// `mgf`.
        mgf: u64,
        /// `sLen`.
        salt: u64,
    },
    /// The `CK_RSA_PKCS_PSS_PARAMS` hsmd's keys sign with.
    GoodPss,
    /// A `CK_EDDSA_PARAMS`.
    Eddsa {
        /// `phFlag`.
        prehash: bool,
        /// The context data.
        context: Vec<u8>,
    },
    /// A `CK_GCM_PARAMS`.
    Gcm {
        /// The IV.
        iv: Vec<u8>,
        /// The associated data.
        aad: Vec<u8>,
        /// `ulTagBits`.
        tag_bits: u64,
    },
}

/// A `CK_MECHANISM`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Mech {
    /// `CKM_*`, from the ones the module knows.
    pub kind: Pick,
    /// Its parameter.
    pub param: Param,
}

/// An object handle: one found at the start, one generated here, or any.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub enum Obj {
    /// The session's objects at its start, by index (wrapping).
    Found(u8),
    /// The keys generated so far, by index (wrapping).
    Made(u8),
    /// This handle.
    Any(u64),
}

/// A `CK_GCM_MESSAGE_PARAMS`: its fields, and the IV and tag it points to.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct MessageParams {
    /// Pass a null parameter instead.
    pub absent: bool,
    /// `ulIvLen` (and the IV buffer's length).
    pub iv_len: u8,
    /// `ulIvFixedBits`.
    pub iv_fixed_bits: u64,
    /// `ivGenerator`, from the `CKG_*` generators.
    pub generator: Pick,
    /// `ulTagBits` (the tag buffer is this many bytes over 8, at most 64).
    pub tag_bits: u64,
    /// The IV buffer's bytes.
    pub iv: Vec<u8>,
    /// The tag buffer's bytes.
    pub tag: Vec<u8>,
}

/// One call (or the calls of one operation) a program makes.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Call {
    /// `C_FindObjectsInit` with the template, `C_FindObjects` for at most
    /// `max`, `C_FindObjectsFinal`.
    Find {
        /// The template.
        template: Vec<Attr>,
        /// The most handles asked for.
        max: u8,
    },
    /// `C_GetAttributeValue`, each attribute with a buffer of the length
    /// given or a null one (asking the length).
    Attributes {
        /// The object.
        object: Obj,
        /// The attributes and their buffers' lengths.
        wanted: Vec<(Pick, Option<u8>)>,
    },
    /// `C_SignInit`, then `C_Sign` (one part) or `C_SignUpdate`s and
    /// `C_SignFinal`; a signature made is verified, and verified changed.
    Sign {
        /// The mechanism.
        mech: Mech,
        /// The key.
        key: Obj,
        /// The data, in parts.
        parts: Vec<Vec<u8>>,
        /// The output buffer's length, or `None` to ask it first.
        out: Option<u16>,
    },
    /// `C_VerifyInit` and `C_Verify` of a made-up signature.
    Verify {
        /// The mechanism.
        mech: Mech,
        /// The key.
        key: Obj,
        /// The data.
        data: Vec<u8>,
        /// The signature.
        signature: Vec<u8>,
    },
    /// `C_DecryptInit`, then `C_Decrypt` (one part) or `C_DecryptUpdate`s
    /// and `C_DecryptFinal`.
    Decrypt {
        /// The mechanism.
        mech: Mech,
        /// The key.
        key: Obj,
        /// The input, in parts.
        parts: Vec<Vec<u8>>,
        /// The output buffer's length, or `None` to ask it first.
        out: Option<u16>,
    },
    /// `C_EncryptInit`, which nothing the module offers accepts.
    EncryptInit {
        /// The mechanism.
        mech: Mech,
        /// The key.
        key: Obj,
    },
    /// A message operation's init, one `C_EncryptMessage` or
    /// `C_DecryptMessage`, and its final; a message encrypted is opened by
    /// both interfaces.
    Message {
        /// Decrypt instead of encrypting.
        decrypt: bool,
        /// The mechanism.
        mech: Mech,
        /// The key.
        key: Obj,
        /// The message's parameter.
        params: MessageParams,
        /// Associated data.
        aad: Vec<u8>,
        /// The input.
        data: Vec<u8>,
        /// The output buffer's length, or `None` to ask it first.
        out: Option<u16>,
    },
    /// `C_GenerateKeyPair`.
    GenerateKeyPair {
        /// The mechanism.
        mech: Mech,
        /// The public key's template.
        public: Vec<Attr>,
        /// The private key's template.
        private: Vec<Attr>,
    },
    /// `C_GenerateKey`.
    GenerateKey {
        /// The mechanism.
        mech: Mech,
        /// The template.
        template: Vec<Attr>,
    },
    /// `C_DestroyObject` of a key made here.
    Destroy {
        /// The object (only [`Obj::Made`] is destroyed).
        object: Obj,
    },
}

/// What one input got done: a target whose inputs never got past the
/// module's checks would still run clean, so the seeds' are counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Signatures made and verified.
    pub signed: usize,
    /// Messages encrypted and opened both ways.
    pub sealed: usize,
    /// Keys generated.
    pub made: usize,
    /// Calls refused (any `CKR_*` but `CKR_OK`) at their first step.
    pub refused: usize,
}

/// The input's wire form (bincode, variable-length integers, at most 64 KiB
/// of structure), which `fuzzing/examples/seeds.rs` writes seeds in.
#[must_use]
pub fn encode(calls: &[Call]) -> Vec<u8> {
    bincode::serde::encode_to_vec(calls, config()).expect("calls encode")
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<65536>()
}

/// What a call's memory looks like past its end: the module must leave it.
const CANARY: u8 = 0xa5;
const GUARD: usize = 32;

/// A buffer the module writes into, with guard bytes after its length.
struct Out {
    bytes: Vec<u8>,
    len: usize,
}

impl Out {
    fn new(len: usize) -> Self {
        Self {
            bytes: vec![CANARY; len + GUARD],
            len,
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        self.bytes.as_mut_ptr()
    }

    fn ulen(&self) -> CK_ULONG {
        self.len as CK_ULONG
    }

    /// The first `n` bytes written, checking the guard and that `n` fits.
    fn written(&self, what: &str, n: CK_ULONG) -> &[u8] {
        assert!(
            self.bytes[self.len..].iter().all(|b| *b == CANARY),
            "{what} wrote past the {} bytes it was given",
            self.len
        );
        let n = usize::try_from(n).expect("a length");
        assert!(
            n <= self.len,
            "{what} answered CKR_OK with {n} bytes in a {}-byte buffer",
            self.len
        );
        &self.bytes[..n]
    }

    fn untouched(&self, what: &str) {
        assert!(
            self.bytes[self.len..].iter().all(|b| *b == CANARY),
            "{what} wrote past the {} bytes it was given",
            self.len
        );
    }
}

fn functions() -> &'static CK_FUNCTION_LIST_3_0 {
    static LIST: OnceLock<&'static CK_FUNCTION_LIST_3_0> = OnceLock::new();
    LIST.get_or_init(|| {
        // A server of its own (the connection target's changes its keys),
        // with a key of each kind the module serves in software (RSA keys
        // live in hardware only: generating one is refused), and one that
        // may sign but not verify.
        let default = protocol::KeyOptions::default();
        let server = crate::connection::start(&[
            ("ed", protocol::KeyType::Ed25519, &[], &default),
            ("p256", protocol::KeyType::EcdsaP256, &[], &default),
            ("p384", protocol::KeyType::EcdsaP384, &[], &default),
            ("aes", protocol::KeyType::Aes256Gcm, &[], &default),
            (
                "sign-only",
                protocol::KeyType::EcdsaP256,
                &[protocol::Usage::Sign],
                &default,
            ),
        ]);
        // The module finds hsmd through $HSMD_SOCKET, read at C_Initialize.
        // Set before the module has threads; the server's thread reads no
        // environment.
        std::env::set_var("HSMD_SOCKET", &server.main);
        // The server serves for as long as the process runs.
        std::mem::forget(server);
        let mut interface: *mut CK_INTERFACE = ptr::null_mut();
        // SAFETY: null name and version ask for the default (3.0) interface;
        // the out-pointer is writable.
        let rv = unsafe { hsmd_pkcs11::C_GetInterface(ptr::null_mut(), ptr::null_mut(), &mut interface, 0) };
        assert_eq!(rv, CKR_OK, "C_GetInterface");
        // SAFETY: the module's static interface, whose function list is a
        // CK_FUNCTION_LIST_3_0 for version 3.0.
        let list = unsafe { &*(*interface).pFunctionList.cast::<CK_FUNCTION_LIST_3_0>() };
        // SAFETY: no arguments: the module's own locking.
        let rv = unsafe { list.C_Initialize.expect("C_Initialize")(ptr::null_mut()) };
        assert_eq!(rv, CKR_OK, "C_Initialize");
        list
    })
}

/// Calls one of the module's functions and checks its answer is not one no
/// input may cause.
macro_rules! call {
    ($f:ident ( $($arg:expr),* $(,)? )) => {{
        let f = functions().$f.expect(stringify!($f));
        // SAFETY: every pointer passed is valid for the length given with
        // it, as `run` builds them.
        let rv = unsafe { f($($arg),*) };
        assert_ne!(rv, CKR_GENERAL_ERROR, "{} failed inside the module (a panic)", stringify!($f));
        assert_ne!(rv, CKR_DEVICE_ERROR, "{}: hsmd failed (internal)", stringify!($f));
        rv
    }};
}

/// The memory a call's arguments point into, kept alive for the call.
#[derive(Default)]
struct Arena {
    bytes: Vec<Vec<u8>>,
    attrs: Vec<Vec<CK_ATTRIBUTE>>,
    params: Vec<Box<[u8]>>,
}

impl Arena {
    fn keep(&mut self, bytes: Vec<u8>) -> (*mut u8, CK_ULONG) {
        let len = bytes.len() as CK_ULONG;
        self.bytes.push(bytes);
        let ptr = self.bytes.last_mut().map_or(ptr::null_mut(), Vec::as_mut_ptr);
        (ptr, len)
    }

    fn keep_struct<T: Copy>(&mut self, value: T) -> (*mut std::ffi::c_void, CK_ULONG) {
        let size = std::mem::size_of::<T>();
        let mut boxed = vec![0u8; size].into_boxed_slice();
        // SAFETY: `boxed` has exactly `size` bytes; written unaligned.
        unsafe { boxed.as_mut_ptr().cast::<T>().write_unaligned(value) };
        self.params.push(boxed);
        let ptr = self.params.last_mut().map_or(ptr::null_mut(), |b| b.as_mut_ptr());
        (ptr.cast(), size as CK_ULONG)
    }

    fn template(&mut self, attrs: &[Attr]) -> (*mut CK_ATTRIBUTE, CK_ULONG) {
        let mut out = Vec::with_capacity(attrs.len());
        for attr in attrs {
            let kind = attr.kind.from(ATTRIBUTES);
            let bytes = match &attr.value {
                Value::True => vec![CK_TRUE],
                Value::False => vec![CK_FALSE],
                Value::Ulong(v) => v.to_ne_bytes().to_vec(),
                Value::Small(v) => CK_ULONG::from(*v).to_ne_bytes().to_vec(),
                Value::Bytes(b) => b.clone(),
                Value::Curve(i) => CURVES[usize::from(*i) % CURVES.len()].to_vec(),
                Value::Label(i) => format!("p11-fuzz-{}", i % 8).into_bytes(),
                Value::Null(len) => {
                    out.push(CK_ATTRIBUTE {
                        type_: kind,
                        pValue: ptr::null_mut(),
                        ulValueLen: CK_ULONG::from(*len),
                    });
                    continue;
                }
            };
            let (ptr, len) = self.keep(bytes);
            out.push(CK_ATTRIBUTE {
                type_: kind,
                pValue: ptr.cast(),
                ulValueLen: len,
            });
        }
        let count = out.len() as CK_ULONG;
        self.attrs.push(out);
        let ptr = self.attrs.last_mut().map_or(ptr::null_mut(), Vec::as_mut_ptr);
        (ptr, count)
    }

    fn mechanism(&mut self, mech: &Mech) -> CK_MECHANISM {
        let kind = mech.kind.from(MECHANISMS);
        let (ptr, len) = match &mech.param {
            Param::None => (ptr::null_mut(), 0),
            Param::Null(len) => (ptr::null_mut(), CK_ULONG::from(*len)),
            Param::Bytes(bytes) => {
                let mut bytes = bytes.clone();
                // A structure of this size holds pointers the module follows.
                if [
                    std::mem::size_of::<CK_GCM_PARAMS>(),
                    std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>(),
                ]
                .contains(&bytes.len())
                {
                    bytes.pop();
                }
                let (ptr, len) = self.keep(bytes);
                (ptr.cast(), len)
            }
            Param::Pss { hash, mgf, salt } => self.keep_struct(CK_RSA_PKCS_PSS_PARAMS {
                hashAlg: hash.from(MECHANISMS),
                mgf: *mgf,
                sLen: *salt,
            }),
            Param::GoodPss => self.keep_struct(CK_RSA_PKCS_PSS_PARAMS {
                hashAlg: CKM_SHA256,
                mgf: CKG_MGF1_SHA256,
                sLen: 32,
            }),
            Param::Eddsa { prehash, context } => {
                let (data, len) = self.keep(context.clone());
                self.keep_struct(CK_EDDSA_PARAMS {
                    phFlag: CK_BBOOL::from(*prehash),
                    ulContextDataLen: len,
                    pContextData: data,
                })
            }
            Param::Gcm { iv, aad, tag_bits } => {
                let (iv_ptr, iv_len) = self.keep(iv.clone());
                let (aad_ptr, aad_len) = self.keep(aad.clone());
                self.keep_struct(CK_GCM_PARAMS {
                    pIv: iv_ptr,
                    ulIvLen: iv_len,
                    ulIvBits: iv_len * 8,
                    pAAD: aad_ptr,
                    ulAADLen: aad_len,
                    ulTagBits: *tag_bits,
                })
            }
        };
        CK_MECHANISM {
            mechanism: kind,
            pParameter: ptr,
            ulParameterLen: len,
        }
    }
}

/// One session's worth of state.
struct Session {
    handle: CK_SESSION_HANDLE,
    done: Done,
    found: Vec<CK_OBJECT_HANDLE>,
    made: Vec<CK_OBJECT_HANDLE>,
}

impl Session {
    fn object(&self, obj: Obj) -> CK_OBJECT_HANDLE {
        let pick = |list: &[CK_OBJECT_HANDLE], i: u8| {
            if list.is_empty() {
                0
            } else {
                list[usize::from(i) % list.len()]
            }
        };
        match obj {
            Obj::Found(i) => pick(&self.found, i),
            Obj::Made(i) => pick(&self.made, i),
            Obj::Any(h) => h,
        }
    }

    /// Every object the session sees, by an empty template.
    fn find_all(&self) -> Vec<CK_OBJECT_HANDLE> {
        let rv = call!(C_FindObjectsInit(self.handle, ptr::null_mut(), 0));
        if rv != CKR_OK {
            return Vec::new();
        }
        let mut found = vec![0; 256];
        let mut count: CK_ULONG = 0;
        let rv = call!(C_FindObjects(self.handle, found.as_mut_ptr(), 256, &mut count));
        call!(C_FindObjectsFinal(self.handle));
        if rv != CKR_OK {
            return Vec::new();
        }
        found.truncate(usize::try_from(count).expect("a count"));
        found
    }
}

/// Runs the input's calls in one session.
pub fn run(data: &[u8]) {
    let _ = exercise(data);
}

/// As [`run`]; says what got done (`None`: the input is not calls).
pub fn exercise(data: &[u8]) -> Option<Done> {
    let Ok((calls, _)) = bincode::serde::decode_from_slice::<Vec<Call>, _>(data, config()) else {
        return None;
    };
    // One input at a time (tests run on threads): an input must find the
    // objects the last one left, not another's keys half made.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut handle = 0;
    let rv = call!(C_OpenSession(
        1,
        CKF_SERIAL_SESSION | CKF_RW_SESSION,
        ptr::null_mut(),
        None,
        &mut handle
    ));
    assert_eq!(rv, CKR_OK, "C_OpenSession");
    let mut session = Session {
        handle,
        done: Done::default(),
        found: Vec::new(),
        made: Vec::new(),
    };
    session.found = session.find_all();
    assert!(
        session.found.len() >= 4,
        "the fuzz server's keys are objects: {:?}",
        session.found
    );
    for c in calls.iter().take(32) {
        one(&mut session, c);
    }
    // What this input made goes, so the next input starts as this one did:
    // destroyed (which deletes softly, keeping the name), then purged.
    for object in std::mem::take(&mut session.made) {
        call!(C_DestroyObject(session.handle, object));
    }
    purge_made_keys();
    let rv = call!(C_CloseSession(session.handle));
    assert_eq!(rv, CKR_OK, "C_CloseSession");
    Some(session.done)
}

fn one(session: &mut Session, c: &Call) {
    let s = session.handle;
    let mut arena = Arena::default();
    match c {
        Call::Find { template, max } => {
            let (t, n) = arena.template(template);
            if call!(C_FindObjectsInit(s, t, n)) == CKR_OK {
                let mut out = Out::new(usize::from(*max) * std::mem::size_of::<CK_OBJECT_HANDLE>());
                let mut count: CK_ULONG = 0;
                let rv = call!(C_FindObjects(s, out.ptr().cast(), CK_ULONG::from(*max), &mut count));
                if rv == CKR_OK {
                    let _ = out.written(
                        "C_FindObjects",
                        count * std::mem::size_of::<CK_OBJECT_HANDLE>() as CK_ULONG,
                    );
                }
                call!(C_FindObjectsFinal(s));
            }
        }
        Call::Attributes { object, wanted } => {
            let mut outs: Vec<Option<Out>> = wanted.iter().map(|(_, len)| len.map(|l| Out::new(l.into()))).collect();
            let mut attrs: Vec<CK_ATTRIBUTE> = wanted
                .iter()
                .zip(&mut outs)
                .map(|((kind, _), out)| CK_ATTRIBUTE {
                    type_: kind.from(ATTRIBUTES),
                    pValue: out.as_mut().map_or(ptr::null_mut(), |o| o.ptr().cast()),
                    ulValueLen: out.as_ref().map_or(0, Out::ulen),
                })
                .collect();
            let rv = call!(C_GetAttributeValue(
                s,
                session.object(*object),
                attrs.as_mut_ptr(),
                attrs.len() as CK_ULONG
            ));
            for (attr, out) in attrs.iter().zip(&outs) {
                let Some(out) = out else { continue };
                out.untouched("C_GetAttributeValue");
                if rv == CKR_OK {
                    let _ = out.written("C_GetAttributeValue", attr.ulValueLen);
                }
            }
        }
        Call::Sign { mech, key, parts, out } => {
            let mut m = arena.mechanism(mech);
            let key = session.object(*key);
            if call!(C_SignInit(s, &mut m, key)) != CKR_OK {
                session.done.refused += 1;
                return;
            }
            let data: Vec<u8> = parts.concat();
            let signature = if parts.len() == 1 {
                let (d, n) = arena.keep(data.clone());
                output(out, "C_Sign", |o, len| call!(C_Sign(s, d, n, o, len)))
            } else {
                for part in parts {
                    let (d, n) = arena.keep(part.clone());
                    if call!(C_SignUpdate(s, d, n)) != CKR_OK {
                        return;
                    }
                }
                output(out, "C_SignFinal", |o, len| call!(C_SignFinal(s, o, len)))
            };
            let Some(signature) = signature else { return };
            // What was signed verifies, and with a byte changed does not.
            let verify = |signature: &[u8], arena: &mut Arena| {
                let mut m = arena.mechanism(mech);
                match call!(C_VerifyInit(s, &mut m, key)) {
                    CKR_OK => {}
                    // A key made to sign only.
                    CKR_KEY_FUNCTION_NOT_PERMITTED => return None,
                    rv => panic!("C_VerifyInit after C_SignInit: {rv:#x}"),
                }
                let (d, n) = arena.keep(data.clone());
                let (g, l) = arena.keep(signature.to_vec());
                Some(call!(C_Verify(s, d, n, g, l)))
            };
            let Some(rv) = verify(&signature, &mut arena) else {
                return;
            };
            assert_eq!(rv, CKR_OK, "a signature the module made does not verify");
            let mut changed = signature.clone();
            if let Some(b) = changed.last_mut() {
                *b ^= 1;
            }
            let rv = verify(&changed, &mut arena).unwrap_or_default();
            assert!(
                matches!(rv, CKR_SIGNATURE_INVALID | CKR_SIGNATURE_LEN_RANGE),
                "a changed signature: {rv:#x}"
            );
            session.done.signed += 1;
        }
        Call::Verify {
            mech,
            key,
            data,
            signature,
        } => {
            let mut m = arena.mechanism(mech);
            if call!(C_VerifyInit(s, &mut m, session.object(*key))) == CKR_OK {
                let (d, n) = arena.keep(data.clone());
                let (g, l) = arena.keep(signature.clone());
                let rv = call!(C_Verify(s, d, n, g, l));
                assert_ne!(rv, CKR_OK, "a signature the input made up verified");
            }
        }
        Call::Decrypt { mech, key, parts, out } => {
            let mut m = arena.mechanism(mech);
            if call!(C_DecryptInit(s, &mut m, session.object(*key))) != CKR_OK {
                session.done.refused += 1;
                return;
            }
            if parts.len() == 1 {
                let (d, n) = arena.keep(parts[0].clone());
                let _ = output(out, "C_Decrypt", |o, len| call!(C_Decrypt(s, d, n, o, len)));
            } else {
                for part in parts {
                    let (d, n) = arena.keep(part.clone());
                    let mut none: CK_ULONG = 0;
                    let rv = call!(C_DecryptUpdate(s, d, n, ptr::null_mut(), &mut none));
                    if rv != CKR_OK {
                        return;
                    }
                }
                let _ = output(out, "C_DecryptFinal", |o, len| call!(C_DecryptFinal(s, o, len)));
            }
        }
        Call::EncryptInit { mech, key } => {
            let mut m = arena.mechanism(mech);
            if call!(C_EncryptInit(s, &mut m, session.object(*key))) == CKR_OK {
                // Nothing the module offers encrypts single-part.
                panic!("C_EncryptInit accepted {mech:?}");
            }
        }
        Call::Message {
            decrypt,
            mech,
            key,
            params,
            aad,
            data,
            out,
        } => message(session, &mut arena, *decrypt, (mech, *key), params, (aad, data), *out),
        Call::GenerateKeyPair { mech, public, private } => {
            let mut m = arena.mechanism(mech);
            let (pt, pn) = arena.template(public);
            let (qt, qn) = arena.template(private);
            let (mut public, mut private) = (0, 0);
            if call!(C_GenerateKeyPair(s, &mut m, pt, pn, qt, qn, &mut public, &mut private)) == CKR_OK {
                session.made.push(private);
                session.found.push(public);
                session.done.made += 1;
            } else {
                session.done.refused += 1;
            }
        }
        Call::GenerateKey { mech, template } => {
            let mut m = arena.mechanism(mech);
            let (t, n) = arena.template(template);
            let mut key = 0;
            if call!(C_GenerateKey(s, &mut m, t, n, &mut key)) == CKR_OK {
                session.made.push(key);
                session.done.made += 1;
            } else {
                session.done.refused += 1;
            }
        }
        Call::Destroy { object } => {
            // Never the server's own keys: later inputs use them.
            let handle = session.object(*object);
            if matches!(object, Obj::Made(_)) && call!(C_DestroyObject(s, handle)) == CKR_OK {
                session.made.retain(|h| *h != handle);
            }
        }
    }
}

/// Purges every key an input generated (named by [`Value::Label`]).
fn purge_made_keys() {
    let socket = std::env::var_os("HSMD_SOCKET").expect("set at the start");
    let mut client = protocol::Client::connect(socket).expect("connect to the fuzz server");
    for key in client.key_list().expect("list keys") {
        if key.name.starts_with("p11-fuzz-") {
            if key.deleted_unix.is_none() {
                client.key_delete(key.name.clone()).expect("delete a generated key");
            }
            client.key_purge(key.name).expect("purge a generated key");
        }
    }
}

/// Runs a call that writes an output as PKCS#11 does: into a buffer of the
/// input's length, or (for `None`) asked for its length first with a null
/// buffer, then into one of that length. `Some(output)` on `CKR_OK`.
fn output(out: &Option<u16>, name: &str, mut f: impl FnMut(*mut u8, *mut CK_ULONG) -> CK_RV) -> Option<Vec<u8>> {
    let len = match out {
        Some(len) => usize::from(*len),
        None => {
            let mut len: CK_ULONG = 0;
            if f(ptr::null_mut(), &mut len) != CKR_OK {
                return None;
            }
            // A length the module cannot mean: nothing to allocate.
            usize::try_from(len).ok().filter(|l| *l <= 1 << 24)?
        }
    };
    let mut buf = Out::new(len);
    let mut n = buf.ulen();
    let rv = f(buf.ptr(), &mut n);
    buf.untouched(name);
    (rv == CKR_OK).then(|| buf.written(name, n).to_vec())
}

/// `C_EncryptMessage` or `C_DecryptMessage` with the input's parameters; a
/// message encrypted is then opened both ways.
#[allow(clippy::too_many_arguments)]
fn message(
    session: &mut Session,
    arena: &mut Arena,
    decrypt: bool,
    (mech, key): (&Mech, Obj),
    params: &MessageParams,
    (aad, data): (&[u8], &[u8]),
    out: Option<u16>,
) {
    let s = session.handle;
    let key = session.object(key);
    let mut m = arena.mechanism(mech);
    let init = if decrypt {
        call!(C_MessageDecryptInit(s, &mut m, key))
    } else {
        call!(C_MessageEncryptInit(s, &mut m, key))
    };
    if init != CKR_OK {
        session.done.refused += 1;
        return;
    }
    let mut iv = Out::new(usize::from(params.iv_len));
    let tag_len = usize::try_from(params.tag_bits / 8).unwrap_or(usize::MAX).min(64);
    let mut tag = Out::new(tag_len);
    iv.bytes[..iv.len.min(params.iv.len())].copy_from_slice(&params.iv[..iv.len.min(params.iv.len())]);
    tag.bytes[..tag_len.min(params.tag.len())].copy_from_slice(&params.tag[..tag_len.min(params.tag.len())]);
    let (p, pl) = if params.absent {
        (ptr::null_mut(), 0)
    } else {
        arena.keep_struct(CK_GCM_MESSAGE_PARAMS {
            pIv: iv.ptr(),
            ulIvLen: CK_ULONG::from(params.iv_len),
            ulIvFixedBits: params.iv_fixed_bits,
            ivGenerator: params.generator.from(&[
                CKG_NO_GENERATE,
                CKG_GENERATE,
                CKG_GENERATE_COUNTER,
                CKG_GENERATE_RANDOM,
            ]),
            pTag: tag.ptr(),
            ulTagBits: params.tag_bits,
        })
    };
    let (a, al) = arena.keep(aad.to_vec());
    let (d, dl) = arena.keep(data.to_vec());
    let name = if decrypt {
        "C_DecryptMessage"
    } else {
        "C_EncryptMessage"
    };
    let result = output(&out, name, |o, len| {
        if decrypt {
            call!(C_DecryptMessage(s, p, pl, a, al, d, dl, o, len))
        } else {
            call!(C_EncryptMessage(s, p, pl, a, al, d, dl, o, len))
        }
    });
    iv.untouched(name);
    tag.untouched(name);
    let done = if decrypt {
        call!(C_MessageDecryptFinal(s))
    } else {
        call!(C_MessageEncryptFinal(s))
    };
    assert_eq!(done, CKR_OK, "{name}'s final");
    let Some(sealed) = result else { return };
    if decrypt {
        return;
    }
    assert_ne!(iv.bytes[..12], [CANARY; 12], "C_EncryptMessage wrote no IV");
    // Opened by the message interface...
    let mut m = arena.mechanism(mech);
    assert_eq!(
        call!(C_MessageDecryptInit(s, &mut m, key)),
        CKR_OK,
        "C_MessageDecryptInit"
    );
    let (c, cl) = arena.keep(sealed.clone());
    let opened = output(&None, "C_DecryptMessage", |o, len| {
        call!(C_DecryptMessage(s, p, pl, a, al, c, cl, o, len))
    });
    assert_eq!(call!(C_MessageDecryptFinal(s)), CKR_OK, "C_MessageDecryptFinal");
    assert_eq!(
        opened.as_deref(),
        Some(data),
        "C_DecryptMessage did not give back what was encrypted"
    );
    // ... and by C_Decrypt, the tag after the ciphertext.
    let mech = Mech {
        kind: Pick::Known(14),
        param: Param::Gcm {
            iv: iv.bytes[..12].to_vec(),
            aad: aad.to_vec(),
            tag_bits: 128,
        },
    };
    let mut m = arena.mechanism(&mech);
    assert_eq!(m.mechanism, CKM_AES_GCM);
    assert_eq!(call!(C_DecryptInit(s, &mut m, key)), CKR_OK, "C_DecryptInit");
    let (c, cl) = arena.keep([sealed.as_slice(), &tag.bytes[..16]].concat());
    let opened = output(&None, "C_Decrypt", |o, len| call!(C_Decrypt(s, c, cl, o, len)));
    assert_eq!(
        opened.as_deref(),
        Some(data),
        "C_Decrypt did not give back what was encrypted"
    );
    session.done.sealed += 1;
}
