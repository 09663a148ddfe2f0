//! Backups of hsmd's whole state: the archive container ([`archive`]).
pub mod archive;
