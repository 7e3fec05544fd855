//! Maps of the dual-engine L4 authorization program (XDP on the pod side of
//! a workload's interface). Userspace resolves everything that needs
//! strings or scopes (which policies apply to which workload, which known
//! identities a principal pattern matches) and hands the kernel a flat
//! "chain" per destination workload: a list of match slots in policy order,
//! DENY policies first. The kernel walks the chain with a bounded loop,
//! [`SLOTS_PER_CALL`] slots per program run, continuing through tail calls.
//!
//! Per SYN: one hash lookup (destination workload), one (source identity),
//! then per slot one array lookup (match) plus at most one lookup per field
//! the match uses (12 at most). Bounded by [`MAX_CHAIN_LEN`] slots.

/// Local workload addresses with a chain (destination IP → [`AzWorkload`]).
pub const MAX_WORKLOADS: u32 = 16_384;
/// Source identities known to the kernel (workload IP → [`AzIdentity`]).
pub const MAX_IDENTITIES: u32 = 65_536;
/// Match records, summed over all policies (array index = match id).
pub const MAX_MATCHES: u32 = 16_384;
/// Chain slots, summed over all distinct chains.
pub const MAX_SLOTS: u32 = 65_536;
/// Exact values (ports, namespace ids, principal ids) over all matches.
pub const MAX_VALUES: u32 = 65_536;
/// CIDR entries over all matches.
pub const MAX_CIDRS: u32 = 65_536;
/// Policies with a decision counter.
pub const MAX_POLICIES: u32 = 4_096;
/// Slots one program run evaluates before tail-calling the next run.
pub const SLOTS_PER_CALL: u32 = 8;
/// Tail calls one packet may use (the kernel allows 33 in total).
pub const MAX_TAIL_CALLS: u32 = 32;
/// Longest chain one workload may have.
pub const MAX_CHAIN_LEN: u32 = SLOTS_PER_CALL * MAX_TAIL_CALLS;
// The entry program's tail call plus MAX_TAIL_CALLS - 1 evaluation-to-
// evaluation calls must fit the kernel's 33 tail calls per packet.
const _: () = assert!(MAX_TAIL_CALLS <= 33);

/// `AzWorkload::flags`: at least one ALLOW policy applies, so a connection
/// no ALLOW policy matches is denied.
pub const WL_HAS_ALLOW: u32 = 1;

/// `AzSlot::flags`: the last match of a clause (clauses are AND'd).
pub const SLOT_END_CLAUSE: u32 = 1 << 0;
/// The last clause of a rule (rules are OR'd: a matching rule decides).
pub const SLOT_END_RULE: u32 = 1 << 1;
/// The last rule of a policy.
pub const SLOT_END_POLICY: u32 = 1 << 2;
/// The policy is a DENY policy (else ALLOW).
pub const SLOT_DENY: u32 = 1 << 3;
/// The slot matches without looking at its match record (an empty clause).
pub const SLOT_ALWAYS: u32 = 1 << 4;
/// The slot never matches (an empty match, or an ALLOW match with L7
/// fields the kernel cannot check: fail closed).
pub const SLOT_NEVER: u32 = 1 << 5;

/// Field bits of `AzMatch::fields`; the same values name the `kind` of
/// value and CIDR keys.
pub mod field {
    pub const NAMESPACES: u32 = 1 << 0;
    pub const NOT_NAMESPACES: u32 = 1 << 1;
    pub const PRINCIPALS: u32 = 1 << 2;
    pub const NOT_PRINCIPALS: u32 = 1 << 3;
    pub const SOURCE_IPS: u32 = 1 << 4;
    pub const NOT_SOURCE_IPS: u32 = 1 << 5;
    pub const DESTINATION_IPS: u32 = 1 << 6;
    pub const NOT_DESTINATION_IPS: u32 = 1 << 7;
    pub const DESTINATION_PORTS: u32 = 1 << 8;
    pub const NOT_DESTINATION_PORTS: u32 = 1 << 9;
    pub const SERVICE_ACCOUNTS: u32 = 1 << 10;
    pub const NOT_SERVICE_ACCOUNTS: u32 = 1 << 11;
}

/// An IP address as a map key: IPv6, or IPv4-mapped IPv6; network byte
/// order per word (as in [`crate::SockAddr::addr`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AzIp {
    pub addr: [u32; 4],
}

/// Destination workload → its chain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AzWorkload {
    pub chain_id: u32,
    /// Slots `0..slot_count` of the chain; at most [`MAX_CHAIN_LEN`].
    pub slot_count: u32,
    /// `WL_*`.
    pub flags: u32,
    pub pad: u32,
}

/// Source workload identity, interned by userspace: ids of the namespace
/// string and of the principal `<trust domain>/ns/<ns>/sa/<sa>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AzIdentity {
    pub ns_id: u32,
    pub principal_id: u32,
}

/// Key of the slot map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AzSlotKey {
    pub chain_id: u32,
    pub index: u32,
}

/// One step of a chain: evaluate match `match_id` of policy `policy_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AzSlot {
    pub match_id: u32,
    /// Index of the policy's decision counter.
    pub policy_id: u32,
    /// `SLOT_*`.
    pub flags: u32,
    pub pad: u32,
}

/// A match record: which fields it uses (`field::*` bits). A field present
/// in `fields` has its values under (match id, field bit) in the value or
/// CIDR map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AzMatch {
    pub fields: u32,
    pub pad: u32,
}

/// Key of the exact-value map: destination port (host order), namespace id
/// or principal id, under a match and field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AzValueKey {
    pub match_id: u32,
    pub kind: u32,
    pub value: u32,
}

/// Data of the CIDR LPM trie key. The prefix length of an entry is
/// 64 (match id and kind, always fully compared) + the CIDR's length in the
/// 128-bit address (an IPv4 /n is 96 + n, IPv4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AzCidr {
    pub match_id: u32,
    pub kind: u32,
    pub addr: [u32; 4],
}

/// Indexes of the global decision counters (per-CPU array `KM_AZ_STATS`).
pub mod stats {
    /// TCP SYNs to a workload with a chain.
    pub const EVALUATED: u32 = 0;
    /// Allowed by a matching ALLOW policy.
    pub const ALLOWED_BY_POLICY: u32 = 1;
    /// Dropped by a matching DENY policy.
    pub const DENIED_BY_POLICY: u32 = 2;
    /// Dropped: ALLOW policies apply and none matched.
    pub const DENIED_NO_ALLOW_MATCH: u32 = 3;
    /// Allowed: no policy matched and no ALLOW policy applies.
    pub const ALLOWED_NO_POLICY: u32 = 4;
    /// Dropped: the chain was cut (a slot missing mid-update, or the tail
    /// call failed); the program fails closed.
    pub const DENIED_ERROR: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Capacity of the decision event ring buffer, in bytes (≈ 5,400 events
/// of 48 bytes between two reads; when full, events are dropped, never
/// packets).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// `AzEvent::verdict`.
pub const VERDICT_ALLOW: u32 = 0;
pub const VERDICT_DENY: u32 = 1;

/// `AzEvent::reason`: which rule of the semantics decided.
pub mod reason {
    /// A policy matched (`policy_id` names it).
    pub const POLICY: u32 = 0;
    /// ALLOW policies apply and none matched.
    pub const NO_ALLOW_MATCH: u32 = 1;
    /// No policy matched and none is an ALLOW policy.
    pub const NO_POLICY: u32 = 2;
}

/// One authorization decision, sent to userspace for the access log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AzEvent {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Destination port, host order.
    pub port: u32,
    /// Valid when `reason == reason::POLICY`.
    pub policy_id: u32,
    /// `VERDICT_*`.
    pub verdict: u32,
    /// `reason::*`.
    pub reason: u32,
}

/// Per-CPU scratch state carried across the tail calls of one packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AzState {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Destination port, host order.
    pub port: u32,
    /// 1 when the source has a known identity.
    pub has_identity: u32,
    pub ns_id: u32,
    pub principal_id: u32,
    pub chain_id: u32,
    pub slot_count: u32,
    pub wl_flags: u32,
    /// Next slot to evaluate.
    pub next: u32,
    /// Some match of the current clause matched.
    pub clause_any: u32,
    /// Every finished clause of the current rule matched.
    pub rule_all: u32,
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: `#[repr(C)]`, `Copy`, integers only, no padding (layout
    // tests below), so every bit pattern is valid.
    unsafe impl aya::Pod for super::AzIp {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AzWorkload {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AzIdentity {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AzSlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AzSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AzMatch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AzValueKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AzCidr {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<AzIp>(), 16);
        assert_eq!(size_of::<AzWorkload>(), 16);
        assert_eq!(size_of::<AzIdentity>(), 8);
        assert_eq!(size_of::<AzSlotKey>(), 8);
        assert_eq!(size_of::<AzSlot>(), 16);
        assert_eq!(size_of::<AzMatch>(), 8);
        assert_eq!(size_of::<AzValueKey>(), 12);
        assert_eq!(size_of::<AzCidr>(), 24);
        assert_eq!(size_of::<AzState>(), 72);
        assert_eq!(size_of::<AzEvent>(), 48);
    }
}
