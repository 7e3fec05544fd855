//! HTTP/1.1 routing decided in the kernel: the tables the `sk_msg` program
//! matches a request head against, and the decision it leaves for the
//! connector.
//!
//! Matching works on hashes so that the kernel never compares strings: every
//! condition of a route table (a path prefix, a header value, a query
//! parameter, a Host) is one entry of `KM_L7_COND`, keyed by
//! ([`L7CondKey`]) the service, the kind of condition, the length of the
//! matched bytes and their [`step`] hash. The parser hashes the request as
//! it reads it and looks up, at each length where some condition exists,
//! whether one does; a hit sets condition bits in a 64-bit mask. A route
//! matches when all its `need` bits are set and none of its `forbid` bits;
//! the first matching route of the virtual host wins, as in Envoy.
//!
//! Hashes are seeded with a per-daemon random value (`KM_L7_CFG`), and the
//! connector re-checks every kernel decision against the same tables
//! matched on the strings, so a hash collision cannot send a request to
//! another route than Envoy would.

/// Capacity of the VIP → L7 service map.
pub const MAX_L7_SERVICES: u32 = 1_024;
/// Capacity of the condition map, over all L7 services.
pub const MAX_L7_CONDS: u32 = 65_536;
/// Capacity of the (service, virtual host) → routes map.
pub const MAX_L7_VHOSTS: u32 = 16_384;
/// Capacity of the cluster-group map (one group per route action).
pub const MAX_L7_GROUPS: u32 = 65_536;
/// Capacity of the per-connection decision map (LRU).
pub const MAX_L7_CONNS: u32 = 65_536;
/// Routes per virtual host the kernel evaluates.
pub const MAX_L7_ROUTES: usize = 16;
/// Clusters per weighted route action.
pub const MAX_L7_GROUP_CLUSTERS: usize = 8;
/// Bytes of a request head the kernel parses (a power of two); a longer
/// head is decided by the connector.
pub const MAX_L7_HEAD: u32 = 1_024;
/// Longest string a condition may match (path, `name:value`,
/// `name=value`, Host): lengths index a 128-bit bitmap.
pub const MAX_L7_MATCH: usize = 127;
/// Condition bits per L7 service.
pub const MAX_L7_COND_BITS: usize = 64;
/// "No such virtual host" in [`L7Service::star_vhost`].
pub const L7_NONE: u32 = u32::MAX;

/// [`L7CondKey::kind`]: Host (lowercased, port kept) equals; the value is
/// the virtual host index, not a bit mask.
pub const COND_HOST: u32 = 1;
/// Path (before `?`) starts with.
pub const COND_PATH_PREFIX: u32 = 2;
/// Path equals.
pub const COND_PATH_EXACT: u32 = 3;
/// Path equals, or continues with `/` (`path_separated_prefix`).
pub const COND_PATH_SEP: u32 = 4;
/// Header present (hash of the lowercased name).
pub const COND_HDR_PRESENT: u32 = 5;
/// Header equals (hash of `name:value`, value trimmed).
pub const COND_HDR_EXACT: u32 = 6;
/// Header starts with (hash of `name:` + value prefix).
pub const COND_HDR_PREFIX: u32 = 7;
/// Query parameter present (hash of the name; first occurrence only).
pub const COND_QUERY_PRESENT: u32 = 8;
/// Query parameter equals (hash of `name=value`; first occurrence only).
pub const COND_QUERY_EXACT: u32 = 9;

/// [`L7Service::flags`]: some domain is a `*.suffix` / `prefix.*` wildcard:
/// a Host without an exact entry is left to the connector.
pub const L7_WILDCARD_DOMAINS: u32 = 1;

/// [`L7Conn::status`]: no request decided yet on this connection.
pub const L7_PENDING: u32 = 0;
/// A route matched: `route`, `vhost` and `cluster` are set.
pub const L7_DECIDED: u32 = 1;
/// No virtual host or no route matched: the answer is 404.
pub const L7_NO_ROUTE: u32 = 2;
/// The kernel could not decide (`reason`); the connector decides.
pub const L7_FALLBACK: u32 = 3;

/// [`L7Conn::reason`] of a fallback: the head did not end within
/// [`MAX_L7_HEAD`] bytes of one sendmsg.
pub const FB_INCOMPLETE: u32 = 1;
/// The request line or a header is malformed.
pub const FB_MALFORMED: u32 = 2;
/// A header with a condition (or Host) appears twice.
pub const FB_DUPLICATE: u32 = 3;
/// No Host header.
pub const FB_NO_HOST: u32 = 4;
/// The Host needs wildcard domain matching.
pub const FB_WILDCARD: u32 = 5;

/// Indexes of the per-CPU counters in `KM_L7_STATS`.
pub mod l7stats {
    /// Connects to an L7 service sent to the connector.
    pub const STEERED: u32 = 0;
    /// Request heads the kernel decided (a route matched).
    pub const DECIDED: u32 = 1;
    /// ... for which no virtual host or route matched (404).
    pub const NO_ROUTE: u32 = 2;
    /// ... the kernel left to the connector (`FB_*`).
    pub const FALLBACK: u32 = 3;
    /// Number of counters.
    pub const COUNT: u32 = 4;
}

/// FNV-1a over one byte: the hash every condition and the parser use,
/// starting from the seed.
#[inline(always)]
pub const fn step(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

/// [`step`] over a byte string.
pub const fn hash(seed: u64, s: &[u8]) -> u64 {
    let mut h = seed;
    let mut i = 0;
    while i < s.len() {
        h = step(h, s[i]);
        i += 1;
    }
    h
}

/// Value of `KM_L7_SERVICE` (key: the VIP as a [`crate::SockAddr`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Service {
    /// Key prefix of this service's conditions and virtual hosts.
    pub l7_id: u32,
    /// `L7_*` flags.
    pub flags: u32,
    /// The virtual host with domain `*`, or [`L7_NONE`].
    pub star_vhost: u32,
    /// Always zero.
    pub pad: u32,
    /// Bit n set: some path prefix condition has length n.
    pub path_prefix_lens: [u64; 2],
    /// Bit n set: some header prefix condition has length n (`name:` included).
    pub hdr_prefix_lens: [u64; 2],
    /// Where connects to the VIP are sent: the connector.
    pub connector: crate::SockAddr,
    /// Always zero.
    pub pad2: u32,
}

/// Key of `KM_L7_COND`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L7CondKey {
    pub l7_id: u32,
    /// `COND_*`.
    pub kind: u32,
    /// Length of the hashed bytes.
    pub len: u32,
    /// Always zero.
    pub pad: u32,
    pub hash: u64,
}

/// Key of `KM_L7_VHOST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L7VhostKey {
    pub l7_id: u32,
    pub vhost: u32,
}

/// One route: matches when `mask & need == need && mask & forbid == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Route {
    pub need: u64,
    pub forbid: u64,
    /// Key of `KM_L7_GROUP`: the clusters the route forwards to.
    pub group: u32,
    /// The route's index in its virtual host's configuration.
    pub index: u32,
}

/// Value of `KM_L7_VHOST`: the routes in configuration order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Routes {
    pub count: u32,
    pub pad: u32,
    pub routes: [L7Route; MAX_L7_ROUTES],
}

/// Value of `KM_L7_GROUP`: a route action's clusters. A request picks
/// cluster j with probability `(cum[j] - cum[j-1]) / total`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Group {
    pub count: u32,
    pub total: u32,
    /// Cluster ids (the connector's numbering).
    pub clusters: [u32; MAX_L7_GROUP_CLUSTERS],
    /// Cumulative weights.
    pub cum: [u32; MAX_L7_GROUP_CLUSTERS],
}

/// Value of `KM_L7_CONN` (key: the client's local address as a
/// [`crate::SockAddr`], which is the peer address the connector accepts):
/// the kernel's decision for the latest request head of the connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Conn {
    pub l7_id: u32,
    /// Request heads seen so far on the connection (the decision is for
    /// request number `seq`, counting from 1).
    pub seq: u32,
    /// `L7_*` status.
    pub status: u32,
    /// `FB_*` when `status == L7_FALLBACK`.
    pub reason: u32,
    pub vhost: u32,
    /// Route index within the virtual host.
    pub route: u32,
    /// Cluster id picked (weighted pick done in the kernel).
    pub cluster: u32,
    /// Always zero.
    pub pad: u32,
    /// [`step`] hash of the request target (path and query), so the
    /// connector knows which request the decision is for.
    pub target_hash: u64,
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: `#[repr(C)]`, `Copy`, integers only, no padding (layout
    // tests below), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::L7Service {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::L7CondKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::L7VhostKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::L7Routes {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::L7Group {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::L7Conn {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts() {
        assert_eq!(size_of::<L7Service>(), 72);
        assert_eq!(offset_of!(L7Service, path_prefix_lens), 16);
        assert_eq!(offset_of!(L7Service, connector), 48);
        assert_eq!(size_of::<L7CondKey>(), 24);
        assert_eq!(offset_of!(L7CondKey, hash), 16);
        assert_eq!(size_of::<L7Route>(), 24);
        assert_eq!(size_of::<L7Routes>(), 8 + 24 * MAX_L7_ROUTES);
        assert_eq!(size_of::<L7Group>(), 8 + 8 * MAX_L7_GROUP_CLUSTERS);
        assert_eq!(size_of::<L7Conn>(), 40);
        assert_eq!(offset_of!(L7Conn, target_hash), 32);
        const { assert!(MAX_L7_HEAD.is_power_of_two()) };
        const { assert!(MAX_L7_MATCH < 128) };
    }

    #[test]
    fn hash_is_incremental() {
        assert_eq!(hash(7, b"ab"), step(step(7, b'a'), b'b'));
    }
}
