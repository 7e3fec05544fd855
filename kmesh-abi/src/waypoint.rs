//! Maps of waypoint steering (dual-engine). A destination with a waypoint
//! (a service VIP:port, or a workload address on any port) is dialled at
//! the waypoint instead; the first bytes the client sends are preceded by a
//! PROXY protocol v2 header naming the client and the original
//! destination, so the waypoint (an L7 proxy) knows where the connection
//! was going.
//!
//! `KM_WAYPOINT`: destination [`crate::SockAddr`] → waypoint
//! [`crate::SockAddr`]. A workload's key has port 0 ("any port"); the
//! connect programs look up the exact VIP:port first, then address:0. A
//! waypoint that is itself a service VIP:port in `KM_SERVICE` is load
//! balanced over that service's endpoints.

use crate::SockAddr;

/// Capacity of the destination → waypoint map.
pub const MAX_WAYPOINT_DSTS: u32 = 65_536;
/// Capacity of the connection maps (LRU): sockets steered to a waypoint
/// whose header is not sent yet.
pub const MAX_WAYPOINT_CONNS: u32 = 65_536;

/// `KM_MANAGE` value bit: the namespace is enrolled (every enrolled
/// namespace has it).
pub const MANAGE_ENROLLED: u32 = 1;
/// `KM_MANAGE` value bit: the namespace runs a waypoint; its own connects
/// are routed (VIP → endpoint) but never steered to a waypoint, which would
/// loop back to itself.
pub const MANAGE_WAYPOINT: u32 = 2;

/// Length of the PROXY protocol v2 fixed header: 12-byte signature,
/// version/command, family/transport, 2-byte address length.
pub const PROXY_V2_HEADER: u32 = 16;
/// Address block of `AF_INET`: source and destination address (4 + 4),
/// source and destination port (2 + 2).
pub const PROXY_V2_ADDR_V4: u32 = 12;
/// Address block of `AF_INET6`: 16 + 16 + 2 + 2.
pub const PROXY_V2_ADDR_V6: u32 = 36;
/// The PROXY protocol v2 signature.
pub const PROXY_V2_SIGNATURE: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];
/// Version 2, command PROXY.
pub const PROXY_V2_VERSION_PROXY: u8 = 0x21;
/// `AF_INET` + `STREAM`.
pub const PROXY_V2_TCP4: u8 = 0x11;
/// `AF_INET6` + `STREAM`.
pub const PROXY_V2_TCP6: u8 = 0x21;

/// A TCP connection as its client side sees it, in `SockAddr` form; key
/// of `KM_WP_PENDING` (connection → original destination), written by
/// `sockops` at ESTABLISHED and consumed by the `sk_msg` program that sends
/// the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WpTuple {
    pub local: SockAddr,
    pub remote: SockAddr,
}

/// Indexes of the per-CPU counters in `KM_WP_STATS`.
pub mod stats {
    /// Connects steered to a waypoint.
    pub const STEERED: u32 = 0;
    /// Steered sockets put in the waypoint sockhash at ESTABLISHED.
    pub const SOCKHASH_ADDED: u32 = 1;
    /// ... that could not be (the waypoint then sees no header and should
    /// refuse the connection).
    pub const SOCKHASH_FAILED: u32 = 2;
    /// PROXY v2 headers sent.
    pub const HEADER_SENT: u32 = 3;
    /// Headers that could not be inserted (the message is dropped, the
    /// application's write fails).
    pub const HEADER_FAILED: u32 = 4;
    /// Number of counters.
    pub const COUNT: u32 = 5;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn tuple_layout() {
        assert_eq!(size_of::<WpTuple>(), 40);
        assert_eq!(offset_of!(WpTuple, remote), 20);
    }

    #[test]
    fn proxy_v2_lengths() {
        // The spec's sizes: 16-byte header, 12 (IPv4) / 36 (IPv6) bytes of addresses.
        assert_eq!(PROXY_V2_SIGNATURE.len() + 4, PROXY_V2_HEADER as usize);
        assert_eq!(PROXY_V2_HEADER + PROXY_V2_ADDR_V4, 28);
        assert_eq!(PROXY_V2_HEADER + PROXY_V2_ADDR_V6, 52);
    }
}
