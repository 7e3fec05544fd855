//! No panics on arbitrary or mutated input; when a config compiles, every
//! service has at least one slot and every slot is one of its endpoints.
//! Seeded, so failures reproduce.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{json, Value};
use xds_adapter::{compile_static_config, FlatConfig};

const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// xorshift64* — small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn check_invariants(flat: &FlatConfig) {
    for (vip, s) in &flat.services {
        assert_eq!(*vip, s.vip);
        assert!(!s.slots.is_empty(), "service {vip} has no slots");
        assert!(s.slots.len() <= kmesh_abi::MAX_SLOTS_PER_SERVICE as usize);
        assert!(s.lb_policy <= kmesh_abi::LB_MAGLEV);
        let mut want: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for e in &s.endpoints {
            assert!(e.weight >= 1);
            *want.entry(e.addr).or_default() += e.weight as usize;
        }
        let mut got: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for slot in &s.slots {
            assert!(
                want.contains_key(slot),
                "slot {slot} of {vip} is not an endpoint"
            );
            *got.entry(*slot).or_default() += 1;
        }
        if s.lb_policy == kmesh_abi::LB_MAGLEV {
            // A Maglev table: every endpoint owns entries, sized by weight.
            assert_eq!(got.len(), want.len(), "{vip}: an endpoint owns no entry");
        } else {
            assert_eq!(
                got, want,
                "slot counts of {vip} differ from endpoint weights"
            );
        }
    }
    assert!(flat.slot_count() <= kmesh_abi::MAX_SLOTS as usize);
}

fn filter(cluster_spec: Value) -> Value {
    let mut tc = json!({"@type": TCP_PROXY, "stat_prefix": "s"});
    for (k, v) in cluster_spec.as_object().unwrap() {
        tc[k] = v.clone();
    }
    json!({"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tc}]})
}

fn endpoint(ip: &str, port: u32, weight: Option<u32>) -> Value {
    let mut e =
        json!({"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}});
    if let Some(w) = weight {
        e["load_balancing_weight"] = json!(w);
    }
    e
}

fn base_document() -> Value {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
        "static_resources": {
            "listeners": [
                {"name": "web", "address": {"socket_address": {"address": "10.96.0.10", "port_value": 80}},
                 "filter_chains": [filter(json!({"cluster": "web"}))]},
                {"name": "split", "address": {"socket_address": {"address": "fd00::10", "port_value": 9080}},
                 "filter_chains": [filter(json!({"weighted_clusters": {"clusters": [
                     {"name": "web", "weight": 1}, {"name": "db", "weight": 3}]}}))]},
                {"name": "http", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8000}},
                 "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                   "typed_config": {"@type": HCM, "stat_prefix": "h", "route_config": {"name": "r8000",
                     "virtual_hosts": [
                       {"name": "a", "domains": ["a.default.svc.cluster.local", "10.96.0.20", "10.96.0.20:8000"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "web", "timeout": "0s"}}]},
                       {"name": "b", "domains": ["[fd00::20]:8000"],
                        "routes": [{"match": {"prefix": "/api"}, "route": {"cluster": "db"}},
                                   {"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                                       {"name": "web", "weight": 1}, {"name": "db", "weight": 1}]}}}]}]}}}]}]}
            ],
            "clusters": [
                {"name": "web", "type": "STATIC", "connect_timeout": "0.25s", "lb_policy": "ROUND_ROBIN",
                 "load_assignment": {"cluster_name": "web", "endpoints": [
                     {"lb_endpoints": [endpoint("10.244.1.2", 8080, Some(2)), endpoint("10.244.1.3", 8080, None)]},
                     {"load_balancing_weight": 3, "locality": {"zone": "b"},
                      "lb_endpoints": [endpoint("10.244.1.4", 8080, None)]}]}},
                {"name": "db", "type": "STRICT_DNS", "lb_policy": "RANDOM",
                 "load_assignment": {"cluster_name": "db", "endpoints": [
                     {"lb_endpoints": [endpoint("fd00::1:5", 5432, Some(7)), endpoint("10.244.2.2", 5432, Some(1))]}]}}
            ]
        }
    })
}

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

const KEYS: &[&str] = &[
    "route_config",
    "virtual_hosts",
    "domains",
    "routes",
    "match",
    "prefix",
    "path",
    "route",
    "headers",
    "rds",
    "name",
    "cluster",
    "weight",
    "priority",
    "load_balancing_weight",
    "loadBalancingWeight",
    "health_checks",
    "port_value",
    "portValue",
    "named_port",
    "typed_config",
    "@type",
    "weighted_clusters",
    "endpoints",
    "lb_endpoints",
    "endpoint",
    "address",
    "socket_address",
    "protocol",
    "type",
    "lb_policy",
    "filter_chains",
    "default_filter_chain",
    "filters",
    "eds_cluster_config",
    "service_name",
    "health_status",
    "tunneling_config",
    "pipe",
    "bogus",
    "listener_filters",
    "transport_socket",
    "cluster_name",
    "clusters",
    "listeners",
    "static_resources",
    "configs",
    "stat_prefix",
    "connect_timeout",
    "idle_timeout",
    "max_connect_attempts",
];

fn random_value(rng: &mut Rng) -> Value {
    let choices = [
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(-1),
        json!(3),
        json!(65535),
        json!(65536),
        json!(70000),
        json!(u32::MAX),
        json!(4_294_967_296u64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1.5),
        json!(1e300),
        json!(""),
        json!("x"),
        json!("web"),
        json!("db"),
        json!("10.0.0.1"),
        json!("::1"),
        json!("::ffff:10.96.0.10"),
        json!("0.0.0.0"),
        json!("0.25s"),
        json!("-1s"),
        json!("STATIC"),
        json!("EDS"),
        json!("LOGICAL_DNS"),
        json!("RANDOM"),
        json!("MAGLEV"),
        json!("UDP"),
        json!("UNHEALTHY"),
        json!(TCP_PROXY),
        json!("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"),
        json!([]),
        json!([1, "a", null]),
        json!({}),
        json!({"@type": TCP_PROXY, "cluster": "web"}),
        json!({"socket_address": {"address": "10.1.1.1", "port_value": 1}}),
    ];
    rng.pick(&choices).clone()
}

/// Applies one random mutation somewhere in `v`.
fn mutate(v: &mut Value, rng: &mut Rng, depth: usize) {
    let descend = depth < 12 && rng.chance(80);
    match v {
        Value::Object(m) if descend && !m.is_empty() => {
            let key = m.keys().nth(rng.below(m.len())).unwrap().clone();
            mutate(m.get_mut(&key).unwrap(), rng, depth + 1);
        }
        Value::Array(a) if descend && !a.is_empty() => {
            let i = rng.below(a.len());
            mutate(&mut a[i], rng, depth + 1);
        }
        Value::Object(m) => match rng.below(4) {
            0 if !m.is_empty() => {
                let key = m.keys().nth(rng.below(m.len())).unwrap().clone();
                m.remove(&key);
            }
            1 if !m.is_empty() => {
                let key = m.keys().nth(rng.below(m.len())).unwrap().clone();
                let val = m.remove(&key).unwrap();
                m.insert(format!("{key}x"), val);
            }
            _ => {
                let key = rng.pick(KEYS).to_string();
                m.insert(key, random_value(rng));
            }
        },
        Value::Array(a) => match rng.below(3) {
            0 if !a.is_empty() => {
                let i = rng.below(a.len());
                let dup = a[i].clone();
                a.push(dup);
            }
            1 if !a.is_empty() => {
                let i = rng.below(a.len());
                a.remove(i);
            }
            _ => a.push(random_value(rng)),
        },
        other => *other = random_value(rng),
    }
}

/// Random character-level damage to text.
fn damage_text(text: &str, rng: &mut Rng) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(3) {
        if chars.is_empty() {
            break;
        }
        let i = rng.below(chars.len());
        match rng.below(4) {
            0 => {
                let end = (i + 1 + rng.below(20)).min(chars.len());
                chars.drain(i..end);
            }
            1 => chars.insert(
                i,
                *rng.pick(&[
                    ':', '-', ' ', '\n', '{', '}', '[', ']', '"', '\'', '&', '*', '!', '#', '9',
                    'é',
                ]),
            ),
            2 => chars[i] = *rng.pick(&['0', 'x', ':', ' ', '\t', '\u{0}', '\\']),
            _ => {
                let end = (i + rng.below(40)).min(chars.len());
                let copy: Vec<char> = chars[i..end].to_vec();
                chars.splice(i..i, copy);
            }
        }
    }
    chars.into_iter().collect()
}

#[test]
fn base_document_compiles() {
    let flat = compile_static_config(&base_document().to_string()).unwrap();
    check_invariants(&flat);
    // web, split, and the HTTP virtual host "a" (10.96.0.20:8000); "b"
    // depends on the request path and is left out with a warning.
    assert_eq!(flat.services.len(), 3, "{flat:?}");
    assert!(
        flat.warnings
            .iter()
            .any(|w| w.contains("virtual host \"b\": not installed")),
        "{:?}",
        flat.warnings
    );
}

#[test]
fn mutated_documents_never_panic() {
    let base = base_document();
    let mut rng = Rng(0x5eed_0001);
    let mut compiled = 0;
    for round in 0..3000 {
        let mut doc = base.clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut doc, &mut rng, 0);
        }
        let text = if round % 3 == 0 {
            serde_yaml::to_string(&doc).unwrap()
        } else {
            doc.to_string()
        };
        if let Ok(flat) = compile_static_config(&text) {
            check_invariants(&flat);
            compiled += 1;
        }
        // The xDS path (lenient, incremental) on the same resources.
        if let Ok(res) = xds_adapter::parse_static_config(&text) {
            if let Ok(c) = xds_adapter::compile_lenient(&res.refs()) {
                check_invariants(&c.flat);
            }
            if let Ok(mut inc) = xds_adapter::Incremental::full(&res.refs()) {
                for cla in res
                    .clusters
                    .iter()
                    .filter_map(|c| c.load_assignment.as_ref())
                {
                    let users: Vec<_> = res
                        .clusters
                        .iter()
                        .filter(|c| c.name == cla.cluster_name)
                        .collect();
                    let _ = inc.update_endpoints(&users, cla);
                }
                check_invariants(&inc.compiled().flat);
            }
        }
    }
    // Some mutations are harmless; make sure the loop exercises both paths.
    assert!(compiled > 50, "only {compiled} mutated documents compiled");
    assert!(compiled < 2900, "{compiled} mutated documents compiled");
}

#[test]
fn damaged_text_never_panics() {
    let yaml = serde_yaml::to_string(&base_document()).unwrap();
    let json = serde_json::to_string_pretty(&base_document()).unwrap();
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bootstrap.yaml"
    ))
    .unwrap();
    let mut rng = Rng(0x5eed_0002);
    for round in 0..3000 {
        let src = [&yaml, &json, &sample][round % 3];
        let text = damage_text(src, &mut rng);
        if let Ok(flat) = compile_static_config(&text) {
            check_invariants(&flat);
        }
    }
    // Deep nesting is refused by the parsers' depth limits, not a stack overflow.
    let deep_yaml = format!(
        "static_resources: {}{}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(compile_static_config(&deep_yaml).is_err());
    let deep_json = format!(
        "{{\"configs\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(compile_static_config(&deep_json).is_err());
    let deep_map = format!("{}1{}", "{\"a\": ".repeat(50_000), "}".repeat(50_000));
    assert!(compile_static_config(&deep_map).is_err());
    let deep_flow = format!("{}1{}", "{a: ".repeat(50_000), "}".repeat(50_000));
    assert!(compile_static_config(&deep_flow).is_err());
    for text in [
        "",
        " ",
        "null",
        "~",
        "[]",
        "{}",
        "1",
        "\"x\"",
        "{\"configs\": 1}",
        "{\"configs\": [1, {}]}",
        "static_resources: 1",
        "static_resources: {listeners: {}}",
        "---\n---\n",
        "a: &a [*a]",
    ] {
        let _ = compile_static_config(text);
    }
}

/// Random well-formed meshes: the slots must reproduce the weights exactly
/// (unless they had to be scaled down, which is warned).
#[test]
fn random_meshes_have_exact_shares() {
    let weights = [1u32, 1, 1, 2, 3, 5, 7, 100, 4096, 65_535, u32::MAX];
    let mut rng = Rng(0x5eed_0003);
    let (mut exact, mut scaled_count) = (0, 0);
    for _ in 0..400 {
        let n_clusters = 1 + rng.below(4);
        let mut clusters = Vec::new();
        // (cluster, [(addr, weight × locality weight)])
        let mut model: BTreeMap<String, Vec<(SocketAddr, u128)>> = BTreeMap::new();
        for c in 0..n_clusters {
            let name = format!("c{c}");
            let mut localities = Vec::new();
            for l in 0..1 + rng.below(3) {
                let lw = *rng.pick(&weights);
                let mut eps = Vec::new();
                for e in 0..1 + rng.below(4) {
                    let w = *rng.pick(&weights);
                    let addr = if rng.chance(30) {
                        format!("fd00::{c}:{l}:{e}")
                    } else {
                        format!("10.{c}.{l}.{e}")
                    };
                    let port = 1000 + e as u32;
                    eps.push(endpoint(&addr, port, Some(w)));
                    let sa = SocketAddr::new(addr.parse().unwrap(), port as u16);
                    model
                        .entry(name.clone())
                        .or_default()
                        .push((sa, u128::from(w) * u128::from(lw)));
                }
                localities.push(json!({"load_balancing_weight": lw, "lb_endpoints": eps}));
            }
            clusters.push(json!({"name": name, "lb_policy": "RANDOM",
                "load_assignment": {"cluster_name": name, "endpoints": localities}}));
        }
        let mut listeners = Vec::new();
        let mut routes: BTreeMap<SocketAddr, Vec<(String, u32)>> = BTreeMap::new();
        for i in 0..1 + rng.below(3) {
            let vip: SocketAddr = format!("10.96.0.{}:80", i + 1).parse().unwrap();
            let route: Vec<(String, u32)> = if rng.chance(50) {
                vec![(format!("c{}", rng.below(n_clusters)), 1)]
            } else {
                let mut r = Vec::new();
                for c in 0..n_clusters {
                    if rng.chance(70) {
                        r.push((format!("c{c}"), *rng.pick(&weights)));
                    }
                }
                r
            };
            if route.is_empty() {
                continue;
            }
            let spec = if route.len() == 1 && route[0].1 == 1 {
                json!({"cluster": route[0].0})
            } else {
                let cs: Vec<Value> = route
                    .iter()
                    .map(|(n, w)| json!({"name": n, "weight": w}))
                    .collect();
                json!({"weighted_clusters": {"clusters": cs}})
            };
            listeners.push(json!({"name": format!("l{i}"),
                "address": {"socket_address": {"address": vip.ip().to_string(), "port_value": 80}},
                "filter_chains": [filter(spec)]}));
            routes.insert(vip, route);
        }
        let doc = json!({"static_resources": {"listeners": listeners, "clusters": clusters}});
        let flat = compile_static_config(&doc.to_string()).unwrap();
        check_invariants(&flat);
        assert_eq!(flat.services.len(), routes.len());
        for (vip, route) in &routes {
            let s = &flat.services[vip];
            let scaled = flat.warnings.iter().any(|w| {
                w.starts_with(&format!(
                    "listener \"{}\": endpoint weights need",
                    s.listener
                ))
            });
            if scaled {
                scaled_count += 1;
                continue;
            }
            exact += 1;
            // weight_i / W == cw/Σcw × w_i/S_c, cross-multiplied.
            let total_cw: u128 = route.iter().map(|(_, w)| u128::from(*w)).sum();
            let slots_total = s.slots.len() as u128;
            let mut i = 0;
            for (cluster, cw) in route {
                let eps = &model[cluster];
                let sum: u128 = eps.iter().map(|(_, w)| w).sum();
                for (addr, w) in eps {
                    let fe = &s.endpoints[i];
                    assert_eq!((&fe.cluster, fe.addr), (cluster, *addr));
                    assert_eq!(
                        u128::from(fe.weight) * total_cw * sum,
                        u128::from(*cw) * w * slots_total,
                        "share of {addr} in {cluster} behind {vip}"
                    );
                    i += 1;
                }
            }
            assert_eq!(i, s.endpoints.len());
        }
    }
    assert!(
        exact > 50 && scaled_count > 50,
        "exact {exact}, scaled {scaled_count}"
    );
}
