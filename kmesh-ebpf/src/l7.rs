//! HTTP/1.1 routing decided in the kernel.
//!
//! - `connect4/6` ([`steer`]): a connect to the VIP of an L7 service goes to
//!   the connector (a daemon socket) instead; the socket cookie is noted.
//! - `sockops` ([`on_established`]): such a socket, once established, gets
//!   a decision entry keyed by its local address (what the connector sees
//!   as the peer) and joins `KM_L7_SOCKS`, so that `kmesh_l7_msg` sees its
//!   writes.
//! - `kmesh_l7_msg` (sk_msg): for every sendmsg that starts a request head
//!   (`METHOD SP`), parses up to `MAX_L7_HEAD` bytes in one pass
//!   (`bpf_loop`, one callback per byte, so the verifier checks the body
//!   once), matches Host, path, headers and query against the service's
//!   hashed conditions, picks the route and, for weighted routes, the
//!   cluster, and writes the decision. The bytes always pass on unchanged.
//!
//! Cost per request head: one hash update per byte, one map lookup per
//! header name, per query parameter and per length at which a path or
//! header prefix condition exists, up to 16 route checks. Needs Linux 5.17
//! (`bpf_loop` in sk_msg programs).

use aya_ebpf::{
    bindings::{sk_msg_md, BPF_ANY},
    cty::c_void,
    helpers::{
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_loop, bpf_msg_pull_data,
        generated::bpf_probe_read_kernel,
    },
    macros::{map, sk_msg},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use core::ptr::{addr_of, read_volatile};
use kmesh_abi::l7::*;
use kmesh_abi::SockAddr;

/// L7 service VIP:port → its tables' id and the connector address.
#[map]
static KM_L7_SERVICE: HashMap<SockAddr, L7Service> = HashMap::with_max_entries(MAX_L7_SERVICES, 0);

/// The same services by id, for the sk_msg program.
#[map]
static KM_L7_ID: HashMap<u32, L7Service> = HashMap::with_max_entries(MAX_L7_SERVICES, 0);

/// Hashed conditions → condition bits (or virtual host + 1 for `COND_HOST`).
#[map]
static KM_L7_COND: HashMap<L7CondKey, u64> = HashMap::with_max_entries(MAX_L7_CONDS, 0);

/// (service, virtual host) → routes in order.
#[map]
static KM_L7_VHOST: HashMap<L7VhostKey, L7Routes> = HashMap::with_max_entries(MAX_L7_VHOSTS, 0);

/// Route action id → clusters and weights.
#[map]
static KM_L7_GROUP: HashMap<u32, L7Group> = HashMap::with_max_entries(MAX_L7_GROUPS, 0);

/// Client local address → the latest decision on that connection.
#[map]
static KM_L7_CONN: LruHashMap<SockAddr, L7Conn> = LruHashMap::with_max_entries(MAX_L7_CONNS, 0);

/// Socket cookie → L7 service id, from connect() until ESTABLISHED.
#[map]
static KM_L7_PENDING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(MAX_L7_CONNS, 0);

/// The client sockets whose writes `kmesh_l7_msg` sees (cookie → socket).
#[map]
static KM_L7_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_L7_CONNS, 0);

/// `[0]`: the hash seed.
#[map]
static KM_L7_CFG: Array<u64> = Array::with_max_entries(1, 0);

/// Per-CPU counters, indexes in `kmesh_abi::l7::l7stats`.
#[map]
static KM_L7_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(l7stats::COUNT, 0);

/// Parser state of the request head being read on this CPU.
#[map]
static KM_L7_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct Scratch {
    buf: [u8; MAX_L7_HEAD as usize],
    seed: u64,
    /// Condition bits seen so far.
    mask: u64,
    /// Hash of the token being read (path, `name:value`, `name=value`).
    h: u64,
    /// Header value hash up to its last non-blank byte.
    ht: u64,
    /// Host value (lowercased) hash, and up to its last non-blank byte.
    hh: u64,
    hht: u64,
    /// Hash of the request target (path and query).
    target: u64,
    host_name: u64,
    v11: u64,
    v10: u64,
    path_lens: [u64; 2],
    hdr_lens: [u64; 2],
    l7_id: u32,
    state: u32,
    len: u32,
    tlen: u32,
    hlen: u32,
    hlent: u32,
    /// `FB_*`, or `NOT_REQUEST`.
    fail: u32,
    done: u32,
    flags: u32,
    pad: u32,
}

const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const NOT_REQUEST: u32 = 99;

const S_METHOD: u32 = 0;
const S_TARGET: u32 = 1;
const S_PATH: u32 = 2;
const S_QNAME: u32 = 3;
const S_QVAL: u32 = 4;
const S_VERSION: u32 = 5;
const S_VERSION_LF: u32 = 6;
const S_HNAME_START: u32 = 7;
const S_HNAME: u32 = 8;
const S_HVAL: u32 = 9;
const S_HVAL_LF: u32 = 10;
const S_END_LF: u32 = 11;

const F_HOST_SEEN: u32 = 1;
const F_CUR_HOST: u32 = 2;
const F_CUR_COND: u32 = 4;
const F_LWS: u32 = 8;
const F_QSKIP: u32 = 16;

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = KM_L7_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU touches it.
        unsafe { *c += 1 };
    }
}

/// connect4/6: the connector address when `dst` is an L7 service.
#[inline(always)]
pub fn steer(ctx: &SockAddrContext, dst: &SockAddr) -> Option<SockAddr> {
    // SAFETY: the value is copied out at once.
    let svc = unsafe { KM_L7_SERVICE.get(dst) }.copied()?;
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Without this entry the socket would reach the connector with no
    // kernel decision; the connector then decides (never another route).
    let _ = KM_L7_PENDING.insert(&cookie, &svc.l7_id, 0);
    count(l7stats::STEERED);
    Some(svc.connector)
}

/// sockops, active ESTABLISHED: an L7-steered socket gets its decision
/// entry and joins the sockhash.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(id) = (unsafe { KM_L7_PENDING.get(&cookie) }).copied() else {
        return;
    };
    let _ = KM_L7_PENDING.remove(&cookie);
    let ops = ctx.ops;
    // SAFETY: 4-byte context loads, all made unconditionally so that the
    // compiler cannot merge them into a load through a selected pointer
    // (which the verifier rejects).
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            (read_volatile(addr_of!((*ops).local_port)) as u16).to_be(),
        )
    };
    let key = if family == AF_INET {
        SockAddr::from_raw_v4(ip4, port)
    } else {
        SockAddr::from_raw_v6(ip6, port)
    };
    let conn = L7Conn {
        l7_id: id,
        ..L7Conn::default()
    };
    if KM_L7_CONN.insert(&key, &conn, 0).is_ok() {
        let mut k = cookie;
        // SAFETY: `ops` is the program's context pointer.
        let _ = KM_L7_SOCKS.update(&mut k, unsafe { &mut *ctx.ops }, BPF_ANY as u64);
    }
}

#[sk_msg]
pub fn kmesh_l7_msg(ctx: SkMsgContext) -> u32 {
    decide(&ctx);
    SK_PASS
}

/// # Safety
/// `md` must be the program's context pointer.
#[inline(always)]
unsafe fn local_addr(md: *mut sk_msg_md) -> SockAddr {
    // SAFETY: 4-byte context loads.
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*md).family)),
            read_volatile(addr_of!((*md).local_ip4)),
            [
                read_volatile(addr_of!((*md).local_ip6[0])),
                read_volatile(addr_of!((*md).local_ip6[1])),
                read_volatile(addr_of!((*md).local_ip6[2])),
                read_volatile(addr_of!((*md).local_ip6[3])),
            ],
            (read_volatile(addr_of!((*md).local_port)) as u16).to_be(),
        )
    };
    if family == AF_INET {
        SockAddr::from_raw_v4(ip4, port)
    } else {
        SockAddr::from_raw_v6(ip6, port)
    }
}

#[inline(always)]
fn decide(ctx: &SkMsgContext) {
    let md = ctx.msg;
    // SAFETY: `md` is the context pointer.
    let key = unsafe { local_addr(md) };
    let Some(conn) = KM_L7_CONN.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; LRU values stay valid for
    // the program's run.
    let l7_id = unsafe { (*conn).l7_id };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { KM_L7_ID.get(&l7_id) }).copied() else {
        return;
    };
    let size = ctx.size();
    let mut n = if size > MAX_L7_HEAD { MAX_L7_HEAD } else { size };
    if n == 0 {
        return;
    }
    // SAFETY: `end` is at most `msg->size`, as the helper requires.
    if unsafe { bpf_msg_pull_data(md, 0, n, 0) } != 0 {
        return;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if end <= data {
        return;
    }
    let avail = (end - data) as u32;
    if avail < n {
        n = avail;
    }
    if n == 0 || n > MAX_L7_HEAD {
        return;
    }
    let Some(s) = KM_L7_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch from a successful lookup; no other program
    // on this CPU runs until this one returns.
    let s = unsafe { &mut *s };
    // SAFETY: copies `n` ≤ MAX_L7_HEAD bytes of the pulled (linear) head
    // into the scratch buffer of the same size.
    if unsafe { bpf_probe_read_kernel(s.buf.as_mut_ptr() as *mut c_void, n, data as *const c_void) } != 0 {
        return;
    }
    let seed = KM_L7_CFG.get(0).copied().unwrap_or(0);
    s.seed = seed;
    s.mask = 0;
    s.h = seed;
    s.ht = seed;
    s.hh = seed;
    s.hht = seed;
    s.target = seed;
    s.host_name = hash(seed, b"host");
    s.v11 = hash(seed, b"HTTP/1.1");
    s.v10 = hash(seed, b"HTTP/1.0");
    s.path_lens = svc.path_prefix_lens;
    s.hdr_lens = svc.hdr_prefix_lens;
    s.l7_id = l7_id;
    s.state = S_METHOD;
    s.len = 0;
    s.tlen = 0;
    s.hlen = 0;
    s.hlent = 0;
    s.fail = 0;
    s.done = 0;
    s.flags = 0;
    // SAFETY: `parse_byte` has the callback signature bpf_loop expects and
    // ignores its context argument.
    unsafe { bpf_loop(n, parse_byte as *mut c_void, core::ptr::null_mut(), 0) };
    if s.fail == NOT_REQUEST {
        return;
    }
    let mut d = L7Conn {
        l7_id,
        // SAFETY: pointer from the lookup above.
        seq: unsafe { (*conn).seq }.wrapping_add(1),
        target_hash: s.target,
        vhost: L7_NONE,
        route: L7_NONE,
        cluster: L7_NONE,
        ..L7Conn::default()
    };
    let reason = if s.fail != 0 {
        s.fail
    } else if s.done == 0 {
        FB_INCOMPLETE
    } else if s.flags & F_HOST_SEEN == 0 {
        FB_NO_HOST
    } else {
        0
    };
    if reason != 0 {
        d.status = L7_FALLBACK;
        d.reason = reason;
    } else {
        route(&svc, s, &mut d);
    }
    count(match d.status {
        L7_DECIDED => l7stats::DECIDED,
        L7_NO_ROUTE => l7stats::NO_ROUTE,
        _ => l7stats::FALLBACK,
    });
    // SAFETY: pointer from the lookup above; the connector reads the entry
    // only after the bytes of this request reached it, i.e. after this write.
    unsafe { *conn = d };
}

#[inline(always)]
fn route(svc: &L7Service, s: &Scratch, d: &mut L7Conn) {
    let host = cond(s.l7_id, COND_HOST, s.hlent, s.hht);
    let vhost = if host != 0 {
        (host - 1) as u32
    } else if svc.flags & L7_WILDCARD_DOMAINS != 0 {
        d.status = L7_FALLBACK;
        d.reason = FB_WILDCARD;
        return;
    } else if svc.star_vhost != L7_NONE {
        svc.star_vhost
    } else {
        d.status = L7_NO_ROUTE;
        return;
    };
    d.vhost = vhost;
    let key = L7VhostKey {
        l7_id: s.l7_id,
        vhost,
    };
    // SAFETY: read-only use of a map value.
    let Some(routes) = (unsafe { KM_L7_VHOST.get(&key) }) else {
        d.status = L7_NO_ROUTE;
        return;
    };
    let mut group = L7_NONE;
    let mut i = 0;
    while i < MAX_L7_ROUTES {
        if i as u32 >= routes.count {
            break;
        }
        let r = &routes.routes[i];
        if s.mask & r.need == r.need && s.mask & r.forbid == 0 {
            group = r.group;
            d.route = r.index;
            break;
        }
        i += 1;
    }
    if group == L7_NONE {
        d.status = L7_NO_ROUTE;
        return;
    }
    // SAFETY: read-only use of a map value.
    let Some(g) = (unsafe { KM_L7_GROUP.get(&group) }) else {
        d.status = L7_FALLBACK;
        d.reason = FB_MALFORMED;
        return;
    };
    let mut cluster = g.clusters[0];
    if g.count > 1 && g.total > 0 {
        // SAFETY: helper without preconditions.
        let x = unsafe { bpf_get_prandom_u32() } % g.total;
        let mut j = 0;
        while j < MAX_L7_GROUP_CLUSTERS {
            if j as u32 >= g.count {
                break;
            }
            if x < g.cum[j] {
                cluster = g.clusters[j];
                break;
            }
            j += 1;
        }
    }
    d.cluster = cluster;
    d.status = L7_DECIDED;
}

#[inline(always)]
fn cond(l7_id: u32, kind: u32, len: u32, hash: u64) -> u64 {
    if len as usize > MAX_L7_MATCH {
        return 0;
    }
    let k = L7CondKey {
        l7_id,
        kind,
        len,
        pad: 0,
        hash,
    };
    // SAFETY: copied out at once.
    unsafe { KM_L7_COND.get(&k) }.copied().unwrap_or(0)
}

#[inline(always)]
fn has_len(bits: &[u64; 2], n: u32) -> bool {
    if n as usize > MAX_L7_MATCH {
        return false;
    }
    // Constant indexes: a computed one loses its bound in the verifier.
    let word = if n < 64 { bits[0] } else { bits[1] };
    (word >> (n & 63)) & 1 == 1
}

#[inline(always)]
fn lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() {
        b + 32
    } else {
        b
    }
}

/// bpf_loop callback: one byte of the head. Returns 1 to stop.
extern "C" fn parse_byte(i: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = KM_L7_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch, as in `decide`, which is waiting for us.
    let s = unsafe { &mut *s };
    let b = s.buf[(i & (MAX_L7_HEAD - 1)) as usize];
    if feed(s, b) {
        0
    } else {
        1
    }
}

#[inline(always)]
fn fail(s: &mut Scratch, reason: u32) -> bool {
    s.fail = reason;
    false
}

/// Advances the parser by one byte; false stops the loop.
#[inline(always)]
fn feed(s: &mut Scratch, b: u8) -> bool {
    match s.state {
        S_METHOD => {
            if b == b' ' && s.len > 0 {
                s.state = S_TARGET;
            } else if b.is_ascii_uppercase() && s.len < 16 {
                s.len += 1;
            } else {
                return fail(s, NOT_REQUEST);
            }
        }
        S_TARGET => {
            // Only origin-form targets; `*` and absolute-form go to the connector.
            if b != b'/' {
                return fail(s, FB_MALFORMED);
            }
            s.target = step(s.seed, b);
            s.h = step(s.seed, b);
            s.len = 1;
            if has_len(&s.path_lens, 1) {
                s.mask |= cond(s.l7_id, COND_PATH_PREFIX, 1, s.h);
            }
            s.state = S_PATH;
        }
        S_PATH => {
            if b == b' ' || b == b'?' {
                s.mask |= cond(s.l7_id, COND_PATH_EXACT, s.len, s.h);
                s.mask |= cond(s.l7_id, COND_PATH_SEP, s.len, s.h);
                if b == b'?' {
                    s.target = step(s.target, b);
                    s.state = S_QNAME;
                    s.flags &= !F_QSKIP;
                } else {
                    s.state = S_VERSION;
                }
                s.h = s.seed;
                s.len = 0;
            } else if b <= 0x20 || b >= 0x7f {
                return fail(s, FB_MALFORMED);
            } else {
                if b == b'/' {
                    s.mask |= cond(s.l7_id, COND_PATH_SEP, s.len, s.h);
                }
                s.target = step(s.target, b);
                s.h = step(s.h, b);
                s.len += 1;
                if has_len(&s.path_lens, s.len) {
                    s.mask |= cond(s.l7_id, COND_PATH_PREFIX, s.len, s.h);
                }
            }
        }
        S_QNAME | S_QVAL => {
            if b == b' ' || b == b'&' {
                query_param_end(s);
                s.h = s.seed;
                s.len = 0;
                if b == b' ' {
                    s.state = S_VERSION;
                } else {
                    s.target = step(s.target, b);
                    s.state = S_QNAME;
                    s.flags &= !F_QSKIP;
                }
            } else if b <= 0x20 || b >= 0x7f {
                return fail(s, FB_MALFORMED);
            } else {
                s.target = step(s.target, b);
                if s.state == S_QNAME && b == b'=' {
                    let bits = cond(s.l7_id, COND_QUERY_PRESENT, s.len, s.h);
                    if s.mask & bits != 0 {
                        // Envoy matches the first occurrence of a name.
                        s.flags |= F_QSKIP;
                    }
                    s.mask |= bits;
                    s.state = S_QVAL;
                }
                s.h = step(s.h, b);
                s.len += 1;
            }
        }
        S_VERSION => {
            if b == b'\r' {
                if s.len != 8 || (s.h != s.v11 && s.h != s.v10) {
                    return fail(s, FB_MALFORMED);
                }
                s.state = S_VERSION_LF;
            } else if s.len < 8 {
                s.h = step(s.h, b);
                s.len += 1;
            } else {
                return fail(s, FB_MALFORMED);
            }
        }
        S_VERSION_LF | S_HVAL_LF => {
            if b != b'\n' {
                return fail(s, FB_MALFORMED);
            }
            s.state = S_HNAME_START;
        }
        S_HNAME_START => {
            if b == b'\r' {
                s.state = S_END_LF;
            } else {
                s.h = s.seed;
                s.len = 0;
                s.state = S_HNAME;
                return header_name_byte(s, b);
            }
        }
        S_HNAME => return header_name_byte(s, b),
        S_HVAL => {
            if b == b'\r' {
                if s.flags & F_CUR_COND != 0 {
                    s.mask |= cond(s.l7_id, COND_HDR_EXACT, s.tlen, s.ht);
                }
                s.state = S_HVAL_LF;
            } else if (b == b' ' || b == b'\t') && s.flags & F_LWS != 0 {
                // leading blanks are not part of the value
            } else if (b < 0x20 && b != b'\t') || b == 0x7f {
                return fail(s, FB_MALFORMED);
            } else {
                s.flags &= !F_LWS;
                let blank = b == b' ' || b == b'\t';
                if s.flags & F_CUR_COND != 0 {
                    s.h = step(s.h, b);
                    s.len += 1;
                    if !blank {
                        s.ht = s.h;
                        s.tlen = s.len;
                    }
                    if has_len(&s.hdr_lens, s.len) {
                        s.mask |= cond(s.l7_id, COND_HDR_PREFIX, s.len, s.h);
                    }
                }
                if s.flags & F_CUR_HOST != 0 {
                    s.hh = step(s.hh, lower(b));
                    s.hlen += 1;
                    if !blank {
                        s.hht = s.hh;
                        s.hlent = s.hlen;
                    }
                }
            }
        }
        S_END_LF => {
            if b != b'\n' {
                return fail(s, FB_MALFORMED);
            }
            s.done = 1;
            return false;
        }
        _ => return fail(s, FB_MALFORMED),
    }
    true
}

#[inline(always)]
fn header_name_byte(s: &mut Scratch, b: u8) -> bool {
    if b == b':' {
        if s.len == 0 {
            return fail(s, FB_MALFORMED);
        }
        let bits = cond(s.l7_id, COND_HDR_PRESENT, s.len, s.h);
        if bits != 0 && s.mask & bits != 0 {
            // Envoy joins repeated headers with ','; the connector does that.
            return fail(s, FB_DUPLICATE);
        }
        s.mask |= bits;
        s.flags &= !(F_CUR_HOST | F_CUR_COND);
        if s.len == 4 && s.h == s.host_name {
            if s.flags & F_HOST_SEEN != 0 {
                return fail(s, FB_DUPLICATE);
            }
            s.flags |= F_HOST_SEEN | F_CUR_HOST;
        }
        if bits != 0 {
            s.flags |= F_CUR_COND;
        }
        s.h = step(s.h, b':');
        s.len += 1;
        s.ht = s.h;
        s.tlen = s.len;
        s.flags |= F_LWS;
        s.state = S_HVAL;
        true
    } else if b > 0x20 && b < 0x7f {
        s.h = step(s.h, lower(b));
        s.len += 1;
        true
    } else {
        fail(s, FB_MALFORMED)
    }
}

/// End of one query parameter (at `&` or the end of the target).
#[inline(always)]
fn query_param_end(s: &mut Scratch) {
    if s.state == S_QNAME {
        if s.len == 0 {
            return;
        }
        // `name` without `=`: present, with an empty value.
        let bits = cond(s.l7_id, COND_QUERY_PRESENT, s.len, s.h);
        let first = s.mask & bits == 0;
        s.mask |= bits;
        if first {
            s.mask |= cond(s.l7_id, COND_QUERY_EXACT, s.len + 1, step(s.h, b'='));
        }
    } else if s.flags & F_QSKIP == 0 {
        s.mask |= cond(s.l7_id, COND_QUERY_EXACT, s.len, s.h);
    }
}
