//! The `kmesh-daemon` binary against the in-process ADS control plane,
//! through the kernel (needs root): services defined only by xDS (a TCP
//! listener, and an HTTP listener whose VIP comes from RDS virtual host
//! domains) are reachable, an endpoint update under load takes effect
//! without one failed connect, a bad listener is NACKed while routing goes
//! on, and the two config dumps agree; Istiod's multi-chain listener shapes
//! route exactly the destinations decidable at connect time and leave the
//! others alone, through incremental listener updates and removals.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bpf_tests::http_get;
use common::{free_port, workspace_bin, TESTPOD};
use kmesh_daemon::xds::fixture::{resources as r, AdsFixture, Kind};
use kmesh_daemon::xds::store::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use kmesh_daemon::xds::to_any;

/// A private bpffs mount, removed on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new() -> Bpffs {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kmt-{}-{n}-xds.bpffs", std::process::id()));
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

/// The daemon binary against the fixture at `uri`, with `client` enrolled.
fn spawn_daemon(
    uri: &str,
    node: &bpf_tests::Node,
    client: &bpf_tests::Pod,
    bpffs: &Bpffs,
    admin: SocketAddr,
    metrics: SocketAddr,
) -> std::process::Child {
    Command::new(workspace_bin("kmesh-daemon"))
        .args(["--mode", "kernel-native", "--xds-address"])
        .arg(uri)
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
        .unwrap()
}

/// Kills the daemon if the test fails before SIGTERM.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node with a `client` pod, servers `srv0` and `srv1` on :8080, and a
/// catcher named `node` on `vips` (what reaches it was left alone).
fn node_with_two_servers(
    prefix: &str,
    vips: &[SocketAddr],
) -> (
    bpf_tests::Node,
    bpf_tests::Pod,
    bpf_tests::Pod,
    bpf_tests::Pod,
) {
    bpf_tests::require_root();
    let mut node = bpf_tests::Node::new(prefix, Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv0 = node.add_pod("srv0").unwrap();
    let srv1 = node.add_pod("srv1").unwrap();
    node.serve(&srv0, "srv0", &[srv0.addr4(8080)]).unwrap();
    node.serve(&srv1, "srv1", &[srv1.addr4(8080)]).unwrap();
    node.serve_on_node("node", vips).unwrap();
    (node, client, srv0, srv1)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts the daemon and waits until it is ready: (daemon, admin, metrics).
fn start_daemon(
    uri: &str,
    node: &bpf_tests::Node,
    client: &bpf_tests::Pod,
    bpffs: &Bpffs,
) -> (Kill, SocketAddr, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut daemon = Kill(spawn_daemon(uri, node, client, bpffs, admin, metrics));
    wait("daemon ready", || {
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "daemon exited early"
        );
        http_get(admin, "/debug/ready").map(|r| r.0) == Some(200)
    });
    (daemon, admin, metrics)
}

/// SIGTERM: clean exit, nothing left pinned.
fn stop_daemon(mut daemon: Kill, bpffs: &Bpffs) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    wait("daemon exit", || daemon.0.try_wait().unwrap().is_some());
    assert!(!bpffs.0.join("kmesh").exists(), "pins left behind");
}

#[test]
fn service_defined_only_by_xds_is_routed_and_updated_without_failed_connects() {
    let web: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let api: SocketAddr = "10.96.0.11:80".parse().unwrap();
    let (node, client, srv0, srv1) = node_with_two_servers("kmx", &[web, api]);
    let rt = runtime();
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
    let (daemon, admin, metrics) = start_daemon(&f.uri(), &node, &client, &bpffs);
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

    stop_daemon(daemon, &bpffs);
    drop(f);
}

/// Istiod's shapes (per-port wildcard listener with one chain per VIP, an
/// SNI-matched chain, a passthrough default chain, `virtualOutbound`,
/// ORIGINAL_DST and black-hole clusters): ACKed; the VIP named by a plain
/// prefix chain is routed by the kernel, the VIP whose chain depends on
/// the TLS server name is left alone (the connect reaches the VIP itself).
/// Then listener updates on the incremental path: the SNI condition
/// dropped (the VIP is routed), the listener removed (both left alone).
#[test]
fn istio_multi_chain_listeners_route_only_what_connect_time_decides() {
    let mongo: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let replica: SocketAddr = "10.96.0.21:80".parse().unwrap();
    let (node, client, srv0, srv1) = node_with_two_servers("kmi", &[mongo, replica]);

    let listener = |sni: bool| {
        let sni = if sni {
            ", server_names: [replica.example.com]"
        } else {
            ""
        };
        let tcp = |c: &str| {
            format!(
                "filters: [{{name: envoy.filters.network.tcp_proxy, typed_config: {{\"@type\": {}, stat_prefix: {c}, cluster: {c}}}}}]",
                xds_adapter::TCP_PROXY_TYPE_URL
            )
        };
        format!(
            "static_resources:
  listeners:
  - name: 0.0.0.0_80
    address: {{socket_address: {{address: 0.0.0.0, port_value: 80}}}}
    traffic_direction: OUTBOUND
    bind_to_port: false
    filter_chains:
    - filter_chain_match: {{prefix_ranges: [{{address_prefix: 10.96.0.20, prefix_len: 32}}]}}
      {}
    - filter_chain_match: {{prefix_ranges: [{{address_prefix: 10.96.0.21, prefix_len: 32}}]{sni}}}
      {}
    default_filter_chain:
      name: PassthroughFilterChain
      {}
  - name: virtualOutbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}
    use_original_dst: true
    filter_chains:
    - {}
",
            tcp("mongo"),
            tcp("replica"),
            tcp("PassthroughCluster"),
            tcp("PassthroughCluster"),
        )
    };
    let clusters = format!(
        "static_resources:
  clusters:
  - {{name: PassthroughCluster, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 10s}}
  - {{name: BlackHoleCluster, type: STATIC, connect_timeout: 10s}}
  - name: mongo
    load_assignment: {{cluster_name: mongo, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: 8080}}}}}}}}]}}]}}
  - name: replica
    load_assignment: {{cluster_name: replica, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: 8080}}}}}}}}]}}]}}
",
        srv0.addr4(8080).ip(),
        srv1.addr4(8080).ip()
    );
    let parse = |y: &str| xds_adapter::parse_static_config(y).unwrap();
    let listeners = |sni: bool| {
        parse(&listener(sni))
            .listeners
            .iter()
            .map(|l| (l.name.clone(), to_any(l)))
            .collect::<Vec<_>>()
    };

    let rt = runtime();
    let f = rt.block_on(AdsFixture::start()).unwrap();
    f.set(
        CLUSTER_TYPE,
        parse(&clusters)
            .clusters
            .iter()
            .map(|c| (c.name.clone(), to_any(c)))
            .collect(),
    );
    f.set(LISTENER_TYPE, listeners(true));

    let bpffs = Bpffs::new();
    let (daemon, admin, _) = start_daemon(&f.uri(), &node, &client, &bpffs);
    let services = || -> Vec<String> {
        json(admin, "/debug/config_dump/bpf/kernel-native")["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["vip"].as_str().unwrap().to_string())
            .collect()
    };
    wait("mongo in the kernel", || {
        services() == vec![mongo.to_string()]
    });
    let r = node.connect(&client, mongo, 10).unwrap();
    assert_eq!((r.count("srv0"), r.errors), (10, 0), "{r:?}");
    let r = node.connect(&client, replica, 10).unwrap();
    assert_eq!((r.count("node"), r.errors), (10, 0), "left alone: {r:?}");
    let held = json(admin, "/debug/config_dump/kernel-native");
    let warnings = held["warnings"].to_string();
    assert!(
        warnings.contains("10.96.0.21:80: not installed, connects are left alone"),
        "{held}"
    );
    assert!(
        held["xds"]["last_nack"].as_object().unwrap().is_empty(),
        "{held}"
    );

    // The SNI condition goes: the replica VIP is routed (incremental LDS).
    f.set(LISTENER_TYPE, listeners(false));
    wait("replica in the kernel", || services().len() == 2);
    let r = node.connect(&client, replica, 10).unwrap();
    assert_eq!((r.count("srv1"), r.errors), (10, 0), "{r:?}");
    // The listener goes: both VIPs are left alone again.
    f.set(
        LISTENER_TYPE,
        listeners(false)
            .into_iter()
            .filter(|(n, _)| n == "virtualOutbound")
            .collect(),
    );
    wait("no service in the kernel", || services().is_empty());
    let r = node.connect(&client, mongo, 10).unwrap();
    assert_eq!((r.count("node"), r.errors), (10, 0), "{r:?}");
    let nacks = f
        .events()
        .into_iter()
        .filter(|e| e.kind == Kind::Nack)
        .count();
    assert_eq!(nacks, 0, "{:?}", f.events());

    stop_daemon(daemon, &bpffs);
    drop(f);
}
