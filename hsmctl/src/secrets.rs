//! Reading secrets on the client side: passphrases from a file, stdin or the
//! terminal (without echo), and key files. Everything read is zeroized after use.

use std::{
    fs::OpenOptions,
    io::{IsTerminal, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use protocol::SecretBytes;
use zeroize::Zeroizing;

/// Bytes in a key file.
const KEYFILE_LEN: usize = 32;

/// Drops one trailing line ending, as `echo` and editors add.
fn strip_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    bytes
}

fn read_source(file: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut raw = Zeroizing::new(Vec::new());
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut raw)
            .map_err(|e| format!("cannot read the passphrase from stdin: {e}"))?;
    } else {
        std::fs::File::open(file)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(|e| format!("cannot read the passphrase file {}: {e}", file.display()))?;
    }
    Ok(Zeroizing::new(strip_newline(std::mem::take(&mut *raw))))
}

/// A passphrase from `file` (`-` is stdin), else from the terminal without echo,
/// else (stdin is not a terminal) from stdin.
pub fn passphrase(file: Option<&Path>, prompt: &str) -> Result<SecretBytes, String> {
    let bytes = match file {
        Some(f) => read_source(f)?,
        None if std::io::stdin().is_terminal() => Zeroizing::new(
            rpassword::prompt_password(prompt)
                .map_err(|e| format!("cannot read the passphrase from the terminal: {e}"))?
                .into_bytes(),
        ),
        None => read_source(Path::new("-"))?,
    };
    Ok(SecretBytes::new(bytes.to_vec()))
}

/// A new passphrase: from a file or stdin as given, or typed twice at the terminal.
pub fn new_passphrase(file: Option<&Path>) -> Result<SecretBytes, String> {
    if file.is_some() || !std::io::stdin().is_terminal() {
        return passphrase(file, "");
    }
    let first = passphrase(None, "New passphrase: ")?;
    // Said before asking again: typing a refused passphrase twice helps no one.
    let n = first.expose().len();
    if !(protocol::MIN_PASSPHRASE_LEN..=protocol::MAX_PASSPHRASE_LEN).contains(&n) {
        return Err(format!(
            "a passphrase must be {} to {} bytes; this one is {n}; nothing was changed",
            protocol::MIN_PASSPHRASE_LEN,
            protocol::MAX_PASSPHRASE_LEN
        ));
    }
    let second = passphrase(None, "Repeat it: ")?;
    if first != second {
        return Err("the two passphrases differ; nothing was changed".to_owned());
    }
    Ok(first)
}

/// The 32 bytes of an existing key file.
pub fn read_keyfile(path: &Path) -> Result<SecretBytes, String> {
    let bytes =
        Zeroizing::new(std::fs::read(path).map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?);
    if bytes.len() != KEYFILE_LEN {
        return Err(format!(
            "{} is {} bytes; a key file holds exactly {KEYFILE_LEN}",
            path.display(),
            bytes.len()
        ));
    }
    Ok(SecretBytes::new(bytes.to_vec()))
}

/// Creates a new key file (never overwriting one) with 32 random bytes, mode
/// 0600, written through to disk.
pub fn create_keyfile(path: &Path) -> Result<SecretBytes, String> {
    let mut key = Zeroizing::new([0u8; KEYFILE_LEN]);
    getrandom::fill(key.as_mut()).map_err(|e| format!("the system random source failed: {e}"))?;
    write_secret_file(path, key.as_ref())?;
    Ok(SecretBytes::new(key.to_vec()))
}

/// Writes secret bytes to a new file (never overwriting one), mode 0600 from
/// its creation, written through to disk.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e} (it must not exist yet)", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_line_ending_is_dropped_and_no_more() {
        assert_eq!(strip_newline(b"pass\n".to_vec()), b"pass");
        assert_eq!(strip_newline(b"pass\r\n".to_vec()), b"pass");
        assert_eq!(strip_newline(b"pass\n\n".to_vec()), b"pass\n");
        assert_eq!(strip_newline(b" pass ".to_vec()), b" pass ");
    }
}
