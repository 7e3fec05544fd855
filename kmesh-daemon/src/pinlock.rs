//! One daemon per pin directory.
//!
//! Two daemons writing the same pinned maps would undo each other's
//! make-before-break updates, and the second would remove the pins of the
//! first when it exits. A DaemonSet rolling update with `maxSurge` starts
//! the new pod before the old one has gone, so this is not hypothetical.
//!
//! The lock is an `flock` on a directory that sits next to the pin
//! directory in bpffs (`<bpffs>/kmesh-lock`): bpffs holds no regular files,
//! but directories are fine, and the host's bpffs is the one thing the old
//! and the new pod surely share. It is not the pin directory itself because
//! an ABI migration renames that. The kernel drops the lock when the process
//! dies, `kill -9` included, so a crashed daemon never blocks the next one.
//!
//! A daemon that detaches removes the lock directory too (nothing of it is
//! left behind). A daemon that was waiting on it then holds the lock of a
//! directory that is gone, while a third could create a new one: so a lock
//! counts only if the path still names the directory that was locked
//! (same device and inode); otherwise it is taken again.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// Held for the life of the daemon; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
    path: PathBuf,
}

impl PinLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock directory for a pin directory.
pub fn lock_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kmesh".into());
    pin_dir.with_file_name(format!("{name}-lock"))
}

/// Takes the lock if it is free; `Ok(None)` when another process holds it.
pub fn try_acquire(pin_dir: &Path) -> io::Result<Option<PinLock>> {
    lock(pin_dir, libc::LOCK_EX | libc::LOCK_NB)
}

/// Waits until the lock is free. Blocking: call it off the async runtime.
pub fn acquire(pin_dir: &Path) -> io::Result<PinLock> {
    loop {
        if let Some(l) = lock(pin_dir, libc::LOCK_EX)? {
            return Ok(l);
        }
    }
}

/// Removes the lock directory while holding it (a detaching daemon).
pub fn release_and_remove(l: PinLock) {
    let _ = std::fs::remove_dir(&l.path);
}

fn lock(pin_dir: &Path, op: libc::c_int) -> io::Result<Option<PinLock>> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let (dir, path) = open(pin_dir)?;
        match flock(&dir, op) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(None),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("flock {}: {e}", path.display()),
                ))
            }
        }
        let held = dir.metadata()?;
        match std::fs::metadata(&path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                return Ok(Some(PinLock { _dir: dir, path }))
            }
            // Removed (or replaced) by the holder we waited for: lock the
            // directory the path names now.
            _ => continue,
        }
    }
}

fn open(pin_dir: &Path) -> io::Result<(File, PathBuf)> {
    let path = lock_path(pin_dir);
    match std::fs::create_dir(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("creating lock directory {}: {e}", path.display()),
            ))
        }
    }
    let dir = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    Ok((dir, path))
}

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock(2) on a descriptor we own for the whole call.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_the_first_drops() {
        let base = std::env::temp_dir().join(format!("kmesh-pinlock-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let pins = base.join("kmesh");
        assert_eq!(lock_path(&pins), base.join("kmesh-lock"));
        let first = try_acquire(&pins).unwrap().expect("free at first");
        // flock locks belong to the open file description: a second open in
        // the same process conflicts just as another process would.
        assert!(try_acquire(&pins).unwrap().is_none());
        drop(first);
        let again = acquire(&pins).unwrap();
        assert_eq!(again.path(), base.join("kmesh-lock"));
        // A holder that removes the directory on its way out: the next one
        // locks a new directory under the same name.
        release_and_remove(again);
        assert!(!base.join("kmesh-lock").exists());
        let third = try_acquire(&pins).unwrap().expect("free after removal");
        assert!(base.join("kmesh-lock").exists());
        drop(third);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
