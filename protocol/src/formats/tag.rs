//! MAC tag files: UTF-8 text.
//!
//! ```text
//! hsmd-mac v1
//! key: audit-mac
//! version: 1
//! tag: <hex of the 32-byte HMAC-SHA-256 tag>
//! ```

use super::FormatError;

/// The first line of a tag file.
pub const MAGIC: &str = "hsmd-mac v1";

/// A tag file's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagFile {
    /// The key's name.
    pub key: String,
    /// The key version that made the tag.
    pub version: u32,
    /// The tag.
    pub tag: Vec<u8>,
}

/// The text of a tag file.
#[must_use]
pub fn write(key: &str, version: u32, tag: &[u8]) -> String {
    format!("{MAGIC}\nkey: {key}\nversion: {version}\ntag: {}\n", hex::encode(tag))
}

/// Reads a tag file's text.
///
/// # Errors
/// [`FormatError::NotThisFormat`] if the first line is not [`MAGIC`];
/// [`FormatError::Invalid`] if a line is missing or malformed.
pub fn parse(text: &str) -> Result<TagFile, FormatError> {
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(FormatError::NotThisFormat("an hsmd MAC file"));
    }
    let (mut key, mut version, mut tag) = (None, None, None);
    for line in lines {
        match line.split_once(": ") {
            Some(("key", v)) => key = Some(v.to_owned()),
            Some(("version", v)) => version = v.parse().ok(),
            Some(("tag", v)) => tag = hex::decode(v).ok(),
            _ => {}
        }
    }
    match (key, version, tag) {
        (Some(key), Some(version), Some(tag)) => Ok(TagFile { key, version, tag }),
        _ => Err(FormatError::Invalid(
            "the MAC file lacks a valid key, version or tag line".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_files_round_trip() {
        let text = write("m", 2, &[0xab, 0x01]);
        assert!(text.contains("tag: ab01"));
        assert_eq!(
            parse(&text).ok(),
            Some(TagFile {
                key: "m".into(),
                version: 2,
                tag: vec![0xab, 0x01]
            })
        );
        assert!(parse("x").is_err());
        assert!(parse(&format!("{MAGIC}\nkey: m\nversion: 1\ntag: zz\n")).is_err());
    }
}
