//! Bounded reads of the plugin's inputs: stdin and the files a config points at. A runtime
//! (or a typo in a config) can hand the plugin an endless stream (`/dev/zero` on stdin grew
//! an unbounded reader to 2.4 GB in 3 s), a FIFO with no writer (opening it blocks forever)
//! or a directory; every read here stops at a limit, and files must be regular files.

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::OFlag;

/// Largest network config accepted on stdin. A config is a few KiB; the largest legitimate
/// ones are GC calls listing every attachment of a node (~100 bytes each).
pub const STDIN_LIMIT: usize = 16 << 20;

/// Largest `subnet.env` accepted (tartand writes ~110 bytes).
pub const SUBNET_ENV_LIMIT: usize = 64 << 10;

/// Why a bounded read of a file failed.
#[derive(Debug, thiserror::Error)]
pub enum FileReadError {
    /// Opening, inspecting or reading failed (e.g. the file does not exist).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The path names something other than a regular file (e.g. "a FIFO").
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    /// The file holds more than the limit (in bytes).
    #[error("is larger than {0} bytes")]
    TooLarge(usize),
}

/// Reads `r` to its end, but never more than `limit` bytes: `Ok(None)` when there is more.
pub fn read_to_limit(r: impl Read, limit: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.take(limit as u64 + 1).read_to_end(&mut buf)?;
    Ok((buf.len() <= limit).then_some(buf))
}

/// What a file type is, in words, for errors.
fn kind_of(t: FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

fn check_regular(m: &Metadata) -> Result<(), FileReadError> {
    if m.file_type().is_file() {
        Ok(())
    } else {
        Err(FileReadError::NotRegular(kind_of(m.file_type())))
    }
}

/// Reads the regular file at `path` (symlinks followed), at most `limit` bytes. Devices,
/// FIFOs and directories are refused before they are opened, and again on the opened
/// descriptor (opened non-blocking, so a FIFO swapped in meanwhile cannot block the open).
pub fn read_regular_file(path: &Path, limit: usize) -> Result<Vec<u8>, FileReadError> {
    check_regular(&std::fs::metadata(path)?)?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)?;
    read_opened_file(f, limit)
}

/// Reads an already opened file (which must be a regular file), at most `limit` bytes.
pub fn read_opened_file(f: File, limit: usize) -> Result<Vec<u8>, FileReadError> {
    let m = f.metadata()?;
    check_regular(&m)?;
    if m.len() > limit as u64 {
        return Err(FileReadError::TooLarge(limit));
    }
    read_to_limit(f, limit)?.ok_or(FileReadError::TooLarge(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_limit() {
        let zero = File::open("/dev/zero").unwrap();
        assert_eq!(read_to_limit(zero, 1000).unwrap(), None);
        assert_eq!(
            read_to_limit(&b"abc"[..], 3).unwrap(),
            Some(b"abc".to_vec())
        );
        assert_eq!(read_to_limit(&b"abcd"[..], 3).unwrap(), None);
        assert_eq!(read_to_limit(&b""[..], 0).unwrap(), Some(Vec::new()));
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("tartan-bounded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"FLANNEL_MTU=1450\n").unwrap();
        let kind = |p: &Path| match read_regular_file(p, 100) {
            Err(FileReadError::NotRegular(k)) => k,
            other => panic!("{}: {other:?}", p.display()),
        };
        assert_eq!(kind(&fifo), "a FIFO");
        assert_eq!(kind(&dir), "a directory");
        assert_eq!(kind(Path::new("/dev/zero")), "a character device");
        assert_eq!(
            read_regular_file(&file, 100).unwrap(),
            b"FLANNEL_MTU=1450\n"
        );
        assert!(matches!(
            read_regular_file(&file, 4),
            Err(FileReadError::TooLarge(4))
        ));
        assert!(matches!(
            read_regular_file(&dir.join("absent"), 4),
            Err(FileReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
