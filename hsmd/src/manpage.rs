//! The manual pages hsmd ships: hsmd(8) from the command line's clap
//! definition plus the sections an operator needs (files, signals, systemd,
//! exit status), and hsmd.toml(5) from the packaged default configuration, so
//! the page can never describe keys the shipped file does not have.
//! `scripts/package` writes them with `hsmd --generate-man DIR`.

use std::{fs, io, path::Path};

use roff::{bold, italic, roman, Inline, Roff};

/// The packaged `/etc/hsmd/hsmd.toml`, every section and key commented.
pub const PACKAGED_CONFIG: &str = include_str!("../../packaging/hsmd.toml");

/// The manual's name in page footers.
const MANUAL: &str = "hsmd manual";

/// Writes `hsmd.8` (from `cmd`, hsmd's clap command) and `hsmd.toml.5` into
/// `dir`.
///
/// # Errors
/// Writing a file fails.
pub fn generate(cmd: clap::Command, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut page = Vec::new();
    daemon_page(cmd, &mut page)?;
    fs::write(dir.join("hsmd.8"), page)?;
    fs::write(dir.join("hsmd.toml.5"), config_page(PACKAGED_CONFIG).render())?;
    Ok(())
}

fn section(roff: &mut Roff, title: &str) {
    roff.control("SH", [title]);
}

fn paragraph(roff: &mut Roff, text: impl Into<Vec<Inline>>) {
    roff.control("PP", []);
    roff.text(text);
}

/// A tagged paragraph: `tag` in bold, then `text`.
fn item(roff: &mut Roff, tag: &str, text: impl Into<Vec<Inline>>) {
    roff.control("TP", []);
    roff.text([bold(tag)]);
    roff.text(text);
}

/// hsmd(8): clap's synopsis and options, then what clap cannot know.
fn daemon_page(cmd: clap::Command, w: &mut dyn io::Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd)
        .section("8")
        .manual(MANUAL)
        .source(format!("hsmd {}", env!("CARGO_PKG_VERSION")));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;

    let mut r = Roff::new();
    section(&mut r, "DESCRIPTION");
    r.text([roman(
        "hsmd is a local hardware security module: it holds unlocked keys in locked memory and performs \
         every key operation itself. Programs reach it only through a permission-checked Unix socket \
         (peer credentials from the kernel, a policy of roles, per-user rate limits), with hsmctl(1) or \
         the protocol client library. Keys live sealed under a master key in the keystore (the soft \
         backend), inside a PKCS#11 token, or inside the TPM.",
    )]);
    paragraph(
        &mut r,
        [
            roman(
                "The daemon moves through three states: uninitialized, locked (no key material in memory, no key \
             operation runs) and unlocked. ",
            ),
            bold("hsmctl init"),
            roman(" creates the keystore, "),
            bold("hsmctl unlock"),
            roman(" unwraps the master key with any one unlock slot, and "),
            bold("hsmctl lock"),
            roman(" zeroizes every unlocked key at once."),
        ],
    );
    w.write_all(r.render().as_bytes())?;

    man.render_options_section(w)?;

    let mut r = Roff::new();
    section(&mut r, "FILES");
    item(
        &mut r,
        "/etc/hsmd/hsmd.toml",
        [roman("The configuration; see "), bold("hsmd.toml"), roman("(5).")],
    );
    item(
        &mut r,
        "/etc/hsmd/policy.toml",
        [roman("Roles and bindings, reloaded within a second of a change.")],
    );
    item(
        &mut r,
        "/var/lib/hsmd/",
        [roman(
            "The state directory (mode 0700, the hsmd user's): keystore.sqlite, the audit log, the token file store.",
        )],
    );
    item(
        &mut r,
        "/run/hsmd/hsmd.sock",
        [roman(
            "The socket (mode 0660, group hsmd), created by hsmd.socket or by hsmd itself.",
        )],
    );
    item(
        &mut r,
        "/run/hsmd/ssh-agent.sock",
        [roman(
            "The SSH agent socket (same mode and group), created by hsmd-ssh-agent.socket or, with \
             [ssh_agent] socket set, by hsmd itself. It offers the keys labelled ssh that the caller may sign \
             with to ssh, ssh-add, ssh-keygen -Y, git and sshd's HostKeyAgent; adding keys and the agent's \
             lock are refused.",
        )],
    );

    item(
        &mut r,
        "/usr/lib/hsmd/libhsmd_pkcs11.so",
        [roman("The PKCS#11 module; see PKCS#11 MODULE below.")],
    );
    item(
        &mut r,
        "/usr/share/p11-kit/modules/hsmd.module",
        [roman(
            "Makes the module known to p11-kit and to the programs that load modules through it.",
        )],
    );

    section(&mut r, "PKCS#11 MODULE");
    paragraph(
        &mut r,
        [roman(
            "Programs that take keys from a PKCS#11 module (OpenSSL's engine, GnuTLS, curl, p11tool, ssh-keygen -D \
             and ssh -I, NSS) use hsmd's keys through libhsmd_pkcs11.so. The module holds no key: each signature is \
             a request to hsmd made with the calling program's own uid, so hsmd's policy, rate limits and audit \
             log apply to it as to hsmctl sign. It offers one slot holding one token, the hsmd at $HSMD_SOCKET, \
             else the socket named by socket = \"PATH\" in /etc/hsmd/pkcs11.toml (or the file \
             $HSMD_PKCS11_CONFIG names), else the caller's own hsmd --user, else /run/hsmd/hsmd.sock. Its objects are the keys the \
             caller may list: a private key (sensitive, never extractable) and a public key for each signing key, \
             a secret key for each aes256-gcm key, labelled with the key's name and identified (CKA_ID) by its id, \
             which rotation keeps. AES-GCM encrypts only through C_EncryptMessage with a random IV that hsmd draws \
             (C_EncryptInit, whose IV would be the caller's, is refused); C_Decrypt and C_DecryptMessage open what \
             any version of the key still allowed to decrypt sealed.",
        )],
    );
    paragraph(
        &mut r,
        [
            roman(
                "There is no PIN: hsmd knows the caller from the kernel, so the token does not ask for a login and \
             accepts any PIN if a program logs in anyway; a PIN grants nothing. A locked hsmd answers \
             CKR_USER_NOT_LOGGED_IN until ",
            ),
            bold("hsmctl unlock"),
            roman(
                "; a policy refusal is CKR_KEY_FUNCTION_NOT_PERMITTED; an hsmd that cannot be reached is \
             CKR_DEVICE_REMOVED (and an empty slot), never a crash of the program. Set HSMD_PKCS11_DEBUG=1 to have \
             the module print why a call failed. Example: ",
            ),
            bold("pkcs11-tool --module /usr/lib/hsmd/libhsmd_pkcs11.so -O"),
            roman("."),
        ],
    );

    section(&mut r, "SYSTEMD");
    r.text([
        roman(
            "hsmd.service runs hsmd as the hsmd user with Type=notify (READY=1 once the socket accepts, WATCHDOG=1, \
         STOPPING=1), started at the first connection to hsmd.socket. It is sandboxed (no network, a read-only \
         system, no devices but /dev/tpmrm0) and keeps only CAP_IPC_LOCK, to lock its memory. Enable it with ",
        ),
        bold("systemctl enable --now hsmd.socket"),
        roman(", and let a user connect by adding them to the hsmd group."),
    ]);
    paragraph(
        &mut r,
        [
            roman(
                "To unlock at start without a passphrase, add a key-file slot, then pass the file as a credential \
             that only the service can read (",
            ),
            bold("systemctl edit hsmd.service"),
            roman("):"),
        ],
    );
    r.control("nf", []);
    r.text([roman("[Service]")]);
    r.text([roman("LoadCredential=unlock.key:/etc/hsmd/unlock.key")]);
    r.control("fi", []);
    paragraph(
        &mut r,
        [
            roman("and set "),
            italic("[unlock] keyfile = \"/run/credentials/hsmd.service/unlock.key\""),
            roman(" in hsmd.toml. The metrics listener needs PrivateNetwork=no and AF_INET in a drop-in too."),
        ],
    );

    section(&mut r, "SIGNALS");
    item(
        &mut r,
        "SIGTERM, SIGINT",
        [roman(
            "Stop accepting, let requests in flight finish within limits.shutdown_grace, flush the audit log \
             and use counters, zeroize every key, exit 0.",
        )],
    );
    item(
        &mut r,
        "SIGHUP",
        [roman(
            "Reload the policy file now, and check the config file as the next start would read it; each is \
             an audit line (POLICY_RELOADED or CONFIG_ERROR, CONFIG_CHECKED). Settings of hsmd.toml apply at \
             the next start. systemctl reload hsmd sends it.",
        )],
    );

    section(&mut r, "EXIT STATUS");
    item(
        &mut r,
        "0",
        [roman(
            "Stopped cleanly, or --check-config found the configuration valid.",
        )],
    );
    item(
        &mut r,
        "1",
        [roman(
            "The configuration is invalid (each problem is named with its key and the fix), or hsmd could not start.",
        )],
    );

    section(&mut r, "SEE ALSO");
    r.text([
        bold("hsmctl"),
        roman("(1), "),
        bold("hsmd.toml"),
        roman("(5), "),
        bold("systemd.exec"),
        roman("(5), "),
        bold("systemd-socket-activate"),
        roman("(1)"),
    ]);
    w.write_all(r.render().as_bytes())?;
    man.render_version_section(w)
}

/// One line of the packaged configuration, as the page reads it.
#[derive(Debug, PartialEq)]
enum ConfigLine<'a> {
    /// `[section]`, or `# [section]` for one that is off by default, with any
    /// trailing comment.
    Section {
        name: &'a str,
        off: bool,
        note: &'a str,
    },
    /// `key = value`, or `# key = value` for one unset by default, with any
    /// trailing comment.
    Key {
        key: &'a str,
        value: &'a str,
        off: bool,
        note: &'a str,
    },
    /// A comment that continues the previous key's trailing comment (indented
    /// under it).
    More(&'a str),
    /// Prose.
    Comment(&'a str),
    Blank,
}

/// Splits `text  # note` into the text and the note.
fn trailing_note(s: &str) -> (&str, &str) {
    match s.find("  #") {
        Some(i) => (s[..i].trim_end(), s[i + 3..].trim()),
        None => (s.trim_end(), ""),
    }
}

fn is_key(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn classify(line: &str) -> ConfigLine<'_> {
    let t = line.trim();
    if t.is_empty() {
        return ConfigLine::Blank;
    }
    let (body, off) = match t.strip_prefix('#') {
        Some(rest) => {
            // "#     # more": a continuation of the note above.
            if rest.starts_with("   ") && rest.trim_start().starts_with('#') {
                return ConfigLine::More(rest.trim_start().trim_start_matches('#').trim());
            }
            (rest.trim_start(), true)
        }
        None => (t, false),
    };
    let (main, note) = trailing_note(body);
    if let Some(name) = main.strip_prefix('[').and_then(|m| m.strip_suffix(']')) {
        if name.split('.').all(is_key) {
            return ConfigLine::Section { name, off, note };
        }
    }
    if let Some((key, value)) = main.split_once(" = ") {
        if is_key(key.trim()) {
            return ConfigLine::Key {
                key: key.trim(),
                value: value.trim(),
                off,
                note,
            };
        }
    }
    if off {
        ConfigLine::Comment(body)
    } else {
        // Not TOML hsmd writes; shown as it is.
        ConfigLine::Comment(t)
    }
}

/// hsmd.toml(5) from the packaged configuration's sections, keys and comments.
fn config_page(config: &str) -> Roff {
    let mut r = Roff::new();
    r.control(
        "TH",
        [
            "HSMD.TOML",
            "5",
            "",
            &format!("hsmd {}", env!("CARGO_PKG_VERSION")),
            MANUAL,
        ],
    );
    section(&mut r, "NAME");
    r.text([roman("hsmd.toml - configuration of the hsmd key daemon")]);
    section(&mut r, "SYNOPSIS");
    r.text([bold("/etc/hsmd/hsmd.toml")]);
    section(&mut r, "DESCRIPTION");
    r.text([
        roman("A TOML file. Unknown keys and sections are errors, and every value is checked before hsmd starts; "),
        bold("hsmd --check-config --config FILE"),
        roman(
            " validates a file and names each problem with its key and the fix. Durations are written as \"10s\", \
         \"5m\", \"30d\". What follows is the packaged file, section by section: a key shown as ",
        ),
        italic("unset"),
        roman(" is commented out there, and takes effect only when set."),
    ]);

    let mut prose: Vec<String> = Vec::new();
    let flush = |r: &mut Roff, prose: &mut Vec<String>| {
        if !prose.is_empty() {
            paragraph(r, [roman(prose.join(" "))]);
            prose.clear();
        }
    };
    let mut in_sections = false;
    // The file's own header (its path and how to validate it), up to the
    // first blank line, is the page's description already.
    let body = config.split_once("\n\n").map_or(config, |(header, rest)| {
        if header.starts_with("# /etc/hsmd/") {
            rest
        } else {
            config
        }
    });
    // Prose right under a section header describes the section; later prose
    // describes the key after it.
    let mut keys_in_section = 0;
    for line in body.lines() {
        match classify(line) {
            ConfigLine::Section { name, off, note } => {
                flush(&mut r, &mut prose);
                in_sections = true;
                keys_in_section = 0;
                let title = format!("[{name}]");
                r.control("SS", [title.as_str()]);
                let mut text = Vec::new();
                if off {
                    text.push(roman("Off unless the section is present. "));
                }
                if !note.is_empty() {
                    text.push(roman(note.to_owned()));
                }
                if !text.is_empty() {
                    r.text(text);
                }
            }
            ConfigLine::Key { key, value, off, note } => {
                if !in_sections {
                    // Top-level keys, before the first section.
                    in_sections = true;
                    r.control("SS", ["Top level"]);
                } else if keys_in_section == 0 {
                    flush(&mut r, &mut prose);
                }
                keys_in_section += 1;
                r.control("TP", []);
                let default = if off {
                    format!(" (unset; for example {value})")
                } else {
                    format!(" = {value}")
                };
                r.text([bold(key.to_owned()), roman(default)]);
                let mut body = std::mem::take(&mut prose);
                if !note.is_empty() {
                    body.push(note.to_owned());
                }
                if !body.is_empty() {
                    r.text([roman(body.join(" "))]);
                }
            }
            ConfigLine::More(text) => {
                r.text([roman(text.to_owned())]);
            }
            ConfigLine::Comment(text) => prose.push(text.to_owned()),
            ConfigLine::Blank => flush(&mut r, &mut prose),
        }
    }
    flush(&mut r, &mut prose);
    section(&mut r, "FILES");
    item(
        &mut r,
        "/etc/hsmd/hsmd.toml",
        [roman("The configuration hsmd.service starts hsmd with.")],
    );
    item(
        &mut r,
        "/etc/hsmd/policy.toml",
        [roman("The policy ([policy] path), reloaded on change.")],
    );
    section(&mut r, "SEE ALSO");
    r.text([bold("hsmd"), roman("(8), "), bold("hsmctl"), roman("(1)")]);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_are_told_apart() {
        assert_eq!(
            classify("[limits]"),
            ConfigLine::Section {
                name: "limits",
                off: false,
                note: ""
            }
        );
        assert_eq!(
            classify("# [backends.tpm]                # TPM keys"),
            ConfigLine::Section {
                name: "backends.tpm",
                off: true,
                note: "TPM keys"
            }
        );
        assert_eq!(
            classify("max_connections = 256           # more get \"too many connections\""),
            ConfigLine::Key {
                key: "max_connections",
                value: "256",
                off: false,
                note: "more get \"too many connections\""
            }
        );
        assert_eq!(
            classify("# idle_lock = \"15m\""),
            ConfigLine::Key {
                key: "idle_lock",
                value: "\"15m\"",
                off: true,
                note: ""
            }
        );
        assert_eq!(
            classify("#                                              # by `hsmctl backend pkcs11 set-pin`"),
            ConfigLine::More("by `hsmctl backend pkcs11 set-pin`")
        );
        assert_eq!(
            classify("# Who may connect at all."),
            ConfigLine::Comment("Who may connect at all.")
        );
        assert_eq!(classify("   "), ConfigLine::Blank);
    }

    #[test]
    fn the_config_page_names_every_section_and_key_of_the_packaged_file() {
        let page = config_page(PACKAGED_CONFIG).render();
        for line in PACKAGED_CONFIG.lines() {
            match classify(line) {
                ConfigLine::Section { name, .. } => {
                    assert!(page.contains(&format!(".SS [{name}]")), "[{name}] missing");
                }
                ConfigLine::Key { key, .. } => {
                    // roff escapes '-' but not '_'.
                    assert!(page.contains(&format!("\\fB{key}\\fR")), "{key} missing");
                }
                _ => {}
            }
        }
    }
}
