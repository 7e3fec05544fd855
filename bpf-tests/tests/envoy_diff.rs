//! Differential L4 routing against real Envoy (`KMESH_TEST_ENVOY`, or the
//! one `cargo xtask setup` installs): the same listeners and clusters (an
//! Istio-style wildcard listener with one filter chain per VIP, a
//! weighted tcp_proxy listener, round robin and random clusters) are given
//! to Envoy, running as a proxy in a pod of its own, and to the kernel
//! dataplane. For every VIP, connects through each land on the same set of
//! backends. (Needs root.)

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mesh;

/// Envoy, killed on drop.
struct Envoy(Child, PathBuf);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

#[test]
fn kernel_and_envoy_route_each_vip_to_the_same_backends() {
    let a: SocketAddr = "10.96.0.30:80".parse().unwrap();
    let b: SocketAddr = "10.96.0.31:80".parse().unwrap();
    let c: SocketAddr = "10.96.0.32:9080".parse().unwrap();
    let mut m = mesh(4, &[]);
    let envoy_pod = m.node.add_pod("envoy").expect("envoy pod");
    let s = |i: usize| m.servers[i].addr4(8080);
    let tcp = |cluster: &str| {
        format!(
            "filters: [{{name: envoy.filters.network.tcp_proxy, typed_config: {{\"@type\": {}, stat_prefix: {cluster}, cluster: {cluster}}}}}]",
            xds_adapter::TCP_PROXY_TYPE_URL
        )
    };
    let cluster = |name: &str, lb: &str, eps: &[SocketAddr]| {
        let eps: Vec<String> = eps
            .iter()
            .map(|e| {
                format!(
                    "{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}",
                    e.ip(),
                    e.port()
                )
            })
            .collect();
        format!(
            "  - {{name: {name}, type: STATIC, connect_timeout: 1s, lb_policy: {lb}, load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{}]}}]}}}}\n",
            eps.join(", ")
        )
    };
    // Static resources both sides take.
    let resources = format!(
        "static_resources:
  listeners:
  - name: 0.0.0.0_80
    address: {{socket_address: {{address: 0.0.0.0, port_value: 80}}}}
    filter_chains:
    - filter_chain_match: {{prefix_ranges: [{{address_prefix: {}, prefix_len: 32}}]}}
      {}
    - filter_chain_match: {{prefix_ranges: [{{address_prefix: {}, prefix_len: 32}}]}}
      {}
  - name: c_9080
    address: {{socket_address: {{address: {}, port_value: 9080}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": {}
          stat_prefix: c
          weighted_clusters: {{clusters: [{{name: first, weight: 1}}, {{name: rest, weight: 3}}]}}
  clusters:
{}{}{}{}",
        a.ip(),
        tcp("first"),
        b.ip(),
        tcp("rest"),
        c.ip(),
        xds_adapter::TCP_PROXY_TYPE_URL,
        cluster("first", "ROUND_ROBIN", &[s(0)]),
        cluster("rest", "RANDOM", &[s(1), s(2), s(3)]),
        // Unused by the listeners: both must ignore it.
        cluster("spare", "ROUND_ROBIN", &[s(0)]),
        "",
    );

    // The kernel side: the adapter's compile, written to the maps.
    let flat = xds_adapter::compile_static_config(&resources)
        .unwrap_or_else(|e| panic!("{e}\n{resources}"));
    assert_eq!(flat.services.len(), 3, "{:?}", flat.warnings);
    m.dp.apply(&flat).expect("apply");

    // The Envoy side: the VIPs are local to the Envoy pod (on its
    // loopback), so its connects reach Envoy's listeners; Envoy's own
    // upstream connects go out over the pod network. That pod is not
    // enrolled: the kernel programs leave it alone.
    for v in [a, b, c] {
        bpf_tests::ip(&[
            "-n",
            &envoy_pod.netns,
            "addr",
            "add",
            &format!("{}/32", v.ip()),
            "dev",
            "lo",
        ])
        .expect("VIP on the Envoy pod's loopback");
    }
    let bootstrap = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}\n{resources}"
    );
    let file = std::env::temp_dir().join(format!("kmt-{}-envoy-diff.yaml", std::process::id()));
    std::fs::write(&file, &bootstrap).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net={}", envoy_pod.netns_path.display()))
        .arg("--")
        .arg(kmesh_daemon::xds::fixture::envoy_binary())
        .args(["--disable-hot-restart", "--log-level", "warn", "-c"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start Envoy");
    let _envoy = Envoy(child, file);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = m.node.connect_timeout(&envoy_pod, c, 1, 500).unwrap();
        if r.errors == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy did not start listening: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    for (vip, want) in [
        (a, vec!["srv0"]),
        (b, vec!["srv1", "srv2", "srv3"]),
        (c, vec!["srv0", "srv1", "srv2", "srv3"]),
    ] {
        let kernel = m.node.connect(&m.client, vip, 80).unwrap();
        let envoy = m.node.connect(&envoy_pod, vip, 80).unwrap();
        assert_eq!(
            (kernel.errors, envoy.errors),
            (0, 0),
            "{vip}: {kernel:?} {envoy:?}"
        );
        let names = |r: &bpf_tests::ConnectReport| -> BTreeSet<String> {
            r.backends.keys().cloned().collect()
        };
        let want: BTreeSet<String> = want.into_iter().map(String::from).collect();
        assert_eq!(names(&kernel), want, "{vip} through the kernel: {kernel:?}");
        assert_eq!(names(&envoy), want, "{vip} through Envoy: {envoy:?}");
        if vip == c {
            // weighted_clusters 1:3 → srv0 gets a quarter in both (loose:
            // Envoy draws at random).
            for r in [&kernel, &envoy] {
                let share = r.count("srv0") as f64 / r.total() as f64;
                assert!(
                    (0.08..=0.45).contains(&share),
                    "{vip}: srv0 share {share}: {r:?}"
                );
            }
        }
    }
}
