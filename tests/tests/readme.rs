//! The README's quick start works as written: its commands are run here, from
//! a directory laid out as a checkout after its build step.

use std::{fs, process::Command};

use hsmd_tests::bin;

const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
const BUILD: &str = "cargo build --release -p hsmd -p hsmctl && ";

#[test]
fn the_quick_start_signs_and_verifies_a_file() {
    let block = README
        .split_once("<!-- quick-start -->")
        .and_then(|(_, rest)| rest.split_once("<!-- /quick-start -->"))
        .map(|(block, _)| block)
        .expect("README.md has a quick-start block");
    let lines: Vec<&str> = block
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("```"))
        .collect();
    assert_eq!(lines.len(), 5, "the quick start is five commands: {lines:?}");
    // The build is what the test run itself has done (into the test's own
    // target directory); everything after it runs as written, in a directory
    // whose target/release holds the binaries just built.
    let first = lines[0]
        .strip_prefix(BUILD)
        .unwrap_or_else(|| panic!("the quick start no longer begins with {BUILD:?}: {}", lines[0]));
    let dir = tempfile::tempdir().expect("tempdir");
    let release = dir.path().join("target/release");
    fs::create_dir_all(&release).expect("mkdir");
    for name in ["hsmd", "hsmctl"] {
        std::os::unix::fs::symlink(bin(name), release.join(name)).expect("symlink");
    }
    let mut script = String::from("set -e\n");
    script.push_str(first);
    script.push('\n');
    for line in &lines[1..] {
        script.push_str(line);
        script.push('\n');
    }
    // The daemon the quick start left running.
    script.push_str("kill $!\nwait\n");
    let out = Command::new("timeout")
        .args(["60", "bash", "-c", &script])
        .current_dir(dir.path())
        .env_remove("HSMD_SOCKET")
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("signature valid (key release, version 1)"),
        "the quick start failed:\n{script}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("release.txt.sig").exists());
}
