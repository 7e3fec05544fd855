//! Finds a pod's network namespace on the host from its UID.
//!
//! Every container runtime puts a pod's processes in a cgroup whose path
//! names the pod UID: `…/kubepods/burstable/pod<uid>/<container>` with the
//! cgroupfs driver, `…/kubepods-burstable-pod<uid_with_underscores>.slice/…`
//! with the systemd driver. Any process of the pod (the pause process
//! included) is in the pod's network namespace.
//!
//! Cost: one read of `/proc/<pid>/cgroup` per process on the host; callers
//! cache the answer per pod UID.

use std::{
    io,
    path::{Path, PathBuf},
};

/// True when a `/proc/<pid>/cgroup` text places the process in pod `uid`.
pub fn cgroup_names_pod(cgroup: &str, uid: &str) -> bool {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    cgroup.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/').any(|seg| {
            // Match whole segments (or the pod part of a systemd slice name)
            // so that uid "ab" never matches "pod-abc".
            let seg = seg.strip_suffix(".slice").unwrap_or(seg);
            seg == dashed || seg == underscored || seg.ends_with(&format!("-{underscored}"))
        })
    })
}

/// The `ns/net` path of some process of pod `uid` under `host_proc`, if a
/// process of that pod is running.
pub fn pod_netns(host_proc: &Path, uid: &str) -> io::Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(host_proc)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may exit while we look: skip it.
        let Ok(cg) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if cgroup_names_pod(&cg, uid) {
            return Ok(Some(entry.path().join("ns/net")));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f3c2a10-8b1e-4d2c-9a7f-0c1d2e3f4a5b";

    #[test]
    fn cgroupfs_driver_v1_and_v2() {
        let v2 = format!("0::/kubepods/burstable/pod{UID}/0123abcd\n");
        assert!(cgroup_names_pod(&v2, UID));
        let v1 = format!("12:memory:/kubepods/besteffort/pod{UID}/cafe\n11:cpu:/kubepods/besteffort/pod{UID}/cafe\n");
        assert!(cgroup_names_pod(&v1, UID));
    }

    #[test]
    fn systemd_driver() {
        let u = UID.replace('-', "_");
        let cg = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-0123.scope\n");
        assert!(cgroup_names_pod(&cg, UID));
    }

    #[test]
    fn other_pods_and_prefixes_do_not_match() {
        let cg = format!("0::/kubepods/burstable/pod{UID}x/0123\n");
        assert!(!cgroup_names_pod(&cg, UID));
        assert!(!cgroup_names_pod("0::/user.slice/session-1.scope\n", UID));
        assert!(!cgroup_names_pod(
            &format!("0::/kubepods/pod{UID}/c\n"),
            "5f3c2a10"
        ));
    }
}
