//! Keeps the kernel's service and slot maps equal to a desired table, with
//! make-before-break updates and all-or-nothing failure.
//!
//! Protocol with the connect programs, which read `KM_SERVICE[vip]` and then
//! `KM_SLOT[(service_id, n)]`:
//! - a changed service gets a *fresh* id; its slots are written first, the
//!   service entry is switched to the new id with one map update, and only
//!   then are the old slots deleted. A connect therefore sees the old or
//!   the new endpoint set, never a mix or a dangling slot;
//! - a failure while writing new slots deletes what was written and leaves
//!   every service entry untouched; a failure while switching entries puts
//!   back the entries already switched. Either way the kernel keeps the
//!   last good config.
//!
//! Cost: O(slots of the changed services); unchanged services are not
//! touched at all.

use std::collections::BTreeMap;

use kmesh_abi::{ServiceValue, SlotKey, SockAddr, MAX_SERVICES, MAX_SLOTS};

/// What the kernel should hold for one service: LB policy, cluster
/// accounting and slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredService {
    pub lb_policy: u32,
    /// `ServiceValue::cluster_id`.
    pub cluster_id: u32,
    /// `ServiceValue::max_connections`.
    pub max_connections: u32,
    pub slots: Vec<SockAddr>,
}

impl DesiredService {
    /// Whether `v` (installed) already says what this service wants,
    /// slots aside.
    fn same_policy(&self, v: &ServiceValue) -> bool {
        v.lb_policy == self.lb_policy
            && v.cluster_id == self.cluster_id
            && v.max_connections == self.max_connections
    }
}

/// The two maps the writer drives. Implemented by the real BPF maps and by
/// an in-memory fake in tests (which can also inject failures).
pub trait ServiceMaps {
    fn put_slot(&mut self, key: SlotKey, backend: SockAddr) -> Result<(), MapOpError>;
    fn del_slot(&mut self, key: SlotKey) -> Result<(), MapOpError>;
    fn put_service(&mut self, vip: SockAddr, value: ServiceValue) -> Result<(), MapOpError>;
    fn del_service(&mut self, vip: SockAddr) -> Result<(), MapOpError>;
}

/// One failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map} failed: {reason}")]
pub struct MapOpError {
    pub map: &'static str,
    pub op: &'static str,
    pub reason: String,
}

/// Why an apply was refused or undone. In every case the kernel holds the
/// config it held before the call.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("map {map} is full: the new config needs {needed} entries (peak, while old and new entries coexist) but the map holds {capacity}; nothing was changed (hint: split the config or raise the capacity in kmesh-abi)")]
    Full {
        map: &'static str,
        needed: usize,
        capacity: usize,
    },
    #[error("writing the new config failed and was rolled back: {0}")]
    RolledBack(MapOpError),
    #[error("writing the new config failed and the rollback failed too ({rollback}); the maps may be inconsistent, restart the daemon: {first}")]
    RollbackFailed {
        first: MapOpError,
        rollback: MapOpError,
    },
}

#[derive(Debug, Clone)]
struct Installed {
    value: ServiceValue,
    slots: Vec<SockAddr>,
}

/// Counts of one successful apply.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ApplySummary {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub slots_written: usize,
}

/// The writer's picture of what is in the kernel. Only this type writes the
/// service and slot maps, so the picture stays exact.
#[derive(Debug, Default)]
pub struct ServiceTable {
    installed: BTreeMap<SockAddr, Installed>,
    free_ids: Vec<u32>,
    next_id: u32,
}

impl ServiceTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the picture from what the kernel maps hold (a restarted
    /// daemon reusing pinned maps). Ids not in use become free.
    pub fn from_installed(
        entries: impl IntoIterator<Item = (SockAddr, ServiceValue, Vec<SockAddr>)>,
    ) -> Self {
        let installed: BTreeMap<SockAddr, Installed> = entries
            .into_iter()
            .map(|(vip, value, slots)| (vip, Installed { value, slots }))
            .collect();
        let next_id = installed
            .values()
            .map(|i| i.value.service_id + 1)
            .max()
            .unwrap_or(0);
        let used: std::collections::BTreeSet<u32> =
            installed.values().map(|i| i.value.service_id).collect();
        let free_ids = (0..next_id).rev().filter(|id| !used.contains(id)).collect();
        ServiceTable {
            installed,
            free_ids,
            next_id,
        }
    }

    /// Number of services installed.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// Total slots installed.
    pub fn slot_count(&self) -> usize {
        self.installed.values().map(|i| i.slots.len()).sum()
    }

    fn alloc_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }

    /// Makes the kernel hold exactly `desired`.
    pub fn apply<M: ServiceMaps>(
        &mut self,
        maps: &mut M,
        desired: &BTreeMap<SockAddr, DesiredService>,
    ) -> Result<ApplySummary, ApplyError> {
        let gone: Vec<SockAddr> = self
            .installed
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        self.apply_impl(maps, desired, gone)
    }

    /// Makes the kernel hold `some` for the services listed, leaving every
    /// other service as it is (same protocol and guarantees as
    /// [`ServiceTable::apply`]). Cost: O(listed services' slots), not
    /// O(all services): the path for an endpoint change.
    /// `gone`: services to remove (after the others are switched; a VIP
    /// also in `some`, or not installed, is not removed).
    pub fn apply_subset<M: ServiceMaps>(
        &mut self,
        maps: &mut M,
        some: &BTreeMap<SockAddr, DesiredService>,
        gone: &[SockAddr],
    ) -> Result<ApplySummary, ApplyError> {
        let gone: Vec<SockAddr> = gone
            .iter()
            .filter(|k| !some.contains_key(k) && self.installed.contains_key(k))
            .copied()
            .collect();
        self.apply_impl(maps, some, gone)
    }

    fn apply_impl<M: ServiceMaps>(
        &mut self,
        maps: &mut M,
        desired: &BTreeMap<SockAddr, DesiredService>,
        removed: Vec<SockAddr>,
    ) -> Result<ApplySummary, ApplyError> {
        let mut summary = ApplySummary::default();
        let mut todo: Vec<(SockAddr, &DesiredService)> = Vec::new();
        for (vip, want) in desired {
            match self.installed.get(vip) {
                Some(have) if want.same_policy(&have.value) && have.slots == want.slots => {
                    summary.unchanged += 1
                }
                Some(_) => {
                    summary.changed += 1;
                    todo.push((*vip, want));
                }
                None => {
                    summary.added += 1;
                    todo.push((*vip, want));
                }
            }
        }
        summary.removed = removed.len();

        // Capacity at the peak: old slots and ids stay until the switch.
        let new_slots: usize = todo.iter().map(|(_, d)| d.slots.len()).sum();
        let peak_slots = self.slot_count() + new_slots;
        if peak_slots > MAX_SLOTS as usize {
            return Err(ApplyError::Full {
                map: "KM_SLOT",
                needed: peak_slots,
                capacity: MAX_SLOTS as usize,
            });
        }
        let live_ids = self.installed.len() + todo.len();
        if live_ids > MAX_SERVICES as usize {
            return Err(ApplyError::Full {
                map: "KM_SERVICE",
                needed: live_ids,
                capacity: MAX_SERVICES as usize,
            });
        }

        // Phase 1: write new slots under fresh ids (invisible to connects).
        let mut staged: Vec<(SockAddr, Installed)> = Vec::with_capacity(todo.len());
        for (vip, want) in &todo {
            let id = self.alloc_id();
            let value = ServiceValue {
                service_id: id,
                slot_count: want.slots.len() as u32,
                lb_policy: want.lb_policy,
                flags: 0,
                cluster_id: want.cluster_id,
                max_connections: want.max_connections,
            };
            staged.push((
                *vip,
                Installed {
                    value,
                    slots: Vec::with_capacity(want.slots.len()),
                },
            ));
            let inst = &mut staged.last_mut().expect("just pushed").1;
            for (n, b) in want.slots.iter().enumerate() {
                let key = SlotKey {
                    service_id: id,
                    slot: n as u32,
                };
                if let Err(e) = maps.put_slot(key, *b) {
                    return Err(self.undo_staged(maps, staged, e));
                }
                inst.slots.push(*b);
                summary.slots_written += 1;
            }
        }

        // Phase 2: switch service entries, one atomic update each.
        for (i, (vip, inst)) in staged.iter().enumerate() {
            if let Err(e) = maps.put_service(*vip, inst.value) {
                // Put back what phase 2 already switched, then drop the staged slots.
                for (vip, _) in &staged[..i] {
                    let r = match self.installed.get(vip) {
                        Some(old) => maps.put_service(*vip, old.value),
                        None => maps.del_service(*vip),
                    };
                    if let Err(rb) = r {
                        return Err(ApplyError::RollbackFailed {
                            first: e,
                            rollback: rb,
                        });
                    }
                }
                return Err(self.undo_staged(maps, staged, e));
            }
        }

        // Phase 3: the new config is live; retire what it replaced. A
        // failure here leaves unreachable slots behind but no wrong route,
        // so it is logged by the caller rather than rolled back.
        let mut retired: Vec<Installed> = Vec::new();
        for (vip, inst) in staged {
            if let Some(old) = self.installed.insert(vip, inst) {
                retired.push(old);
            }
        }
        for vip in removed {
            if let Some(old) = self.installed.remove(&vip) {
                maps.del_service(vip).map_err(ApplyError::RolledBack)?;
                retired.push(old);
            }
        }
        for old in retired {
            for n in 0..old.slots.len() {
                let _ = maps.del_slot(SlotKey {
                    service_id: old.value.service_id,
                    slot: n as u32,
                });
            }
            self.free_ids.push(old.value.service_id);
        }
        Ok(summary)
    }

    /// Deletes the slots of not-yet-live services and returns their ids.
    fn undo_staged<M: ServiceMaps>(
        &mut self,
        maps: &mut M,
        staged: Vec<(SockAddr, Installed)>,
        first: MapOpError,
    ) -> ApplyError {
        for (_, inst) in staged {
            for n in 0..inst.slots.len() {
                if let Err(rb) = maps.del_slot(SlotKey {
                    service_id: inst.value.service_id,
                    slot: n as u32,
                }) {
                    return ApplyError::RollbackFailed {
                        first,
                        rollback: rb,
                    };
                }
            }
            self.free_ids.push(inst.value.service_id);
        }
        ApplyError::RolledBack(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_abi::{LB_RANDOM, LB_ROUND_ROBIN};

    /// In-memory maps that fail the n-th write when asked to.
    #[derive(Default)]
    struct FakeMaps {
        services: BTreeMap<SockAddr, ServiceValue>,
        slots: BTreeMap<SlotKey, SockAddr>,
        writes: usize,
        fail_at: Option<usize>,
    }

    impl FakeMaps {
        fn tick(&mut self, map: &'static str) -> Result<(), MapOpError> {
            self.writes += 1;
            if Some(self.writes) == self.fail_at {
                return Err(MapOpError {
                    map,
                    op: "update",
                    reason: "injected".into(),
                });
            }
            Ok(())
        }
        /// What a connect to `vip` can reach.
        fn resolve(&self, vip: &SockAddr) -> Option<Vec<SockAddr>> {
            let s = self.services.get(vip)?;
            Some(
                (0..s.slot_count)
                    .map(|n| {
                        *self
                            .slots
                            .get(&SlotKey {
                                service_id: s.service_id,
                                slot: n,
                            })
                            .expect("dangling slot")
                    })
                    .collect(),
            )
        }
    }

    impl ServiceMaps for FakeMaps {
        fn put_slot(&mut self, key: SlotKey, backend: SockAddr) -> Result<(), MapOpError> {
            self.tick("KM_SLOT")?;
            self.slots.insert(key, backend);
            Ok(())
        }
        fn del_slot(&mut self, key: SlotKey) -> Result<(), MapOpError> {
            self.slots.remove(&key);
            Ok(())
        }
        fn put_service(&mut self, vip: SockAddr, value: ServiceValue) -> Result<(), MapOpError> {
            self.tick("KM_SERVICE")?;
            self.services.insert(vip, value);
            Ok(())
        }
        fn del_service(&mut self, vip: SockAddr) -> Result<(), MapOpError> {
            self.services.remove(&vip);
            Ok(())
        }
    }

    fn addr(last: u8, port: u16) -> SockAddr {
        SockAddr::from_raw_v4(u32::from_ne_bytes([10, 0, 0, last]), port.to_be())
    }

    fn desired(entries: &[(SockAddr, u32, &[SockAddr])]) -> BTreeMap<SockAddr, DesiredService> {
        entries
            .iter()
            .map(|(v, lb, s)| {
                (
                    *v,
                    DesiredService {
                        lb_policy: *lb,
                        slots: s.to_vec(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn add_change_remove() {
        let (vip1, vip2) = (addr(1, 80), addr(2, 80));
        let (a, b, c) = (addr(10, 8080), addr(11, 8080), addr(12, 8080));
        let mut maps = FakeMaps::default();
        let mut t = ServiceTable::new();
        let s = t
            .apply(
                &mut maps,
                &desired(&[(vip1, LB_ROUND_ROBIN, &[a, b]), (vip2, LB_RANDOM, &[c])]),
            )
            .unwrap();
        assert_eq!((s.added, s.changed, s.removed), (2, 0, 0));
        assert_eq!(maps.resolve(&vip1).unwrap(), vec![a, b]);

        let s = t
            .apply(&mut maps, &desired(&[(vip1, LB_ROUND_ROBIN, &[a, b, c])]))
            .unwrap();
        assert_eq!((s.added, s.changed, s.removed, s.unchanged), (0, 1, 1, 0));
        assert_eq!(maps.resolve(&vip1).unwrap(), vec![a, b, c]);
        assert!(maps.resolve(&vip2).is_none());
        // No slot of a retired id is left behind.
        assert_eq!(maps.slots.len(), 3);

        let s = t
            .apply(&mut maps, &desired(&[(vip1, LB_ROUND_ROBIN, &[a, b, c])]))
            .unwrap();
        assert_eq!((s.unchanged, s.slots_written), (1, 0));
    }

    #[test]
    fn any_failed_write_leaves_the_kernel_as_it_was() {
        let vip1 = addr(1, 80);
        let (a, b, c) = (addr(10, 8080), addr(11, 8080), addr(12, 8080));
        let first = desired(&[(vip1, LB_ROUND_ROBIN, &[a, b])]);
        let second = desired(&[
            (vip1, LB_RANDOM, &[c, a, b]),
            (addr(2, 80), LB_ROUND_ROBIN, &[c]),
        ]);
        // Writes of the second apply: 4 slots + 2 services = 6; fail each.
        for fail in 1..=6 {
            let mut maps = FakeMaps::default();
            let mut t = ServiceTable::new();
            t.apply(&mut maps, &first).unwrap();
            let before_services = maps.services.clone();
            let before_slots = maps.slots.clone();
            maps.fail_at = Some(maps.writes + fail);
            let err = t.apply(&mut maps, &second).unwrap_err();
            assert!(matches!(err, ApplyError::RolledBack(_)), "{err}");
            assert_eq!(maps.services, before_services, "fail at write {fail}");
            assert_eq!(maps.slots, before_slots, "fail at write {fail}");
            // And the table still works afterwards.
            maps.fail_at = None;
            t.apply(&mut maps, &second).unwrap();
            assert_eq!(maps.resolve(&vip1).unwrap(), vec![c, a, b]);
        }
    }

    #[test]
    fn subset_touches_only_listed_services() {
        let (vip1, vip2) = (addr(1, 80), addr(2, 80));
        let (a, b) = (addr(10, 8080), addr(11, 8080));
        let mut maps = FakeMaps::default();
        let mut t = ServiceTable::new();
        t.apply(
            &mut maps,
            &desired(&[(vip1, LB_ROUND_ROBIN, &[a]), (vip2, LB_ROUND_ROBIN, &[b])]),
        )
        .unwrap();
        let writes = maps.writes;
        let s = t
            .apply_subset(&mut maps, &desired(&[(vip1, LB_ROUND_ROBIN, &[a, b])]), &[])
            .unwrap();
        assert_eq!((s.changed, s.removed, s.unchanged), (1, 0, 0));
        // 2 slots + 1 service entry; vip2 untouched and still routed.
        assert_eq!(maps.writes - writes, 3);
        assert_eq!(maps.resolve(&vip1).unwrap(), vec![a, b]);
        assert_eq!(maps.resolve(&vip2).unwrap(), vec![b]);
        assert_eq!(maps.slots.len(), 3, "old slots of vip1 retired");
    }

    #[test]
    fn full_slot_map_is_refused_before_any_write() {
        let many: Vec<SockAddr> = (0..MAX_SLOTS + 1)
            .map(|i| SockAddr::from_raw_v4(i, 1))
            .collect();
        let mut maps = FakeMaps::default();
        let mut t = ServiceTable::new();
        let err = t
            .apply(&mut maps, &desired(&[(addr(1, 80), LB_ROUND_ROBIN, &many)]))
            .unwrap_err();
        assert!(
            matches!(err, ApplyError::Full { map: "KM_SLOT", .. }),
            "{err}"
        );
        assert_eq!(maps.writes, 0);
    }
}
