//! Locality-aware load balancing of dual-engine services: endpoints are
//! ranked against this node (ztunnel's rank), STRICT keeps full matches
//! only, FAILOVER keeps the best rank present; the result is the slot
//! table the kernel picks from.

use std::net::SocketAddr;

use xds_adapter::workload::{
    compile_local_config, compile_local_config_for, locality_rank, parse_local_config,
    HealthPolicy, LoadBalancing, LocalNode, Locality, LocalityMode, LocalityScope,
};

fn node() -> LocalNode {
    LocalNode {
        locality: "eu/eu-1a/rack1".parse().unwrap(),
        node: "node-a".into(),
        network: "net1".into(),
        cluster_id: "c1".into(),
    }
}

/// Endpoints: `same` (same subzone and node), `zone` (same zone, other
/// subzone, other node), `region` (same region, other zone), `far` (other
/// region), `unhealthy` (same node, Unhealthy).
fn config(lb: &str) -> String {
    let w = |name: &str, ip: &str, loc: &str, node: &str, extra: &str| {
        format!("- {{name: {name}, namespace: ns, workloadIps: [{ip}], locality: \"{loc}\", node: {node}, network: net1, clusterId: c1, services: {{\"ns/web.ns.svc\": {{}}}}{extra}}}\n")
    };
    format!(
        "workloads:\n{}{}{}{}{}services:\n- {{name: web, namespace: ns, hostname: web.ns.svc, vips: [\"/10.96.0.1\"], ports: {{80: 8080}}{lb}}}\n",
        w("same", "10.0.0.1", "eu/eu-1a/rack1", "node-a", ""),
        w("zone", "10.0.0.2", "eu/eu-1a/rack2", "node-b", ""),
        w("region", "10.0.0.3", "eu/eu-1b/rack1", "node-c", ""),
        w("far", "10.0.0.4", "us/us-1a/rack1", "node-d", ""),
        w("unhealthy", "10.0.0.5", "eu/eu-1a/rack1", "node-a", ", status: Unhealthy"),
    )
}

fn slots(text: &str) -> Vec<SocketAddr> {
    let cfg = compile_local_config_for(text, &node()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    cfg.flat.services[&"10.96.0.1:80".parse().unwrap()]
        .slots
        .clone()
}

fn addrs(ips: &[u8]) -> Vec<SocketAddr> {
    ips.iter()
        .map(|i| format!("10.0.0.{i}:8080").parse().unwrap())
        .collect()
}

#[test]
fn rank_counts_leading_matching_scopes() {
    let cfg = parse_local_config(&config("")).unwrap();
    let by_name = |n: &str| cfg.workloads.iter().find(|w| w.name == n).unwrap();
    let lb = |mode, prefs: &[LocalityScope]| LoadBalancing {
        routing_preference: prefs.to_vec(),
        mode,
        health_policy: HealthPolicy::OnlyHealthy,
    };
    use LocalityScope::*;
    let f = lb(LocalityMode::Failover, &[Region, Zone, Subzone, Node]);
    let ranks: Vec<_> = ["same", "zone", "region", "far"]
        .iter()
        .map(|n| locality_rank(&f, &node(), by_name(n)))
        .collect();
    assert_eq!(ranks, vec![Some(4), Some(2), Some(1), Some(0)]);
    // Counting stops at the first mismatch: `zone` matches NODE? no, and
    // with NODE first nothing after it counts.
    let n = lb(LocalityMode::Failover, &[Node, Region]);
    assert_eq!(locality_rank(&n, &node(), by_name("zone")), Some(0));
    assert_eq!(locality_rank(&n, &node(), by_name("same")), Some(2));
    // STRICT: only full matches are ranked at all.
    let s = lb(LocalityMode::Strict, &[Region, Zone]);
    assert_eq!(locality_rank(&s, &node(), by_name("zone")), Some(2));
    assert_eq!(locality_rank(&s, &node(), by_name("region")), None);
    assert_eq!(locality_rank(&s, &node(), by_name("far")), None);
    // No preference: everything ranks 0, STRICT included.
    let e = lb(LocalityMode::Strict, &[]);
    assert_eq!(locality_rank(&e, &node(), by_name("far")), Some(0));
}

#[test]
fn network_first_dominates_the_other_scopes() {
    let mut cfg = parse_local_config(&config("")).unwrap();
    // `same` moves to another network; `far` stays on ours.
    cfg.workloads[0].network = "net2".into();
    let w = |n: &str| cfg.workloads.iter().find(|w| w.name == n).unwrap();
    let lb = LoadBalancing {
        routing_preference: vec![LocalityScope::Network, LocalityScope::Region],
        mode: LocalityMode::Failover,
        health_policy: HealthPolicy::OnlyHealthy,
    };
    let same_net_far_region = locality_rank(&lb, &node(), w("far")).unwrap();
    let other_net_same_region = locality_rank(&lb, &node(), w("same")).unwrap();
    assert!(
        same_net_far_region > other_net_same_region,
        "{same_net_far_region} vs {other_net_same_region}"
    );
    // Off our network the region still counts.
    assert_eq!(other_net_same_region, 1);
}

#[test]
fn failover_keeps_the_best_rank_present() {
    let lb = ", loadBalancer: {routingPreferences: [Region, Zone, Subzone], mode: Failover}";
    assert_eq!(slots(&config(lb)), addrs(&[1]));
    // Without the subzone match: the two same-zone endpoints.
    let text = config(lb).replace(
        "rack1\", node: node-a, network: net1, clusterId: c1, services: {\"ns/web.ns.svc\": {}}}",
        "rack1\", node: node-a, network: net1, clusterId: c1}",
    );
    assert_eq!(slots(&text), addrs(&[2]));
    // Proto spelling of the same thing.
    let proto = ", loadBalancer: {routingPreference: [REGION, ZONE, SUBZONE], mode: FAILOVER}";
    assert_eq!(slots(&config(proto)), addrs(&[1]));
}

#[test]
fn strict_keeps_full_matches_only_and_none_means_no_slots() {
    let lb = ", loadBalancer: {routingPreferences: [Region, Zone], mode: Strict}";
    assert_eq!(slots(&config(lb)), addrs(&[1, 2]));
    // This node in another region: no endpoint qualifies → no slots (the
    // kernel refuses the connect).
    let mut far = node();
    far.locality = Locality {
        region: "ap".into(),
        ..Default::default()
    };
    let cfg = compile_local_config_for(&config(lb), &far).unwrap();
    assert!(cfg.flat.services[&"10.96.0.1:80".parse().unwrap()]
        .slots
        .is_empty());
}

#[test]
fn health_policy_allow_all_admits_unhealthy_workloads() {
    let lb = ", loadBalancer: {routingPreferences: [Node], mode: Strict, healthPolicy: AllowAll}";
    assert_eq!(slots(&config(lb)), addrs(&[1, 5]));
    let lb = ", loadBalancer: {routingPreferences: [Node], mode: Strict}";
    assert_eq!(slots(&config(lb)), addrs(&[1]));
}

#[test]
fn standard_mode_ignores_locality() {
    let lb = ", loadBalancer: {routingPreferences: [Region], mode: Standard}";
    assert_eq!(slots(&config(lb)), addrs(&[1, 2, 3, 4]));
    assert_eq!(slots(&config("")), addrs(&[1, 2, 3, 4]));
}

#[test]
fn an_unknown_node_locality_is_warned_about() {
    let lb = ", loadBalancer: {routingPreferences: [Region], mode: Failover}";
    let cfg = compile_local_config(&config(lb)).unwrap();
    assert!(
        cfg.flat
            .warnings
            .iter()
            .any(|w| w.contains("service \"ns/web\"") && w.contains("--locality")),
        "{:?}",
        cfg.flat.warnings
    );
}

#[test]
fn bad_load_balancer_fields_name_the_service_and_field() {
    let bad = |lb: &str| match compile_local_config(&config(lb)) {
        Ok(_) => panic!("accepted {lb}"),
        Err(e) => e.to_string(),
    };
    let e = bad(", loadBalancer: {routingPreferences: [Galaxy], mode: Failover}");
    assert!(
        e.contains("service \"ns/web\": field loadBalancer.routingPreferences[0]"),
        "{e}"
    );
    let e = bad(", loadBalancer: {routingPreferences: [Zone], mode: Passthrough}");
    assert!(e.contains("field loadBalancer.mode"), "{e}");
    assert!(e.contains("not supported"), "{e}");
    let e = bad(", loadBalancer: {mode: Failover, colour: red}");
    assert!(
        e.contains("field loadBalancer.colour: unknown field"),
        "{e}"
    );
    let e = compile_local_config(
        "workloads:\n- {name: w, namespace: ns, workloadIps: [10.0.0.1], locality: a/b/c/d}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("workload \"ns/w\": field locality") && e.contains("three parts"),
        "{e}"
    );
}

#[test]
fn a_vip_claimed_twice_over_the_workload_api_is_reported() {
    use xds_adapter::workload::{DualEngineConfig, LbMode, LocalConfig, Service};
    let svc = |name: &str| Service {
        name: name.into(),
        namespace: "ns".into(),
        hostname: format!("{name}.ns.svc"),
        vips: vec!["10.96.0.1".parse().unwrap()],
        ports: [(80, 80)].into(),
        lb: LbMode::Random,
        load_balancing: None,
        waypoint: None,
    };
    let cfg = LocalConfig {
        services: vec![svc("a"), svc("b")],
        ..Default::default()
    };
    let de = DualEngineConfig::compile(cfg, &node()).unwrap();
    assert!(
        de.flat
            .warnings
            .iter()
            .any(|w| w.contains("service \"ns/b\"") && w.contains("also captured by ns/a.ns.svc")),
        "{:?}",
        de.flat.warnings
    );
}
