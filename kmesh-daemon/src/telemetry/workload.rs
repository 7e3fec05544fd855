//! Workload identities of pods, by netns cookie and by address.
//!
//! Two sources: with `--kubernetes`, the pods of this node
//! ([`super::pods`]: workload, namespace, canonical service and revision,
//! principal); without Kubernetes an operator names a network namespace
//! (`--workload /var/run/netns/app=shop/app`), and the daemon learns its
//! netns cookie (the kernel's name for the pod's sockets) and its IP
//! addresses (how peers see it). Names given on the command line win over
//! Kubernetes'. Metrics and access log lines then carry the identities of
//! both ends instead of "unknown", as far as both ends are known.

use std::{
    collections::HashMap,
    fs::File,
    io,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

/// A workload's identity as Istio labels it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    /// Istio's canonical service (default: the workload name).
    pub canonical_service: String,
    /// Istio's canonical revision (default: `latest`).
    pub canonical_revision: String,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, when known.
    pub principal: Option<String>,
    /// The `app` and `version` labels, when present.
    pub app: Option<String>,
    pub version: Option<String>,
}

impl Workload {
    /// A workload known only by namespace and name.
    pub fn named(namespace: &str, name: &str) -> Self {
        Workload {
            namespace: namespace.to_string(),
            name: name.to_string(),
            canonical_service: name.to_string(),
            canonical_revision: "latest".into(),
            principal: None,
            app: None,
            version: None,
        }
    }
}

impl FromStr for Workload {
    type Err = String;

    /// `NAMESPACE/NAME`, both Kubernetes names (lowercase alphanumerics,
    /// `-` and `.`, at most 253 characters).
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((ns, name)) = s.split_once('/') else {
            return Err(format!("{s:?}: expected NAMESPACE/NAME, e.g. shop/web"));
        };
        for (what, v) in [("namespace", ns), ("name", name)] {
            let ok = !v.is_empty()
                && v.len() <= 253
                && v.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !ok {
                return Err(format!(
                    "{s:?}: workload {what} {v:?} is not a Kubernetes name (lowercase letters, digits, '-', '.')"
                ));
            }
        }
        Ok(Workload::named(ns, name))
    }
}

/// `--workload PATH=NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub netns: PathBuf,
    pub workload: Workload,
}

impl FromStr for WorkloadSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((path, w)) = s.rsplit_once('=') else {
            return Err(format!(
                "{s:?}: expected NETNS_PATH=NAMESPACE/NAME, e.g. /var/run/netns/app=shop/app"
            ));
        };
        if path.is_empty() {
            return Err(format!("{s:?}: empty network namespace path"));
        }
        Ok(WorkloadSpec {
            netns: PathBuf::from(path),
            workload: w.parse()?,
        })
    }
}

/// Known workloads by netns cookie and by address.
#[derive(Debug, Default, Clone)]
pub struct Workloads {
    by_cookie: HashMap<u64, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
}

impl Workloads {
    pub fn insert(&mut self, cookie: Option<u64>, ips: &[IpAddr], w: Workload) {
        let w = Arc::new(w);
        if let Some(c) = cookie {
            self.by_cookie.insert(c, w.clone());
        }
        for ip in ips {
            self.by_ip.insert(*ip, w.clone());
        }
    }

    pub fn by_cookie(&self, cookie: u64) -> Option<&Workload> {
        self.by_cookie.get(&cookie).map(|w| &**w)
    }

    /// An IPv4-mapped address is looked up as the IPv4 address.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.by_ip.get(&ip).map(|w| &**w)
    }
}

/// The non-loopback IP addresses configured in the network namespace at
/// `path`. Cost: one short-lived thread (setns changes only that thread).
pub fn addresses_of(path: &Path) -> io::Result<Vec<IpAddr>> {
    let ns = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    let shown = path.display().to_string();
    std::thread::spawn(move || -> io::Result<Vec<IpAddr>> {
        // SAFETY: `ns` is an open namespace fd; setns changes only this
        // thread, which ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("setns into {shown} (is it a network namespace?): {e}"),
            ));
        }
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs allocates the list and stores its head in `head`.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
            let ifa = unsafe { &*cur };
            if !ifa.ifa_addr.is_null() {
                // SAFETY: ifa_addr points to a sockaddr whose family says
                // which sockaddr_* it is.
                let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
                let ip = match family {
                    libc::AF_INET => {
                        // SAFETY: an AF_INET address is a sockaddr_in.
                        let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                        Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
                    }
                    libc::AF_INET6 => {
                        // SAFETY: an AF_INET6 address is a sockaddr_in6.
                        let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if let Some(ip) = ip.filter(|ip| !ip.is_loopback()) {
                    out.push(ip);
                }
            }
            cur = ifa.ifa_next;
        }
        // SAFETY: `head` came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(head) };
        out.sort();
        out.dedup();
        Ok(out)
    })
    .join()
    .map_err(|_| io::Error::other("address listing thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s: WorkloadSpec = "/var/run/netns/a=b=shop/web-1".parse().unwrap();
        assert_eq!(s.netns, PathBuf::from("/var/run/netns/a=b"));
        assert_eq!(s.workload.namespace, "shop");
        assert_eq!(s.workload.name, "web-1");
        let e = "/x=Shop/web".parse::<WorkloadSpec>().unwrap_err();
        assert!(e.contains("namespace \"Shop\""), "{e}");
        assert!("/x=web"
            .parse::<WorkloadSpec>()
            .unwrap_err()
            .contains("NAMESPACE/NAME"));
        assert!("shop/web"
            .parse::<WorkloadSpec>()
            .unwrap_err()
            .contains("NETNS_PATH="));
    }

    #[test]
    fn mapped_v4_finds_the_v4_workload() {
        let mut w = Workloads::default();
        w.insert(
            Some(7),
            &["10.244.0.2".parse().unwrap()],
            "shop/web".parse().unwrap(),
        );
        assert_eq!(
            w.by_ip("::ffff:10.244.0.2".parse().unwrap()).unwrap().name,
            "web"
        );
        assert_eq!(w.by_cookie(7).unwrap().namespace, "shop");
        assert!(w.by_cookie(8).is_none());
    }
}
