//! The kernel half of the daemon: loads the embedded eBPF object, owns its
//! maps and programs, attaches the programs to a cgroup v2 directory, and
//! writes configs through [`ServiceTable`].
//!
//! Lifetime. Without a pin directory, programs stay attached exactly as long
//! as the [`Dataplane`] lives. With one (`<bpf-fs-path>/kmesh`), maps and
//! cgroup links are pinned there:
//!
//! ```text
//! <pin_dir>/KM_ABI, KM_MANAGE, KM_SERVICE, …   maps (KM_ABI[0] = ABI version)
//! <pin_dir>/links/<program>@<pid>             one cgroup link per program
//! <pin_dir>/links/kmesh_authz-<netns inode>-<ifname>@<pid>
//!                                             one XDP link per pod interface
//! ```
//!
//! so the kernel keeps routing when the daemon dies. A new daemon reuses
//! maps of the same ABI version (its view of what is installed is read back
//! from them, so a restart with the same config writes nothing), attaches
//! its own programs next to the old ones, pins them, and only then removes
//! the old links: at every instant at least one pinned link routes. Running
//! two generations of the connect program at once is harmless: the first
//! rewrites VIP → backend, and the second sees no VIP. Maps of another ABI
//! version are moved aside (`<pin_dir>-retired-<pid>`; bpffs refuses names with a dot) and removed once the
//! new programs are attached. Dropping the dataplane removes every pin
//! unless [`Dataplane::keep_pinned`] was called.

use std::{
    collections::BTreeMap,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray, ProgramArray},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use kmesh_abi::{
    stage, stats,
    waypoint::{self, MANAGE_ENROLLED},
    ServiceValue, SlotKey, SockAddr, ABI_VERSION, LB_LEAST_REQUEST, LB_MAGLEV, LB_RANDOM,
};
use xds_adapter::{workload::WaypointTable, FlatConfig};

use crate::writer::{
    ApplyError, ApplySummary, DesiredService, MapOpError, ServiceMaps, ServiceTable,
};

/// The kernel programs, built by `build.rs` from `kmesh-ebpf/`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kmesh-ebpf.o"));

/// The cgroup sock_addr programs in the object, in attach order.
pub const CONNECT_PROGRAMS: [&str; 4] = [
    "kmesh_connect4",
    "kmesh_connect6",
    "kmesh_getpeername4",
    "kmesh_getpeername6",
];

/// The tail-called stages of the connect pipeline: (program array, index,
/// program), see `kmesh-ebpf/src/main.rs`.
pub const CONNECT_STAGES: [(&str, u32, &str); 10] = [
    (
        "KM_CONNECT4_STAGES",
        stage::ROUND_ROBIN,
        "kmesh_connect4_rr",
    ),
    ("KM_CONNECT4_STAGES", stage::RANDOM, "kmesh_connect4_random"),
    (
        "KM_CONNECT4_STAGES",
        stage::LEAST_REQUEST,
        "kmesh_connect4_lr",
    ),
    ("KM_CONNECT4_STAGES", stage::MAGLEV, "kmesh_connect4_maglev"),
    (
        "KM_CONNECT4_STAGES",
        stage::ENDPOINT,
        "kmesh_connect4_endpoint",
    ),
    (
        "KM_CONNECT6_STAGES",
        stage::ROUND_ROBIN,
        "kmesh_connect6_rr",
    ),
    ("KM_CONNECT6_STAGES", stage::RANDOM, "kmesh_connect6_random"),
    (
        "KM_CONNECT6_STAGES",
        stage::LEAST_REQUEST,
        "kmesh_connect6_lr",
    ),
    ("KM_CONNECT6_STAGES", stage::MAGLEV, "kmesh_connect6_maglev"),
    (
        "KM_CONNECT6_STAGES",
        stage::ENDPOINT,
        "kmesh_connect6_endpoint",
    ),
];

/// The connection-tracking `sockops` program (see `kmesh-ebpf/src/sockops.rs`).
pub const SOCKOPS_PROGRAM: &str = "kmesh_sockops";

/// Gives back the connection counts of a steered socket when it is
/// released (see `kmesh-ebpf/src/main.rs`).
pub const SOCK_RELEASE_PROGRAM: &str = "kmesh_sock_release";
/// The `sk_msg` program that sends the PROXY v2 header to waypoints
/// (see `kmesh-ebpf/src/waypoint.rs`), attached to the `KM_WP_SOCKS` sockhash.
pub const WAYPOINT_PROGRAM: &str = "kmesh_waypoint_msg";

/// Waypoint maps, pinned so that steering survives a daemon restart.
/// (`KM_WP_SOCKS` is not: each daemon's sockops and sk_msg programs use
/// their own sockhash, and a socket stays in the one it joined.)
pub const WAYPOINT_MAPS: [&str; 4] = ["KM_WAYPOINT", "KM_WP_CONN", "KM_WP_PENDING", "KM_WP_STATS"];

/// Names of the `KM_WP_STATS` counters, by index.
pub const WAYPOINT_STAT_NAMES: [&str; waypoint::stats::COUNT as usize] = [
    "steered",
    "sockhash_added",
    "sockhash_failed",
    "header_sent",
    "header_failed",
];

/// Programs attached to the cgroup, one pinned link each: the connect and
/// getpeername programs, sockops and sock_release.
pub const CGROUP_LINKS: usize = CONNECT_PROGRAMS.len() + 2;

/// Connection-telemetry maps (handed to `telemetry::Telemetry`), pinned
/// for inspection too (`bpftool map dump pinned <pin dir>/KM_CONN`).
pub const TELEMETRY_MAPS: [&str; 3] = ["KM_CONN", "KM_TELEMETRY", "KM_TELEMETRY_CFG"];

/// Names of the maps, as bpftool shows them. All are pinned: the stage
/// arrays and the per-CPU connect state too, so that during a restart the
/// old entry program and the new stages share them, and the connection
/// counters so that active counts survive the daemon.
pub const MAPS: [&str; 14] = [
    "KM_ABI",
    "KM_MANAGE",
    "KM_SERVICE",
    "KM_SLOT",
    "KM_RR",
    "KM_ORIGDST",
    "KM_STATS",
    "KM_CONNECT4_STAGES",
    "KM_CONNECT6_STAGES",
    "KM_CONNECT_CTX",
    "KM_CX_ACTIVE",
    "KM_CX_OVERFLOW",
    "KM_EP_ACTIVE",
    "KM_STEERED",
];

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object failed: {0} (hint: needs root or CAP_BPF+CAP_NET_ADMIN, and Linux 5.15+ with BTF)")]
    Load(#[from] aya::EbpfError),
    #[error(
        "eBPF program {program}: {source} (hint: run with `RUST_LOG=debug` for the verifier log)"
    )]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to cgroup {cgroup}: {source} (hint: --cgroup2-path must be a directory on a cgroup v2 mount)")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {path}: {source} (hint: --cgroup2-path must be a directory on a cgroup v2 mount)")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map} missing from the eBPF object or of the wrong type: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("pinned state at {path}: {detail} (hint: is --bpf-fs-path on a bpffs? `kmesh-daemon uninstall` removes pinned state)")]
    Pin { path: PathBuf, detail: String },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("map {map}: {detail}")]
    MapIo { map: &'static str, detail: String },
}

/// Where to pin maps and links; `None` loads without pins (tests).
#[derive(Debug, Clone, Default)]
pub struct DataplaneOptions {
    pub pin_dir: Option<PathBuf>,
    /// Size of the connection-event ring buffer in bytes (a power-of-two
    /// multiple of the page size); `None` = `kmesh_abi::EVENT_RING_BYTES`.
    pub event_ring_bytes: Option<u32>,
}

/// How [`Dataplane::load`] found the pin directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PinnedState {
    /// No pin directory, or an empty one: everything created fresh.
    Fresh,
    /// Maps of this ABI version reused, with what they held.
    Reused,
    /// Maps of another ABI version (the one given) moved aside; fresh maps.
    Migrated { from_abi: u32 },
}

/// The loaded kernel side.
pub struct Dataplane {
    ebpf: Ebpf,
    manage: HashMap<MapData, u64, u32>,
    waypoints: HashMap<MapData, SockAddr, SockAddr>,
    wp_stats: PerCpuArray<MapData, u64>,
    maps: KernelMaps,
    stats: PerCpuArray<MapData, u64>,
    /// The connect pipeline's program arrays (kept: dropping the last
    /// user reference of an unpinned program array empties it).
    _stages: Vec<ProgramArray<MapData>>,
    cx_active: HashMap<MapData, u32, u64>,
    cx_overflow: HashMap<MapData, u32, u64>,
    /// Cluster id → name, of the clusters in the last applied config.
    cluster_names: BTreeMap<u32, String>,
    table: ServiceTable,
    attached_to: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    pinned_state: PinnedState,
    /// Our pinned links; dropping them closes our fds, the pins stay.
    links: Vec<aya::programs::links::PinnedLink>,
    keep_pinned: bool,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if self.keep_pinned {
            return;
        }
        // Removing the pins drops the kernel's last reference to the links
        // once our own fds close (right after this, with the fields), which
        // detaches the programs; the maps go with the programs.
        if let Some(dir) = &self.pin_dir {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), "removing pinned state: {e}");
            }
        }
    }
}

struct KernelMaps {
    service: HashMap<MapData, SockAddr, ServiceValue>,
    slot: HashMap<MapData, SlotKey, SockAddr>,
}

impl ServiceMaps for KernelMaps {
    fn put_slot(&mut self, key: SlotKey, backend: SockAddr) -> Result<(), MapOpError> {
        self.slot
            .insert(key, backend, 0)
            .map_err(|e| op_err("KM_SLOT", "update", e))
    }
    fn del_slot(&mut self, key: SlotKey) -> Result<(), MapOpError> {
        self.slot
            .remove(&key)
            .map_err(|e| op_err("KM_SLOT", "delete", e))
    }
    fn put_service(&mut self, vip: SockAddr, value: ServiceValue) -> Result<(), MapOpError> {
        self.service
            .insert(vip, value, 0)
            .map_err(|e| op_err("KM_SERVICE", "update", e))
    }
    fn del_service(&mut self, vip: SockAddr) -> Result<(), MapOpError> {
        self.service
            .remove(&vip)
            .map_err(|e| op_err("KM_SERVICE", "delete", e))
    }
}

fn op_err(map: &'static str, op: &'static str, e: aya::maps::MapError) -> MapOpError {
    MapOpError {
        map,
        op,
        reason: e.to_string(),
    }
}

/// Turns a failed map operation on `map` into a [`DataplaneError`].
pub(crate) fn map_io(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::MapIo {
        map,
        detail: e.to_string(),
    }
}

/// Per-CPU counters of `map` (index = position in `names`) summed over CPUs.
pub(crate) fn counters(
    map: &PerCpuArray<MapData, u64>,
    map_name: &'static str,
    names: &[&'static str],
) -> Result<BTreeMap<&'static str, u64>, DataplaneError> {
    let mut out = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let v = map.get(&(i as u32), 0).map_err(map_io(map_name))?;
        out.insert(*name, v.iter().sum());
    }
    Ok(out)
}

/// Takes map `name` out of the loaded object as a typed map.
pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map>,
    T::Error: std::fmt::Display,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::Map {
        map: name,
        detail: "not in the object".into(),
    })?;
    T::try_from(map).map_err(|e| DataplaneError::Map {
        map: name,
        detail: e.to_string(),
    })
}

fn pin_err(path: &Path, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Pin {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// The ABI version recorded in a pinned `KM_ABI`, if there is one.
fn pinned_abi(dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(dir.join("KM_ABI")).ok()?;
    let arr = aya::maps::Array::<MapData, u32>::try_from(Map::Array(data)).ok()?;
    arr.get(&0, 0).ok()
}

/// One service as read back from the kernel maps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelService {
    pub vip: SocketAddr,
    pub service_id: u32,
    pub lb_policy: &'static str,
    /// Key of the cluster counters (0: none).
    pub cluster_id: u32,
    /// Circuit breaker (0: none).
    pub max_connections: u32,
    pub slots: Vec<SocketAddr>,
}

/// Connection counters of one cluster, from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterCounters {
    pub cluster: String,
    /// Connections steered to it and not closed yet.
    pub active: u64,
    /// Connects refused by its circuit breaker.
    pub overflow: u64,
}

/// Everything the kernel holds, read back from the maps (not from the
/// daemon's memory), so it can be compared with the config.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelDump {
    pub services: Vec<KernelService>,
    pub enrolled_netns: Vec<u64>,
    pub stats: BTreeMap<&'static str, u64>,
    /// Destination → waypoint (a destination with port 0: any port).
    pub waypoints: Vec<(SocketAddr, SocketAddr)>,
    pub waypoint_stats: BTreeMap<&'static str, u64>,
}

/// Names of the `KM_STATS` counters, by index.
pub const STAT_NAMES: [&str; stats::COUNT as usize] = [
    "connect_seen",
    "connect_enrolled",
    "connect_redirected",
    "connect_no_endpoint",
    "connect_family_mismatch",
    "peername_restored",
    "connect_overflow",
    "connect_pipeline_error",
    "connect_stage_inline",
];

impl Dataplane {
    /// Loads programs and maps into the kernel (nothing new attached yet,
    /// so no socket sees the new programs until [`Dataplane::attach`]).
    /// With a pin directory, maps pinned there by a daemon of the same ABI
    /// version are reused, and the service table is read back from them.
    pub fn load(opts: &DataplaneOptions) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        let mut pinned_state = PinnedState::Fresh;
        if let Some(dir) = &opts.pin_dir {
            match pinned_abi(dir) {
                Some(v) if v == ABI_VERSION => pinned_state = PinnedState::Reused,
                Some(v) => {
                    let retired = retired_dir(dir);
                    std::fs::rename(dir, &retired).map_err(|e| pin_err(dir, e))?;
                    pinned_state = PinnedState::Migrated { from_abi: v };
                }
                None => {}
            }
            std::fs::create_dir_all(dir.join("links")).map_err(|e| pin_err(dir, e))?;
            for name in MAPS
                .into_iter()
                .chain(TELEMETRY_MAPS)
                .chain(WAYPOINT_MAPS)
                .chain(crate::authz::PINNED_MAPS)
                .chain(["KM_EVENTS"])
            {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        if let Some(bytes) = opts.event_ring_bytes {
            loader.map_max_entries("KM_EVENTS", bytes);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in CONNECT_PROGRAMS {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program {
                    program: name,
                    source,
                })?;
        }
        let stages = load_stages(&mut ebpf)?;
        program::<CgroupSock>(&mut ebpf, SOCK_RELEASE_PROGRAM)?
            .load()
            .map_err(|source| DataplaneError::Program {
                program: SOCK_RELEASE_PROGRAM,
                source,
            })?;
        program::<SockOps>(&mut ebpf, SOCKOPS_PROGRAM)?
            .load()
            .map_err(|source| DataplaneError::Program {
                program: SOCKOPS_PROGRAM,
                source,
            })?;
        // The sk_msg program is attached to its sockhash at load: the map is
        // this daemon's own, and no socket joins it before sockops runs.
        let socks: aya::maps::SockHash<MapData, u64> = take(&mut ebpf, "KM_WP_SOCKS")?;
        let msg = program::<SkMsg>(&mut ebpf, WAYPOINT_PROGRAM)?;
        let prog_err = |source| DataplaneError::Program {
            program: WAYPOINT_PROGRAM,
            source,
        };
        msg.load().map_err(prog_err)?;
        let id = msg.attach(socks.fd()).map_err(prog_err)?;
        // The attachment (prog_attach, not a link) lasts as long as the map,
        // which the sockops program holds: dropping aya's handle would
        // detach it even when the daemon leaves its programs running.
        std::mem::forget(msg.take_link(id).map_err(prog_err)?);
        let mut abi: aya::maps::Array<MapData, u32> = take(&mut ebpf, "KM_ABI")?;
        abi.set(0, ABI_VERSION, 0)
            .map_err(|e| DataplaneError::MapIo {
                map: "KM_ABI",
                detail: e.to_string(),
            })?;
        let mut dp = Dataplane {
            manage: take(&mut ebpf, "KM_MANAGE")?,
            waypoints: take(&mut ebpf, "KM_WAYPOINT")?,
            wp_stats: take(&mut ebpf, "KM_WP_STATS")?,
            maps: KernelMaps {
                service: take(&mut ebpf, "KM_SERVICE")?,
                slot: take(&mut ebpf, "KM_SLOT")?,
            },
            stats: take(&mut ebpf, "KM_STATS")?,
            _stages: stages,
            cx_active: take(&mut ebpf, "KM_CX_ACTIVE")?,
            cx_overflow: take(&mut ebpf, "KM_CX_OVERFLOW")?,
            cluster_names: BTreeMap::new(),
            ebpf,
            table: ServiceTable::new(),
            attached_to: None,
            pin_dir: opts.pin_dir.clone(),
            pinned_state,
            links: Vec::new(),
            keep_pinned: false,
        };
        if pinned_state == PinnedState::Reused {
            dp.table = dp.read_back_table()?;
        }
        Ok(dp)
    }

    /// The loaded object, for modules that own further programs of it
    /// (dual-engine authorization).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// How the pin directory was found at load.
    pub fn pinned_state(&self) -> PinnedState {
        self.pinned_state
    }

    /// Rebuilds the service table from the kernel maps and deletes slots
    /// no service points to (left by a daemon killed in the middle of an
    /// update: staged but never switched to).
    fn read_back_table(&mut self) -> Result<ServiceTable, DataplaneError> {
        let entries = self.read_services()?;
        let live: std::collections::BTreeSet<u32> =
            entries.iter().map(|(_, v, _)| v.service_id).collect();
        let orphans: Vec<SlotKey> = self
            .maps
            .slot
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&k.service_id))
            .collect();
        for k in &orphans {
            let _ = self.maps.slot.remove(k);
        }
        if !orphans.is_empty() {
            tracing::info!(
                slots = orphans.len(),
                "removed slots left by an interrupted update"
            );
        }
        Ok(ServiceTable::from_installed(entries))
    }

    /// Leaves maps and links pinned when this dataplane is dropped, so the
    /// kernel keeps routing until the next daemon takes over.
    pub fn keep_pinned(&mut self) {
        self.keep_pinned = true;
    }

    /// Attaches the connect and getpeername programs to a cgroup v2
    /// directory; every socket of a process in it or below it is then seen.
    /// Write the config first: from here on, connects are routed.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        let file = File::open(cgroup).map_err(|source| DataplaneError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let attach_err = |name, source| DataplaneError::Attach {
            program: name,
            cgroup: cgroup.to_path_buf(),
            source,
        };
        // With bpf_link (Linux 5.7+, what aya uses here) cgroup attachments
        // always coexist with other programs; the kernel rejects any flag on
        // link_create, so the mode must be Single.
        for name in CONNECT_PROGRAMS {
            let prog = program::<CgroupSockAddr>(&mut self.ebpf, name)?;
            let id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|e| attach_err(name, e))?;
            if self.pin_dir.is_some() {
                let link = prog.take_link(id).map_err(|e| attach_err(name, e))?;
                self.pin_link(name, link.try_into())?;
            }
        }
        let prog = program::<SockOps>(&mut self.ebpf, SOCKOPS_PROGRAM)?;
        let id = prog
            .attach(&file, CgroupAttachMode::Single)
            .map_err(|e| attach_err(SOCKOPS_PROGRAM, e))?;
        if self.pin_dir.is_some() {
            let link = prog
                .take_link(id)
                .map_err(|e| attach_err(SOCKOPS_PROGRAM, e))?;
            self.pin_link(SOCKOPS_PROGRAM, link.try_into())?;
        }
        let prog = program::<CgroupSock>(&mut self.ebpf, SOCK_RELEASE_PROGRAM)?;
        let id = prog
            .attach(&file, CgroupAttachMode::Single)
            .map_err(|e| attach_err(SOCK_RELEASE_PROGRAM, e))?;
        if self.pin_dir.is_some() {
            let link = prog
                .take_link(id)
                .map_err(|e| attach_err(SOCK_RELEASE_PROGRAM, e))?;
            self.pin_link(SOCK_RELEASE_PROGRAM, link.try_into())?;
        }
        if let Some(dir) = &self.pin_dir {
            if let Some(parent) = dir.parent() {
                for retired in retired_dirs(dir, parent) {
                    let _ = std::fs::remove_dir_all(&retired);
                    tracing::info!(dir = %retired.display(), "removed pinned state of another ABI version");
                }
            }
        }
        self.attached_to = Some(cgroup.to_path_buf());
        Ok(())
    }

    /// Pins our link of `program` as `links/<program>@<pid>`, then removes
    /// the pins of earlier daemons' links of the same program (which
    /// detaches them): there is never a moment without a pinned link.
    fn pin_link(
        &mut self,
        program: &'static str,
        link: Result<aya::programs::links::FdLink, aya::programs::links::LinkError>,
    ) -> Result<(), DataplaneError> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        let link = link.map_err(|e| pin_err(dir, e))?;
        let links = dir.join("links");
        let path = links.join(format!("{program}@{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        self.links
            .push(link.pin(&path).map_err(|e| pin_err(&path, e))?);
        remove_links_except(&links, program, &path);
        Ok(())
    }

    /// Hands a map still held by the loaded object over to its user (the
    /// telemetry reader takes `KM_EVENTS`, `KM_TELEMETRY`, `KM_TELEMETRY_CFG`
    /// and `KM_CONN`); `None` if it is not there or already taken.
    pub fn take_map(&mut self, name: &str) -> Option<Map> {
        self.ebpf.take_map(name)
    }

    /// Kernel ids of every loaded program of the object, by name.
    pub fn all_program_ids(&self) -> Vec<(String, u32)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| Some((name.to_string(), p.info().ok()?.id())))
            .collect()
    }

    /// The cgroup the programs are attached to, if any.
    pub fn attached_to(&self) -> Option<&Path> {
        self.attached_to.as_deref()
    }

    /// Makes the kernel route for exactly the services in `cfg`. On error
    /// the kernel keeps the previous config.
    pub fn apply(&mut self, cfg: &FlatConfig) -> Result<ApplySummary, DataplaneError> {
        self.cluster_names = cfg
            .services
            .values()
            .filter_map(|s| Some((s.cluster_id, s.cluster.clone()?)))
            .collect();
        let desired: BTreeMap<SockAddr, DesiredService> =
            cfg.services.values().map(desired_record).collect();
        Ok(self.table.apply(&mut self.maps, &desired)?)
    }

    /// Makes the set of managed network namespaces exactly `want`.
    pub fn set_enrolled(
        &mut self,
        want: &std::collections::BTreeSet<u64>,
    ) -> Result<(), DataplaneError> {
        let have: Vec<u64> = self.manage.keys().filter_map(Result::ok).collect();
        for c in have.iter().filter(|c| !want.contains(c)) {
            self.unenroll(*c)?;
        }
        // Namespaces already enrolled keep their entry (and its flags).
        for c in want.iter().filter(|c| !have.contains(c)) {
            self.enroll(*c)?;
        }
        Ok(())
    }

    /// Enrolls a network namespace that runs a waypoint: its connects are
    /// routed like any enrolled pod's, but never steered to a waypoint
    /// (which would loop back to it).
    pub fn enroll_waypoint(&mut self, netns_cookie: u64) -> Result<(), DataplaneError> {
        self.enroll_with(netns_cookie, MANAGE_ENROLLED | waypoint::MANAGE_WAYPOINT)
    }

    /// Makes the destination → waypoint table exactly `table`: new and
    /// changed entries first, stale ones after. Each entry is one atomic
    /// update, so a connect sees either the old or the new waypoint.
    pub fn set_waypoints(&mut self, table: &WaypointTable) -> Result<(), DataplaneError> {
        let want: BTreeMap<SockAddr, SockAddr> = table
            .iter()
            .map(|(d, w)| (xds_adapter::addr::to_abi(*d), xds_adapter::addr::to_abi(*w)))
            .collect();
        crate::authz::sync_hash(&mut self.waypoints, "KM_WAYPOINT", &want)
    }

    /// Makes the services at `vips` what `cfg` says, leaving all others
    /// untouched: the incremental path. A VIP not in `cfg` is removed. On
    /// error the kernel keeps the previous records of those services.
    pub fn apply_services(
        &mut self,
        cfg: &FlatConfig,
        vips: &[SocketAddr],
    ) -> Result<ApplySummary, DataplaneError> {
        for s in vips.iter().filter_map(|v| cfg.services.get(v)) {
            if let Some(c) = &s.cluster {
                self.cluster_names.insert(s.cluster_id, c.clone());
            }
        }
        let some: BTreeMap<SockAddr, DesiredService> = vips
            .iter()
            .filter_map(|v| cfg.services.get(v))
            .map(desired_record)
            .collect();
        let gone: Vec<SockAddr> = vips
            .iter()
            .filter(|v| !cfg.services.contains_key(v))
            .map(|v| xds_adapter::addr::to_abi(*v))
            .collect();
        Ok(self.table.apply_subset(&mut self.maps, &some, &gone)?)
    }

    /// Puts a network namespace (by cookie) under management.
    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), DataplaneError> {
        self.enroll_with(netns_cookie, MANAGE_ENROLLED)
    }

    fn enroll_with(&mut self, netns_cookie: u64, bits: u32) -> Result<(), DataplaneError> {
        self.manage
            .insert(netns_cookie, bits, 0)
            .map_err(|e| DataplaneError::MapIo {
                map: "KM_MANAGE",
                detail: format!("enrolling netns cookie {netns_cookie}: {e}"),
            })?;
        Ok(())
    }

    /// Takes a network namespace out of management; its new connects are
    /// left alone from now on.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), DataplaneError> {
        match self.manage.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                return Err(DataplaneError::MapIo {
                    map: "KM_MANAGE",
                    detail: format!("removing netns cookie {netns_cookie}: {e}"),
                })
            }
        }
        Ok(())
    }

    /// Kernel counters summed over CPUs.
    pub fn stats(&self) -> Result<BTreeMap<&'static str, u64>, DataplaneError> {
        counters(&self.stats, "KM_STATS", &STAT_NAMES)
    }

    /// Every service entry with its slots, as the kernel holds them: one
    /// walk of `KM_SERVICE` and one lookup per slot.
    fn read_services(
        &self,
    ) -> Result<Vec<(SockAddr, ServiceValue, Vec<SockAddr>)>, DataplaneError> {
        let mut out = Vec::new();
        for entry in self.maps.service.iter() {
            let (vip, v) = entry.map_err(map_io("KM_SERVICE"))?;
            let slots = (0..v.slot_count)
                .map(|slot| {
                    let key = SlotKey {
                        service_id: v.service_id,
                        slot,
                    };
                    self.maps.slot.get(&key, 0).map_err(map_io("KM_SLOT"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.push((vip, v, slots));
        }
        Ok(out)
    }

    /// Reads services, slots and enrollment back from the kernel maps.
    pub fn dump(&self) -> Result<KernelDump, DataplaneError> {
        let mut services: Vec<KernelService> = self
            .read_services()?
            .into_iter()
            .map(|(vip, v, slots)| KernelService {
                vip: xds_adapter::addr::from_abi(&vip),
                service_id: v.service_id,
                lb_policy: match v.lb_policy {
                    LB_RANDOM => "RANDOM",
                    LB_LEAST_REQUEST => "LEAST_REQUEST",
                    LB_MAGLEV => "MAGLEV",
                    _ => "ROUND_ROBIN",
                },
                cluster_id: v.cluster_id,
                max_connections: v.max_connections,
                slots: slots.iter().map(xds_adapter::addr::from_abi).collect(),
            })
            .collect();
        services.sort_by_key(|s| s.vip);
        let mut enrolled_netns = Vec::new();
        for k in self.manage.keys() {
            enrolled_netns.push(k.map_err(map_io("KM_MANAGE"))?);
        }
        enrolled_netns.sort_unstable();
        let mut waypoints = Vec::new();
        for e in self.waypoints.iter() {
            let (d, w) = e.map_err(map_io("KM_WAYPOINT"))?;
            waypoints.push((
                xds_adapter::addr::from_abi(&d),
                xds_adapter::addr::from_abi(&w),
            ));
        }
        waypoints.sort_unstable();
        Ok(KernelDump {
            services,
            enrolled_netns,
            stats: self.stats()?,
            waypoints,
            waypoint_stats: self.waypoint_stats()?,
        })
    }

    /// Active-connection and overflow counts of the clusters of the applied
    /// config (a cluster never connected to has none yet and reads 0).
    pub fn cluster_counters(&self) -> Vec<ClusterCounters> {
        self.cluster_names
            .iter()
            .map(|(id, name)| ClusterCounters {
                cluster: name.clone(),
                active: self.cx_active.get(id, 0).unwrap_or(0),
                overflow: self.cx_overflow.get(id, 0).unwrap_or(0),
            })
            .collect()
    }

    /// Waypoint counters summed over CPUs.
    pub fn waypoint_stats(&self) -> Result<BTreeMap<&'static str, u64>, DataplaneError> {
        counters(&self.wp_stats, "KM_WP_STATS", &WAYPOINT_STAT_NAMES)
    }

    /// Kernel ids of the loaded programs, by name (for bpftool and bpf_stats).
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        CONNECT_PROGRAMS
            .iter()
            .filter_map(|name| {
                let p: &CgroupSockAddr = self.ebpf.program(name)?.try_into().ok()?;
                Some((*name, p.info().ok()?.id()))
            })
            .collect()
    }
}

/// `<dir>-retired-<pid>` (bpffs refuses names containing a dot): where maps of another ABI version wait until
/// the new programs are attached.
fn retired_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!("-retired-{}", std::process::id()));
    dir.with_file_name(name)
}

fn retired_dirs(dir: &Path, parent: &Path) -> Vec<PathBuf> {
    let prefix = format!(
        "{}-retired-",
        dir.file_name().unwrap_or_default().to_string_lossy()
    );
    std::fs::read_dir(parent)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes pinned links of `program` other than `keep`; the kernel detaches
/// each as its last reference (the pin) goes.
fn remove_links_except(links: &Path, program: &str, keep: &Path) {
    let prefix = format!("{program}@");
    let Ok(rd) = std::fs::read_dir(links) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) && e.path() != keep {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Loads the connect pipeline's stages and links them into their program
/// arrays (a pinned array reused from an earlier daemon gets the new
/// programs, which read the same pinned maps).
fn load_stages(ebpf: &mut Ebpf) -> Result<Vec<ProgramArray<MapData>>, DataplaneError> {
    let mut arrays: Vec<(&'static str, ProgramArray<MapData>)> = Vec::new();
    for (array, index, name) in CONNECT_STAGES {
        let prog = program::<CgroupSockAddr>(ebpf, name)?;
        prog.load().map_err(|source| DataplaneError::Program {
            program: name,
            source,
        })?;
        let fd = prog
            .fd()
            .map_err(|source| DataplaneError::Program {
                program: name,
                source,
            })?
            .try_clone()
            .map_err(|e| DataplaneError::MapIo {
                map: array,
                detail: e.to_string(),
            })?;
        if !arrays.iter().any(|(n, _)| *n == array) {
            arrays.push((array, take(ebpf, array)?));
        }
        let (_, arr) = arrays
            .iter_mut()
            .find(|(n, _)| *n == array)
            .expect("inserted above");
        arr.set(index, &fd, 0).map_err(map_io(array))?;
    }
    Ok(arrays.into_iter().map(|(_, a)| a).collect())
}

/// A flattened service as the writer's kernel record.
fn desired_record(s: &xds_adapter::FlatService) -> (SockAddr, DesiredService) {
    (
        xds_adapter::addr::to_abi(s.vip),
        DesiredService {
            lb_policy: s.lb_policy,
            cluster_id: s.cluster_id,
            max_connections: s.max_connections,
            slots: s
                .slots
                .iter()
                .map(|a| xds_adapter::addr::to_abi(*a))
                .collect(),
        },
    )
}

/// Program `name` of the object as its concrete type (`CgroupSockAddr`,
/// `SockOps`, `Xdp`, …).
pub(crate) fn program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::Map {
            map: name,
            detail: "program not in the object".into(),
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: name,
            source,
        })
}
