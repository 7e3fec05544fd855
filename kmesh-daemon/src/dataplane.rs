//! The kernel half of the daemon: loads the embedded eBPF object, owns its
//! maps and programs, attaches the programs to a cgroup v2 directory, and
//! writes configs through [`ServiceTable`].
//!
//! Lifetime: programs stay attached exactly as long as the [`Dataplane`]
//! lives (aya's cgroup links are detached on drop); pins made under
//! `pin_dir` are removed on drop too.

use std::{
    collections::BTreeMap,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use kmesh_abi::{stats, ServiceValue, SlotKey, SockAddr, LB_RANDOM};
use xds_adapter::FlatConfig;

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

/// Names of the maps, as bpftool shows them.
pub const MAPS: [&str; 6] = [
    "KM_MANAGE",
    "KM_SERVICE",
    "KM_SLOT",
    "KM_RR",
    "KM_ORIGDST",
    "KM_STATS",
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
    #[error("pinning map {map} at {path}: {detail} (hint: is --bpf-fs-path on a bpffs, and left over from an earlier run? remove it with `rm -r`)")]
    Pin {
        map: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("map {map}: {detail}")]
    MapIo { map: &'static str, detail: String },
}

/// Where to pin maps; `None` loads without pins (tests).
#[derive(Debug, Clone, Default)]
pub struct DataplaneOptions {
    pub pin_dir: Option<PathBuf>,
}

/// The loaded kernel side.
pub struct Dataplane {
    ebpf: Ebpf,
    manage: HashMap<MapData, u64, u32>,
    maps: KernelMaps,
    stats: PerCpuArray<MapData, u64>,
    table: ServiceTable,
    attached_to: Option<PathBuf>,
    /// Declared last: dropped after the maps and programs it pins.
    _pins: Pins,
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

/// Pins made by this dataplane; removed (with the directory, if this
/// dataplane made it) on drop, also when a later load step fails.
#[derive(Default)]
struct Pins {
    paths: Vec<PathBuf>,
    made_dir: Option<PathBuf>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
        if let Some(d) = &self.made_dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Pins {
    fn pin(
        &mut self,
        dir: Option<&Path>,
        name: &'static str,
        map: &Map,
    ) -> Result<(), DataplaneError> {
        let Some(dir) = dir else { return Ok(()) };
        let path = dir.join(name);
        map.pin(&path).map_err(|e| DataplaneError::Pin {
            map: name,
            path: path.clone(),
            detail: e.to_string(),
        })?;
        self.paths.push(path);
        Ok(())
    }
}

fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    pins: &mut Pins,
    pin_dir: Option<&Path>,
) -> Result<T, DataplaneError>
where
    T: TryFrom<Map>,
    T::Error: std::fmt::Display,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::Map {
        map: name,
        detail: "not in the object".into(),
    })?;
    pins.pin(pin_dir, name, &map)?;
    T::try_from(map).map_err(|e| DataplaneError::Map {
        map: name,
        detail: e.to_string(),
    })
}

/// One service as read back from the kernel maps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelService {
    pub vip: SocketAddr,
    pub service_id: u32,
    pub lb_policy: &'static str,
    pub slots: Vec<SocketAddr>,
}

/// Everything the kernel holds, read back from the maps (not from the
/// daemon's memory), so it can be compared with the config.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelDump {
    pub services: Vec<KernelService>,
    pub enrolled_netns: Vec<u64>,
    pub stats: BTreeMap<&'static str, u64>,
}

/// Names of the `KM_STATS` counters, by index.
pub const STAT_NAMES: [&str; stats::COUNT as usize] = [
    "connect_seen",
    "connect_enrolled",
    "connect_redirected",
    "connect_no_endpoint",
    "connect_family_mismatch",
    "peername_restored",
];

impl Dataplane {
    /// Loads programs and maps into the kernel (nothing attached yet, so
    /// no socket is affected until [`Dataplane::attach`]).
    pub fn load(opts: &DataplaneOptions) -> Result<Self, DataplaneError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        for name in CONNECT_PROGRAMS {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program {
                    program: name,
                    source,
                })?;
        }
        let mut pins = Pins::default();
        let pin_dir = opts.pin_dir.as_deref();
        if let Some(dir) = pin_dir {
            if !dir.exists() {
                pins.made_dir = Some(dir.to_path_buf());
            }
            std::fs::create_dir_all(dir).map_err(|e| DataplaneError::Pin {
                map: "(directory)",
                path: dir.to_path_buf(),
                detail: e.to_string(),
            })?;
        }
        let manage = take(&mut ebpf, "KM_MANAGE", &mut pins, pin_dir)?;
        let service = take(&mut ebpf, "KM_SERVICE", &mut pins, pin_dir)?;
        let slot = take(&mut ebpf, "KM_SLOT", &mut pins, pin_dir)?;
        let stats = take(&mut ebpf, "KM_STATS", &mut pins, pin_dir)?;
        // Used only by the kernel; pinned for inspection with bpftool.
        for name in ["KM_RR", "KM_ORIGDST"] {
            if let Some(map) = ebpf.map(name) {
                pins.pin(pin_dir, name, map)?;
            }
        }
        Ok(Dataplane {
            ebpf,
            manage,
            maps: KernelMaps { service, slot },
            stats,
            table: ServiceTable::new(),
            attached_to: None,
            _pins: pins,
        })
    }

    /// Attaches the connect and getpeername programs to a cgroup v2
    /// directory; every socket of a process in it or below it is then seen.
    /// Write the config first: from here on, connects are routed.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        let file = File::open(cgroup).map_err(|source| DataplaneError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        for name in CONNECT_PROGRAMS {
            // With bpf_link (Linux 5.7+, what aya uses here) cgroup
            // attachments always coexist with other programs; the kernel
            // rejects any flag on link_create, so the mode must be Single.
            program(&mut self.ebpf, name)?
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|source| DataplaneError::Attach {
                    program: name,
                    cgroup: cgroup.to_path_buf(),
                    source,
                })?;
        }
        self.attached_to = Some(cgroup.to_path_buf());
        Ok(())
    }

    /// The cgroup the programs are attached to, if any.
    pub fn attached_to(&self) -> Option<&Path> {
        self.attached_to.as_deref()
    }

    /// Makes the kernel route for exactly the services in `cfg`. On error
    /// the kernel keeps the previous config.
    pub fn apply(&mut self, cfg: &FlatConfig) -> Result<ApplySummary, DataplaneError> {
        let desired: BTreeMap<SockAddr, DesiredService> = cfg
            .services
            .values()
            .map(|s| {
                (
                    xds_adapter::addr::to_abi(s.vip),
                    DesiredService {
                        lb_policy: s.lb_policy,
                        slots: s
                            .slots
                            .iter()
                            .map(|a| xds_adapter::addr::to_abi(*a))
                            .collect(),
                    },
                )
            })
            .collect();
        Ok(self.table.apply(&mut self.maps, &desired)?)
    }

    /// Rewrites only the services at `vips` (taken from `cfg`), leaving all
    /// others untouched: the incremental path for endpoint changes. A VIP
    /// not in `cfg` is ignored. On error the kernel keeps the previous
    /// records of those services.
    pub fn apply_services(
        &mut self,
        cfg: &FlatConfig,
        vips: &[SocketAddr],
    ) -> Result<ApplySummary, DataplaneError> {
        let some: BTreeMap<SockAddr, DesiredService> = vips
            .iter()
            .filter_map(|v| cfg.services.get(v))
            .map(|s| {
                (
                    xds_adapter::addr::to_abi(s.vip),
                    DesiredService {
                        lb_policy: s.lb_policy,
                        slots: s
                            .slots
                            .iter()
                            .map(|a| xds_adapter::addr::to_abi(*a))
                            .collect(),
                    },
                )
            })
            .collect();
        Ok(self.table.apply_subset(&mut self.maps, &some)?)
    }

    /// Puts a network namespace (by cookie) under management.
    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), DataplaneError> {
        self.manage
            .insert(netns_cookie, 1, 0)
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
        let mut out = BTreeMap::new();
        for (i, name) in STAT_NAMES.iter().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|e| DataplaneError::MapIo {
                    map: "KM_STATS",
                    detail: e.to_string(),
                })?;
            out.insert(*name, v.iter().sum());
        }
        Ok(out)
    }

    /// Reads services, slots and enrollment back from the kernel maps.
    pub fn dump(&self) -> Result<KernelDump, DataplaneError> {
        let io = |map: &'static str| {
            move |e: aya::maps::MapError| DataplaneError::MapIo {
                map,
                detail: e.to_string(),
            }
        };
        let mut services = Vec::new();
        for entry in self.maps.service.iter() {
            let (vip, v) = entry.map_err(io("KM_SERVICE"))?;
            let mut slots = Vec::with_capacity(v.slot_count as usize);
            for n in 0..v.slot_count {
                let key = SlotKey {
                    service_id: v.service_id,
                    slot: n,
                };
                let b = self.maps.slot.get(&key, 0).map_err(io("KM_SLOT"))?;
                slots.push(xds_adapter::addr::from_abi(&b));
            }
            services.push(KernelService {
                vip: xds_adapter::addr::from_abi(&vip),
                service_id: v.service_id,
                lb_policy: if v.lb_policy == LB_RANDOM {
                    "RANDOM"
                } else {
                    "ROUND_ROBIN"
                },
                slots,
            });
        }
        services.sort_by_key(|s| s.vip);
        let mut enrolled_netns = Vec::new();
        for k in self.manage.keys() {
            enrolled_netns.push(k.map_err(io("KM_MANAGE"))?);
        }
        enrolled_netns.sort_unstable();
        Ok(KernelDump {
            services,
            enrolled_netns,
            stats: self.stats()?,
        })
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

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DataplaneError> {
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
