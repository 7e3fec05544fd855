//! Configs that are rejected or warned about: every message names the
//! resource and the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use xds_adapter::model::{Cluster, Endpoint, LbPolicy, Listener, TcpRoute};
use xds_adapter::{compile_static_config, flatten, ConfigErrors, FlatConfig, MeshConfig};

const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// A listener `name` on `vip` proxying to cluster `cluster`.
fn listener(name: &str, vip: &str, cluster: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: "{}", port_value: {}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": "{TCP_PROXY}", stat_prefix: {name}, cluster: {cluster}}}
"#,
        vip.rsplit_once(':').unwrap().0,
        vip.rsplit_once(':').unwrap().1
    )
}

/// A STATIC cluster with one endpoint per address.
fn cluster(name: &str, addrs: &[&str]) -> String {
    let mut s = format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n"
    );
    for a in addrs {
        let (ip, port) = a.rsplit_once(':').unwrap();
        s += &format!(
            "        - endpoint: {{address: {{socket_address: {{address: \"{ip}\", port_value: {port}}}}}}}\n"
        );
    }
    s
}

fn doc(listeners: &[String], clusters: &[String]) -> String {
    format!(
        "static_resources:\n  listeners:{}\n  clusters:\n{}",
        listeners.concat(),
        clusters.concat()
    )
}

fn errors(text: &str) -> Vec<String> {
    match compile_static_config(text) {
        Ok(flat) => panic!("compiled, expected errors: {flat:?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

fn warnings(text: &str) -> Vec<String> {
    match compile_static_config(text) {
        Ok(flat) => flat.warnings,
        Err(e) => panic!("{e}"),
    }
}

#[track_caller]
fn assert_has(list: &[String], expected: &str) {
    assert!(
        list.iter()
            .any(|m| m == expected || m.starts_with(&format!("{expected} (hint: "))),
        "missing:\n  {expected}\nin:\n  {}",
        list.join("\n  ")
    );
}

fn base() -> String {
    doc(
        &[listener("web", "10.96.0.10:80", "web")],
        &[cluster("web", &["10.244.1.2:8080", "10.244.1.3:8080"])],
    )
}

#[test]
fn base_document_compiles() {
    let flat = compile_static_config(&base()).unwrap();
    assert!(flat.warnings.is_empty(), "{:?}", flat.warnings);
}

#[test]
fn unknown_field_names_resource_and_path() {
    let text = r#"
static_resources:
  clusters:
  - name: reviews
    load_assignment:
      cluster_name: reviews
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 80}}}
        - endpoint: {address: {socket_address: {address: 10.0.0.2, port_valu: 80}}}
"#;
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        e[0],
        "cluster \"reviews\": field load_assignment.endpoints[0].lb_endpoints[1].endpoint.address.socket_address.port_valu: unknown field (hint: did you mean `port_value`?)"
    );
    // Typed error access.
    let err: ConfigErrors = compile_static_config(text).unwrap_err();
    assert_eq!(err.0[0].resource, "cluster \"reviews\"");
    assert_eq!(
        err.0[0].field,
        "load_assignment.endpoints[0].lb_endpoints[1].endpoint.address.socket_address.port_valu"
    );
    assert_eq!(err.0[0].message, "unknown field");

    // Unknown fields inside the tcp_proxy config and at the listener level.
    let text = base()
        .replace("stat_prefix: web,", "stat_prefix: web, clustr: x,")
        .replace(
            "  - name: web\n    address",
            "  - name: web\n    adress: {}\n    address",
        );
    let e = errors(&text);
    assert_has(
        &e,
        "listener \"web\": field adress: unknown field (hint: did you mean `address`?)",
    );
    assert_has(
        &e,
        "listener \"web\": field filter_chains[0].filters[0].typed_config.clustr: unknown field (hint: did you mean `cluster`?)",
    );
}

#[test]
fn unknown_top_level_key() {
    let text = format!("{}\nstatic_resource: {{}}\n", base());
    let e = errors(&text);
    assert_eq!(
        e,
        vec!["bootstrap: field static_resource: unknown top-level field (hint: did you mean `static_resources`?)"]
    );
    // Keys Envoy knows are accepted and ignored.
    let text = format!(
        "{}\nadmin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9901}}}}}}\nnode: {{id: a}}\nlayered_runtime: {{layers: []}}\nstats_flush_interval: 5s\noverload_manager: {{}}\n",
        base()
    );
    assert!(warnings(&text).is_empty());
}

#[test]
fn ignored_fields_are_warnings() {
    let text = base()
        .replace(
            "    connect_timeout: 1s\n",
            "    connect_timeout: 1s\n    health_checks: [{timeout: 1s}]\n    circuit_breakers: {thresholds: [{max_connections: 10}]}\n",
        )
        .replace(
            "    - filters:\n",
            "    - transport_socket: {name: tls}\n      filters:\n",
        );
    let w = warnings(&text);
    assert_eq!(
        w,
        vec![
            "cluster \"web\": field health_checks: not supported by the kmesh dataplane; ignored",
            "listener \"web\": field filter_chains[0].transport_socket: not supported by the kmesh dataplane; ignored",
        ]
    );
}

#[test]
fn wrong_json_types() {
    let text = base()
        .replace("port_value: 80}", "port_value: \"eighty\"}")
        .replace("connect_timeout: 1s", "connect_timeout: 250ms");
    let e = errors(&text);
    assert_has(
        &e,
        "listener \"web\": field address.socket_address.port_value: expected an unsigned 32-bit integer, got \"eighty\"",
    );
    assert_has(
        &e,
        "cluster \"web\": field connect_timeout: expected a duration, got \"250ms\"",
    );
    let text = base().replace("filter_chains:\n", "filter_chains: 5\n  xx:\n");
    assert!(compile_static_config(&text).is_err());
    let text = base().replace("    type: STATIC\n", "    type: [STATIC]\n");
    assert_has(
        &errors(&text),
        "cluster \"web\": field type: unknown value a list",
    );
    let text = base().replace("    type: STATIC\n", "    type: STATICK\n");
    assert_has(
        &errors(&text),
        "cluster \"web\": field type: unknown value \"STATICK\"",
    );
}

#[test]
fn port_out_of_range() {
    let text = base().replace("port_value: 80}", "port_value: 70000}");
    assert_eq!(
        errors(&text),
        vec!["listener \"web\": field address.socket_address.port_value: 70000 is out of range (0-65535)"]
    );
    let text = base().replace("port_value: 8080}", "port_value: 0}");
    let e = errors(&text);
    assert_has(
        &e,
        "cluster \"web\": field load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: port 0 is not usable for an endpoint",
    );
}

#[test]
fn hostnames_are_not_resolved() {
    let text = base().replace("\"10.244.1.3\"", "\"reviews.default.svc\"");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with(
        "cluster \"web\": field load_assignment.endpoints[0].lb_endpoints[1].endpoint.address.socket_address.address: \"reviews.default.svc\" is not an IP address: hostnames are not resolved"
    ), "{}", e[0]);
    let text = base().replace("\"10.96.0.10\"", "\"web.example.com\"");
    assert!(errors(&text)[0].starts_with(
        "listener \"web\": field address.socket_address.address: \"web.example.com\" is not an IP address: hostnames are not resolved"
    ));
    let text = base()
        .replace("type: STATIC", "type: STRICT_DNS")
        .replace("\"10.244.1.3\"", "\"db\"");
    assert!(errors(&text)[0]
        .contains("STRICT_DNS endpoints must be IP literals here, hostnames are not resolved"));
    let text = base().replace("type: STATIC", "type: LOGICAL_DNS");
    assert_has(
        &errors(&text),
        "cluster \"web\": field type: LOGICAL_DNS clusters resolve hostnames, which is not supported",
    );
    let text = base().replace("\"10.96.0.10\"", "\"0.0.0.0\"");
    assert!(errors(&text)[0].starts_with(
        "listener \"web\": field address.socket_address.address: 0.0.0.0 is the wildcard address"
    ));
}

#[test]
fn http_connection_manager_routes_and_reports() {
    let hcm = |listen_ip: &str, routes: &str| {
        base()
            .replace("\"10.96.0.10\"", &format!("\"{listen_ip}\""))
            .replace(
                "      - name: envoy.filters.network.tcp_proxy\n        typed_config: {\"@type\": \"type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\", stat_prefix: web, cluster: web}\n",
                &format!("      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: ingress_http\n          route_config:\n            name: r80\n            virtual_hosts:\n{routes}"),
            )
    };
    // Empty virtual host list on a specific VIP: nothing matches, a warning.
    let w = warnings(&hcm("10.96.0.10", "              []\n"));
    assert_has(
        &w,
        "listener \"web\": no virtual host of listener \"web\" matches 10.96.0.10:80 (by IP domain or \"*\"); not installed",
    );
    // Istio-style wildcard listener, VIP in the domains, catch-all route.
    let vh = "            - name: web\n              domains: [\"web.default.svc.cluster.local:80\", \"10.96.0.10\", \"10.96.0.10:80\"]\n              routes:\n";
    let flat = compile_static_config(&hcm(
        "0.0.0.0",
        &format!("{vh}              - match: {{prefix: \"/\"}}\n                route: {{cluster: web, timeout: 0s}}\n"),
    ))
    .unwrap();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    assert_eq!(flat.services[&vip].slots.len(), 2);
    assert_has(
        &flat.warnings,
        "listener \"web\": field filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[*].routes[*].route.timeout: not supported by the kmesh dataplane; ignored",
    );
    // A content-dependent route to another cluster: not installed, reported.
    let text = hcm(
        "0.0.0.0",
        &format!("{vh}              - match: {{prefix: \"/api\"}}\n                route: {{cluster: other}}\n              - match: {{prefix: \"/\"}}\n                route: {{cluster: web}}\n"),
    );
    let w = warnings(&text);
    assert!(
        w.iter().any(|m| m.starts_with("listener \"web\": listener \"web\" virtual host \"web\": not installed, connects to 10.96.0.10:80 are left alone: route 0 [prefix \"/api\"] depends on the request and sends to cluster \"other\" while the catch-all route 1 sends to cluster \"web\"")),
        "{w:?}"
    );
    assert!(compile_static_config(&text).unwrap().services.is_empty());
    // A header match to the same cluster is harmless.
    let flat = compile_static_config(&hcm(
        "0.0.0.0",
        &format!("{vh}              - match: {{prefix: \"/\", headers: [{{name: x-user, string_match: {{exact: a}}}}]}}\n                route: {{cluster: web}}\n              - match: {{prefix: \"/\"}}\n                route: {{cluster: web}}\n"),
    ))
    .unwrap();
    assert_eq!(flat.services.len(), 1);
    // Neither rds nor route_config is an error naming the field.
    let text = base().replace(
        "      - name: envoy.filters.network.tcp_proxy\n        typed_config: {\"@type\": \"type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\", stat_prefix: web, cluster: web}\n",
        "      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: ingress_http\n",
    );
    let e = errors(&text);
    assert!(e[0].starts_with(
        "listener \"web\": field filter_chains[0].filters[0].typed_config: http_connection_manager has neither rds nor route_config"
    ), "{e:?}");

    let text = base().replace(
        TCP_PROXY,
        "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy",
    );
    assert!(errors(&text)[0].starts_with(
        "listener \"web\": field filter_chains[0].filters[0]: network filter \"envoy.filters.network.tcp_proxy\" (type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy) is not supported"
    ));
    let text = base().replace(
        "    filter_chains:\n    - filters:\n",
        "    filter_chains: []\n    x_filters:\n",
    );
    assert!(compile_static_config(&text).is_err());
    let text = base()
        .replace("        typed_config: {", "        x: {")
        .replace("x: {", "typed_config: null, y: {");
    assert!(compile_static_config(&text).is_err());
}

#[test]
fn listener_without_filters() {
    let text = doc(
        &[
            "\n  - name: bare\n    address: {socket_address: {address: 10.0.0.1, port_value: 1}}\n"
                .to_string(),
        ],
        &[cluster("web", &["10.0.0.2:1"])],
    );
    let e = errors(&text);
    assert_has(
        &e,
        "listener \"bare\": field filter_chains: listener has no filter chains",
    );
}

#[test]
fn missing_cluster() {
    let text = doc(
        &[listener("web", "10.96.0.10:80", "nope")],
        &[cluster("web", &["10.244.1.2:8080"])],
    );
    let e = errors(&text);
    assert_eq!(
        e,
        vec!["listener \"web\": field filter_chains[0].filters[0].typed_config.cluster: cluster \"nope\" is not defined (hint: defined clusters: web)"]
    );
}

#[test]
fn cluster_without_endpoints() {
    let text = doc(
        &[listener("web", "10.96.0.10:80", "web")],
        &["  - name: web\n    connect_timeout: 1s\n    load_assignment: {cluster_name: web, endpoints: []}\n".to_string()],
    );
    assert_eq!(
        errors(&text),
        vec!["cluster \"web\": field load_assignment.endpoints: cluster has no endpoints"]
    );
    let text = doc(
        &[listener("web", "10.96.0.10:80", "web")],
        &["  - name: web\n    connect_timeout: 1s\n".to_string()],
    );
    assert_eq!(
        errors(&text),
        vec!["cluster \"web\": field load_assignment.endpoints: cluster has no endpoints"]
    );
    // An EDS cluster without a ClusterLoadAssignment (a bootstrap has none).
    let text = doc(
        &[listener("web", "10.96.0.10:80", "web")],
        &[
            "  - name: web\n    type: EDS\n    eds_cluster_config: {eds_config: {ads: {}}}\n"
                .to_string(),
        ],
    );
    let e = errors(&text);
    assert!(e[0].starts_with(
        "cluster \"web\": field eds_cluster_config: cluster has no endpoints: there is no ClusterLoadAssignment for \"web\""
    ), "{e:?}");
}

#[test]
fn duplicates() {
    let text = doc(
        &[
            listener("web", "10.96.0.10:80", "web"),
            listener("web", "10.96.0.11:80", "web"),
            listener("other", "10.96.0.10:80", "web"),
        ],
        &[
            cluster("web", &["10.244.1.2:8080"]),
            cluster("web", &["10.244.1.3:8080"]),
        ],
    );
    let e = errors(&text);
    assert_eq!(
        e,
        vec![
            "cluster \"web\": field name: duplicate cluster name",
            "listener \"web\": field name: duplicate listener name",
            "listener \"other\": field address: 10.96.0.10:80 is already captured by listener \"web\"",
        ]
    );
    // An IPv4-mapped VIP is the same kernel key as the IPv4 VIP.
    let text = doc(
        &[
            listener("a", "10.96.0.10:80", "web"),
            listener("b", "::ffff:10.96.0.10:80", "web"),
        ],
        &[cluster("web", &["10.244.1.2:8080"])],
    );
    assert_has(
        &errors(&text),
        "listener \"b\": field address: 10.96.0.10:80 is already captured by listener \"a\"",
    );
}

#[test]
fn lb_policies() {
    for (policy, abi) in [
        ("LEAST_REQUEST", kmesh_abi::LB_LEAST_REQUEST),
        ("RING_HASH", kmesh_abi::LB_MAGLEV),
        ("MAGLEV", kmesh_abi::LB_MAGLEV),
        ("RANDOM", kmesh_abi::LB_RANDOM),
    ] {
        let text = base().replace(
            "    type: STATIC\n",
            &format!("    type: STATIC\n    lb_policy: {policy}\n"),
        );
        let flat = compile_static_config(&text).unwrap();
        assert_eq!(flat.warnings, Vec::<String>::new(), "{policy}");
        let svc = flat.services.values().next().unwrap();
        assert_eq!(svc.lb_policy, abi);
        if abi == kmesh_abi::LB_MAGLEV {
            // Two endpoints: the smallest table (1021), shared evenly.
            assert_eq!(svc.slots.len(), 1021);
            let first = svc.slots.iter().filter(|a| **a == svc.slots[0]).count();
            assert!((510..=511).contains(&first), "{first}");
        }
    }
    let text = base().replace(
        "    type: STATIC\n",
        "    type: STATIC\n    lb_policy: CLUSTER_PROVIDED\n",
    );
    let flat = compile_static_config(&text).unwrap();
    assert!(flat.warnings[0]
        .ends_with("CLUSTER_PROVIDED is not implemented in the kernel yet; using ROUND_ROBIN"));
}

#[test]
fn healthy_priority_zero_takes_all_traffic() {
    let text = base().replace(
        "      endpoints:\n      - lb_endpoints:\n",
        "      endpoints:\n      - priority: 1\n        lb_endpoints:\n        - endpoint: {address: {socket_address: {address: 10.9.9.9, port_value: 1}}}\n      - lb_endpoints:\n",
    );
    let flat = compile_static_config(&text).unwrap();
    assert_eq!(flat.warnings, Vec::<String>::new());
    let svc = flat.services.values().next().unwrap();
    assert_eq!(svc.slots.len(), 2);
    assert!(svc.endpoints.iter().all(|e| e.addr.port() != 1));
}

#[test]
fn priority_load_split_becomes_slot_weights() {
    // P0: two endpoints, one unhealthy → health 50% × 1.4 = 70; P1 takes
    // the remaining 30 (Envoy's documented split), so 7 : 3 slots.
    let text = base().replace(
        "      endpoints:\n      - lb_endpoints:\n",
        "      endpoints:\n      - priority: 1\n        lb_endpoints:\n        - endpoint: {address: {socket_address: {address: 10.9.9.9, port_value: 1}}}\n      - lb_endpoints:\n",
    );
    let text = text.replace(
        "        - endpoint: {address: {socket_address: {address: \"10.244.1.3\", port_value: 8080}}}\n",
        "        - endpoint: {address: {socket_address: {address: \"10.244.1.3\", port_value: 8080}}}\n          health_status: UNHEALTHY\n",
    );
    let flat = compile_static_config(&text).unwrap();
    let svc = flat.services.values().next().unwrap();
    let w: Vec<(String, u32)> = svc
        .endpoints
        .iter()
        .map(|e| (e.addr.to_string(), e.weight))
        .collect();
    assert_eq!(
        w,
        vec![("10.244.1.2:8080".into(), 7), ("10.9.9.9:1".into(), 3)],
        "{:?}",
        flat.warnings
    );
    assert_eq!(svc.slots.len(), 10);
}

#[test]
fn circuit_breaker_max_connections() {
    let with = |cb: &str| {
        base().replace(
            "    type: STATIC\n",
            &format!("    type: STATIC\n    circuit_breakers: {cb}\n"),
        )
    };
    let flat = compile_static_config(&with("{thresholds: [{max_connections: 3}]}")).unwrap();
    let svc = flat.services.values().next().unwrap();
    assert_eq!(svc.max_connections, 3);
    assert_eq!(svc.cluster.as_deref(), Some("web"));
    assert_eq!(svc.cluster_id, xds_adapter::cluster_id("web"));
    // A threshold without max_connections: Envoy's default 1024.
    let flat = compile_static_config(&with("{thresholds: [{max_requests: 5}]}")).unwrap();
    assert_eq!(flat.services.values().next().unwrap().max_connections, 1024);
    assert_eq!(
        flat.warnings,
        vec!["cluster \"web\": field circuit_breakers.thresholds[0].max_requests: not supported by the kmesh dataplane; ignored"]
    );
    assert_has(
        &errors(&with("{thresholds: [{max_connections: 0}]}")),
        "cluster \"web\": field circuit_breakers.thresholds[0].max_connections: 0 would refuse every connection",
    );
}

#[test]
fn weights_must_be_positive() {
    let text = base().replace(
        "port_value: 8080}}}\n",
        "port_value: 8080}}}\n          load_balancing_weight: 0\n",
    );
    assert_has(
        &errors(&text),
        "cluster \"web\": field load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight: weight must be at least 1",
    );
    let text = format!(
        r#"
static_resources:
  listeners:
  - name: split
    address: {{socket_address: {{address: 10.0.0.1, port_value: 80}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP_PROXY}
          stat_prefix: split
          weighted_clusters: {{clusters: [{{name: a, weight: 0}}, {{name: a, weight: 1}}]}}
  clusters:
{}"#,
        cluster("a", &["10.1.1.1:1"])
    );
    let e = errors(&text);
    assert_eq!(
        e,
        vec![
            "listener \"split\": field filter_chains[0].filters[0].typed_config.weighted_clusters.clusters[0].weight: weight must be at least 1",
            "listener \"split\": field filter_chains[0].filters[0].typed_config.weighted_clusters.clusters[1].name: cluster \"a\" is listed twice",
        ]
    );
}

#[test]
fn all_errors_are_collected() {
    let text = doc(
        &[
            listener("a", "10.96.0.10:70000", "ok"),
            listener("b", "10.96.0.11:80", "bad"),
            listener("c", "10.96.0.12:80", "nope"),
        ],
        &[
            cluster("bad", &["not-an-ip:80"]),
            cluster("ok", &["10.0.0.1:1"]),
        ],
    );
    let e = errors(&text);
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[0].starts_with("cluster \"bad\": field load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"));
    assert_eq!(
        e[1],
        "listener \"a\": field address.socket_address.port_value: 70000 is out of range (0-65535)"
    );
    assert!(e[2].starts_with("listener \"c\": field filter_chains[0].filters[0].typed_config.cluster: cluster \"nope\" is not defined"));
    // The failed cluster is not reported again as "not defined".
    assert!(
        !e.iter().any(|m| m.contains("\"bad\" is not defined")),
        "{e:?}"
    );
    let display = compile_static_config(&text).unwrap_err().to_string();
    assert_eq!(display.lines().count(), 3);
}

fn mesh_with(listeners: Vec<Listener>, clusters: Vec<Cluster>) -> MeshConfig {
    MeshConfig {
        listeners,
        l7: Vec::new(),
        clusters: clusters.into_iter().map(|c| (c.name.clone(), c)).collect(),
        warnings: Vec::new(),
    }
}

fn ep(addr: &str, weight: u32) -> Endpoint {
    Endpoint {
        addr: addr.parse().unwrap(),
        weight,
        locality_weight: 1,
        priority: 0,
    }
}

#[test]
fn slot_map_full() {
    // 65 services of 4096 slots each do not fit in MAX_SLOTS = 262144.
    let c = Cluster {
        name: "c".into(),
        lb: LbPolicy::RoundRobin,
        endpoints: vec![ep("10.0.0.1:1", 1), ep("10.0.0.2:1", 4095)],
        max_connections: 0,
        priority_health: vec![(2, 2)],
    };
    let listeners: Vec<Listener> = (0..65u32)
        .map(|i| Listener {
            name: format!("l{i}"),
            address: SocketAddr::from(([10, 96, 0, i as u8], 80)),
            route: TcpRoute::Cluster("c".into()),
        })
        .collect();
    let e = flatten(&mesh_with(listeners.clone(), vec![c.clone()])).unwrap_err();
    assert_eq!(e.len(), 1);
    assert!(
        e.to_string().starts_with(
            "config: map full: 266240 slots asked for, the slot map holds MAX_SLOTS = 262144"
        ),
        "{e}"
    );
    let ok: FlatConfig = flatten(&mesh_with(listeners[..64].to_vec(), vec![c])).unwrap();
    assert_eq!(ok.slot_count(), 262_144);
}

#[test]
fn service_map_full() {
    let c = Cluster {
        name: "c".into(),
        lb: LbPolicy::RoundRobin,
        endpoints: vec![ep("10.0.0.1:1", 1)],
        max_connections: 0,
        priority_health: vec![(1, 1)],
    };
    let n = kmesh_abi::MAX_SERVICES + 1;
    let listeners: Vec<Listener> = (0..n)
        .map(|i| Listener {
            name: format!("l{i}"),
            address: SocketAddr::from(([10, 96, (i >> 8) as u8, i as u8], (1 + (i >> 16)) as u16)),
            route: TcpRoute::Cluster("c".into()),
        })
        .collect();
    let e = flatten(&mesh_with(listeners, vec![c])).unwrap_err();
    assert!(
        e.to_string().starts_with("config: map full: 65537 services asked for, the service map holds MAX_SERVICES = 65536"),
        "{e}"
    );
}

#[test]
fn too_many_endpoints_for_one_service() {
    let eps: Vec<Endpoint> = (0..4097u32)
        .map(|i| Endpoint {
            addr: SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)),
            weight: 1,
            locality_weight: 1,
            priority: 0,
        })
        .collect();
    let c = Cluster {
        name: "c".into(),
        lb: LbPolicy::Random,
        endpoints: eps,
        max_connections: 0,
        priority_health: vec![(4097, 4097)],
    };
    let l = Listener {
        name: "big".into(),
        address: "10.96.0.1:80".parse().unwrap(),
        route: TcpRoute::Cluster("c".into()),
    };
    let e = flatten(&mesh_with(vec![l], vec![c])).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("listener \"big\": map full: 4097 endpoints need at least 4097 slots"),
        "{e}"
    );
}

#[test]
fn hand_built_mesh_with_missing_cluster() {
    let l = Listener {
        name: "x".into(),
        address: "10.96.0.1:80".parse().unwrap(),
        route: TcpRoute::Weighted(vec![("a".into(), 1), ("b".into(), 1)]),
    };
    let e = flatten(&mesh_with(vec![l], vec![])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "listener \"x\": field route: cluster \"a\" is not defined\nlistener \"x\": field route: cluster \"b\" is not defined"
    );
    let _ = BTreeMap::<u8, u8>::new();
}
