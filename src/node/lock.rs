//! One daemon per node, enforced: tartand holds an exclusive `flock` on a lock file for each
//! of the paths it owns on the host (state directory, CNI socket, CNI data directory,
//! subnet.env). A second daemon that shares any of them is refused at once, before it touches
//! etcd or the kernel, with the holder's PID and the flags to change.
//!
//! Why every path and not only the state directory: each may be given separately, and
//! sharing any one of them breaks a node (a shared socket sends one daemon's pod nudges to
//! the other; a shared data directory registers one node's pods as another's; a shared
//! subnet.env hands pods the wrong subnet).
//!
//! Where the lock files live: `tartand.lock` inside a directory, `<file>.lock` beside a file
//! (the socket file itself is removed and re-created at every start, so it cannot carry the
//! lock). Each file holds the holder's PID (informational: the lock is the `flock`, which the
//! kernel releases when the holder dies, so a file left by a dead daemon is simply taken over).
//! The descriptors are close-on-exec, so the `nft` children never inherit them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Name of the lock file inside a directory the daemon owns.
pub const DIR_LOCK_NAME: &str = "tartand.lock";

/// What a path is, which decides where its lock file lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A directory: the lock file is `tartand.lock` inside it.
    Dir,
    /// A file (socket, subnet.env): the lock file is `<file>.lock` beside it.
    File,
}

/// A path the daemon owns, with the flag that sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedPath {
    /// The command-line flag (e.g. `--cni-socket`).
    pub flag: &'static str,
    /// The path as given.
    pub path: PathBuf,
    /// Directory or file.
    pub kind: PathKind,
}

/// Why the paths could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock.
    #[error(
        "{} ({flag}) is in use by tartand ({}); give each daemon on this host its own --state-dir, --cni-socket, --cni-data-dir and --subnet-file",
        path.display(),
        pid.map_or_else(|| "pid not recorded yet".to_string(), |p| format!("pid {p}"))
    )]
    InUse {
        /// The flag of the contested path.
        flag: &'static str,
        /// The contested path (as given).
        path: PathBuf,
        /// The holder's PID, as its lock file records it.
        pid: Option<u32>,
    },
    /// The lock file could not be created, opened, locked or written.
    #[error("{} ({flag}): {what} {}: {source}", path.display(), lock_file.display())]
    Io {
        /// The flag of the path.
        flag: &'static str,
        /// The path (as given).
        path: PathBuf,
        /// The lock file.
        lock_file: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// The held locks; dropping this (or the process dying) releases them.
#[derive(Debug)]
pub struct NodeLock {
    held: Vec<(PathBuf, Flock<File>)>,
}

impl NodeLock {
    /// The lock files held, in the order taken.
    pub fn lock_files(&self) -> Vec<&Path> {
        self.held.iter().map(|(p, _)| p.as_path()).collect()
    }
}

/// The lock file of `p` (`<dir>/tartand.lock` or `<file>.lock`).
pub fn lock_file_of(p: &OwnedPath) -> PathBuf {
    match p.kind {
        PathKind::Dir => p.path.join(DIR_LOCK_NAME),
        PathKind::File => {
            let mut name = p
                .path
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            name.push(".lock");
            p.path.with_file_name(name)
        }
    }
}

/// Locks every path in `paths` for this process (recording its PID), or fails on the first
/// one another live process holds. Directories (and a file's parent directory) are created.
/// Two paths with the same lock file (say `--cni-data-dir` equal to `--state-dir`) take one
/// lock.
pub fn lock_paths(paths: &[OwnedPath]) -> Result<NodeLock, LockError> {
    let mut held: Vec<(PathBuf, Flock<File>)> = Vec::new();
    for p in paths {
        let lock_file = lock_file_of(p);
        let io = |what: &'static str, source: std::io::Error| LockError::Io {
            flag: p.flag,
            path: p.path.clone(),
            lock_file: lock_file.clone(),
            what,
            source,
        };
        let dir = lock_file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        // One lock per file, however it was named (symlinks, `..`, a trailing slash).
        let canonical = dir
            .canonicalize()
            .map_err(|e| io("resolving the directory of", e))?
            .join(lock_file.file_name().unwrap_or_default());
        if held.iter().any(|(c, _)| *c == canonical) {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&canonical)
            .map_err(|e| io("opening", e))?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut f, Errno::EWOULDBLOCK)) => {
                return Err(LockError::InUse {
                    flag: p.flag,
                    path: p.path.clone(),
                    pid: read_pid(&mut f),
                });
            }
            Err((_, e)) => return Err(io("locking", std::io::Error::from(e))),
        };
        write_pid(&mut locked, std::process::id()).map_err(|e| io("writing the PID to", e))?;
        held.push((canonical, locked));
    }
    Ok(NodeLock { held })
}

fn read_pid(f: &mut File) -> Option<u32> {
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).ok()?;
    f.take(32).read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

fn write_pid(f: &mut File, pid: u32) -> std::io::Result<()> {
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(format!("{pid}\n").as_bytes())?;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::util::test_tmp::TmpDir;

    fn node_paths(root: &Path, state: &str, socket: &str) -> Vec<OwnedPath> {
        vec![
            OwnedPath {
                flag: "--state-dir",
                path: root.join(state),
                kind: PathKind::Dir,
            },
            OwnedPath {
                flag: "--cni-socket",
                path: root.join("run").join(socket),
                kind: PathKind::File,
            },
        ]
    }

    fn recorded_pid(f: &Path) -> Option<u32> {
        std::fs::read_to_string(f).ok()?.trim().parse().ok()
    }

    #[test]
    fn a_second_holder_is_refused_with_the_holders_pid() {
        let t = TmpDir::new("lock-second");
        let paths = node_paths(&t.0, "state", "tartand.sock");
        let held = lock_paths(&paths).unwrap();
        assert_eq!(
            held.lock_files(),
            vec![
                t.0.join("state/tartand.lock").as_path(),
                t.0.join("run/tartand.sock.lock").as_path()
            ]
        );
        // flock is per open file: a second open of the same file conflicts even in this
        // process, exactly as a second daemon's would.
        let e = lock_paths(&paths).unwrap_err();
        let LockError::InUse { flag, pid, .. } = &e else {
            panic!("expected InUse, got {e}");
        };
        assert_eq!(*flag, "--state-dir");
        assert_eq!(*pid, Some(std::process::id()));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("in use by tartand (pid {})", std::process::id())),
            "{msg}"
        );
        for flag in [
            "--state-dir",
            "--cni-socket",
            "--cni-data-dir",
            "--subnet-file",
        ] {
            assert!(msg.contains(flag), "{msg}");
        }
        assert!(!msg.contains('\n'), "one line: {msg}");
        // Released with the holder.
        drop(held);
        assert!(lock_paths(&paths).is_ok());
    }

    #[test]
    fn sharing_any_one_path_is_refused() {
        let t = TmpDir::new("lock-share");
        let _a = lock_paths(&node_paths(&t.0, "state-a", "shared.sock")).unwrap();
        let e = lock_paths(&node_paths(&t.0, "state-b", "shared.sock")).unwrap_err();
        assert!(
            matches!(
                &e,
                LockError::InUse {
                    flag: "--cni-socket",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("shared.sock"), "{e}");
        // Nothing shared: fine.
        assert!(lock_paths(&node_paths(&t.0, "state-c", "own.sock")).is_ok());
    }

    #[test]
    fn a_stale_lock_of_a_dead_pid_is_taken_over() {
        let t = TmpDir::new("lock-stale");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let paths = node_paths(&t.0, "state", "tartand.sock");
        for p in &paths {
            let f = lock_file_of(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, format!("{dead}\n")).unwrap();
        }
        let held = lock_paths(&paths).unwrap();
        for f in held.lock_files() {
            assert_eq!(recorded_pid(f), Some(std::process::id()), "{}", f.display());
        }
        // A longer leftover is rewritten, not overwritten in part.
        drop(held);
        std::fs::write(lock_file_of(&paths[0]), "4294967295 and garbage\n").unwrap();
        let held = lock_paths(&paths).unwrap();
        assert_eq!(recorded_pid(held.lock_files()[0]), Some(std::process::id()));
    }

    #[test]
    fn one_lock_file_named_twice_is_taken_once() {
        let t = TmpDir::new("lock-twice");
        let dir = t.0.join("state");
        let paths = vec![
            OwnedPath {
                flag: "--state-dir",
                path: dir.clone(),
                kind: PathKind::Dir,
            },
            OwnedPath {
                flag: "--cni-data-dir",
                path: dir.join("sub/.."),
                kind: PathKind::Dir,
            },
        ];
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let held = lock_paths(&paths).unwrap();
        assert_eq!(held.lock_files().len(), 1);
    }
}
