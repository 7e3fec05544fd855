//! Dual-engine L4 authorization: XDP on the pod side of a workload's
//! interface, where packets to the pod arrive. For a TCP SYN (SYN without
//! ACK) to a workload address with a chain in `KM_AZ_WORKLOAD`, the policy
//! chain userspace compiled for that workload is evaluated; a deny drops
//! the SYN, so the connection never exists. Everything else passes.
//!
//! Program chain: `kmesh_authz` parses the packet, fills the per-CPU
//! `KM_AZ_STATE` and tail-calls `kmesh_authz_eval` (slot 0 of
//! `KM_AZ_PROGS`), which evaluates `SLOTS_PER_CALL` slots and tail-calls
//! itself until a policy decides or the chain ends. Each run is small for
//! the verifier; the number of runs per packet is bounded by the kernel's
//! tail-call limit, which bounds the chain length (`MAX_CHAIN_LEN`).
//!
//! Semantics (Istio AuthorizationPolicy at L4, as ztunnel evaluates it):
//! DENY policies come first in a chain, so a matching DENY decides before
//! any ALLOW is looked at (deny wins); a matching ALLOW then allows; at the
//! end of the chain, the connection is dropped when an ALLOW policy applies
//! to the workload (`WL_HAS_ALLOW`) and allowed otherwise. A policy matches
//! when one of its rules does (OR); a rule when each of its clauses does
//! (AND); a clause when one of its matches does (OR); a match when each
//! field it uses does (AND), a field when one of its values does (OR), a
//! `not` field when none does. A source without a known identity matches
//! no `namespaces`/`principals`/`serviceAccounts` value, and so satisfies
//! every `not` form of them. Any internal failure (a slot missing, a tail
//! call refused) drops: the program fails closed.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, PerCpuArray, ProgramArray, RingBuf,
    },
    programs::XdpContext,
};
use kmesh_abi::authz::{
    field, reason, stats, AzCidr, AzEvent, AzIdentity, AzIp, AzMatch, AzSlot, AzSlotKey, AzState, AzValueKey,
    AzWorkload, MAX_CIDRS, MAX_IDENTITIES, MAX_MATCHES, MAX_POLICIES, MAX_SLOTS, MAX_VALUES,
    MAX_WORKLOADS, SLOTS_PER_CALL, SLOT_ALWAYS, SLOT_DENY, SLOT_END_CLAUSE, SLOT_END_RULE,
    SLOT_NEVER, VERDICT_ALLOW, VERDICT_DENY, WL_HAS_ALLOW, EVENTS_BYTES,
};
use kmesh_abi::SockAddr;

/// The hash maps here are not preallocated: the object is loaded in
/// kernel-native mode too, where they stay empty and cost no memory.
/// Elements are allocated when the daemon writes them, never per packet.
const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// Local workload address → its chain.
#[map]
static KM_AZ_WORKLOAD: HashMap<AzIp, AzWorkload> = HashMap::with_max_entries(MAX_WORKLOADS, NO_PREALLOC);

/// Source address → identity of the workload that owns it.
#[map]
static KM_AZ_IDENTITY: HashMap<AzIp, AzIdentity> = HashMap::with_max_entries(MAX_IDENTITIES, NO_PREALLOC);

/// (chain, index) → slot.
#[map]
static KM_AZ_SLOT: HashMap<AzSlotKey, AzSlot> = HashMap::with_max_entries(MAX_SLOTS, NO_PREALLOC);

/// Match id → the fields it uses.
#[map]
static KM_AZ_MATCH: Array<AzMatch> = Array::with_max_entries(MAX_MATCHES, 0);

/// (match, field, value) → 1 for ports, namespace ids and principal ids.
#[map]
static KM_AZ_VALUE: HashMap<AzValueKey, u32> = HashMap::with_max_entries(MAX_VALUES, NO_PREALLOC);

/// (match, field, address/prefix) → 1 for the IP fields.
#[map]
static KM_AZ_CIDR: LpmTrie<AzCidr, u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

/// Slot 0: `kmesh_authz_eval`.
#[map]
static KM_AZ_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// State of the packet being evaluated, carried across tail calls. XDP runs
/// to completion on one CPU, so the per-CPU entry is the packet's own.
#[map]
static KM_AZ_STATE: PerCpuArray<AzState> = PerCpuArray::with_max_entries(1, 0);

/// Global decision counters (`kmesh_abi::authz::stats`).
#[map]
static KM_AZ_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// Per policy: connections the policy decided (allowed for an ALLOW policy,
/// dropped for a DENY policy).
#[map]
static KM_AZ_POLICY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_POLICIES, 0);

/// Decisions for the access log (one per evaluated SYN).
#[map]
static KM_AZ_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Sends one decision to userspace; a full ring drops the event, never
/// the verdict.
#[inline(always)]
fn emit(st: &AzState, verdict: u32, why: u32, policy_id: u32) {
    let ev = AzEvent {
        src: st.src,
        dst: st.dst,
        port: st.port,
        policy_id,
        verdict,
        reason: why,
    };
    let _ = KM_AZ_EVENTS.output::<AzEvent>(&ev, 0);
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot from a successful lookup; XDP runs to
        // completion on this CPU, nothing else touches it meanwhile.
        unsafe { *c += 1 };
    }
}

/// A pointer to `len` bytes at `off` in the packet, bounds-checked the way
/// the verifier wants (against `data_end`).
#[inline(always)]
fn at(ctx: &XdpContext, off: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const u8)
}

#[inline(always)]
fn read_u16_be(p: *const u8) -> u16 {
    // SAFETY: callers pass pointers from `at` covering 2 bytes.
    unsafe { u16::from_be_bytes([*p, *p.add(1)]) }
}

#[inline(always)]
fn read_word(p: *const u8) -> u32 {
    // SAFETY: callers pass pointers from `at` covering 4 bytes. The word
    // keeps network byte order, as the ABI stores addresses.
    unsafe { u32::from_ne_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]) }
}

struct Syn {
    src: [u32; 4],
    dst: [u32; 4],
    port: u32,
}

/// Parses Ethernet + IPv4/IPv6 + TCP; `Some` only for a SYN without ACK.
/// IPv6 extension headers are not walked: a SYN behind one passes.
#[inline(always)]
fn parse_syn(ctx: &XdpContext) -> Option<Syn> {
    let eth = at(ctx, 0, ETH_HLEN)?;
    // SAFETY: `eth` covers 14 bytes.
    let proto = read_u16_be(unsafe { eth.add(12) });
    let (src, dst, l4) = if proto == ETH_P_IP {
        let ip = at(ctx, ETH_HLEN, 20)?;
        // SAFETY: `ip` covers the 20-byte fixed header.
        let (vihl, p, s, d) = unsafe {
            (
                *ip,
                *ip.add(9),
                read_word(ip.add(12)),
                read_word(ip.add(16)),
            )
        };
        if p != IPPROTO_TCP {
            return None;
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        let m = SockAddr::V4_MAPPED_WORD;
        ([0, 0, m, s], [0, 0, m, d], ETH_HLEN + ihl)
    } else if proto == ETH_P_IPV6 {
        let ip = at(ctx, ETH_HLEN, 40)?;
        // SAFETY: `ip` covers the 40-byte fixed header.
        let (next, src, dst) = unsafe {
            (
                *ip.add(6),
                [
                    read_word(ip.add(8)),
                    read_word(ip.add(12)),
                    read_word(ip.add(16)),
                    read_word(ip.add(20)),
                ],
                [
                    read_word(ip.add(24)),
                    read_word(ip.add(28)),
                    read_word(ip.add(32)),
                    read_word(ip.add(36)),
                ],
            )
        };
        if next != IPPROTO_TCP {
            return None;
        }
        (src, dst, ETH_HLEN + 40)
    } else {
        return None;
    };
    let tcp = at(ctx, l4, 20)?;
    // SAFETY: `tcp` covers the 20-byte fixed TCP header.
    let (port, flags) = unsafe { (read_u16_be(tcp.add(2)), *tcp.add(13)) };
    if flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0 {
        return None;
    }
    Some(Syn {
        src,
        dst,
        port: port as u32,
    })
}

#[xdp]
pub fn kmesh_authz(ctx: XdpContext) -> u32 {
    let Some(syn) = parse_syn(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: values are copied out at once; userspace replaces them whole.
    let Some(wl) = (unsafe { KM_AZ_WORKLOAD.get(&AzIp { addr: syn.dst }) }).copied() else {
        return xdp_action::XDP_PASS;
    };
    bump(&KM_AZ_STATS, stats::EVALUATED);
    let Some(st) = KM_AZ_STATE.get_ptr_mut(0) else {
        bump(&KM_AZ_STATS, stats::DENIED_ERROR);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: as above.
    let id = unsafe { KM_AZ_IDENTITY.get(&AzIp { addr: syn.src }) }.copied();
    // SAFETY: this CPU's scratch entry, from a successful lookup.
    unsafe {
        *st = AzState {
            src: syn.src,
            dst: syn.dst,
            port: syn.port,
            has_identity: id.is_some() as u32,
            ns_id: id.map(|i| i.ns_id).unwrap_or(0),
            principal_id: id.map(|i| i.principal_id).unwrap_or(0),
            chain_id: wl.chain_id,
            slot_count: wl.slot_count,
            wl_flags: wl.flags,
            next: 0,
            clause_any: 0,
            rule_all: 1,
        };
        KM_AZ_PROGS.tail_call(&ctx, 0);
    }
    // Only reached when the tail call failed.
    bump(&KM_AZ_STATS, stats::DENIED_ERROR);
    xdp_action::XDP_DROP
}

#[xdp]
pub fn kmesh_authz_eval(ctx: XdpContext) -> u32 {
    let Some(st) = KM_AZ_STATE.get_ptr_mut(0) else {
        bump(&KM_AZ_STATS, stats::DENIED_ERROR);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: this CPU's scratch entry; the packet that filled it is the
    // one being processed (XDP does not migrate or interleave).
    let st = unsafe { &mut *st };
    for _ in 0..SLOTS_PER_CALL {
        let i = st.next;
        if i >= st.slot_count {
            return if st.wl_flags & WL_HAS_ALLOW != 0 {
                bump(&KM_AZ_STATS, stats::DENIED_NO_ALLOW_MATCH);
                emit(st, VERDICT_DENY, reason::NO_ALLOW_MATCH, 0);
                xdp_action::XDP_DROP
            } else {
                bump(&KM_AZ_STATS, stats::ALLOWED_NO_POLICY);
                emit(st, VERDICT_ALLOW, reason::NO_POLICY, 0);
                xdp_action::XDP_PASS
            };
        }
        let key = AzSlotKey {
            chain_id: st.chain_id,
            index: i,
        };
        // SAFETY: copied out at once.
        let Some(slot) = (unsafe { KM_AZ_SLOT.get(&key) }).copied() else {
            bump(&KM_AZ_STATS, stats::DENIED_ERROR);
            return xdp_action::XDP_DROP;
        };
        let matched = if slot.flags & SLOT_ALWAYS != 0 {
            true
        } else if slot.flags & SLOT_NEVER != 0 {
            false
        } else {
            match_holds(st, slot.match_id)
        };
        if matched {
            st.clause_any = 1;
        }
        if slot.flags & SLOT_END_CLAUSE != 0 {
            if st.clause_any == 0 {
                st.rule_all = 0;
            }
            st.clause_any = 0;
        }
        if slot.flags & SLOT_END_RULE != 0 {
            if st.rule_all != 0 {
                bump(&KM_AZ_POLICY_STATS, slot.policy_id);
                return if slot.flags & SLOT_DENY != 0 {
                    bump(&KM_AZ_STATS, stats::DENIED_BY_POLICY);
                    emit(st, VERDICT_DENY, reason::POLICY, slot.policy_id);
                    xdp_action::XDP_DROP
                } else {
                    bump(&KM_AZ_STATS, stats::ALLOWED_BY_POLICY);
                    emit(st, VERDICT_ALLOW, reason::POLICY, slot.policy_id);
                    xdp_action::XDP_PASS
                };
            }
            st.rule_all = 1;
        }
        st.next = i + 1;
    }
    // SAFETY: tail call into this same program for the next slots.
    unsafe { KM_AZ_PROGS.tail_call(&ctx, 0) };
    // The tail-call budget is spent or the slot is empty: fail closed.
    bump(&KM_AZ_STATS, stats::DENIED_ERROR);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn has_value(match_id: u32, kind: u32, value: u32) -> bool {
    let key = AzValueKey {
        match_id,
        kind,
        value,
    };
    // SAFETY: presence test only.
    unsafe { KM_AZ_VALUE.get(&key) }.is_some()
}

#[inline(always)]
fn in_cidrs(match_id: u32, kind: u32, addr: [u32; 4]) -> bool {
    let key = Key::new(
        64 + 128,
        AzCidr {
            match_id,
            kind,
            addr,
        },
    );
    KM_AZ_CIDR.get(&key).is_some()
}

/// One match: every field it uses must hold.
#[inline(always)]
fn match_holds(st: &AzState, match_id: u32) -> bool {
    let Some(m) = KM_AZ_MATCH.get(match_id) else {
        return false;
    };
    let f = m.fields;
    let id = st.has_identity != 0;
    if f & field::NAMESPACES != 0 && !(id && has_value(match_id, field::NAMESPACES, st.ns_id)) {
        return false;
    }
    if f & field::NOT_NAMESPACES != 0 && id && has_value(match_id, field::NOT_NAMESPACES, st.ns_id)
    {
        return false;
    }
    if f & field::PRINCIPALS != 0
        && !(id && has_value(match_id, field::PRINCIPALS, st.principal_id))
    {
        return false;
    }
    if f & field::NOT_PRINCIPALS != 0
        && id
        && has_value(match_id, field::NOT_PRINCIPALS, st.principal_id)
    {
        return false;
    }
    if f & field::SERVICE_ACCOUNTS != 0
        && !(id && has_value(match_id, field::SERVICE_ACCOUNTS, st.principal_id))
    {
        return false;
    }
    if f & field::NOT_SERVICE_ACCOUNTS != 0
        && id
        && has_value(match_id, field::NOT_SERVICE_ACCOUNTS, st.principal_id)
    {
        return false;
    }
    if f & field::SOURCE_IPS != 0 && !in_cidrs(match_id, field::SOURCE_IPS, st.src) {
        return false;
    }
    if f & field::NOT_SOURCE_IPS != 0 && in_cidrs(match_id, field::NOT_SOURCE_IPS, st.src) {
        return false;
    }
    if f & field::DESTINATION_IPS != 0 && !in_cidrs(match_id, field::DESTINATION_IPS, st.dst) {
        return false;
    }
    if f & field::NOT_DESTINATION_IPS != 0
        && in_cidrs(match_id, field::NOT_DESTINATION_IPS, st.dst)
    {
        return false;
    }
    if f & field::DESTINATION_PORTS != 0
        && !has_value(match_id, field::DESTINATION_PORTS, st.port)
    {
        return false;
    }
    if f & field::NOT_DESTINATION_PORTS != 0
        && has_value(match_id, field::NOT_DESTINATION_PORTS, st.port)
    {
        return false;
    }
    true
}
