//! Independent checkers of what hsmd made (OpenSSL), and the benchmark
//! output parser.

use super::*;

fn os_path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Whether OpenSSL (the independent checker) accepts `sig`, as `hsmctl sign
/// --format raw` writes it, over `data` with the PEM public key `public`; `t`
/// is the key type's name.
pub fn openssl_verifies(t: &str, public: &Path, data: &Path, sig: &Path) -> bool {
    let out = match t {
        "ed25519" => {
            let digest = data.with_extension("sha512");
            let d = Command::new("openssl")
                .args(["dgst", "-sha512", "-binary", "-out", os_path(&digest), os_path(data)])
                .output()
                .expect("openssl");
            assert!(d.status.success(), "{d:?}");
            Command::new("openssl")
                .args([
                    "pkeyutl",
                    "-verify",
                    "-pubin",
                    "-inkey",
                    os_path(public),
                    "-rawin",
                    "-in",
                    os_path(&digest),
                    "-sigfile",
                    os_path(sig),
                ])
                .output()
        }
        other => {
            // `openssl dgst` over the file: ECDSA and PKCS#1 v1.5 need only the
            // hash; PSS also its parameters (hsmd's: MGF1-SHA-256, salt 32).
            let hash = if other == "ecdsa-p384" { "-sha384" } else { "-sha256" };
            let mut cmd = Command::new("openssl");
            cmd.args(["dgst", hash]);
            if other.starts_with("rsa-pss-") {
                cmd.args([
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    "rsa_pss_saltlen:32",
                    "-sigopt",
                    "rsa_mgf1_md:sha256",
                ]);
            }
            cmd.args(["-verify", os_path(public), "-signature", os_path(sig), os_path(data)])
                .output()
        }
    }
    .expect("run openssl (Debian package openssl)");
    out.status.success()
}

/// The numeric rows of a benchmark table (the lines that start with a
/// client count), each cut into its numbers: a `p50/p99/p99.9/max` column
/// is four, a ratio such as `71.7%` or `3.4x` one.
pub fn table_rows(text: &str) -> Vec<Vec<f64>> {
    text.lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| {
            l.split(|c: char| c == '|' || c.is_whitespace() || matches!(c, '%' | '/' | 'x' | '×'))
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .collect()
}
