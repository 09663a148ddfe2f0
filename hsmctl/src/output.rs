//! Where hsmctl writes its results: a file that appears under its name only
//! when complete (a temporary file in the same directory, synced, renamed into
//! place), or standard output.
//!
//! hsmctl is often run by root on paths in other users' directories, and what
//! it writes is often plaintext. So, for every `-o` and output directory:
//!
//! - a symbolic link as the last component is refused, never followed (the
//!   rename would replace the link itself, but refusing says what happened);
//! - an existing FIFO, socket or device is refused: writing through it would
//!   hand the output to whoever reads it. `-` and `/dev/stdout` mean standard
//!   output; `/dev/null` (the real one) is written to as it is;
//! - an existing file owned by another user is not replaced;
//! - an existing file of one's own is replaced only with `--force`;
//! - the output is never the input file;
//! - binary output is not written to a terminal unless `-o -` asks for it.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, IsTerminal as _, Write},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::failure::{Failure, Local};

fn local(msg: String) -> Failure {
    Local::File.fail(msg)
}

fn unsafe_output(msg: String) -> Failure {
    Local::UnsafeOutput.fail(msg)
}

/// An output being written; dropped unfinished, it leaves nothing behind.
pub(crate) struct Output {
    target: PathBuf,
    sink: Sink,
}

enum Sink {
    Temp {
        temp: tempfile::NamedTempFile,
        dest: PathBuf,
    },
    /// `/dev/null`.
    Discard(File),
    Stdout(io::StdoutLock<'static>),
}

/// What kind of non-regular file sits at a path, for the refusal.
fn kind_of(t: fs::FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Whether `path` is the system's `/dev/null` (by name and by device number,
/// so a FIFO someone managed to put there does not count).
fn is_dev_null(path: &Path, meta: &fs::Metadata) -> bool {
    path == Path::new("/dev/null")
        && meta.file_type().is_char_device()
        && nix::sys::stat::major(meta.rdev()) == 1
        && nix::sys::stat::minor(meta.rdev()) == 3
}

/// Refuses an output that is the input file itself (the same inode, by
/// whatever name): `encrypt -i app.bin -o app.bin` would replace the data
/// with its own ciphertext. Standard input and output are never the same file.
pub(crate) fn not_the_input(input: &Path, output: &Path) -> Result<(), Failure> {
    let std_stream = |p: &Path| p == Path::new("-") || p == Path::new("/dev/stdout") || p == Path::new("/dev/stdin");
    if std_stream(input) || std_stream(output) {
        return Ok(());
    }
    // A link as the output is refused by `Output::create` anyway; the input
    // is compared as it will be read (following links).
    let (Ok(i), Ok(o)) = (fs::metadata(input), fs::symlink_metadata(output)) else {
        return Ok(());
    };
    if i.is_file() && (i.dev(), i.ino()) == (o.dev(), o.ino()) {
        return Err(unsafe_output(format!(
            "refusing to write {}: it is the input file too, and would be replaced by the output; \
             write to another path",
            output.display()
        )));
    }
    Ok(())
}

/// Whether `path` (`None`: not given, so standard output) is standard output.
pub(crate) fn is_stdout(path: Option<&Path>) -> bool {
    path.is_none_or(|p| p == Path::new("-") || p == Path::new("/dev/stdout"))
}

impl Output {
    /// Opens the output a command was given with `-o` (`None`: standard
    /// output, which for `binary` data must not be a terminal).
    pub(crate) fn open(path: Option<&Path>, force: bool, binary: bool) -> Result<Self, Failure> {
        match path {
            None if binary && io::stdout().is_terminal() => Err(unsafe_output(
                "refusing to write binary data to a terminal; give -o FILE, or -o - to write it there anyway".into(),
            )),
            None => Self::create(Path::new("-"), force),
            Some(p) => Self::create(p, force),
        }
    }

    /// Checks `path` by the rules above and opens the output; an existing
    /// file of one's own is replaced only if `force`.
    pub(crate) fn create(path: &Path, force: bool) -> Result<Self, Failure> {
        if path == Path::new("-") || path == Path::new("/dev/stdout") {
            return Ok(Self {
                target: path.to_owned(),
                sink: Sink::Stdout(io::stdout().lock()),
            });
        }
        let shown = path.display();
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(local(format!("cannot write {shown}: {e}"))),
            Ok(meta) => {
                let t = meta.file_type();
                if t.is_symlink() {
                    return Err(unsafe_output(format!(
                        "refusing to write {shown}: it is a symbolic link, and hsmctl never writes through a link \
                         (name the file itself, or remove the link)"
                    )));
                }
                if t.is_dir() {
                    return Err(unsafe_output(format!("refusing to write {shown}: it is a directory")));
                }
                if is_dev_null(path, &meta) {
                    let file = OpenOptions::new()
                        .write(true)
                        .custom_flags(nix::libc::O_NOFOLLOW)
                        .open(path)
                        .map_err(|e| local(format!("cannot write {shown}: {e}")))?;
                    return Ok(Self {
                        target: path.to_owned(),
                        sink: Sink::Discard(file),
                    });
                }
                if !t.is_file() {
                    return Err(unsafe_output(format!(
                        "refusing to write {shown}: it is {}, and hsmctl writes only regular files \
                         (use `-o -` and redirect standard output to it yourself)",
                        kind_of(t)
                    )));
                }
                let me = nix::unistd::geteuid().as_raw();
                if meta.uid() != me {
                    return Err(unsafe_output(format!(
                        "refusing to replace {shown}: it belongs to uid {}, not to you (uid {me}); \
                         remove it or choose another path",
                        meta.uid()
                    )));
                }
                if !force {
                    return Err(Local::OutputExists.fail(format!(
                        "refusing to replace {shown}: it exists; add --force to replace it, or choose another path"
                    )));
                }
            }
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Created O_EXCL under a random name, mode 0600; the final rename
        // replaces whatever entry is at the path then (a link planted after
        // the check above is replaced, not followed).
        let temp = tempfile::Builder::new()
            .prefix(".hsmctl-")
            .tempfile_in(dir)
            .map_err(|e| {
                // tempfile's message names its own random file; the user named `path`.
                let why = match e.kind() {
                    io::ErrorKind::NotFound => format!("the directory {} does not exist", dir.display()),
                    io::ErrorKind::PermissionDenied => format!("you may not create files in {}", dir.display()),
                    _ => io::Error::from(e.kind()).to_string(),
                };
                local(format!("cannot write {shown}: {why}"))
            })?;
        Ok(Self {
            target: path.to_owned(),
            sink: Sink::Temp {
                temp,
                dest: path.to_owned(),
            },
        })
    }

    /// The descriptor the output goes to, to pass to hsmd, and the file
    /// behind it when it has an offset worth following.
    pub(crate) fn descriptor(&self) -> (std::os::fd::BorrowedFd<'_>, Option<&File>) {
        use std::os::fd::AsFd as _;
        match &self.sink {
            Sink::Temp { temp, .. } => (temp.as_file().as_fd(), Some(temp.as_file())),
            Sink::Discard(f) => (f.as_fd(), None),
            Sink::Stdout(s) => (s.as_fd(), None),
        }
    }

    /// Writes bytes to the output.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let r = match &mut self.sink {
            Sink::Temp { temp, .. } => temp.write_all(bytes),
            Sink::Discard(f) => f.write_all(bytes),
            Sink::Stdout(s) => s.write_all(bytes),
        };
        r.map_err(|e| local(format!("cannot write {}: {e}", self.target.display())))
    }

    /// Makes the output appear under its name (synced first).
    pub(crate) fn finish(self) -> Result<(), Failure> {
        let target = self.target;
        let cannot = |e: io::Error| local(format!("cannot write {}: {e}", target.display()));
        match self.sink {
            Sink::Stdout(mut s) => s.flush().map_err(cannot),
            Sink::Discard(_) => Ok(()),
            Sink::Temp { temp, dest } => {
                temp.as_file().sync_all().map_err(cannot)?;
                temp.persist(&dest).map(drop).map_err(|e| cannot(e.error))
            }
        }
    }
}
