//! `hsmctl file …`: the token file store. By default hsmctl opens the file
//! and passes the open descriptor to hsmd (SCM_RIGHTS), which reads or writes
//! it directly with the access hsmctl opened it with and seals or opens the
//! chunks on several cores; `--via frames` sends the bytes through the socket
//! instead, one chunk per request. Either way the file key never leaves hsmd.

use std::{
    fs::File,
    io::{self, Seek as _},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use clap::{Subcommand, ValueEnum};
use protocol::{Client, FileInfo, Operation, Reply, SecretBytes};
use serde_json::json;

use crate::{
    failure::{unexpected, Failure, Local},
    print_json,
    progress::Progress,
    sealing,
};

/// How file bytes travel between hsmctl and hsmd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// Pass the open file to hsmd, which reads or writes it itself (fastest)
    Fd,
    /// Send the bytes through the socket, one chunk per request
    Frames,
}

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
        /// Plaintext per chunk: a power of two from 4KiB to 8MiB
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        chunk_size: u32,
        /// The name to keep (default: the file's own name; required for stdin)
        #[arg(long)]
        name: Option<String>,
        /// How the bytes reach hsmd
        #[arg(long, value_enum, default_value = "fd")]
        via: Via,
        /// No progress bar (there is none anyway when stderr is not a terminal)
        #[arg(short, long)]
        quiet: bool,
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
        /// How the bytes come from hsmd
        #[arg(long, value_enum, default_value = "fd")]
        via: Via,
        /// No progress bar (there is none anyway when stderr is not a terminal)
        #[arg(short, long)]
        quiet: bool,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
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
        /// Go ahead without asking (this cannot be undone); without it hsmctl
        /// asks on a terminal and refuses elsewhere
        #[arg(long)]
        yes: bool,
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

fn local(msg: String) -> Failure {
    Local::File.fail(msg)
}

fn usage(msg: String) -> Failure {
    Local::Usage.fail(msg)
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
    println!("checksum:   blake3 {} (as b3sum prints it)", f.checksum);
}

struct StoreArgs<'a> {
    path: &'a Path,
    key: &'a str,
    chunk_size: u32,
    name: Option<&'a str>,
    via: Via,
    quiet: bool,
}

fn store(client: &mut Client, json: bool, a: &StoreArgs<'_>) -> Result<(), Failure> {
    let stdin = a.path == Path::new("-");
    let name = match (a.name, stdin) {
        (Some(n), _) => n.to_owned(),
        (None, true) => return Err(usage("storing stdin needs --name".into())),
        (None, false) => a
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| usage(format!("{} has no file name; give --name", a.path.display())))?,
    };
    let stored = match a.via {
        Via::Fd => store_fd(client, a, name)?,
        Via::Frames => store_frames(client, a, name)?,
    };
    if json {
        print_json(&stored);
    } else {
        println!("Token: {}", stored.token);
    }
    Ok(())
}

/// Opens the input (stdin with -), refusing what is not a file or a stream.
fn open_for_store(path: &Path) -> Result<File, Failure> {
    let file = if path == Path::new("-") {
        io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .map_err(|e| local(format!("cannot use stdin: {e}")))?
    } else {
        File::open(path).map_err(|e| local(format!("cannot open {}: {e}", path.display())))?
    };
    let meta = file
        .metadata()
        .map_err(|e| local(format!("cannot read {}: {e}", path.display())))?;
    if meta.is_dir() {
        return Err(usage(format!(
            "{} is a directory; store one file (or tar c DIR | hsmctl file store - --name DIR.tar)",
            path.display()
        )));
    }
    Ok(file)
}

/// What is left to read of a regular file, from its offset (for the bar).
fn remaining(file: &File) -> (Option<u64>, u64) {
    let start = (&*file).stream_position().unwrap_or(0);
    match file.metadata() {
        Ok(m) if m.is_file() => (Some(m.len().saturating_sub(start)), start),
        _ => (None, start),
    }
}

fn store_fd(client: &mut Client, a: &StoreArgs<'_>, name: String) -> Result<FileInfo, Failure> {
    let input = open_for_store(a.path)?;
    let (total, start) = remaining(&input);
    let bar = Progress::new("storing", total, a.quiet);
    let op = Operation::FileStoreFd {
        name,
        key: a.key.to_owned(),
        chunk_size: a.chunk_size,
    };
    let result = bar.follow(&input, start, || client.call_with_fd(op, input.as_fd()));
    match result {
        Ok(Reply::File(f)) => {
            bar.set(f.size);
            bar.finish();
            Ok(f)
        }
        Ok(other) => {
            bar.clear();
            Err(unexpected("file-store", &other))
        }
        Err(e) => {
            bar.clear();
            Err(e.into())
        }
    }
}

fn store_frames(client: &mut Client, a: &StoreArgs<'_>, name: String) -> Result<FileInfo, Failure> {
    let input_file = open_for_store(a.path)?;
    let (total, _) = remaining(&input_file);
    let mut input = io::BufReader::new(input_file);
    let protocol::calls::FileSession { session, info } =
        client.file_store_begin(name, a.key.to_owned(), a.chunk_size)?;
    let bar = Progress::new("storing", total, a.quiet);
    let size = a.chunk_size as usize;
    let mut current = vec![0u8; size];
    let mut next = vec![0u8; size];
    let read_err = |e: io::Error| local(format!("cannot read {}: {e}", a.path.display()));
    let sent = (|| {
        let mut len = sealing::fill(&mut input, &mut current).map_err(read_err)?;
        let mut index = 0u64;
        loop {
            // One chunk ahead, to know which is the last.
            let next_len = if len == size {
                sealing::fill(&mut input, &mut next).map_err(read_err)?
            } else {
                0
            };
            let last = next_len == 0;
            client.file_store_chunk(session, index, last, SecretBytes::new(current[..len].to_vec()))?;
            bar.add(len as u64);
            if last {
                break;
            }
            std::mem::swap(&mut current, &mut next);
            len = next_len;
            index += 1;
        }
        Ok(client.file_store_finish(session)?)
    })();
    match sent {
        Ok(stored) => {
            bar.finish();
            debug_assert_eq!(stored.token, info.token);
            Ok(stored)
        }
        Err(e) => {
            bar.clear();
            Err(e)
        }
    }
}

struct RetrieveArgs<'a> {
    token: &'a str,
    outdir: Option<&'a Path>,
    output: Option<&'a Path>,
    via: Via,
    quiet: bool,
    force: bool,
}

fn retrieve(client: &mut Client, json: bool, a: &RetrieveArgs<'_>) -> Result<(), Failure> {
    // The name and size come from `file info`; a role that may retrieve but
    // not read metadata (files:retrieve without files:info) can still
    // retrieve to -o, without a size for the bar.
    let info = match client.file_info(a.token.to_owned()) {
        Ok(f) => Some(f),
        Err(e) if a.output.is_some() && protocol::is_code(&e, protocol::ErrorCode::PermissionDenied) => None,
        Err(e) => return Err(e.into()),
    };
    let target = match (a.output, a.outdir, &info) {
        (Some(o), _, _) => o.to_owned(),
        (None, dir, Some(info)) => {
            // hsmd checked the name when it was stored; check again before
            // building a path from it.
            if info.name.contains('/') || info.name == ".." || info.name == "." || info.name.is_empty() {
                return Err(Local::Input.fail(format!("the stored name {:?} is not a plain file name", info.name)));
            }
            dir.unwrap_or(Path::new(".")).join(&info.name)
        }
        (None, _, None) => return Err(usage("file info was refused; give -o FILE".into())),
    };
    if json && crate::output::is_stdout(Some(&target)) {
        return Err(usage(
            "with --json, standard output carries the JSON summary; write the file with -o FILE or a directory".into(),
        ));
    }
    let mut out = crate::output::Output::create(&target, a.force)?;
    let bar = Progress::new("retrieving", info.as_ref().map(|i| i.size), a.quiet);
    let result = match a.via {
        Via::Fd => retrieve_fd(client, a.token, &out, &bar),
        Via::Frames => retrieve_frames(client, a.token, &mut out, &bar),
    };
    let info = match result {
        Ok(info) => info,
        Err(e) => {
            // The temporary output is removed when `out` drops.
            bar.clear();
            return Err(e);
        }
    };
    out.finish()?;
    bar.finish();
    if json {
        println!(
            "{}",
            json!({ "token": info.token, "name": info.name, "size": info.size, "path": target })
        );
    } else if target != Path::new("-") && !bar.shown() {
        eprintln!("retrieved {} ({} bytes) to {}", info.name, info.size, target.display());
    }
    Ok(())
}

fn retrieve_fd(
    client: &mut Client,
    token: &str,
    out: &crate::output::Output,
    bar: &Progress,
) -> Result<FileInfo, Failure> {
    let (fd, file) = out.descriptor();
    let op = Operation::FileRetrieveFd {
        token: token.to_owned(),
    };
    let reply = match file {
        Some(f) => bar.follow(f, 0, || client.call_with_fd(op, fd)),
        None => client.call_with_fd(op, fd),
    }?;
    match reply {
        Reply::File(f) => {
            bar.set(f.size);
            Ok(f)
        }
        other => Err(unexpected("file-retrieve", &other)),
    }
}

fn retrieve_frames(
    client: &mut Client,
    token: &str,
    out: &mut crate::output::Output,
    bar: &Progress,
) -> Result<FileInfo, Failure> {
    let protocol::calls::FileSession { session, info } = client.file_retrieve_begin(token.to_owned())?;
    loop {
        let chunk = client.file_retrieve_next(session)?;
        out.write(chunk.bytes.expose())?;
        bar.add(chunk.bytes.expose().len() as u64);
        if chunk.last {
            return Ok(info);
        }
    }
}

/// Runs one `hsmctl file …` command.
pub fn run(json: bool, client: &mut Client, cmd: &FileCommand) -> Result<(), Failure> {
    match cmd {
        FileCommand::Store {
            path,
            key,
            chunk_size,
            name,
            via,
            quiet,
        } => store(
            client,
            json,
            &StoreArgs {
                path,
                key,
                chunk_size: *chunk_size,
                name: name.as_deref(),
                via: *via,
                quiet: *quiet,
            },
        ),
        FileCommand::Retrieve {
            token,
            outdir,
            output,
            via,
            quiet,
            force,
        } => retrieve(
            client,
            json,
            &RetrieveArgs {
                token,
                outdir: outdir.as_deref(),
                output: output.as_deref(),
                via: *via,
                quiet: *quiet,
                force: *force,
            },
        ),
        FileCommand::List => {
            let files = client.file_list()?;
            {
                if json {
                    print_json(&files);
                } else {
                    let rows = files
                        .iter()
                        .map(|f| {
                            vec![
                                f.token.clone(),
                                f.name.clone(),
                                f.size.to_string(),
                                crate::key_cmd::time(f.stored_unix),
                                f.key.clone(),
                                f.owner_uid.to_string(),
                            ]
                        })
                        .collect();
                    crate::table::print(&["token", "name", "size", "stored", "key", "owner"], rows, &[2, 5]);
                }
                Ok(())
            }
        }
        FileCommand::Info { token } => {
            print_info(json, &client.file_info(token.clone())?);
            Ok(())
        }
        FileCommand::Delete { token, yes } => {
            crate::confirm::confirm(
                &format!("deleting stored file {token} overwrites its chunks and removes it for good"),
                *yes,
            )?;
            let token = client.file_delete(token.clone())?;
            if json {
                println!("{}", json!({ "deleted": token }));
            } else {
                println!("deleted {token} (its chunks were overwritten, then removed)");
            }
            Ok(())
        }
    }
}
