//! kmesh-rs kernel programs.
//!
//! `cgroup/connect4|6` rewrite a connect() from an enrolled network namespace
//! to a service VIP:port into a connect() to one of the service's backends;
//! `cgroup/getpeername4|6` answer getpeername() on such a socket with the
//! VIP the application dialled, so peer checks in applications keep working.
//!
//! The connect path is a pipeline of tail-called stages, one program array
//! per address family (`KM_CONNECT4_STAGES`, `KM_CONNECT6_STAGES`; the
//! kernel only lets a program tail-call programs of its own attach type),
//! with the state of one connect in the per-CPU `KM_CONNECT_CTX`:
//!
//! ```text
//! entry (attached)   netns enrolled? → service by VIP:port → ctx
//!   └─ stages[lb_policy]   round robin | random | least request | maglev
//!        └─ stages[ENDPOINT]   circuit breaker, accounting, rewrite
//! ```
//!
//! Cost per connect: sockets of pods that are not enrolled, and
//! destinations that are not services, stop in the entry program after one
//! or two hash lookups (no tail call). A steered connect adds two tail
//! calls, one slot lookup (two for least request), the counter updates of
//! `lb::admit` and one LRU insert for the original destination. Nothing
//! loops, so the cost is flat in the number of services and endpoints.
//! Dual-engine waypoints add two hash lookups in the entry program
//! (destination, then the address on any port) before the service lookup,
//! and one LRU insert when steered.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

/// Dual-engine L4 authorization (XDP + tail calls).
mod authz;
/// Endpoint selection and connection accounting.
mod lb;
mod sockops;
/// Dual-engine waypoint steering (PROXY protocol v2 via sk_msg).
mod waypoint;
/// HTTP/1.1 routing decided in the kernel (sk_msg), served by the connector.
mod l7;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use kmesh_abi::{
    stage, stats, waypoint::MANAGE_WAYPOINT, ServiceValue, SockAddr, FAMILY_V4, MAX_ENROLLED_NETNS, MAX_ORIG_DST, MAX_SERVICES,
};

/// Network namespaces whose sockets kmesh-rs manages (netns cookie →
/// `kmesh_abi::waypoint::MANAGE_*` bits).
#[map]
static KM_MANAGE: HashMap<u64, u32> = HashMap::with_max_entries(MAX_ENROLLED_NETNS, 0);

/// Service VIP:port → where its slots live.
#[map]
static KM_SERVICE: HashMap<SockAddr, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

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

/// Stages of the connect4 pipeline, indexes in `kmesh_abi::stage`.
#[map]
static KM_CONNECT4_STAGES: ProgramArray = ProgramArray::with_max_entries(stage::COUNT, 0);

/// Stages of the connect6 pipeline, indexes in `kmesh_abi::stage`.
#[map]
static KM_CONNECT6_STAGES: ProgramArray = ProgramArray::with_max_entries(stage::COUNT, 0);

/// One connect in flight, handed from stage to stage on this CPU. The
/// programs of one connect stay on one CPU (migration is disabled), but
/// on a preemptible kernel another task's connect on the same CPU may run
/// in between and overwrite the entry: the endpoint stage checks `cookie`
/// against its own socket and refuses the connect if it changed (counted
/// as `CONNECT_PIPELINE_ERROR`) rather than steer with another socket's
/// state (an LB stage may have picked from the other connect's service by
/// then, which the same check catches).
#[repr(C)]
#[derive(Clone, Copy)]
struct ConnectCtx {
    /// Socket cookie of the connect this state belongs to.
    cookie: u64,
    /// The VIP:port dialled.
    dst: SockAddr,
    /// The backend the LB stage chose.
    backend: SockAddr,
    svc: ServiceValue,
    /// Network namespace cookie of the client.
    netns: u64,
    /// 1 when the backend is (an endpoint of) `dst`'s waypoint.
    via_waypoint: u32,
}

#[map]
static KM_CONNECT_CTX: PerCpuArray<ConnectCtx> = PerCpuArray::with_max_entries(1, 0);

/// Return values of cgroup sock_addr programs. Returning REJECT makes
/// connect() fail at once with EPERM.
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

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper valid for cgroup sock_addr programs.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn connect_ctx() -> Option<&'static mut ConnectCtx> {
    // SAFETY: per-CPU entry from a successful lookup; see `ConnectCtx`
    // for who else may write it.
    KM_CONNECT_CTX.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// This connect's state as the previous stage left it, or `None` (and
/// counted) if it is gone.
#[inline(always)]
fn stage_ctx(cookie: u64) -> Option<&'static mut ConnectCtx> {
    match connect_ctx() {
        Some(c) if c.cookie == cookie => Some(c),
        _ => {
            count(stats::CONNECT_PIPELINE_ERROR);
            None
        }
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
    entry(&ctx, dst, &KM_CONNECT4_STAGES, endpoint4)
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
    entry(&ctx, dst, &KM_CONNECT6_STAGES, endpoint6)
}

/// The listener stage: is this socket ours and `dst` a service? If so,
/// hand over to the service's LB stage.
///
/// A stage that cannot be tail-called is run inline instead (same code,
/// counted as `CONNECT_STAGE_INLINE`): the program arrays lose their
/// entries as soon as no user-space reference to them is left (the kernel
/// clears a program array then), while the programs themselves are
/// detached a little later (link release is deferred). During such a
/// daemon handover or uninstall the pipeline degrades to one program
/// instead of failing connects.
#[inline(always)]
fn entry(
    ctx: &SockAddrContext,
    dst: SockAddr,
    stages: &ProgramArray,
    endpoint: fn(&SockAddrContext) -> i32,
) -> i32 {
    count(stats::CONNECT_SEEN);
    // SAFETY: helper valid for cgroup sock_addr programs (kernel >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(manage) = (unsafe { KM_MANAGE.get(&netns) }).copied() else {
        return ALLOW;
    };
    count(stats::CONNECT_ENROLLED);
    // An HTTP service routed per request: to the connector (kernel-native
    // mode; waypoints are dual-engine, so the two never meet).
    if let Some(connector) = l7::steer(ctx, &dst) {
        return direct(ctx, dst, connector, netns, false, endpoint);
    }
    // A destination with a waypoint is dialled at the waypoint (a waypoint's
    // own connects are not: they would loop back to it). The waypoint may
    // itself be a service, load balanced below.
    let (target, via_waypoint) = match manage & MANAGE_WAYPOINT {
        0 => match waypoint::lookup(&dst) {
            Some(w) => (w, true),
            None => (dst, false),
        },
        _ => (dst, false),
    };
    // SAFETY: userspace replaces service values whole with one update; a
    // torn read is impossible for a hash map element (RCU-replaced).
    let svc = match unsafe { KM_SERVICE.get(&target) } {
        Some(s) => *s,
        // A waypoint that is a plain address: dial it, no LB stage.
        None if via_waypoint => return direct(ctx, dst, target, netns, true, endpoint),
        None => return ALLOW,
    };
    if svc.slot_count == 0 {
        count(stats::CONNECT_NO_ENDPOINT);
        return REJECT;
    }
    let Some(c) = connect_ctx() else {
        return REJECT;
    };
    c.cookie = socket_cookie(ctx);
    c.dst = dst;
    c.svc = svc;
    c.netns = netns;
    c.via_waypoint = via_waypoint as u32;
    // SAFETY: on success the tail call does not return; the stage is a
    // cgroup/connect program of the same attach type as this one.
    let _ = unsafe { stages.tail_call(ctx, svc.lb_policy) };
    count(stats::CONNECT_STAGE_INLINE);
    lb_stage(ctx, stages, lb::pick, endpoint)
}

/// Dials `backend` instead of `dst` without an LB stage (the endpoint
/// stage's accounting and original-destination record still apply).
#[inline(always)]
fn direct(
    ctx: &SockAddrContext,
    dst: SockAddr,
    backend: SockAddr,
    netns: u64,
    via_waypoint: bool,
    endpoint: fn(&SockAddrContext) -> i32,
) -> i32 {
    let Some(c) = connect_ctx() else {
        return REJECT;
    };
    c.cookie = socket_cookie(ctx);
    c.dst = dst;
    c.svc = ServiceValue::default();
    c.netns = netns;
    c.backend = backend;
    c.via_waypoint = via_waypoint as u32;
    endpoint(ctx)
}

/// An LB stage: picks the backend with `pick`, then hands over to the
/// endpoint stage.
#[inline(always)]
fn lb_stage(
    ctx: &SockAddrContext,
    stages: &ProgramArray,
    pick: fn(&ServiceValue, u64) -> Option<SockAddr>,
    endpoint: fn(&SockAddrContext) -> i32,
) -> i32 {
    // The cookie is checked once, in the endpoint stage: state another
    // connect overwrote here only leads to a pick the endpoint stage refuses.
    let Some(c) = connect_ctx() else {
        return REJECT;
    };
    match pick(&c.svc, c.netns) {
        Some(b) => c.backend = b,
        None => {
            count(stats::CONNECT_NO_ENDPOINT);
            return REJECT;
        }
    }
    // SAFETY: as in `entry`.
    let _ = unsafe { stages.tail_call(ctx, stage::ENDPOINT) };
    count(stats::CONNECT_STAGE_INLINE);
    endpoint(ctx)
}

/// The endpoint stage's common part: family check, circuit breaker and
/// accounting. Returns the context to rewrite from, or the verdict.
#[inline(always)]
fn endpoint_stage(ctx: &SockAddrContext, v4_socket: bool) -> Result<&'static ConnectCtx, i32> {
    let cookie = socket_cookie(ctx);
    let c = stage_ctx(cookie).ok_or(REJECT)?;
    // An IPv4 backend is reachable from an IPv6 socket only as IPv4-mapped,
    // which only works when the VIP was IPv4-mapped too (a dual-stack
    // socket); an IPv6 backend never from IPv4.
    let family_ok = if v4_socket {
        c.backend.family == FAMILY_V4
    } else {
        c.backend.family == c.dst.family
    };
    if !family_ok {
        count(stats::CONNECT_FAMILY_MISMATCH);
        return Err(REJECT);
    }
    if lb::admit(cookie, &c.svc, &c.backend).is_err() {
        count(stats::CONNECT_OVERFLOW);
        return Err(REJECT);
    }
    // A full LRU evicts the oldest entry; failure only loses the VIP
    // rewrite of getpeername for this socket.
    let _ = KM_ORIGDST.insert(&cookie, &c.dst, 0);
    if c.via_waypoint != 0 {
        waypoint::steered(ctx, &c.dst);
    }
    count(stats::CONNECT_REDIRECTED);
    Ok(c)
}

/// Defines the LB stages of one family's pipeline.
macro_rules! lb_stages {
    ($attach:ident, $stages:ident, $endpoint:ident, $rr:ident, $random:ident, $lr:ident, $maglev:ident) => {
        #[cgroup_sock_addr($attach)]
        pub fn $rr(ctx: SockAddrContext) -> i32 {
            lb_stage(&ctx, &$stages, |s, _| lb::pick_round_robin(s), $endpoint)
        }

        #[cgroup_sock_addr($attach)]
        pub fn $random(ctx: SockAddrContext) -> i32 {
            lb_stage(&ctx, &$stages, |s, _| lb::pick_random(s), $endpoint)
        }

        #[cgroup_sock_addr($attach)]
        pub fn $lr(ctx: SockAddrContext) -> i32 {
            lb_stage(&ctx, &$stages, |s, _| lb::pick_least_request(s), $endpoint)
        }

        #[cgroup_sock_addr($attach)]
        pub fn $maglev(ctx: SockAddrContext) -> i32 {
            lb_stage(&ctx, &$stages, lb::pick_maglev, $endpoint)
        }
    };
}

lb_stages!(
    connect4,
    KM_CONNECT4_STAGES,
    endpoint4,
    kmesh_connect4_rr,
    kmesh_connect4_random,
    kmesh_connect4_lr,
    kmesh_connect4_maglev
);
lb_stages!(
    connect6,
    KM_CONNECT6_STAGES,
    endpoint6,
    kmesh_connect6_rr,
    kmesh_connect6_random,
    kmesh_connect6_lr,
    kmesh_connect6_maglev
);

#[cgroup_sock_addr(connect4)]
pub fn kmesh_connect4_endpoint(ctx: SockAddrContext) -> i32 {
    endpoint4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn kmesh_connect6_endpoint(ctx: SockAddrContext) -> i32 {
    endpoint6(&ctx)
}

/// The endpoint stage of connect4.
#[inline(always)]
fn endpoint4(ctx: &SockAddrContext) -> i32 {
    let c = match endpoint_stage(ctx, true) {
        Ok(c) => c,
        Err(verdict) => return verdict,
    };
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte writes to fields the verifier lets connect4 write.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), c.backend.addr[3]);
        write_volatile(addr_of_mut!((*sa).user_port), c.backend.port as u32);
    }
    ALLOW
}

/// The endpoint stage of connect6.
#[inline(always)]
fn endpoint6(ctx: &SockAddrContext) -> i32 {
    let c = match endpoint_stage(ctx, false) {
        Ok(c) => c,
        Err(verdict) => return verdict,
    };
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte writes to fields the verifier lets connect6 write.
    unsafe {
        write_ip6(sa, &c.backend.addr);
        write_volatile(addr_of_mut!((*sa).user_port), c.backend.port as u32);
    }
    ALLOW
}

/// A socket is released (its last fd closed): give back the connection
/// counts of a steered socket that sockops has not seen reach CLOSE — one
/// whose connect failed before a SYN was sent (no route, no source
/// port), or one the application closes while it is still open. Cost for
/// every other socket: one hash lookup.
#[cgroup_sock(sock_release)]
pub fn kmesh_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: helper valid for cgroup sock programs (Linux 5.8+).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    lb::release(cookie);
    ALLOW
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
