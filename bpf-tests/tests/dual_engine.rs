//! `kmesh-daemon --mode dual-engine` end to end: a ztunnel-style local
//! config routes service VIPs at connect time (as kernel-native does),
//! refuses connects to a service without endpoints, enforces an ALLOW
//! policy with XDP on the server pods, and answers the dual-engine admin
//! endpoints (needs root).

mod common;

use std::{net::SocketAddr, path::Path, time::Instant};

use bpf_tests::http_get;
use common::{ncpu, workspace_bin, Bpffs, Daemon, TESTPOD};

#[test]
fn dual_engine_routes_and_authorizes() {
    bpf_tests::require_root();
    let mut node = bpf_tests::Node::new("kde", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap(); // .2 frontend/web
    let other = node.add_pod("other").unwrap(); // .3 frontend/admin
    let srv0 = node.add_pod("srv0").unwrap(); // .4 backend/db
    let srv1 = node.add_pod("srv1").unwrap(); // .5 backend/db
    for s in [&srv0, &srv1] {
        node.serve(s, &s.name.clone(), &[s.addr4(8080)]).unwrap();
    }
    let ip = |p: &bpf_tests::Pod| p.addr4(0).ip().to_string();
    let cfg = format!(
        r#"workloads:
- name: client
  namespace: frontend
  serviceAccount: web
  workloadIps: ["{c}"]
  node: local
- name: other
  namespace: frontend
  serviceAccount: admin
  workloadIps: ["{o}"]
- name: srv0
  namespace: backend
  serviceAccount: db
  workloadIps: ["{s0}"]
  services: {{"backend/web.backend.svc.cluster.local": {{80: 8080}}}}
- name: srv1
  namespace: backend
  serviceAccount: db
  workloadIps: ["{s1}"]
  services: {{"backend/web.backend.svc.cluster.local": {{}}}}
services:
- name: web
  namespace: backend
  hostname: web.backend.svc.cluster.local
  vips: ["/10.96.0.20"]
  ports: {{80: 8080}}
  lbPolicy: ROUND_ROBIN
- name: empty
  namespace: backend
  hostname: empty.backend.svc.cluster.local
  vips: ["/10.96.0.21"]
  ports: {{80: 8080}}
policies:
- name: only-web
  namespace: backend
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [{{Exact: "cluster.local/ns/frontend/sa/web"}}]
"#,
        c = ip(&client),
        o = ip(&other),
        s0 = ip(&srv0),
        s1 = ip(&srv1)
    );
    let bpffs = Bpffs::new("de");
    let path = bpffs.write_config(&cfg);
    let srv0_ns = srv0.netns_path.display().to_string();
    let srv1_ns = srv1.netns_path.display().to_string();
    let daemon = Daemon::start(
        path,
        &client,
        &node.cgroup,
        &bpffs.0,
        &[
            "--mode",
            "dual-engine",
            "--enroll-netns",
            &srv0_ns,
            "--enroll-netns",
            &srv1_ns,
        ],
    );

    // Routing: the VIP round-robins over both workloads' target port.
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let r = node.connect(&client, vip, 20).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.count("srv0").abs_diff(10) <= ncpu(), "{r:?}");
    assert_eq!(r.count("srv0") + r.count("srv1"), 20, "{r:?}");

    // A service without endpoints refuses at once (no SYN is sent).
    let t = Instant::now();
    let r = node
        .connect(&client, "10.96.0.21:80".parse().unwrap(), 1)
        .unwrap();
    assert_eq!(r.errors, 1, "{r:?}");
    assert!(
        t.elapsed().as_millis() < 1000,
        "refusal took {:?}",
        t.elapsed()
    );

    // Authorization: `other` is not frontend/web: its SYN is dropped.
    let r = node
        .connect_timeout(&other, srv0.addr4(8080), 1, 400)
        .unwrap();
    assert_eq!((r.count("srv0"), r.errors), (0, 1), "{r:?}");
    let r = node
        .connect_timeout(&client, srv1.addr4(8080), 1, 400)
        .unwrap();
    assert_eq!(r.count("srv1"), 1, "{r:?}");

    let (code, body) = http_get(daemon.admin, "/debug/config_dump/dual-engine").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["policies"][0]["name"], "only-web", "{body}");
    let (code, body) = http_get(daemon.admin, "/debug/config_dump/bpf/dual-engine").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["stats"]["denied_no_allow_match"].as_u64().unwrap() >= 1,
        "{body}"
    );
    assert!(
        v["policy_decisions"]["backend/only-web"].as_u64().unwrap() >= 21,
        "{body}"
    );
    // The same decisions in the metrics.
    let (code, text) = http_get(daemon.metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert!(value("kmesh_authz_decisions_total{decision=\"denied_no_allow_match\"}") >= 1.0);
    assert!(value("kmesh_authz_policy_decisions_total{policy=\"backend/only-web\"}") >= 21.0);
    assert_eq!(v["attached"].as_array().unwrap().len(), 3, "{body}");

    // kmeshctl reads the same endpoint (`cargo xtask test` builds it).
    let out = std::process::Command::new(workspace_bin("kmeshctl"))
        .args(["--admin-addr", &daemon.admin.to_string()])
        .args(["dump", "dual-engine", "--bpf"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["policy_decisions"]["backend/only-web"].as_u64().unwrap() >= 21,
        "{text}"
    );
}

#[test]
fn bad_local_config_is_rejected_naming_resource_and_field() {
    bpf_tests::require_root();
    let bpffs = Bpffs::new("debad");
    let path = bpffs.write_config(
        "workloads:\n- {name: w, namespace: ns, workloadIps: [10.0.0.1], colour: blue}\npolicies:\n- {name: p, namespace: ns, scope: Namespace, action: Deny, rules: [[[{sourceIps: [10.0.0.300/8]}]]]}\n",
    );
    let out = std::process::Command::new(workspace_bin("kmesh-daemon"))
        .args(["--mode", "dual-engine", "--config"])
        .arg(path)
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("workload \"ns/w\": field colour: unknown field"),
        "{err}"
    );
    assert!(
        err.contains("policy \"ns/p\": field rules[0][0][0].sourceIps[0]: CIDR does not parse"),
        "{err}"
    );
    assert!(!bpffs.0.join("kmesh").exists(), "nothing may be loaded");
}

#[test]
fn a_missing_interface_fails_the_start_with_a_hint_and_leaves_nothing() {
    bpf_tests::require_root();
    let mut node = bpf_tests::Node::new("kdi", Path::new(TESTPOD)).unwrap();
    let pod = node.add_pod("p").unwrap();
    let bpffs = Bpffs::new("deif");
    let path = bpffs.write_config("workloads: []\n");
    let out = std::process::Command::new(workspace_bin("kmesh-daemon"))
        .args(["--mode", "dual-engine", "--config"])
        .arg(path)
        .arg("--enroll-netns")
        .arg(&pod.netns_path)
        .arg("--cgroup2-path")
        .arg(&node.cgroup)
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .args(["--authz-interface", "nope0"])
        .args([
            "--admin-addr",
            &format!("127.0.0.1:{}", common::free_port()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("attaching kmesh_authz to nope0"), "{err}");
    assert!(err.contains("--authz-interface names it"), "{err}");
    assert!(!bpffs.0.join("kmesh").exists(), "pins left behind");
}

#[test]
fn without_flags_the_daemon_runs_dual_engine_with_empty_tables() {
    bpf_tests::require_root();
    let mut node = bpf_tests::Node::new("kdn", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv = node.add_pod("srv").unwrap();
    node.serve(&srv, "srv", &[srv.addr4(8080)]).unwrap();
    let bpffs = Bpffs::new("denone");
    let admin: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let metrics = format!("127.0.0.1:{}", common::free_port());
    // No --mode, no --config, no --xds-address: only what isolates the
    // test from the machine.
    let log = bpffs.1.with_extension("log");
    let mut child = std::process::Command::new(workspace_bin("kmesh-daemon"))
        .arg("--enroll-netns")
        .arg(&client.netns_path)
        .arg("--cgroup2-path")
        .arg(&node.cgroup)
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .args([
            "--admin-addr",
            &admin.to_string(),
            "--metrics-addr",
            &metrics,
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while http_get(admin, "/debug/ready").map(|r| r.0) != Some(200) {
        if let Some(s) = child.try_wait().unwrap() {
            panic!(
                "daemon exited ({s}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "daemon not ready in 30 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (code, body) = http_get(admin, "/debug/config_dump/dual-engine").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["workloads"].as_array().map(Vec::len), Some(0), "{body}");
    assert_eq!(v["services"].as_array().map(Vec::len), Some(0), "{body}");
    // Nothing routed, nothing denied: a direct connect goes through.
    let r = node.connect(&client, srv.addr4(8080), 1).unwrap();
    assert_eq!(r.count("srv"), 1, "{r:?}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "{text}");
    assert!(
        text.contains("mode dual-engine: no --config and no --xds-address"),
        "{text}"
    );
}
