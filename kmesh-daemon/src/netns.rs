//! Network namespace identity: the netns cookie the kernel programs see
//! through `bpf_get_netns_cookie()`, read from userspace for a namespace
//! given by path (`/var/run/netns/NAME`, `/proc/<pid>/ns/net`).

use std::{fs::File, io, os::fd::AsRawFd, path::Path};

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in every libc release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Returns the cookie of the network namespace at `path`.
///
/// Cost: one short-lived thread (setns affects only the calling thread, so
/// the caller's own namespace is never changed) and one socket.
pub fn cookie_of(path: &Path) -> io::Result<u64> {
    let ns = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    let path = path.to_path_buf();
    std::thread::spawn(move || -> io::Result<u64> {
        // SAFETY: `ns` is an open namespace fd; setns changes only this
        // thread, which ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "setns into {} (is it a network namespace?): {e}",
                    path.display()
                ),
            ));
        }
        current_cookie()
    })
    .join()
    .map_err(|_| io::Error::other("netns cookie thread panicked"))?
}

/// Returns the cookie of the calling thread's network namespace.
pub fn current_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is closed below on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a valid u64 buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(io::Error::new(
            err.kind(),
            format!("getsockopt(SO_NETNS_COOKIE) needs Linux 5.14 or newer: {err}"),
        ));
    }
    Ok(cookie)
}
