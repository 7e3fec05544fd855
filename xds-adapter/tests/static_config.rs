//! Static configs that compile: bootstrap YAML/JSON, lowerCamelCase names,
//! config_dump, IPv6, and the exact slots they produce.

use std::net::SocketAddr;

use serde_json::Value;
use xds_adapter::{
    compile_static_config, flatten, model, parse_static_config, FlatConfig, MeshConfig,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// Two listeners, three clusters: a plain cluster with endpoint weights and
/// a 3:1 weighted split over two clusters with locality weights.
const MESH_YAML: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 15000}}
static_resources:
  listeners:
  - name: web
    address:
      socket_address: {address: 10.96.0.10, port_value: 80}
    filter_chains:
    - name: web-chain
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: web
          cluster: web
  - name: reviews
    stat_prefix: reviews_listener
    address:
      socket_address: {address: 10.96.0.20, port_value: 9080, protocol: TCP}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: reviews
          idle_timeout: 30s
          max_connect_attempts: 2
          weighted_clusters:
            clusters:
            - name: reviews-v1
              weight: 3
            - name: reviews-v2
              weight: 1
  clusters:
  - name: web
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 10.244.1.2, port_value: 8080}}}
          load_balancing_weight: 2
        - endpoint: {address: {socket_address: {address: 10.244.1.3, port_value: 8080}}}
  - name: reviews-v1
    type: STRICT_DNS
    connect_timeout: 1s
    lb_policy: RANDOM
    load_assignment:
      cluster_name: reviews-v1
      endpoints:
      - locality: {region: eu, zone: a}
        load_balancing_weight: 2
        lb_endpoints:
        - endpoint: {address: {socket_address: {address: 10.244.2.1, port_value: 9080}}}
      - locality: {region: eu, zone: b}
        priority: 0
        lb_endpoints:
        - endpoint: {address: {socket_address: {address: 10.244.2.2, port_value: 9080}}}
  - name: reviews-v2
    lb_policy: RANDOM
    load_assignment:
      cluster_name: reviews-v2
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 10.244.3.1, port_value: 9080}}}
          load_balancing_weight: 5
        - endpoint: {address: {socket_address: {address: 10.244.3.2, port_value: 9080}}}
          load_balancing_weight: 5
"#;

fn check_mesh(flat: &FlatConfig) {
    assert_eq!(flat.warnings, Vec::<String>::new());
    assert_eq!(flat.services.len(), 2);

    let web = &flat.services[&sa("10.96.0.10:80")];
    assert_eq!(web.listener, "web");
    assert_eq!(web.vip, sa("10.96.0.10:80"));
    assert_eq!(web.lb_policy, kmesh_abi::LB_ROUND_ROBIN);
    let w: Vec<(&str, SocketAddr, u32)> = web
        .endpoints
        .iter()
        .map(|e| (e.cluster.as_str(), e.addr, e.weight))
        .collect();
    assert_eq!(
        w,
        vec![
            ("web", sa("10.244.1.2:8080"), 2),
            ("web", sa("10.244.1.3:8080"), 1)
        ]
    );
    assert_eq!(
        web.slots,
        vec![
            sa("10.244.1.2:8080"),
            sa("10.244.1.3:8080"),
            sa("10.244.1.2:8080")
        ]
    );

    // reviews-v1 gets 3/4: its endpoints 2:1 (locality weights) → 1/2, 1/4;
    // reviews-v2 gets 1/4: its endpoints 5:5 → 1/8 each. In eighths: 4,2,1,1.
    let reviews = &flat.services[&sa("10.96.0.20:9080")];
    assert_eq!(reviews.lb_policy, kmesh_abi::LB_RANDOM);
    let w: Vec<(&str, SocketAddr, u32)> = reviews
        .endpoints
        .iter()
        .map(|e| (e.cluster.as_str(), e.addr, e.weight))
        .collect();
    assert_eq!(
        w,
        vec![
            ("reviews-v1", sa("10.244.2.1:9080"), 4),
            ("reviews-v1", sa("10.244.2.2:9080"), 2),
            ("reviews-v2", sa("10.244.3.1:9080"), 1),
            ("reviews-v2", sa("10.244.3.2:9080"), 1),
        ]
    );
    let a = sa("10.244.2.1:9080");
    let b = sa("10.244.2.2:9080");
    let c = sa("10.244.3.1:9080");
    let d = sa("10.244.3.2:9080");
    assert_eq!(reviews.slots, vec![a, b, c, d, a, b, a, a]);
    assert_eq!(flat.slot_count(), 11);
}

#[test]
fn bootstrap_yaml_two_listeners_three_clusters() {
    let flat = compile_static_config(MESH_YAML).unwrap();
    check_mesh(&flat);
}

#[test]
fn model_of_the_bootstrap() {
    let r = parse_static_config(MESH_YAML).unwrap();
    assert_eq!(
        (
            r.listeners.len(),
            r.clusters.len(),
            r.load_assignments.len()
        ),
        (2, 3, 0)
    );
    // The filter config travels as an Any, as it would over xDS.
    let filter = &r.listeners[0].filter_chains[0].filters[0];
    match &filter.config_type {
        Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
            any,
        )) => {
            assert_eq!(any.type_url, TCP_PROXY);
            assert!(!any.value.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let mesh = MeshConfig::from_resources(&r).unwrap();
    assert_eq!(
        mesh.listeners[1].route,
        model::TcpRoute::Weighted(vec![("reviews-v1".into(), 3), ("reviews-v2".into(), 1)])
    );
    assert_eq!(
        mesh.listeners[0].route,
        model::TcpRoute::Cluster("web".into())
    );
    let v1 = &mesh.clusters["reviews-v1"];
    assert_eq!(v1.lb, model::LbPolicy::Random);
    assert_eq!(
        v1.endpoints[0],
        model::Endpoint {
            addr: sa("10.244.2.1:9080"),
            weight: 1,
            locality_weight: 2,
            priority: 0
        }
    );
    check_mesh(&flatten(&mesh).unwrap());
}

#[test]
fn same_config_as_json() {
    let v: Value = serde_yaml::from_str(MESH_YAML).unwrap();
    let json = serde_json::to_string_pretty(&v).unwrap();
    assert!(json.starts_with('{'));
    let flat = compile_static_config(&json).unwrap();
    check_mesh(&flat);
    assert_eq!(flat, compile_static_config(MESH_YAML).unwrap());
}

fn camel(s: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in s.chars() {
        match c {
            '_' => up = true,
            c if up => {
                out.push(c.to_ascii_uppercase());
                up = false;
            }
            c => out.push(c),
        }
    }
    out
}

fn camel_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (camel(&k), camel_keys(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(camel_keys).collect()),
        other => other,
    }
}

#[test]
fn lower_camel_case_names() {
    let v: Value = serde_yaml::from_str(MESH_YAML).unwrap();
    let camel = camel_keys(v);
    let text = serde_json::to_string(&camel).unwrap();
    assert!(text.contains("\"staticResources\"") && text.contains("\"portValue\""));
    assert!(text.contains("\"loadBalancingWeight\"") && text.contains("\"weightedClusters\""));
    check_mesh(&compile_static_config(&text).unwrap());

    // Mixed spellings in one hand-written YAML document.
    let yaml = format!(
        r#"
staticResources:
  listeners:
  - name: l
    address: {{socketAddress: {{address: 10.0.0.1, portValue: 80}}}}
    filterChains:
    - filters:
      - name: tcp
        typedConfig: {{"@type": "{TCP_PROXY}", statPrefix: s, cluster: c}}
  clusters:
  - name: c
    connectTimeout: 2s
    lbPolicy: RANDOM
    loadAssignment:
      clusterName: c
      endpoints:
      - loadBalancingWeight: 1
        lbEndpoints:
        - endpoint: {{address: {{socket_address: {{address: 10.1.0.1, port_value: 80}}}}}}
          loadBalancingWeight: 3
"#
    );
    let flat = compile_static_config(&yaml).unwrap();
    let s = &flat.services[&sa("10.0.0.1:80")];
    assert_eq!(s.lb_policy, kmesh_abi::LB_RANDOM);
    // A single endpoint needs one slot whatever its weight.
    assert_eq!(s.slots, vec![sa("10.1.0.1:80")]);
    assert_eq!(s.endpoints[0].weight, 1);
}

#[test]
fn sample_file() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bootstrap.yaml"
    ))
    .unwrap();
    let flat = compile_static_config(&text).unwrap();
    assert!(flat.warnings.is_empty(), "{:?}", flat.warnings);
    let s = &flat.services[&sa("10.96.0.10:80")];
    assert_eq!(s.listener, "reviews");
    assert_eq!(s.lb_policy, kmesh_abi::LB_ROUND_ROBIN);
    assert_eq!(
        s.slots,
        vec![
            sa("10.244.1.2:8080"),
            sa("10.244.1.3:8080"),
            sa("10.244.1.4:8080")
        ]
    );
    assert!(s
        .endpoints
        .iter()
        .all(|e| e.weight == 1 && e.cluster == "reviews"));
}

const CONFIG_DUMP: &str = r#"{
 "configs": [
  {
   "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
   "bootstrap": {"node": {"id": "sidecar"}, "static_resources": {"listeners": [{"name": "ignored here"}]}},
   "last_updated": "2024-05-01T10:00:00.000Z"
  },
  {
   "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
   "version_info": "7",
   "static_listeners": [
    {
     "listener": {
      "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
      "name": "db",
      "address": {"socket_address": {"address": "10.96.5.5", "port_value": 5432}},
      "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                         "stat_prefix": "db", "cluster": "db"}}]}]
     },
     "last_updated": "2024-05-01T10:00:00.000Z"
    }
   ],
   "dynamic_listeners": [
    {
     "name": "ratings",
     "active_state": {
      "version_info": "7",
      "listener": {
       "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
       "name": "ratings",
       "address": {"socketAddress": {"address": "10.96.6.6", "portValue": 9080}},
       "filterChains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy",
         "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                         "statPrefix": "ratings", "cluster": "outbound|9080||ratings"}}]}],
       "trafficDirection": "OUTBOUND"
      },
      "last_updated": "2024-05-01T10:00:01.000Z"
     }
    },
    {
     "name": "still-warming",
     "warming_state": {"version_info": "8", "listener": {"name": "still-warming"}}
    }
   ]
  },
  {
   "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
   "version_info": "7",
   "static_clusters": [
    {
     "cluster": {
      "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
      "name": "db",
      "type": "STATIC",
      "connect_timeout": "5s",
      "load_assignment": {"cluster_name": "db", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "10.244.9.9", "port_value": 5432}}}}]}]}
     },
     "last_updated": "2024-05-01T10:00:00.000Z"
    }
   ],
   "dynamic_active_clusters": [
    {
     "version_info": "7",
     "cluster": {
      "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
      "name": "outbound|9080||ratings",
      "type": "EDS",
      "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"},
                             "service_name": "outbound|9080||ratings.default.svc.cluster.local"},
      "connect_timeout": "10s",
      "lb_policy": "LEAST_REQUEST"
     },
     "last_updated": "2024-05-01T10:00:01.000Z"
    }
   ]
  },
  {
   "@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
   "static_endpoint_configs": [
    {"endpoint_config": {
      "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
      "cluster_name": "db",
      "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.244.9.9", "port_value": 5432}}}}]}]}}
   ],
   "dynamic_endpoint_configs": [
    {
     "version_info": "7",
     "endpoint_config": {
      "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
      "cluster_name": "outbound|9080||ratings.default.svc.cluster.local",
      "endpoints": [
       {"locality": {"region": "r1", "zone": "z1"},
        "lb_endpoints": [
         {"endpoint": {"address": {"socket_address": {"address": "10.244.4.1", "port_value": 9080}}},
          "health_status": "HEALTHY", "load_balancing_weight": 1},
         {"endpoint": {"address": {"socket_address": {"address": "10.244.4.2", "port_value": 9080}}},
          "health_status": "UNHEALTHY", "load_balancing_weight": 1},
         {"endpoint": {"address": {"socket_address": {"address": "10.244.4.3", "port_value": 9080}}},
          "load_balancing_weight": 1}
        ],
        "load_balancing_weight": 2}
      ]
     },
     "last_updated": "2024-05-01T10:00:01.000Z"
    }
   ]
  },
  {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "static_route_configs": []}
 ]
}"#;

#[test]
fn config_dump() {
    let r = parse_static_config(CONFIG_DUMP).unwrap();
    assert_eq!(r.listeners.len(), 2, "the warming listener is not active");
    assert_eq!(r.clusters.len(), 2);
    assert_eq!(r.load_assignments.len(), 2);

    let flat = compile_static_config(CONFIG_DUMP).unwrap();
    let db = &flat.services[&sa("10.96.5.5:5432")];
    assert_eq!(db.slots, vec![sa("10.244.9.9:5432")]);
    let ratings = &flat.services[&sa("10.96.6.6:9080")];
    assert_eq!(ratings.listener, "ratings");
    assert_eq!(ratings.lb_policy, kmesh_abi::LB_LEAST_REQUEST);
    assert_eq!(
        ratings.slots,
        vec![sa("10.244.4.1:9080"), sa("10.244.4.3:9080")]
    );
    assert!(ratings
        .endpoints
        .iter()
        .all(|e| e.cluster == "outbound|9080||ratings"));
    assert_eq!(
        flat.warnings,
        vec![
            "cluster_load_assignment \"outbound|9080||ratings.default.svc.cluster.local\": field endpoints[0].lb_endpoints[1].health_status: endpoint 10.244.4.2:9080 is UNHEALTHY; not used".to_string(),
        ]
    );
}

#[test]
fn ipv6_listener_and_endpoints() {
    let yaml = format!(
        r#"
static_resources:
  listeners:
  - name: v6
    address: {{socket_address: {{address: "fd00:10:96::a", port_value: 443}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": "{TCP_PROXY}", stat_prefix: v6, cluster: v6}}
  - name: mapped
    address: {{socket_address: {{address: "::ffff:10.96.0.99", port_value: 443}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": "{TCP_PROXY}", stat_prefix: m, cluster: v6}}
  clusters:
  - name: v6
    load_assignment:
      cluster_name: v6
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: "fd00:10:244:1::2", port_value: 8443}}}}}}
        - endpoint: {{address: {{socket_address: {{address: "fd00:10:244:1::3", port_value: 8443}}}}}}
          load_balancing_weight: 3
"#
    );
    let flat = compile_static_config(&yaml).unwrap();
    let s = &flat.services[&sa("[fd00:10:96::a]:443")];
    let a = sa("[fd00:10:244:1::2]:8443");
    let b = sa("[fd00:10:244:1::3]:8443");
    assert_eq!(s.slots, vec![a, b, b, b]);
    // The IPv4-mapped VIP is stored as the IPv4 address (same kernel key).
    let m = &flat.services[&sa("10.96.0.99:443")];
    assert_eq!(m.listener, "mapped");
    let k = xds_adapter::addr::to_abi(m.vip);
    assert_eq!(k.family, kmesh_abi::FAMILY_V4);
    assert_eq!(
        xds_adapter::addr::to_abi(s.vip).family,
        kmesh_abi::FAMILY_V6
    );
}

#[test]
fn flattening_is_deterministic() {
    let a = compile_static_config(MESH_YAML).unwrap();
    for _ in 0..5 {
        let b = compile_static_config(MESH_YAML).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    }
    let dump_a = serde_json::to_value(compile_static_config(CONFIG_DUMP).unwrap()).unwrap();
    let dump_b = serde_json::to_value(compile_static_config(CONFIG_DUMP).unwrap()).unwrap();
    assert_eq!(dump_a, dump_b);
    // Services serialize keyed by "ip:port".
    assert!(dump_a["services"]["10.96.5.5:5432"]["slots"].is_array());
}

#[test]
fn weights_beyond_the_slot_limit_are_scaled() {
    let yaml = format!(
        r#"
static_resources:
  listeners:
  - name: big
    address: {{socket_address: {{address: 10.96.0.1, port_value: 80}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": "{TCP_PROXY}", stat_prefix: big, cluster: big}}
  clusters:
  - name: big
    load_assignment:
      cluster_name: big
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 10.0.0.1, port_value: 80}}}}}}
          load_balancing_weight: 1
        - endpoint: {{address: {{socket_address: {{address: 10.0.0.2, port_value: 80}}}}}}
          load_balancing_weight: 10000
        - endpoint: {{address: {{socket_address: {{address: 10.0.0.3, port_value: 80}}}}}}
          load_balancing_weight: 5000
"#
    );
    let flat = compile_static_config(&yaml).unwrap();
    let s = &flat.services[&sa("10.96.0.1:80")];
    let counts: Vec<u32> = s.endpoints.iter().map(|e| e.weight).collect();
    assert_eq!(counts.iter().sum::<u32>() as usize, s.slots.len());
    assert!(s.slots.len() <= kmesh_abi::MAX_SLOTS_PER_SERVICE as usize);
    assert_eq!(counts[0], 1, "every endpoint keeps a slot");
    assert!(counts[1].abs_diff(2 * counts[2]) <= 1, "{counts:?}");
    assert_eq!(flat.warnings.len(), 1);
    assert!(
        flat.warnings[0].starts_with("listener \"big\": endpoint weights need 15001 slots, more than MAX_SLOTS_PER_SERVICE = 4096; scaled down to"),
        "{}",
        flat.warnings[0]
    );
    // Interleaved: the first three slots are the three endpoints.
    assert_eq!(
        &s.slots[..3],
        &[sa("10.0.0.1:80"), sa("10.0.0.2:80"), sa("10.0.0.3:80")]
    );
}
