//! The `kmesh-daemon` binary end to end: config file in, kernel routes,
//! admin API answers, SIGTERM detaches and unpins (needs root).

mod common;

use std::{net::SocketAddr, path::Path, process::Command};

use bpf_tests::http_get;
use common::{free_port, one_service, workspace_bin, Bpffs, Daemon, TESTPOD};

#[test]
fn daemon_routes_serves_admin_and_detaches_on_sigterm() {
    bpf_tests::require_root();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kmt", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv = node.add_pod("srv0").unwrap();
    node.serve(&srv, "srv0", &[srv.addr4(8080)]).unwrap();
    node.serve_on_node("node", &[vip]).unwrap();
    let bpffs = Bpffs::new("e2e");
    let cfg = bpffs.write_config(&one_service(vip, "ROUND_ROBIN", vec![(srv.addr4(8080), 1)]));
    let mut daemon = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &[]);

    let r = node.connect(&client, vip, 10).unwrap();
    assert_eq!((r.count("srv0"), r.errors), (10, 0), "{r:?}");
    for m in kmesh_daemon::dataplane::MAPS {
        assert!(bpffs.0.join("kmesh").join(m).exists(), "map {m} not pinned");
    }
    let links = std::fs::read_dir(bpffs.0.join("kmesh/links"))
        .unwrap()
        .count();
    assert_eq!(
        links,
        kmesh_daemon::dataplane::CGROUP_LINKS,
        "one pinned link per program"
    );
    let (code, body) = http_get(daemon.admin, "/debug/config_dump/bpf/kernel-native").unwrap();
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["services"][0]["vip"], "10.96.0.10:80", "{body}");
    assert_eq!(
        dump["services"][0]["slots"][0],
        srv.addr4(8080).to_string(),
        "{body}"
    );
    assert_eq!(http_get(daemon.admin, "/version").unwrap().0, 200);

    // SIGTERM (default --on-exit detach): detach, unpin, exit 0.
    let status = daemon.signal(libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(!bpffs.0.join("kmesh").exists(), "pins left behind");
    let r = node.connect(&client, vip, 3).unwrap();
    assert_eq!(
        r.count("node"),
        3,
        "programs still attached after SIGTERM: {r:?}"
    );
}

#[test]
fn bad_config_is_rejected_with_resource_and_field_and_nothing_is_loaded() {
    bpf_tests::require_root();
    let bpffs = Bpffs::new("bad");
    let cfg = bpffs.write_config(
        &one_service(
            "10.96.0.10:80".parse().unwrap(),
            "ROUND_ROBIN",
            vec![("10.244.0.2:8080".parse().unwrap(), 1)],
        )
        .replace("port_value: 8080", "port_value: 70000"),
    );
    let out = Command::new(workspace_bin("kmesh-daemon"))
        .args(["--mode", "kernel-native", "--config"])
        .arg(cfg)
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster \"web\""), "{err}");
    assert!(err.contains("port_value"), "{err}");
    assert!(err.contains("70000"), "{err}");
    assert!(
        !bpffs.0.join("kmesh").exists(),
        "a rejected config must load nothing"
    );
}
