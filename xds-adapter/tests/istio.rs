//! Istiod's sidecar-mode listener shapes (`tests/data/istio-sidecar-config-dump.yaml`):
//! the catch-all and per-port listeners are accepted (every resource passes
//! its per-resource check, so the xDS client ACKs them) and partially
//! installed: concrete destinations whose filter chains agree become
//! services, everything the kernel cannot decide at connect time is left
//! alone and reported.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use xds_adapter::{
    check_cluster, check_listener, check_load_assignment, check_route_config, compile_lenient,
    parse_static_config, Resources,
};

fn istio() -> Resources {
    let text = include_str!("data/istio-sidecar-config-dump.yaml");
    parse_static_config(text).expect("the Istio config dump parses")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn every_resource_passes_its_own_check() {
    let r = istio();
    assert_eq!(r.listeners.len(), 7);
    assert_eq!(r.route_configs.len(), 2);
    for l in &r.listeners {
        check_listener(l).unwrap_or_else(|e| panic!("listener {:?} NACKed: {e}", l.name));
    }
    for c in &r.clusters {
        check_cluster(c).unwrap_or_else(|e| panic!("cluster {:?} NACKed: {e}", c.name));
    }
    for c in &r.load_assignments {
        check_load_assignment(c).unwrap_or_else(|e| panic!("{:?} NACKed: {e}", c.cluster_name));
    }
    for rc in &r.route_configs {
        check_route_config(rc).unwrap_or_else(|e| panic!("{:?} NACKed: {e}", rc.name));
    }
    // The passthrough and black-hole clusters say what they mean here.
    let pass = r
        .clusters
        .iter()
        .find(|c| c.name == "PassthroughCluster")
        .unwrap();
    let w = check_cluster(pass).unwrap();
    assert!(
        w.iter()
            .any(|w| w.contains("ORIGINAL_DST: connects routed to it are left alone")),
        "{w:?}"
    );
    let hole = r
        .clusters
        .iter()
        .find(|c| c.name == "BlackHoleCluster")
        .unwrap();
    let w = check_cluster(hole).unwrap();
    assert!(
        w.iter().any(|w| w.contains("no endpoints: Envoy refuses")),
        "{w:?}"
    );
}

#[test]
fn installs_the_concrete_destinations_and_reports_the_rest() {
    let r = istio();
    let c = compile_lenient(&r.refs()).expect("compiles");
    let got: BTreeMap<SocketAddr, Vec<String>> = c
        .flat
        .services
        .iter()
        .map(|(vip, s)| {
            let mut clusters: Vec<String> = s.endpoints.iter().map(|e| e.cluster.clone()).collect();
            clusters.dedup();
            (*vip, clusters)
        })
        .collect();
    let want: BTreeMap<SocketAddr, Vec<String>> = [
        (
            "10.96.10.10:9080",
            "outbound|9080||reviews.default.svc.cluster.local",
        ),
        (
            "10.96.20.5:27017",
            "outbound|27017||mongodb.default.svc.cluster.local",
        ),
        (
            "10.96.20.6:27017",
            "outbound|27017||mongodb-replica.default.svc.cluster.local",
        ),
        (
            "10.96.30.3:8000",
            "outbound|8000||httpbin.default.svc.cluster.local",
        ),
        (
            "10.96.40.8:3306",
            "outbound|3306||mysql.default.svc.cluster.local",
        ),
    ]
    .iter()
    .map(|(v, c)| (sa(v), vec![c.to_string()]))
    .collect();
    assert_eq!(got, want, "warnings: {:#?}", c.flat.warnings);
    // The endpoints are the assignments' (mongodb-replica has two).
    let replica = &c.flat.services[&sa("10.96.20.6:27017")];
    let eps: Vec<SocketAddr> = replica.endpoints.iter().map(|e| e.addr).collect();
    assert_eq!(eps, vec![sa("10.244.2.6:27017"), sa("10.244.2.7:27017")]);

    let warned = |needle: &str| {
        assert!(
            c.flat.warnings.iter().any(|w| w.contains(needle)),
            "no warning containing {needle:?} in {:#?}",
            c.flat.warnings
        )
    };
    // Catch-all and inbound listeners: a note, no service.
    warned("listener \"virtualOutbound\": use_original_dst");
    warned("listener \"virtualInbound\": inbound listener");
    // HTTP and TCP chains of a sniffed port disagree for the canary split.
    warned("10.96.30.4:8000: not installed, connects are left alone: the filter chains Envoy may pick for it do not agree");
    warned("sends to weighted clusters \"outbound|8000|v1|canary.default.svc.cluster.local\":90, \"outbound|8000|v2|canary.default.svc.cluster.local\":10");
    // ratings: a header route sends elsewhere than the catch-all.
    warned("10.96.10.11:9080: not installed");
    // SNI-chosen chain: nothing the kernel can see names its destination.
    warned("listener \"0.0.0.0_443\": filter_chains[0] (\"outbound|443||api.example.com\"): matches on server_names [\"api.example.com\"]");
    // Telemetry filters are named, not fatal.
    warned("network filter \"istio.stats\" only records telemetry");
    // Nothing routes to the passthrough or black-hole clusters.
    assert!(c.flat.services.values().all(|s| s
        .endpoints
        .iter()
        .all(|e| !e.cluster.contains("Passthrough") && !e.cluster.contains("BlackHole"))));
}

#[test]
fn a_chain_that_cannot_be_read_leaves_its_destinations_alone() {
    // Replace mongodb's tcp_proxy by a network filter the kernel cannot
    // honour: that destination is left alone, the other one still installs,
    // and the listener is not rejected.
    let mut r = istio();
    let l = r
        .listeners
        .iter_mut()
        .find(|l| l.name == "0.0.0.0_27017")
        .unwrap();
    let f = &mut l.filter_chains[0].filters[1];
    f.name = "envoy.filters.network.mongo_proxy".into();
    if let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(a)) =
        &mut f.config_type
    {
        a.type_url =
            "type.googleapis.com/envoy.extensions.filters.network.mongo_proxy.v3.MongoProxy".into();
    }
    check_listener(l).expect("still accepted");
    let c = compile_lenient(&r.refs()).unwrap();
    assert!(!c.flat.services.contains_key(&sa("10.96.20.5:27017")));
    assert!(c.flat.services.contains_key(&sa("10.96.20.6:27017")));
    assert!(
        c.flat
            .warnings
            .iter()
            .any(|w| w.contains("10.96.20.5:27017: not installed") && w.contains("mongo_proxy")),
        "{:#?}",
        c.flat.warnings
    );
}

#[test]
fn a_bad_prefix_range_is_still_an_error() {
    let mut r = istio();
    let l = r
        .listeners
        .iter_mut()
        .find(|l| l.name == "0.0.0.0_27017")
        .unwrap();
    let m = l.filter_chains[1].filter_chain_match.as_mut().unwrap();
    m.prefix_ranges[0].address_prefix = "mongodb".into();
    let e = check_listener(l).unwrap_err().to_string();
    assert!(e.contains("listener \"0.0.0.0_27017\": field filter_chains[1].filter_chain_match.prefix_ranges[0].address_prefix: \"mongodb\" is not an IP address"), "{e}");
}
