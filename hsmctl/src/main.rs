//! hsmctl: the command line for hsmd, built only on the protocol crate's client.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use base64::Engine as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use protocol::{
    formats::sshsig, Client, ClientError, ClientOptions, GroupInfo, NewSlot, PeerInfo, SlotInfo, StatusInfo,
    UnlockSecret,
};
use serde_json::json;

use crate::{
    backup_cmd::BackupCommand,
    failure::{Failure, Local},
    file_cmd::FileCommand,
    key_cmd::KeyCommand,
};

mod armor;
mod backup_cmd;
mod confirm;
mod failure;
mod fido2;
mod file_cmd;
mod hardware;
mod key_cmd;
mod keys;
mod output;
mod progress;
mod sealing;
mod secrets;
mod table;

const EXAMPLES: &str = "\
Examples:
  hsmd --dev > hsmd.env &          # a throw-away daemon; it writes its export line there
  . ./hsmd.env                     # once it is listening (the file is not empty)
  hsmctl status
  hsmctl --json status | jq .state
  hsmctl whoami
  hsmctl ping -c 100
  hsmctl init                      # asks for a passphrase twice, without echo
  hsmctl lock; hsmctl unlock
  hsmctl unlock --passphrase-file /run/secrets/hsmd   # or - for stdin
  hsmctl slot add --keyfile-out /etc/hsmd/unlock.key
  hsmctl key create release --type ed25519
  hsmctl sign release -i app.tar.gz -o app.tar.gz.sig
  hsmctl verify release -i app.tar.gz -s app.tar.gz.sig

Exit codes:
  0  success
  1  hsmd refused the request, or it failed
  2  usage error (bad command line)
  3  cannot reach hsmd (no socket, connection refused, no answer)";

/// Talk to the hsmd key daemon.
#[derive(Debug, Parser)]
#[command(version, after_help = EXAMPLES)]
struct Cli {
    /// hsmd's socket [default: $XDG_RUNTIME_DIR/hsmd/hsmd.sock if it exists
    /// (hsmd --user), else /run/hsmd/hsmd.sock]
    #[arg(long, global = true, env = "HSMD_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of text
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for each answer
    #[arg(long, global = true, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The daemon's state, version, uptime, backends and connection count
    #[command(after_help = "Example:\n  hsmctl status\n  hsmctl --json status")]
    Status,
    /// Who the daemon sees you as: uid, user, groups, and what you may do
    #[command(after_help = "Example:\n  hsmctl whoami")]
    Whoami,
    /// Round trips to the daemon, with their latency
    #[command(after_help = "Example:\n  hsmctl ping -c 10 --size 64")]
    Ping {
        /// How many round trips
        #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
        /// Bytes of payload echoed each time
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65_536))]
        size: u32,
    },
    /// Create the keystore: a new master key and its first unlock slot (a
    /// passphrase, or a new key file); leaves hsmd unlocked
    #[command(
        after_help = "Examples:\n  hsmctl init\n  hsmctl init --passphrase-file -  < pass.txt\n  hsmctl init --keyfile-out /etc/hsmd/unlock.key"
    )]
    Init {
        #[command(flatten)]
        secret: NewSecretArgs,
    },
    /// Unwrap the master key with a passphrase (asked without echo) or a key file
    #[command(
        after_help = "Examples:\n  hsmctl unlock\n  hsmctl unlock --keyfile /etc/hsmd/unlock.key\n  echo \"$PASS\" | hsmctl unlock --passphrase-file -"
    )]
    Unlock {
        /// Read the passphrase from this file (- for stdin); one trailing newline is dropped
        #[arg(long, value_name = "FILE", conflicts_with = "keyfile")]
        passphrase_file: Option<PathBuf>,
        /// Unlock with this 32-byte key file
        #[arg(long, value_name = "FILE")]
        keyfile: Option<PathBuf>,
        /// Unlock with the TPM2 slots (hsmd's TPM unseals them)
        #[arg(long, conflicts_with_all = ["passphrase_file", "keyfile"])]
        tpm2: bool,
        /// Unlock with the plugged-in FIDO2 authenticator (asks for a touch)
        #[arg(long, conflicts_with_all = ["passphrase_file", "keyfile", "tpm2"])]
        fido2: bool,
        /// With --fido2: the authenticator's PIN, from this file
        #[arg(long, value_name = "FILE", requires = "fido2")]
        fido2_pin_file: Option<PathBuf>,
    },
    /// Zeroize the master key and every unlocked key now (the panic button)
    Lock,
    /// Unlock slots: list, add, remove
    #[command(subcommand)]
    Slot(SlotCommand),
    /// Keys: create, list, info, public, rotate, set, disable, enable,
    /// deactivate, compromise, destroy, delete, restore, purge
    #[command(subcommand)]
    Key(KeyCommand),
    /// Backups: create, verify, restore
    #[command(subcommand)]
    Backup(BackupCommand),
    /// The policy: show it, or check what a user may do
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The audit log: verify its hash chain, show its events
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The daemon's Prometheus metrics (OpenMetrics text)
    Metrics,
    /// What security hardware this machine has (no daemon needed)
    #[command(subcommand)]
    Hardware(HardwareCommand),
    /// Key backends' settings kept in the keystore
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Print a shell completion script (no daemon needed)
    #[command(
        after_help = "Examples:\n  hsmctl completions bash > ~/.local/share/bash-completion/completions/hsmctl\n  \
        hsmctl completions zsh > ~/.zfunc/_hsmctl\n  hsmctl completions fish > ~/.config/fish/completions/hsmctl.fish\n\n\
        The packages install them system-wide."
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Write the man pages hsmctl.1 and hsmctl-COMMAND.1 into DIR (no daemon needed)
    #[command(
        long_flag = "generate-man",
        after_help = "Example:\n  hsmctl generate-man /tmp/man && man -l /tmp/man/hsmctl-sign.1\n\n\
        `hsmctl --generate-man DIR` is the same, spelled as hsmd spells it."
    )]
    GenerateMan {
        /// Where to write them
        dir: PathBuf,
    },
    /// The token file store: store, retrieve, list, info, delete
    #[command(subcommand)]
    File(FileCommand),
    /// Re-encrypt a file `hsmctl encrypt` wrote under the key's newest version;
    /// the plaintext never leaves hsmd
    #[command(after_help = "Example:\n  hsmctl rewrap backup -i db.dump.enc -o db.dump.enc2 --aad host=db1")]
    Rewrap {
        /// The key's name
        name: String,
        /// The encrypted file, armored or not (- for stdin)
        #[arg(short, long, value_name = "FILE", default_value = "-")]
        input: PathBuf,
        /// The re-encrypted file (- for stdout) [default: stdout, if not a terminal]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The associated data given to encrypt
        #[arg(long, default_value = "")]
        aad: String,
        /// Write the output armored (base64 between PEM-style lines)
        #[arg(short, long)]
        armor: bool,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
    },
    /// A fresh 256-bit data key, sealed by an aes256-gcm key (a file `hsmctl
    /// decrypt` opens), and in plain too only with --plaintext-out
    #[command(after_help = "Examples:\n  hsmctl datakey backup -o data.key.enc\n  \
        hsmctl datakey backup -o data.key.enc --plaintext-out /run/app/data.key   # if the key allows it")]
    Datakey {
        /// The key's name
        name: String,
        /// Where to write the sealed data key
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Also write the data key itself here (mode 0600); the key must allow it
        #[arg(long, value_name = "FILE")]
        plaintext_out: Option<PathBuf>,
        /// Associated data for the sealed data key
        #[arg(long, default_value = "")]
        aad: String,
        /// Replace the output files if they exist
        #[arg(long)]
        force: bool,
    },
    /// Sign a file (of any size: it is hashed here, hsmd signs the digest)
    #[command(
        after_help = "Signed bytes: Ed25519 signs SHA-512(file) (64 bytes) as its message; ECDSA\n\
        P-256 / P-384 sign SHA-256(file) / SHA-384(file) as usual (openssl dgst -verify).\n\
        The hsmd format is text already; a raw signature is binary, so it is not written to a\n\
        terminal unless -o - asks for it.\n\n\
        Examples:\n  hsmctl sign release -i app.tar.gz -o app.tar.gz.sig\n  \
        printf data | hsmctl sign release | hsmctl verify release -s - -i <(printf data)\n  \
        hsmctl sign release --format raw < data > sig"
    )]
    Sign {
        /// The key's name
        name: String,
        /// The file to sign (- for stdin)
        #[arg(short, long, value_name = "FILE", default_value = "-")]
        input: PathBuf,
        /// Where to write the signature (- for stdout) [default: stdout]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// hsmd: a self-describing text file (key, version, signature); raw: the bare
        /// signature (64 bytes for Ed25519, DER for ECDSA); ssh: an SSH signature as
        /// `ssh-keygen -Y sign` writes it (needs -n)
        #[arg(long, default_value = "hsmd", value_parser = ["hsmd", "raw", "ssh"])]
        format: String,
        /// What an SSH signature is for (`git`, `file`, …): a signature made for one
        /// namespace is not valid for another
        #[arg(short = 'n', long, value_name = "NAMESPACE")]
        namespace: Option<String>,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
    },
    /// Encrypt a file of any size with an aes256-gcm key (in 256 KiB chunks)
    #[command(
        after_help = "The output is binary unless --armor: it is not written to a terminal unless\n\
        -o - asks for it.\n\n\
        Examples:\n  hsmctl encrypt backup -i db.dump -o db.dump.enc --aad host=db1\n  \
        tar c dir | hsmctl encrypt backup --armor > dir.tar.enc.asc"
    )]
    Encrypt {
        /// The key's name
        name: String,
        /// The file (- for stdin)
        #[arg(short, long, value_name = "FILE", default_value = "-")]
        input: PathBuf,
        /// The encrypted file (- for stdout); written only when complete [default: stdout,
        /// if not a terminal]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Associated data: authenticated, not encrypted; decrypt needs the same
        #[arg(long, default_value = "")]
        aad: String,
        /// Write the output armored (base64 between PEM-style lines)
        #[arg(short, long)]
        armor: bool,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
    },
    /// Decrypt what `hsmctl encrypt` wrote (armored or not); the output appears
    /// only if every chunk checks
    #[command(
        after_help = "NAME may be left out: the file names its key (hsmd still checks that you may\n\
        use it). The plaintext is not written to a terminal unless -o - asks for it.\n\n\
        Examples:\n  hsmctl decrypt backup -i db.dump.enc -o db.dump --aad host=db1\n  \
        hsmctl decrypt < dir.tar.enc.asc | tar x"
    )]
    Decrypt {
        /// The key's name [default: the one the file names]
        name: Option<String>,
        /// The encrypted file (- for stdin)
        #[arg(short, long, value_name = "FILE", default_value = "-")]
        input: PathBuf,
        /// The decrypted file (- for stdout) [default: stdout, if not a terminal]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
        /// The associated data given to encrypt
        #[arg(long, default_value = "")]
        aad: String,
        /// Decrypt even though the key is compromised (logged at high risk)
        #[arg(long)]
        allow_compromised: bool,
    },
    /// HMAC-SHA-256 of a file (at most 768 KiB) with an hmac-sha256 key
    #[command(after_help = "Example:\n  hsmctl mac audit-mac -i record.json -o record.json.mac")]
    Mac {
        /// The key's name
        name: String,
        /// The data (- for stdin)
        #[arg(short, long, value_name = "FILE", default_value = "-")]
        input: PathBuf,
        /// The tag file (- for stdout): key, version and hex tag [default: stdout]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
    },
    /// Check an HMAC tag file; exit 0 when valid, 1 when not
    #[command(
        name = "mac-verify",
        after_help = "Example:\n  hsmctl mac-verify audit-mac -i record.json -t record.json.mac"
    )]
    MacVerify {
        /// The key's name
        name: String,
        /// The data (- for stdin)
        #[arg(short, long, value_name = "FILE", default_value = "-")]
        input: PathBuf,
        /// The tag file (- for stdin, if the data is not)
        #[arg(short, long, value_name = "FILE")]
        tag: PathBuf,
        /// Check even though the key is compromised (logged at high risk)
        #[arg(long)]
        allow_compromised: bool,
    },
    /// Check a signature; exit 0 when valid, 1 when not
    #[command(after_help = "Example:\n  hsmctl verify release -i app.tar.gz -s app.tar.gz.sig")]
    Verify {
        /// The key's name
        name: String,
        /// The signed file (- for stdin)
        #[arg(short, long, value_name = "FILE", default_value = "-")]
        input: PathBuf,
        /// The signature file (- for stdin, if the signed file is not)
        #[arg(short, long, value_name = "FILE")]
        signature: PathBuf,
        /// Format of the signature file (as for sign)
        #[arg(long, default_value = "hsmd", value_parser = ["hsmd", "raw", "ssh"])]
        format: String,
        /// The namespace an SSH signature must be for
        #[arg(short = 'n', long, value_name = "NAMESPACE")]
        namespace: Option<String>,
        /// Key version for a raw signature [default: the newest]
        #[arg(long, value_name = "N")]
        key_version: Option<u32>,
        /// Check even though the key is compromised (logged at high risk)
        #[arg(long)]
        allow_compromised: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// The policy file in force and its roles
    Show,
    /// Would USER be allowed ACTION on KEY, and by which role and binding?
    #[command(
        after_help = "ACTION is a key action (sign, decrypt, rotate, purge, …) or RESOURCE:ACTION\n\
        (keystore:unlock, audit:read, …).\n\n\
        Examples:\n  hsmctl policy check alice sign ci-release\n  hsmctl policy check 1001 keystore:backup"
    )]
    Check {
        /// A user name or uid
        user: String,
        /// The action
        action: String,
        /// The key, for key actions
        key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of every line against the keystore's record;
    /// names the first bad sequence number (exit 1)
    Verify,
    /// Show events, oldest first (a table, or with --json one array of the lines' objects)
    #[command(after_help = "Example:\n  hsmctl audit show --since 1d --event SIGN --user alice --key release")]
    Show {
        /// Only the last span (e.g. 7d, 12h)
        #[arg(long, value_name = "SPAN", value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Only this event type (SIGN, KEY_CREATED, ACCESS_DENIED, …)
        #[arg(long, value_name = "TYPE")]
        event: Option<String>,
        /// Only this user (name or uid)
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Only events about this key
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
        /// Only success or failure
        #[arg(long, value_parser = ["success", "failure"])]
        result: Option<String>,
        /// At most this many (the newest), and no more than 8 MiB of lines
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
    },
}

#[derive(Debug, clap::Args)]
struct NewSecretArgs {
    /// Read the passphrase from this file (- for stdin); one trailing newline is dropped
    #[arg(long, value_name = "FILE", conflicts_with = "keyfile_out")]
    passphrase_file: Option<PathBuf>,
    /// Use a key-file slot instead: write 32 random bytes to this new file (mode 0600)
    #[arg(long, value_name = "FILE")]
    keyfile_out: Option<PathBuf>,
    /// A label for the slot
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Debug, Subcommand)]
enum BackendCommand {
    /// The PKCS#11 backend
    #[command(subcommand)]
    Pkcs11(Pkcs11Command),
}

#[derive(Debug, Subcommand)]
enum Pkcs11Command {
    /// Seal the token's user PIN in the keystore (hsmd must be unlocked); hsmd
    /// hands it to the token now and at every unlock, so it is never in a file
    #[command(after_help = "Example:\n  hsmctl backend pkcs11 set-pin            # asks for it without echo")]
    SetPin {
        /// Read the PIN from this file (- for stdin) instead of asking
        #[arg(long, value_name = "FILE")]
        pin_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum HardwareCommand {
    /// List TPMs, PKCS#11 modules with their slots and tokens, and FIDO2/U2F authenticators
    #[command(
        after_help = "Examples:\n  hsmctl hardware scan\n  hsmctl --json hardware scan --tcti swtpm:host=127.0.0.1,port=2321"
    )]
    Scan {
        /// Also ask this TPM (a tss2 TCTI string) [env: TPM2TOOLS_TCTI]
        #[arg(long, value_name = "TCTI", env = "TPM2TOOLS_TCTI")]
        tcti: Option<String>,
        /// Also probe this PKCS#11 module (repeatable)
        #[arg(long, value_name = "PATH")]
        module: Vec<PathBuf>,
    },
    /// Internal: probe one PKCS#11 module and print JSON (run by `scan` in a child process)
    #[command(hide = true)]
    ProbeModule {
        /// The module
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum SlotCommand {
    /// List the unlock slots
    List,
    /// Add a slot (hsmd must be unlocked)
    #[command(
        after_help = "Examples:\n  hsmctl slot add --label backup\n  hsmctl slot add --keyfile-out /etc/hsmd/unlock.key --label boot\n  hsmctl slot add --tpm2 --pcrs 0,7 --label measured-boot"
    )]
    Add {
        #[command(flatten)]
        secret: NewSecretArgs,
        /// A TPM2 slot: hsmd seals a random secret in its TPM ([backends.tpm])
        #[arg(long, conflicts_with_all = ["passphrase_file", "keyfile_out"])]
        tpm2: bool,
        /// With --tpm2: bind the slot to these PCRs' current values (SHA-256 bank), e.g. 0,7
        #[arg(long, value_name = "LIST", value_delimiter = ',', requires = "tpm2")]
        pcrs: Vec<u8>,
        /// A FIDO2 slot: the plugged-in authenticator's hmac-secret (asks for a touch)
        #[arg(long, conflicts_with_all = ["passphrase_file", "keyfile_out", "tpm2"])]
        fido2: bool,
        /// With --fido2: the authenticator's PIN, from this file
        #[arg(long, value_name = "FILE", requires = "fido2")]
        fido2_pin_file: Option<PathBuf>,
    },
    /// Remove a slot (never the last; hsmd must be unlocked)
    Remove {
        /// The slot id, from `hsmctl slot list`
        id: u32,
    },
}

/// Puts SIGPIPE back to its default, as other Unix tools have it: when the
/// reader of hsmctl's output goes away (`hsmctl key list | head -1`), hsmctl
/// ends quietly instead of failing to print. Rust ignores the signal by
/// default; the connection to hsmd does not depend on that, since the client
/// writes to it with `MSG_NOSIGNAL`.
fn restore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called first in main, before any thread exists; SIG_DFL is no
    // handler function, so nothing can run in signal context.
    #[allow(unsafe_code)]
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (Failure::Quiet | Failure::Exit(_))) => ExitCode::from(e.exit_status()),
        Err(e) => {
            if cli.json {
                print_json(&e.to_json());
            } else {
                eprintln!("hsmctl: {e}");
            }
            ExitCode::from(e.exit_status())
        }
    }
}

/// A command line clap could not take. Under `--json` it is one JSON error
/// document like any other (code `usage`, exit 2); help and version are
/// printed as asked.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let asked_for_text = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if json && !asked_for_text {
        let message = e.render().to_string();
        let message = message.trim().trim_start_matches("error: ");
        print_json(&Local::Usage.fail(message).to_json());
        return ExitCode::from(2);
    }
    let _ = e.print();
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

fn connect(cli: &Cli) -> Result<Client, ClientError> {
    Client::connect_with(
        cli.socket.clone().unwrap_or_else(protocol::default_socket),
        &ClientOptions {
            client_name: concat!("hsmctl/", env!("CARGO_PKG_VERSION")).to_owned(),
            timeout: Some(Duration::from_secs(cli.timeout)),
        },
    )
}

fn run(cli: &Cli) -> Result<(), Failure> {
    if let Command::Backup(cmd) = &cli.command {
        return backup_cmd::run(cli, cmd);
    }
    match &cli.command {
        Command::Completions { shell } => {
            if cli.json {
                let mut script = Vec::new();
                clap_complete::generate(*shell, &mut Cli::command(), "hsmctl", &mut script);
                print_json(&json!({ "shell": shell.to_string(), "script": String::from_utf8_lossy(&script) }));
            } else {
                clap_complete::generate(*shell, &mut Cli::command(), "hsmctl", &mut std::io::stdout());
            }
            return Ok(());
        }
        Command::GenerateMan { dir } => {
            std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
                .map_err(|e| Local::File.fail(format!("cannot write the man pages into {}: {e}", dir.display())))?;
            let mut pages: Vec<String> = std::fs::read_dir(dir)
                .map_err(|e| Local::File.fail(format!("cannot list {}: {e}", dir.display())))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("hsmctl") && n.ends_with(".1"))
                .collect();
            pages.sort();
            if cli.json {
                print_json(&json!({ "dir": dir, "pages": pages }));
            } else {
                println!(
                    "wrote {} man pages into {} (read one with: man -l {}/hsmctl.1)",
                    pages.len(),
                    dir.display(),
                    dir.display()
                );
            }
            return Ok(());
        }
        _ => {}
    }
    if let Command::Hardware(cmd) = &cli.command {
        match cmd {
            HardwareCommand::Scan { tcti, module } => {
                let scan = hardware::scan(tcti.as_deref(), module);
                if cli.json {
                    print_json(&scan);
                } else {
                    hardware::print(&scan);
                }
            }
            HardwareCommand::ProbeModule { path } => print_json(&hardware::probe_module(path)),
        }
        return Ok(());
    }
    if let Command::Unlock {
        passphrase_file: None,
        keyfile: None,
        tpm2: false,
        fido2: false,
        ..
    } = &cli.command
    {
        passphrase_slot_exists(cli)?;
    }
    // Secrets are gathered before connecting, so a slow typist holds no connection.
    let prepared = prepare_secret(&cli.command)?;
    let mut client = connect(cli)?;
    match &cli.command {
        Command::Status => {
            let s = client.status()?;
            if cli.json {
                print_json(&s);
            } else {
                print_status(&s);
            }
            // As `vault status` does: scripts can test for usable keys.
            if s.state != protocol::ServiceState::Unlocked {
                return Err(Failure::Exit(2));
            }
        }
        Command::Whoami => {
            let p = client.whoami()?;
            if cli.json {
                print_json(&p);
            } else {
                print_whoami(&p);
            }
        }
        Command::Ping { count, size } => {
            let payload = vec![0xa5u8; *size as usize];
            let mut samples = Vec::with_capacity(*count as usize);
            for _ in 0..*count {
                let started = Instant::now();
                let echoed = client.ping(payload.clone())?;
                samples.push(started.elapsed());
                if echoed != payload {
                    return Err(ClientError::UnexpectedReply {
                        expected: "the same payload",
                        got: "a different payload",
                    }
                    .into());
                }
            }
            print_ping(cli.json, client.server().daemon_version.as_str(), &samples);
        }
        Command::Init { .. } | Command::Slot(SlotCommand::Add { .. }) => {
            let Some(Prepared::NewSlot(slot, created)) = prepared else {
                return Err(Local::Internal.fail("no slot prepared"));
            };
            let adding = matches!(cli.command, Command::Slot(_));
            let result = if adding {
                client.slot_add(slot)
            } else {
                client.init(slot)
            };
            if result.is_err() {
                // A key file the daemon did not take would only mislead.
                if let Some(path) = &created {
                    let _ = std::fs::remove_file(path);
                }
            }
            let id = result?;
            if cli.json {
                println!("{}", json!({ "slot": id, "keyfile": created }));
            } else if adding {
                println!("added unlock slot {id}");
            } else {
                println!("initialized: unlock slot {id} created; hsmd is unlocked");
            }
            if let (Some(path), false) = (&created, cli.json) {
                println!("key file: {} (keep it safe: it unlocks hsmd)", path.display());
            }
        }
        Command::Unlock { .. } => {
            let secret = match prepared {
                Some(Prepared::Unlock(secret)) => secret,
                Some(Prepared::UnlockFido2(mut auth, pin)) => {
                    let slots = client.slot_list()?;
                    let (credential_id, secret) =
                        fido2::unlock_secret(auth.as_mut(), &slots, pin.as_deref().map(String::as_str))
                            .map_err(|e| Local::Authenticator.fail(e))?;
                    UnlockSecret::Fido2 { credential_id, secret }
                }
                _ => return Err(Local::Internal.fail("no secret prepared")),
            };
            let protocol::calls::Unlocked { slot, warnings } = client.unlock(secret)?;
            if cli.json {
                println!("{}", json!({ "state": "unlocked", "slot": slot, "warnings": warnings }));
            } else {
                println!("unlocked (slot {slot})");
                for w in &warnings {
                    eprintln!("hsmctl: warning: {w}");
                }
            }
        }
        Command::Lock => {
            client.lock()?;
            if cli.json {
                println!("{}", json!({ "state": "locked" }));
            } else {
                println!("locked: the master key is zeroized");
            }
        }
        Command::Key(cmd) => key_cmd::run(cli.json, &mut client, cmd)?,
        Command::Backend(BackendCommand::Pkcs11(Pkcs11Command::SetPin { .. })) => {
            let Some(Prepared::Pin(pin)) = prepared else {
                return Err(Local::Internal.fail("no PIN prepared"));
            };
            let backend = client.backend_set_pin("pkcs11".into(), pin)?;
            if cli.json {
                println!("{}", json!({ "backend": backend, "pin": "sealed" }));
            } else {
                println!("the {backend} PIN is sealed in the keystore and handed to the token");
            }
        }
        Command::Backup(_) | Command::Hardware(_) | Command::Completions { .. } | Command::GenerateMan { .. } => {
            return Err(Local::Internal.fail("backup, hardware, completions and man pages are handled above"))
        }
        Command::File(cmd) => file_cmd::run(cli.json, &mut client, cmd)?,
        Command::Metrics => {
            let text = client.metrics()?;
            if cli.json {
                print_json(&json!({ "format": "openmetrics-text", "text": text }));
            } else {
                print!("{text}");
            }
        }
        Command::Audit(AuditCommand::Verify) => {
            let protocol::calls::AuditVerified {
                lines,
                first_seq,
                last_seq,
                files,
                recoveries,
            } = client.audit_verify()?;
            {
                if cli.json {
                    println!(
                        "{}",
                        json!({ "valid": true, "lines": lines, "first_seq": first_seq, "last_seq": last_seq,
                                "files": files, "recoveries": recoveries })
                    );
                } else {
                    println!(
                        "audit log intact: {lines} lines, seq {first_seq} to {last_seq}, in {} file{}",
                        files.len(),
                        if files.len() == 1 { "" } else { "s" }
                    );
                    if !recoveries.is_empty() {
                        println!(
                            "recovered at start {} time{} (not tampering):",
                            recoveries.len(),
                            if recoveries.len() == 1 { "" } else { "s" }
                        );
                        for r in &recoveries {
                            println!("  {r}");
                        }
                    }
                }
            }
        }
        Command::Audit(AuditCommand::Show {
            since,
            event,
            user,
            key,
            result,
            limit,
        }) => {
            let lines = client.audit_show(
                since.map(|d| d.as_secs()),
                event.clone(),
                user.clone(),
                key.clone(),
                result.clone(),
                *limit,
            )?;
            print_audit(cli.json, &lines)?;
        }
        Command::Policy(PolicyCommand::Show) => {
            let protocol::calls::PolicyText { source, text, roles } = client.policy_show()?;
            if cli.json {
                println!("{}", json!({ "source": source, "roles": roles, "text": text }));
            } else {
                println!("policy: {source}\nroles:  {}", roles.join(", "));
                if !text.is_empty() {
                    println!("\n{text}");
                }
            }
        }
        Command::Policy(PolicyCommand::Check { user, action, key }) => {
            let (resource, action) = match action.split_once(':') {
                Some((r, a)) => (r.to_owned(), a.to_owned()),
                None => ("keys".to_owned(), action.clone()),
            };
            let protocol::calls::PolicyDecision { allowed, reason } =
                client.policy_check(user.clone(), resource, action, key.clone())?;
            if cli.json {
                println!("{}", json!({ "allowed": allowed, "reason": reason }));
            } else {
                println!("{}: {reason}", if allowed { "ALLOWED" } else { "DENIED" });
            }
            if !allowed {
                return Err(Failure::Quiet);
            }
        }
        Command::Rewrap {
            name,
            input,
            output,
            aad,
            armor,
            force,
        } => {
            let dest = sealing_dest(cli.json, output.as_deref(), *force, *armor)?;
            let done = sealing::rewrap(&mut client, name, input, dest, aad.as_bytes())?;
            let to = done.to_version.unwrap_or(done.version);
            if cli.json {
                print_json(&json!({ "key": name, "from_version": done.version, "to_version": to,
                                    "chunks": done.chunks, "output": output }));
            } else {
                eprintln!(
                    "rewrapped {} from version {} to version {to} of key {name}",
                    input.display(),
                    done.version
                );
            }
        }
        Command::Datakey {
            name,
            output,
            plaintext_out,
            aad,
            force,
        } => {
            let dest = sealing_dest(cli.json, Some(output), *force, false)?;
            let version = sealing::datakey(&mut client, name, dest, plaintext_out.as_deref(), aad.as_bytes())?;
            if cli.json {
                println!(
                    "{}",
                    json!({ "key": name, "version": version, "sealed": output, "plaintext": plaintext_out })
                );
            } else {
                println!(
                    "data key sealed by key {name} version {version}: {}{}",
                    output.display(),
                    plaintext_out
                        .as_ref()
                        .map_or_else(String::new, |p| format!("; in plain: {}", p.display()))
                );
            }
        }
        Command::Encrypt {
            name,
            input,
            output,
            aad,
            armor,
            force,
        } => {
            let dest = sealing_dest(cli.json, output.as_deref(), *force, *armor)?;
            let done = sealing::encrypt(&mut client, name, input, dest, aad.as_bytes())?;
            if cli.json {
                print_json(
                    &json!({ "key": done.key, "version": done.version, "plaintext_bytes": done.plaintext_bytes,
                                    "chunks": done.chunks, "armor": armor, "output": output }),
                );
            }
        }
        Command::Decrypt {
            name,
            input,
            output,
            aad,
            allow_compromised,
            force,
        } => {
            let dest = sealing_dest(cli.json, output.as_deref(), *force, false)?;
            let done = sealing::decrypt(
                &mut client,
                name.as_deref(),
                input,
                dest,
                aad.as_bytes(),
                *allow_compromised,
            )?;
            if cli.json {
                print_json(
                    &json!({ "key": done.key, "version": done.version, "plaintext_bytes": done.plaintext_bytes,
                                    "chunks": done.chunks, "output": output }),
                );
            }
        }
        Command::Mac {
            name,
            input,
            output,
            force,
        } => {
            output::not_the_input(input, output.as_deref().unwrap_or(Path::new("-")))?;
            let mut out = open_unless_json(cli.json, output.as_deref(), *force, false)?;
            let data = sealing::read_mac_input(input)?;
            let protocol::calls::Tagged { version, tag } = client.mac(name.clone(), data)?;
            if let Some(out) = out.as_mut() {
                out.write(protocol::formats::tag::write(name, version, &tag).as_bytes())?;
            }
            if let Some(out) = out {
                out.finish()?;
            }
            if cli.json {
                print_json(&json!({ "key": name, "version": version, "tag": hex::encode(&tag),
                                    "output": output.as_ref().filter(|p| !output::is_stdout(Some(p))) }));
            }
        }
        Command::MacVerify {
            name,
            input,
            tag,
            allow_compromised,
        } => {
            let text = read_small(input, tag, "tag")?;
            let protocol::formats::tag::TagFile {
                key: signer,
                version,
                tag,
            } = protocol::formats::tag::parse(&String::from_utf8_lossy(&text))
                .map_err(|e| Local::Input.fail(format!("{}: {e}", tag.display())))?;
            if signer != *name {
                return Err(Local::Input.fail(format!("the tag was made by key {signer:?}, not {name:?}")));
            }
            let data = sealing::read_mac_input(input)?;
            if !client.mac_verify(name.clone(), version, data, tag, *allow_compromised)? {
                let e = Local::InvalidTag.fail(format!("tag INVALID for key {name} version {version}"));
                return Err(invalid(cli.json, e, name, version));
            }
            if cli.json {
                print_json(&json!({ "valid": true, "key": name, "version": version }));
            } else {
                println!("tag valid (key {name}, version {version})");
            }
        }
        Command::Sign {
            name,
            input,
            output,
            format,
            namespace,
            force,
        } => {
            let namespace = ssh_namespace(format, namespace.as_deref())?;
            output::not_the_input(input, output.as_deref().unwrap_or(Path::new("-")))?;
            let mut out = open_unless_json(cli.json, output.as_deref(), *force, format == "raw")?;
            let key = keys::info(&mut client, name)?;
            let (protocol::calls::Signed { version, signature }, ssh) = match namespace {
                Some(ns) => {
                    let public = keys::openssh_public(&mut client, name)?;
                    let hash = sshsig::FileHash {
                        algorithm: sshsig::HASH,
                        digest: keys::digest_file(protocol::KeyType::Ed25519, input)?,
                    };
                    let blob = sshsig::signed_data(ns, &hash).map_err(|e| Local::Input.fail(e.to_string()))?;
                    let signed = client.sign_message(name.clone(), blob, None)?;
                    let text = sshsig::armor(&public, key.key_type, ns, &hash, &signed.signature, None)
                        .map_err(|e| Local::Input.fail(e.to_string()))?;
                    (signed, Some(text))
                }
                None => (
                    client.sign(name.clone(), keys::digest_file(key.key_type, input)?)?,
                    None,
                ),
            };
            if cli.json {
                print_json(
                    &json!({ "key": name, "version": version, "type": key.key_type.as_str(), "format": format,
                                    "signature": base64::engine::general_purpose::STANDARD.encode(&signature),
                                    "output": output.as_ref().filter(|p| !output::is_stdout(Some(p))) }),
                );
            }
            if let Some(mut out) = out.take() {
                if let Some(text) = &ssh {
                    out.write(text.as_bytes())?;
                } else if format == "raw" {
                    out.write(&signature)?;
                } else {
                    out.write(protocol::formats::signature::write(name, version, key.key_type, &signature).as_bytes())?;
                }
                out.finish()?;
            }
        }
        Command::Verify {
            name,
            input,
            signature,
            format,
            namespace,
            key_version,
            allow_compromised,
        } => {
            let namespace = ssh_namespace(format, namespace.as_deref())?;
            let key = keys::info(&mut client, name)?;
            let raw = read_small(input, signature, "signature")?;
            let (version, valid) = if let Some(ns) = namespace {
                let public = keys::openssh_public(&mut client, name)?;
                let parsed = sshsig::parse(&String::from_utf8_lossy(&raw), &public, key.key_type, ns)
                    .map_err(|e| Local::Input.fail(format!("{}: {e}", signature.display())))?;
                // The file hashed as the signature says: SHA-512 or SHA-256.
                let as_type = if parsed.hash_algorithm == "sha256" {
                    protocol::KeyType::EcdsaP256
                } else {
                    protocol::KeyType::Ed25519
                };
                let hash = sshsig::FileHash {
                    algorithm: parsed.hash_algorithm,
                    digest: keys::digest_file(as_type, input)?,
                };
                let blob = sshsig::signed_data(ns, &hash).map_err(|e| Local::Input.fail(e.to_string()))?;
                // An SSH signature names no version: the newest is checked.
                let valid = client.verify_message(
                    name.clone(),
                    key.version,
                    blob,
                    parsed.message_hash,
                    parsed.signature,
                    *allow_compromised,
                )?;
                (key.version, valid)
            } else {
                let (version, sig) = if format == "raw" {
                    (key_version.unwrap_or(key.version), raw)
                } else {
                    let protocol::formats::signature::SignatureFile {
                        key: signer,
                        version,
                        signature: sig,
                    } = protocol::formats::signature::parse(&String::from_utf8_lossy(&raw))
                        .map_err(|e| Local::Input.fail(format!("{}: {e}", signature.display())))?;
                    if signer != *name {
                        return Err(
                            Local::Input.fail(format!("the signature was made by key {signer:?}, not {name:?}"))
                        );
                    }
                    (version, sig)
                };
                let digest = keys::digest_file(key.key_type, input)?;
                (
                    version,
                    client.verify(name.clone(), version, digest, sig, *allow_compromised)?,
                )
            };
            if !valid {
                let e = Local::InvalidSignature.fail(format!("signature INVALID for key {name} version {version}"));
                return Err(invalid(cli.json, e, name, version));
            }
            if cli.json {
                println!("{}", json!({ "valid": true, "key": name, "version": version }));
            } else {
                println!("signature valid (key {name}, version {version})");
            }
        }
        Command::Slot(SlotCommand::List) => print_slots(cli.json, &client.slot_list()?),
        Command::Slot(SlotCommand::Remove { id }) => {
            let slot = client.slot_remove(*id)?;
            if cli.json {
                println!("{}", json!({ "removed": slot }));
            } else {
                println!("removed unlock slot {slot}");
            }
        }
    }
    Ok(())
}

/// The namespace of an SSH signature: required with `--format ssh`, refused
/// with the other formats (they have none).
fn ssh_namespace<'a>(format: &str, namespace: Option<&'a str>) -> Result<Option<&'a str>, Failure> {
    match (format, namespace) {
        ("ssh", Some(ns)) if !ns.is_empty() => Ok(Some(ns)),
        ("ssh", _) => {
            Err(Local::Usage
                .fail("an SSH signature needs a namespace: -n NAMESPACE (git for git commits, file for files)"))
        }
        (_, Some(_)) => Err(Local::Usage.fail("-n NAMESPACE is for --format ssh only")),
        (_, None) => Ok(None),
    }
}

/// Before asking for a passphrase to unlock with, checks that a passphrase
/// could unlock at all: a keystore with only key-file, TPM2 or FIDO2 slots is
/// told so, with the flag that fits. If the slot list cannot be read, the
/// daemon's answer to the unlock says what is wrong instead.
fn passphrase_slot_exists(cli: &Cli) -> Result<(), Failure> {
    let Ok(Ok(slots)) = connect(cli).map(|mut c| c.slot_list()) else {
        return Ok(());
    };
    if slots.is_empty() || slots.iter().any(|s| s.kind == "passphrase") {
        return Ok(());
    }
    let mut kinds: Vec<&str> = slots.iter().map(|s| s.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let flags: Vec<&str> = kinds
        .iter()
        .filter_map(|k| match *k {
            "keyfile" => Some("--keyfile FILE"),
            "tpm2" => Some("--tpm2"),
            "fido2" => Some("--fido2"),
            _ => None,
        })
        .collect();
    Err(Local::Usage.fail(format!(
        "this keystore has no passphrase slot (its slots are {}); unlock with {}",
        kinds.join(", "),
        flags.join(" or ")
    )))
}

/// A secret read (or a key file made) before connecting.
enum Prepared {
    NewSlot(NewSlot, Option<PathBuf>),
    Unlock(UnlockSecret),
    /// The authenticator is found before connecting; its credentials come
    /// from the daemon's slot list.
    UnlockFido2(Box<dyn fido2::Authenticator>, Option<zeroize::Zeroizing<String>>),
    Pin(protocol::SecretBytes),
}

/// A FIDO2 PIN from its file, if one was named.
fn fido2_pin(path: Option<&std::path::Path>) -> Result<Option<zeroize::Zeroizing<String>>, Failure> {
    let Some(path) = path else { return Ok(None) };
    let pin = secrets::passphrase(Some(path), "").map_err(|e| Local::Secret.fail(e))?;
    let pin = String::from_utf8(pin.expose().to_vec())
        .map_err(|_| Local::Secret.fail(format!("{}: a FIDO2 PIN is UTF-8 text", path.display())))?;
    Ok(Some(zeroize::Zeroizing::new(pin)))
}

fn prepare_secret(command: &Command) -> Result<Option<Prepared>, Failure> {
    let new_slot = |args: &NewSecretArgs| -> Result<Prepared, Failure> {
        let label = args.label.clone();
        if let Some(path) = &args.keyfile_out {
            let key = secrets::create_keyfile(path).map_err(|e| Local::File.fail(e))?;
            return Ok(Prepared::NewSlot(NewSlot::Keyfile { label, key }, Some(path.clone())));
        }
        let passphrase = secrets::new_passphrase(args.passphrase_file.as_deref()).map_err(|e| Local::Secret.fail(e))?;
        Ok(Prepared::NewSlot(NewSlot::Passphrase { label, passphrase }, None))
    };
    Ok(match command {
        Command::Backend(BackendCommand::Pkcs11(Pkcs11Command::SetPin { pin_file })) => Some(Prepared::Pin(
            secrets::passphrase(pin_file.as_deref(), "Token user PIN: ").map_err(|e| Local::Secret.fail(e))?,
        )),
        Command::Slot(SlotCommand::Add {
            secret,
            fido2: true,
            fido2_pin_file,
            ..
        }) => {
            let pin = fido2_pin(fido2_pin_file.as_deref())?;
            let mut auth = fido2::open().map_err(|e| Local::Authenticator.fail(e))?;
            let e = fido2::enrol(auth.as_mut(), pin.as_deref().map(String::as_str))
                .map_err(|e| Local::Authenticator.fail(e))?;
            Some(Prepared::NewSlot(
                NewSlot::Fido2 {
                    label: secret.label.clone(),
                    challenge: e.challenge,
                    secret: e.secret,
                },
                None,
            ))
        }
        Command::Slot(SlotCommand::Add {
            secret,
            tpm2: true,
            pcrs,
            ..
        }) => Some(Prepared::NewSlot(
            NewSlot::Tpm2 {
                label: secret.label.clone(),
                pcrs: pcrs.clone(),
            },
            None,
        )),
        Command::Init { secret } | Command::Slot(SlotCommand::Add { secret, .. }) => Some(new_slot(secret)?),
        Command::Unlock {
            fido2: true,
            fido2_pin_file,
            ..
        } => {
            let pin = fido2_pin(fido2_pin_file.as_deref())?;
            Some(Prepared::UnlockFido2(
                fido2::open().map_err(|e| Local::Authenticator.fail(e))?,
                pin,
            ))
        }
        Command::Unlock {
            passphrase_file,
            keyfile,
            tpm2,
            ..
        } => Some(Prepared::Unlock(match keyfile {
            _ if *tpm2 => UnlockSecret::Tpm2,
            Some(path) => UnlockSecret::Keyfile(secrets::read_keyfile(path).map_err(|e| Local::Secret.fail(e))?),
            None => UnlockSecret::Passphrase(
                secrets::passphrase(passphrase_file.as_deref(), "Passphrase: ").map_err(|e| Local::Secret.fail(e))?,
            ),
        })),
        _ => None,
    })
}

/// The destination of an encrypt, decrypt, rewrap or datakey. Their output
/// may be any size, so under `--json` (whose document is standard output) it
/// must go to a file.
fn sealing_dest(json: bool, path: Option<&Path>, force: bool, armor: bool) -> Result<sealing::Dest<'_>, Failure> {
    if json && output::is_stdout(path) {
        return Err(
            Local::Usage.fail("with --json, standard output carries the JSON summary; write the data with -o FILE")
        );
    }
    Ok(sealing::Dest { path, force, armor })
}

/// The output of `sign` or `mac`, opened before hsmd is asked (a refused
/// output costs no signature); none under `--json` to standard output, where
/// the JSON document carries the result.
fn open_unless_json(
    json: bool,
    path: Option<&Path>,
    force: bool,
    binary: bool,
) -> Result<Option<output::Output>, Failure> {
    if json && output::is_stdout(path) {
        return Ok(None);
    }
    output::Output::open(path, force, binary).map(Some)
}

/// A signature or tag file (at most 64 KiB; `-` is standard input, unless
/// the signed data comes from there).
fn read_small(data: &Path, path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    use std::io::Read as _;
    const MAX: u64 = 64 * 1024;
    let stdin = Path::new("-");
    if path == stdin && data == stdin {
        return Err(Local::Usage.fail(format!(
            "the data and the {what} cannot both come from standard input; name one with -i or the {what} option"
        )));
    }
    let mut bytes = Vec::new();
    let read = if path == stdin {
        std::io::stdin().lock().take(MAX + 1).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| Local::File.fail(format!("cannot read the {what} file {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX {
        return Err(Local::Input.fail(format!(
            "{} is larger than {MAX} bytes: it is not a {what} file",
            path.display()
        )));
    }
    Ok(bytes)
}

/// A signature or tag that does not verify: under `--json` one document
/// with the verdict and the error, exit 1.
fn invalid(json: bool, e: Failure, key: &str, version: u32) -> Failure {
    if !json {
        return e;
    }
    let mut doc = e.to_json();
    doc["valid"] = json!(false);
    doc["key"] = json!(key);
    doc["version"] = json!(version);
    print_json(&doc);
    Failure::Quiet
}

fn print_slots(json: bool, slots: &[SlotInfo]) {
    if json {
        print_json(&slots);
        return;
    }
    let rows = slots
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.kind.clone(),
                s.kdf.clone().unwrap_or_else(|| "-".into()),
                key_cmd::time(s.created_unix),
                s.label.clone(),
            ]
        })
        .collect();
    table::print(&["id", "kind", "kdf", "created", "label"], rows, &[0]);
}

fn print_audit(json: bool, lines: &[String]) -> Result<(), Failure> {
    if json {
        let events = lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Local::Internal.fail(format!("hsmd sent an audit line that is not JSON: {e}")))?;
        print_json(&events);
        return Ok(());
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let rows = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let user = v["user"]
                .as_str()
                .map_or_else(|| format!("uid {}", v["uid"]), str::to_owned);
            vec![
                v["seq"].to_string(),
                text(&v["timestamp"]),
                text(&v["event_type"]),
                user,
                text(&v["resource"]),
                text(&v["result"]),
                v["risk_score"].to_string(),
            ]
        })
        .collect();
    table::print(
        &["seq", "time", "event", "user", "resource", "result", "risk"],
        rows,
        &[0, 6],
    );
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("hsmctl: cannot format JSON: {e}"),
    }
}

fn print_status(s: &StatusInfo) {
    println!("state:        {}", s.state.as_str());
    println!(
        "version:      hsmd {} (protocol {})",
        s.daemon_version, s.protocol_version
    );
    println!("uptime:       {}", format_duration(s.uptime_secs));
    for (i, b) in s.backends.iter().enumerate() {
        println!(
            "{:<14}{:<8} {:<9} {}",
            if i == 0 { "backends:" } else { "" },
            b.name,
            if b.healthy { "ok" } else { "UNHEALTHY" },
            b.detail
        );
    }
    println!(
        "audit:        {}",
        match &s.audit {
            a if !a.enabled => "off (audit.enabled = false)".to_owned(),
            a if a.healthy => format!("ok, {} lines written, {} waiting", a.last_seq, a.pending_events),
            a => format!("FAILING: {}", a.detail),
        }
    );
    println!("connections:  {} of {}", s.connections, s.max_connections);
    println!("in flight:    {}", s.requests_in_flight);
    println!(
        "mode:         {}",
        if s.dev_mode {
            "dev (throw-away, not for production)".to_owned()
        } else {
            format!("{} profile", s.profile.as_str())
        }
    );
    println!(
        "memory:       {}",
        if s.memory_locked {
            "locked (never swapped)"
        } else {
            "NOT locked: keys could reach swap (see the daemon's log)"
        }
    );
    println!("pid:          {}", s.pid);
}

fn group_label(g: &GroupInfo) -> String {
    match &g.name {
        Some(n) => format!("{} ({n})", g.gid),
        None => g.gid.to_string(),
    }
}

fn print_whoami(p: &PeerInfo) {
    let user = p.user.as_deref().map_or_else(String::new, |u| format!(" ({u})"));
    println!("uid:          {}{user}", p.uid);
    println!("group:        {}", group_label(&p.group));
    println!(
        "groups:       {}",
        p.groups.iter().map(group_label).collect::<Vec<_>>().join(", ")
    );
    println!("pid:          {}", p.pid);
    println!("executable:   {}", p.executable.as_deref().unwrap_or("unknown"));
    println!("admitted:     {}", p.admitted_because);
    println!(
        "roles:        {}",
        if p.roles.is_empty() {
            "none: no binding in the policy names you or your groups".to_owned()
        } else {
            p.roles.join(", ")
        }
    );
    for (i, perm) in p.permissions.iter().enumerate() {
        println!("{}{perm}", if i == 0 { "permissions:  " } else { "              " });
    }
    println!("connection:   {}", p.connection_id);
}

fn print_ping(json: bool, version: &str, samples: &[Duration]) {
    let micros: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let min = micros.iter().copied().fold(f64::INFINITY, f64::min);
    let max = micros.iter().copied().fold(0.0, f64::max);
    let avg = micros.iter().sum::<f64>() / micros.len() as f64;
    if json {
        println!(
            "{}",
            json!({"round_trips": micros.len(), "min_us": min, "avg_us": avg, "max_us": max, "daemon_version": version})
        );
    } else {
        println!(
            "pong from hsmd {version}: {} round trip{}, latency min {min:.0} µs, avg {avg:.0} µs, max {max:.0} µs",
            micros.len(),
            if micros.len() == 1 { "" } else { "s" }
        );
    }
}

fn format_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}
