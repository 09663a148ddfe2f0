//! The C interface: the `C_*` functions, the function lists and interfaces
//! that hand them out, and the only code here that touches the caller's
//! pointers. Each function reads its arguments into Rust values, calls
//! [`crate::token`], and writes the results back; none lets a panic cross
//! into the host program.
#![allow(unsafe_code, non_snake_case)]

use std::{ffi::c_void, panic::AssertUnwindSafe, ptr};

use cryptoki_sys::*;

use crate::{
    cipher::{self, Direction, GcmParams, MessageParams, IV_LEN, TAG_LEN},
    error::{Error, Result},
    mechanism::{Mechanism, Params, MECHANISMS},
    objects::Attr,
    token::{self, Purpose, SLOT},
};

const CRYPTOKI_3_0: CK_VERSION = CK_VERSION { major: 3, minor: 0 };
const CRYPTOKI_2_40: CK_VERSION = CK_VERSION { major: 2, minor: 40 };
const MANUFACTURER: &str = "hsmd";

fn library_version() -> CK_VERSION {
    let mut parts = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse::<u8>().unwrap_or(0));
    CK_VERSION {
        major: parts.next().unwrap_or(0),
        minor: parts.next().unwrap_or(0),
    }
}

/// Runs one call: its error becomes its `CK_RV` (and a line in the module's
/// log), a panic `CKR_GENERAL_ERROR`.
fn guard(name: &str, f: impl FnOnce() -> Result<CK_RV>) -> CK_RV {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(rv)) => rv,
        Ok(Err(e)) => {
            crate::log(&format!("{name}: {e}"));
            e.rv()
        }
        Err(_) => {
            crate::log(&format!("{name}: internal error"));
            CKR_GENERAL_ERROR
        }
    }
}

fn bad(why: &str) -> Error {
    Error::call(CKR_ARGUMENTS_BAD, why.to_owned())
}

/// Space-padded, as PKCS#11's fixed-length strings are; cut at a character
/// boundary when too long.
fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// # Safety
/// `ptr` is null or valid for reads of `len` bytes for `'a`.
unsafe fn bytes<'a>(ptr: *const u8, len: CK_ULONG) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(bad("a null data pointer with a non-zero length"));
    }
    // SAFETY: non-null, and the caller promises `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len as usize) })
}

/// # Safety
/// `ptr` is null or valid for writes of `len` bytes for `'a`.
unsafe fn bytes_mut<'a>(ptr: *mut u8, len: CK_ULONG) -> Option<&'a mut [u8]> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null, and the caller promises `len` writable bytes.
    Some(unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) })
}

/// Writes through an out-pointer.
///
/// # Safety
/// `ptr` is null or valid for a write of `T`.
unsafe fn put<T>(ptr: *mut T, value: T) -> Result<()> {
    if ptr.is_null() {
        return Err(bad("a null output pointer"));
    }
    // SAFETY: non-null and, as the caller promises, writable; `write` does
    // not drop the uninitialized old value.
    unsafe { ptr.write(value) };
    Ok(())
}

/// A template's attributes, copied.
///
/// # Safety
/// `ptr` is null or valid for `count` attributes, each of whose `pValue` is
/// valid for `ulValueLen` bytes.
unsafe fn template(ptr: *const CK_ATTRIBUTE, count: CK_ULONG) -> Result<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(bad("a null template with a non-zero count"));
    }
    // SAFETY: the caller promises `count` attributes at `ptr`.
    let attrs = unsafe { std::slice::from_raw_parts(ptr, count as usize) };
    attrs
        .iter()
        // SAFETY: each attribute's value is valid for its length, as promised.
        .map(|a| Ok((a.type_, unsafe { bytes(a.pValue.cast(), a.ulValueLen) }?.to_vec())))
        .collect()
}

/// A list written as PKCS#11 writes lists: the count alone when `out` is
/// null, `CKR_BUFFER_TOO_SMALL` (and the count) when it is too short.
///
/// # Safety
/// `count` is valid for reads and writes; `out` is null or valid for
/// `*count` writes of `T`.
unsafe fn list<T: Copy>(items: &[T], out: *mut T, count: *mut CK_ULONG) -> Result<CK_RV> {
    if count.is_null() {
        return Err(bad("a null count pointer"));
    }
    // SAFETY: non-null and valid, as the caller promises.
    let room = unsafe { *count } as usize;
    // SAFETY: as above.
    unsafe { *count = items.len() as CK_ULONG };
    if out.is_null() {
        return Ok(CKR_OK);
    }
    if room < items.len() {
        return Ok(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `out` has room for `room >= items.len()` items.
    unsafe { ptr::copy_nonoverlapping(items.as_ptr(), out, items.len()) };
    Ok(CKR_OK)
}

/// # Safety
/// `mech` is null or valid, with a parameter valid for its length.
unsafe fn mechanism(mech: *const CK_MECHANISM) -> Result<Mechanism> {
    if mech.is_null() {
        return Err(bad("a null mechanism"));
    }
    // SAFETY: non-null and valid, as the caller promises.
    let m = unsafe { &*mech };
    let len = m.ulParameterLen as usize;
    let params = if m.pParameter.is_null() || len == 0 {
        Params::None
    } else if len == std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>()
        && matches!(m.mechanism, CKM_RSA_PKCS_PSS | CKM_SHA256_RSA_PKCS_PSS)
    {
        // SAFETY: the parameter is a CK_RSA_PKCS_PSS_PARAMS of the length given;
        // read unaligned since the caller owes no alignment.
        let p = unsafe { m.pParameter.cast::<CK_RSA_PKCS_PSS_PARAMS>().read_unaligned() };
        Params::Pss(p.hashAlg, p.mgf, p.sLen)
    } else if len == std::mem::size_of::<CK_EDDSA_PARAMS>() && m.mechanism == CKM_EDDSA {
        // SAFETY: as above, a CK_EDDSA_PARAMS.
        let p = unsafe { m.pParameter.cast::<CK_EDDSA_PARAMS>().read_unaligned() };
        Params::Eddsa {
            prehash: p.phFlag != CK_FALSE,
            context_len: p.ulContextDataLen,
        }
    } else if len == std::mem::size_of::<CK_GCM_PARAMS>() && m.mechanism == CKM_AES_GCM {
        // SAFETY: as above, a CK_GCM_PARAMS, whose IV and AAD pointers are
        // valid for their lengths.
        let p = unsafe { m.pParameter.cast::<CK_GCM_PARAMS>().read_unaligned() };
        Params::Gcm(GcmParams {
            // SAFETY: as the caller promises.
            iv: unsafe { bytes(p.pIv, p.ulIvLen) }?.to_vec(),
            // SAFETY: as the caller promises.
            aad: unsafe { bytes(p.pAAD, p.ulAADLen) }?.to_vec(),
            tag_bits: p.ulTagBits,
        })
    } else {
        Params::Other
    };
    Ok(Mechanism {
        kind: m.mechanism,
        params,
    })
}

/// The mechanism of a message operation's init, whose parameter is not read:
/// each message brings its own (and a `CK_GCM_MESSAGE_PARAMS` has the size
/// of a `CK_GCM_PARAMS`, so reading it as one would follow wrong pointers).
///
/// # Safety
/// `mech` is null or valid.
unsafe fn message_mechanism(mech: *const CK_MECHANISM) -> Result<Mechanism> {
    if mech.is_null() {
        return Err(bad("a null mechanism"));
    }
    // SAFETY: non-null and valid, as the caller promises.
    let kind = unsafe { (*mech).mechanism };
    Ok(Mechanism {
        kind,
        params: Params::Other,
    })
}

fn check_slot(slot: CK_SLOT_ID) -> Result<()> {
    if slot != SLOT {
        return Err(Error::call(CKR_SLOT_ID_INVALID, format!("the only slot is {SLOT}")));
    }
    Ok(())
}

// ---------------------------------------------------------------- general

/// # Safety
/// As PKCS#11 specifies: `args` is null or a valid `CK_C_INITIALIZE_ARGS`.
#[no_mangle]
pub unsafe extern "C" fn C_Initialize(args: *mut c_void) -> CK_RV {
    guard("C_Initialize", || {
        if !args.is_null() {
            // SAFETY: non-null, and the caller passes a CK_C_INITIALIZE_ARGS.
            let a = unsafe { args.cast::<CK_C_INITIALIZE_ARGS>().read_unaligned() };
            let given = [
                a.CreateMutex.is_some(),
                a.DestroyMutex.is_some(),
                a.LockMutex.is_some(),
                a.UnlockMutex.is_some(),
            ];
            if given.iter().any(|g| *g) && !given.iter().all(|g| *g) {
                return Err(bad("give all four mutex functions or none"));
            }
            // The module locks with the OS's primitives only.
            if given[0] && a.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(Error::call(CKR_CANT_LOCK, "only the OS's locking is supported"));
            }
        }
        token::initialize()?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_Finalize(reserved: *mut c_void) -> CK_RV {
    guard("C_Finalize", || {
        if !reserved.is_null() {
            return Err(bad("pReserved must be null"));
        }
        token::finalize()?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    guard("C_GetInfo", || {
        token::token()?;
        let value = CK_INFO {
            cryptokiVersion: CRYPTOKI_3_0,
            manufacturerID: padded(MANUFACTURER),
            flags: 0,
            libraryDescription: padded("hsmd PKCS#11 module"),
            libraryVersion: library_version(),
        };
        // SAFETY: the caller passes a writable CK_INFO.
        unsafe { put(info, value) }?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(out: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard("C_GetFunctionList", || {
        // SAFETY: the caller passes a writable pointer; the list is static
        // and never written through it.
        unsafe { put(out, ptr::addr_of!(FUNCTIONS_2_40).cast_mut()) }?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterfaceList(out: *mut CK_INTERFACE, count: *mut CK_ULONG) -> CK_RV {
    guard("C_GetInterfaceList", || {
        // SAFETY: the caller's buffer and count, as PKCS#11 lays them out.
        unsafe { list(&INTERFACES.0, out, count) }
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterface(
    name: *mut CK_UTF8CHAR,
    version: *mut CK_VERSION,
    out: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    guard("C_GetInterface", || {
        if !name.is_null() {
            // SAFETY: a non-null name is a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(name.cast()) };
            if name.to_bytes() != b"PKCS 11" {
                return Err(bad("the only interface is \"PKCS 11\""));
            }
        }
        // Neither interface is fork-safe: a forked child must C_Initialize.
        if flags != 0 {
            return Err(bad("no interface has those flags"));
        }
        let wanted = if version.is_null() {
            CRYPTOKI_3_0
        } else {
            // SAFETY: a non-null version is a readable CK_VERSION.
            unsafe { version.read_unaligned() }
        };
        let interface = match (wanted.major, wanted.minor) {
            (3, 0) => &INTERFACES.0[0],
            (2, 40) => &INTERFACES.0[1],
            _ => return Err(bad("the interfaces are versions 3.0 and 2.40")),
        };
        // SAFETY: the caller passes a writable pointer; the interface is static.
        unsafe { put(out, ptr::from_ref(interface).cast_mut()) }?;
        Ok(CKR_OK)
    })
}

// ---------------------------------------------------------------- slots and tokens

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetSlotList(present: CK_BBOOL, out: *mut CK_SLOT_ID, count: *mut CK_ULONG) -> CK_RV {
    guard("C_GetSlotList", || {
        let token = token::token()?;
        let slots: &[CK_SLOT_ID] = if present != CK_FALSE && !token.present() {
            &[]
        } else {
            &[SLOT]
        };
        // SAFETY: the caller's buffer and count.
        unsafe { list(slots, out, count) }
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    guard("C_GetSlotInfo", || {
        let token = token::token()?;
        check_slot(slot)?;
        let value = CK_SLOT_INFO {
            slotDescription: padded(&format!("hsmd at {}", token.socket().display())),
            manufacturerID: padded(MANUFACTURER),
            flags: if token.present() { CKF_TOKEN_PRESENT } else { 0 },
            hardwareVersion: library_version(),
            firmwareVersion: library_version(),
        };
        // SAFETY: the caller passes a writable CK_SLOT_INFO.
        unsafe { put(info, value) }?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    guard("C_GetTokenInfo", || {
        let token = token::token()?;
        check_slot(slot)?;
        let facts = token.facts()?;
        let mut flags = CKF_USER_PIN_INITIALIZED;
        if facts.initialized {
            flags |= CKF_TOKEN_INITIALIZED;
        }
        let version = CK_VERSION {
            major: facts.version.0,
            minor: facts.version.1,
        };
        let value = CK_TOKEN_INFO {
            label: padded("hsmd"),
            manufacturerID: padded(MANUFACTURER),
            model: padded("hsmd"),
            serialNumber: padded(&facts.serial),
            flags,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: CK_UNAVAILABLE_INFORMATION,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: CK_UNAVAILABLE_INFORMATION,
            ulMaxPinLen: 255,
            ulMinPinLen: 0,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: version,
            firmwareVersion: version,
            utcTime: [b' '; 16],
        };
        // SAFETY: the caller passes a writable CK_TOKEN_INFO.
        unsafe { put(info, value) }?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    out: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetMechanismList", || {
        token::token()?;
        check_slot(slot)?;
        let kinds: Vec<CK_MECHANISM_TYPE> = MECHANISMS.iter().map(|m| m.0).collect();
        // SAFETY: the caller's buffer and count.
        unsafe { list(&kinds, out, count) }
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    kind: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard("C_GetMechanismInfo", || {
        token::token()?;
        check_slot(slot)?;
        let (_, min, max, flags) = MECHANISMS
            .iter()
            .find(|m| m.0 == kind)
            .ok_or_else(|| Error::call(CKR_MECHANISM_INVALID, format!("mechanism {kind:#x} is not offered")))?;
        let value = CK_MECHANISM_INFO {
            ulMinKeySize: *min,
            ulMaxKeySize: *max,
            flags: *flags,
        };
        // SAFETY: the caller passes a writable CK_MECHANISM_INFO.
        unsafe { put(info, value) }?;
        Ok(CKR_OK)
    })
}

// ---------------------------------------------------------------- sessions

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _application: *mut c_void,
    _notify: CK_NOTIFY,
    out: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard("C_OpenSession", || {
        let token = token::token()?;
        check_slot(slot)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(Error::call(
                CKR_SESSION_PARALLEL_NOT_SUPPORTED,
                "CKF_SERIAL_SESSION must be set",
            ));
        }
        if out.is_null() {
            return Err(bad("a null session handle pointer"));
        }
        let handle = token.open_session(flags & CKF_RW_SESSION != 0);
        // SAFETY: non-null and writable, as the caller promises.
        unsafe { put(out, handle) }?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_CloseSession", || {
        token::token()?.close_session(session)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    guard("C_CloseAllSessions", || {
        let token = token::token()?;
        check_slot(slot)?;
        token.close_all();
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetSessionInfo(session: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO) -> CK_RV {
    guard("C_GetSessionInfo", || {
        let (state, read_write) = token::token()?.session_info(session)?;
        let value = CK_SESSION_INFO {
            slotID: SLOT,
            state,
            flags: CKF_SERIAL_SESSION | if read_write { CKF_RW_SESSION } else { 0 },
            ulDeviceError: 0,
        };
        // SAFETY: the caller passes a writable CK_SESSION_INFO.
        unsafe { put(info, value) }?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies. The PIN is not read: see [`token::Token::login`].
#[no_mangle]
pub unsafe extern "C" fn C_Login(
    session: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    _pin: *mut CK_UTF8CHAR,
    _pin_len: CK_ULONG,
) -> CK_RV {
    guard("C_Login", || {
        token::token()?.login(session, user)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_Logout(session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_Logout", || {
        token::token()?.logout(session)?;
        Ok(CKR_OK)
    })
}

// ---------------------------------------------------------------- objects

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_FindObjectsInit(
    session: CK_SESSION_HANDLE,
    attrs: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard("C_FindObjectsInit", || {
        let token = token::token()?;
        // SAFETY: the caller's template.
        let template = unsafe { template(attrs, count) }?;
        token.find_init(session, &template)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    out: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_FindObjects", || {
        let token = token::token()?;
        if out.is_null() || count.is_null() {
            return Err(bad("null output pointers"));
        }
        let found = token.find(session, max as usize)?;
        // SAFETY: `out` has room for `max >= found.len()` handles.
        unsafe { ptr::copy_nonoverlapping(found.as_ptr(), out, found.len()) };
        // SAFETY: non-null and writable.
        unsafe { put(count, found.len() as CK_ULONG) }?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_FindObjectsFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_FindObjectsFinal", || {
        token::token()?.find_final(session)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GetAttributeValue(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    attrs: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard("C_GetAttributeValue", || {
        let object = token::token()?.object(session, object)?;
        if attrs.is_null() && count > 0 {
            return Err(bad("a null template with a non-zero count"));
        }
        if count == 0 {
            return Ok(CKR_OK);
        }
        // SAFETY: the caller's template of `count` attributes, writable.
        let attrs = unsafe { std::slice::from_raw_parts_mut(attrs, count as usize) };
        let mut rv = CKR_OK;
        for a in attrs {
            match object.attr(a.type_) {
                None => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = CKR_ATTRIBUTE_TYPE_INVALID;
                }
                Some(Attr::Sensitive) => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = CKR_ATTRIBUTE_SENSITIVE;
                }
                // SAFETY: the caller's buffer of `ulValueLen` bytes.
                Some(Attr::Value(v)) => match unsafe { bytes_mut(a.pValue.cast(), a.ulValueLen) } {
                    None => a.ulValueLen = v.len() as CK_ULONG,
                    Some(buf) if buf.len() < v.len() => {
                        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        rv = CKR_BUFFER_TOO_SMALL;
                    }
                    Some(buf) => {
                        buf[..v.len()].copy_from_slice(v);
                        a.ulValueLen = v.len() as CK_ULONG;
                    }
                },
            }
        }
        Ok(rv)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    guard("C_DestroyObject", || {
        token::token()?.destroy(session, object)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GenerateKeyPair(
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    public_attrs: *mut CK_ATTRIBUTE,
    public_count: CK_ULONG,
    private_attrs: *mut CK_ATTRIBUTE,
    private_count: CK_ULONG,
    public_out: *mut CK_OBJECT_HANDLE,
    private_out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_GenerateKeyPair", || {
        let token = token::token()?;
        // SAFETY: the caller's mechanism and templates.
        let (mech, public, private) = unsafe {
            (
                mechanism(mech)?,
                template(public_attrs, public_count)?,
                template(private_attrs, private_count)?,
            )
        };
        if public_out.is_null() || private_out.is_null() {
            return Err(bad("null output pointers"));
        }
        let (public, private) = token.generate_key_pair(session, mech.kind, &public, &private)?;
        // SAFETY: both non-null and writable.
        unsafe {
            put(public_out, public)?;
            put(private_out, private)?;
        }
        Ok(CKR_OK)
    })
}

// ---------------------------------------------------------------- signing

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_SignInit(
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_SignInit", || {
        let token = token::token()?;
        // SAFETY: the caller's mechanism.
        let mech = unsafe { mechanism(mech) }?;
        token.signature_init(session, Purpose::Sign, &mech, key)?;
        Ok(CKR_OK)
    })
}

/// A call that writes output by PKCS#11's convention (`C_Sign`,
/// `C_Decrypt`, …): `produce` gets the caller's buffer (`None` for a length
/// query) and answers the length, or an error with the length needed.
///
/// # Safety
/// `out_len` is null or writable; `out` is null or valid for `*out_len` bytes.
unsafe fn output_into(
    name: &str,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
    produce: impl FnOnce(&token::Token, Option<&mut [u8]>) -> std::result::Result<usize, (Error, usize)>,
) -> CK_RV {
    guard(name, || {
        let token = token::token()?;
        if out_len.is_null() {
            return Err(bad("a null output length pointer"));
        }
        // SAFETY: non-null and readable.
        let room = unsafe { *out_len };
        // SAFETY: the caller's buffer of `room` bytes.
        let buf = unsafe { bytes_mut(out, room) };
        match produce(&token, buf) {
            Ok(len) => {
                // SAFETY: non-null and writable.
                unsafe { put(out_len, len as CK_ULONG) }?;
                Ok(CKR_OK)
            }
            Err((e, len)) => {
                if e.rv() == CKR_BUFFER_TOO_SMALL {
                    // SAFETY: as above.
                    unsafe { put(out_len, len as CK_ULONG) }?;
                }
                Err(e)
            }
        }
    })
}

/// A single-part call (`C_Sign`, `C_Decrypt`): its input read, then as
/// [`output_into`].
///
/// # Safety
/// `data` is null or valid for its length; as [`output_into`] for the rest.
unsafe fn one_part(
    name: &str,
    data: (*mut CK_BYTE, CK_ULONG),
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
    produce: impl FnOnce(&token::Token, &[u8], Option<&mut [u8]>) -> std::result::Result<usize, (Error, usize)>,
) -> CK_RV {
    // SAFETY: the caller's input of the length given.
    let data = match unsafe { bytes(data.0, data.1) } {
        Ok(d) => d,
        Err(e) => {
            crate::log(&format!("{name}: {e}"));
            return e.rv();
        }
    };
    // SAFETY: the caller's output buffer and length.
    unsafe { output_into(name, out, out_len, |t, buf| produce(t, data, buf)) }
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_Sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's data, signature buffer and lengths, as PKCS#11 lays them out.
    unsafe {
        one_part("C_Sign", (data, data_len), out, out_len, |t, data, buf| {
            t.sign(session, Some(data), buf)
        })
    }
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_SignUpdate(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG) -> CK_RV {
    guard("C_SignUpdate", || {
        let token = token::token()?;
        // SAFETY: the caller's data of `data_len` bytes.
        let data = unsafe { bytes(data, data_len) }?;
        token.signature_update(session, Purpose::Sign, data)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_SignFinal(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG) -> CK_RV {
    // SAFETY: the caller's signature buffer and length.
    unsafe { output_into("C_SignFinal", out, out_len, |t, buf| t.sign(session, None, buf)) }
}

// ---------------------------------------------------------------- verifying

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyInit(
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_VerifyInit", || {
        let token = token::token()?;
        // SAFETY: the caller's mechanism.
        let mech = unsafe { mechanism(mech) }?;
        token.signature_init(session, Purpose::Verify, &mech, key)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_Verify(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    signature: *mut CK_BYTE,
    signature_len: CK_ULONG,
) -> CK_RV {
    guard("C_Verify", || {
        let token = token::token()?;
        // SAFETY: the caller's data and signature of the lengths given.
        let (data, signature) = unsafe { (bytes(data, data_len)?, bytes(signature, signature_len)?) };
        token.verify(session, Some(data), signature)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyUpdate(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG) -> CK_RV {
    guard("C_VerifyUpdate", || {
        let token = token::token()?;
        // SAFETY: the caller's data of `data_len` bytes.
        let data = unsafe { bytes(data, data_len) }?;
        token.signature_update(session, Purpose::Verify, data)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_VerifyFinal(
    session: CK_SESSION_HANDLE,
    signature: *mut CK_BYTE,
    signature_len: CK_ULONG,
) -> CK_RV {
    guard("C_VerifyFinal", || {
        let token = token::token()?;
        // SAFETY: the caller's signature of `signature_len` bytes.
        let signature = unsafe { bytes(signature, signature_len) }?;
        token.verify(session, None, signature)?;
        Ok(CKR_OK)
    })
}

// ---------------------------------------------------------------- AES-GCM

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_EncryptInit(
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_EncryptInit", || {
        let token = token::token()?;
        // SAFETY: the caller's mechanism.
        let mech = unsafe { mechanism(mech) }?;
        token.encrypt_init(session, &mech, key)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptInit(
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_DecryptInit", || {
        let token = token::token()?;
        // SAFETY: the caller's mechanism.
        let mech = unsafe { mechanism(mech) }?;
        token.decrypt_init(session, &mech, key)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_Decrypt(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's ciphertext, plaintext buffer and lengths.
    unsafe {
        one_part("C_Decrypt", (data, data_len), out, out_len, |t, data, buf| {
            t.decrypt(session, Some(data), buf)
        })
    }
}

/// Collects the part; the plaintext comes out whole from `C_DecryptFinal`,
/// once the tag has checked out, so no part is ever output here.
///
/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptUpdate(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard("C_DecryptUpdate", || {
        let token = token::token()?;
        // SAFETY: the caller's ciphertext of `data_len` bytes.
        let data = unsafe { bytes(data, data_len) }?;
        // A null buffer asks only how much would come out: nothing is taken.
        if !out.is_null() {
            token.decrypt_update(session, data)?;
        }
        // SAFETY: the caller's length pointer.
        unsafe { put(out_len, 0) }?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptFinal(
    session: CK_SESSION_HANDLE,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's plaintext buffer and length.
    unsafe { output_into("C_DecryptFinal", out, out_len, |t, buf| t.decrypt(session, None, buf)) }
}

/// A message's `CK_GCM_MESSAGE_PARAMS`, its lengths checked, with its IV
/// and tag pointers.
///
/// # Safety
/// `param` is null or valid for `len` bytes.
unsafe fn message_params(
    param: *mut c_void,
    len: CK_ULONG,
    direction: Direction,
) -> Result<(*mut CK_BYTE, *mut CK_BYTE)> {
    if param.is_null() || len as usize != std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() {
        return Err(cipher::refuse_message_params());
    }
    // SAFETY: non-null and of the struct's size; read unaligned.
    let p = unsafe { param.cast::<CK_GCM_MESSAGE_PARAMS>().read_unaligned() };
    cipher::check_message(
        &MessageParams {
            iv_len: p.ulIvLen,
            iv_fixed_bits: p.ulIvFixedBits,
            generator: p.ivGenerator,
            tag_bits: p.ulTagBits,
        },
        direction,
    )?;
    if p.pIv.is_null() || p.pTag.is_null() {
        return Err(cipher::refuse_message_params());
    }
    Ok((p.pIv, p.pTag))
}

/// `C_MessageEncryptInit` and `C_MessageDecryptInit`.
///
/// # Safety
/// `mech` is null or valid.
unsafe fn message_init(
    name: &str,
    direction: Direction,
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(name, || {
        let token = token::token()?;
        // SAFETY: the caller's mechanism.
        let mech = unsafe { message_mechanism(mech) }?;
        token.message_init(session, direction, &mech, key)?;
        Ok(CKR_OK)
    })
}

/// `C_EncryptMessage` and `C_DecryptMessage`: the output is as long as the
/// input (the tag travels in the parameter). To encrypt, hsmd seals with an
/// IV it draws, and the IV and tag are written to the parameter's `pIv` and
/// `pTag`; to decrypt, they are read from there.
///
/// # Safety
/// As PKCS#11 specifies for those two functions.
#[allow(clippy::too_many_arguments)]
unsafe fn crypt_message(
    name: &str,
    direction: Direction,
    session: CK_SESSION_HANDLE,
    param: *mut c_void,
    param_len: CK_ULONG,
    aad: (*mut CK_BYTE, CK_ULONG),
    data: (*mut CK_BYTE, CK_ULONG),
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's associated data and input of the lengths given.
    let inputs = unsafe { bytes(aad.0, aad.1).and_then(|a| Ok((a, bytes(data.0, data.1)?))) };
    let (aad, data) = match inputs {
        Ok(i) => i,
        Err(e) => return e.rv(),
    };
    let len = data.len();
    // SAFETY: the caller's output buffer and length.
    unsafe {
        output_into(name, out, out_len, |t, buf| {
            let Some(buf) = buf else { return Ok(len) };
            if buf.len() < len {
                return Err((
                    Error::call(CKR_BUFFER_TOO_SMALL, format!("the output takes {len} bytes")),
                    len,
                ));
            }
            let fail = |e| (e, len);
            // SAFETY: the caller's parameter of `param_len` bytes.
            let (iv_ptr, tag_ptr) = message_params(param, param_len, direction).map_err(fail)?;
            match direction {
                Direction::Encrypt => {
                    let sealed = t.encrypt_message(session, aad, data).map_err(fail)?;
                    let (iv, ciphertext, tag) = cipher::split_sealed(&sealed).map_err(fail)?;
                    // SAFETY: the parameter's IV and tag buffers, whose
                    // lengths (12 and 16 bytes) `message_params` checked.
                    ptr::copy_nonoverlapping(iv.as_ptr(), iv_ptr, IV_LEN);
                    // SAFETY: as above.
                    ptr::copy_nonoverlapping(tag.as_ptr(), tag_ptr, TAG_LEN);
                    buf[..len].copy_from_slice(ciphertext);
                }
                Direction::Decrypt => {
                    // SAFETY: the parameter's IV and tag, 12 and 16 bytes as checked.
                    let iv = bytes(iv_ptr, IV_LEN as CK_ULONG).map_err(fail)?;
                    // SAFETY: as above.
                    let tag = bytes(tag_ptr, TAG_LEN as CK_ULONG).map_err(fail)?;
                    let plaintext = t.decrypt_message(session, iv, tag, aad, data).map_err(fail)?;
                    buf[..len].copy_from_slice(plaintext.expose());
                }
            }
            Ok(len)
        })
    }
}

/// `C_MessageEncryptFinal` and `C_MessageDecryptFinal`.
fn message_final(name: &str, direction: Direction, session: CK_SESSION_HANDLE) -> CK_RV {
    guard(name, || {
        token::token()?.message_final(session, direction)?;
        Ok(CKR_OK)
    })
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_MessageEncryptInit(
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism.
    unsafe { message_init("C_MessageEncryptInit", Direction::Encrypt, session, mech, key) }
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_EncryptMessage(
    session: CK_SESSION_HANDLE,
    param: *mut c_void,
    param_len: CK_ULONG,
    aad: *mut CK_BYTE,
    aad_len: CK_ULONG,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's arguments, as PKCS#11 lays them out.
    unsafe {
        crypt_message(
            "C_EncryptMessage",
            Direction::Encrypt,
            session,
            param,
            param_len,
            (aad, aad_len),
            (data, data_len),
            out,
            out_len,
        )
    }
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_MessageEncryptFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    message_final("C_MessageEncryptFinal", Direction::Encrypt, session)
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_MessageDecryptInit(
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism.
    unsafe { message_init("C_MessageDecryptInit", Direction::Decrypt, session, mech, key) }
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_DecryptMessage(
    session: CK_SESSION_HANDLE,
    param: *mut c_void,
    param_len: CK_ULONG,
    aad: *mut CK_BYTE,
    aad_len: CK_ULONG,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's arguments, as PKCS#11 lays them out.
    unsafe {
        crypt_message(
            "C_DecryptMessage",
            Direction::Decrypt,
            session,
            param,
            param_len,
            (aad, aad_len),
            (data, data_len),
            out,
            out_len,
        )
    }
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_MessageDecryptFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    message_final("C_MessageDecryptFinal", Direction::Decrypt, session)
}

/// # Safety
/// As PKCS#11 specifies.
#[no_mangle]
pub unsafe extern "C" fn C_GenerateKey(
    session: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    attrs: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key_out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_GenerateKey", || {
        let token = token::token()?;
        // SAFETY: the caller's mechanism and template.
        let (mech, template) = unsafe { (mechanism(mech)?, template(attrs, count)?) };
        if key_out.is_null() {
            return Err(bad("a null output pointer"));
        }
        let key = token.generate_key(session, mech.kind, &template)?;
        // SAFETY: non-null and writable.
        unsafe { put(key_out, key) }?;
        Ok(CKR_OK)
    })
}

// ---------------------------------------------------------------- not offered

/// Functions hsmd does not offer through PKCS#11: each answers
/// `CKR_FUNCTION_NOT_SUPPORTED` (a valid answer from any PKCS#11 function),
/// so a program that calls one gets an error, never a null pointer.
macro_rules! not_supported {
    ($($name:ident($($ty:ty),*);)*) => {
        $(
            /// Not offered: `CKR_FUNCTION_NOT_SUPPORTED`.
            ///
            /// # Safety
            /// Reads no argument.
            #[no_mangle]
            pub unsafe extern "C" fn $name($(_: $ty),*) -> CK_RV {
                CKR_FUNCTION_NOT_SUPPORTED
            }
        )*
    };
}

type H = CK_SESSION_HANDLE;
type B = *mut CK_BYTE;
type L = CK_ULONG;
type M = *mut CK_MECHANISM;
type O = CK_OBJECT_HANDLE;
type T = *mut CK_ATTRIBUTE;
type P = *mut c_void;

not_supported! {
    C_InitToken(CK_SLOT_ID, B, L, B);
    C_InitPIN(H, B, L);
    C_SetPIN(H, B, L, B, L);
    C_GetOperationState(H, B, *mut L);
    C_SetOperationState(H, B, L, O, O);
    C_CreateObject(H, T, L, *mut O);
    C_CopyObject(H, O, T, L, *mut O);
    C_GetObjectSize(H, O, *mut L);
    C_SetAttributeValue(H, O, T, L);
    C_Encrypt(H, B, L, B, *mut L);
    C_EncryptUpdate(H, B, L, B, *mut L);
    C_EncryptFinal(H, B, *mut L);
    C_DigestInit(H, M);
    C_Digest(H, B, L, B, *mut L);
    C_DigestUpdate(H, B, L);
    C_DigestKey(H, O);
    C_DigestFinal(H, B, *mut L);
    C_SignRecoverInit(H, M, O);
    C_SignRecover(H, B, L, B, *mut L);
    C_VerifyRecoverInit(H, M, O);
    C_VerifyRecover(H, B, L, B, *mut L);
    C_DigestEncryptUpdate(H, B, L, B, *mut L);
    C_DecryptDigestUpdate(H, B, L, B, *mut L);
    C_SignEncryptUpdate(H, B, L, B, *mut L);
    C_DecryptVerifyUpdate(H, B, L, B, *mut L);
    C_WrapKey(H, M, O, O, B, *mut L);
    C_UnwrapKey(H, M, O, B, L, T, L, *mut O);
    C_DeriveKey(H, M, O, T, L, *mut O);
    C_SeedRandom(H, B, L);
    C_GenerateRandom(H, B, L);
    C_WaitForSlotEvent(CK_FLAGS, *mut CK_SLOT_ID, P);
    C_LoginUser(H, CK_USER_TYPE, B, L, B, L);
    C_SessionCancel(H, CK_FLAGS);
    C_EncryptMessageBegin(H, P, L, B, L);
    C_EncryptMessageNext(H, P, L, B, L, B, *mut L, CK_FLAGS);
    C_DecryptMessageBegin(H, P, L, B, L);
    C_DecryptMessageNext(H, P, L, B, L, B, *mut L, CK_FLAGS);
    C_MessageSignInit(H, M, O);
    C_SignMessage(H, P, L, B, L, B, *mut L);
    C_SignMessageBegin(H, P, L);
    C_SignMessageNext(H, P, L, B, L, B, *mut L);
    C_MessageSignFinal(H);
    C_MessageVerifyInit(H, M, O);
    C_VerifyMessage(H, P, L, B, L, B, L);
    C_VerifyMessageBegin(H, P, L);
    C_VerifyMessageNext(H, P, L, B, L, B, L);
    C_MessageVerifyFinal(H);
}

/// Legacy parallel-function calls: PKCS#11 says a module without parallel
/// functions answers `CKR_FUNCTION_NOT_PARALLEL`.
///
/// # Safety
/// Reads no argument.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionStatus(_: H) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

/// As [`C_GetFunctionStatus`].
///
/// # Safety
/// Reads no argument.
#[no_mangle]
pub unsafe extern "C" fn C_CancelFunction(_: H) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

// ---------------------------------------------------------------- function lists

macro_rules! function_list {
    ($ty:ident, $version:expr, { $($extra:ident),* }) => {
        $ty {
            version: $version,
            C_Initialize: Some(C_Initialize),
            C_Finalize: Some(C_Finalize),
            C_GetInfo: Some(C_GetInfo),
            C_GetFunctionList: Some(C_GetFunctionList),
            C_GetSlotList: Some(C_GetSlotList),
            C_GetSlotInfo: Some(C_GetSlotInfo),
            C_GetTokenInfo: Some(C_GetTokenInfo),
            C_GetMechanismList: Some(C_GetMechanismList),
            C_GetMechanismInfo: Some(C_GetMechanismInfo),
            C_InitToken: Some(C_InitToken),
            C_InitPIN: Some(C_InitPIN),
            C_SetPIN: Some(C_SetPIN),
            C_OpenSession: Some(C_OpenSession),
            C_CloseSession: Some(C_CloseSession),
            C_CloseAllSessions: Some(C_CloseAllSessions),
            C_GetSessionInfo: Some(C_GetSessionInfo),
            C_GetOperationState: Some(C_GetOperationState),
            C_SetOperationState: Some(C_SetOperationState),
            C_Login: Some(C_Login),
            C_Logout: Some(C_Logout),
            C_CreateObject: Some(C_CreateObject),
            C_CopyObject: Some(C_CopyObject),
            C_DestroyObject: Some(C_DestroyObject),
            C_GetObjectSize: Some(C_GetObjectSize),
            C_GetAttributeValue: Some(C_GetAttributeValue),
            C_SetAttributeValue: Some(C_SetAttributeValue),
            C_FindObjectsInit: Some(C_FindObjectsInit),
            C_FindObjects: Some(C_FindObjects),
            C_FindObjectsFinal: Some(C_FindObjectsFinal),
            C_EncryptInit: Some(C_EncryptInit),
            C_Encrypt: Some(C_Encrypt),
            C_EncryptUpdate: Some(C_EncryptUpdate),
            C_EncryptFinal: Some(C_EncryptFinal),
            C_DecryptInit: Some(C_DecryptInit),
            C_Decrypt: Some(C_Decrypt),
            C_DecryptUpdate: Some(C_DecryptUpdate),
            C_DecryptFinal: Some(C_DecryptFinal),
            C_DigestInit: Some(C_DigestInit),
            C_Digest: Some(C_Digest),
            C_DigestUpdate: Some(C_DigestUpdate),
            C_DigestKey: Some(C_DigestKey),
            C_DigestFinal: Some(C_DigestFinal),
            C_SignInit: Some(C_SignInit),
            C_Sign: Some(C_Sign),
            C_SignUpdate: Some(C_SignUpdate),
            C_SignFinal: Some(C_SignFinal),
            C_SignRecoverInit: Some(C_SignRecoverInit),
            C_SignRecover: Some(C_SignRecover),
            C_VerifyInit: Some(C_VerifyInit),
            C_Verify: Some(C_Verify),
            C_VerifyUpdate: Some(C_VerifyUpdate),
            C_VerifyFinal: Some(C_VerifyFinal),
            C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
            C_VerifyRecover: Some(C_VerifyRecover),
            C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
            C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
            C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
            C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
            C_GenerateKey: Some(C_GenerateKey),
            C_GenerateKeyPair: Some(C_GenerateKeyPair),
            C_WrapKey: Some(C_WrapKey),
            C_UnwrapKey: Some(C_UnwrapKey),
            C_DeriveKey: Some(C_DeriveKey),
            C_SeedRandom: Some(C_SeedRandom),
            C_GenerateRandom: Some(C_GenerateRandom),
            C_GetFunctionStatus: Some(C_GetFunctionStatus),
            C_CancelFunction: Some(C_CancelFunction),
            C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
            $($extra: Some($extra),)*
        }
    };
}

static FUNCTIONS_2_40: CK_FUNCTION_LIST = function_list!(CK_FUNCTION_LIST, CRYPTOKI_2_40, {});

static FUNCTIONS_3_0: CK_FUNCTION_LIST_3_0 = function_list!(CK_FUNCTION_LIST_3_0, CRYPTOKI_3_0, {
    C_GetInterfaceList, C_GetInterface, C_LoginUser, C_SessionCancel,
    C_MessageEncryptInit, C_EncryptMessage, C_EncryptMessageBegin, C_EncryptMessageNext, C_MessageEncryptFinal,
    C_MessageDecryptInit, C_DecryptMessage, C_DecryptMessageBegin, C_DecryptMessageNext, C_MessageDecryptFinal,
    C_MessageSignInit, C_SignMessage, C_SignMessageBegin, C_SignMessageNext, C_MessageSignFinal,
    C_MessageVerifyInit, C_VerifyMessage, C_VerifyMessageBegin, C_VerifyMessageNext, C_MessageVerifyFinal
});

/// The interfaces `C_GetInterfaceList` and `C_GetInterface` hand out.
struct Interfaces([CK_INTERFACE; 2]);

// SAFETY: the raw pointers inside point at 'static, never-written data (the
// function lists and a string literal); sharing them between threads is as
// safe as sharing those.
unsafe impl Sync for Interfaces {}

static INTERFACES: Interfaces = Interfaces([
    CK_INTERFACE {
        pInterfaceName: c"PKCS 11".as_ptr().cast_mut().cast(),
        pFunctionList: ptr::addr_of!(FUNCTIONS_3_0).cast_mut().cast(),
        flags: 0,
    },
    CK_INTERFACE {
        pInterfaceName: c"PKCS 11".as_ptr().cast_mut().cast(),
        pFunctionList: ptr::addr_of!(FUNCTIONS_2_40).cast_mut().cast(),
        flags: 0,
    },
]);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The C interface's handling of what a careless or hostile caller
    //! passes: null pointers, short buffers, handles never given out, calls
    //! out of order. No hsmd runs: the socket points nowhere. One test, since
    //! the module is initialized once per process.
    use super::*;

    #[test]
    fn bad_arguments_get_the_specifications_return_values_not_a_crash() {
        std::env::set_var("HSMD_SOCKET", "/nonexistent/hsmd-pkcs11-unit-test.sock");
        // SAFETY: every pointer below is null or points at a live local of
        // the type the function writes.
        unsafe {
            let mut info = std::mem::zeroed::<CK_INFO>();
            assert_eq!(C_GetInfo(&mut info), CKR_CRYPTOKI_NOT_INITIALIZED);
            let mut args = std::mem::zeroed::<CK_C_INITIALIZE_ARGS>();
            args.LockMutex = Some(fake_mutex);
            assert_eq!(C_Initialize(ptr::addr_of_mut!(args).cast()), CKR_ARGUMENTS_BAD);
            assert_eq!(C_Initialize(ptr::null_mut()), CKR_OK);
            assert_eq!(C_Initialize(ptr::null_mut()), CKR_CRYPTOKI_ALREADY_INITIALIZED);
            assert_eq!(C_GetInfo(&mut info), CKR_OK);
            assert_eq!((info.cryptokiVersion.major, info.cryptokiVersion.minor), (3, 0));
            assert_eq!(&info.manufacturerID[..5], b"hsmd ");

            // Function lists and interfaces.
            assert_eq!(C_GetFunctionList(ptr::null_mut()), CKR_ARGUMENTS_BAD);
            let mut list = ptr::null_mut();
            assert_eq!(C_GetFunctionList(&mut list), CKR_OK);
            assert_eq!((*list).version.minor, 40);
            let mut count: CK_ULONG = 0;
            assert_eq!(C_GetInterfaceList(ptr::null_mut(), &mut count), CKR_OK);
            assert_eq!(count, 2);
            let mut one = [std::mem::zeroed::<CK_INTERFACE>(); 1];
            count = 1;
            assert_eq!(C_GetInterfaceList(one.as_mut_ptr(), &mut count), CKR_BUFFER_TOO_SMALL);
            assert_eq!(count, 2);
            let mut interface = ptr::null_mut();
            assert_eq!(
                C_GetInterface(ptr::null_mut(), ptr::null_mut(), &mut interface, 0),
                CKR_OK
            );
            let three = (*interface).pFunctionList.cast::<CK_FUNCTION_LIST_3_0>();
            assert_eq!((*three).version.major, 3);
            assert!((*three).C_GetInterface.is_some() && (*three).C_Sign.is_some());
            let mut name = *b"PKCS 12\0";
            assert_eq!(
                C_GetInterface(name.as_mut_ptr(), ptr::null_mut(), &mut interface, 0),
                CKR_ARGUMENTS_BAD
            );
            let mut old = CRYPTOKI_2_40;
            assert_eq!(C_GetInterface(ptr::null_mut(), &mut old, &mut interface, 0), CKR_OK);
            assert_eq!(
                (*(*interface).pFunctionList.cast::<CK_FUNCTION_LIST>()).version.minor,
                40
            );

            // The slot, with hsmd unreachable.
            assert_eq!(
                C_GetSlotList(CK_FALSE, ptr::null_mut(), ptr::null_mut()),
                CKR_ARGUMENTS_BAD
            );
            count = 0;
            assert_eq!(C_GetSlotList(CK_FALSE, ptr::null_mut(), &mut count), CKR_OK);
            assert_eq!(count, 1);
            let mut slots = [0; 1];
            count = 0;
            assert_eq!(
                C_GetSlotList(CK_FALSE, slots.as_mut_ptr(), &mut count),
                CKR_BUFFER_TOO_SMALL
            );
            assert_eq!(C_GetSlotList(CK_TRUE, ptr::null_mut(), &mut count), CKR_OK);
            assert_eq!(count, 0, "no token while hsmd cannot be reached");
            let mut slot_info = std::mem::zeroed::<CK_SLOT_INFO>();
            assert_eq!(C_GetSlotInfo(99, &mut slot_info), CKR_SLOT_ID_INVALID);
            assert_eq!(C_GetSlotInfo(SLOT, &mut slot_info), CKR_OK);
            assert_eq!(slot_info.flags & CKF_TOKEN_PRESENT, 0);
            let mut token_info = std::mem::zeroed::<CK_TOKEN_INFO>();
            assert_eq!(C_GetTokenInfo(SLOT, &mut token_info), CKR_TOKEN_NOT_PRESENT);
            let mut mech_info = std::mem::zeroed::<CK_MECHANISM_INFO>();
            assert_eq!(C_GetMechanismInfo(SLOT, CKM_MD5, &mut mech_info), CKR_MECHANISM_INVALID);
            assert_eq!(C_GetMechanismInfo(SLOT, CKM_EDDSA, &mut mech_info), CKR_OK);
            assert_eq!(mech_info.flags & CKF_SIGN, CKF_SIGN);

            // Sessions.
            let mut session = 0;
            assert_eq!(
                C_OpenSession(SLOT, 0, ptr::null_mut(), None, &mut session),
                CKR_SESSION_PARALLEL_NOT_SUPPORTED
            );
            assert_eq!(
                C_OpenSession(SLOT, CKF_SERIAL_SESSION, ptr::null_mut(), None, ptr::null_mut()),
                CKR_ARGUMENTS_BAD
            );
            assert_eq!(
                C_OpenSession(SLOT, CKF_SERIAL_SESSION, ptr::null_mut(), None, &mut session),
                CKR_OK
            );
            assert_eq!(C_Login(session, CKU_SO, ptr::null_mut(), 0), CKR_USER_TYPE_INVALID);
            assert_eq!(C_Login(session, CKU_USER, ptr::null_mut(), 0), CKR_OK);
            assert_eq!(
                C_Login(session, CKU_USER, ptr::null_mut(), 0),
                CKR_USER_ALREADY_LOGGED_IN
            );
            let mut session_info = std::mem::zeroed::<CK_SESSION_INFO>();
            assert_eq!(C_GetSessionInfo(session, &mut session_info), CKR_OK);
            assert_eq!(session_info.state, CKS_RO_USER_FUNCTIONS);
            assert_eq!(
                C_GetSessionInfo(session + 1000, &mut session_info),
                CKR_SESSION_HANDLE_INVALID
            );

            // Objects and signing, with hsmd gone and handles never given out.
            assert_eq!(C_FindObjectsInit(session, ptr::null_mut(), 1), CKR_ARGUMENTS_BAD);
            assert_eq!(C_FindObjectsInit(session, ptr::null_mut(), 0), CKR_DEVICE_REMOVED);
            let mut handles = [0; 4];
            assert_eq!(
                C_FindObjects(session, handles.as_mut_ptr(), 4, &mut count),
                CKR_OPERATION_NOT_INITIALIZED
            );
            let mut attr = CK_ATTRIBUTE {
                type_: CKA_LABEL,
                pValue: ptr::null_mut(),
                ulValueLen: 0,
            };
            assert_eq!(C_GetAttributeValue(session, 7, &mut attr, 1), CKR_OBJECT_HANDLE_INVALID);
            assert_eq!(C_SignInit(session, ptr::null_mut(), 7), CKR_ARGUMENTS_BAD);
            let mut mech = CK_MECHANISM {
                mechanism: CKM_ECDSA,
                pParameter: ptr::null_mut(),
                ulParameterLen: 0,
            };
            assert_eq!(C_SignInit(session, &mut mech, 7), CKR_KEY_HANDLE_INVALID);
            let mut sig = [0u8; 64];
            let mut sig_len: CK_ULONG = 64;
            let mut data = [0u8; 32];
            assert_eq!(
                C_Sign(session, data.as_mut_ptr(), 32, sig.as_mut_ptr(), &mut sig_len),
                CKR_OPERATION_NOT_INITIALIZED
            );
            assert_eq!(
                C_Sign(session, ptr::null_mut(), 32, sig.as_mut_ptr(), &mut sig_len),
                CKR_ARGUMENTS_BAD
            );
            assert_eq!(
                C_Sign(session, data.as_mut_ptr(), 32, sig.as_mut_ptr(), ptr::null_mut()),
                CKR_ARGUMENTS_BAD
            );
            assert_eq!(
                C_Encrypt(session, ptr::null_mut(), 0, ptr::null_mut(), ptr::null_mut()),
                CKR_FUNCTION_NOT_SUPPORTED
            );

            assert_eq!(C_Logout(session), CKR_OK);
            assert_eq!(C_Logout(session), CKR_USER_NOT_LOGGED_IN);
            assert_eq!(C_CloseSession(session), CKR_OK);
            assert_eq!(C_CloseSession(session), CKR_SESSION_HANDLE_INVALID);
            assert_eq!(
                C_Finalize(ptr::NonNull::<u8>::dangling().as_ptr().cast()),
                CKR_ARGUMENTS_BAD
            );
            assert_eq!(C_Finalize(ptr::null_mut()), CKR_OK);
            assert_eq!(C_Finalize(ptr::null_mut()), CKR_CRYPTOKI_NOT_INITIALIZED);
        }
    }

    unsafe extern "C" fn fake_mutex(_: *mut c_void) -> CK_RV {
        CKR_OK
    }
}
