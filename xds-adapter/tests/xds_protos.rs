//! Resources built as protobuf messages, the way they arrive over xDS.

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, Address, HealthStatus, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::{Message, Name};
use xds_adapter::{flatten, model, MeshConfig, Resources};

fn addr(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn tcp_listener(name: &str, ip: &str, port: u32, cluster: &str) -> Listener {
    let tp = TcpProxy {
        stat_prefix: name.into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    Listener {
        name: name.into(),
        address: Some(addr(ip, port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(Any {
                    type_url: TcpProxy::type_url(),
                    value: tp.encode_to_vec(),
                })),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn lb_endpoint(ip: &str, port: u32, weight: Option<u32>) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(addr(ip, port)),
            ..Default::default()
        })),
        load_balancing_weight: weight.map(|value| UInt32Value { value }),
        ..Default::default()
    }
}

fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig::default()),
        ..Default::default()
    }
}

#[test]
fn try_from_listener() {
    let l = tcp_listener("web", "10.96.0.10", 80, "web");
    let m = model::Listener::try_from(&l).unwrap();
    assert_eq!(m.address, "10.96.0.10:80".parse().unwrap());
    assert_eq!(m.route, model::TcpRoute::Cluster("web".into()));

    let mut bad = l.clone();
    bad.filter_chains[0].filters[0].config_type = Some(filter::ConfigType::TypedConfig(Any {
        type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into(),
        value: vec![],
    }));
    bad.address = Some(addr("10.96.0.10", 70000));
    let e = model::Listener::try_from(&bad).unwrap_err();
    assert_eq!(e.len(), 2, "{e}");
    assert_eq!(
        e.0[0].to_string(),
        "listener \"web\": field address.socket_address.port_value: 70000 is out of range (0-65535)"
    );
    assert_eq!(e.0[1].field, "filter_chains[0].filters[0].typed_config");
    assert!(e.0[1]
        .message
        .contains("http_connection_manager has neither rds nor route_config"));
}

#[test]
fn eds_from_resources() {
    let cla = ClusterLoadAssignment {
        cluster_name: "ratings".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![
                lb_endpoint("10.244.4.1", 9080, Some(2)),
                lb_endpoint("10.244.4.2", 9080, None),
                LbEndpoint {
                    health_status: HealthStatus::Draining as i32,
                    ..lb_endpoint("10.244.4.3", 9080, None)
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut c = eds_cluster("ratings");
    c.outlier_detection = Some(OutlierDetection::default());
    // On its own, an EDS cluster has no endpoints.
    let e = model::Cluster::try_from(&c).unwrap_err();
    assert!(e.to_string().starts_with(
        "cluster \"ratings\": field eds_cluster_config: cluster has no endpoints: there is no ClusterLoadAssignment for \"ratings\""
    ));

    let r = Resources {
        listeners: vec![tcp_listener("ratings", "fd00::6", 9080, "ratings")],
        clusters: vec![c],
        load_assignments: vec![cla],
        ..Default::default()
    };
    let mesh = MeshConfig::from_resources(&r).unwrap();
    assert_eq!(
        mesh.warnings,
        vec![
            "cluster \"ratings\": field outlier_detection: not supported by the kmesh dataplane; ignored",
            "cluster_load_assignment \"ratings\": field endpoints[0].lb_endpoints[2].health_status: endpoint 10.244.4.3:9080 is DRAINING; not used",
        ]
    );
    let flat = flatten(&mesh).unwrap();
    let s = &flat.services[&"[fd00::6]:9080".parse().unwrap()];
    let a = "10.244.4.1:9080".parse().unwrap();
    let b = "10.244.4.2:9080".parse().unwrap();
    assert_eq!(s.slots, vec![a, b, a]);
    assert_eq!(flat.warnings, mesh.warnings);
}

#[test]
fn cross_resource_checks() {
    let r = Resources {
        listeners: vec![tcp_listener("a", "10.0.0.1", 80, "missing")],
        clusters: vec![eds_cluster("e")],
        load_assignments: vec![
            ClusterLoadAssignment {
                cluster_name: "orphan".into(),
                ..Default::default()
            },
            ClusterLoadAssignment::default(),
        ],
        ..Default::default()
    };
    let e = MeshConfig::from_resources(&r).unwrap_err();
    let lines: Vec<String> = e.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        lines[0],
        "cluster_load_assignment (unnamed): field cluster_name: ClusterLoadAssignment has no cluster_name"
    );
    assert!(
        lines[1].starts_with("cluster \"e\": field eds_cluster_config: cluster has no endpoints")
    );
    assert!(lines[2].starts_with(
        "listener \"a\": field filter_chains[0].filters[0].typed_config.cluster: cluster \"missing\" is not defined"
    ));
}

#[test]
fn unused_resources_are_warned() {
    let static_cluster = Cluster {
        name: "s".into(),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: "s".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![lb_endpoint("10.1.0.1", 1, None)],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = Resources {
        listeners: vec![],
        clusters: vec![static_cluster],
        load_assignments: vec![ClusterLoadAssignment {
            cluster_name: "orphan".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mesh = MeshConfig::from_resources(&r).unwrap();
    assert_eq!(
        mesh.warnings,
        vec![
            "cluster_load_assignment \"orphan\": no EDS cluster uses this ClusterLoadAssignment; ignored",
            "cluster \"s\": not used by any listener",
        ]
    );
    assert!(flatten(&mesh).unwrap().services.is_empty());
}

#[test]
fn lenient_compile_leaves_out_what_cannot_be_installed_and_incremental_matches_full() {
    let mut r = Resources {
        listeners: vec![
            tcp_listener("a", "10.0.0.1", 80, "a"),
            tcp_listener("b", "10.0.0.2", 80, "b"),
            tcp_listener("c", "10.0.0.3", 80, "missing"),
        ],
        clusters: vec![eds_cluster("a"), eds_cluster("b")],
        load_assignments: vec![ClusterLoadAssignment {
            cluster_name: "a".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![lb_endpoint("10.244.0.1", 80, None)],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    // "b" waits for its endpoints (EDS warming), "c" routes to nothing.
    let c = xds_adapter::compile_lenient(&r.refs()).unwrap();
    assert_eq!(c.flat.services.len(), 1);
    let why: Vec<String> = c.excluded.iter().map(ToString::to_string).collect();
    assert!(
        why.iter()
            .any(|m| m
                .starts_with("cluster \"b\": field eds_cluster_config: cluster has no endpoints")),
        "{why:?}"
    );
    assert!(
        why.iter()
            .any(|m| m.contains("listener \"b\"") && m.contains("not usable")),
        "{why:?}"
    );
    assert!(
        why.iter()
            .any(|m| m.contains("cluster \"missing\" is not defined")),
        "{why:?}"
    );

    // An endpoint added to "a": the incremental update equals a full compile.
    let mut inc = xds_adapter::Incremental::full(&r.refs()).unwrap();
    r.load_assignments[0].endpoints[0]
        .lb_endpoints
        .push(lb_endpoint("10.244.0.2", 80, Some(3)));
    let eds = |n: &str| xds_adapter::Changes {
        load_assignments: vec![n.into()],
        ..Default::default()
    };
    let vips = inc.update(&r, &eds("a")).unwrap();
    assert_eq!(vips, vec!["10.0.0.1:80".parse().unwrap()]);
    let full = xds_adapter::compile_lenient(&r.refs()).unwrap();
    assert_eq!(inc.compiled().flat.services, full.flat.services);
    // "b"'s endpoints arrive: its listener is rebuilt and installs.
    r.load_assignments.push(ClusterLoadAssignment {
        cluster_name: "b".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![lb_endpoint("10.244.0.9", 80, None)],
            ..Default::default()
        }],
        ..Default::default()
    });
    let vips = inc.update(&r, &eds("b")).unwrap();
    assert_eq!(vips, vec!["10.0.0.2:80".parse().unwrap()]);
    let full = xds_adapter::compile_lenient(&r.refs()).unwrap();
    assert_eq!(inc.compiled().flat.services, full.flat.services);
    assert!(!inc
        .compiled()
        .excluded
        .iter()
        .any(|e| e.to_string().contains("listener \"b\"")));
    // Listener "c" removed: its (never installed) VIP stays absent;
    // listener "a" removed: its VIP is listed for removal.
    r.listeners.retain(|l| l.name != "a");
    let vips = inc
        .update(
            &r,
            &xds_adapter::Changes {
                listeners: vec!["a".into()],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(vips, vec!["10.0.0.1:80".parse().unwrap()]);
    assert!(!inc
        .compiled()
        .flat
        .services
        .contains_key(&"10.0.0.1:80".parse().unwrap()));
}

#[test]
fn per_resource_checks_name_the_resource() {
    let mut l = tcp_listener("web", "10.0.0.1", 80, "web");
    l.filter_chains.clear();
    let e = xds_adapter::check_listener(&l).unwrap_err();
    assert_eq!(
        e.to_string(),
        "listener \"web\": field filter_chains: listener has no filter chains (hint: add a filter chain with an envoy.filters.network.tcp_proxy or http_connection_manager filter)"
    );
    // An EDS cluster is fine on its own; its endpoints come later.
    assert!(xds_adapter::check_cluster(&eds_cluster("web")).is_ok());
    // An assignment with no endpoints is valid (no ready pods).
    assert!(xds_adapter::check_load_assignment(&ClusterLoadAssignment {
        cluster_name: "web".into(),
        ..Default::default()
    })
    .is_ok());
}
