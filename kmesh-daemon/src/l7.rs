//! The kernel side of HTTP/1.1 routing: loads the `kmesh_l7_msg` sk_msg
//! program onto its sockhash, writes an L7 service's hashed route tables
//! (`xds_adapter::l7`), and reads the kernel's per-connection decisions
//! for the connector.
//!
//! Lifetime: the sk_msg attachment lives as long as this value (the
//! program stays attached to the sockhash, which the object owns).

use std::io::Read;
use std::net::SocketAddr;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::SkMsg;
use kmesh_abi::l7::{l7stats, L7CondKey, L7Conn, L7Group, L7Routes, L7Service, L7VhostKey};
use kmesh_abi::SockAddr;
use xds_adapter::addr::to_abi;
use xds_adapter::l7::{cond_key, group_record, L7Records, L7Table};

use crate::dataplane::{map_io, program, take, Dataplane, DataplaneError};

/// The sk_msg program's name in the object.
pub const L7_PROGRAM: &str = "kmesh_l7_msg";

/// Names of the `KM_L7_STATS` counters, by index.
pub const L7_STAT_NAMES: [&str; l7stats::COUNT as usize] =
    ["l7_steered", "l7_decided", "l7_no_route", "l7_fallback"];

/// What [`L7Kernel::install`] wrote for one service, to remove it later.
#[derive(Debug, Clone)]
pub struct Installed {
    pub l7_id: u32,
    pub vip: SocketAddr,
    conds: Vec<L7CondKey>,
    vhosts: u32,
    groups: std::ops::Range<u32>,
}

pub struct L7Kernel {
    service: HashMap<MapData, SockAddr, L7Service>,
    by_id: HashMap<MapData, u32, L7Service>,
    cond: HashMap<MapData, L7CondKey, u64>,
    vhost: HashMap<MapData, L7VhostKey, L7Routes>,
    group: HashMap<MapData, u32, L7Group>,
    conn: HashMap<MapData, SockAddr, L7Conn>,
    stats: PerCpuArray<MapData, u64>,
    _socks: SockHash<MapData, u64>,
    seed: u64,
    next_group: u32,
    /// The sk_msg program's kernel id (for bpf_stats readers).
    program_id: u32,
}

impl L7Kernel {
    /// Loads the sk_msg program, attaches it to `KM_L7_SOCKS` and sets a
    /// fresh random hash seed.
    pub fn load(dp: &mut Dataplane) -> Result<Self, DataplaneError> {
        let ebpf = dp.ebpf_mut();
        let socks: SockHash<MapData, u64> = take(ebpf, "KM_L7_SOCKS")?;
        let prog = program::<SkMsg>(ebpf, L7_PROGRAM)?;
        let perr = |source| DataplaneError::Program {
            program: L7_PROGRAM,
            source,
        };
        prog.load().map_err(perr)?;
        prog.attach(socks.fd()).map_err(perr)?;
        let program_id = prog.info().map(|i| i.id()).unwrap_or(0);
        let mut seed = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| DataplaneError::MapIo {
                map: "KM_L7_CFG",
                detail: format!("reading a hash seed from /dev/urandom: {e}"),
            })?;
        let seed = u64::from_ne_bytes(seed);
        let mut cfg: Array<MapData, u64> = take(ebpf, "KM_L7_CFG")?;
        cfg.set(0, seed, 0).map_err(map_io("KM_L7_CFG"))?;
        Ok(L7Kernel {
            service: take(ebpf, "KM_L7_SERVICE")?,
            by_id: take(ebpf, "KM_L7_ID")?,
            cond: take(ebpf, "KM_L7_COND")?,
            vhost: take(ebpf, "KM_L7_VHOST")?,
            group: take(ebpf, "KM_L7_GROUP")?,
            conn: take(ebpf, "KM_L7_CONN")?,
            stats: take(ebpf, "KM_L7_STATS")?,
            _socks: socks,
            seed,
            next_group: 0,
            program_id,
        })
    }

    /// The kernel id of the sk_msg program (0 if unknown).
    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    /// The seed the kernel hashes with (for checking a decision's target hash).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Installs `table` as L7 service `l7_id`: connects to `vip` from
    /// enrolled pods go to `connector`. Tables first, the VIP entry last,
    /// so no connect is steered before its tables exist. Cluster names are
    /// numbered by `cluster_id`.
    pub fn install(
        &mut self,
        l7_id: u32,
        vip: SocketAddr,
        connector: SocketAddr,
        table: &L7Table,
        mut cluster_id: impl FnMut(&str) -> u32,
    ) -> Result<Installed, DataplaneError> {
        let rec: L7Records =
            table
                .records(self.seed)
                .map_err(|(field, msg)| DataplaneError::MapIo {
                    map: "KM_L7_COND",
                    detail: format!("{field}: {msg}"),
                })?;
        let base = self.next_group;
        for (i, a) in rec.actions.iter().enumerate() {
            self.group
                .insert(base + i as u32, group_record(a, &mut cluster_id), 0)
                .map_err(map_io("KM_L7_GROUP"))?;
        }
        self.next_group += rec.actions.len() as u32;
        for (k, v) in &rec.conds {
            self.cond
                .insert(cond_key(l7_id, *k), v, 0)
                .map_err(map_io("KM_L7_COND"))?;
        }
        for (vi, routes) in rec.vhosts.iter().enumerate() {
            let mut r = *routes;
            for route in r.routes.iter_mut().take(r.count as usize) {
                route.group += base;
            }
            self.vhost
                .insert(
                    L7VhostKey {
                        l7_id,
                        vhost: vi as u32,
                    },
                    r,
                    0,
                )
                .map_err(map_io("KM_L7_VHOST"))?;
        }
        let svc = L7Service {
            l7_id,
            flags: rec.flags,
            star_vhost: rec.star_vhost,
            pad: 0,
            path_prefix_lens: rec.path_prefix_lens,
            hdr_prefix_lens: rec.hdr_prefix_lens,
            connector: to_abi(connector),
            pad2: 0,
        };
        self.by_id
            .insert(l7_id, svc, 0)
            .map_err(map_io("KM_L7_ID"))?;
        self.service
            .insert(to_abi(vip), svc, 0)
            .map_err(map_io("KM_L7_SERVICE"))?;
        Ok(Installed {
            l7_id,
            vip,
            conds: rec.conds.keys().map(|k| cond_key(l7_id, *k)).collect(),
            vhosts: rec.vhosts.len() as u32,
            groups: base..self.next_group,
        })
    }

    /// Removes what `install` wrote; the VIP entry too when `vip` (else it
    /// was overwritten by a newer install). A connection still carrying
    /// the old id finds no tables: its requests are decided by the
    /// connector.
    pub fn remove(&mut self, inst: &Installed, vip: bool) {
        if vip {
            let _ = self.service.remove(&to_abi(inst.vip));
        }
        let _ = self.by_id.remove(&inst.l7_id);
        for vhost in 0..inst.vhosts {
            let _ = self.vhost.remove(&L7VhostKey {
                l7_id: inst.l7_id,
                vhost,
            });
        }
        for k in &inst.conds {
            let _ = self.cond.remove(k);
        }
        for g in inst.groups.clone() {
            let _ = self.group.remove(&g);
        }
    }

    /// The kernel's latest decision on the connection from `client` (the
    /// peer address the connector accepted).
    pub fn decision(&self, client: SocketAddr) -> Option<L7Conn> {
        self.conn.get(&to_abi(client), 0).ok()
    }

    /// Forgets a closed connection's decision entry.
    pub fn forget(&mut self, client: SocketAddr) {
        let _ = self.conn.remove(&to_abi(client));
    }

    /// `KM_L7_STATS`, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
        let mut out = Vec::new();
        for (i, name) in L7_STAT_NAMES.iter().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(map_io("KM_L7_STATS"))?;
            out.push((*name, v.iter().sum()));
        }
        Ok(out)
    }
}
