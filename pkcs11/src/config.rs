//! Which hsmd the module talks to: `$HSMD_SOCKET`; else the `socket` of the
//! module's configuration file (`$HSMD_PKCS11_CONFIG`, else
//! `/etc/hsmd/pkcs11.toml` when it exists); else the caller's own
//! `hsmd --user`, else `/run/hsmd/hsmd.sock`. The file is for programs
//! whose environment cannot be set, such as those p11-kit loads the module
//! into.

use std::path::{Path, PathBuf};

use cryptoki_sys::CKR_GENERAL_ERROR;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The configuration file read when `$HSMD_PKCS11_CONFIG` names none.
pub const DEFAULT_CONFIG: &str = "/etc/hsmd/pkcs11.toml";

/// The file's settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// hsmd's socket.
    socket: Option<PathBuf>,
}

/// The socket to use.
///
/// # Errors
/// `CKR_GENERAL_ERROR` when a configuration file that exists (or that
/// `$HSMD_PKCS11_CONFIG` names) cannot be read or is not valid: a module that
/// silently used another hsmd than the one configured would be worse.
pub fn socket() -> Result<PathBuf> {
    if let Some(socket) = std::env::var_os("HSMD_SOCKET").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(socket));
    }
    let named = std::env::var_os("HSMD_PKCS11_CONFIG").filter(|s| !s.is_empty());
    let path = named
        .as_ref()
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
    if named.is_none() && !path.exists() {
        return Ok(protocol::default_socket());
    }
    let config = read(&path)?;
    Ok(config.socket.unwrap_or_else(protocol::default_socket))
}

fn read(path: &Path) -> Result<Config> {
    let fail = |why: String| Error::call(CKR_GENERAL_ERROR, format!("{}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let config: Config = toml::from_str(&text).map_err(|e| fail(format!("not a valid module configuration: {e}")))?;
    if let Some(socket) = &config.socket {
        if !socket.is_absolute() {
            return Err(fail(format!("socket = {:?} is not an absolute path", socket.display())));
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_names_an_absolute_socket_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("pkcs11.toml");
        std::fs::write(&file, "socket = \"/run/other/hsmd.sock\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read(&file).ok().and_then(|c| c.socket),
            Some(PathBuf::from("/run/other/hsmd.sock"))
        );
        std::fs::write(&file, "socket = \"relative.sock\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(read(&file).is_err());
        std::fs::write(&file, "sockt = \"/x\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(read(&file).unwrap_err().to_string().contains("sockt"));
        assert!(read(&dir.path().join("missing.toml")).is_err());
    }
}
