//! Shared setup of the kernel tests: a node with a client pod and server
//! pods, a loaded dataplane attached to the node cgroup, and config
//! documents in the Envoy bootstrap format users write.
#![allow(dead_code)]

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use bpf_tests::{Node, Pod};
use kmesh_daemon::dataplane::{Dataplane, DataplaneOptions};

pub const TESTPOD: &str = env!("CARGO_BIN_EXE_kmesh-testpod");

/// Field order matters: the dataplane is dropped (detached) before the
/// node's cgroups and namespaces are removed.
pub struct Mesh {
    pub dp: Dataplane,
    pub node: Node,
    pub client: Pod,
    pub servers: Vec<Pod>,
}

/// A cluster in a generated bootstrap: name, LB policy, (endpoint, weight).
pub struct ClusterSpec<'a> {
    pub name: &'a str,
    pub lb: &'a str,
    pub endpoints: Vec<(SocketAddr, u32)>,
}

/// A listener: name, VIP, and either one cluster or weighted clusters.
pub struct ListenerSpec<'a> {
    pub name: &'a str,
    pub vip: SocketAddr,
    pub clusters: Vec<(&'a str, u32)>,
}

/// An Envoy v3 bootstrap with these listeners and clusters.
pub fn bootstrap(listeners: &[ListenerSpec], clusters: &[ClusterSpec]) -> String {
    let mut y = String::from("static_resources:\n  listeners:\n");
    for l in listeners {
        writeln!(y, "  - name: {}", l.name).unwrap();
        writeln!(
            y,
            "    address: {{ socket_address: {{ address: \"{}\", port_value: {} }} }}",
            l.vip.ip(),
            l.vip.port()
        )
        .unwrap();
        y.push_str("    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n");
        writeln!(y, "          stat_prefix: {}", l.name).unwrap();
        if l.clusters.len() == 1 {
            writeln!(y, "          cluster: {}", l.clusters[0].0).unwrap();
        } else {
            y.push_str("          weighted_clusters:\n            clusters:\n");
            for (c, w) in &l.clusters {
                writeln!(y, "            - {{ name: {c}, weight: {w} }}").unwrap();
            }
        }
    }
    y.push_str("  clusters:\n");
    for c in clusters {
        writeln!(
            y,
            "  - name: {}\n    connect_timeout: 1s\n    type: STATIC\n    lb_policy: {}",
            c.name, c.lb
        )
        .unwrap();
        writeln!(
            y,
            "    load_assignment:\n      cluster_name: {}\n      endpoints:\n      - lb_endpoints:",
            c.name
        )
        .unwrap();
        for (a, w) in &c.endpoints {
            writeln!(
                y,
                "        - endpoint: {{ address: {{ socket_address: {{ address: \"{}\", port_value: {} }} }} }}\n          load_balancing_weight: {w}",
                a.ip(),
                a.port()
            )
            .unwrap();
        }
    }
    y
}

/// A bootstrap with one listener `web` on `vip` and one cluster `web`.
pub fn one_service(vip: SocketAddr, lb: &str, endpoints: Vec<(SocketAddr, u32)>) -> String {
    bootstrap(
        &[ListenerSpec {
            name: "web",
            vip,
            clusters: vec![("web", 1)],
        }],
        &[ClusterSpec {
            name: "web",
            lb,
            endpoints,
        }],
    )
}

/// Compiles a bootstrap document, panicking with the adapter's errors.
pub fn compile(yaml: &str) -> xds_adapter::FlatConfig {
    xds_adapter::compile_static_config(yaml)
        .unwrap_or_else(|e| panic!("config rejected:\n{e}\n{yaml}"))
}

/// A node with one client pod (enrolled) and `n` server pods, each running
/// a server named after the pod on port 8080 (v4 and v6), and a catcher
/// named `node` answering on `catch` addresses in the node namespace.
pub fn mesh(n: usize, catch: &[SocketAddr]) -> Mesh {
    mesh_with(n, catch, &DataplaneOptions::default())
}

/// [`mesh`] with dataplane options.
pub fn mesh_with(n: usize, catch: &[SocketAddr], opts: &DataplaneOptions) -> Mesh {
    bpf_tests::require_root();
    let mut node = Node::new("kmt", std::path::Path::new(TESTPOD)).expect("node");
    let client = node.add_pod("client").expect("client pod");
    let mut servers = Vec::new();
    for i in 0..n {
        let pod = node.add_pod(&format!("srv{i}")).expect("server pod");
        node.serve(&pod, &pod.name.clone(), &[pod.addr4(8080), pod.addr6(8080)])
            .expect("server");
        servers.push(pod);
    }
    if !catch.is_empty() {
        node.serve_on_node("node", catch).expect("catcher");
    }
    let mut dp = Dataplane::load(opts).expect("load dataplane");
    let cookie = kmesh_daemon::netns::cookie_of(&client.netns_path).expect("netns cookie");
    dp.enroll(cookie).expect("enroll");
    dp.attach(&node.cgroup).expect("attach");
    Mesh {
        dp,
        node,
        client,
        servers,
    }
}

/// Number of CPUs: round robin is per CPU, so counts may differ by this much.
pub fn ncpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Path of a workspace binary built next to the test executable.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p kmesh-daemon` first (cargo xtask test does)",
        p.display()
    );
    p
}

/// A private bpffs mount (`.0`) and a config file path (`.1`), both
/// removed on drop.
pub struct Bpffs(pub PathBuf, pub PathBuf);

impl Bpffs {
    pub fn new(tag: &str) -> Bpffs {
        let base = std::env::temp_dir().join(format!("kmt-{}-{tag}", std::process::id()));
        let dir = base.with_extension("bpffs");
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mount bpffs at {}", dir.display());
        Bpffs(dir, base.with_extension("yaml"))
    }

    pub fn write_config(&self, text: &str) -> &Path {
        std::fs::write(&self.1, text).unwrap();
        &self.1
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Pinned links left by a test that failed are removed with the mount.
        let _ = std::fs::remove_dir_all(self.0.join("kmesh"));
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
        let _ = std::fs::remove_file(&self.1);
    }
}

/// A loopback port that was free a moment ago and that no other caller
/// in this process got: tests of one binary run in parallel, and the
/// kernel may hand the same just-released port to two of them.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running `kmesh-daemon` binary; SIGKILLed on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub admin: SocketAddr,
    /// Where it serves /metrics.
    pub metrics: SocketAddr,
}

impl Daemon {
    /// Starts the daemon on `config`, enrolling `client`, attached to
    /// `cgroup`, pinning under `bpffs`, and waits until it is ready. The
    /// mode is `--mode kernel-native` (configs are Envoy bootstraps)
    /// unless `extra` names one.
    pub fn start(
        config: &Path,
        client: &Pod,
        cgroup: &Path,
        bpffs: &Path,
        extra: &[&str],
    ) -> Daemon {
        let mut d = Daemon::spawn(config, client, cgroup, bpffs, extra);
        d.wait_ready(Duration::from_secs(30));
        d
    }

    /// [`Daemon::start`] without waiting for readiness.
    pub fn spawn(
        config: &Path,
        client: &Pod,
        cgroup: &Path,
        bpffs: &Path,
        extra: &[&str],
    ) -> Daemon {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mode: &[&str] = if extra.contains(&"--mode") {
            &[]
        } else {
            &["--mode", "kernel-native"]
        };
        let child = Command::new(workspace_bin("kmesh-daemon"))
            .args(mode)
            .arg("--config")
            .arg(config)
            .arg("--enroll-netns")
            .arg(&client.netns_path)
            .arg("--cgroup2-path")
            .arg(cgroup)
            .arg("--bpf-fs-path")
            .arg(bpffs)
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(extra)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Daemon {
            child,
            admin,
            metrics,
        }
    }

    /// Whether the admin API answers ready now.
    pub fn is_ready(&self) -> bool {
        bpf_tests::http_get(self.admin, "/debug/ready").map(|r| r.0) == Some(200)
    }

    /// Waits until the daemon is ready; panics if it exits or `limit` passes.
    pub fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.is_ready() {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "daemon exited early"
            );
            assert!(Instant::now() < deadline, "daemon not ready in {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits (10 s at most) for the daemon to exit.
    pub fn signal(&mut self, sig: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "daemon ignored signal {sig}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The Envoy binary: `KMESH_TEST_ENVOY`, else the one `cargo xtask setup`
/// installs in `target/venv`.
pub fn envoy_path() -> PathBuf {
    let p = std::env::var_os("KMESH_TEST_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/envoy")
        });
    assert!(
        p.exists(),
        "Envoy not found at {} (hint: `cargo xtask test` installs it; or set KMESH_TEST_ENVOY)",
        p.display()
    );
    p
}
