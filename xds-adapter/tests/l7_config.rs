//! Request-dependent HTTP route configurations compile into per-request
//! route tables (decided by the kernel's sk_msg program and the
//! connector); what the tables cannot express leaves the listener alone.

use std::net::SocketAddr;

use xds_adapter::l7::{HeaderTest, Outcome, PathMatch, Request};
use xds_adapter::model::TcpRoute;

fn config(routes: &str) -> String {
    let cluster = |name: &str, ip: &str| {
        format!(
            "  - name: {name}\n    connect_timeout: 1s\n    type: STATIC\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: \"{ip}\", port_value: 8080 }} }} }}\n"
        )
    };
    format!(
        "static_resources:\n  listeners:\n  - name: reviews\n    address: {{ socket_address: {{ address: \"10.96.0.20\", port_value: 80 }} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: reviews\n          http_filters: [{{ name: envoy.filters.http.router, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }}]\n          route_config:\n            name: reviews\n            virtual_hosts:\n            - name: reviews\n              domains: [\"reviews\", \"Reviews:80\"]\n              routes:\n{routes}  clusters:\n{}{}{}",
        cluster("v1", "10.244.0.3"),
        cluster("v2", "10.244.0.4"),
        cluster("api", "10.244.0.5"),
    )
}

const ROUTES: &str = "              - match: { prefix: \"/\", headers: [{ name: End-User, string_match: { exact: jason } }] }\n                route: { cluster: v2 }\n              - match: { path_separated_prefix: \"/api\", query_parameters: [{ name: probe, string_match: { exact: \"1\" } }] }\n                route: { cluster: api }\n              - match: { prefix: \"/canary\", headers: [{ name: x-canary, present_match: true, invert_match: true }] }\n                route: { weighted_clusters: { clusters: [{ name: v1, weight: 90 }, { name: v2, weight: 10 }] } }\n              - match: { prefix: \"/\" }\n                route: { cluster: v1 }\n";

#[test]
fn request_dependent_routes_become_a_per_request_table() {
    let flat = xds_adapter::compile_static_config(&config(ROUTES)).unwrap();
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    assert!(flat.services.is_empty(), "not an L4 service any more");
    assert_eq!(flat.l7.len(), 1);
    let l7 = &flat.l7[0];
    assert_eq!((l7.listener.as_str(), l7.vip), ("reviews", vip));
    let vh = &l7.table.vhosts[0];
    assert_eq!(vh.domains, ["reviews", "reviews:80"]);
    assert_eq!(vh.routes.len(), 4);
    assert_eq!(vh.routes[0].headers[0].name, "end-user");
    assert_eq!(
        vh.routes[0].headers[0].test,
        HeaderTest::Exact("jason".into())
    );
    assert_eq!(vh.routes[1].path, PathMatch::Separated("/api".into()));
    assert_eq!(vh.routes[1].query[0].value.as_deref(), Some("1"));
    assert!(vh.routes[2].headers[0].invert);
    assert_eq!(
        vh.routes[2].action,
        TcpRoute::Weighted(vec![("v1".into(), 90), ("v2".into(), 10)])
    );
    // Every cluster the table names has its slots.
    assert_eq!(l7.clusters["v1"], ["10.244.0.3:8080".parse().unwrap()]);
    assert_eq!(l7.clusters["v2"], ["10.244.0.4:8080".parse().unwrap()]);
    assert_eq!(l7.clusters["api"], ["10.244.0.5:8080".parse().unwrap()]);
    let req = Request {
        host: "reviews",
        target: "/x",
        headers: vec![("end-user", "jason")],
    };
    assert!(matches!(
        l7.table.route(&req),
        Outcome::Route { route: 0, action: TcpRoute::Cluster(c), .. } if c == "v2"
    ));
}

#[test]
fn what_the_tables_cannot_express_leaves_the_listener_alone() {
    for (bad, field) in [
        (
            "              - match: { safe_regex: { regex: \"/a.*\" } }\n                route: { cluster: v2 }\n",
            "virtual_hosts[0].routes[0].match.safe_regex: a regex path is not supported",
        ),
        (
            "              - match: { prefix: \"/\", headers: [{ name: x, string_match: { suffix: a } }] }\n                route: { cluster: v2 }\n",
            "virtual_hosts[0].routes[0].match.headers[0]: string_match: only exact and prefix",
        ),
        (
            "              - match: { prefix: \"/\", headers: [{ name: \":method\", exact_match: GET }] }\n                route: { cluster: v2 }\n",
            "pseudo-header \":method\"",
        ),
        (
            "              - match: { prefix: \"/a\", case_sensitive: false }\n                route: { cluster: v2 }\n",
            "case_sensitive: case-insensitive path matching",
        ),
    ] {
        let text = config(&format!(
            "{bad}              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: v1 }}\n"
        ));
        let flat = xds_adapter::compile_static_config(&text).unwrap();
        assert!(flat.services.is_empty() && flat.l7.is_empty(), "{bad}");
        assert!(
            flat.warnings.iter().any(|w| w.starts_with("listener \"reviews\"")
                && w.contains("not installed, connects to 10.96.0.20:80 are left alone")
                && w.contains(field)),
            "{field}: {:?}",
            flat.warnings
        );
    }
    // More routes than the kernel evaluates per virtual host.
    let many: String = (0..17)
        .map(|i| format!("              - match: {{ prefix: \"/p{i}\" }}\n                route: {{ cluster: v2 }}\n"))
        .collect();
    let flat = xds_adapter::compile_static_config(&config(&many)).unwrap();
    assert!(flat.l7.is_empty());
    assert!(
        flat.warnings
            .iter()
            .any(|w| w.contains("virtual_hosts[0].routes: 17 routes")),
        "{:?}",
        flat.warnings
    );
}
