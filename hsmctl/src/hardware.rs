//! `hsmctl hardware scan`: what security hardware this machine has, without
//! hsmd: TPMs (kernel devices, and the TPM itself through tss-esapi where
//! reachable), PKCS#11 modules in the usual places with their slots and tokens
//! (smart-card readers appear through OpenSC's module), and FIDO2/U2F
//! authenticators among the hidraw devices. Nothing found is a normal answer.
//!
//! Each PKCS#11 module is probed in a child process (`hsmctl hardware
//! probe-module PATH`, hidden), so a module that crashes or hangs is reported as
//! such and does not take the scan down.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Serialize;

/// How long one module probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where distributions put PKCS#11 modules (globs), besides p11-kit's
/// registrations in `/usr/share/p11-kit/modules/*.module`.
const MODULE_GLOBS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/*/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib/*/opensc-pkcs11.so",
    "/usr/lib64/opensc-pkcs11.so",
    "/usr/lib/*/pkcs11/*.so",
    "/usr/lib64/pkcs11/*.so",
    "/usr/local/lib/*pkcs11*.so",
];

/// Everything found.
#[derive(Debug, Serialize)]
pub struct Scan {
    /// TPMs.
    pub tpm: Vec<Tpm>,
    /// PKCS#11 modules.
    pub pkcs11: Vec<Module>,
    /// FIDO2/U2F authenticators.
    pub fido2: Vec<Fido>,
}

/// A TPM: a kernel device, or the TCTI given.
#[derive(Debug, Serialize)]
pub struct Tpm {
    /// `/dev/tpmrm0`, or the TCTI.
    pub path: String,
    /// TPM spec version from sysfs (`2`), where known.
    pub version: Option<String>,
    /// Vendor string, when the TPM answered.
    pub manufacturer: Option<String>,
    /// Firmware version, when the TPM answered.
    pub firmware: Option<String>,
    /// Why the TPM could not be asked, if it could not.
    pub error: Option<String>,
}

/// A PKCS#11 module and what it sees.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Module {
    /// Its path.
    pub path: String,
    /// Library description and version, as the module reports them.
    pub library: Option<String>,
    /// Its slots (readers) and their tokens.
    pub slots: Vec<Slot>,
    /// Why it could not be probed, if it could not.
    pub error: Option<String>,
}

/// One slot of a module.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Slot {
    /// Slot id.
    pub id: u64,
    /// Slot (reader) description.
    pub description: String,
    /// The token in it, if any.
    pub token: Option<Token>,
}

/// A token.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Token {
    /// Label.
    pub label: String,
    /// Serial number.
    pub serial: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
}

/// A FIDO2/U2F authenticator (a hidraw device with the FIDO usage page).
#[derive(Debug, Serialize)]
pub struct Fido {
    /// `/dev/hidrawN`.
    pub path: String,
    /// The product name the kernel reports.
    pub name: Option<String>,
}

/// Scans. `tcti` names a TPM to ask besides the kernel's devices (e.g. a
/// swtpm); `extra_modules` are PKCS#11 modules to probe besides the usual places.
#[must_use]
pub fn scan(tcti: Option<&str>, extra_modules: &[PathBuf]) -> Scan {
    Scan {
        tpm: tpms(tcti),
        pkcs11: modules(extra_modules).iter().map(|m| probe_in_child(m)).collect(),
        fido2: fido_devices(),
    }
}

fn tpms(tcti: Option<&str>) -> Vec<Tpm> {
    let mut out = Vec::new();
    let mut devices: Vec<PathBuf> = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("tpmrm"))
                })
                .collect()
        })
        .unwrap_or_default();
    devices.sort();
    for dev in devices {
        let name = dev
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .replace("tpmrm", "tpm");
        let version = std::fs::read_to_string(format!("/sys/class/tpm/{name}/tpm_version_major"))
            .ok()
            .map(|v| v.trim().to_owned());
        let (manufacturer, firmware, error) = ask_tpm(&format!("device:{}", dev.display()));
        out.push(Tpm {
            path: dev.display().to_string(),
            version,
            manufacturer,
            firmware,
            error,
        });
    }
    if let Some(t) = tcti {
        let (manufacturer, firmware, error) = ask_tpm(t);
        out.push(Tpm {
            path: t.to_owned(),
            version: error.is_none().then(|| "2".to_owned()),
            manufacturer,
            firmware,
            error,
        });
    }
    out
}

#[cfg(feature = "tpm")]
fn ask_tpm(tcti: &str) -> (Option<String>, Option<String>, Option<String>) {
    use std::str::FromStr as _;
    use tss_esapi::{constants::PropertyTag, tcti_ldr::TctiNameConf, Context};
    let conf = match TctiNameConf::from_str(tcti) {
        Ok(c) => c,
        Err(e) => return (None, None, Some(format!("TCTI {tcti:?}: {e}"))),
    };
    let mut ctx = match Context::new(conf) {
        Ok(c) => c,
        Err(e) => return (None, None, Some(format!("not reachable: {e}"))),
    };
    let vendor = tss_esapi::utils::get_tpm_vendor(&mut ctx)
        .ok()
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "));
    let mut fw = |tag| ctx.get_tpm_property(tag).ok().flatten();
    let firmware = match (fw(PropertyTag::FirmwareVersion1), fw(PropertyTag::FirmwareVersion2)) {
        (Some(a), Some(b)) => Some(format!("{}.{}.{}.{}", a >> 16, a & 0xffff, b >> 16, b & 0xffff)),
        (Some(a), None) => Some(format!("{}.{}", a >> 16, a & 0xffff)),
        _ => None,
    };
    (vendor, firmware, None)
}

#[cfg(not(feature = "tpm"))]
fn ask_tpm(_tcti: &str) -> (Option<String>, Option<String>, Option<String>) {
    (
        None,
        None,
        Some("this hsmctl was built without TPM support (feature tpm): device listed, not asked".into()),
    )
}

/// The modules to probe: the usual places and p11-kit's registrations, real
/// paths deduplicated, p11-kit's own proxy and trust modules left out.
fn modules(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for pattern in MODULE_GLOBS {
        if let Ok(paths) = glob_paths(pattern) {
            found.extend(paths);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/usr/share/p11-kit/modules") {
        for e in dir.filter_map(Result::ok) {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            for line in text.lines() {
                if let Some(m) = line.trim().strip_prefix("module:") {
                    let m = m.trim();
                    let path = if m.starts_with('/') {
                        PathBuf::from(m)
                    } else {
                        // Relative names live in p11-kit's module directory.
                        glob_paths(&format!("/usr/lib/*/pkcs11/{m}"))
                            .ok()
                            .and_then(|v| v.into_iter().next())
                            .unwrap_or_else(|| PathBuf::from(m))
                    };
                    found.push(path);
                }
            }
        }
    }
    found.extend(extra.iter().cloned());
    let mut real: Vec<PathBuf> = found
        .into_iter()
        .filter_map(|p| std::fs::canonicalize(&p).ok())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            // p11-kit's proxies and OpenSC's logging proxy only forward to other modules.
            !n.starts_with("p11-kit-") && n != "pkcs11-spy.so"
        })
        .collect();
    real.sort();
    real.dedup();
    real
}

/// Shell-style glob over directories (`*` within one path component).
fn glob_paths(pattern: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut current = vec![PathBuf::from("/")];
    for part in pattern.trim_start_matches('/').split('/') {
        let mut next = Vec::new();
        for dir in &current {
            if part.contains('*') {
                let Ok(entries) = std::fs::read_dir(dir) else { continue };
                for e in entries.filter_map(Result::ok) {
                    if let Some(name) = e.file_name().to_str() {
                        if wildcard(part, name) {
                            next.push(dir.join(name));
                        }
                    }
                }
            } else {
                let p = dir.join(part);
                if p.exists() {
                    next.push(p);
                }
            }
        }
        current = next;
    }
    Ok(current)
}

fn wildcard(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.starts_with(head)
                && (0..=name.len() - head.len()).any(|i| {
                    let rest = &name[head.len() + i..];
                    wildcard(tail, rest)
                })
        }
    }
}

/// Runs `hsmctl hardware probe-module PATH` and reads its JSON.
fn probe_in_child(module: &Path) -> Module {
    let failed = |why: String| Module {
        path: module.display().to_string(),
        library: None,
        slots: Vec::new(),
        error: Some(why),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return failed(format!("cannot find hsmctl itself: {e}")),
    };
    let mut child = match Command::new(exe)
        .args(["hardware", "probe-module"])
        .arg(module)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start the probe: {e}")),
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    use std::io::Read as _;
                    let _ = o.read_to_string(&mut out);
                }
                return match serde_json::from_str::<Module>(&out) {
                    Ok(m) => m,
                    Err(_) => failed(format!("the module crashed its probe ({status})")),
                };
            }
            Ok(None) if start.elapsed() > PROBE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return failed(format!("the module did not answer within {PROBE_TIMEOUT:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return failed(format!("waiting for the probe: {e}")),
        }
    }
}

/// A cryptoki error without the specification's paragraph.
fn short(e: &cryptoki::error::Error) -> String {
    match e {
        cryptoki::error::Error::Pkcs11(rv, function) => format!("{function:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// The child's side: loads the module and prints what it sees as JSON.
#[must_use]
pub fn probe_module(module: &Path) -> Module {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let mut m = Module {
        path: module.display().to_string(),
        library: None,
        slots: Vec::new(),
        error: None,
    };
    let p11 = match Pkcs11::new(module) {
        Ok(p) => p,
        Err(e) => {
            m.error = Some(format!("cannot load: {}", short(&e)));
            return m;
        }
    };
    if let Err(e) = p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        m.error = Some(format!("C_Initialize failed: {}", short(&e)));
        return m;
    }
    if let Ok(info) = p11.get_library_info() {
        m.library = Some(format!(
            "{} {} {}.{}",
            info.manufacturer_id().trim(),
            info.library_description().trim(),
            info.library_version().major(),
            info.library_version().minor()
        ));
    }
    match p11.get_all_slots() {
        Ok(slots) => {
            for slot in slots {
                let description = p11
                    .get_slot_info(slot)
                    .map(|i| i.slot_description().trim().to_owned())
                    .unwrap_or_default();
                let token = p11
                    .get_token_info(slot)
                    .ok()
                    .filter(|t| t.token_initialized())
                    .map(|t| Token {
                        label: t.label().trim().to_owned(),
                        serial: t.serial_number().trim().to_owned(),
                        manufacturer: t.manufacturer_id().trim().to_owned(),
                        model: t.model().trim().to_owned(),
                    });
                m.slots.push(Slot {
                    id: slot.id(),
                    description,
                    token,
                });
            }
        }
        Err(e) => m.error = Some(format!("cannot list slots: {}", short(&e))),
    }
    m
}

/// hidraw devices whose HID report descriptor declares the FIDO Alliance
/// usage page (0xF1D0), as libfido2 finds them.
fn fido_devices() -> Vec<Fido> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/hidraw") else {
        return out;
    };
    for e in dir.filter_map(Result::ok) {
        let base = e.path();
        let Ok(descriptor) = std::fs::read(base.join("device/report_descriptor")) else {
            continue;
        };
        if is_fido_descriptor(&descriptor) {
            let name = std::fs::read_to_string(base.join("device/uevent"))
                .ok()
                .and_then(|u| u.lines().find_map(|l| l.strip_prefix("HID_NAME=").map(str::to_owned)));
            out.push(Fido {
                path: format!("/dev/{}", e.file_name().to_string_lossy()),
                name,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Whether a HID report descriptor has a Usage Page item for 0xF1D0 (walking
/// the items, so a 0xF1D0 inside another item's data does not count).
fn is_fido_descriptor(d: &[u8]) -> bool {
    let mut i = 0;
    while i < d.len() {
        let prefix = d[i];
        if prefix == 0xFE {
            // Long item: size in the next byte.
            let size = d.get(i + 1).copied().unwrap_or(0) as usize;
            i += 3 + size;
            continue;
        }
        let size = match prefix & 0x03 {
            3 => 4,
            n => n as usize,
        };
        let data = d.get(i + 1..i + 1 + size).unwrap_or_default();
        // Global item, tag Usage Page: 0b0000_01_nn.
        if prefix & 0xFC == 0x04 {
            let value = data.iter().rev().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
            if value == 0xF1D0 {
                return true;
            }
        }
        i += 1 + size;
    }
    false
}

/// Prints the scan as a table.
pub fn print(scan: &Scan) {
    println!("TPM:");
    if scan.tpm.is_empty() {
        println!("  none found");
    }
    for t in &scan.tpm {
        match &t.error {
            None => println!(
                "  {}  TPM {}  {}  firmware {}",
                t.path,
                t.version.as_deref().unwrap_or("?"),
                t.manufacturer.as_deref().unwrap_or("unknown vendor"),
                t.firmware.as_deref().unwrap_or("?")
            ),
            Some(e) => println!("  {}  {e}", t.path),
        }
    }
    println!("PKCS#11 modules:");
    if scan.pkcs11.is_empty() {
        println!("  none found");
    }
    for m in &scan.pkcs11 {
        println!("  {}  {}", m.path, m.library.as_deref().unwrap_or(""));
        if let Some(e) = &m.error {
            println!("    {e}");
        }
        for s in &m.slots {
            match &s.token {
                Some(t) => println!(
                    "    slot {}  {:?}  token {:?} serial {} ({} {})",
                    s.id, s.description, t.label, t.serial, t.manufacturer, t.model
                ),
                None => println!("    slot {}  {:?}  no token", s.id, s.description),
            }
        }
    }
    println!("FIDO2/U2F authenticators:");
    if scan.fido2.is_empty() {
        println!("  none found");
    }
    for f in &scan.fido2 {
        println!("  {}  {}", f.path, f.name.as_deref().unwrap_or(""));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fido_usage_page_is_found_as_an_item_not_as_data() {
        // A YubiKey's descriptor starts: Usage Page (0xF1D0), Usage (0x01), Collection.
        assert!(is_fido_descriptor(&[0x06, 0xD0, 0xF1, 0x09, 0x01, 0xA1, 0x01]));
        // A keyboard: Usage Page (Generic Desktop), Usage (Keyboard).
        assert!(!is_fido_descriptor(&[0x05, 0x01, 0x09, 0x06, 0xA1, 0x01]));
        // 0xF1D0 as the data of a Logical Maximum item is not a usage page.
        assert!(!is_fido_descriptor(&[0x26, 0xD0, 0xF1]));
        // Truncated input does not panic.
        assert!(!is_fido_descriptor(&[0x06, 0xD0]));
        assert!(!is_fido_descriptor(&[0xFE, 0x10]));
    }

    #[test]
    fn wildcards_match_within_a_component() {
        assert!(wildcard("*.so", "libx.so"));
        assert!(wildcard("lib*pkcs11*.so", "libfoo-pkcs11-bar.so"));
        assert!(!wildcard("*.so", "libx.so.1"));
        assert!(wildcard("x86_64-*", "x86_64-linux-gnu"));
    }
}
