//! The `kmesh-daemon` binary against the in-process ADS control plane,
//! through the kernel (needs root): services defined only by xDS (a TCP
//! listener, and an HTTP listener whose VIP comes from RDS virtual host
//! domains) are reachable, an endpoint update under load takes effect
//! without one failed connect, a bad listener is NACKed while routing goes
//! on, and the two config dumps agree.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bpf_tests::http_get;
use common::{workspace_bin, TESTPOD};
use kmesh_daemon::xds::fixture::{resources as r, AdsFixture, Kind};
use kmesh_daemon::xds::store::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use kmesh_daemon::xds::to_any;

/// A private bpffs mount, removed on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new() -> Bpffs {
        let dir = std::env::temp_dir().join(format!("kmt-{}-xds.bpffs", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mount bpffs at {}", dir.display());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = http_get(admin, path).unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn service_defined_only_by_xds_is_routed_and_updated_without_failed_connects() {
    bpf_tests::require_root();
    let web: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let api: SocketAddr = "10.96.0.11:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kmx", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv0 = node.add_pod("srv0").unwrap();
    let srv1 = node.add_pod("srv1").unwrap();
    node.serve(&srv0, "srv0", &[srv0.addr4(8080)]).unwrap();
    node.serve(&srv1, "srv1", &[srv1.addr4(8080)]).unwrap();
    node.serve_on_node("node", &[web, api]).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let f = rt.block_on(AdsFixture::start()).unwrap();
    f.set(
        CLUSTER_TYPE,
        vec![
            ("web".into(), to_any(&r::eds_cluster("web"))),
            ("api".into(), to_any(&r::eds_cluster("api"))),
        ],
    );
    f.set(
        ENDPOINT_TYPE,
        vec![
            ("web".into(), to_any(&r::cla("web", &[srv0.addr4(8080)]))),
            ("api".into(), to_any(&r::cla("api", &[srv1.addr4(8080)]))),
        ],
    );
    f.set(
        LISTENER_TYPE,
        vec![
            ("web".into(), to_any(&r::tcp_listener("web", web, "web"))),
            (
                "0.0.0.0_80".into(),
                to_any(&r::http_listener(
                    "0.0.0.0_80",
                    "0.0.0.0:80".parse().unwrap(),
                    "80",
                )),
            ),
        ],
    );
    f.set(
        ROUTE_TYPE,
        vec![(
            "80".into(),
            to_any(&r::route_config(
                "80",
                &[(
                    "api.default.svc.cluster.local:80",
                    vec![
                        "api.default.svc.cluster.local:80".into(),
                        "10.96.0.11".into(),
                        "10.96.0.11:80".into(),
                    ],
                    "api",
                )],
            )),
        )],
    );

    let bpffs = Bpffs::new();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let daemon = Command::new(workspace_bin("kmesh-daemon"))
        .args(["--mode", "kernel-native", "--xds-address"])
        .arg(f.uri())
        .arg("--enroll-netns")
        .arg(&client.netns_path)
        .arg("--cgroup2-path")
        .arg(&node.cgroup)
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .env_remove("XDS_ADDRESS")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    /// Kills the daemon if the test fails before SIGTERM.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = Kill(daemon);
    wait("daemon ready", || {
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "daemon exited early"
        );
        http_get(admin, "/debug/ready").map(|r| r.0) == Some(200)
    });
    // Both services present (the first apply may precede RDS).
    wait("both services in the kernel", || {
        json(admin, "/debug/config_dump/bpf/kernel-native")["services"]
            .as_array()
            .is_some_and(|s| s.len() == 2)
    });

    let r1 = node.connect(&client, web, 10).unwrap();
    assert_eq!((r1.count("srv0"), r1.errors), (10, 0), "{r1:?}");
    let r2 = node.connect(&client, api, 10).unwrap();
    assert_eq!((r2.count("srv1"), r2.errors), (10, 0), "RDS route: {r2:?}");

    // Endpoint update while a client keeps connecting: no failed connect,
    // and the new endpoint starts taking traffic.
    let stop = AtomicBool::new(false);
    let (errors, reached1) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (mut errors, mut reached1) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let r = node.connect(&client, web, 10).unwrap();
                errors += r.errors + r.count("node");
                reached1 += r.count("srv1");
            }
            (errors, reached1)
        });
        std::thread::sleep(Duration::from_millis(300));
        f.set(
            ENDPOINT_TYPE,
            vec![
                (
                    "web".into(),
                    to_any(&r::cla("web", &[srv0.addr4(8080), srv1.addr4(8080)])),
                ),
                ("api".into(), to_any(&r::cla("api", &[srv1.addr4(8080)]))),
            ],
        );
        wait("2 web endpoints in the kernel", || {
            json(admin, "/debug/config_dump/bpf/kernel-native")["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["vip"] == web.to_string() && s["slots"].as_array().unwrap().len() == 2)
        });
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });
    assert_eq!(errors, 0, "connects failed or escaped during the update");
    assert!(reached1 > 0, "the added endpoint got no traffic");

    // A bad listener is NACKed with a readable reason; routing goes on.
    let n = f.events().len();
    let mut bad = r::tcp_listener("bad", "10.96.0.12:80".parse().unwrap(), "web");
    bad.filter_chains.clear();
    f.upsert(LISTENER_TYPE, "bad", to_any(&bad));
    let nack = rt
        .block_on(f.wait_for(n, Duration::from_secs(10), |e| {
            e.type_url == LISTENER_TYPE && e.kind == Kind::Nack
        }))
        .unwrap();
    let msg = nack.error.unwrap();
    assert!(
        msg.contains("listener \"bad\": field filter_chains: listener has no filter chains"),
        "{msg}"
    );
    let r3 = node.connect(&client, web, 4).unwrap();
    assert_eq!(r3.errors, 0, "{r3:?}");
    assert_eq!(r3.count("srv0") + r3.count("srv1"), 4, "{r3:?}");

    // The two dumps agree, and the daemon's names the xDS versions.
    let held = json(admin, "/debug/config_dump/kernel-native");
    let kernel = json(admin, "/debug/config_dump/bpf/kernel-native");
    for s in kernel["services"].as_array().unwrap() {
        let vip = s["vip"].as_str().unwrap();
        assert_eq!(
            held["services"][vip]["slots"], s["slots"],
            "daemon and kernel disagree on {vip}"
        );
    }
    assert_eq!(
        held["services"].as_object().unwrap().len(),
        kernel["services"].as_array().unwrap().len()
    );
    assert!(held["xds"]["resources"]["LDS"]["web"].is_string(), "{held}");
    assert!(held["xds"]["last_nack"]["LDS"]
        .as_str()
        .unwrap()
        .contains("bad"));
    // ...and the NACK and the ACKs are counted in the metrics.
    let (code, text) = bpf_tests::http_get(metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert!(value("kmesh_xds_responses_total{type=\"LDS\",result=\"nack\"}") >= 1.0);
    assert!(value("kmesh_xds_responses_total{type=\"CDS\",result=\"ack\"}") >= 1.0);
    assert!(value("kmesh_xds_streams_total") >= 1.0);

    // SIGTERM: clean exit.
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    wait("daemon exit", || daemon.0.try_wait().unwrap().is_some());
    assert!(!bpffs.0.join("kmesh").exists(), "pins left behind");
    drop(f);
}
