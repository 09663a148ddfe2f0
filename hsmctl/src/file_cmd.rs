//! `hsmctl file …`: the token file store. Files travel as chunks over the
//! socket; hsmd seals and keeps them, and the file key never leaves it.

use std::{
    io,
    path::{Path, PathBuf},
};

use clap::Subcommand;
use protocol::{Client, ClientError, FileInfo, Operation, Reply, SecretBytes};
use serde_json::json;

use crate::{print_json, sealing, Failure};

#[derive(Debug, Subcommand)]
pub enum FileCommand {
    /// Store a file (or stdin with - and --name); prints its token
    #[command(after_help = "Examples:\n  hsmctl file store report.pdf\n  \
        hsmctl file store --key team-files --chunk-size 1MiB big.iso\n  \
        tar c dir | hsmctl file store - --name dir.tar")]
    Store {
        /// The file (- for stdin)
        path: PathBuf,
        /// The aes256-gcm key that wraps the file's key
        #[arg(long, default_value = "files")]
        key: String,
        /// Plaintext per chunk (4KiB to 8MiB)
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        chunk_size: u32,
        /// The name to keep (default: the file's own name; required for stdin)
        #[arg(long)]
        name: Option<String>,
    },
    /// Restore a stored file: into OUTDIR under its original name, or to -o FILE (- for stdout)
    #[command(
        after_help = "Examples:\n  hsmctl file retrieve 0f8fad5b-d9cb-469f-a165-70867728950e ./restored\n  \
        hsmctl file retrieve 0f8fad5b-d9cb-469f-a165-70867728950e -o - | sha256sum"
    )]
    Retrieve {
        /// The token `file store` printed
        token: String,
        /// The directory to restore into
        outdir: Option<PathBuf>,
        /// Write here instead (- for stdout); appears only when every chunk checked
        #[arg(short, long, value_name = "FILE", conflicts_with = "outdir")]
        output: Option<PathBuf>,
    },
    /// Stored files: token, name, size, stored at, key, owner
    List,
    /// One stored file's metadata
    Info {
        /// The token
        token: String,
    },
    /// Wipe and remove a stored file
    Delete {
        /// The token
        token: String,
    },
}

fn parse_size(s: &str) -> Result<u32, String> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("mib") {
        (n, 1024 * 1024)
    } else if let Some(n) = lower.strip_suffix("kib") {
        (n, 1024)
    } else {
        (lower.as_str(), 1)
    };
    num.trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size like 64KiB, 1MiB or 65536"))
}

fn unexpected(expected: &'static str, got: &Reply) -> Failure {
    ClientError::UnexpectedReply {
        expected,
        got: got.name(),
    }
    .into()
}

fn local(msg: String) -> Failure {
    Failure::Local(msg)
}

fn print_info(json: bool, f: &FileInfo) {
    if json {
        print_json(f);
        return;
    }
    println!("token:      {}", f.token);
    println!("name:       {}", f.name);
    println!(
        "size:       {} bytes in {} chunks of {}",
        f.size, f.chunks, f.chunk_size
    );
    println!("stored:     {}", crate::key_cmd::time(f.stored_unix));
    println!("key:        {} (version {})", f.key, f.key_version);
    println!("owner:      uid {}", f.owner_uid);
    println!("checksum:   sha256 of chunk sha256s {}", f.checksum);
}

fn store(
    client: &mut Client,
    json: bool,
    path: &Path,
    key: &str,
    chunk_size: u32,
    name: Option<&str>,
) -> Result<(), Failure> {
    let name = match (name, path == Path::new("-")) {
        (Some(n), _) => n.to_owned(),
        (None, true) => return Err(local("storing stdin needs --name".into())),
        (None, false) => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| local(format!("{} has no file name; give --name", path.display())))?,
    };
    let mut input = sealing::open_input(path)?;
    let (session, info) = match client.call(Operation::FileStoreBegin {
        name,
        key: key.to_owned(),
        chunk_size,
    })? {
        Reply::FileSession { session, info } => (session, info),
        other => return Err(unexpected("file-store-begin", &other)),
    };
    let size = chunk_size as usize;
    let mut current = vec![0u8; size];
    let mut next = vec![0u8; size];
    let read_err = |e: io::Error| local(format!("cannot read {}: {e}", path.display()));
    let mut len = sealing::fill(&mut *input, &mut current).map_err(read_err)?;
    let mut index = 0u64;
    loop {
        // One chunk ahead, to know which is the last.
        let next_len = if len == size {
            sealing::fill(&mut *input, &mut next).map_err(read_err)?
        } else {
            0
        };
        let last = next_len == 0;
        match client.call(Operation::FileStoreChunk {
            session,
            index,
            last,
            bytes: SecretBytes::new(current[..len].to_vec()),
        })? {
            Reply::FileChunkStored { .. } => {}
            other => return Err(unexpected("file-store-chunk", &other)),
        }
        if last {
            break;
        }
        std::mem::swap(&mut current, &mut next);
        len = next_len;
        index += 1;
    }
    let stored = match client.call(Operation::FileStoreFinish { session })? {
        Reply::File(f) => f,
        other => return Err(unexpected("file-store-finish", &other)),
    };
    debug_assert_eq!(stored.token, info.token);
    if json {
        print_json(&stored);
    } else {
        println!("Token: {}", stored.token);
    }
    Ok(())
}

fn retrieve(
    client: &mut Client,
    json: bool,
    token: &str,
    outdir: Option<&Path>,
    output: Option<&Path>,
) -> Result<(), Failure> {
    let (session, info) = match client.call(Operation::FileRetrieveBegin {
        token: token.to_owned(),
    })? {
        Reply::FileSession { session, info } => (session, info),
        other => return Err(unexpected("file-retrieve-begin", &other)),
    };
    let target = match (output, outdir) {
        (Some(o), _) => o.to_owned(),
        (None, dir) => {
            // hsmd checked the name when it was stored; check again before
            // building a path from it.
            if info.name.contains('/') || info.name == ".." || info.name == "." || info.name.is_empty() {
                return Err(local(format!(
                    "the stored name {:?} is not a plain file name",
                    info.name
                )));
            }
            dir.unwrap_or(Path::new(".")).join(&info.name)
        }
    };
    let mut out = sealing::Output::create(&target)?;
    loop {
        match client.call(Operation::FileRetrieveNext { session })? {
            Reply::FileChunk { last, bytes, .. } => {
                out.write(bytes.expose())?;
                if last {
                    break;
                }
            }
            other => return Err(unexpected("file-retrieve-next", &other)),
        }
    }
    out.finish()?;
    if json {
        println!(
            "{}",
            json!({ "token": info.token, "name": info.name, "size": info.size, "path": target })
        );
    } else if target != Path::new("-") {
        eprintln!("retrieved {} ({} bytes) to {}", info.name, info.size, target.display());
    }
    Ok(())
}

/// Runs one `hsmctl file …` command.
pub fn run(json: bool, client: &mut Client, cmd: &FileCommand) -> Result<(), Failure> {
    match cmd {
        FileCommand::Store {
            path,
            key,
            chunk_size,
            name,
        } => store(client, json, path, key, *chunk_size, name.as_deref()),
        FileCommand::Retrieve { token, outdir, output } => {
            retrieve(client, json, token, outdir.as_deref(), output.as_deref())
        }
        FileCommand::List => match client.call(Operation::FileList)? {
            Reply::Files(files) => {
                if json {
                    print_json(&files);
                } else {
                    println!(
                        "{:<36}  {:<24}  {:>12}  {:<20}  {:<12}  owner",
                        "token", "name", "size", "stored", "key"
                    );
                    for f in &files {
                        println!(
                            "{:<36}  {:<24}  {:>12}  {:<20}  {:<12}  {}",
                            f.token,
                            f.name,
                            f.size,
                            crate::key_cmd::time(f.stored_unix),
                            f.key,
                            f.owner_uid
                        );
                    }
                }
                Ok(())
            }
            other => Err(unexpected("file-list", &other)),
        },
        FileCommand::Info { token } => match client.call(Operation::FileInfo { token: token.clone() })? {
            Reply::File(f) => {
                print_info(json, &f);
                Ok(())
            }
            other => Err(unexpected("file-info", &other)),
        },
        FileCommand::Delete { token } => match client.call(Operation::FileDelete { token: token.clone() })? {
            Reply::FileDeleted { token } => {
                if json {
                    println!("{}", json!({ "deleted": token }));
                } else {
                    println!("deleted {token} (its chunks were overwritten, then removed)");
                }
                Ok(())
            }
            other => Err(unexpected("file-delete", &other)),
        },
    }
}
