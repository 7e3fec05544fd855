//! Facts about the host the daemon needs before it can load anything:
//! where cgroup v2 and bpffs are mounted.

use std::{
    io,
    path::{Path, PathBuf},
};

/// Filesystem magic of bpffs (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Finds the cgroup v2 mount point in `/proc/mounts`. On hybrid hosts v2
/// sits at `/sys/fs/cgroup/unified`, on unified ones at `/sys/fs/cgroup`:
/// never assume either.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    find_mount(&mounts, "cgroup2").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem in /proc/mounts; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass --cgroup2-path",
        )
    })
}

/// The mount point of the first filesystem of type `fstype` in a
/// `/proc/mounts` text.
pub fn find_mount(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(unescape_mount(dir)))
    })
}

/// `/proc/mounts` escapes blanks and backslashes as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: `st` is a plain C struct that statfs fills; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `root` is a mounted bpffs, mounting one if it is not (hosts
/// that boot without bpffs, like minimal VMs). Returns whether it mounted.
pub fn ensure_bpffs(root: &Path) -> io::Result<bool> {
    std::fs::create_dir_all(root)?;
    if is_bpffs(root)? {
        return Ok(false);
    }
    let target = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "{} is not a bpffs and mounting one failed: {e}; mount it yourself (mount -t bpf bpf {}) or pass --bpf-fs-path",
                root.display(),
                root.display()
            ),
        ));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_cgroup2() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            find_mount(m, "cgroup2").unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(find_mount(m, "bpf"), None);
    }

    #[test]
    fn unescapes_octal() {
        let m = "cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(
            find_mount(m, "cgroup2").unwrap(),
            PathBuf::from("/mnt/my cg")
        );
    }
}

/// The oldest kernel the daemon runs on, and why.
pub const MIN_KERNEL: (u32, u32) = (5, 14);

/// Fails with the missing feature named when the running kernel is older
/// than [`MIN_KERNEL`].
/// Returns memory the allocator holds but no longer uses to the kernel.
/// A full compile decodes every resource into short-lived messages (tens
/// of MiB at 10,000 services); glibc keeps those pages after they are
/// freed, so without this the RSS stays at the compile's peak. Cost: a
/// walk of the free lists, a few ms; called after full compiles only.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it takes no
    // pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn check_kernel() -> io::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    match parse_release(&release) {
        Some(v) if v < MIN_KERNEL => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "kernel {} is too old: kmesh-daemon needs Linux {}.{}+ (SO_NETNS_COOKIE 5.14 for enrollment, bpf_get_netns_cookie in cgroup sock_addr programs 5.7, cgroup bpf_link 5.7)",
                release.trim(),
                MIN_KERNEL.0,
                MIN_KERNEL.1
            ),
        )),
        _ => Ok(()),
    }
}

/// `major.minor` of a kernel release string such as `6.18.44-fc-v669`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    #[test]
    fn parses_releases() {
        assert_eq!(parse_release("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_release("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_release("garbage"), None);
    }
}
