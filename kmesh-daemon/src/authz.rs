//! Dual-engine authorization, the kernel half: loads the XDP programs
//! (`kmesh_authz` entry + `kmesh_authz_eval`, chained through
//! `KM_AZ_PROGS`), writes the tables `xds_adapter::workload` compiled, and
//! attaches the entry program to a workload's interface inside its network
//! namespace (where packets to the pod arrive).
//!
//! With a pin directory the tables are pinned maps shared by every daemon
//! generation, and each attachment is a pinned XDP link
//! (`links/kmesh_authz-<netns inode>-<ifname>@<pid>`). A restarted daemon
//! swaps its own entry program into the existing link (`bpf_link_update`,
//! atomic: a packet sees the old or the new program, never none) and points
//! the pinned tail-call array at its evaluation program; both read the same
//! tables. So authorization never stops across a restart, `kill -9`
//! included: there is no fail-open window.
//!
//! Writes replace the tables: new entries first, then stale ones removed.
//! Chain ids are reused across writes, so a connection arriving during a
//! rewrite may see a mix of two configs' slots; the daemon writes the local
//! config once at start (live policy updates with make-before-break chains
//! are future work, with the delta ADS client).

use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, ProgramArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode,
    },
    Ebpf,
};
use kmesh_abi::authz::{
    stats, AzCidr, AzIdentity, AzIp, AzMatch, AzSlot, AzSlotKey, AzValueKey, AzWorkload,
};
use xds_adapter::workload::AuthzTables;

use crate::dataplane::DataplaneError;
use crate::dataplane::{map_io, program, take};

/// Entry and evaluation programs.
pub const ENTRY: &str = "kmesh_authz";
pub const EVAL: &str = "kmesh_authz_eval";

/// Authorization maps pinned with the dataplane's maps (all but the event
/// ring): the tables and the tail-call array must outlive the daemon for
/// pinned XDP links to keep deciding, and every generation must share
/// them. That includes the per-CPU scratch state `KM_AZ_STATE`: between a
/// new daemon pointing `KM_AZ_PROGS` at its evaluation program and swapping
/// its entry program into the links, the old entry tail-calls the new
/// evaluation; with a scratch map of its own, the new one would read an
/// empty state, find no chain, and allow (seen here as denied connects
/// getting through during restarts).
pub const PINNED_MAPS: [&str; 10] = [
    "KM_AZ_WORKLOAD",
    "KM_AZ_IDENTITY",
    "KM_AZ_SLOT",
    "KM_AZ_MATCH",
    "KM_AZ_VALUE",
    "KM_AZ_CIDR",
    "KM_AZ_STATS",
    "KM_AZ_POLICY_STATS",
    "KM_AZ_PROGS",
    "KM_AZ_STATE",
];

/// Names of the decision counters, by index.
pub const STAT_NAMES: [&str; stats::COUNT as usize] = [
    "evaluated",
    "allowed_by_policy",
    "denied_by_policy",
    "denied_no_allow_match",
    "allowed_no_policy",
    "denied_error",
];

/// Attaching authorization to a pod's interface failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot open network namespace {netns}: {source} (hint: --enroll-netns must name a network namespace, e.g. /var/run/netns/NAME)")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching {ENTRY} to {interface} in {netns}: {detail} (hint: the interface must exist inside that namespace; --authz-interface names it)")]
    Attach {
        netns: String,
        interface: String,
        detail: String,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Policy id → `namespace/name`, shared by the tables' writer and the
/// access log so that decisions are named after the policies in force
/// when the config changes at run time.
#[derive(Debug, Clone, Default)]
pub struct PolicyNames(std::sync::Arc<std::sync::RwLock<Vec<String>>>);

impl PolicyNames {
    fn get(&self, id: usize) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn set(&self, names: &[String]) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = names.to_vec();
    }

    fn all(&self) -> Vec<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl From<Vec<String>> for PolicyNames {
    fn from(v: Vec<String>) -> Self {
        PolicyNames(std::sync::Arc::new(std::sync::RwLock::new(v)))
    }
}

pub struct Authz {
    workloads: HashMap<MapData, AzIp, AzWorkload>,
    identities: HashMap<MapData, AzIp, AzIdentity>,
    slots: HashMap<MapData, AzSlotKey, AzSlot>,
    matches: Array<MapData, AzMatch>,
    values: HashMap<MapData, AzValueKey, u32>,
    cidrs: LpmTrie<MapData, AzCidr, u32>,
    stats: PerCpuArray<MapData, u64>,
    policy_stats: PerCpuArray<MapData, u64>,
    _progs: ProgramArray<MapData>,
    policy_names: PolicyNames,
    /// (netns path, interface, mode) the entry program is attached to.
    attached: Vec<(String, String, &'static str)>,
    /// Our pinned XDP links; dropping them closes our fds, the pins stay.
    links: Vec<PinnedLink>,
}

/// Writes `want` into a hash map and removes every other key.
pub(crate) fn sync_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    want: &BTreeMap<K, V>,
) -> Result<(), DataplaneError>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    for (k, v) in want {
        map.insert(k, v, 0).map_err(map_io(name))?;
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(k))
        .collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    Ok(())
}

impl Authz {
    /// Loads both programs and links the chain. Nothing is attached yet.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let prog_err = |program| move |source| DataplaneError::Program { program, source };
        program::<Xdp>(ebpf, EVAL)?.load().map_err(prog_err(EVAL))?;
        program::<Xdp>(ebpf, ENTRY)?
            .load()
            .map_err(prog_err(ENTRY))?;
        let mut progs: ProgramArray<MapData> = take(ebpf, "KM_AZ_PROGS")?;
        let fd = program::<Xdp>(ebpf, EVAL)?.fd().map_err(prog_err(EVAL))?;
        progs.set(0, fd, 0).map_err(map_io("KM_AZ_PROGS"))?;
        Ok(Authz {
            workloads: take(ebpf, "KM_AZ_WORKLOAD")?,
            identities: take(ebpf, "KM_AZ_IDENTITY")?,
            slots: take(ebpf, "KM_AZ_SLOT")?,
            matches: take(ebpf, "KM_AZ_MATCH")?,
            values: take(ebpf, "KM_AZ_VALUE")?,
            cidrs: take(ebpf, "KM_AZ_CIDR")?,
            stats: take(ebpf, "KM_AZ_STATS")?,
            policy_stats: take(ebpf, "KM_AZ_POLICY_STATS")?,
            _progs: progs,
            policy_names: PolicyNames::default(),
            attached: Vec::new(),
            links: Vec::new(),
        })
    }

    /// Makes the kernel tables exactly `t`. Order: matches, values, CIDRs
    /// and slots (what chains point to) before identities and the workload
    /// entries that make chains reachable; stale entries last.
    pub fn write(&mut self, t: &AuthzTables) -> Result<(), DataplaneError> {
        for (i, m) in t.matches.iter().enumerate() {
            self.matches
                .set(i as u32, m, 0)
                .map_err(map_io("KM_AZ_MATCH"))?;
        }
        let values: BTreeMap<AzValueKey, u32> = t.values.iter().map(|k| (*k, 1)).collect();
        sync_hash(&mut self.values, "KM_AZ_VALUE", &values)?;
        for (len, c) in &t.cidrs {
            self.cidrs
                .insert(&Key::new(*len, *c), 1, 0)
                .map_err(map_io("KM_AZ_CIDR"))?;
        }
        let stale: Vec<Key<AzCidr>> = self
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !t.cidrs.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale {
            let _ = self.cidrs.remove(&k);
        }
        sync_hash(&mut self.slots, "KM_AZ_SLOT", &t.slots)?;
        let ids: BTreeMap<AzIp, AzIdentity> = t
            .identities
            .iter()
            .map(|(ip, id)| (xds_adapter::workload::az_ip(*ip), *id))
            .collect();
        sync_hash(&mut self.identities, "KM_AZ_IDENTITY", &ids)?;
        let wls: BTreeMap<AzIp, AzWorkload> = t
            .workloads
            .iter()
            .map(|(ip, w)| (xds_adapter::workload::az_ip(*ip), *w))
            .collect();
        sync_hash(&mut self.workloads, "KM_AZ_WORKLOAD", &wls)?;
        self.policy_names.set(&t.policy_names);
        Ok(())
    }

    /// Attaches the entry program to `ifname` inside the network namespace
    /// at `netns`. Native XDP first; generic (SKB) mode when the driver
    /// refuses. Returns the mode used (`reused` when an earlier daemon's
    /// pinned link was taken over).
    ///
    /// With `pin_dir`, the link is pinned as
    /// `links/kmesh_authz-<netns inode>-<ifname>@<pid>` and outlives the
    /// daemon; a link an earlier daemon pinned for the same interface gets
    /// this daemon's program swapped in atomically instead of a new attach
    /// (an interface takes one XDP link). Without, the attachment lives as
    /// long as the loaded program.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        netns: &Path,
        ifname: &str,
        pin_dir: Option<&Path>,
    ) -> Result<&'static str, AttachError> {
        let attach_err = |detail: String| AttachError::Attach {
            netns: netns.display().to_string(),
            interface: ifname.to_string(),
            detail,
        };
        let ns = File::open(netns).map_err(|source| AttachError::Netns {
            netns: netns.display().to_string(),
            source,
        })?;
        let ino = ns
            .metadata()
            .map_err(|source| AttachError::Netns {
                netns: netns.display().to_string(),
                source,
            })?
            .ino();
        let prog = program::<Xdp>(ebpf, ENTRY)?;
        let pin_name = format!("{ENTRY}-{ino}-{ifname}");
        let links_dir = pin_dir.map(|d| d.join("links"));
        let earlier = links_dir
            .as_deref()
            .map(|d| pinned_with_prefix(d, &format!("{pin_name}@")))
            .unwrap_or_default();
        let mut reused = None;
        for old in &earlier {
            let swapped = PinnedLink::from_pin(old)
                .map_err(|e| e.to_string())
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
                .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()));
            match swapped {
                Ok(id) => {
                    reused = Some(id);
                    break;
                }
                // A link whose interface went away is defunct: attach anew.
                Err(e) => {
                    tracing::info!(link = %old.display(), "pinned XDP link not reusable: {e}")
                }
            }
        }
        let (id, mode) = match reused {
            Some(id) => (id, "reused"),
            None => {
                let ifname_owned = ifname.to_string();
                let p: &mut Xdp = &mut *prog;
                // bpf_link_create resolves the ifindex in the calling thread's
                // network namespace: attach from a short-lived thread inside
                // it, so the daemon's own namespace never changes.
                std::thread::scope(|s| {
                    s.spawn(move || -> Result<_, String> {
                        // SAFETY: `ns` is an open namespace fd; setns changes
                        // only this thread, which ends right after.
                        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(format!(
                                "setns into {}: {}",
                                netns.display(),
                                std::io::Error::last_os_error()
                            ));
                        }
                        match p.attach(&ifname_owned, XdpMode::Driver) {
                            Ok(id) => Ok((id, "native")),
                            Err(native) => match p.attach(&ifname_owned, XdpMode::Skb) {
                                Ok(id) => Ok((id, "generic")),
                                Err(e) => Err(format!("native: {native}; generic: {e}")),
                            },
                        }
                    })
                    .join()
                    .unwrap_or_else(|_| Err("attach thread panicked".into()))
                })
                .map_err(attach_err)?
            }
        };
        if let Some(links_dir) = links_dir {
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            let link = FdLink::try_from(link).map_err(|e| {
                attach_err(format!(
                    "{e}: attached without bpf_link (netlink), which cannot be pinned"
                ))
            })?;
            let path = links_dir.join(format!("{pin_name}@{}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            self.links.push(
                link.pin(&path)
                    .map_err(|e| attach_err(format!("pinning {}: {e}", path.display())))?,
            );
            for old in earlier.iter().filter(|p| **p != path) {
                let _ = std::fs::remove_file(old);
            }
        }
        self.attached
            .push((netns.display().to_string(), ifname.to_string(), mode));
        Ok(mode)
    }

    /// Removes pinned XDP links of interfaces this daemon did not attach
    /// to (pods no longer enrolled); each detaches as its pin goes.
    /// Call after every attach of this daemon (its links end in `@<pid>`).
    pub fn remove_stale_links(&self, pin_dir: &Path) {
        let links_dir = pin_dir.join("links");
        let pid = format!("@{}", std::process::id());
        for p in pinned_with_prefix(&links_dir, &format!("{ENTRY}-")) {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if !name.ends_with(&pid) {
                tracing::info!(link = %p.display(), "removing the XDP link of an interface no longer enrolled");
                let _ = std::fs::remove_file(&p);
            }
        }
    }

    /// Runs the entry program (and its tail calls) on `packet` with
    /// `BPF_PROG_TEST_RUN`, `repeat` times; returns the XDP verdict and the
    /// kernel's mean time per run. For tests and cost measurements: the
    /// decision counters count these runs too.
    pub fn test_run(
        &self,
        ebpf: &Ebpf,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), DataplaneError> {
        use aya::programs::{TestRun, TestRunOptions};
        let prog: &Xdp = ebpf
            .program(ENTRY)
            .ok_or(DataplaneError::Map {
                map: ENTRY,
                detail: "program not in the object".into(),
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                program: ENTRY,
                source,
            })?;
        let mut out = vec![0u8; packet.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .map_err(|source| DataplaneError::Program {
                program: ENTRY,
                source,
            })?;
        Ok((r.return_value, r.duration))
    }

    /// Decision counters summed over CPUs.
    pub fn stats(&self) -> Result<BTreeMap<&'static str, u64>, DataplaneError> {
        crate::dataplane::counters(&self.stats, "KM_AZ_STATS", &STAT_NAMES)
    }

    /// The policy names of the tables written, following later writes
    /// (for [`AccessLog::take`]).
    pub fn policy_names(&self) -> PolicyNames {
        self.policy_names.clone()
    }

    /// Per-policy decision counts (`namespace/name` → connections decided).
    pub fn policy_stats(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
        let mut out = BTreeMap::new();
        for (i, name) in self.policy_names.all().iter().enumerate() {
            let v = self
                .policy_stats
                .get(&(i as u32), 0)
                .map_err(map_io("KM_AZ_POLICY_STATS"))?;
            out.insert(name.clone(), v.iter().sum());
        }
        Ok(out)
    }

    /// What the kernel holds, read back from the maps.
    pub fn dump(&self) -> Result<serde_json::Value, DataplaneError> {
        let mut workloads = Vec::new();
        for e in self.workloads.iter() {
            let (ip, w) = e.map_err(map_io("KM_AZ_WORKLOAD"))?;
            workloads.push(serde_json::json!({
                "ip": ip_of(&ip).to_string(),
                "chain_id": w.chain_id,
                "slots": w.slot_count,
                "has_allow": w.flags & kmesh_abi::authz::WL_HAS_ALLOW != 0,
            }));
        }
        let mut identities = Vec::new();
        for e in self.identities.iter() {
            let (ip, id) = e.map_err(map_io("KM_AZ_IDENTITY"))?;
            identities.push(serde_json::json!({
                "ip": ip_of(&ip).to_string(),
                "ns_id": id.ns_id,
                "principal_id": id.principal_id,
            }));
        }
        Ok(serde_json::json!({
            "workloads": workloads,
            "identities": identities,
            "slots": self.slots.keys().count(),
            "values": self.values.keys().count(),
            "cidrs": self.cidrs.keys().count(),
            "attached": self.attached.iter().map(|(n, i, m)| serde_json::json!({"netns": n, "interface": i, "mode": m})).collect::<Vec<_>>(),
            "stats": self.stats()?,
            "policy_decisions": self.policy_stats()?,
        }))
    }
}

/// Entries of `dir` whose name starts with `prefix`.
fn pinned_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn ip_of(ip: &AzIp) -> std::net::IpAddr {
    xds_adapter::addr::from_abi(&kmesh_abi::SockAddr::from_raw_v6(ip.addr, 0)).ip()
}

/// What the dual-engine admin endpoints read.
pub struct DualEngineState {
    pub config: xds_adapter::workload::LocalConfig,
    pub authz: Authz,
    /// Decisions by destination workload, counted by the [`AccessLog`] task.
    pub by_workload: std::sync::Arc<DecisionsByWorkload>,
}

/// Decisions per destination workload (`namespace/name`, `unknown` for an
/// address no workload has) and verdict, counted from the decision events.
/// A full event ring drops events, so these are a lower bound (the kernel's
/// per-outcome and per-policy counters are exact). Series: workloads × 2.
#[derive(Debug, Default)]
pub struct DecisionsByWorkload {
    names: std::collections::HashMap<std::net::IpAddr, String>,
    counts: std::sync::Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl DecisionsByWorkload {
    /// Names workload addresses from the local config.
    pub fn new(cfg: &xds_adapter::workload::LocalConfig) -> Self {
        let names = cfg
            .workloads
            .iter()
            .flat_map(|w| {
                w.ips
                    .iter()
                    .map(move |ip| (*ip, format!("{}/{}", w.namespace, w.name)))
            })
            .collect();
        DecisionsByWorkload {
            names,
            counts: Default::default(),
        }
    }

    pub fn record(&self, d: &Decision) {
        let w = self
            .names
            .get(&d.dst.ip())
            .map_or("unknown", String::as_str);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match c.get_mut(&(w.to_string(), d.verdict)) {
            Some(n) => *n += 1,
            None => {
                c.insert((w.to_string(), d.verdict), 1);
            }
        }
    }

    /// `((workload, verdict), count)`, sorted.
    pub fn snapshot(&self) -> Vec<((String, &'static str), u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// `/debug/config_dump/dual-engine`: the validated config (local file or
/// workload API), with `xds` (resources held, versions, NACKs) when it
/// comes from a control plane.
pub async fn config_dump(
    axum::extract::State(s): axum::extract::State<std::sync::Arc<crate::admin::AdminState>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut v = {
        let de = s.dual_engine.lock().unwrap_or_else(|p| p.into_inner());
        de.as_ref()
            .map(|de| serde_json::to_value(&de.config).unwrap_or_default())
    };
    // With the workload API: what is held from it, versions and NACKs.
    let xds = s.xds.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let (Some(v), Some(xds)) = (v.as_mut(), xds) {
        let status = xds.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v["xds"] = serde_json::to_value(status).unwrap_or_default();
    }
    match v {
        Some(v) => axum::Json(v).into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            "not running in dual-engine mode\n",
        )
            .into_response(),
    }
}

/// `/debug/config_dump/bpf/dual-engine`: the authorization maps and
/// decision counters, read back from the kernel.
pub async fn bpf_dump(
    axum::extract::State(s): axum::extract::State<std::sync::Arc<crate::admin::AdminState>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let de = s.dual_engine.lock().unwrap_or_else(|p| p.into_inner());
    match de.as_ref().map(|d| d.authz.dump()) {
        Some(Ok(v)) => axum::Json(v).into_response(),
        Some(Err(e)) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}\n"),
        )
            .into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            "not running in dual-engine mode\n",
        )
            .into_response(),
    }
}

/// One decision read from `KM_AZ_EVENTS`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub src: std::net::IpAddr,
    pub dst: std::net::SocketAddr,
    /// `allow` or `deny`.
    pub verdict: &'static str,
    /// `policy`, `no_allow_match` or `no_policy`.
    pub reason: &'static str,
    /// `namespace/name` of the deciding policy, when one matched.
    pub policy: Option<String>,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "authz {} src={} dst={} reason={}",
            self.verdict, self.src, self.dst, self.reason
        )?;
        if let Some(p) = &self.policy {
            write!(f, " policy={p}")?;
        }
        Ok(())
    }
}

/// The decision events of the XDP program, for the access log.
pub struct AccessLog {
    ring: aya::maps::RingBuf<MapData>,
    policy_names: PolicyNames,
    by_workload: Option<std::sync::Arc<DecisionsByWorkload>>,
}

impl AccessLog {
    /// Takes the event ring buffer out of the object; `policy_names`
    /// (`AuthzTables::policy_names`, or [`Authz::policy_names`] to follow
    /// config changes) turn policy ids into names.
    pub fn take(
        ebpf: &mut Ebpf,
        policy_names: impl Into<PolicyNames>,
    ) -> Result<Self, DataplaneError> {
        Ok(AccessLog {
            ring: take(ebpf, "KM_AZ_EVENTS")?,
            policy_names: policy_names.into(),
            by_workload: None,
        })
    }

    /// Also counts every decision [`AccessLog::run`] reads into `c`.
    pub fn counting(mut self, c: std::sync::Arc<DecisionsByWorkload>) -> Self {
        self.by_workload = Some(c);
        self
    }

    /// Every event waiting in the ring, oldest first. Does not block.
    pub fn drain(&mut self) -> Vec<Decision> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<kmesh_abi::authz::AzEvent>() {
                continue;
            }
            // SAFETY: the item holds at least one AzEvent written by the
            // kernel program (a #[repr(C)] struct of integers, every bit
            // pattern valid); read_unaligned copes with any alignment.
            let ev: kmesh_abi::authz::AzEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            out.push(Decision {
                src: ip_of(&AzIp { addr: ev.src }),
                dst: std::net::SocketAddr::new(ip_of(&AzIp { addr: ev.dst }), ev.port as u16),
                verdict: if ev.verdict == kmesh_abi::authz::VERDICT_DENY {
                    "deny"
                } else {
                    "allow"
                },
                reason: match ev.reason {
                    kmesh_abi::authz::reason::POLICY => "policy",
                    kmesh_abi::authz::reason::NO_ALLOW_MATCH => "no_allow_match",
                    _ => "no_policy",
                },
                policy: (ev.reason == kmesh_abi::authz::reason::POLICY)
                    .then(|| self.policy_names.get(ev.policy_id as usize))
                    .flatten(),
            });
        }
        out
    }

    /// Logs every decision as it arrives (target `accesslog`), until the
    /// process ends. Cost: one wakeup per batch of events (epoll on the
    /// ring buffer's fd).
    pub async fn run(self) -> std::io::Result<()> {
        // SAFETY: the fd is the ring buffer map's, owned by `self`, which
        // the AsyncFd owns: it stays open and the same for its lifetime.
        let mut fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        loop {
            let mut guard = fd.readable_mut().await?;
            let log = guard.get_inner_mut();
            for d in log.drain() {
                if let Some(c) = &log.by_workload {
                    c.record(&d);
                }
                tracing::info!(target: "accesslog", "{d}");
            }
            guard.clear_ready();
        }
    }
}

impl AsRawFd for AccessLog {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}
