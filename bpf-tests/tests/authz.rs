//! Dual-engine authorization conformance: Istio AuthorizationPolicy L4
//! semantics enforced by the XDP program on the destination pod's
//! interface, checked with real TCP connections between pods. Each case
//! writes a policy set, then every check is one connection that must reach
//! the server (allowed) or time out (its SYN dropped).

mod common;

use std::net::SocketAddr;

use bpf_tests::{Node, Pod};
use kmesh_daemon::{
    authz::Authz,
    dataplane::{Dataplane, DataplaneOptions},
};

/// A dropped SYN is retransmitted after 1 s; a connect that has not
/// completed after this long was dropped (pods answer in microseconds).
const TIMEOUT_MS: u64 = 400;

struct Env {
    authz: Authz,
    dp: Dataplane,
    node: Node,
    pods: Vec<Pod>,
}

/// Pods: a (frontend/web), b (frontend/admin), c (backend/batch),
/// x (not in the config: no identity), d (backend/db, servers on 8080 and
/// 9090), e (other/api, server on 8080).
fn env() -> Env {
    bpf_tests::require_root();
    let mut node = Node::new("kaz", std::path::Path::new(common::TESTPOD)).expect("node");
    let mut pods = Vec::new();
    for name in ["a", "b", "c", "x", "d", "e"] {
        pods.push(node.add_pod(name).expect("pod"));
    }
    for (i, p) in pods.iter().enumerate() {
        assert_eq!(p.addr4(0).ip().to_string(), format!("10.244.0.{}", i + 2));
    }
    let d = pods[4].clone();
    node.serve(&d, "d", &[d.addr4(8080), d.addr4(9090), d.addr6(8080)])
        .expect("server d");
    let e = pods[5].clone();
    node.serve(&e, "e", &[e.addr4(8080)]).expect("server e");
    let mut dp = Dataplane::load(&DataplaneOptions::default()).expect("load dataplane");
    let mut authz = Authz::load(dp.ebpf_mut()).expect("load authz programs");
    for p in [&d, &e] {
        let mode = authz
            .attach(dp.ebpf_mut(), &p.netns_path, "eth0", None)
            .expect("attach xdp");
        eprintln!("xdp on {}/eth0: {mode}", p.name);
    }
    Env {
        authz,
        dp,
        node,
        pods,
    }
}

fn config(d_selectors: &[&str], policies: &[String]) -> String {
    let sel = d_selectors
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut y = format!(
        "workloads:
- {{name: a, namespace: frontend, serviceAccount: web, workloadIps: [10.244.0.2, \"fd00:244::2\"]}}
- {{name: b, namespace: frontend, serviceAccount: admin, workloadIps: [10.244.0.3, \"fd00:244::3\"]}}
- {{name: c, namespace: backend, serviceAccount: batch, workloadIps: [10.244.0.4]}}
- {{name: d, namespace: backend, serviceAccount: db, workloadIps: [10.244.0.6, \"fd00:244::6\"], authorizationPolicies: [{sel}]}}
- {{name: e, namespace: other, serviceAccount: api, workloadIps: [10.244.0.7]}}
"
    );
    y.push_str(if policies.is_empty() {
        "policies: []\n"
    } else {
        "policies:\n"
    });
    for p in policies {
        y.push_str(p);
        y.push('\n');
    }
    y
}

fn pol(name: &str, ns: &str, scope: &str, action: &str, rules: &str) -> String {
    format!("- {{name: {name}, namespace: {ns}, scope: {scope}, action: {action}, rules: {rules}}}")
}

/// `rules` with one rule, one clause, one match.
fn one(m: &str) -> String {
    format!("[[[{{{m}}}]]]")
}

const PA: &str = "cluster.local/ns/frontend/sa/web";
const PB: &str = "cluster.local/ns/frontend/sa/admin";

struct Case {
    name: &'static str,
    selectors: Vec<&'static str>,
    policies: Vec<String>,
    /// (source pod, destination pod, port, v6, allowed)
    checks: Vec<(&'static str, &'static str, u16, bool, bool)>,
}

fn c(
    name: &'static str,
    policies: Vec<String>,
    checks: Vec<(&'static str, &'static str, u16, bool)>,
) -> Case {
    Case {
        name,
        selectors: vec![],
        policies,
        checks: checks
            .into_iter()
            .map(|(s, d, p, a)| (s, d, p, false, a))
            .collect(),
    }
}

const ALLOW: bool = true;
const DENY: bool = false;

fn cases() -> Vec<Case> {
    let ns = |name, action, rules: String| pol(name, "backend", "Namespace", action, &rules);
    vec![
        c(
            "no policy allows everything",
            vec![],
            vec![("a", "d", 8080, ALLOW), ("x", "d", 8080, ALLOW)],
        ),
        c(
            "allow rule without clauses allows all",
            vec![ns("p", "Allow", "[[]]".into())],
            vec![("a", "d", 8080, ALLOW), ("x", "d", 9090, ALLOW)],
        ),
        c(
            "allow without rules denies all",
            vec![ns("p", "Allow", "[]".into())],
            vec![("a", "d", 8080, DENY), ("x", "d", 8080, DENY)],
        ),
        c(
            "deny without rules denies nothing",
            vec![ns("p", "Deny", "[]".into())],
            vec![("a", "d", 8080, ALLOW)],
        ),
        c(
            "allow sourceIps /32",
            vec![ns("p", "Allow", one("sourceIps: [10.244.0.2/32]"))],
            vec![("a", "d", 8080, ALLOW), ("b", "d", 8080, DENY)],
        ),
        c(
            "allow sourceIps CIDR",
            vec![ns("p", "Allow", one("sourceIps: [10.244.0.0/30]"))],
            vec![
                ("a", "d", 8080, ALLOW),
                ("b", "d", 8080, ALLOW),
                ("c", "d", 8080, DENY),
            ],
        ),
        c(
            "allow sourceIps bare address",
            vec![ns("p", "Allow", one("sourceIps: [10.244.0.4]"))],
            vec![("c", "d", 8080, ALLOW), ("a", "d", 8080, DENY)],
        ),
        c(
            "allow notSourceIps",
            vec![ns("p", "Allow", one("notSourceIps: [10.244.0.2/32]"))],
            vec![("a", "d", 8080, DENY), ("b", "d", 8080, ALLOW)],
        ),
        c(
            "deny sourceIps",
            vec![ns("p", "Deny", one("sourceIps: [10.244.0.2/32]"))],
            vec![("a", "d", 8080, DENY), ("b", "d", 8080, ALLOW)],
        ),
        c(
            "deny notSourceIps",
            vec![ns("p", "Deny", one("notSourceIps: [10.244.0.2/32]"))],
            vec![("a", "d", 8080, ALLOW), ("b", "d", 8080, DENY)],
        ),
        c(
            "allow destinationPorts",
            vec![ns("p", "Allow", one("destinationPorts: [8080]"))],
            vec![("a", "d", 8080, ALLOW), ("a", "d", 9090, DENY)],
        ),
        c(
            "allow notDestinationPorts",
            vec![ns("p", "Allow", one("notDestinationPorts: [8080]"))],
            vec![("a", "d", 8080, DENY), ("a", "d", 9090, ALLOW)],
        ),
        c(
            "deny destinationPorts",
            vec![ns("p", "Deny", one("destinationPorts: [9090]"))],
            vec![("a", "d", 8080, ALLOW), ("a", "d", 9090, DENY)],
        ),
        c(
            "deny notDestinationPorts",
            vec![ns("p", "Deny", one("notDestinationPorts: [9090]"))],
            vec![("a", "d", 8080, DENY), ("a", "d", 9090, ALLOW)],
        ),
        c(
            "allow destinationIps",
            vec![ns("p", "Allow", one("destinationIps: [10.244.0.6/32]"))],
            vec![("a", "d", 8080, ALLOW)],
        ),
        c(
            "allow destinationIps elsewhere",
            vec![ns("p", "Allow", one("destinationIps: [10.245.0.0/16]"))],
            vec![("a", "d", 8080, DENY)],
        ),
        c(
            "allow notDestinationIps",
            vec![ns("p", "Allow", one("notDestinationIps: [10.244.0.6/32]"))],
            vec![("a", "d", 8080, DENY)],
        ),
        c(
            "deny destinationIps CIDR",
            vec![ns("p", "Deny", one("destinationIps: [10.244.0.0/16]"))],
            vec![("a", "d", 8080, DENY)],
        ),
        c(
            "deny notDestinationIps",
            vec![ns("p", "Deny", one("notDestinationIps: [10.244.0.6/32]"))],
            vec![("a", "d", 8080, ALLOW)],
        ),
        c(
            "allow namespaces",
            vec![ns("p", "Allow", one("namespaces: [frontend]"))],
            vec![
                ("a", "d", 8080, ALLOW),
                ("c", "d", 8080, DENY),
                ("x", "d", 8080, DENY),
            ],
        ),
        c(
            "allow notNamespaces",
            vec![ns("p", "Allow", one("notNamespaces: [frontend]"))],
            vec![
                ("a", "d", 8080, DENY),
                ("c", "d", 8080, ALLOW),
                ("x", "d", 8080, ALLOW),
            ],
        ),
        c(
            "deny namespaces",
            vec![ns("p", "Deny", one("namespaces: [backend]"))],
            vec![("c", "d", 8080, DENY), ("a", "d", 8080, ALLOW)],
        ),
        c(
            "deny notNamespaces",
            vec![ns("p", "Deny", one("notNamespaces: [backend]"))],
            vec![
                ("a", "d", 8080, DENY),
                ("c", "d", 8080, ALLOW),
                ("x", "d", 8080, DENY),
            ],
        ),
        c(
            "allow principals exact",
            vec![ns(
                "p",
                "Allow",
                one(&format!("principals: [{{Exact: \"{PA}\"}}]")),
            )],
            vec![
                ("a", "d", 8080, ALLOW),
                ("b", "d", 8080, DENY),
                ("x", "d", 8080, DENY),
            ],
        ),
        c(
            "allow principals prefix",
            vec![ns(
                "p",
                "Allow",
                one("principals: [\"cluster.local/ns/frontend/*\"]"),
            )],
            vec![
                ("a", "d", 8080, ALLOW),
                ("b", "d", 8080, ALLOW),
                ("c", "d", 8080, DENY),
            ],
        ),
        c(
            "allow principals suffix",
            vec![ns("p", "Allow", one("principals: [{Suffix: /sa/admin}]"))],
            vec![("b", "d", 8080, ALLOW), ("a", "d", 8080, DENY)],
        ),
        c(
            "allow principals spiffe form",
            vec![ns(
                "p",
                "Allow",
                one(&format!("principals: [\"spiffe://{PA}\"]")),
            )],
            vec![("a", "d", 8080, ALLOW), ("b", "d", 8080, DENY)],
        ),
        c(
            "allow notPrincipals",
            vec![ns("p", "Allow", one(&format!("notPrincipals: [\"{PA}\"]")))],
            vec![
                ("a", "d", 8080, DENY),
                ("b", "d", 8080, ALLOW),
                ("x", "d", 8080, ALLOW),
            ],
        ),
        c(
            "deny principals",
            vec![ns("p", "Deny", one(&format!("principals: [\"{PB}\"]")))],
            vec![("b", "d", 8080, DENY), ("a", "d", 8080, ALLOW)],
        ),
        c(
            "deny notPrincipals",
            vec![ns("p", "Deny", one(&format!("notPrincipals: [\"{PA}\"]")))],
            vec![
                ("a", "d", 8080, ALLOW),
                ("b", "d", 8080, DENY),
                ("x", "d", 8080, DENY),
            ],
        ),
        c(
            "allow serviceAccounts",
            vec![ns(
                "p",
                "Allow",
                one("serviceAccounts: [{namespace: frontend, serviceAccount: web}]"),
            )],
            vec![("a", "d", 8080, ALLOW), ("b", "d", 8080, DENY)],
        ),
        c(
            "global scope applies everywhere",
            vec![pol(
                "g",
                "istio-system",
                "Global",
                "Allow",
                &one(&format!("principals: [\"{PA}\"]")),
            )],
            vec![
                ("a", "d", 8080, ALLOW),
                ("b", "d", 8080, DENY),
                ("b", "e", 8080, DENY),
                ("a", "e", 8080, ALLOW),
            ],
        ),
        c(
            "namespace scope stays in its namespace",
            vec![ns("p", "Allow", one(&format!("principals: [\"{PA}\"]")))],
            vec![("b", "d", 8080, DENY), ("b", "e", 8080, ALLOW)],
        ),
        c(
            "namespace scope of another namespace",
            vec![pol("p", "other", "Namespace", "Deny", "[[]]")],
            vec![("a", "d", 8080, ALLOW), ("a", "e", 8080, DENY)],
        ),
        Case {
            name: "workload selector applies to the selected workload only",
            selectors: vec!["backend/sel"],
            policies: vec![pol(
                "sel",
                "backend",
                "WorkloadSelector",
                "Deny",
                &one(&format!("principals: [\"{PA}\"]")),
            )],
            checks: vec![
                ("a", "d", 8080, false, DENY),
                ("a", "e", 8080, false, ALLOW),
                ("b", "d", 8080, false, ALLOW),
            ],
        },
        c(
            "workload selector policy nobody selects",
            vec![pol("sel", "backend", "WorkloadSelector", "Deny", "[[]]")],
            vec![("a", "d", 8080, ALLOW)],
        ),
        c(
            "deny wins over allow",
            vec![
                ns("p", "Allow", one("namespaces: [frontend]")),
                ns("q", "Deny", one(&format!("principals: [\"{PA}\"]"))),
            ],
            vec![("a", "d", 8080, DENY), ("b", "d", 8080, ALLOW)],
        ),
        c(
            "any allow policy may allow",
            vec![
                ns("p", "Allow", one(&format!("principals: [\"{PA}\"]"))),
                ns("q", "Allow", one("namespaces: [backend]")),
            ],
            vec![
                ("a", "d", 8080, ALLOW),
                ("c", "d", 8080, ALLOW),
                ("b", "d", 8080, DENY),
            ],
        ),
        c(
            "rules are OR'd",
            vec![ns(
                "p",
                "Allow",
                format!("[[[{{principals: [\"{PA}\"]}}]], [[{{destinationPorts: [9090]}}]]]"),
            )],
            vec![
                ("a", "d", 8080, ALLOW),
                ("b", "d", 8080, DENY),
                ("b", "d", 9090, ALLOW),
            ],
        ),
        c(
            "clauses are AND'd",
            vec![ns(
                "p",
                "Allow",
                format!("[[[{{principals: [\"{PA}\"]}}], [{{destinationPorts: [8080]}}]]]"),
            )],
            vec![
                ("a", "d", 8080, ALLOW),
                ("a", "d", 9090, DENY),
                ("b", "d", 8080, DENY),
            ],
        ),
        c(
            "matches in a clause are OR'd",
            vec![ns(
                "p",
                "Allow",
                format!("[[[{{principals: [\"{PA}\"]}}, {{principals: [\"{PB}\"]}}]]]"),
            )],
            vec![
                ("a", "d", 8080, ALLOW),
                ("b", "d", 8080, ALLOW),
                ("c", "d", 8080, DENY),
            ],
        ),
        c(
            "fields in a match are AND'd",
            vec![ns(
                "p",
                "Allow",
                one("namespaces: [frontend], destinationPorts: [9090]"),
            )],
            vec![
                ("a", "d", 9090, ALLOW),
                ("a", "d", 8080, DENY),
                ("c", "d", 9090, DENY),
            ],
        ),
        c(
            "values in a field are OR'd",
            vec![ns(
                "p",
                "Allow",
                one("sourceIps: [10.244.0.2, 10.244.0.4/32]"),
            )],
            vec![
                ("a", "d", 8080, ALLOW),
                ("c", "d", 8080, ALLOW),
                ("b", "d", 8080, DENY),
            ],
        ),
        c(
            "clause in proto form {matches}",
            vec![ns(
                "p",
                "Allow",
                format!("[[{{matches: [{{principals: [\"{PB}\"]}}]}}]]"),
            )],
            vec![("b", "d", 8080, ALLOW), ("a", "d", 8080, DENY)],
        ),
        c(
            "an empty match never matches",
            vec![ns("p", "Allow", "[[[{}]]]".into())],
            vec![("a", "d", 8080, DENY)],
        ),
        c(
            "allow with L7 fields fails closed",
            vec![
                ns(
                    "p",
                    "Allow",
                    one(&format!("principals: [\"{PA}\"], paths: [/admin]")),
                ),
                ns("q", "Allow", one(&format!("principals: [\"{PB}\"]"))),
            ],
            vec![("a", "d", 8080, DENY), ("b", "d", 8080, ALLOW)],
        ),
        c(
            "deny with L7 fields denies the L4 part",
            vec![ns(
                "p",
                "Deny",
                one(&format!("principals: [\"{PA}\"], methods: [POST]")),
            )],
            vec![("a", "d", 8080, DENY), ("b", "d", 8080, ALLOW)],
        ),
        c(
            "deny with only L7 fields denies all",
            vec![ns("p", "Deny", one("paths: [/admin]"))],
            vec![("a", "d", 8080, DENY), ("x", "d", 9090, DENY)],
        ),
        Case {
            name: "IPv6 source CIDR",
            selectors: vec![],
            policies: vec![ns("p", "Allow", one("sourceIps: [\"fd00:244::2/128\"]"))],
            checks: vec![("a", "d", 8080, true, ALLOW), ("b", "d", 8080, true, DENY)],
        },
    ]
}

#[test]
fn authorization_conformance_table() {
    let mut env = env();
    let pod = |name: &str| {
        env.pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod")
            .clone()
    };
    let cases = cases();
    assert!(cases.len() >= 30, "the table must have at least 30 cases");
    let mut failures = Vec::new();
    let mut checks = 0;
    for case in &cases {
        let doc = config(&case.selectors, &case.policies);
        let cfg = xds_adapter::workload::compile_local_config(&doc)
            .unwrap_or_else(|e| panic!("case {:?}: config rejected:\n{e}\n{doc}", case.name));
        env.authz.write(&cfg.authz).expect("write authz tables");
        for &(src, dst, port, v6, allowed) in &case.checks {
            let d = pod(dst);
            let addr: SocketAddr = if v6 { d.addr6(port) } else { d.addr4(port) };
            let r = env
                .node
                .connect_timeout(&pod(src), addr, 1, TIMEOUT_MS)
                .expect("testpod");
            checks += 1;
            let got = r.count(dst) == 1;
            if got != allowed {
                failures.push(format!(
                    "{}: {src} -> {dst}:{port}{} expected {}, got {} ({r:?})",
                    case.name,
                    if v6 { " (v6)" } else { "" },
                    if allowed { "allowed" } else { "denied" },
                    if got { "allowed" } else { "denied" },
                ));
            }
        }
    }
    let stats = env.authz.stats().unwrap();
    eprintln!(
        "{} cases, {checks} connections; kernel counters: {stats:?}",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {checks} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(stats["denied_error"], 0, "{stats:?}");
    assert!(
        stats["denied_by_policy"] > 0 && stats["allowed_by_policy"] > 0,
        "{stats:?}"
    );
    assert!(
        stats["denied_no_allow_match"] > 0 && stats["allowed_no_policy"] > 0,
        "{stats:?}"
    );
    let _ = &env.dp;
}

#[test]
fn long_chains_use_tail_calls() {
    // MAX_CHAIN_LEN matches in one clause: every run of the evaluation
    // program the tail-call budget allows. Only the last match admits the
    // source, so the whole chain is walked.
    let mut env = env();
    let max = kmesh_abi::authz::MAX_CHAIN_LEN as usize;
    let mut matches: Vec<String> = (0..max - 1)
        .map(|i| format!("{{destinationPorts: [{}]}}", 20000 + i))
        .collect();
    matches.push(format!("{{principals: [\"{PA}\"]}}"));
    let rules = format!("[[[{}]]]", matches.join(", "));
    let doc = config(&[], &[pol("long", "backend", "Namespace", "Allow", &rules)]);
    let cfg = xds_adapter::workload::compile_local_config(&doc).expect("config");
    assert_eq!(cfg.authz.slots.len(), max);
    env.authz.write(&cfg.authz).unwrap();
    let d = env.pods[4].clone();
    let a = env.pods[0].clone();
    let b = env.pods[1].clone();
    let r = env
        .node
        .connect_timeout(&a, d.addr4(8080), 1, TIMEOUT_MS)
        .unwrap();
    assert_eq!(r.count("d"), 1, "{r:?}");
    let r = env
        .node
        .connect_timeout(&b, d.addr4(8080), 1, TIMEOUT_MS)
        .unwrap();
    assert_eq!(r.count("d"), 0, "{r:?}");
    let stats = env.authz.stats().unwrap();
    assert_eq!(stats["denied_error"], 0, "{stats:?}");
    assert_eq!(env.authz.policy_stats().unwrap()["backend/long"], 1);
    let _ = &env.dp;
}
