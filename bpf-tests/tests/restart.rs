//! Restarts and upgrades without traffic loss: the kernel keeps routing
//! from pinned programs and maps while no daemon runs (needs root).

mod common;

use std::{net::SocketAddr, path::Path, time::Duration};

use common::{one_service, workspace_bin, Bpffs, Daemon, TESTPOD};

/// `kmesh-daemon uninstall` on the test's pin directory.
fn uninstall(bpffs: &Bpffs) {
    let out = std::process::Command::new(workspace_bin("kmesh-daemon"))
        .arg("uninstall")
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mesh_config(endpoints: Vec<(SocketAddr, u32)>) -> String {
    one_service("10.96.0.10:80".parse().unwrap(), "ROUND_ROBIN", endpoints)
}

#[test]
fn kill_9_restart_and_upgrade_lose_no_connect() {
    bpf_tests::require_root();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kmt", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv0 = node.add_pod("srv0").unwrap();
    let srv1 = node.add_pod("srv1").unwrap();
    node.serve(&srv0, "srv0", &[srv0.addr4(8080)]).unwrap();
    node.serve(&srv1, "srv1", &[srv1.addr4(8080)]).unwrap();
    // A connect that escapes the programs reaches the node, and counts as lost.
    node.serve_on_node("node", &[vip]).unwrap();
    let bpffs = Bpffs::new("restart");
    let keep = ["--on-exit", "keep"];
    let both = mesh_config(vec![(srv0.addr4(8080), 1), (srv1.addr4(8080), 1)]);

    let cfg = bpffs.write_config(&both);
    let mut d1 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &keep);
    let traffic = node.start_loop(&client, vip, 4_000).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // kill -9: nothing runs in userspace, the kernel keeps routing.
    let s = d1.signal(libc::SIGKILL);
    assert!(!s.success());
    std::thread::sleep(Duration::from_millis(500));
    // Restart on the same config: maps reused, nothing to write.
    let mut d2 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &keep);
    let (_, body) = bpf_tests::http_get(d2.admin, "/debug/config_dump/bpf/kernel-native").unwrap();
    assert!(body.contains("10.96.0.10:80"), "{body}");
    std::thread::sleep(Duration::from_millis(500));

    // Upgrade with a config change: SIGTERM keeping state, new daemon on
    // the new config (srv0 drained).
    assert!(d2.signal(libc::SIGTERM).success());
    let cfg = bpffs.write_config(&mesh_config(vec![(srv1.addr4(8080), 1)]));
    let d3 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &keep);

    let r = traffic.finish().unwrap();
    assert_eq!(r.errors, 0, "failed connects across restart/upgrade: {r:?}");
    assert_eq!(r.count("node"), 0, "connects escaped the programs: {r:?}");
    assert!(r.total() > 50, "too few connects to mean anything: {r:?}");
    // Routing is right after the upgrade.
    let after = node.connect(&client, vip, 20).unwrap();
    assert_eq!((after.count("srv1"), after.errors), (20, 0), "{after:?}");
    // Exactly one generation of links is left.
    let links = std::fs::read_dir(bpffs.0.join("kmesh/links"))
        .unwrap()
        .count();
    assert_eq!(links, kmesh_daemon::dataplane::CGROUP_LINKS);
    drop(d3);

    // With every daemon gone, uninstall removes programs and pins.
    uninstall(&bpffs);
    assert!(!bpffs.0.join("kmesh").exists());
    let r = node.connect(&client, vip, 3).unwrap();
    assert_eq!(
        r.count("node"),
        3,
        "programs still attached after uninstall: {r:?}"
    );
}

#[test]
fn maps_of_another_abi_version_are_replaced_without_loss() {
    bpf_tests::require_root();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kmt", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv0 = node.add_pod("srv0").unwrap();
    node.serve(&srv0, "srv0", &[srv0.addr4(8080)]).unwrap();
    node.serve_on_node("node", &[vip]).unwrap();
    let bpffs = Bpffs::new("abi");
    let cfg = bpffs.write_config(&mesh_config(vec![(srv0.addr4(8080), 1)]));
    let keep = ["--on-exit", "keep"];
    let mut d1 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &keep);
    assert!(d1.signal(libc::SIGTERM).success());

    // Pretend the pinned maps were made by another layout version.
    let marker = bpffs.0.join("kmesh/KM_ABI");
    let data = aya::maps::MapData::from_pin(&marker).unwrap();
    let mut abi = aya::maps::Array::<_, u32>::try_from(aya::maps::Map::Array(data)).unwrap();
    abi.set(0, 999, 0).unwrap();

    let traffic = node.start_loop(&client, vip, 1_500).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _d2 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &keep);
    let r = traffic.finish().unwrap();
    assert_eq!((r.errors, r.count("node")), (0, 0), "{r:?}");
    // The old generation is gone, the new one has the current version.
    let leftovers: Vec<_> = std::fs::read_dir(&bpffs.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("retired"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let data = aya::maps::MapData::from_pin(&marker).unwrap();
    let abi = aya::maps::Array::<_, u32>::try_from(aya::maps::Map::Array(data)).unwrap();
    assert_eq!(abi.get(&0, 0).unwrap(), kmesh_abi::ABI_VERSION);
}

#[test]
fn a_second_daemon_on_the_same_pins_waits_for_the_first() {
    bpf_tests::require_root();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kmt", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv0 = node.add_pod("srv0").unwrap();
    node.serve(&srv0, "srv0", &[srv0.addr4(8080)]).unwrap();
    let bpffs = Bpffs::new("lock");
    let cfg = bpffs.write_config(&mesh_config(vec![(srv0.addr4(8080), 1)]));
    let keep = ["--on-exit", "keep"];
    let mut d1 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &keep);

    // A surge update: the new daemon starts while the old one still runs.
    let mut d2 = Daemon::spawn(cfg, &client, &node.cgroup, &bpffs.0, &keep);
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(
        d2.child.try_wait().unwrap().is_none(),
        "second daemon exited"
    );
    assert!(
        !d2.is_ready(),
        "second daemon became ready beside the first"
    );
    let out = std::process::Command::new(workspace_bin("kmesh-daemon"))
        .arg("uninstall")
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uninstall ran beside a live daemon");
    assert!(err.contains("is running"), "{err}");
    assert!(bpffs.0.join("kmesh").exists());

    // The old one dies without cleaning up: the kernel drops its lock.
    d1.signal(libc::SIGKILL);
    d2.wait_ready(Duration::from_secs(10));
    let r = node.connect(&client, vip, 10).unwrap();
    assert_eq!((r.count("srv0"), r.errors), (10, 0), "{r:?}");
}

#[test]
fn dual_engine_kill_9_restart_keeps_authorization() {
    bpf_tests::require_root();
    let mut node = bpf_tests::Node::new("kmr", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap(); // frontend/web: allowed
    let other = node.add_pod("other").unwrap(); // frontend/admin: denied
    let srv0 = node.add_pod("srv0").unwrap();
    node.serve(&srv0, "srv0", &[srv0.addr4(8080)]).unwrap();
    let cfg = format!(
        r#"workloads:
- {{name: client, namespace: frontend, serviceAccount: web, workloadIps: ["{c}"]}}
- {{name: other, namespace: frontend, serviceAccount: admin, workloadIps: ["{o}"]}}
- name: srv0
  namespace: backend
  workloadIps: ["{s}"]
  services: {{"backend/web.backend.svc.cluster.local": {{80: 8080}}}}
services:
- {{name: web, namespace: backend, hostname: web.backend.svc.cluster.local, vips: ["/10.96.0.20"], ports: {{80: 8080}}}}
policies:
- name: only-web
  namespace: backend
  scope: Namespace
  action: Allow
  rules:
  - - - principals: ["cluster.local/ns/frontend/sa/web"]
"#,
        c = client.ip4,
        o = other.ip4,
        s = srv0.ip4
    );
    let bpffs = Bpffs::new("restart-de");
    let cfg = bpffs.write_config(&cfg);
    let (other_ns, srv0_ns) = (
        other.netns_path.display().to_string(),
        srv0.netns_path.display().to_string(),
    );
    let args = [
        "--mode",
        "dual-engine",
        "--on-exit",
        "keep",
        "--enroll-netns",
        &other_ns,
        "--enroll-netns",
        &srv0_ns,
    ];
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let mut d1 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &args);
    // A SYN dropped while no daemon runs would stall an allowed connect
    // until the retransmit 1 s later: 500 ms makes that an error. 100 ms
    // per dropped SYN: the denied client retries all along.
    let allowed = node.start_loop_timeout(&client, vip, 4_000, 500).unwrap();
    let denied = node
        .start_loop_timeout(&other, srv0.addr4(8080), 4_000, 100)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // kill -9, a while with no daemon, a restart that takes the pinned
    // XDP links over, then an upgrade-style SIGTERM + start.
    assert!(!d1.signal(libc::SIGKILL).success());
    std::thread::sleep(Duration::from_millis(700));
    let mut d2 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &args);
    let (_, body) = bpf_tests::http_get(d2.admin, "/debug/config_dump/bpf/dual-engine").unwrap();
    assert!(body.contains("\"mode\":\"reused\""), "{body}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(d2.signal(libc::SIGTERM).success());
    std::thread::sleep(Duration::from_millis(300));
    let d3 = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &args);

    let a = allowed.finish().unwrap();
    assert_eq!(
        a.errors, 0,
        "allowed connects failed across restarts: {a:?}"
    );
    assert!(
        a.count("srv0") > 50,
        "too few connects to mean anything: {a:?}"
    );
    let d = denied.finish().unwrap();
    assert_eq!(d.count("srv0"), 0, "a denied connect got through: {d:?}");
    assert!(
        d.errors > 10,
        "too few denied attempts to mean anything: {d:?}"
    );
    // One generation of links: the cgroup links and one XDP link per pod.
    let links = std::fs::read_dir(bpffs.0.join("kmesh/links"))
        .unwrap()
        .count();
    assert_eq!(links, kmesh_daemon::dataplane::CGROUP_LINKS + 3);
    drop(d3);

    uninstall(&bpffs);
    // With the XDP links gone, nothing is denied any more.
    let r = node
        .connect_timeout(&other, srv0.addr4(8080), 1, 1_000)
        .unwrap();
    assert_eq!(
        r.count("srv0"),
        1,
        "XDP still attached after uninstall: {r:?}"
    );
}
