//! `kmesh-daemon` (default mode, dual-engine) against the in-process
//! control plane serving the Istio workload API, through the kernel (needs
//! root): workloads, a service and a DENY policy that arrive only over
//! delta ADS route a real connection through the VIP and drop the denied
//! source's SYN; removing the policy over xDS lets it through.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use bpf_tests::http_get;
use common::{free_port, workspace_bin, Bpffs, TESTPOD};
use kmesh_daemon::xds::fixture::{workload_api as wa, AdsFixture, Kind};
use xds_adapter::workload::api::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

/// SIGKILLs the daemon if the test fails before it is stopped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn workload_service_and_deny_policy_from_xds_route_and_authorize() {
    bpf_tests::require_root();
    let vip: SocketAddr = "10.96.0.40:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kwx", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap(); // frontend/web
    let evil = node.add_pod("evil").unwrap(); // frontend/evil
    let srv = node.add_pod("srv0").unwrap(); // backend/db
    node.serve(&srv, "srv0", &[srv.addr4(8080)]).unwrap();
    let ip = |p: &bpf_tests::Pod| p.addr4(0).ip();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let f = rt.block_on(AdsFixture::start()).unwrap();
    let db = wa::service("backend", "db", vip.ip(), &[(80, 8080)]);
    let key = wa::service_key(&db);
    f.set(
        ADDRESS_TYPE,
        vec![
            (key.clone(), wa::service_any(&db)),
            (
                wa::uid("frontend", "client"),
                wa::workload_any(&wa::workload("frontend", "client", "web", ip(&client), &[])),
            ),
            (
                wa::uid("frontend", "evil"),
                wa::workload_any(&wa::workload("frontend", "evil", "evil", ip(&evil), &[])),
            ),
            (
                wa::uid("backend", "srv0"),
                wa::workload_any(&wa::workload(
                    "backend",
                    "srv0",
                    "db",
                    ip(&srv),
                    &[(&key, 80, 8080)],
                )),
            ),
        ],
    );
    f.set(
        AUTHORIZATION_TYPE,
        vec![(
            "backend/no-evil".into(),
            wa::policy_any(&wa::deny_principals(
                "backend",
                "no-evil",
                &["cluster.local/ns/frontend/sa/evil"],
            )),
        )],
    );

    let bpffs = Bpffs::new("wxds");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let log = bpffs.1.with_extension("log");
    // No --mode: dual-engine is the default.
    let mut daemon = Child(
        Command::new(workspace_bin("kmesh-daemon"))
            .arg("--xds-address")
            .arg(f.uri())
            .arg("--enroll-netns")
            .arg(&client.netns_path)
            .arg("--enroll-netns")
            .arg(&srv.netns_path)
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
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/debug/ready").map(|r| r.0) != Some(200) {
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "daemon exited early"
        );
        assert!(Instant::now() < deadline, "daemon not ready in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    for t in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        rt.block_on(f.wait_for(0, Duration::from_secs(10), |e| {
            e.type_url == t && e.kind == Kind::Ack
        }))
        .unwrap();
    }

    // Routed: the VIP exists only in the workload API.
    let r = node.connect(&client, vip, 5).unwrap();
    assert_eq!((r.count("srv0"), r.errors), (5, 0), "{r:?}");
    // Denied: evil's SYN to srv0 is dropped by XDP.
    let r = node
        .connect_timeout(&evil, srv.addr4(8080), 1, 400)
        .unwrap();
    assert_eq!((r.count("srv0"), r.errors), (0, 1), "{r:?}");
    let (_, body) = http_get(admin, "/debug/config_dump/bpf/dual-engine").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["policy_decisions"]["backend/no-evil"].as_u64().unwrap() >= 1,
        "{body}"
    );

    // The policy is removed over xDS: evil gets through.
    let from = f.events().len();
    f.remove(AUTHORIZATION_TYPE, "backend/no-evil");
    rt.block_on(f.wait_for(from, Duration::from_secs(10), |e| {
        e.type_url == AUTHORIZATION_TYPE && e.kind == Kind::Ack
    }))
    .unwrap();
    let r = node
        .connect_timeout(&evil, srv.addr4(8080), 1, 1000)
        .unwrap();
    assert_eq!((r.count("srv0"), r.errors), (1, 0), "{r:?}");
    let (_, body) = http_get(admin, "/debug/config_dump/dual-engine").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["policies"].as_array().map(Vec::len), Some(0), "{body}");
    assert_eq!(v["workloads"].as_array().map(Vec::len), Some(3), "{body}");
    assert_eq!(
        v["xds"]["resources"]["WDS"].as_object().map(|m| m.len()),
        Some(4),
        "{body}"
    );
    assert!(v["xds"]["accepted_versions"]["AUTHZ"].is_string(), "{body}");

    // SIGTERM: clean exit (programs detached, pins removed).
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let status = daemon.0.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "{status}\n{text}");
    // The access log names the policy that arrived over xDS.
    let line = format!(
        "authz deny src={} dst={} reason=policy policy=backend/no-evil",
        ip(&evil),
        srv.addr4(8080)
    );
    assert!(text.contains(&line), "{line} not in:\n{text}");
    assert!(!bpffs.0.join("kmesh").join("KM_SERVICE").exists());
}
