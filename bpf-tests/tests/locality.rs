//! Locality-aware load balancing in dual-engine mode, on real sockets
//! (needs root): the node is in `eu/eu-1a`; `srv0` is a local endpoint
//! (same zone), `srv1` a remote one (other region). FAILOVER sends
//! everything local, fails over to remote without a failed connect when
//! the local endpoint goes away, and STRICT refuses at once when no
//! endpoint is local.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bpf_tests::Pod;
use common::mesh;
use xds_adapter::workload::{compile_local_config_for, LocalNode};

const VIP: &str = "10.96.0.30:80";

fn node() -> LocalNode {
    LocalNode {
        locality: "eu/eu-1a".parse().unwrap(),
        node: "node-a".into(),
        ..Default::default()
    }
}

/// A local config with `web` on the VIP in `mode`, and the given
/// (pod, locality) endpoints.
fn config(mode: &str, endpoints: &[(&Pod, &str)]) -> xds_adapter::FlatConfig {
    let mut y = String::from("workloads:\n");
    for (p, loc) in endpoints {
        y.push_str(&format!(
            "- {{name: {n}, namespace: ns, workloadIps: [\"{ip}\"], locality: \"{loc}\", services: {{\"ns/web.ns.svc\": {{80: 8080}}}}}}\n",
            n = p.name,
            ip = p.addr4(0).ip()
        ));
    }
    y.push_str(&format!(
        "services:\n- {{name: web, namespace: ns, hostname: web.ns.svc, vips: [\"/{}\"], ports: {{80: 8080}}, lbPolicy: ROUND_ROBIN, loadBalancer: {{routingPreferences: [Region, Zone], mode: {mode}}}}}\n",
        VIP.split(':').next().unwrap()
    ));
    compile_local_config_for(&y, &node())
        .unwrap_or_else(|e| panic!("{e}\n{y}"))
        .flat
}

#[test]
fn failover_prefers_local_then_fails_over_without_a_failed_connect() {
    let mut m = mesh(2, &[]);
    let vip: SocketAddr = VIP.parse().unwrap();
    let (local, remote) = (&m.servers[0], &m.servers[1]);
    let both = config(
        "Failover",
        &[(local, "eu/eu-1a/rack1"), (remote, "us/us-1a")],
    );
    assert_eq!(both.services[&vip].slots, vec![local.addr4(8080)]);
    m.dp.apply(&both).unwrap();
    let r = m.node.connect(&m.client, vip, 20).unwrap();
    assert_eq!((r.count("srv0"), r.errors), (20, 0), "{r:?}");

    // The local endpoint goes away while a client connects in a loop:
    // every connect lands on one endpoint or the other.
    let remote_only = config("Failover", &[(remote, "us/us-1a")]);
    let traffic = m.node.start_loop(&m.client, vip, 1_500).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    m.dp.apply(&remote_only).unwrap();
    let r = traffic.finish().unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.count("srv0") > 0 && r.count("srv1") > 0, "{r:?}");
    assert_eq!(r.count("srv0") + r.count("srv1"), r.total(), "{r:?}");
    let r = m.node.connect(&m.client, vip, 10).unwrap();
    assert_eq!((r.count("srv1"), r.errors), (10, 0), "{r:?}");

    // And back: a local endpoint again takes everything.
    m.dp.apply(&both).unwrap();
    let r = m.node.connect(&m.client, vip, 10).unwrap();
    assert_eq!((r.count("srv0"), r.errors), (10, 0), "{r:?}");
}

#[test]
fn strict_uses_only_local_endpoints_and_refuses_when_none_is_local() {
    let mut m = mesh(3, &[]);
    let vip: SocketAddr = VIP.parse().unwrap();
    let s = &m.servers;
    // Two local endpoints (same zone, different subzones), one remote.
    m.dp.apply(&config(
        "Strict",
        &[
            (&s[0], "eu/eu-1a/rack1"),
            (&s[1], "eu/eu-1a/rack2"),
            (&s[2], "eu/eu-1b"),
        ],
    ))
    .unwrap();
    let r = m.node.connect(&m.client, vip, 20).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.count("srv2"), 0, "{r:?}");
    assert_eq!(r.count("srv0") + r.count("srv1"), 20, "{r:?}");
    assert!(r.count("srv0") > 0 && r.count("srv1") > 0, "{r:?}");

    // Only remote endpoints: STRICT refuses at connect() (no SYN is sent).
    m.dp.apply(&config("Strict", &[(&s[2], "eu/eu-1b")]))
        .unwrap();
    let t = Instant::now();
    let r = m.node.connect(&m.client, vip, 1).unwrap();
    assert_eq!((r.errors, r.total()), (1, 0), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
}
