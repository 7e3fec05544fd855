//! Waypoint steering (dual-engine): PROXY protocol v2 in front of the
//! first bytes of a connection the connect programs sent to a waypoint.
//!
//! 1. `connect4|6` (main.rs) find the destination in `KM_WAYPOINT`, dial
//!    the waypoint instead and call [`steered`]: socket cookie → original
//!    destination in `KM_WP_CONN`.
//! 2. `sockops` at ACTIVE_ESTABLISHED calls [`on_established`]: the cookie's
//!    entry moves to `KM_WP_PENDING` under the connection's addresses (the
//!    only key the `sk_msg` program can compute: it has no socket cookie
//!    helper) and the socket joins `KM_WP_SOCKS`, the sockhash the `sk_msg`
//!    program is attached to.
//! 3. [`kmesh_waypoint_msg`] runs on every sendmsg of those sockets. On the
//!    first one it finds the pending entry, inserts the 28 (IPv4) or 52
//!    (IPv6) header bytes in front of the application's bytes with
//!    `bpf_msg_push_data`, and deletes the entry: exactly one header per
//!    connection. Later sends cost one failed lookup; the socket leaves the
//!    sockhash when it closes (the kernel unlinks closed sockets).
//!
//! The header goes out with the client's first write: a protocol where the
//! server speaks first would wait for it (the waypoint's listener filter
//! holds the connection until the header arrives).

use aya_ebpf::{
    bindings::{bpf_sock_ops, sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, sk_msg},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use core::ptr::{addr_of, read_volatile};
use kmesh_abi::{
    waypoint::{
        stats, WpTuple, MAX_WAYPOINT_CONNS, MAX_WAYPOINT_DSTS, PROXY_V2_ADDR_V4, PROXY_V2_ADDR_V6,
        PROXY_V2_HEADER, PROXY_V2_SIGNATURE, PROXY_V2_TCP4, PROXY_V2_TCP6, PROXY_V2_VERSION_PROXY,
    },
    SockAddr, FAMILY_V4,
};

/// Destination (VIP:port, or workload address with port 0) → waypoint.
#[map]
static KM_WAYPOINT: HashMap<SockAddr, SockAddr> = HashMap::with_max_entries(MAX_WAYPOINT_DSTS, 0);

/// Socket cookie → original destination, from connect to ESTABLISHED.
#[map]
static KM_WP_CONN: LruHashMap<u64, SockAddr> = LruHashMap::with_max_entries(MAX_WAYPOINT_CONNS, 0);

/// Connection → original destination, from ESTABLISHED to the first send.
#[map]
static KM_WP_PENDING: LruHashMap<WpTuple, SockAddr> =
    LruHashMap::with_max_entries(MAX_WAYPOINT_CONNS, 0);

/// Sockets whose sends [`kmesh_waypoint_msg`] sees (key: socket cookie).
#[map]
static KM_WP_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_WAYPOINT_CONNS, 0);

/// Per-CPU counters, indexes in `kmesh_abi::waypoint::stats`.
#[map]
static KM_WP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = KM_WP_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU touches it.
        unsafe { *c += 1 };
    }
}

/// The waypoint of `dst`, if it has one: the exact VIP:port first, then
/// the address on any port (a workload's waypoint).
#[inline(always)]
pub fn lookup(dst: &SockAddr) -> Option<SockAddr> {
    // SAFETY: values are copied out at once; userspace replaces them whole.
    if let Some(w) = unsafe { KM_WAYPOINT.get(dst) } {
        return Some(*w);
    }
    let any_port = SockAddr { port: 0, ..*dst };
    // SAFETY: as above.
    unsafe { KM_WAYPOINT.get(&any_port) }.copied()
}

/// Records that the socket of `ctx` was steered to a waypoint instead of
/// `orig`. A failed insert (never for an LRU map) would only lose the header.
#[inline(always)]
pub fn steered(ctx: &SockAddrContext, orig: &SockAddr) {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = KM_WP_CONN.insert(&cookie, orig, 0);
    count(stats::STEERED);
}

/// `sockops` ACTIVE_ESTABLISHED: a steered socket joins the sockhash. Cost
/// for every other socket: one LRU lookup.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext) {
    // SAFETY: helper allowed for sock_ops programs.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { KM_WP_CONN.get(&cookie) }).copied() else {
        return;
    };
    let _ = KM_WP_CONN.remove(&cookie);
    let (local, remote) = crate::sockops::addresses(ctx.ops);
    let key = WpTuple { local, remote };
    if KM_WP_PENDING.insert(&key, &orig, 0).is_err() {
        count(stats::SOCKHASH_FAILED);
        return;
    }
    // SAFETY: `ctx.ops` is the program's context pointer, which is what
    // bpf_sock_hash_update takes.
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    match KM_WP_SOCKS.update(&mut cookie, ops, 0) {
        Ok(()) => count(stats::SOCKHASH_ADDED),
        Err(_) => {
            let _ = KM_WP_PENDING.remove(&key);
            count(stats::SOCKHASH_FAILED);
        }
    }
}

/// sk_msg on the steered sockets: sends the PROXY v2 header once.
#[sk_msg]
pub fn kmesh_waypoint_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // Every field is read before any branch (the verifier rejects a
    // context pointer dereferenced after it was modified on one path).
    // SAFETY: 4-byte context loads of sk_msg_md fields (Linux 4.20+).
    let (family, lport, rport, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(addr_of!((*md).family)),
            read_volatile(addr_of!((*md).local_port)),
            read_volatile(addr_of!((*md).remote_port)),
            read_volatile(addr_of!((*md).local_ip4)),
            read_volatile(addr_of!((*md).remote_ip4)),
            [
                read_volatile(addr_of!((*md).local_ip6[0])),
                read_volatile(addr_of!((*md).local_ip6[1])),
                read_volatile(addr_of!((*md).local_ip6[2])),
                read_volatile(addr_of!((*md).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*md).remote_ip6[0])),
                read_volatile(addr_of!((*md).remote_ip6[1])),
                read_volatile(addr_of!((*md).remote_ip6[2])),
                read_volatile(addr_of!((*md).remote_ip6[3])),
            ],
        )
    };
    let (local, remote) = crate::sockops::to_sock_addrs(family, lport, rport, l4, r4, l6, r6);
    let key = WpTuple { local, remote };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { KM_WP_PENDING.get(&key) }).copied() else {
        return SK_PASS;
    };
    // Whatever happens next, this connection is done: one attempt only.
    let _ = KM_WP_PENDING.remove(&key);
    if push_header(&ctx, &local, &orig).is_err() {
        count(stats::HEADER_FAILED);
        // Sending the bytes without the header would hand the waypoint a
        // connection it cannot attribute: fail the write instead.
        return SK_DROP;
    }
    count(stats::HEADER_SENT);
    SK_PASS
}

/// Inserts the header for `src` → `dst` in front of the message.
#[inline(always)]
fn push_header(ctx: &SkMsgContext, src: &SockAddr, dst: &SockAddr) -> Result<(), ()> {
    let v4 = dst.family == FAMILY_V4;
    let len = if v4 {
        PROXY_V2_HEADER + PROXY_V2_ADDR_V4
    } else {
        PROXY_V2_HEADER + PROXY_V2_ADDR_V6
    };
    ctx.push_data(0, len, 0).map_err(|_| ())?;
    // After the push, data..data_end is the new first element: the pushed
    // bytes (a fresh page), so `len` bytes from `data` are ours to write.
    let data = ctx.data();
    let end = ctx.data_end();
    if v4 {
        if data + (PROXY_V2_HEADER + PROXY_V2_ADDR_V4) as usize > end {
            return Err(());
        }
    } else if data + (PROXY_V2_HEADER + PROXY_V2_ADDR_V6) as usize > end {
        return Err(());
    }
    let p = data as *mut u8;
    // SAFETY: every write below is inside [data, data + len), checked
    // against data_end above.
    unsafe {
        for (i, b) in PROXY_V2_SIGNATURE.iter().enumerate() {
            *p.add(i) = *b;
        }
        *p.add(12) = PROXY_V2_VERSION_PROXY;
        if v4 {
            *p.add(13) = PROXY_V2_TCP4;
            write_bytes(p.add(14), &(PROXY_V2_ADDR_V4 as u16).to_be_bytes());
            write_bytes(p.add(16), &src.addr[3].to_ne_bytes());
            write_bytes(p.add(20), &dst.addr[3].to_ne_bytes());
            write_bytes(p.add(24), &src.port.to_ne_bytes());
            write_bytes(p.add(26), &dst.port.to_ne_bytes());
        } else {
            *p.add(13) = PROXY_V2_TCP6;
            write_bytes(p.add(14), &(PROXY_V2_ADDR_V6 as u16).to_be_bytes());
            for w in 0..4 {
                write_bytes(p.add(16 + 4 * w), &src.addr[w].to_ne_bytes());
                write_bytes(p.add(32 + 4 * w), &dst.addr[w].to_ne_bytes());
            }
            write_bytes(p.add(48), &src.port.to_ne_bytes());
            write_bytes(p.add(50), &dst.port.to_ne_bytes());
        }
    }
    Ok(())
}

/// # Safety
/// `p .. p + N` must be writable.
#[inline(always)]
unsafe fn write_bytes<const N: usize>(p: *mut u8, bytes: &[u8; N]) {
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: within the caller's range.
        unsafe { *p.add(i) = *b };
    }
}
