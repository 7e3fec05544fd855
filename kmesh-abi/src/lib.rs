//! The kernel/userspace ABI of kmesh-rs: every key and value that crosses a
//! BPF map, as `#[repr(C)]` types used verbatim by the eBPF programs
//! (`kmesh-ebpf`, `no_std`) and by the daemon.
//!
//! Invariants every type here keeps:
//! - no implicit padding: every byte is a named field, so a key hashes the
//!   same in the kernel and in userspace (padding bytes would be garbage);
//! - addresses and ports are stored exactly as the kernel hands them to a
//!   `cgroup/connect*` program: raw network byte order in native integers
//!   (`bpf_sock_addr.user_ip4`, `user_ip6[4]`, `user_port`), so the hot path
//!   copies without swapping;
//! - an IPv4 address is stored IPv4-mapped (`::ffff:a.b.c.d`) with
//!   `family = FAMILY_V4`, so a dual-stack socket dialling `::ffff:VIP`
//!   finds the same service as a plain IPv4 socket.
//!
//! Changing a layout is an ABI break: bump [`ABI_VERSION`].
#![no_std]
#![deny(unsafe_code)]

/// Bumped on every layout change of a type in this crate (or of a pinned
/// map). 2: `ServiceValue` gained `cluster_id`/`max_connections`,
/// `ConnState` the byte counters of open connections, `KM_STATS` three
/// counters; the connect pipeline's pinned context map is new.
pub const ABI_VERSION: u32 = 2;

/// Capacity of the enrolled-network-namespace map.
pub const MAX_ENROLLED_NETNS: u32 = 16_384;
/// Capacity of the service map (one entry per listener VIP:port).
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the slot map, summed over all services.
pub const MAX_SLOTS: u32 = 262_144;
/// Upper bound of slots one service may use (weights are scaled to fit).
pub const MAX_SLOTS_PER_SERVICE: u32 = 4_096;
/// Capacity of the socket-cookie → original-destination map (LRU).
pub const MAX_ORIG_DST: u32 = 65_536;

/// `SockAddr::family` for IPv4 (stored IPv4-mapped).
pub const FAMILY_V4: u8 = 4;
/// `SockAddr::family` for IPv6.
pub const FAMILY_V6: u8 = 6;

/// `ServiceValue::lb_policy`: per-CPU round robin over the slots.
pub const LB_ROUND_ROBIN: u32 = 0;
/// `ServiceValue::lb_policy`: uniform random slot.
pub const LB_RANDOM: u32 = 1;
/// `ServiceValue::lb_policy`: power of two choices: two random slots, the
/// endpoint with fewer active connections wins.
pub const LB_LEAST_REQUEST: u32 = 2;
/// `ServiceValue::lb_policy`: the slots are a Maglev lookup table; the
/// client (its network namespace) is hashed onto it.
pub const LB_MAGLEV: u32 = 3;

/// The hash the `LB_MAGLEV` stage puts a client's network-namespace cookie
/// through before taking it modulo the table size: splitmix64's
/// finaliser, so that consecutive cookies spread over the table. Shared
/// with userspace so a client's entry can be predicted.
#[inline(always)]
pub const fn maglev_hash(cookie: u64) -> u32 {
    let mut x = cookie;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) as u32
}

/// Capacity of the per-cluster active-connection and overflow maps.
pub const MAX_CLUSTERS: u32 = 16_384;
/// Capacity of the per-endpoint active-connection map.
pub const MAX_ENDPOINTS: u32 = 65_536;
/// Capacity of the socket-cookie → steering record map (one entry per
/// open connection the connect programs steered).
pub const MAX_STEERED: u32 = 65_536;

/// Indexes of the tail-called stages of the connect pipeline in
/// `KM_CONNECT4_STAGES` / `KM_CONNECT6_STAGES`. The LB stages sit at the
/// index of their `LB_*` value, so the entry program tail-calls
/// `stages[service.lb_policy]`.
pub mod stage {
    pub const ROUND_ROBIN: u32 = super::LB_ROUND_ROBIN;
    pub const RANDOM: u32 = super::LB_RANDOM;
    pub const LEAST_REQUEST: u32 = super::LB_LEAST_REQUEST;
    pub const MAGLEV: u32 = super::LB_MAGLEV;
    /// Circuit breaking, connection accounting and the address rewrite.
    pub const ENDPOINT: u32 = 4;
    /// Number of stages (the program arrays' size).
    pub const COUNT: u32 = 5;
}

/// An IP socket address in kernel byte order. Used as the service key
/// (the VIP:port a listener captures), as a backend (slot value) and as the
/// original destination remembered for `getpeername`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockAddr {
    /// IPv6 address or IPv4-mapped IPv4 address, network byte order per word.
    pub addr: [u32; 4],
    /// Port, network byte order (as the low 16 bits of `user_port`).
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Always zero.
    pub pad: u8,
}

impl SockAddr {
    /// The word that marks an IPv4-mapped IPv6 address (`::ffff:0:0/96`),
    /// as it sits in `addr[2]`.
    pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// Builds an IPv4 address from the raw `user_ip4` word and raw port.
    #[inline(always)]
    pub const fn from_raw_v4(ip4: u32, port: u16) -> Self {
        SockAddr {
            addr: [0, 0, Self::V4_MAPPED_WORD, ip4],
            port,
            family: FAMILY_V4,
            pad: 0,
        }
    }

    /// Builds an address from the raw `user_ip6` words; an IPv4-mapped
    /// address becomes a [`FAMILY_V4`] address.
    #[inline(always)]
    pub const fn from_raw_v6(ip6: [u32; 4], port: u16) -> Self {
        let family = if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == Self::V4_MAPPED_WORD {
            FAMILY_V4
        } else {
            FAMILY_V6
        };
        SockAddr {
            addr: ip6,
            port,
            family,
            pad: 0,
        }
    }
}

/// Value of the service map: where a VIP's slots live and how to pick one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Key prefix of this service's slots in the slot map. A changed
    /// service gets a fresh id whose slots are written before this entry is
    /// switched to it (make-before-break).
    pub service_id: u32,
    /// Number of valid slots `0..slot_count`; zero makes connects fail fast.
    pub slot_count: u32,
    /// `LB_*`.
    pub lb_policy: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// Key of the cluster's connection counters (`KM_CX_ACTIVE`,
    /// `KM_CX_OVERFLOW`): a stable hash of the cluster name, so counts
    /// survive config updates and restarts. Zero: no cluster accounting
    /// (a route split over several clusters).
    pub cluster_id: u32,
    /// Circuit breaker: connects fail once the cluster has this many
    /// active connections. Zero: unlimited.
    pub max_connections: u32,
}

/// What the connect pipeline remembers of a socket it steered, keyed by
/// socket cookie in `KM_STEERED`, so that the close (seen by `sockops`)
/// gives back exactly the counts the connect took.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Steered {
    /// The backend the connect was sent to (key of `KM_EP_ACTIVE`).
    pub backend: SockAddr,
    /// `ServiceValue::cluster_id` at connect time (0: none counted).
    pub cluster_id: u32,
}

/// Key of the slot map. A service's endpoints are expanded into slots in
/// proportion to their weights, so every LB pick is one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Capacity of the per-connection telemetry map (LRU, keyed by socket
/// cookie). Entries are deleted when the socket closes; LRU only bounds
/// what a missed close could leave behind.
pub const MAX_CONNS: u32 = 65_536;
/// Default size of the connection-event ring buffer in bytes (a power-of-two
/// multiple of the page size, as the kernel requires): room for about 8,000
/// [`ConnEvent`]s between two reads by the daemon.
pub const EVENT_RING_BYTES: u32 = 1 << 20;

/// [`ConnState::direction`] / [`ConnEvent::direction`]: this pod dialled out.
pub const DIR_OUTBOUND: u8 = 1;
/// ... this pod accepted the connection.
pub const DIR_INBOUND: u8 = 2;

/// [`ConnEvent::kind`]: the connection reached ESTABLISHED.
pub const EVENT_OPEN: u8 = 1;
/// [`ConnEvent::kind`]: the connection reached CLOSE; counters are final.
pub const EVENT_CLOSE: u8 = 2;

/// [`ConnState::flags`]: this side sent its FIN (FIN_WAIT1 or LAST_ACK seen).
pub const CONN_FIN_SENT: u8 = 1;
/// [`ConnState::flags`]: the peer's FIN arrived (it counts one sequence
/// number in `bytes_received`, which is subtracted to report data bytes).
pub const CONN_FIN_RECEIVED: u8 = 2;

/// Index of the flags word in `KM_TELEMETRY_CFG`.
pub const TELEMETRY_CFG_FLAGS: u32 = 0;
/// Index of the kernel log level in `KM_TELEMETRY_CFG`: 0 off, then
/// aya-log's levels 1 error, 2 warn, 3 info, 4 debug, 5 trace.
pub const TELEMETRY_CFG_LOG_LEVEL: u32 = 1;
/// Number of words in `KM_TELEMETRY_CFG`.
pub const TELEMETRY_CFG_WORDS: u32 = 2;

/// Flags word bit: set = sockops tracks connections and emits events;
/// clear = it does nothing (one array read per established connection).
pub const TELEMETRY_CFG_MONITORING: u32 = 1;

/// Per-connection state kept by the `sockops` program from ESTABLISHED to
/// CLOSE, keyed by socket cookie in `KM_CONN`. Byte counters are the
/// socket's own at ESTABLISHED, so the handshake's sequence number is not
/// counted as data. `acked`/`received` are the socket's counters at its
/// last RTT sample while ESTABLISHED (no FIN counted yet): the daemon reads
/// them to report bytes of open connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at ESTABLISHED.
    pub start_ns: u64,
    /// Network namespace cookie of the enrolled pod that owns the socket.
    pub netns_cookie: u64,
    /// `bytes_acked` at ESTABLISHED.
    pub base_acked: u64,
    /// `bytes_received` at ESTABLISHED.
    pub base_received: u64,
    /// The service address dialled, when the connect programs rewrote it
    /// (`has_orig_dst`); zero otherwise.
    pub orig_dst: SockAddr,
    /// `DIR_*`.
    pub direction: u8,
    /// `CONN_FIN_*` bits.
    pub flags: u8,
    /// 1 when `orig_dst` is set.
    pub has_orig_dst: u8,
    /// Always zero.
    pub pad: u8,
    /// `bytes_acked` at the last RTT sample while ESTABLISHED.
    pub acked: u64,
    /// `bytes_received` at the last RTT sample while ESTABLISHED.
    pub received: u64,
}

/// One connection event, as the `sockops` program writes it into the
/// `KM_EVENTS` ring buffer. `OPEN` events carry zero counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    /// CLOCK_MONOTONIC ns at ESTABLISHED.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC ns at this event.
    pub end_ns: u64,
    pub netns_cookie: u64,
    pub sock_cookie: u64,
    /// Data bytes this side sent that the peer acknowledged (FIN excluded).
    pub bytes_sent: u64,
    /// Data bytes this side received in order (FIN excluded).
    pub bytes_received: u64,
    /// This socket's address (the pod's side).
    pub local: SockAddr,
    /// The peer's address (after the connect rewrite: the backend).
    pub remote: SockAddr,
    /// The service address dialled, if `has_orig_dst`.
    pub orig_dst: SockAddr,
    /// Smoothed RTT in microseconds at the event.
    pub srtt_us: u32,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    /// `DIR_*`.
    pub direction: u8,
    /// `EVENT_*`.
    pub kind: u8,
    pub has_orig_dst: u8,
    /// Always zero.
    pub pad: u8,
}

/// Indexes of the per-CPU counters in the `KM_TELEMETRY` map.
pub mod telemetry {
    /// Connections of enrolled pods seen reaching ESTABLISHED.
    pub const CONN_OPENED: u32 = 0;
    /// ... and reaching CLOSE with their state found.
    pub const CONN_CLOSED: u32 = 1;
    /// Events lost because the ring buffer was full (the daemon reads too slowly).
    pub const EVENTS_DROPPED: u32 = 2;
    /// Per-connection state that could not be stored (map update failed).
    pub const CONN_STATE_FAILED: u32 = 3;
    /// Number of counters.
    pub const COUNT: u32 = 4;
}

/// Indexes of the per-CPU counters in the `KM_STATS` map.
pub mod stats {
    /// connect() calls seen by the connect programs (TCP only).
    pub const CONNECT_SEEN: u32 = 0;
    /// ... of which came from an enrolled network namespace.
    pub const CONNECT_ENROLLED: u32 = 1;
    /// ... of which dialled a known service and were rewritten.
    pub const CONNECT_REDIRECTED: u32 = 2;
    /// ... of which dialled a service with no endpoint and were refused.
    pub const CONNECT_NO_ENDPOINT: u32 = 3;
    /// ... of which picked a backend of the other address family and were refused.
    pub const CONNECT_FAMILY_MISMATCH: u32 = 4;
    /// getpeername() answers rewritten back to the service address.
    pub const PEERNAME_RESTORED: u32 = 5;
    /// connects refused by a cluster's circuit breaker (max_connections).
    pub const CONNECT_OVERFLOW: u32 = 6;
    /// connects refused because the per-CPU state of the connect pipeline
    /// was overwritten by a connect that preempted this one.
    pub const CONNECT_PIPELINE_ERROR: u32 = 7;
    /// pipeline stages run inline because their tail call failed (program
    /// array emptied during a daemon handover or uninstall).
    pub const CONNECT_STAGE_INLINE: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
}

pub mod authz;
pub mod l7;
pub mod waypoint;

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: all three are `#[repr(C)]`, `Copy`, made only of integers and
    // have no padding (checked by the layout tests), so every bit pattern is
    // a valid value.
    unsafe impl aya::Pod for super::SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Steered {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::waypoint::WpTuple {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn sock_addr_layout() {
        assert_eq!(size_of::<SockAddr>(), 20);
        assert_eq!(align_of::<SockAddr>(), 4);
        assert_eq!(offset_of!(SockAddr, addr), 0);
        assert_eq!(offset_of!(SockAddr, port), 16);
        assert_eq!(offset_of!(SockAddr, family), 18);
        assert_eq!(offset_of!(SockAddr, pad), 19);
    }

    #[test]
    fn service_value_layout() {
        assert_eq!(size_of::<ServiceValue>(), 24);
        assert_eq!(offset_of!(ServiceValue, service_id), 0);
        assert_eq!(offset_of!(ServiceValue, slot_count), 4);
        assert_eq!(offset_of!(ServiceValue, lb_policy), 8);
        assert_eq!(offset_of!(ServiceValue, flags), 12);
        assert_eq!(offset_of!(ServiceValue, cluster_id), 16);
        assert_eq!(offset_of!(ServiceValue, max_connections), 20);
    }

    #[test]
    fn steered_layout() {
        assert_eq!(size_of::<Steered>(), 24);
        assert_eq!(offset_of!(Steered, cluster_id), 20);
        assert_eq!(stage::ENDPOINT, stage::COUNT - 1);
    }

    #[test]
    fn slot_key_layout() {
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(offset_of!(SlotKey, slot), 4);
    }

    #[test]
    fn conn_state_layout() {
        assert_eq!(size_of::<ConnState>(), 72);
        assert_eq!(align_of::<ConnState>(), 8);
        assert_eq!(offset_of!(ConnState, netns_cookie), 8);
        assert_eq!(offset_of!(ConnState, base_acked), 16);
        assert_eq!(offset_of!(ConnState, base_received), 24);
        assert_eq!(offset_of!(ConnState, orig_dst), 32);
        assert_eq!(offset_of!(ConnState, direction), 52);
        assert_eq!(offset_of!(ConnState, flags), 53);
        assert_eq!(offset_of!(ConnState, has_orig_dst), 54);
        assert_eq!(offset_of!(ConnState, pad), 55);
        assert_eq!(offset_of!(ConnState, acked), 56);
        assert_eq!(offset_of!(ConnState, received), 64);
    }

    #[test]
    fn conn_event_layout() {
        // A multiple of 8: the ring buffer reserves 8-byte aligned records.
        assert_eq!(size_of::<ConnEvent>(), 120);
        assert_eq!(align_of::<ConnEvent>(), 8);
        assert_eq!(offset_of!(ConnEvent, end_ns), 8);
        assert_eq!(offset_of!(ConnEvent, netns_cookie), 16);
        assert_eq!(offset_of!(ConnEvent, sock_cookie), 24);
        assert_eq!(offset_of!(ConnEvent, bytes_sent), 32);
        assert_eq!(offset_of!(ConnEvent, bytes_received), 40);
        assert_eq!(offset_of!(ConnEvent, local), 48);
        assert_eq!(offset_of!(ConnEvent, remote), 68);
        assert_eq!(offset_of!(ConnEvent, orig_dst), 88);
        assert_eq!(offset_of!(ConnEvent, srtt_us), 108);
        assert_eq!(offset_of!(ConnEvent, total_retrans), 112);
        assert_eq!(offset_of!(ConnEvent, direction), 116);
        assert_eq!(offset_of!(ConnEvent, kind), 117);
        assert_eq!(offset_of!(ConnEvent, has_orig_dst), 118);
        assert_eq!(offset_of!(ConnEvent, pad), 119);
        assert_eq!(EVENT_RING_BYTES % 4096, 0);
        assert!(EVENT_RING_BYTES.is_power_of_two());
    }

    #[test]
    fn v4_mapped_v6_is_the_v4_key() {
        let ip4 = u32::from_ne_bytes([10, 96, 0, 1]);
        let port = 80u16.to_be();
        let from6 = SockAddr::from_raw_v6([0, 0, SockAddr::V4_MAPPED_WORD, ip4], port);
        assert_eq!(from6, SockAddr::from_raw_v4(ip4, port));
        let v6 = SockAddr::from_raw_v6([u32::from_ne_bytes([0xfd, 0, 0, 0]), 0, 0, 1], port);
        assert_eq!(v6.family, FAMILY_V6);
    }
}
