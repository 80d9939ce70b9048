//! One process per directory: an exclusive advisory lock on a `LOCK` file, held for as long as
//! the owner lives.
//!
//! The lock is `flock(2)`-style (through [`std::fs::File::try_lock`]): the kernel drops it when
//! the holder's file is closed, including when the process dies by `kill -9`, so a crash never
//! leaves a stale lock behind. The holder writes its pid into the file, so a refused opener can
//! say who holds the directory. Two opens in one process conflict as well (each open file has
//! its own lock), so a directory opened twice by mistake is refused the same way.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::StoreError;

/// The lock file's name inside the locked directory.
pub const LOCK_FILE: &str = "LOCK";

/// An exclusive lock on a directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    dir: PathBuf,
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir` (creating the directory if needed), or fails at once with
    /// [`StoreError::Locked`] naming the holder's pid when another process holds it.
    pub fn acquire(dir: impl AsRef<Path>) -> Result<DirLock, StoreError> {
        let dir = dir.as_ref().to_owned();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let pid = read_pid(&mut file);
                return Err(StoreError::Locked { dir, pid });
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::io(&path, e)),
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(|e| StoreError::io(&path, e))?;
        Ok(DirLock { dir, _file: file })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_at_once_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(e @ StoreError::Locked { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&std::process::id().to_string()), "{text}");
                assert!(text.contains(&dir.path().display().to_string()), "{text}");
            }
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn a_lock_is_free_again_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(dir.path()).unwrap();
        drop(held);
        let again = DirLock::acquire(dir.path()).unwrap();
        let pid = fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(pid, std::process::id().to_string());
        assert_eq!(again.dir(), dir.path());
    }
}
