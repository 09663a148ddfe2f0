//! The file formats hsmctl writes and reads, for any program: encrypted files
//! (`encrypt` / `decrypt`), signature files (`sign --format hsmd`) and MAC tag
//! files (`mac`). They live here, apart from the CLI, so a library user can
//! read and write what hsmctl does. The byte-level spec is `docs/formats.md`.

pub mod encrypted;
#[cfg(feature = "ssh")]
pub mod openssh;
pub mod signature;
#[cfg(feature = "ssh")]
pub mod sshsig;
pub mod tag;

/// What is wrong with a file read as one of these formats.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// It does not begin as the format does.
    #[error("it is not {0}")]
    NotThisFormat(&'static str),
    /// It ends early.
    #[error("it is truncated: {0}")]
    Truncated(String),
    /// A field holds a value the format does not allow.
    #[error("{0}")]
    Invalid(String),
    /// Reading it failed.
    #[error("cannot read it: {0}")]
    Io(#[source] std::io::Error),
}
