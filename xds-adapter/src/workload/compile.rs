//! [`LocalConfig`] → kernel records: services as connect-time slots, and
//! per destination workload a policy chain for the XDP program.
//!
//! Everything that needs strings or scopes is resolved here, once per
//! config, so the kernel only does exact lookups: which policies apply to
//! a workload (scope), which known identities a `principals` /
//! `namespaces` / `serviceAccounts` pattern matches (expanded against the
//! identities of the workloads in the config — a source the config does
//! not know has no identity), and the DENY-before-ALLOW order of a chain.
//! Identical chains (e.g. every workload of a namespace) are stored once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use kmesh_abi::authz::{
    field, AzCidr, AzIdentity, AzIp, AzMatch, AzSlot, AzSlotKey, AzValueKey, AzWorkload,
    MAX_CHAIN_LEN, MAX_CIDRS, MAX_IDENTITIES, MAX_MATCHES, MAX_POLICIES, MAX_SLOTS, MAX_VALUES,
    MAX_WORKLOADS, SLOT_ALWAYS, SLOT_DENY, SLOT_END_CLAUSE, SLOT_END_POLICY, SLOT_END_RULE,
    SLOT_NEVER, WL_HAS_ALLOW,
};
use kmesh_abi::{LB_RANDOM, LB_ROUND_ROBIN, MAX_SERVICES, MAX_SLOTS as MAX_LB_SLOTS};

use super::{
    Action, Cidr, HealthPolicy, LbMode, LoadBalancing, LocalConfig, LocalNode, LocalityMode,
    LocalityScope, Match, Policy, Scope, StringMatch, Workload,
};
use crate::{ConfigError, ConfigErrors, FlatConfig, FlatEndpoint, FlatService};

/// The authorization maps' contents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthzTables {
    /// Destination workload address → chain.
    pub workloads: BTreeMap<IpAddr, AzWorkload>,
    /// Source workload address → identity.
    pub identities: BTreeMap<IpAddr, AzIdentity>,
    pub slots: BTreeMap<AzSlotKey, AzSlot>,
    /// Index = match id.
    pub matches: Vec<AzMatch>,
    pub values: BTreeSet<AzValueKey>,
    /// (LPM prefix length, data).
    pub cidrs: BTreeSet<(u32, AzCidr)>,
    /// Index = policy id (decision counter index): `namespace/name`.
    pub policy_names: Vec<String>,
    /// Index = namespace id.
    pub namespaces: Vec<String>,
    /// Index = principal id.
    pub principals: Vec<String>,
}

/// The 128-bit key form of an address (IPv4 as IPv4-mapped), network byte
/// order per word.
pub fn az_ip(ip: IpAddr) -> AzIp {
    let sa = crate::addr::to_abi(SocketAddr::new(ip, 0));
    AzIp { addr: sa.addr }
}

fn cidr_key(match_id: u32, kind: u32, c: &Cidr) -> (u32, AzCidr) {
    let len = match c.addr {
        IpAddr::V4(_) => 96 + c.len as u32,
        IpAddr::V6(_) => c.len as u32,
    };
    (
        64 + len,
        AzCidr {
            match_id,
            kind,
            addr: az_ip(c.addr).addr,
        },
    )
}

/// Compiles services and policies. Errors name the resource whose records
/// do not fit the kernel maps.
pub fn compile(
    cfg: &LocalConfig,
    node: &LocalNode,
) -> Result<(FlatConfig, AuthzTables), ConfigErrors> {
    let mut errors = Vec::new();
    let flat = services(cfg, node, &mut errors);
    let authz = authz(cfg, &mut errors);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok((flat, authz))
}

/// How well endpoint `w` matches this node under `lb` (ztunnel's rank):
/// the number of leading `routing_preference` scopes that match, counting
/// stops at the first that does not. `None`: excluded (STRICT and not
/// every scope matches). When NETWORK is the first preference it
/// dominates: an endpoint on this node's network outranks every endpoint
/// off it, and for one off it the other scopes still count.
pub fn locality_rank(lb: &LoadBalancing, node: &LocalNode, w: &Workload) -> Option<usize> {
    let prefs = &lb.routing_preference;
    let network_first = prefs.first() == Some(&LocalityScope::Network);
    let (mut rank, mut bonus) = (0, 0);
    for scope in prefs {
        let matches = match scope {
            LocalityScope::Region => node.locality.region == w.locality.region,
            LocalityScope::Zone => node.locality.zone == w.locality.zone,
            LocalityScope::Subzone => node.locality.subzone == w.locality.subzone,
            LocalityScope::Node => node.node == w.node,
            LocalityScope::Cluster => node.cluster_id == w.cluster_id,
            LocalityScope::Network => {
                let m = node.network == w.network;
                if network_first {
                    if !m {
                        continue;
                    }
                    bonus = prefs.len() - 1;
                }
                m
            }
        };
        if !matches {
            break;
        }
        rank += 1;
    }
    if lb.mode == LocalityMode::Strict && rank != prefs.len() {
        return None;
    }
    Some(rank + bonus)
}

fn services(cfg: &LocalConfig, node: &LocalNode, errors: &mut Vec<ConfigError>) -> FlatConfig {
    let mut out: BTreeMap<SocketAddr, FlatService> = BTreeMap::new();
    let mut warnings = cfg.warnings.clone();
    for s in &cfg.services {
        let key = s.key();
        let allow_unhealthy = s
            .load_balancing
            .as_ref()
            .is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll);
        let locality = s
            .load_balancing
            .as_ref()
            .filter(|lb| lb.mode != LocalityMode::Standard && !lb.routing_preference.is_empty());
        if locality.is_some() && *node == LocalNode::default() {
            warnings.push(format!(
                "service \"{}/{}\": field loadBalancer.routingPreference: this node's locality, name, network and cluster are unknown (set --locality, NODE_NAME, --network, --cluster-id); endpoints are ranked against empty values",
                s.namespace, s.name
            ));
        }
        // (workload, its port map, its rank); rank 0 without locality.
        let members: Vec<_> = cfg
            .workloads
            .iter()
            .filter(|w| w.healthy || allow_unhealthy)
            .filter_map(|w| w.services.get(&key).map(|p| (w, p)))
            .filter_map(|(w, p)| match locality {
                None => Some((w, p, 0)),
                Some(lb) => locality_rank(lb, node, w).map(|r| (w, p, r)),
            })
            .collect();
        for vip in &s.vips {
            // The best rank among the endpoints of the VIP's family.
            let best = members
                .iter()
                .filter(|(w, _, _)| w.ips.iter().any(|ip| ip.is_ipv4() == vip.is_ipv4()))
                .map(|m| m.2)
                .max();
            for (&port, &target) in &s.ports {
                let mut endpoints = Vec::new();
                for (w, wports, rank) in &members {
                    if Some(*rank) != best {
                        continue;
                    }
                    // The workload's own port map wins; then the service's
                    // target port; 0 means "the service port".
                    let t = match wports.get(&port).copied().unwrap_or(target) {
                        0 => port,
                        t => t,
                    };
                    // An endpoint of the VIP's address family.
                    if let Some(ip) = w.ips.iter().find(|ip| ip.is_ipv4() == vip.is_ipv4()) {
                        endpoints.push(FlatEndpoint {
                            cluster: format!("{}/{}", w.namespace, w.name),
                            addr: SocketAddr::new(*ip, t),
                            weight: 1,
                        });
                    }
                }
                endpoints.sort_by_key(|e| e.addr);
                let vip_addr = SocketAddr::new(*vip, port);
                // A local file refuses this (parse); from the workload API,
                // where resources arrive one by one, the later service in
                // key order wins and the conflict is reported.
                if let Some(prev) = out.get(&vip_addr) {
                    warnings.push(format!(
                        "service \"{}/{}\": field addresses: {vip_addr} is also captured by {}; this service takes it",
                        s.namespace, s.name, prev.listener
                    ));
                }
                out.insert(
                    vip_addr,
                    FlatService {
                        listener: key.clone(),
                        vip: vip_addr,
                        lb_policy: match s.lb {
                            LbMode::Random => LB_RANDOM,
                            LbMode::RoundRobin => LB_ROUND_ROBIN,
                        },
                        cluster: None,
                        cluster_id: 0,
                        max_connections: 0,
                        slots: endpoints.iter().map(|e| e.addr).collect(),
                        endpoints,
                    },
                );
            }
        }
    }
    let slots: usize = out.values().map(|s: &FlatService| s.slots.len()).sum();
    if out.len() > MAX_SERVICES as usize || slots > MAX_LB_SLOTS as usize {
        errors.push(ConfigError::new(
            "config",
            "services",
            format!(
                "map full: {} VIP:ports and {slots} endpoints, the maps hold {MAX_SERVICES} and {MAX_LB_SLOTS}",
                out.len()
            ),
        ));
    }
    FlatConfig {
        services: out,
        l7: Vec::new(),
        warnings,
    }
}

struct Interned {
    namespaces: Vec<String>,
    principals: Vec<String>,
    /// Principal id → (namespace, service account).
    principal_parts: Vec<(String, String)>,
}

fn authz(cfg: &LocalConfig, errors: &mut Vec<ConfigError>) -> AuthzTables {
    let mut t = AuthzTables::default();
    // Identities.
    let ns_set: BTreeSet<&str> = cfg.workloads.iter().map(|w| w.namespace.as_str()).collect();
    let pr_set: BTreeMap<String, (String, String)> = cfg
        .workloads
        .iter()
        .map(|w| {
            (
                w.principal(),
                (w.namespace.clone(), w.service_account.clone()),
            )
        })
        .collect();
    let intern = Interned {
        namespaces: ns_set.iter().map(|s| s.to_string()).collect(),
        principals: pr_set.keys().cloned().collect(),
        principal_parts: pr_set.values().cloned().collect(),
    };
    for w in &cfg.workloads {
        let id = AzIdentity {
            ns_id: intern
                .namespaces
                .iter()
                .position(|n| *n == w.namespace)
                .unwrap_or(0) as u32,
            principal_id: intern
                .principals
                .iter()
                .position(|p| *p == w.principal())
                .unwrap_or(0) as u32,
        };
        for ip in &w.ips {
            t.identities.insert(*ip, id);
        }
    }
    // Policies, in a fixed order: the policy id is the index.
    let mut policies: Vec<&Policy> = cfg.policies.iter().collect();
    policies.sort_by_key(|p| p.key());
    if policies.len() > MAX_POLICIES as usize {
        errors.push(ConfigError::new(
            "config",
            "policies",
            format!(
                "map full: {} policies, at most {MAX_POLICIES}",
                policies.len()
            ),
        ));
        return t;
    }
    let mut segments: Vec<Vec<AzSlot>> = Vec::new();
    for (pid, p) in policies.iter().enumerate() {
        segments.push(policy_slots(p, pid as u32, &intern, &mut t));
        t.policy_names.push(p.key());
    }
    // Chains per workload: DENY policies first, then ALLOW.
    let mut chains: BTreeMap<Vec<AzSlot>, u32> = BTreeMap::new();
    for w in &cfg.workloads {
        let applies = |p: &Policy| match p.scope {
            Scope::Global => true,
            Scope::Namespace => p.namespace == w.namespace,
            Scope::WorkloadSelector => w.authorization_policies.contains(&p.key()),
        };
        let mut chain = Vec::new();
        let mut has_allow = false;
        let mut any = false;
        let mut names = Vec::new();
        for action in [Action::Deny, Action::Allow] {
            for (pid, p) in policies.iter().enumerate() {
                if p.action == action && applies(p) {
                    any = true;
                    has_allow |= action == Action::Allow;
                    chain.extend_from_slice(&segments[pid]);
                    names.push(p.key());
                }
            }
        }
        if !any {
            continue;
        }
        if chain.len() > MAX_CHAIN_LEN as usize {
            errors.push(
                ConfigError::new(
                    format!("workload \"{}/{}\"", w.namespace, w.name),
                    "authorizationPolicies",
                    format!(
                        "the policies applying to it ({}) need {} match slots; the kernel evaluates at most MAX_CHAIN_LEN = {MAX_CHAIN_LEN} per connection",
                        names.join(", "),
                        chain.len()
                    ),
                )
                .with_hint("merge rules, or put values of one field into one match instead of many matches"),
            );
            continue;
        }
        let next = chains.len() as u32;
        let chain_id = *chains.entry(chain.clone()).or_insert(next);
        let v = AzWorkload {
            chain_id,
            slot_count: chain.len() as u32,
            flags: if has_allow { WL_HAS_ALLOW } else { 0 },
            pad: 0,
        };
        for ip in &w.ips {
            t.workloads.insert(*ip, v);
        }
    }
    for (chain, id) in &chains {
        for (i, s) in chain.iter().enumerate() {
            t.slots.insert(
                AzSlotKey {
                    chain_id: *id,
                    index: i as u32,
                },
                *s,
            );
        }
    }
    let limits = [
        ("matches", t.matches.len(), MAX_MATCHES),
        ("slots", t.slots.len(), MAX_SLOTS),
        ("values", t.values.len(), MAX_VALUES),
        ("CIDRs", t.cidrs.len(), MAX_CIDRS),
        ("workload addresses", t.workloads.len(), MAX_WORKLOADS),
        ("identities", t.identities.len(), MAX_IDENTITIES),
    ];
    for (what, n, max) in limits {
        if n > max as usize {
            errors.push(
                ConfigError::new(
                    "config",
                    "policies",
                    format!("map full: the policies need {n} {what}, the kernel map holds {max}"),
                )
                .with_hint("use fewer or broader rules"),
            );
        }
    }
    t.namespaces = intern.namespaces;
    t.principals = intern.principals;
    t
}

/// The slots of one policy, adding its match records to `t`.
fn policy_slots(p: &Policy, pid: u32, intern: &Interned, t: &mut AuthzTables) -> Vec<AzSlot> {
    let deny = if p.action == Action::Deny {
        SLOT_DENY
    } else {
        0
    };
    let mut out = Vec::new();
    for rule in &p.rules {
        if rule.is_empty() {
            // No clause: the rule matches every connection.
            out.push(AzSlot {
                match_id: 0,
                policy_id: pid,
                flags: deny | SLOT_ALWAYS | SLOT_END_CLAUSE | SLOT_END_RULE,
                pad: 0,
            });
            continue;
        }
        for clause in rule {
            if clause.is_empty() {
                // An empty clause holds (ztunnel: vacuously true).
                out.push(AzSlot {
                    match_id: 0,
                    policy_id: pid,
                    flags: deny | SLOT_ALWAYS,
                    pad: 0,
                });
            }
            for m in clause {
                out.push(match_slot(m, p.action, pid, deny, intern, t));
            }
            if let Some(last) = out.last_mut() {
                last.flags |= SLOT_END_CLAUSE;
            }
        }
        if let Some(last) = out.last_mut() {
            last.flags |= SLOT_END_RULE;
        }
    }
    if let Some(last) = out.last_mut() {
        last.flags |= SLOT_END_POLICY;
    }
    out
}

fn match_slot(
    m: &Match,
    action: Action,
    pid: u32,
    deny: u32,
    intern: &Interned,
    t: &mut AuthzTables,
) -> AzSlot {
    let slot = |match_id, flags| AzSlot {
        match_id,
        policy_id: pid,
        flags: deny | flags,
        pad: 0,
    };
    let has_l7 = !m.l7_fields.is_empty();
    if has_l7 && action == Action::Allow {
        return slot(0, SLOT_NEVER);
    }
    if m.is_l4_empty() {
        // A DENY match whose only fields were L7: matches every connection
        // (Istio's safe reading). An empty match otherwise never matches
        // (as ztunnel skips it).
        return if has_l7 {
            slot(0, SLOT_ALWAYS)
        } else {
            slot(0, SLOT_NEVER)
        };
    }
    let id = t.matches.len() as u32;
    let mut fields = 0;
    let mut val = |kind: u32, values: Vec<u32>, t: &mut AuthzTables| {
        fields |= kind;
        for v in values {
            t.values.insert(AzValueKey {
                match_id: id,
                kind,
                value: v,
            });
        }
    };
    let ns_ids = |pats: &[StringMatch]| -> Vec<u32> {
        (0..intern.namespaces.len() as u32)
            .filter(|i| {
                pats.iter()
                    .any(|p| p.matches(&intern.namespaces[*i as usize]))
            })
            .collect()
    };
    let pr_ids = |pats: &[StringMatch]| -> Vec<u32> {
        (0..intern.principals.len() as u32)
            .filter(|i| {
                pats.iter()
                    .any(|p| p.matches(&intern.principals[*i as usize]))
            })
            .collect()
    };
    let sa_ids = |sas: &[(String, String)]| -> Vec<u32> {
        (0..intern.principal_parts.len() as u32)
            .filter(|i| sas.contains(&intern.principal_parts[*i as usize]))
            .collect()
    };
    if !m.namespaces.is_empty() {
        val(field::NAMESPACES, ns_ids(&m.namespaces), t);
    }
    if !m.not_namespaces.is_empty() {
        val(field::NOT_NAMESPACES, ns_ids(&m.not_namespaces), t);
    }
    if !m.principals.is_empty() {
        val(field::PRINCIPALS, pr_ids(&m.principals), t);
    }
    if !m.not_principals.is_empty() {
        val(field::NOT_PRINCIPALS, pr_ids(&m.not_principals), t);
    }
    if !m.service_accounts.is_empty() {
        val(field::SERVICE_ACCOUNTS, sa_ids(&m.service_accounts), t);
    }
    if !m.not_service_accounts.is_empty() {
        val(
            field::NOT_SERVICE_ACCOUNTS,
            sa_ids(&m.not_service_accounts),
            t,
        );
    }
    if !m.destination_ports.is_empty() {
        val(
            field::DESTINATION_PORTS,
            m.destination_ports.iter().map(|p| *p as u32).collect(),
            t,
        );
    }
    if !m.not_destination_ports.is_empty() {
        val(
            field::NOT_DESTINATION_PORTS,
            m.not_destination_ports.iter().map(|p| *p as u32).collect(),
            t,
        );
    }
    for (kind, cidrs) in [
        (field::SOURCE_IPS, &m.source_ips),
        (field::NOT_SOURCE_IPS, &m.not_source_ips),
        (field::DESTINATION_IPS, &m.destination_ips),
        (field::NOT_DESTINATION_IPS, &m.not_destination_ips),
    ] {
        if !cidrs.is_empty() {
            fields |= kind;
            for c in cidrs {
                t.cidrs.insert(cidr_key(id, kind, c));
            }
        }
    }
    t.matches.push(AzMatch { fields, pad: 0 });
    slot(id, 0)
}
