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
                let ch = xds_adapter::Changes {
                    clusters: res.clusters.iter().map(|c| c.name.clone()).collect(),
                    listeners: res.listeners.iter().map(|l| l.name.clone()).collect(),
                    ..Default::default()
                };
                if inc.update(&res, &ch).is_some() {
                    check_invariants(&inc.compiled().flat);
                    let full = xds_adapter::compile_lenient(&res.refs()).unwrap();
                    assert_eq!(inc.compiled().flat.services, full.flat.services);
                }
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

/// Random listeners with several filter chains (the shapes Istiod sends):
/// a destination is installed only if every chain Envoy could pick for it,
/// whatever the connection's first bytes, sends to the installed cluster;
/// and when they all agree on one cluster, it is installed. The oracle
/// below is written from Envoy's selection rules, independently of the
/// adapter's.
/// A random filter chain: (destination_port, prefix range, has a
/// server_names condition, cluster).
type Chain = (Option<u32>, Option<(&'static str, u32)>, bool, &'static str);

#[test]
fn matched_chains_never_route_where_envoy_might_not() {
    const PORT: u32 = 7000;
    let clusters = ["c0", "c1", "c2", "pass"];
    let prefixes: [Option<(&str, u32)>; 5] = [
        Some(("10.0.0.1", 32)),
        Some(("10.0.0.2", 32)),
        Some(("10.0.0.0", 24)),
        Some(("10.0.0.0", 8)),
        None,
    ];
    let dests = ["10.0.0.1", "10.0.0.2"];
    let mut rng = Rng(0x5eed_c4a1);
    let mut installed_total = 0;
    let mut left_total = 0;
    for _ in 0..2000 {
        // (port, prefix, opaque condition, cluster)
        let n = 1 + rng.below(5);
        let mut chains: Vec<Chain> = Vec::new();
        for _ in 0..n {
            let port = match rng.below(4) {
                0 => Some(PORT),
                1 => Some(PORT + 1),
                _ => None,
            };
            chains.push((
                port,
                *rng.pick(&prefixes),
                rng.chance(30),
                *rng.pick(&clusters),
            ));
        }
        let default = rng.chance(70).then(|| *rng.pick(&clusters));
        let chain_json = |c: &Chain| {
            let mut m = serde_json::Map::new();
            if let Some(p) = c.0 {
                m.insert("destination_port".into(), json!(p));
            }
            if let Some((ip, len)) = c.1 {
                m.insert(
                    "prefix_ranges".into(),
                    json!([{"address_prefix": ip, "prefix_len": len}]),
                );
            }
            if c.2 {
                m.insert("server_names".into(), json!(["a.example.com"]));
            }
            let mut chain = filter(json!({"cluster": c.3}));
            chain["filter_chain_match"] = Value::Object(m);
            chain
        };
        let mut listener = json!({
            "name": "l",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": PORT}},
            "filter_chains": chains.iter().map(chain_json).collect::<Vec<_>>(),
        });
        if let Some(c) = default {
            listener["default_filter_chain"] = filter(json!({"cluster": c}));
        }
        let mut cl: Vec<Value> = (0..3)
            .map(|i| {
                json!({"name": format!("c{i}"), "type": "STATIC", "load_assignment": {"cluster_name": format!("c{i}"),
                    "endpoints": [{"lb_endpoints": [endpoint(&format!("10.1.0.{}", i + 1), 80, None)]}]}})
            })
            .collect();
        cl.push(json!({"name": "pass", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}));
        let doc = json!({"static_resources": {"listeners": [listener], "clusters": cl}});
        let res = xds_adapter::parse_static_config(&doc.to_string()).expect("parses");
        let c = xds_adapter::compile_lenient(&res.refs()).expect("compiles");
        check_invariants(&c.flat);

        for d in dests {
            let ip: std::net::Ipv4Addr = d.parse().unwrap();
            let contains = |p: Option<(&str, u32)>| -> Option<u32> {
                match p {
                    None => Some(0),
                    Some((net, len)) => {
                        let net: std::net::Ipv4Addr = net.parse().unwrap();
                        let m = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                        (u32::from(net) & m == u32::from(ip) & m).then_some(len + 1)
                    }
                }
            };
            // Envoy: exact destination_port, else chains without one; then
            // the longest prefix containing the IP; then, per connection,
            // a chain whose server name matches, else one without server
            // names, else the default chain (else the connection closes).
            let exact: Vec<usize> = (0..n).filter(|&i| chains[i].0 == Some(PORT)).collect();
            let by_port: Vec<usize> = if exact.is_empty() {
                (0..n).filter(|&i| chains[i].0.is_none()).collect()
            } else {
                exact
            };
            let best = by_port.iter().filter_map(|&i| contains(chains[i].1)).max();
            let narrowed: Vec<usize> = by_port
                .into_iter()
                .filter(|&i| best.is_some() && contains(chains[i].1) == best)
                .collect();
            let mut possible: Vec<Option<&str>> = Vec::new(); // None: closed
            let sni: Vec<usize> = narrowed.iter().copied().filter(|&i| chains[i].2).collect();
            let plain: Vec<usize> = narrowed.iter().copied().filter(|&i| !chains[i].2).collect();
            // The server name may match (then one of the SNI chains) or not.
            possible.extend(sni.iter().map(|&i| Some(chains[i].3)));
            if plain.is_empty() {
                possible.push(default);
            } else {
                possible.extend(plain.iter().map(|&i| Some(chains[i].3)));
            }
            let vip: SocketAddr = format!("{d}:{PORT}").parse().unwrap();
            let named = chains.iter().any(|c| c.1 == Some((d, 32)));
            match c.flat.services.get(&vip) {
                Some(s) => {
                    installed_total += 1;
                    for p in &possible {
                        let Some(cluster) = p else {
                            panic!("{vip} installed but Envoy may close it: {chains:?} default {default:?}");
                        };
                        assert!(
                            s.endpoints.iter().all(|e| e.cluster == *cluster),
                            "{vip} installed to {:?}, Envoy may pick {cluster}: {chains:?} default {default:?}",
                            s.endpoints
                        );
                    }
                }
                None => {
                    left_total += 1;
                    let first = possible[0];
                    let agree = possible.iter().all(|p| *p == first)
                        && matches!(first, Some(c) if c != "pass");
                    assert!(
                        !(named && agree),
                        "{vip}: every possible chain sends to {first:?}, yet not installed: {chains:?} default {default:?}\n{:#?}",
                        c.flat.warnings
                    );
                }
            }
        }
    }
    assert!(installed_total > 200, "only {installed_total} installed");
    assert!(left_total > 200, "only {left_total} left alone");
}

/// A random mesh of the four resource types, changed one resource at a
/// time: after every change the incremental compile holds exactly the
/// services a full compile of the same resources gives.
#[test]
fn incremental_updates_equal_full_compiles() {
    let mut rng = Rng(0x5eed_1ac3);
    let n = 6;
    // Current JSON of each resource slot (None: absent).
    let mut clusters: Vec<Option<Value>> = vec![None; n];
    let mut clas: Vec<Option<Value>> = vec![None; n];
    let mut routes: Vec<Option<Value>> = vec![None; 2];
    let mut listeners: Vec<Option<Value>> = vec![None; n];
    let cluster = |rng: &mut Rng, i: usize| -> Value {
        let name = format!("c{i}");
        let lb = *rng.pick(&["ROUND_ROBIN", "RANDOM"]);
        match rng.below(10) {
            0 => json!({"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}),
            1 | 2 => {
                json!({"name": name, "type": "STATIC", "lb_policy": lb, "load_assignment": {"cluster_name": name,
                "endpoints": [{"lb_endpoints": [endpoint(&format!("10.1.1.{}", i + 1), 80, None)]}]}})
            }
            _ => {
                json!({"name": name, "type": "EDS", "lb_policy": lb, "eds_cluster_config": {"service_name": name}})
            }
        }
    };
    let cla = |rng: &mut Rng, i: usize| -> Value {
        let eps: Vec<Value> = (0..rng.below(4))
            .map(|k| {
                endpoint(
                    &format!("10.1.0.{}", k + 1),
                    80,
                    Some(1 + rng.below(3) as u32),
                )
            })
            .collect();
        json!({"cluster_name": format!("c{i}"), "endpoints": [{"lb_endpoints": eps}]})
    };
    let route = |rng: &mut Rng, i: usize| -> Value {
        let vhosts: Vec<Value> = (0..1 + rng.below(3))
            .map(|k| {
                let mut routes = Vec::new();
                if rng.chance(30) {
                    routes.push(json!({"match": {"prefix": "/api"}, "route": {"cluster": format!("c{}", rng.below(n))}}));
                }
                routes.push(json!({"match": {"prefix": "/"}, "route": {"cluster": format!("c{}", rng.below(n))}}));
                json!({"name": format!("v{k}"), "domains": [format!("svc{k}.example"), format!("10.96.2.{}", k + 1)], "routes": routes})
            })
            .collect();
        json!({"name": format!("r{i}"), "virtual_hosts": vhosts})
    };
    let listener = |rng: &mut Rng, i: usize| -> Value {
        let name = format!("l{i}");
        match rng.below(4) {
            0 => {
                let port = 8000 + i;
                json!({"name": name, "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": xds_adapter::HCM_TYPE_URL, "stat_prefix": "h",
                        "rds": {"route_config_name": format!("r{}", rng.below(2))},
                        "http_filters": [{"name": "envoy.filters.http.router"}]}}]}]})
            }
            1 => {
                let chains: Vec<Value> = (0..1 + rng.below(3))
                    .map(|k| {
                        let mut c = filter(json!({"cluster": format!("c{}", rng.below(n))}));
                        c["filter_chain_match"] = json!({"prefix_ranges": [{"address_prefix": format!("10.96.3.{}", k + 1), "prefix_len": 32}]});
                        c
                    })
                    .collect();
                json!({"name": name, "address": {"socket_address": {"address": "0.0.0.0", "port_value": 9000 + i}},
                    "filter_chains": chains, "default_filter_chain": filter(json!({"cluster": format!("c{}", rng.below(n))}))})
            }
            2 => {
                let (a, b) = (rng.below(n), rng.below(n));
                let spec = if a == b {
                    json!({"cluster": format!("c{a}")})
                } else {
                    json!({"weighted_clusters": {"clusters": [{"name": format!("c{a}"), "weight": 1 + rng.below(3)}, {"name": format!("c{b}"), "weight": 1}]}})
                };
                json!({"name": name, "address": {"socket_address": {"address": format!("10.96.1.{}", i + 1), "port_value": 80}},
                    "filter_chains": [filter(spec)]})
            }
            _ => {
                json!({"name": name, "address": {"socket_address": {"address": format!("10.96.1.{}", i + 1), "port_value": 80}},
                    "filter_chains": [filter(json!({"cluster": format!("c{}", rng.below(n))}))]})
            }
        }
    };
    let doc = |clusters: &[Option<Value>],
               clas: &[Option<Value>],
               routes: &[Option<Value>],
               listeners: &[Option<Value>]| {
        let some = |v: &[Option<Value>]| v.iter().flatten().cloned().collect::<Vec<_>>();
        json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
             "dynamic_active_clusters": some(clusters).into_iter().map(|c| json!({"cluster": c})).collect::<Vec<_>>()},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
             "dynamic_endpoint_configs": some(clas).into_iter().map(|c| json!({"endpoint_config": c})).collect::<Vec<_>>()},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
             "dynamic_route_configs": some(routes).into_iter().map(|c| json!({"route_config": c})).collect::<Vec<_>>()},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
             "dynamic_listeners": some(listeners).into_iter().map(|l| json!({"name": l["name"], "active_state": {"listener": l}})).collect::<Vec<_>>()},
        ]})
        .to_string()
    };
    let mut incremental = 0;
    let mut full = 0;
    for round in 0..40 {
        for i in 0..n {
            clusters[i] = Some(cluster(&mut rng, i));
            clas[i] = Some(cla(&mut rng, i));
            listeners[i] = rng.chance(80).then(|| listener(&mut rng, i));
        }
        for (i, r) in routes.iter_mut().enumerate() {
            *r = Some(route(&mut rng, i));
        }
        let res = xds_adapter::parse_static_config(&doc(&clusters, &clas, &routes, &listeners))
            .expect("parses");
        let mut inc = xds_adapter::Incremental::full(&res.refs()).expect("compiles");
        let want = xds_adapter::compile_lenient(&res.refs()).expect("compiles");
        assert_eq!(
            inc.compiled().flat.services,
            want.flat.services,
            "round {round}: full"
        );
        for step in 0..40 {
            let mut ch = xds_adapter::Changes::default();
            let i = rng.below(n);
            let remove = rng.chance(15);
            match rng.below(4) {
                0 => {
                    clusters[i] = (!remove).then(|| cluster(&mut rng, i));
                    ch.clusters.push(format!("c{i}"));
                }
                1 => {
                    clas[i] = (!remove).then(|| cla(&mut rng, i));
                    ch.load_assignments.push(format!("c{i}"));
                }
                2 => {
                    let i = i % 2;
                    routes[i] = (!remove).then(|| route(&mut rng, i));
                    ch.route_configs.push(format!("r{i}"));
                }
                _ => {
                    listeners[i] = (!remove).then(|| listener(&mut rng, i));
                    ch.listeners.push(format!("l{i}"));
                }
            }
            let res = xds_adapter::parse_static_config(&doc(&clusters, &clas, &routes, &listeners))
                .expect("parses");
            let want = xds_adapter::compile_lenient(&res.refs()).expect("compiles");
            let before = inc.compiled().flat.services.clone();
            match inc.update(&res, &ch) {
                Some(vips) => {
                    incremental += 1;
                    assert_eq!(
                        inc.compiled().flat.services,
                        want.flat.services,
                        "round {round} step {step}: {ch:?}"
                    );
                    let _ = &ch;
                    // Exactly the services whose records changed are listed.
                    for (vip, s) in &want.flat.services {
                        if before
                            .get(vip)
                            .is_none_or(|b| b.slots != s.slots || b.lb_policy != s.lb_policy)
                        {
                            assert!(
                                vips.contains(vip),
                                "round {round} step {step}: {vip} changed but not listed"
                            );
                        }
                    }
                    for vip in before
                        .keys()
                        .filter(|v| !want.flat.services.contains_key(v))
                    {
                        assert!(vips.contains(vip), "{vip} removed but not listed");
                    }
                    // Everything held but not installed is still explained
                    // (hints list other clusters, which may have changed since).
                    let text = |e: &xds_adapter::ConfigError| {
                        format!("{}: {}: {}", e.resource, e.field, e.message)
                    };
                    let mut got: Vec<String> = inc.compiled().excluded.iter().map(text).collect();
                    let mut exp: Vec<String> = want.excluded.iter().map(text).collect();
                    got.sort();
                    exp.sort();
                    for e in &exp {
                        if !e.contains("not used by any listener") {
                            assert!(
                                got.contains(e),
                                "round {round} step {step}: {e:?} missing from {got:#?}"
                            );
                        }
                    }
                }
                None => {
                    full += 1;
                    inc = xds_adapter::Incremental::full(&res.refs()).expect("compiles");
                    assert_eq!(inc.compiled().flat.services, want.flat.services);
                }
            }
        }
    }
    eprintln!("{incremental} incremental updates, {full} full");
    assert!(
        incremental > 1500,
        "only {incremental} incremental updates ({full} full)"
    );
}
