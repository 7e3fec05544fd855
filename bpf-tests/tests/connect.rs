//! Kernel tests of connect-time service routing, with real sockets in
//! network namespaces (needs root; `cargo xtask test` runs them).

mod common;

use std::net::SocketAddr;

use common::{bootstrap, compile, mesh, ncpu, one_service, ClusterSpec, ListenerSpec};

const VIP: &str = "10.96.0.10:80";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn round_robin_spreads_evenly_and_getpeername_shows_the_vip() {
    let mut m = mesh(3, &[]);
    let eps = m.servers.iter().map(|p| (p.addr4(8080), 1)).collect();
    m.dp.apply(&compile(&one_service(sa(VIP), "ROUND_ROBIN", eps)))
        .unwrap();

    let r = m.node.connect(&m.client, sa(VIP), 60).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.peer_mismatch, 0, "getpeername must return the VIP: {r:?}");
    for s in &m.servers {
        let c = r.count(&s.name);
        assert!(c.abs_diff(20) <= ncpu(), "{} got {c} of 60: {r:?}", s.name);
    }
    let stats = m.dp.stats().unwrap();
    assert_eq!(stats["connect_redirected"], 60, "{stats:?}");
    assert!(stats["peername_restored"] >= 60, "{stats:?}");
}

#[test]
fn random_reaches_every_endpoint() {
    let mut m = mesh(3, &[]);
    let eps = m.servers.iter().map(|p| (p.addr4(8080), 1)).collect();
    m.dp.apply(&compile(&one_service(sa(VIP), "RANDOM", eps)))
        .unwrap();

    let r = m.node.connect(&m.client, sa(VIP), 300).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    // Expected 100 each; P(outside 55..=145) is below 1e-6 per endpoint.
    for s in &m.servers {
        let c = r.count(&s.name);
        assert!((55..=145).contains(&c), "{} got {c} of 300: {r:?}", s.name);
    }
}

#[test]
fn endpoint_weights_are_honoured() {
    let mut m = mesh(2, &[]);
    let eps = vec![(m.servers[0].addr4(8080), 3), (m.servers[1].addr4(8080), 1)];
    m.dp.apply(&compile(&one_service(sa(VIP), "ROUND_ROBIN", eps)))
        .unwrap();

    let r = m.node.connect(&m.client, sa(VIP), 80).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    let heavy = r.count("srv0");
    assert!(heavy.abs_diff(60) <= 3 * ncpu(), "3:1 weights gave {r:?}");
    assert_eq!(heavy + r.count("srv1"), 80);
}

#[test]
fn weighted_clusters_split_traffic() {
    let mut m = mesh(2, &[]);
    let cfg = bootstrap(
        &[ListenerSpec {
            name: "web",
            vip: sa(VIP),
            clusters: vec![("v1", 90), ("v2", 10)],
        }],
        &[
            ClusterSpec {
                name: "v1",
                lb: "ROUND_ROBIN",
                endpoints: vec![(m.servers[0].addr4(8080), 1)],
            },
            ClusterSpec {
                name: "v2",
                lb: "ROUND_ROBIN",
                endpoints: vec![(m.servers[1].addr4(8080), 1)],
            },
        ],
    );
    m.dp.apply(&compile(&cfg)).unwrap();
    let r = m.node.connect(&m.client, sa(VIP), 100).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(
        r.count("srv1").abs_diff(10) <= 2 * ncpu(),
        "90/10 split gave {r:?}"
    );
}

#[test]
fn pods_not_enrolled_and_unknown_vips_are_untouched() {
    let other_vip = sa("10.96.0.99:80");
    let mut m = mesh(2, &[sa(VIP), other_vip]);
    let eps = m.servers.iter().map(|p| (p.addr4(8080), 1)).collect();
    m.dp.apply(&compile(&one_service(sa(VIP), "ROUND_ROBIN", eps)))
        .unwrap();
    let outsider = m.node.add_pod("outsider").unwrap();

    // Not enrolled: the connect goes where the app sent it (the node's catcher).
    let r = m.node.connect(&outsider, sa(VIP), 10).unwrap();
    assert_eq!((r.count("node"), r.errors), (10, 0), "{r:?}");
    // Enrolled, but a VIP no listener captures: untouched as well.
    let r = m.node.connect(&m.client, other_vip, 10).unwrap();
    assert_eq!((r.count("node"), r.errors), (10, 0), "{r:?}");
    // Enrolled and a known VIP: routed, never to the catcher.
    let r = m.node.connect(&m.client, sa(VIP), 10).unwrap();
    assert_eq!((r.count("node"), r.total()), (0, 10), "{r:?}");

    // Enrollment is live: after unenrolling, the client is untouched too.
    let cookie = kmesh_daemon::netns::cookie_of(&m.client.netns_path).unwrap();
    m.dp.unenroll(cookie).unwrap();
    let r = m.node.connect(&m.client, sa(VIP), 5).unwrap();
    assert_eq!(r.count("node"), 5, "{r:?}");
}

#[test]
fn ipv6_service_routes_to_ipv6_endpoints() {
    let vip6 = sa("[fd00:96::10]:80");
    let mut m = mesh(2, &[]);
    let eps = m.servers.iter().map(|p| (p.addr6(8080), 1)).collect();
    m.dp.apply(&compile(&one_service(vip6, "ROUND_ROBIN", eps)))
        .unwrap();

    let r = m.node.connect(&m.client, vip6, 20).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(
        r.peer_mismatch, 0,
        "getpeername must return the v6 VIP: {r:?}"
    );
    assert!(r.count("srv0") > 0 && r.count("srv1") > 0, "{r:?}");
}

#[test]
fn endpoint_set_change_keeps_open_connections_and_moves_new_ones() {
    let mut m = mesh(3, &[]);
    let first = one_service(
        sa(VIP),
        "ROUND_ROBIN",
        vec![(m.servers[0].addr4(8080), 1), (m.servers[1].addr4(8080), 1)],
    );
    m.dp.apply(&compile(&first)).unwrap();
    let mut held = m.node.hold(&m.client, sa(VIP), 6).unwrap();
    assert_eq!(held.backends.values().sum::<usize>(), 6);
    assert!(!held.backends.contains_key("srv2"));

    // srv0 leaves, srv2 joins.
    let second = one_service(
        sa(VIP),
        "ROUND_ROBIN",
        vec![(m.servers[1].addr4(8080), 1), (m.servers[2].addr4(8080), 1)],
    );
    let summary = m.dp.apply(&compile(&second)).unwrap();
    assert_eq!((summary.changed, summary.added, summary.removed), (1, 0, 0));

    assert_eq!(
        held.check().unwrap(),
        6,
        "open connections must keep working"
    );
    let r = m.node.connect(&m.client, sa(VIP), 20).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.count("srv0"), 0, "removed endpoint still picked: {r:?}");
    assert!(r.count("srv2") > 0, "{r:?}");

    // Read back from the kernel: exactly the new endpoint set.
    let dump = m.dp.dump().unwrap();
    assert_eq!(dump.services.len(), 1);
    assert_eq!(
        dump.services[0].slots,
        vec![m.servers[1].addr4(8080), m.servers[2].addr4(8080)]
    );
}

#[test]
fn removed_service_is_no_longer_routed() {
    let mut m = mesh(1, &[sa(VIP)]);
    let eps = vec![(m.servers[0].addr4(8080), 1)];
    m.dp.apply(&compile(&one_service(sa(VIP), "ROUND_ROBIN", eps)))
        .unwrap();
    assert_eq!(
        m.node.connect(&m.client, sa(VIP), 3).unwrap().count("srv0"),
        3
    );

    let empty = xds_adapter::FlatConfig {
        services: Default::default(),
        l7: Vec::new(),
        warnings: vec![],
    };
    let s = m.dp.apply(&empty).unwrap();
    assert_eq!(s.removed, 1);
    assert_eq!(
        m.node.connect(&m.client, sa(VIP), 3).unwrap().count("node"),
        3
    );
    assert!(m.dp.dump().unwrap().services.is_empty());
}

#[test]
fn pod_found_by_uid_in_host_proc_is_enrolled_and_routed() {
    // A pod whose cgroup is named as the kubelet names it (`pod<uid>`): the
    // locator finds a process of it in /proc, its netns cookie is the
    // pod's, and enrolling that cookie makes the pod's connects routed.
    use kmesh_daemon::enroll::kubernetes::{HostResolver, NetnsResolver};
    let uid = format!("{:08x}-1111-2222-3333-444455556666", std::process::id());
    let mut m = mesh(1, &[sa(VIP)]);
    let eps = vec![(m.servers[0].addr4(8080), 1)];
    m.dp.apply(&compile(&one_service(sa(VIP), "ROUND_ROBIN", eps)))
        .unwrap();
    let pod = m.node.add_pod(&format!("pod{uid}")).unwrap();
    m.node.serve(&pod, "app", &[pod.addr4(8080)]).unwrap();

    let mut resolver = HostResolver::new("/proc".into());
    assert!(resolver
        .cookie("00000000-0000-0000-0000-000000000000")
        .is_none());
    let found = resolver
        .cookie(&uid)
        .expect("pod process not found in /proc");
    assert_eq!(
        found,
        kmesh_daemon::netns::cookie_of(&pod.netns_path).unwrap()
    );

    assert_eq!(
        m.node.connect(&pod, sa(VIP), 3).unwrap().count("node"),
        3,
        "not enrolled yet"
    );
    m.dp.enroll(found).unwrap();
    assert_eq!(
        m.node.connect(&pod, sa(VIP), 3).unwrap().count("srv0"),
        3,
        "enrolled by located cookie"
    );
}
