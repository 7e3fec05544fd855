//! `sockops`: connection lifecycle of enrolled pods, for access logs and
//! metrics.
//!
//! - ESTABLISHED (active: this pod dialled; passive: it accepted): if the
//!   socket's network namespace is enrolled, store a [`ConnState`] under the
//!   socket cookie, ask the kernel for state-change callbacks on this socket
//!   only, and emit an `OPEN` event.
//! - state changes: note FINs sent and received (so that the FIN's sequence
//!   number is not reported as a data byte); when the peer may still send a
//!   FIN while this side closes (FIN_WAIT1/2), also ask for a header callback
//!   per received segment, to see that FIN exactly.
//! - RTT samples (an ACK of new data) while ESTABLISHED: copy the socket's
//!   byte counters into the state, where the daemon reads the progress of
//!   open connections.
//! - CLOSE: emit a `CLOSE` event with the socket's final counters (bytes
//!   acked/received since ESTABLISHED, retransmits, srtt) and delete the
//!   state (and the socket's `KM_ORIGDST` entry), so nothing stays behind
//!   under connection churn.
//!
//! - TCP_CONNECT (SYN about to be sent) of a socket the connect pipeline
//!   steered: ask for state-change callbacks, so that its CLOSE — also
//!   SYN_SENT → CLOSE of a connect that never established — gives back the
//!   active-connection counts (`lb::release`), whether or not telemetry is on.
//!
//! Cost: sockets of pods that are not enrolled pay one array read and one
//! hash lookup at ESTABLISHED and nothing after (no callbacks are enabled
//! for them). Tracked sockets pay one LRU update at ESTABLISHED, one lookup
//! per state change (about five per connection), one ring-buffer write at
//! open and at close; per-segment callbacks only between this side's FIN
//! and CLOSE; one lookup and two stores per RTT sample (at most one per
//! ACK received). Needs Linux 5.15 (`bpf_get_netns_cookie` in sock_ops) and
//! 5.10 (header callbacks).

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING,
        BPF_TCP_ESTABLISHED, BPF_TCP_FIN_WAIT1, BPF_TCP_LAST_ACK,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, sock_ops},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::SockOpsContext,
    EbpfContext,
};
use aya_log_ebpf::{debug, error, trace, warn};
use core::ptr::{addr_of, read_volatile};
use kmesh_abi::{
    telemetry, ConnEvent, ConnState, SockAddr, CONN_FIN_RECEIVED, CONN_FIN_SENT, DIR_INBOUND,
    DIR_OUTBOUND, EVENT_CLOSE, EVENT_OPEN, EVENT_RING_BYTES, MAX_CONNS, TELEMETRY_CFG_FLAGS,
    TELEMETRY_CFG_LOG_LEVEL, TELEMETRY_CFG_MONITORING, TELEMETRY_CFG_WORDS,
};

use crate::{lb, KM_MANAGE, KM_ORIGDST};

/// Socket cookie → state of a tracked connection (deleted at CLOSE).
#[map]
static KM_CONN: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Connection events for the daemon (size may be overridden at load time).
#[map]
static KM_EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Per-CPU counters, indexes in `kmesh_abi::telemetry`.
#[map]
static KM_TELEMETRY: PerCpuArray<u64> = PerCpuArray::with_max_entries(telemetry::COUNT, 0);

/// `[TELEMETRY_CFG_FLAGS]`: `TELEMETRY_CFG_*` bits; `[TELEMETRY_CFG_LOG_LEVEL]`:
/// the kernel log level. Written by the daemon at runtime.
#[map]
static KM_TELEMETRY_CFG: Array<u32> = Array::with_max_entries(TELEMETRY_CFG_WORDS, 0);

const AF_INET: u32 = 2;
const TCPHDR_FIN: u32 = 0x01;

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = KM_TELEMETRY.get_ptr_mut(index) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU touches it.
        unsafe { *c += 1 };
    }
}

#[sock_ops]
pub fn kmesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            crate::waypoint::on_established(&ctx);
            crate::l7::on_established(&ctx);
            on_established(&ctx, DIR_OUTBOUND)
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx, DIR_INBOUND),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => on_segment(&ctx),
        BPF_SOCK_OPS_RTT_CB => on_rtt(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn monitoring_on() -> bool {
    KM_TELEMETRY_CFG
        .get(TELEMETRY_CFG_FLAGS)
        .is_some_and(|v| *v & TELEMETRY_CFG_MONITORING != 0)
}

/// Kernel log levels (aya-log's numbering).
const LOG_ERROR: u32 = 1;
const LOG_WARN: u32 = 2;
const LOG_DEBUG: u32 = 4;
const LOG_TRACE: u32 = 5;

/// Whether log lines of `level` are wanted now. Checked before formatting
/// anything: a disabled statement costs one array read. (aya-log's own
/// level is fixed at load time; this one the daemon changes at runtime.)
#[inline(always)]
fn log_on(level: u32) -> bool {
    KM_TELEMETRY_CFG
        .get(TELEMETRY_CFG_LOG_LEVEL)
        .is_some_and(|v| *v >= level)
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext, direction: u8) {
    if !monitoring_on() {
        return;
    }
    // SAFETY: helper allowed for sock_ops programs since Linux 5.15.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is only tested for presence.
    if unsafe { KM_MANAGE.get(&netns) }.is_none() {
        return;
    }
    // SAFETY: helper allowed for sock_ops programs; the same cookie the
    // connect programs saw for this socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let ops = ctx.ops;
    // SAFETY: context reads of fields sock_ops may read (full socket at
    // ESTABLISHED); the u64 counters with one 8-byte load each.
    let (acked, received) = unsafe {
        (
            read_volatile(addr_of!((*ops).bytes_acked)),
            read_volatile(addr_of!((*ops).bytes_received)),
        )
    };
    let mut state = ConnState {
        // SAFETY: helper without preconditions.
        start_ns: unsafe { bpf_ktime_get_ns() },
        netns_cookie: netns,
        base_acked: acked,
        base_received: received,
        acked,
        received,
        direction,
        ..ConnState::default()
    };
    if direction == DIR_OUTBOUND {
        // SAFETY: the value is copied out at once.
        if let Some(orig) = unsafe { KM_ORIGDST.get(&cookie) } {
            state.orig_dst = *orig;
            state.has_orig_dst = 1;
        }
    }
    if KM_CONN.insert(&cookie, &state, 0).is_err() {
        count(telemetry::CONN_STATE_FAILED);
        if log_on(LOG_ERROR) {
            error!(ctx, "sockops: storing state of socket {} failed", cookie);
        }
        return;
    }
    if log_on(LOG_TRACE) {
        trace!(
            ctx,
            "sockops: tracking socket {} (netns {}, direction {})",
            cookie,
            netns,
            direction
        );
    }
    count(telemetry::CONN_OPENED);
    // Callbacks on state changes and RTT samples of this socket only (the
    // flags live in the socket).
    let _ = ctx.set_cb_flags(
        (ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32,
    );
    emit(ctx, cookie, &state, EVENT_OPEN);
}

/// An active open is about to send its SYN: a steered socket needs its
/// CLOSE seen to give back its connection counts. Costs one hash lookup.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: helper allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if lb::is_steered(cookie) {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    // SAFETY: helper allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if new == BPF_TCP_CLOSE {
        lb::release(cookie);
    }
    let Some(state) = KM_CONN.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; state changes of one socket
    // are serialised by the socket lock, so nothing else writes this entry.
    let state = unsafe { &mut *state };
    if new == BPF_TCP_FIN_WAIT1 || new == BPF_TCP_LAST_ACK {
        state.flags |= CONN_FIN_SENT;
    }
    if new == BPF_TCP_CLOSE_WAIT || new == BPF_TCP_CLOSING {
        state.flags |= CONN_FIN_RECEIVED;
    }
    if old == BPF_TCP_ESTABLISHED && new == BPF_TCP_FIN_WAIT1 {
        // From here the peer's FIN can arrive while this side's full socket
        // goes FIN_WAIT2 → CLOSE without a state that tells it apart; look
        // at the received segments' flags instead (only until CLOSE).
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG) as i32);
    }
    if new != BPF_TCP_CLOSE {
        return;
    }
    let ops = ctx.ops;
    // SAFETY: context reads of fields sock_ops may read on a full socket
    // (state callbacks are made on full sockets); 8-byte loads for the u64s.
    let (acked, received, snd_una, snd_nxt) = unsafe {
        (
            read_volatile(addr_of!((*ops).bytes_acked)),
            read_volatile(addr_of!((*ops).bytes_received)),
            read_volatile(addr_of!((*ops).snd_una)),
            read_volatile(addr_of!((*ops).snd_nxt)),
        )
    };
    let mut sent = acked.wrapping_sub(state.base_acked);
    // Our FIN takes one sequence number; it is acked when nothing sent is
    // outstanding (the FIN is the last thing sent).
    if state.flags & CONN_FIN_SENT != 0 && snd_una == snd_nxt && sent > 0 {
        sent -= 1;
    }
    let mut recv = received.wrapping_sub(state.base_received);
    if state.flags & CONN_FIN_RECEIVED != 0 && recv > 0 {
        recv -= 1;
    }
    count(telemetry::CONN_CLOSED);
    if log_on(LOG_DEBUG) {
        debug!(
            ctx,
            "sockops: socket {} closed: sent {} received {} retransmits {}",
            cookie,
            sent,
            recv,
            state_retrans(ops)
        );
    }
    if monitoring_on() {
        emit_close(ctx, cookie, state, sent, recv);
    }
    let _ = KM_CONN.remove(&cookie);
    // The connect programs' record of the dialled VIP (for getpeername) is
    // of no use once the socket is closed: free it now rather than waiting
    // for LRU eviction.
    if state.has_orig_dst != 0 {
        let _ = KM_ORIGDST.remove(&cookie);
    }
}

/// An RTT sample: new data was acked. Copies the byte counters while the
/// connection is ESTABLISHED (before any FIN, which takes a sequence number
/// but is not data); what follows the first FIN is settled by the CLOSE
/// event. `received` lags by the data of the segment carrying this ACK
/// (the ACK is processed before its payload is queued), and a side that
/// only receives has no RTT samples: its progress shows at the next sample
/// or at close.
#[inline(always)]
fn on_rtt(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // SAFETY: u32 context read.
    if unsafe { read_volatile(addr_of!((*ops).state)) } != BPF_TCP_ESTABLISHED {
        return;
    }
    // SAFETY: helper allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(state) = KM_CONN.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: 8-byte context reads of the u64 counters (full socket: RTT
    // callbacks are made on full sockets).
    let (acked, received) = unsafe {
        (
            read_volatile(addr_of!((*ops).bytes_acked)),
            read_volatile(addr_of!((*ops).bytes_received)),
        )
    };
    // SAFETY: pointer from a successful lookup; callbacks of one socket are
    // serialised by the socket lock. The daemon reads the entry without
    // that lock: each u64 is stored whole, so it sees an old or a new value.
    unsafe {
        (*state).acked = acked;
        (*state).received = received;
    }
}

/// A received segment between this side's FIN and CLOSE.
#[inline(always)]
fn on_segment(ctx: &SockOpsContext) {
    // SAFETY: a u32 context field of sock_ops (Linux 5.10+).
    let flags = unsafe { read_volatile(addr_of!((*ctx.ops).skb_tcp_flags)) };
    if flags & TCPHDR_FIN == 0 {
        return;
    }
    // SAFETY: helper allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(state) = KM_CONN.get_ptr_mut(&cookie) {
        // SAFETY: as in on_state_change: serialised by the socket lock.
        unsafe { (*state).flags |= CONN_FIN_RECEIVED };
    }
}

#[inline(always)]
fn state_retrans(ops: *mut bpf_sock_ops) -> u32 {
    // SAFETY: u32 context read.
    unsafe { read_volatile(addr_of!((*ops).total_retrans)) }
}

/// This socket's and the peer's address, from the context fields.
#[inline(always)]
pub(crate) fn addresses(ops: *mut bpf_sock_ops) -> (SockAddr, SockAddr) {
    // Every field is read before any branch: a context pointer computed in
    // one branch and dereferenced in another is rejected by the verifier
    // ("dereference of modified ctx ptr").
    // SAFETY: 4-byte context reads of address fields sock_ops may read.
    let (family, lport, rport, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).remote_port)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
        )
    };
    to_sock_addrs(family, lport, rport, l4, r4, l6, r6)
}

/// Local and remote [`SockAddr`] from the raw address fields that
/// `bpf_sock_ops` and `sk_msg_md` share (same names, same encodings).
#[inline(always)]
pub(crate) fn to_sock_addrs(
    family: u32,
    lport: u32,
    rport: u32,
    l4: u32,
    r4: u32,
    l6: [u32; 4],
    r6: [u32; 4],
) -> (SockAddr, SockAddr) {
    // local_port is in host order; remote_port holds the network-order
    // port in its upper 16 bits (on little-endian hosts).
    let lport = (lport as u16).to_be();
    let rport = (rport >> 16) as u16;
    if family == AF_INET {
        (
            SockAddr::from_raw_v4(l4, lport),
            SockAddr::from_raw_v4(r4, rport),
        )
    } else {
        (
            SockAddr::from_raw_v6(l6, lport),
            SockAddr::from_raw_v6(r6, rport),
        )
    }
}

#[inline(always)]
fn emit(ctx: &SockOpsContext, cookie: u64, state: &ConnState, kind: u8) {
    fill_and_submit(ctx, cookie, state, kind, 0, 0);
}

#[inline(always)]
fn emit_close(ctx: &SockOpsContext, cookie: u64, state: &ConnState, sent: u64, recv: u64) {
    fill_and_submit(ctx, cookie, state, EVENT_CLOSE, sent, recv);
}

#[inline(always)]
fn fill_and_submit(
    ctx: &SockOpsContext,
    cookie: u64,
    state: &ConnState,
    kind: u8,
    sent: u64,
    recv: u64,
) {
    let Some(mut entry) = KM_EVENTS.reserve::<ConnEvent>(0) else {
        count(telemetry::EVENTS_DROPPED);
        if log_on(LOG_WARN) {
            warn!(
                ctx,
                "sockops: event ring buffer full, event of socket {} dropped", cookie
            );
        }
        return;
    };
    let ops = ctx.ops;
    let (local, remote) = addresses(ops);
    // SAFETY: u32 context reads.
    let (srtt, retrans) = unsafe {
        (
            read_volatile(addr_of!((*ops).srtt_us)),
            read_volatile(addr_of!((*ops).total_retrans)),
        )
    };
    entry.write(ConnEvent {
        start_ns: state.start_ns,
        // SAFETY: helper without preconditions.
        end_ns: unsafe { bpf_ktime_get_ns() },
        netns_cookie: state.netns_cookie,
        sock_cookie: cookie,
        bytes_sent: sent,
        bytes_received: recv,
        local,
        remote,
        orig_dst: state.orig_dst,
        // The kernel keeps srtt scaled by 8.
        srtt_us: srtt >> 3,
        total_retrans: retrans,
        direction: state.direction,
        kind,
        has_orig_dst: state.has_orig_dst,
        pad: 0,
    });
    entry.submit(0);
}
