//! Kernel tests of the LB policies, priority failover and circuit breaking
//! of the connect pipeline, with real connections between network
//! namespaces (needs root; `cargo xtask test` runs them).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bpf_tests::Pod;
use common::{compile, mesh, ncpu, one_service, Mesh};
use kmesh_daemon::dataplane::ClusterCounters;

const VIP: &str = "10.96.0.10:80";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A bootstrap with listener `web` on [`VIP`] and cluster `web`: `lb`,
/// `extra` cluster lines (e.g. circuit breakers), and one locality per
/// `(priority, [(endpoint, health_status)])`.
fn config(lb: &str, extra: &str, localities: &[(u32, Vec<(SocketAddr, &str)>)]) -> String {
    let vip = sa(VIP);
    let mut y = format!(
        "static_resources:
  listeners:
  - name: web
    address: {{ socket_address: {{ address: \"{}\", port_value: {} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: web
          cluster: web
  clusters:
  - name: web
    connect_timeout: 1s
    type: STATIC
    lb_policy: {lb}
{extra}    load_assignment:
      cluster_name: web
      endpoints:
",
        vip.ip(),
        vip.port()
    );
    for (priority, eps) in localities {
        writeln!(y, "      - priority: {priority}\n        lb_endpoints:").unwrap();
        for (a, health) in eps {
            writeln!(
                y,
                "        - endpoint: {{ address: {{ socket_address: {{ address: \"{}\", port_value: {} }} }} }}\n          health_status: {health}",
                a.ip(),
                a.port()
            )
            .unwrap();
        }
    }
    y
}

fn enroll(m: &mut Mesh, name: &str) -> Pod {
    let pod = m.node.add_pod(name).expect("pod");
    let cookie = kmesh_daemon::netns::cookie_of(&pod.netns_path).expect("cookie");
    m.dp.enroll(cookie).expect("enroll");
    pod
}

fn counters(m: &Mesh) -> ClusterCounters {
    m.dp.cluster_counters()
        .into_iter()
        .find(|c| c.cluster == "web")
        .expect("cluster web has counters")
}

/// Waits until the cluster's active count is `want` (closes are seen by
/// sockops a little after the client's close()).
fn wait_active(m: &Mesh, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = counters(m);
        if c.active == want {
            return;
        }
        assert!(Instant::now() < deadline, "active stays {c:?}, want {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn round_robin_is_even() {
    let mut m = mesh(3, &[]);
    let eps = m.servers.iter().map(|p| (p.addr4(8080), 1)).collect();
    m.dp.apply(&compile(&one_service(sa(VIP), "ROUND_ROBIN", eps)))
        .unwrap();
    let r = m.node.connect(&m.client, sa(VIP), 90).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    for s in &m.servers {
        let c = r.count(&s.name);
        assert!(c.abs_diff(30) <= ncpu(), "{} got {c} of 90: {r:?}", s.name);
    }
}

#[test]
fn random_passes_chi_square() {
    let mut m = mesh(3, &[]);
    let eps = m.servers.iter().map(|p| (p.addr4(8080), 1)).collect();
    m.dp.apply(&compile(&one_service(sa(VIP), "RANDOM", eps)))
        .unwrap();
    let n = 600;
    let r = m.node.connect(&m.client, sa(VIP), n).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    let expected = n as f64 / 3.0;
    let chi2: f64 = m
        .servers
        .iter()
        .map(|s| (r.count(&s.name) as f64 - expected).powi(2) / expected)
        .sum();
    // 2 degrees of freedom: P(χ² > 13.82) = 0.001 for a uniform pick.
    assert!(chi2 < 13.82, "χ² = {chi2:.2}: {r:?}");
}

#[test]
fn least_request_steers_away_from_a_busy_endpoint() {
    let mut m = mesh(3, &[]);
    // 10 connections held open to srv0 (through the VIP, so counted).
    let only0 = vec![(m.servers[0].addr4(8080), 1)];
    m.dp.apply(&compile(&one_service(sa(VIP), "ROUND_ROBIN", only0)))
        .unwrap();
    let mut held = m.node.hold(&m.client, sa(VIP), 10).unwrap();
    assert_eq!(held.backends.get("srv0"), Some(&10));
    wait_active(&m, 10);

    let eps = m.servers.iter().map(|p| (p.addr4(8080), 1)).collect();
    m.dp.apply(&compile(&one_service(sa(VIP), "LEAST_REQUEST", eps)))
        .unwrap();
    let r = m.node.connect(&m.client, sa(VIP), 90).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    // srv0 wins only when both choices are srv0: 1/9, expected 10 of 90.
    // (Round robin or random would give it 30.)
    assert!(r.count("srv0") <= 20, "busy srv0 still picked: {r:?}");
    for s in &m.servers[1..] {
        assert!(r.count(&s.name) >= 25, "{r:?}");
    }
    assert_eq!(held.check().unwrap(), 10, "held connections kept working");
    drop(held);
    wait_active(&m, 0);
}

#[test]
fn maglev_keeps_clients_on_their_backend_and_moves_only_the_removed_ones() {
    let mut m = mesh(3, &[]);
    let mut clients = vec![m.client.clone()];
    for i in 0..7 {
        clients.push(enroll(&mut m, &format!("cli{i}")));
    }
    let name_of: BTreeMap<SocketAddr, String> = m
        .servers
        .iter()
        .map(|p| (p.addr4(8080), p.name.clone()))
        .collect();

    // Connects every client 8 times; returns client → its one backend,
    // checked against the table the adapter built and the kernel's hash.
    let run = |m: &mut Mesh, eps: Vec<(SocketAddr, u32)>| -> Vec<String> {
        let flat = compile(&one_service(sa(VIP), "MAGLEV", eps));
        let slots = flat.services[&sa(VIP)].slots.clone();
        m.dp.apply(&flat).unwrap();
        clients
            .iter()
            .map(|c| {
                let r = m.node.connect(c, sa(VIP), 8).unwrap();
                assert_eq!(r.errors, 0, "{r:?}");
                assert_eq!(
                    r.backends.len(),
                    1,
                    "{} moved between backends: {r:?}",
                    c.name
                );
                let got = r.backends.keys().next().unwrap().clone();
                let cookie = kmesh_daemon::netns::cookie_of(&c.netns_path).unwrap();
                let entry = kmesh_abi::maglev_hash(cookie) as usize % slots.len();
                assert_eq!(
                    got, name_of[&slots[entry]],
                    "{} not on its table entry",
                    c.name
                );
                got
            })
            .collect()
    };

    let all: Vec<(SocketAddr, u32)> = m.servers.iter().map(|p| (p.addr4(8080), 1)).collect();
    let before = run(&mut m, all.clone());
    let used: BTreeSet<&String> = before.iter().collect();
    // 8 clients on one backend of 3 has probability 3^-7 ≈ 0.05%.
    assert!(used.len() >= 2, "clients not spread: {before:?}");

    let removed = before[0].clone();
    let rest: Vec<(SocketAddr, u32)> = all
        .iter()
        .copied()
        .filter(|(a, _)| name_of[a] != removed)
        .collect();
    let after = run(&mut m, rest);
    let mut others_moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if *b == removed {
            assert_ne!(a, &removed);
        } else if a != b {
            others_moved += 1;
        }
    }
    // Maglev moves ≤ 1% of the other endpoints' entries for 3 → 2
    // endpoints (see the adapter's maglev tests); two of ≤ 7 clients on
    // such entries is far below 0.1% likely.
    assert!(others_moved <= 1, "{before:?} → {after:?}");
}

#[test]
fn priority_failover_and_back() {
    let mut m = mesh(3, &[]);
    let (a, b, c) = (
        m.servers[0].addr4(8080),
        m.servers[1].addr4(8080),
        m.servers[2].addr4(8080),
    );
    let cfg = |h0: &str, h1: &str| {
        config(
            "ROUND_ROBIN",
            "",
            &[(0, vec![(a, h0), (b, h1)]), (1, vec![(c, "HEALTHY")])],
        )
    };
    let n = 100;
    // All of priority 0 healthy: priority 1 gets nothing.
    m.dp.apply(&compile(&cfg("HEALTHY", "HEALTHY"))).unwrap();
    let r = m.node.connect(&m.client, sa(VIP), n).unwrap();
    assert_eq!((r.errors, r.count("srv2")), (0, 0), "{r:?}");

    // Half of priority 0 unhealthy: health 50% × 1.4 = 70 → 70/30.
    m.dp.apply(&compile(&cfg("HEALTHY", "UNHEALTHY"))).unwrap();
    let r = m.node.connect(&m.client, sa(VIP), n).unwrap();
    assert_eq!((r.errors, r.count("srv1")), (0, 0), "{r:?}");
    assert!(
        r.count("srv2").abs_diff(30) <= 3 * ncpu(),
        "70/30 gave {r:?}"
    );

    // All of priority 0 unhealthy: everything fails over to priority 1.
    m.dp.apply(&compile(&cfg("UNHEALTHY", "DRAINING"))).unwrap();
    let r = m.node.connect(&m.client, sa(VIP), n).unwrap();
    assert_eq!((r.errors, r.count("srv2")), (0, n), "{r:?}");

    // Priority 0 healthy again: traffic comes back.
    m.dp.apply(&compile(&cfg("HEALTHY", "HEALTHY"))).unwrap();
    let r = m.node.connect(&m.client, sa(VIP), n).unwrap();
    assert_eq!((r.errors, r.count("srv2")), (0, 0), "{r:?}");
    assert!(r.count("srv0").abs_diff(50) <= ncpu(), "{r:?}");
}

const BREAKER: &str = "    circuit_breakers: { thresholds: [ { max_connections: 3 } ] }\n";

/// Routes [`VIP`] to the single endpoint `ep` of cluster `web`, whose
/// circuit breaker allows 3 connections.
fn apply_breaker(m: &mut Mesh, ep: SocketAddr) {
    m.dp.apply(&compile(&config(
        "ROUND_ROBIN",
        BREAKER,
        &[(0, vec![(ep, "HEALTHY")])],
    )))
    .unwrap();
}

#[test]
fn circuit_breaker_fails_fast_at_max_connections() {
    let mut m = mesh(1, &[]);
    let ep = m.servers[0].addr4(8080);
    apply_breaker(&mut m, ep);

    let mut two = m.node.hold(&m.client, sa(VIP), 2).unwrap();
    let one = m.node.hold(&m.client, sa(VIP), 1).unwrap();
    wait_active(&m, 3);

    // The 4th and later: refused by the connect program itself, EPERM at once.
    let t = Instant::now();
    let r = m.node.connect(&m.client, sa(VIP), 20).unwrap();
    let took = t.elapsed();
    assert_eq!(r.errors, 20, "{r:?}");
    assert_eq!(r.error_kinds.get("PermissionDenied"), Some(&20), "{r:?}");
    // 20 refusals plus starting the client process: far below one
    // connect timeout (3 s) — nothing waits for the network.
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    let c = counters(&m);
    assert_eq!((c.active, c.overflow), (3, 20), "{c:?}");
    assert_eq!(m.dp.stats().unwrap()["connect_overflow"], 20);

    // One closed: room for exactly one more.
    drop(one);
    wait_active(&m, 2);
    let r = m.node.connect(&m.client, sa(VIP), 1).unwrap();
    assert_eq!((r.count("srv0"), r.errors), (1, 0), "{r:?}");
    wait_active(&m, 2);
    assert_eq!(two.check().unwrap(), 2);
    drop(two);
    wait_active(&m, 0);
}

#[test]
fn failed_connects_do_not_leak_active_counts() {
    let mut m = mesh(1, &[]);
    // Nothing listens on port 9: every SYN is answered by a RST, so every
    // socket goes SYN_SENT → CLOSE without ever being established.
    let closed = m.servers[0].addr4(9);
    apply_breaker(&mut m, closed);
    let r = m.node.connect(&m.client, sa(VIP), 50).unwrap();
    assert_eq!(r.error_kinds.get("ConnectionRefused"), Some(&50), "{r:?}");
    wait_active(&m, 0);
    assert_eq!(counters(&m).overflow, 0);

    // The breaker still admits its full 3 once the endpoint works.
    let ep = m.servers[0].addr4(8080);
    apply_breaker(&mut m, ep);
    let held = m.node.hold(&m.client, sa(VIP), 3).unwrap();
    assert_eq!(held.backends.get("srv0"), Some(&3));
    wait_active(&m, 3);
    drop(held);
    wait_active(&m, 0);
}

#[test]
fn connects_failing_before_the_syn_are_released_with_the_socket() {
    let mut m = mesh(1, &[]);
    // The client cannot route to 192.0.2.0/24: connect() fails in the
    // kernel's route lookup, after the connect program counted it but
    // before any SYN (sockops never sees this socket). Only the
    // sock_release program gives the count back.
    bpf_tests::ip(&[
        "-n",
        &m.client.netns,
        "route",
        "add",
        "unreachable",
        "192.0.2.0/24",
    ])
    .unwrap();
    apply_breaker(&mut m, sa("192.0.2.1:80"));
    let r = m.node.connect(&m.client, sa(VIP), 20).unwrap();
    assert_eq!(r.errors, 20, "{r:?}");
    assert!(
        !r.error_kinds.contains_key("PermissionDenied"),
        "the breaker must not open: {r:?}"
    );
    wait_active(&m, 0);
    assert_eq!(counters(&m).overflow, 0);
}
