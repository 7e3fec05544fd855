//! Waypoints in dual-engine mode, end to end with a real Envoy as the
//! waypoint (needs root and `KMESH_TEST_ENVOY`): connects to a service or
//! workload with a waypoint are steered to Envoy, which learns the original
//! destination from the PROXY protocol v2 header the `sk_msg` program
//! pushed, routes on an HTTP header (`x-canary: 1` → a canary cluster,
//! else an ORIGINAL_DST cluster, i.e. where the client was going), and the
//! destination's L4 policy sees the waypoint as the source.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use bpf_tests::{http_get, waypoint_envoy_bootstrap, Node, Pod, PodEnvoy};
use common::{envoy_path, Bpffs, Daemon, TESTPOD};

/// The waypoint's PROXY-v2 port (Istio's waypoints use 15008 for HBONE;
/// this one speaks PROXY v2, on the port the config names).
const WP_PORT: u16 = 15088;

fn ips(p: &Pod) -> String {
    format!("[\"{}\", \"{}\"]", p.ip4, p.ip6)
}

/// Waits until the waypoint accepts connections (a plain request without
/// a PROXY header is refused by Envoy, but not with ECONNREFUSED).
fn wait_for_listener(node: &Node, from: &Pod, addr: SocketAddr, envoy: &mut PodEnvoy) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(envoy.running(), "Envoy exited (its log is above)");
        let r = node.http_requests(from, addr, 1, None).unwrap();
        if !r.error_kinds.contains_key("ConnectionRefused") {
            return;
        }
        assert!(Instant::now() < deadline, "Envoy not listening in 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn waypoint_stats(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "/debug/config_dump/bpf/kernel-native").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["waypoint_stats"].clone()
}

#[test]
fn waypoint_routes_on_headers_with_the_original_destination() {
    bpf_tests::require_root();
    let mut node = Node::new("kwp", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap(); // .2
    let web0 = node.add_pod("web0").unwrap(); // .3
    let web1 = node.add_pod("web1").unwrap(); // .4
    let canary = node.add_pod("canary").unwrap(); // .5
    let wp = node.add_pod("wp").unwrap(); // .6
    let db = node.add_pod("db").unwrap(); // .7
    let plain = node.add_pod("plain").unwrap(); // .8
    for (p, name) in [
        (&web0, "web-0"),
        (&web1, "web-1"),
        (&canary, "canary"),
        (&db, "db"),
        (&plain, "plain"),
    ] {
        node.serve_http(p, name, &[p.addr4(8080), p.addr6(8080)])
            .unwrap();
    }
    let cfg = format!(
        r#"workloads:
- name: client
  namespace: frontend
  serviceAccount: web
  workloadIps: {client}
- name: waypoint
  namespace: backend
  serviceAccount: waypoint
  workloadIps: {wp}
  services: {{"backend/waypoint.backend.svc.cluster.local": {{}}}}
- name: web-0
  namespace: backend
  serviceAccount: web
  workloadIps: {web0}
  services: {{"backend/web.backend.svc.cluster.local": {{80: 8080}}}}
  authorizationPolicies: ["backend/only-waypoint"]
- name: web-1
  namespace: backend
  serviceAccount: web
  workloadIps: {web1}
  services: {{"backend/web.backend.svc.cluster.local": {{80: 8080}}}}
  authorizationPolicies: ["backend/only-waypoint"]
- name: db
  namespace: backend
  serviceAccount: db
  workloadIps: ["{db4}"]
  waypoint: {{destination: "/{wp4}", hboneMtlsPort: {WP_PORT}}}
- name: plain
  namespace: other
  workloadIps: {plain}
  services: {{"other/plain.other.svc.cluster.local": {{80: 8080}}}}
services:
- name: web
  namespace: backend
  hostname: web.backend.svc.cluster.local
  vips: ["/10.96.0.20", "/fd00:96::20"]
  ports: {{80: 8080}}
  waypoint:
    destination: {{hostname: {{namespace: backend, hostname: waypoint.backend.svc.cluster.local}}}}
    hboneMtlsPort: {WP_PORT}
- name: waypoint
  namespace: backend
  hostname: waypoint.backend.svc.cluster.local
  vips: ["/10.96.0.99", "/fd00:96::99"]
  ports: {{{WP_PORT}: {WP_PORT}}}
- name: plain
  namespace: other
  hostname: plain.other.svc.cluster.local
  vips: ["/10.96.0.21"]
  ports: {{80: 8080}}
policies:
- name: only-waypoint
  namespace: backend
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals: ["cluster.local/ns/backend/sa/waypoint"]
"#,
        client = ips(&client),
        wp = ips(&wp),
        wp4 = wp.ip4,
        web0 = ips(&web0),
        web1 = ips(&web1),
        db4 = db.ip4,
        plain = ips(&plain),
    );
    let bpffs = Bpffs::new("wp");
    let path = bpffs.write_config(&cfg);
    let ns = |p: &Pod| p.netns_path.display().to_string();
    let (wp_ns, web0_ns, web1_ns) = (ns(&wp), ns(&web0), ns(&web1));
    let mut daemon = Daemon::start(
        path,
        &client,
        &node.cgroup,
        &bpffs.0,
        &[
            "--mode",
            "dual-engine",
            "--waypoint-netns",
            &wp_ns,
            "--enroll-netns",
            &web0_ns,
            "--enroll-netns",
            &web1_ns,
        ],
    );
    let mut envoy = PodEnvoy::start(
        &envoy_path(),
        &wp,
        &waypoint_envoy_bootstrap(WP_PORT, canary.addr4(8080)),
    )
    .unwrap();
    wait_for_listener(&node, &client, wp.addr4(WP_PORT), &mut envoy);
    let before = waypoint_stats(daemon.admin);

    // Service VIP with a waypoint (named by hostname: the waypoint
    // service's VIP, balanced to the waypoint pod): Envoy routes by header.
    // Without it, to the original destination (the VIP, which the
    // waypoint's own connect resolves to an endpoint); getpeername shows
    // the VIP to the client.
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let r = node.http_requests(&client, vip, 20, None).unwrap();
    assert_eq!((r.errors, r.peer_mismatch), (0, 0), "{r:?}");
    // (Envoy keeps its upstream connection to the VIP alive, so one
    // endpoint may answer them all.)
    assert_eq!(r.count("web-0") + r.count("web-1"), 20, "{r:?}");
    let r = node
        .http_requests(&client, vip, 10, Some("x-canary: 1"))
        .unwrap();
    assert_eq!((r.count("canary"), r.errors), (10, 0), "{r:?}");

    // A workload with a waypoint (by address, any port): the same.
    let r = node
        .http_requests(&client, db.addr4(8080), 5, None)
        .unwrap();
    assert_eq!(
        (r.count("db"), r.errors, r.peer_mismatch),
        (5, 0, 0),
        "{r:?}"
    );
    let r = node
        .http_requests(&client, db.addr4(8080), 5, Some("x-canary: 1"))
        .unwrap();
    assert_eq!((r.count("canary"), r.errors), (5, 0), "{r:?}");

    // IPv6: the v6 VIP goes to the waypoint service's v6 VIP; the header
    // carries AF_INET6 addresses.
    let vip6: SocketAddr = "[fd00:96::20]:80".parse().unwrap();
    let r = node.http_requests(&client, vip6, 6, None).unwrap();
    assert_eq!((r.errors, r.peer_mismatch), (0, 0), "{r:?}");
    assert_eq!(r.count("web-0") + r.count("web-1"), 6, "{r:?}");
    let r = node
        .http_requests(&client, vip6, 4, Some("x-canary: 1"))
        .unwrap();
    assert_eq!((r.count("canary"), r.errors), (4, 0), "{r:?}");

    // Every waypoint connection got exactly one header.
    let after = waypoint_stats(daemon.admin);
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(delta("steered"), 50, "{after}");
    assert_eq!(delta("sockhash_added"), 50, "{after}");
    assert_eq!(delta("header_sent"), 50, "{after}");
    assert_eq!(
        (delta("header_failed"), delta("sockhash_failed")),
        (0, 0),
        "{after}"
    );

    // A service without a waypoint goes direct: no steering.
    let r = node
        .http_requests(&client, "10.96.0.21:80".parse().unwrap(), 5, None)
        .unwrap();
    assert_eq!((r.count("plain"), r.errors), (5, 0), "{r:?}");
    assert_eq!(
        waypoint_stats(daemon.admin)["steered"],
        after["steered"],
        "a service without waypoint was steered"
    );

    // The destination's L4 policy sees the waypoint as the source: the
    // client's own connection to web-0 is not allowed (only the waypoint is).
    let r = node
        .http_requests(&client, web0.addr4(8080), 1, None)
        .unwrap();
    assert_eq!((r.count("web-0"), r.errors), (0, 1), "{r:?}");
    assert!(envoy.running(), "Envoy exited (its log is above)");

    // SIGTERM with --on-exit detach: pins removed, XDP links gone (the
    // kernel releases them from a workqueue, so allow it a moment).
    assert!(daemon.signal(libc::SIGTERM).success());
    assert!(!bpffs.0.join("kmesh").exists());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = node
            .http_requests(&client, web0.addr4(8080), 1, None)
            .unwrap();
        if r.count("web-0") == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "authorization still attached after detach: {r:?}"
        );
    }
}
