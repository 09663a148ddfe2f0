//! `libhsmd_pkcs11.so`: a PKCS#11 3.0 module that offers hsmd's keys to
//! programs that take keys from a PKCS#11 module (OpenSSL's engine and
//! provider, GnuTLS, p11-kit, `pkcs11-tool`, `ssh-keygen -D`, NSS).
//!
//! The module holds no key material. It is a client of hsmd's socket, like
//! `hsmctl`: each call that needs a key becomes one request made with the
//! calling process's own identity (its uid, which the kernel reports to hsmd),
//! so hsmd's policy, rate limits and audit log apply to a TLS server signing
//! through the module as to `hsmctl sign`.
//!
//! - One slot (id 1) holding one token: the hsmd at `$HSMD_SOCKET`, else the
//!   `socket` of `/etc/hsmd/pkcs11.toml` (or the file `$HSMD_PKCS11_CONFIG`
//!   names), else the caller's own `hsmd --user`
//!   (`$XDG_RUNTIME_DIR/hsmd/hsmd.sock`), else `/run/hsmd/hsmd.sock`.
//! - Objects: for each signing key the caller may list, a private-key object
//!   (`CKA_SENSITIVE`, never `CKA_EXTRACTABLE`) and a public-key object, both
//!   with `CKA_LABEL` = the key's name and `CKA_ID` = its id, which rotation
//!   keeps; for each AES key a secret-key object (see [`cipher`] for how
//!   AES-GCM goes through hsmd).
//! - No PIN: `C_Login` accepts any PIN and checks none, since hsmd knows the
//!   caller by uid; the token does not ask for a login.
//! - Errors are logged to standard error when `HSMD_PKCS11_DEBUG` is set.

pub mod cipher;
pub mod config;
pub mod error;
mod ffi;
pub mod mechanism;
pub mod objects;
mod pool;
pub mod token;

/// The module's entry point, as `dlsym` finds it; for Rust programs that
/// link this crate instead of loading the shared object (the fuzz target).
pub use ffi::C_GetInterface;

/// Writes a line to standard error when `HSMD_PKCS11_DEBUG` is set. A module
/// lives in someone else's process, so it is silent by default.
pub(crate) fn log(line: &str) {
    if std::env::var_os("HSMD_PKCS11_DEBUG").is_some_and(|v| !v.is_empty()) {
        eprintln!("hsmd-pkcs11: {line}");
    }
}
