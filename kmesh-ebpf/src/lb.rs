//! Endpoint selection and connection accounting, shared by every program
//! that needs to pick a backend of a service (today the connect pipeline's
//! LB stages; a later L7 program picks the endpoint of a routed cluster the
//! same way: given a [`ServiceValue`], call the policy's `pick_*`).
//!
//! A service's endpoints are pre-expanded by the daemon into
//! `slot_count` slots (`KM_SLOT[(service_id, n)]`): weights, priority
//! failover and locality weights are already folded into how many slots an
//! endpoint has, and for Maglev the slots *are* the lookup table. So every
//! policy is O(1): one or two slot lookups, no loop over endpoints.
//!
//! Accounting: [`admit`] counts a steered connect against its cluster
//! (`KM_CX_ACTIVE`, the circuit breaker's input) and its endpoint
//! (`KM_EP_ACTIVE`, least request's input) and records the socket in
//! `KM_STEERED`; [`release`] (called by `sockops` when the socket reaches
//! CLOSE) gives both counts back exactly once. The counters are plain
//! `u64`s changed with atomic adds (`lock xadd`, no fetch: works with the
//! default BPF CPU version).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use kmesh_abi::{
    maglev_hash, ServiceValue, SlotKey, SockAddr, Steered, LB_LEAST_REQUEST, LB_MAGLEV, LB_RANDOM,
    MAX_CLUSTERS, MAX_ENDPOINTS, MAX_SERVICES, MAX_SLOTS, MAX_STEERED,
};

/// (service id, slot) → backend address.
#[map]
pub static KM_SLOT: HashMap<SlotKey, SockAddr> = HashMap::with_max_entries(MAX_SLOTS, 0);

/// Round-robin cursor per service id, per CPU: no atomics, no cross-CPU
/// cache-line bouncing; over many connects every CPU's sequence is exact
/// round robin, so the totals differ by at most the number of CPUs.
#[map]
static KM_RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Cluster id → connections steered to it and not yet closed.
#[map]
static KM_CX_ACTIVE: HashMap<u32, u64> = HashMap::with_max_entries(MAX_CLUSTERS, 0);

/// Cluster id → connects refused by its circuit breaker (Envoy's
/// `upstream_cx_overflow`).
#[map]
static KM_CX_OVERFLOW: HashMap<u32, u64> = HashMap::with_max_entries(MAX_CLUSTERS, 0);

/// Backend address → connections steered to it and not yet closed.
#[map]
static KM_EP_ACTIVE: HashMap<SockAddr, u64> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Socket cookie → what [`admit`] counted for it (deleted by [`release`]).
#[map]
static KM_STEERED: HashMap<u64, Steered> = HashMap::with_max_entries(MAX_STEERED, 0);

#[inline(always)]
fn slot(svc: &ServiceValue, n: u32) -> Option<SockAddr> {
    // Also what lets the compiler drop the division-by-zero panic path,
    // which the verifier would reject (no exit after it).
    if svc.slot_count == 0 {
        return None;
    }
    let key = SlotKey {
        service_id: svc.service_id,
        slot: n % svc.slot_count,
    };
    // SAFETY: slot values are written before the service entry that makes
    // them reachable and removed only after it moved away.
    unsafe { KM_SLOT.get(&key) }.copied()
}

/// The backend for a connect from network namespace `client`, by the
/// service's policy (what a program without its own LB stage calls).
#[inline(always)]
pub fn pick(svc: &ServiceValue, client: u64) -> Option<SockAddr> {
    match svc.lb_policy {
        LB_RANDOM => pick_random(svc),
        LB_LEAST_REQUEST => pick_least_request(svc),
        LB_MAGLEV => pick_maglev(svc, client),
        _ => pick_round_robin(svc),
    }
}

/// Per-CPU round robin over the slots.
#[inline(always)]
pub fn pick_round_robin(svc: &ServiceValue) -> Option<SockAddr> {
    let cursor = match KM_RR.get_ptr_mut(svc.service_id) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU
        // touches it (programs do not migrate while running).
        Some(c) => unsafe {
            let v = *c;
            *c = v.wrapping_add(1);
            v
        },
        None => 0,
    };
    slot(svc, cursor)
}

/// A uniformly random slot (so endpoints in proportion to their weights).
#[inline(always)]
pub fn pick_random(svc: &ServiceValue) -> Option<SockAddr> {
    // SAFETY: helper without preconditions.
    slot(svc, unsafe { bpf_get_prandom_u32() })
}

/// Power of two choices (Envoy's LEAST_REQUEST with choice_count 2): two
/// random slots — drawn in proportion to the endpoints' weights, since
/// slots are — and the one whose endpoint has fewer active connections
/// wins (ties: the first). Cost: two slot lookups, two counter lookups.
#[inline(always)]
pub fn pick_least_request(svc: &ServiceValue) -> Option<SockAddr> {
    // SAFETY: helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    let a = slot(svc, r & 0xffff)?;
    let b = match slot(svc, r >> 16) {
        Some(b) => b,
        None => return Some(a),
    };
    if endpoint_active(&b) < endpoint_active(&a) {
        Some(b)
    } else {
        Some(a)
    }
}

/// Maglev: the slots are the service's lookup table (built by the
/// daemon), indexed by a hash of the client. The client identity is its
/// network namespace: at connect() time an unbound socket has no source
/// address yet, and a pod is one network namespace with one address.
#[inline(always)]
pub fn pick_maglev(svc: &ServiceValue, client: u64) -> Option<SockAddr> {
    slot(svc, maglev_hash(client))
}

#[inline(always)]
fn endpoint_active(b: &SockAddr) -> u64 {
    // SAFETY: a plain u64 read; a concurrent atomic add makes it at worst
    // one connection stale, which only blurs a load-balancing choice.
    unsafe { KM_EP_ACTIVE.get(b) }.copied().unwrap_or(0)
}

/// The counter of `key`, created at zero on first use (creation races are
/// harmless: `BPF_NOEXIST` lets one insert win and both then add to it).
#[inline(always)]
fn counter<K>(map: &HashMap<K, u64>, key: &K) -> Option<*mut u64> {
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    let _ = map.insert(key, &0, BPF_NOEXIST as u64);
    map.get_ptr_mut(key)
}

#[inline(always)]
fn add(p: *mut u64, v: u64) {
    // SAFETY: `p` points into a map value that stays valid while the
    // program runs (RCU); the add is atomic across CPUs. Adding u64::MAX
    // is subtracting one (wrapping), which BPF's xadd can do.
    // (`AtomicU64` has no read-modify-write methods on the BPF target;
    // the intrinsic with an unused result lowers to `lock xadd`.)
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Why [`admit`] refused a connect.
pub struct Overflow;

/// Counts a connect of socket `cookie` to `backend` against the service's
/// cluster and the endpoint. Refused when the cluster's circuit breaker
/// is open (`max_connections` reached); the refusal is counted per
/// cluster. A second connect() on the same socket (a non-blocking connect
/// polled by calling connect again) is not counted twice. If the socket
/// cannot be recorded (`KM_STEERED` full: 65,536 open steered
/// connections) nothing is counted, so nothing can leak, and the breaker
/// does not apply to it. Cost: one counter lookup, one insert, one
/// endpoint counter lookup and two atomic adds.
///
/// Check-then-add is not one atomic step: connects racing on different
/// CPUs can each see `max - 1` and all pass, so the limit may be exceeded
/// by at most (CPUs − 1), as Envoy's per-worker checks also allow.
#[inline(always)]
pub fn admit(cookie: u64, svc: &ServiceValue, backend: &SockAddr) -> Result<(), Overflow> {
    let cluster = if svc.cluster_id != 0 {
        counter(&KM_CX_ACTIVE, &svc.cluster_id)
    } else {
        None
    };
    let rec = Steered {
        backend: *backend,
        cluster_id: if cluster.is_some() { svc.cluster_id } else { 0 },
    };
    // One insert both records the socket and tells a repeated connect()
    // (EEXIST: already counted) from a first one.
    if KM_STEERED
        .insert(&cookie, &rec, BPF_NOEXIST as u64)
        .is_err()
    {
        return Ok(());
    }
    if let Some(active) = cluster {
        // SAFETY: map value pointer from a successful lookup.
        if svc.max_connections != 0 && unsafe { *active } >= u64::from(svc.max_connections) {
            let _ = KM_STEERED.remove(&cookie);
            if let Some(o) = counter(&KM_CX_OVERFLOW, &svc.cluster_id) {
                add(o, 1);
            }
            return Err(Overflow);
        }
        add(active, 1);
    }
    if let Some(ep) = counter(&KM_EP_ACTIVE, backend) {
        add(ep, 1);
    }
    Ok(())
}

/// Whether the connect pipeline steered socket `cookie` (and it is open).
#[inline(always)]
pub fn is_steered(cookie: u64) -> bool {
    // SAFETY: presence test only.
    unsafe { KM_STEERED.get(&cookie) }.is_some()
}

/// Gives back what [`admit`] counted for socket `cookie`. Exactly once:
/// only the caller whose delete succeeds subtracts.
#[inline(always)]
pub fn release(cookie: u64) {
    // SAFETY: the value is copied out at once.
    let Some(rec) = (unsafe { KM_STEERED.get(&cookie) }).copied() else {
        return;
    };
    if KM_STEERED.remove(&cookie).is_err() {
        return;
    }
    if rec.cluster_id != 0 {
        if let Some(p) = KM_CX_ACTIVE.get_ptr_mut(&rec.cluster_id) {
            add(p, u64::MAX);
        }
    }
    if let Some(p) = KM_EP_ACTIVE.get_ptr_mut(&rec.backend) {
        add(p, u64::MAX);
    }
}
