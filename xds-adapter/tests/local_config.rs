//! The dual-engine local config: validation errors name the resource and
//! field; compilation resolves scopes, order and identities.

use kmesh_abi::authz::{
    field, MAX_CHAIN_LEN, SLOT_ALWAYS, SLOT_DENY, SLOT_END_CLAUSE, SLOT_END_POLICY, SLOT_END_RULE,
    SLOT_NEVER, WL_HAS_ALLOW,
};
use xds_adapter::workload::{compile_local_config, parse_local_config, Action, Scope};

const WORKLOADS: &str = "workloads:
- name: a
  namespace: front
  serviceAccount: web
  workloadIps: [10.0.0.1]
  uid: cluster1//v1/Pod/front/a
  protocol: HBONE
  status: Healthy
- name: d
  namespace: back
  serviceAccount: db
  workloadIps: [10.0.0.2, \"fd00::2\"]
  services: {\"back/db.back.svc\": {5432: 0}}
  authorizationPolicies: [back/sel]
- name: e
  namespace: other
  workloadIps: [10.0.0.3]
services:
- name: db
  namespace: back
  hostname: db.back.svc
  vips: [\"/10.96.0.5\", \"net1/fd00:96::5\"]
  ports: {5432: 5432, 80: 8080}
";

fn doc(policies: &str) -> String {
    format!("{WORKLOADS}policies:\n{policies}")
}

fn errors(text: &str) -> String {
    match compile_local_config(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_ztunnel_file_loads_and_services_become_slots() {
    let cfg = compile_local_config(&doc("- {name: sel, namespace: back, scope: WorkloadSelector, action: Allow, rules: [[[{namespaces: [front]}]]]}\n")).unwrap();
    let w = &cfg.config.workloads[0];
    assert_eq!(w.principal(), "cluster.local/ns/front/sa/web");
    assert_eq!(cfg.config.workloads[2].service_account, "default");
    // Service port 5432 → workload's own map says 0 → the service port;
    // port 80 → the service's target port 8080. IPv6 VIP → IPv6 address.
    let s = &cfg.flat.services[&"10.96.0.5:5432".parse().unwrap()];
    assert_eq!(s.slots, vec!["10.0.0.2:5432".parse().unwrap()]);
    let s = &cfg.flat.services[&"10.96.0.5:80".parse().unwrap()];
    assert_eq!(s.slots, vec!["10.0.0.2:8080".parse().unwrap()]);
    let s = &cfg.flat.services[&"[fd00:96::5]:80".parse().unwrap()];
    assert_eq!(s.slots, vec!["[fd00::2]:8080".parse().unwrap()]);
    assert_eq!(cfg.config.policies[0].scope, Scope::WorkloadSelector);
    assert_eq!(cfg.config.policies[0].action, Action::Allow);
}

#[test]
fn service_without_endpoints_has_no_slots() {
    let text = "services:\n- {name: s, namespace: n, hostname: s.n, vips: [\"/10.96.0.9\"], ports: {80: 80}}\n";
    let cfg = compile_local_config(text).unwrap();
    assert!(cfg.flat.services[&"10.96.0.9:80".parse().unwrap()]
        .slots
        .is_empty());
}

#[test]
fn unknown_fields_are_named() {
    let e =
        errors("workloads:\n- {name: w, namespace: n, workloadIps: [10.0.0.1], colour: blue}\n");
    assert!(
        e.contains("workload \"n/w\": field colour: unknown field"),
        "{e}"
    );
    let e = errors(&doc("- {name: p, namespace: back, scope: Namespace, action: Allow, rules: [[[{sourceIp: [10.0.0.1]}]]]}\n"));
    assert!(
        e.contains("policy \"back/p\": field rules[0][0][0].sourceIp: unknown field"),
        "{e}"
    );
    let e = errors("wrokloads: []\n");
    assert!(
        e.contains("document: field wrokloads: unknown field"),
        "{e}"
    );
}

#[test]
fn bad_cidrs_ports_and_enums_are_named() {
    let e = errors(&doc("- {name: p, namespace: back, scope: Namespace, action: Deny, rules: [[[{sourceIps: [10.0.0.0/33], notDestinationIps: [nope], destinationPorts: [70000]}]]]}\n"));
    assert!(
        e.contains("field rules[0][0][0].sourceIps[0]: CIDR does not parse"),
        "{e}"
    );
    assert!(
        e.contains("field rules[0][0][0].notDestinationIps[0]: CIDR does not parse"),
        "{e}"
    );
    assert!(
        e.contains("field rules[0][0][0].destinationPorts[0]: 70000 is not a port"),
        "{e}"
    );
    let e = errors(&doc(
        "- {name: p, namespace: back, scope: Cluster, action: Audit, rules: []}\n",
    ));
    assert!(e.contains("field scope: \"Cluster\" is not Global"), "{e}");
    assert!(
        e.contains("field action: \"Audit\" is not Allow or Deny"),
        "{e}"
    );
    let e = errors("workloads:\n- {name: w, namespace: n, workloadIps: [10.0.0.999]}\n");
    assert!(e.contains("workload \"n/w\": field workloadIps[0]"), "{e}");
}

#[test]
fn duplicates_and_overlaps_are_refused() {
    let p = "- {name: p, namespace: back, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [1]}]]]}\n";
    let e = errors(&doc(&format!("{p}{p}")));
    assert!(
        e.contains("policy \"back/p\": field name: defined twice"),
        "{e}"
    );
    let q = "- {name: q, namespace: back, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [1]}]]]}\n";
    let e = errors(&doc(&format!("{p}{q}")));
    assert!(
        e.contains("policy \"back/q\": field rules: overlaps policy \"back/p\""),
        "{e}"
    );
    let e = errors("workloads:\n- {name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {name: b, namespace: n, workloadIps: [10.0.0.1]}\n");
    assert!(
        e.contains("10.0.0.1 is already the address of workload \"n/a\""),
        "{e}"
    );
}

#[test]
fn a_missing_selected_policy_is_an_error_not_a_silent_allow() {
    let e = errors(&doc(""));
    assert!(
        e.contains("workload \"back/d\": field authorizationPolicies[0]: no policy \"back/sel\""),
        "{e}"
    );
}

#[test]
fn more_slots_than_the_kernel_walks_is_refused() {
    let many: Vec<String> = (0..=MAX_CHAIN_LEN)
        .map(|i| format!("{{destinationPorts: [{}]}}", i + 1))
        .collect();
    let e = errors(&doc(&format!(
        "- {{name: sel, namespace: back, scope: WorkloadSelector, action: Allow, rules: [[[{}]]]}}\n",
        many.join(", ")
    )));
    assert!(e.contains("workload \"back/d\""), "{e}");
    assert!(e.contains("MAX_CHAIN_LEN"), "{e}");
}

#[test]
fn chains_put_deny_first_and_share_identical_chains() {
    let cfg = compile_local_config(&doc(
        "- {name: sel, namespace: back, scope: WorkloadSelector, action: Allow, rules: [[[{principals: [\"cluster.local/ns/front/*\"]}]]]}
- {name: g, namespace: istio-system, scope: Global, action: Deny, rules: [[[{notNamespaces: [front, back, other]}]]]}
",
    ))
    .unwrap();
    let t = &cfg.authz;
    let d = t.workloads[&"10.0.0.2".parse().unwrap()];
    assert_eq!(d.slot_count, 2);
    assert_ne!(d.flags & WL_HAS_ALLOW, 0);
    let first = t.slots[&kmesh_abi::authz::AzSlotKey {
        chain_id: d.chain_id,
        index: 0,
    }];
    assert_ne!(first.flags & SLOT_DENY, 0, "deny policies come first");
    let end = SLOT_END_CLAUSE | SLOT_END_RULE | SLOT_END_POLICY;
    assert_eq!(first.flags & end, end);
    // a and e only have the global deny: one shared chain, no ALLOW.
    let a = t.workloads[&"10.0.0.1".parse().unwrap()];
    let e = t.workloads[&"10.0.0.3".parse().unwrap()];
    assert_eq!(a, e);
    assert_eq!(a.flags & WL_HAS_ALLOW, 0);
    // The principal prefix resolves to a's identity only.
    let allow = t.slots[&kmesh_abi::authz::AzSlotKey {
        chain_id: d.chain_id,
        index: 1,
    }];
    let vals: Vec<_> = t
        .values
        .iter()
        .filter(|v| v.match_id == allow.match_id)
        .collect();
    assert_eq!(vals.len(), 1);
    assert_eq!(vals[0].kind, field::PRINCIPALS);
    assert_eq!(
        t.principals[vals[0].value as usize],
        "cluster.local/ns/front/sa/web"
    );
    // IPv4 /32 in the LPM trie: 64 bits of match id and kind + 96 + 32.
    assert_eq!(t.identities.len(), 4);
}

#[test]
fn l7_fields_fail_closed_with_warnings() {
    let cfg = compile_local_config(&doc(
        "- {name: sel, namespace: back, scope: WorkloadSelector, action: Allow, rules: [[[{paths: [/admin], principals: [\"*\"]}]]]}
- {name: n, namespace: back, scope: Namespace, action: Deny, rules: [[[{methods: [POST]}]]]}
",
    ))
    .unwrap();
    let w = &cfg.config.warnings;
    assert!(
        w.iter().any(
            |w| w.contains("policy \"back/sel\": field rules[0][0][0].paths")
                && w.contains("never matches")
        ),
        "{w:?}"
    );
    assert!(
        w.iter().any(
            |w| w.contains("policy \"back/n\": field rules[0][0][0].methods")
                && w.contains("denied")
        ),
        "{w:?}"
    );
    let t = &cfg.authz;
    let d = t.workloads[&"10.0.0.2".parse().unwrap()];
    let s0 = t.slots[&kmesh_abi::authz::AzSlotKey {
        chain_id: d.chain_id,
        index: 0,
    }];
    let s1 = t.slots[&kmesh_abi::authz::AzSlotKey {
        chain_id: d.chain_id,
        index: 1,
    }];
    assert_ne!(s0.flags & SLOT_DENY, 0);
    assert_ne!(
        s0.flags & SLOT_ALWAYS,
        0,
        "L7-only DENY matches every connection"
    );
    assert_ne!(s1.flags & SLOT_NEVER, 0, "ALLOW with L7 never matches");
}

#[test]
fn string_match_forms() {
    let cfg = parse_local_config(
        "policies:\n- {name: p, namespace: n, scope: Namespace, action: Allow, rules: [[[{principals: [\"a*\", \"*b\", \"*\", exact, {Prefix: x}, {Presence: {}}, \"spiffe://td/ns/n/sa/s\"]}]]]}\n",
    )
    .unwrap();
    use xds_adapter::workload::StringMatch::*;
    assert_eq!(
        cfg.policies[0].rules[0][0][0].principals,
        vec![
            Prefix("a".into()),
            Suffix("b".into()),
            Presence,
            Exact("exact".into()),
            Prefix("x".into()),
            Presence,
            Exact("td/ns/n/sa/s".into())
        ]
    );
}

/// Every truncation and single-byte corruption of a valid document is
/// either accepted or refused with errors; the parser never panics.
#[test]
fn mutated_documents_never_panic() {
    let text = doc("- {name: sel, namespace: back, scope: WorkloadSelector, action: Allow, rules: [[[{principals: [\"cluster.local/ns/front/*\"], sourceIps: [10.0.0.0/8], notDestinationPorts: [22]}]]]}\n");
    let bytes = text.as_bytes();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut refused = 0;
    for cut in 0..bytes.len() {
        if let Ok(s) = std::str::from_utf8(&bytes[..cut]) {
            refused += compile_local_config(s).is_err() as usize;
        }
    }
    for _ in 0..3000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut b = bytes.to_vec();
        let i = (seed % b.len() as u64) as usize;
        const ALPHABET: &[u8] = b" :[]{},-/*0123456789abcxyz\"\n";
        b[i] = ALPHABET[(seed >> 32) as usize % ALPHABET.len()];
        if let Ok(s) = std::str::from_utf8(&b) {
            if let Err(e) = compile_local_config(s) {
                refused += 1;
                assert!(!e.is_empty());
                assert!(!e.to_string().is_empty());
            }
        }
    }
    assert!(
        refused > 100,
        "mutations should mostly be refused: {refused}"
    );
}

#[test]
fn unhealthy_workloads_are_no_endpoints() {
    let text = "workloads:
- {name: a, namespace: n, workloadIps: [10.0.0.1], status: Healthy, services: {n/s.n: {80: 8080}}}
- {name: b, namespace: n, workloadIps: [10.0.0.2], status: Unhealthy, services: {n/s.n: {80: 8080}}}
services:
- {name: s, namespace: n, hostname: s.n, vips: [\"/10.96.0.9\"], ports: {80: 8080}}
";
    let cfg = compile_local_config(text).unwrap();
    assert_eq!(
        cfg.flat.services[&"10.96.0.9:80".parse().unwrap()].slots,
        vec!["10.0.0.1:8080".parse().unwrap()]
    );
    let e = errors(&text.replace("Unhealthy", "Sick"));
    assert!(
        e.contains("workload \"n/b\": field status: \"Sick\""),
        "{e}"
    );
}

#[test]
fn identical_selector_policies_for_different_workloads_do_not_overlap() {
    let text = "workloads:
- {name: a, namespace: n, workloadIps: [10.0.0.1], authorizationPolicies: [n/p]}
- {name: b, namespace: n, workloadIps: [10.0.0.2], authorizationPolicies: [n/q]}
policies:
- {name: p, namespace: n, scope: WorkloadSelector, action: Deny, rules: [[[{destinationPorts: [22]}]]]}
- {name: q, namespace: n, scope: WorkloadSelector, action: Deny, rules: [[[{destinationPorts: [22]}]]]}
";
    compile_local_config(text).unwrap();
    // Both selected by the same workload only: the same policy twice.
    let same = text
        .replace("authorizationPolicies: [n/q]", "authorizationPolicies: []")
        .replace(
            "authorizationPolicies: [n/p]}",
            "authorizationPolicies: [n/p, n/q]}",
        );
    let e = errors(&same);
    assert!(e.contains("overlaps policy"), "{e}");
}
