use std::{io::Write as _, path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, ValueEnum};
use hsmd::{
    config::LogFormat,
    daemon::{self, Options},
};

/// The local hardware security module daemon: holds keys in locked memory and
/// performs key operations for local programs over a permission-checked Unix socket.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  \
    hsmd --dev > hsmd.env &           # a throw-away instance; it writes its HSMD_SOCKET line there\n  \
    . ./hsmd.env                      # once it is listening (the file is not empty)\n  \
    hsmd --config /etc/hsmd/hsmd.toml\n  \
    hsmd --user                       # your own daemon, as ssh-agent: systemctl --user enable --now hsmd.socket\n  \
    hsmd --check-config --config ./hsmd.toml\n  \
    hsmd --generate-man /tmp/man && man -l /tmp/man/hsmd.8"
)]
struct Cli {
    /// Configuration file [default: /etc/hsmd/hsmd.toml if it exists, else built-in defaults]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit (0 valid, 1 invalid)
    #[arg(long)]
    check_config: bool,
    /// Start a throw-away instance: state in a fresh temp dir, serves only you and root
    #[arg(long)]
    dev: bool,
    /// Run as one person's own daemon, as ssh-agent runs: state in
    /// $XDG_DATA_HOME/hsmd, sockets (hsmd and SSH agent) in
    /// $XDG_RUNTIME_DIR/hsmd/, config from $XDG_CONFIG_HOME/hsmd/hsmd.toml if
    /// it exists; serves only your uid
    #[arg(long, conflicts_with = "dev")]
    user: bool,
    /// Override state_dir
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Override socket.path
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Override log.format
    #[arg(long, value_enum)]
    log_format: Option<CliLogFormat>,
    /// Internal: run as the PKCS#11 helper process hsmd spawns itself
    #[arg(long, hide = true)]
    pkcs11_helper: bool,
    /// Write the man pages hsmd.8 and hsmd.toml.5 into DIR and exit
    #[arg(long, value_name = "DIR")]
    generate_man: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CliLogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    hsmd::secure_mem::bound_allocator();
    let cli = Cli::parse();
    if cli.pkcs11_helper {
        return hsmd::backend::pkcs11::helper::run();
    }
    if let Some(dir) = &cli.generate_man {
        return match hsmd::manpage::generate(Cli::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hsmd: cannot write the man pages into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let opts = Options {
        config: cli.config,
        dev: cli.dev,
        user: cli.user,
        state_dir: cli.state_dir,
        socket: cli.socket,
        log_format: cli.log_format.map(|f| match f {
            CliLogFormat::Text => LogFormat::Text,
            CliLogFormat::Json => LogFormat::Json,
        }),
    };
    let result = if cli.check_config {
        daemon::check_config(&opts).map(|lines| {
            let mut out = std::io::stdout().lock();
            for line in lines {
                // A closed stdout (`| head`) is not an error of the config.
                let _ = writeln!(out, "{line}");
            }
        })
    } else {
        daemon::run(&opts)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each message already names its cause; printing the chain would
            // repeat it. Through the log's queue: a broken stderr must not
            // turn this exit into a panic.
            hsmd::logging::print(&format!("hsmd: {e}"));
            hsmd::logging::flush(std::time::Duration::from_secs(1));
            ExitCode::FAILURE
        }
    }
}
