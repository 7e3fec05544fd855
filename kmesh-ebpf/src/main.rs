//! kmesh-rs kernel programs.
//!
//! `cgroup/connect4|6` rewrite a connect() from an enrolled network namespace
//! to a service VIP:port into a connect() to one of the service's backends;
//! `cgroup/getpeername4|6` answer getpeername() on such a socket with the
//! VIP the application dialled, so peer checks in applications keep working.
//!
//! Hot-path cost per connect: one hash lookup (netns cookie), one hash
//! lookup (service), one per-CPU array access (round robin) and one hash
//! lookup (slot), plus one LRU insert for the original destination. Nothing
//! here loops, so the cost is flat in the number of services and endpoints.
#![no_std]
#![no_main]

mod sockops;
/// HTTP/1.1 routing decided in the kernel (sk_msg), served by the connector.
mod l7;
/// Dual-engine L4 authorization (XDP + tail calls).
mod authz;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
    EbpfContext,
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use kmesh_abi::{
    stats, ServiceValue, SlotKey, SockAddr, FAMILY_V4, LB_RANDOM, MAX_ENROLLED_NETNS, MAX_ORIG_DST,
    MAX_SERVICES, MAX_SLOTS,
};

/// Network namespaces whose sockets kmesh-rs manages (netns cookie → 1).
#[map]
static KM_MANAGE: HashMap<u64, u32> = HashMap::with_max_entries(MAX_ENROLLED_NETNS, 0);

/// Service VIP:port → where its slots live.
#[map]
static KM_SERVICE: HashMap<SockAddr, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// (service id, slot) → backend address.
#[map]
static KM_SLOT: HashMap<SlotKey, SockAddr> = HashMap::with_max_entries(MAX_SLOTS, 0);

/// Round-robin cursor per service id, per CPU: no atomics, no cross-CPU
/// cache-line bouncing; over many connects every CPU's sequence is exact
/// round robin, so the totals differ by at most the number of CPUs.
#[map]
static KM_RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Socket cookie → the service address the application dialled. LRU: an
/// entry of a closed socket is reclaimed under pressure.
#[map]
static KM_ORIGDST: LruHashMap<u64, SockAddr> = LruHashMap::with_max_entries(MAX_ORIG_DST, 0);

/// ABI marker: index 0 holds the `kmesh_abi::ABI_VERSION` the pinned maps
/// were created with, so a restarted daemon knows whether it may reuse them.
#[map]
static KM_ABI: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU counters, indexes in `kmesh_abi::stats`.
#[map]
static KM_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

const SOCK_STREAM: u32 = 1;

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = KM_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU,
        // and the pointer comes from a successful lookup.
        unsafe { *c += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn kmesh_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel passed; every field is
    // read with a 4-byte load, the only size the verifier allows here.
    let (ty, ip4, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).type_)),
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    if ty != SOCK_STREAM {
        return ALLOW;
    }
    let dst = SockAddr::from_raw_v4(ip4, port as u16);
    match pick_backend(&ctx, &dst) {
        Decision::Untouched => ALLOW,
        Decision::Refuse => REJECT,
        Decision::Backend(b) => {
            if b.family != FAMILY_V4 {
                count(stats::CONNECT_FAMILY_MISMATCH);
                return REJECT;
            }
            // SAFETY: 4-byte writes to fields the verifier lets connect4 write.
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip4), b.addr[3]);
                write_volatile(addr_of_mut!((*sa).user_port), b.port as u32);
            }
            remember(&ctx, &dst);
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn kmesh_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4: 4-byte context loads only.
    let (ty, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).type_)),
            read_ip6(sa),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    if ty != SOCK_STREAM {
        return ALLOW;
    }
    let dst = SockAddr::from_raw_v6(ip6, port as u16);
    match pick_backend(&ctx, &dst) {
        Decision::Untouched => ALLOW,
        Decision::Refuse => REJECT,
        Decision::Backend(b) => {
            // An IPv4 backend is reachable from an IPv6 socket only as
            // IPv4-mapped, which only works when the VIP was IPv4-mapped
            // too (a dual-stack socket); an IPv6 backend never from IPv4.
            if b.family != dst.family {
                count(stats::CONNECT_FAMILY_MISMATCH);
                return REJECT;
            }
            // SAFETY: 4-byte writes to fields the verifier lets connect6 write.
            unsafe {
                write_ip6(sa, &b.addr);
                write_volatile(addr_of_mut!((*sa).user_port), b.port as u32);
            }
            remember(&ctx, &dst);
            ALLOW
        }
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn kmesh_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_destination(&ctx) {
        if orig.family == FAMILY_V4 {
            let sa = ctx.sock_addr;
            // SAFETY: 4-byte writes to fields getpeername4 may rewrite.
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip4), orig.addr[3]);
                write_volatile(addr_of_mut!((*sa).user_port), orig.port as u32);
            }
            count(stats::PEERNAME_RESTORED);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn kmesh_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_destination(&ctx) {
        let sa = ctx.sock_addr;
        // SAFETY: 4-byte writes to fields getpeername6 may rewrite. A v4
        // service dialled from a dual-stack socket is stored IPv4-mapped,
        // which is exactly what an IPv6 socket reports.
        unsafe {
            write_ip6(sa, &orig.addr);
            write_volatile(addr_of_mut!((*sa).user_port), orig.port as u32);
        }
        count(stats::PEERNAME_RESTORED);
    }
    ALLOW
}

enum Decision {
    /// Not ours: let the connect go where the application sent it.
    Untouched,
    /// A known service that cannot be served: fail the connect now.
    Refuse,
    Backend(SockAddr),
}

#[inline(always)]
fn pick_backend(ctx: &SockAddrContext, dst: &SockAddr) -> Decision {
    count(stats::CONNECT_SEEN);
    // SAFETY: helper valid for cgroup sock_addr programs (kernel >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is only tested for presence.
    if unsafe { KM_MANAGE.get(&netns) }.is_none() {
        return Decision::Untouched;
    }
    count(stats::CONNECT_ENROLLED);
    if let Some(connector) = l7::steer(ctx, dst) {
        return Decision::Backend(connector);
    }
    // SAFETY: userspace replaces service values whole with one update; a
    // torn read is impossible for a hash map element (RCU-replaced).
    let svc = match unsafe { KM_SERVICE.get(dst) } {
        Some(s) => *s,
        None => return Decision::Untouched,
    };
    if svc.slot_count == 0 {
        count(stats::CONNECT_NO_ENDPOINT);
        return Decision::Refuse;
    }
    let cursor = if svc.lb_policy == LB_RANDOM {
        // SAFETY: helper without preconditions.
        unsafe { bpf_get_prandom_u32() }
    } else {
        match KM_RR.get_ptr_mut(svc.service_id) {
            // SAFETY: per-CPU slot from a successful lookup; only this CPU
            // touches it.
            Some(c) => unsafe {
                let v = *c;
                *c = v.wrapping_add(1);
                v
            },
            None => 0,
        }
    };
    let key = SlotKey {
        service_id: svc.service_id,
        slot: cursor % svc.slot_count,
    };
    // SAFETY: slot values are written before the service entry that makes
    // them reachable and removed only after it moved away.
    match unsafe { KM_SLOT.get(&key) } {
        Some(b) => {
            count(stats::CONNECT_REDIRECTED);
            Decision::Backend(*b)
        }
        None => {
            count(stats::CONNECT_NO_ENDPOINT);
            Decision::Refuse
        }
    }
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: &SockAddr) {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A full LRU evicts the oldest entry; failure only loses the VIP
    // rewrite of getpeername for this socket.
    let _ = KM_ORIGDST.insert(&cookie, dst, 0);
}

#[inline(always)]
fn original_destination(ctx: &SockAddrContext) -> Option<SockAddr> {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    unsafe { KM_ORIGDST.get(&cookie) }.copied()
}

/// # Safety
/// `sa` must be the program's context pointer.
#[inline(always)]
unsafe fn read_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: 4-byte loads from the context, as the verifier requires.
    unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

/// # Safety
/// `sa` must be the program's context pointer of a connect6/getpeername6 program.
#[inline(always)]
unsafe fn write_ip6(sa: *mut bpf_sock_addr, ip: &[u32; 4]) {
    // SAFETY: 4-byte stores into the context, as the verifier requires.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), ip[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), ip[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), ip[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), ip[3]);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
