//! HTTP/1.1 through each data path, side by side, in one run.
//!
//! The test bed: one node (network namespace + bridge + cgroup) with a
//! `client` pod and a `server` pod. The server pod runs the upstream
//! (`kmesh-testpod http`, release build) on :8080. The client pod runs
//! wrk. Every process is put in its own leaf cgroup so its CPU time can be
//! read from `cpu.stat`:
//!
//! ```text
//! <node>/client/app    wrk                    <node>/server/app    upstream :8080
//! <node>/client/proxy  outbound Envoy sidecar <node>/server/proxy  inbound Envoy sidecar :15006
//! <node>/nodeproxy     node Envoy (in the node namespace, 10.244.0.1:15008)
//! ```
//!
//! Scenarios (the client dials, explicitly, because nothing captures
//! traffic with iptables here):
//! - no mesh: `server:8080`;
//! - kmesh-rs L4: the VIP `10.96.0.10:80`, rewritten at connect() by the
//!   real `kmesh-daemon` (started for these runs only, attached to the
//!   node cgroup, client netns enrolled);
//! - Envoy sidecars: the client's Envoy at `127.0.0.1:15001` (HTTP
//!   connection manager) → the server's Envoy at `server:15006` (HTTP
//!   connection manager) → `127.0.0.1:8080`, as Istio's sidecar mode places
//!   them, without mTLS;
//! - Envoy node proxy: `10.244.0.1:15008` (tcp_proxy, one hop, like an
//!   ambient node proxy without mTLS) → `server:8080`.
//!
//! Everything stays inside the node's namespaces; admin ports are on each
//! namespace's 127.0.0.1.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use bpf_tests::{http_get, Node, Pod};

use super::{
    stats::{cgroup_usage_usec, parse_wrk, proc_stat_busy, proc_stat_ticks, WrkResult},
    Opts,
};

pub const VIP: &str = "10.96.0.10:80";
/// The HTTP service routed per request (kmesh-rs L7).
pub const VIP_L7: &str = "10.96.0.12:80";
/// Where the L7 connector listens: the node namespace, reachable from pods.
const L7_CONNECTOR: &str = "10.244.0.1:15016";
const UPSTREAM_PORT: u16 = 8080;
const SIDECAR_OUT: &str = "127.0.0.1:15001";
const SIDECAR_IN_PORT: u16 = 15006;
const NODE_PROXY: &str = "10.244.0.1:15008";
const ENVOY_ADMIN: &str = "127.0.0.1:15000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    NoMesh,
    KmeshL4,
    KmeshL7,
    Sidecars,
    NodeProxy,
}

pub const SCENARIOS: [Scenario; 5] = [
    Scenario::NoMesh,
    Scenario::KmeshL4,
    Scenario::KmeshL7,
    Scenario::Sidecars,
    Scenario::NodeProxy,
];

impl Scenario {
    pub fn label(self) -> &'static str {
        match self {
            Scenario::NoMesh => "no mesh (baseline)",
            Scenario::KmeshL4 => "kmesh-rs L4",
            Scenario::KmeshL7 => "kmesh-rs L7 (kernel decision + connector)",
            Scenario::Sidecars => "Envoy sidecars (2 hops)",
            Scenario::NodeProxy => "Envoy node proxy (1 hop)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    ConnPerRequest,
}

pub const MODES: [Mode; 2] = [Mode::KeepAlive, Mode::ConnPerRequest];

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::ConnPerRequest => "new connection per request",
        }
    }
}

/// One measured wrk run and the CPU spent during it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub rep: usize,
    pub mode: Mode,
    pub conns: usize,
    pub scenario: Scenario,
    pub wrk: WrkResult,
    /// CPU seconds of what the mesh adds: daemon + kernel program time
    /// (kmesh-rs), or the proxies' cgroups (Envoy).
    pub mesh_cpu_s: f64,
    /// CPU seconds of everything: client + upstream cgroups + the mesh.
    pub total_cpu_s: f64,
    pub client_cpu_s: f64,
    pub server_cpu_s: f64,
    /// Kernel program time and runs (kmesh-rs only).
    pub bpf_ns: u64,
    pub bpf_runs: u64,
    /// `connect_redirected` counted by the kernel during the run (kmesh-rs).
    pub redirected: u64,
    /// Cores busy on the whole machine during the run but not accounted to
    /// this run (other processes on a shared machine).
    pub other_cores: f64,
}

pub struct HttpResults {
    pub samples: Vec<Sample>,
}

/// A process we started; stopped (SIGTERM, then SIGKILL after 5 s) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) used so far, all threads.
    pub fn cpu_s(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        proc_stat_ticks(&stat).unwrap_or(0) as f64 / clk_tck()
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn stdout_line(&mut self) -> anyhow::Result<String> {
        let out = self
            .child
            .stdout
            .take()
            .with_context(|| format!("{}: stdout not piped", self.name))?;
        let mut r = BufReader::new(out);
        let mut line = String::new();
        r.read_line(&mut line)?;
        Ok(line)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds used by a cgroup and its descendants so far.
pub fn cgroup_cpu_s(cg: &Path) -> f64 {
    let stat = std::fs::read_to_string(cg.join("cpu.stat")).unwrap_or_default();
    cgroup_usage_usec(&stat).unwrap_or(0) as f64 / 1e6
}

/// A command that joins `cgroup`, raises the fd limit to the hard limit, and runs `program`
/// in the network namespace `netns` (an `ip netns` name). `ip netns exec`
/// execs in place, so the returned child's pid is the program's.
pub fn in_pod(netns: &str, cgroup: &Path, program: &Path, args: &[String]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"cg=$1; ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && ulimit -n "$(ulimit -Hn)" && exec ip netns exec "$ns" "$@""#)
        .arg("sh")
        .arg(cgroup)
        .arg(netns)
        .arg(program)
        .args(args);
    c
}

/// Runs `f` on a thread that has entered the network namespace at `path`
/// (the caller's namespace is untouched).
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let ns = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: `ns` is an open netns fd; setns changes only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!(
                "setns: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// A free TCP port on the host's 127.0.0.1 (for the daemon's admin API).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The node, its pods and every long-lived process of the bench. Field
/// order is drop order: processes stop before the namespaces go.
pub struct Bed {
    upstream: Proc,
    envoys: Vec<Proc>,
    pub node: Node,
    pub client: Pod,
    pub server: Pod,
    pub rel: PathBuf,
    client_app: PathBuf,
    client_proxy: PathBuf,
    server_app: PathBuf,
    server_proxy: PathBuf,
    node_proxy: PathBuf,
    files: Vec<PathBuf>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// A running kmesh-daemon with a config; SIGTERM on drop (which detaches
/// its programs and removes its pins), then its files are removed.
pub struct Daemon {
    pub proc: Proc,
    pub admin: SocketAddr,
    /// From spawn to `/debug/ready` answering 200.
    pub ready_after: Duration,
    /// Kernel ids and names of the programs attached to the node cgroup.
    pub programs: Vec<(u32, String)>,
    files: Vec<PathBuf>,
    bpffs_dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; Proc's drop then waits for it.
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.proc.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir(&self.bpffs_dir);
    }
}

impl Daemon {
    /// Kernel counters, read back by the daemon from its maps.
    pub fn kernel_stat(&self, name: &str) -> anyhow::Result<u64> {
        let (code, body) = http_get(self.admin, "/debug/config_dump/bpf/kernel-native")
            .context("daemon admin API not answering")?;
        ensure!(code == 200, "bpf config dump answered {code}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v["stats"][name]
            .as_u64()
            .with_context(|| format!("no kernel counter {name} in {body}"))
    }

    /// Connects the kernel sent elsewhere: to a backend (L4), or to the
    /// connector (`l7_steered`, L7).
    pub fn redirected(&self, scenario: Scenario) -> anyhow::Result<u64> {
        if scenario != Scenario::KmeshL7 {
            return self.kernel_stat("connect_redirected");
        }
        let (code, body) = http_get(self.admin, "/debug/l7").context("daemon admin API")?;
        ensure!(code == 200, "/debug/l7 answered {code}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v["l7_steered"]
            .as_u64()
            .with_context(|| format!("no l7_steered in {body}"))
    }

    /// Summed run time (ns) and run count of the named programs, or of all
    /// of the daemon's programs when `only` is empty (bpf_stats).
    pub fn bpf_stats(&self, only: &[&str]) -> anyhow::Result<(u64, u64)> {
        let ids: Vec<u32> = self
            .programs
            .iter()
            .filter(|(_, n)| only.is_empty() || only.contains(&n.as_str()))
            .map(|(id, _)| *id)
            .collect();
        ensure!(
            !ids.is_empty(),
            "no program {only:?} attached by the daemon"
        );
        let (mut ns, mut cnt) = (0u64, 0u64);
        for p in aya::programs::loaded_programs() {
            let p = p.context("listing loaded BPF programs")?;
            if ids.contains(&p.id()) {
                ns += p.run_time().as_nanos() as u64;
                cnt += p.run_count();
            }
        }
        Ok((ns, cnt))
    }
}

fn envoy_common(admin: &str) -> String {
    let (ip, port) = admin.rsplit_once(':').expect("host:port");
    format!("admin:\n  address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}\n")
}

fn cluster(name: &str, to: SocketAddr) -> String {
    // Istio raises the circuit breakers far beyond Envoy's defaults (1,024),
    // which would otherwise turn the 1,024-connection runs into 503s.
    format!(
        "  - name: {name}
    connect_timeout: 2s
    type: STATIC
    lb_policy: ROUND_ROBIN
    circuit_breakers:
      thresholds:
      - {{ max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000, max_retries: 1000000 }}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}
",
        to.ip(),
        to.port()
    )
}

/// An Envoy with one HTTP connection manager listener routing everything
/// to one upstream.
pub fn envoy_http(listen: SocketAddr, to: SocketAddr) -> String {
    format!(
        "{}static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: {}, port_value: {} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/\" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{}",
        envoy_common(ENVOY_ADMIN),
        listen.ip(),
        listen.port(),
        cluster("upstream", to)
    )
}

/// An Envoy with one tcp_proxy listener to one upstream.
pub fn envoy_tcp(listen: SocketAddr, to: SocketAddr) -> String {
    format!(
        "{}static_resources:
  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: {}, port_value: {} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: upstream
  clusters:
{}",
        envoy_common(ENVOY_ADMIN),
        listen.ip(),
        listen.port(),
        cluster("upstream", to)
    )
}

/// A STATIC round-robin cluster `name` with one endpoint, as a YAML list item.
fn static_cluster(name: &str, backend: SocketAddr) -> String {
    format!(
        "  - name: {name}
    connect_timeout: 1s
    type: STATIC
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}
",
        backend.ip(),
        backend.port()
    )
}

/// The kmesh-rs config of the L7 runs: an HTTP listener on `vip` whose
/// route depends on the request (`/admin` goes to another cluster), so
/// every request is decided per request; the catch-all reaches `backend`.
pub fn mesh_config_l7(vip: SocketAddr, backend: SocketAddr) -> String {
    let c = |name: &str| static_cluster(name, backend);
    format!(
        "static_resources:
  listeners:
  - name: web
    address: {{ socket_address: {{ address: {}, port_value: {} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: web
          route_config:
            name: web
            virtual_hosts:
            - name: web
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/admin\" }}
                route: {{ cluster: admin }}
              - match: {{ prefix: \"/\" }}
                route: {{ cluster: web }}
  clusters:
{}{}",
        vip.ip(),
        vip.port(),
        c("web"),
        c("admin")
    )
}

/// The kmesh-rs config of the HTTP runs: one service, VIP → the upstream.
pub fn mesh_config(vip: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "static_resources:
  listeners:
  - name: web
    address: {{ socket_address: {{ address: {}, port_value: {} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: web
          cluster: web
  clusters:
{}",
        vip.ip(),
        vip.port(),
        static_cluster("web", backend)
    )
}

impl Bed {
    pub fn new(envoy: &Path, rel: &Path) -> anyhow::Result<Bed> {
        crate::step("test bed: node namespace, client and server pods, upstream, Envoys");
        sweep_stale_bpffs_dirs();
        let testpod = rel.join("kmesh-testpod");
        let mut node = Node::new("kmbench", &testpod)?;
        let client = node.add_pod("client")?;
        let server = node.add_pod("server")?;
        let mkcg = |p: PathBuf| -> anyhow::Result<PathBuf> {
            std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
            Ok(p)
        };
        let client_app = mkcg(client.cgroup.join("app"))?;
        let client_proxy = mkcg(client.cgroup.join("proxy"))?;
        let server_app = mkcg(server.cgroup.join("app"))?;
        let server_proxy = mkcg(server.cgroup.join("proxy"))?;
        let node_proxy = mkcg(node.cgroup.join("nodeproxy"))?;
        // New-connection-per-request runs open tens of thousands of
        // connections per second: widen the port range and let connects
        // reuse TIME_WAIT ports, in every namespace that opens connections.
        for ns in [&client.netns, &server.netns, &node.name] {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "sh", "-c"])
                .arg("echo '1024 65000' > /proc/sys/net/ipv4/ip_local_port_range && echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse")
                .output()?;
            ensure!(
                out.status.success(),
                "setting sysctls in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Echo server for the connect-cost runs (answers with its name).
        node.serve(&server, "server", &[server.addr4(9090)])?;

        let mut upstream = Proc::spawn(
            "upstream",
            Command::new(&testpod)
                .arg("--netns")
                .arg(&server.netns_path)
                .arg("--cgroup")
                .arg(&server_app)
                .arg("http")
                .arg(format!("0.0.0.0:{UPSTREAM_PORT}"))
                .stdout(Stdio::piped()),
        )?;
        let line = upstream.stdout_line()?;
        ensure!(line.trim() == "ready", "upstream did not start: {line:?}");

        let mut bed = Bed {
            upstream,
            envoys: Vec::new(),
            node,
            client,
            server,
            rel: rel.to_path_buf(),
            client_app,
            client_proxy,
            server_app,
            server_proxy,
            node_proxy,
            files: Vec::new(),
        };
        let upstream_addr = bed.server.addr4(UPSTREAM_PORT);
        let inbound = bed.server.addr4(SIDECAR_IN_PORT);
        let local_upstream: SocketAddr = format!("127.0.0.1:{UPSTREAM_PORT}").parse()?;
        let envoys = [
            (
                "envoy-server-sidecar",
                bed.server.netns.clone(),
                bed.server.netns_path.clone(),
                bed.server_proxy.clone(),
                envoy_http(inbound, local_upstream),
            ),
            (
                "envoy-client-sidecar",
                bed.client.netns.clone(),
                bed.client.netns_path.clone(),
                bed.client_proxy.clone(),
                envoy_http(SIDECAR_OUT.parse()?, inbound),
            ),
            (
                "envoy-node-proxy",
                bed.node.name.clone(),
                bed.node.netns_path(),
                bed.node_proxy.clone(),
                envoy_tcp(NODE_PROXY.parse()?, upstream_addr),
            ),
        ];
        for (name, ns, ns_path, cg, yaml) in envoys {
            let cfg = std::env::temp_dir().join(format!("{}-{name}.yaml", bed.node.name));
            let log = std::env::temp_dir().join(format!("{}-{name}.log", bed.node.name));
            std::fs::write(&cfg, yaml)?;
            bed.files.push(cfg.clone());
            bed.files.push(log.clone());
            // Istio's sidecar default is 2 worker threads; the node proxy
            // gets the same (this machine has 2 cores).
            let args: Vec<String> = [
                "-c",
                &cfg.to_string_lossy(),
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "--log-level",
                "error",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut p = Proc::spawn(
                name,
                in_pod(&ns, &cg, envoy, &args)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?),
            )?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let admin: SocketAddr = ENVOY_ADMIN.parse()?;
                let ready = in_netns(&ns_path, move || http_get(admin, "/ready"))?;
                if ready.is_some_and(|r| r.0 == 200) {
                    break;
                }
                if let Some(s) = p.exited() {
                    bail!(
                        "{name} exited ({s}) before it was ready; its log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                ensure!(Instant::now() < deadline, "{name} not ready after 60 s");
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("    {name}: ready (pid {})", p.pid());
            bed.envoys.push(p);
        }
        eprintln!(
            "    client {} · server {} · upstream pid {}",
            bed.client.ip4,
            bed.server.ip4,
            bed.upstream.pid()
        );
        Ok(bed)
    }

    /// Starts kmesh-daemon on `config` (Envoy bootstrap text), enrolling
    /// the client pod and attaching to the node cgroup; waits until ready.
    pub fn start_daemon(&self, config: &str) -> anyhow::Result<Daemon> {
        self.start_daemon_with(config, &[])
    }

    /// [`Bed::start_daemon`] with extra daemon flags.
    pub fn start_daemon_with(&self, config: &str, extra: &[String]) -> anyhow::Result<Daemon> {
        let tag = format!("{}-{}", self.node.name, free_port()?);
        let cfg = std::env::temp_dir().join(format!("{tag}-mesh.yaml"));
        let log = std::env::temp_dir().join(format!("{tag}-daemon.log"));
        std::fs::write(&cfg, config)?;
        // Our own directory on the bpffs: pins never collide with another
        // daemon on this machine.
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(&tag);
        std::fs::create_dir_all(&bpffs_dir)
            .with_context(|| format!("mkdir {}", bpffs_dir.display()))?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let started = Instant::now();
        let proc = Proc::spawn(
            "kmesh-daemon",
            Command::new(self.rel.join("kmesh-daemon"))
                .args(["--mode", "kernel-native", "--config"])
                .arg(&cfg)
                .arg("--enroll-netns")
                .arg(&self.client.netns_path)
                .arg("--cgroup2-path")
                .arg(&self.node.cgroup)
                .arg("--bpf-fs-path")
                .arg(&bpffs_dir)
                .arg("--admin-addr")
                .arg(admin.to_string())
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?),
        )?;
        let mut d = Daemon {
            proc,
            admin,
            ready_after: Duration::ZERO,
            programs: Vec::new(),
            files: vec![cfg, log.clone()],
            bpffs_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if http_get(admin, "/debug/ready").is_some_and(|r| r.0 == 200) {
                break;
            }
            if let Some(s) = d.proc.exited() {
                bail!(
                    "kmesh-daemon exited ({s}) before it was ready; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "kmesh-daemon not ready after 120 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        d.ready_after = started.elapsed();
        d.programs = cgroup_programs(&self.node.cgroup)?;
        // The sk_msg program of per-request routing is attached to a map,
        // not the cgroup: the daemon names it.
        if let Some((200, body)) = http_get(admin, "/debug/l7") {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            if let Some(id) = v["program_id"].as_u64().filter(|id| *id > 0) {
                d.programs.push((id as u32, "kmesh_l7_msg".into()));
            }
        }
        ensure!(
            d.programs.iter().any(|(_, n)| n == "kmesh_connect4"),
            "kmesh_connect4 is not attached to {}: {:?}",
            self.node.cgroup.display(),
            d.programs
        );
        Ok(d)
    }

    fn target(&self, s: Scenario) -> String {
        match s {
            Scenario::NoMesh => format!("http://{}/", self.server.addr4(UPSTREAM_PORT)),
            Scenario::KmeshL4 => format!("http://{VIP}/"),
            Scenario::KmeshL7 => format!("http://{VIP_L7}/"),
            Scenario::Sidecars => format!("http://{SIDECAR_OUT}/"),
            Scenario::NodeProxy => format!("http://{NODE_PROXY}/"),
        }
    }

    /// Runs wrk in the client pod for `secs`.
    fn wrk(&self, url: &str, mode: Mode, conns: usize, secs: u32) -> anyhow::Result<WrkResult> {
        let threads = conns.min(2);
        let mut args: Vec<String> = vec![
            "-t".into(),
            threads.to_string(),
            "-c".into(),
            conns.to_string(),
            "-d".into(),
            format!("{secs}s"),
            "--timeout".into(),
            "5s".into(),
            "--latency".into(),
        ];
        if mode == Mode::ConnPerRequest {
            args.extend(["-H".into(), "Connection: close".into()]);
        }
        args.push(url.into());
        let out = in_pod(
            &self.client.netns,
            &self.client_app,
            Path::new("wrk"),
            &args,
        )
        .output()
        .context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "wrk {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_wrk(&text).with_context(|| format!("wrk {}", args.join(" ")))
    }

    fn cpu(&self, daemon: Option<&Daemon>) -> anyhow::Result<Cpu> {
        let (bpf_ns, bpf_runs) = match daemon {
            Some(d) => d.bpf_stats(&[])?,
            None => (0, 0),
        };
        Ok(Cpu {
            client_app: cgroup_cpu_s(&self.client_app),
            server_app: cgroup_cpu_s(&self.server_app),
            client_proxy: cgroup_cpu_s(&self.client_proxy),
            server_proxy: cgroup_cpu_s(&self.server_proxy),
            node_proxy: cgroup_cpu_s(&self.node_proxy),
            daemon: daemon.map(|d| d.proc.cpu_s()).unwrap_or(0.0),
            bpf_ns,
            bpf_runs,
            machine_busy_s: machine_busy_s(),
            wall: Instant::now(),
        })
    }

    /// One measured run: warm-up (also the check that the path works),
    /// then the measured wrk run with CPU read before and after.
    fn measure(
        &self,
        opts: &Opts,
        rep: usize,
        mode: Mode,
        conns: usize,
        scenario: Scenario,
    ) -> anyhow::Result<Sample> {
        let daemon = match scenario {
            Scenario::KmeshL4 => Some(
                self.start_daemon(&mesh_config(VIP.parse()?, self.server.addr4(UPSTREAM_PORT)))?,
            ),
            Scenario::KmeshL7 => Some(self.start_daemon_with(
                &mesh_config_l7(VIP_L7.parse()?, self.server.addr4(UPSTREAM_PORT)),
                &[
                    "--l7-connector-addr".into(),
                    L7_CONNECTOR.into(),
                    "--l7-connector-netns".into(),
                    self.node.netns_path().to_string_lossy().into_owned(),
                ],
            )?),
            _ => None,
        };
        let url = self.target(scenario);
        let warm = self.wrk(&url, mode, conns, opts.warmup_s)?;
        ensure!(
            warm.requests > 0 && warm.non_2xx == 0,
            "{} ({}, {conns} connections): the warm-up run got {} requests, {} non-2xx; the path does not work",
            scenario.label(),
            mode.label(),
            warm.requests,
            warm.non_2xx
        );
        let redirected_before = match &daemon {
            Some(d) => d.redirected(scenario)?,
            None => 0,
        };
        let before = self.cpu(daemon.as_ref())?;
        let wrk = self.wrk(&url, mode, conns, opts.duration_s)?;
        let after = self.cpu(daemon.as_ref())?;
        let redirected = match &daemon {
            Some(d) => d.redirected(scenario)? - redirected_before,
            None => 0,
        };
        if matches!(scenario, Scenario::KmeshL4 | Scenario::KmeshL7) {
            ensure!(
                redirected >= conns as u64,
                "kmesh-rs: only {redirected} connects were redirected for {conns} connections: traffic bypassed the kernel program"
            );
        }
        let d = after.minus(&before);
        let wall = after.wall.duration_since(before.wall).as_secs_f64();
        let app = d.client_app + d.server_app;
        let (mesh, total) = match scenario {
            Scenario::NoMesh => (0.0, app),
            // Program time is spent in the client's connect() and is
            // already part of the client's cgroup time.
            Scenario::KmeshL4 | Scenario::KmeshL7 => {
                (d.daemon + d.bpf_ns as f64 / 1e9, app + d.daemon)
            }
            Scenario::Sidecars => {
                let p = d.client_proxy + d.server_proxy;
                (p, app + p)
            }
            Scenario::NodeProxy => (d.node_proxy, app + d.node_proxy),
        };
        drop(daemon);
        Ok(Sample {
            rep,
            mode,
            conns,
            scenario,
            wrk,
            mesh_cpu_s: mesh,
            total_cpu_s: total,
            client_cpu_s: d.client_app,
            server_cpu_s: d.server_app,
            bpf_ns: d.bpf_ns,
            bpf_runs: d.bpf_runs,
            redirected,
            other_cores: ((d.machine_busy_s - total) / wall).max(0.0),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Cpu {
    machine_busy_s: f64,
    wall: Instant,
    client_app: f64,
    server_app: f64,
    client_proxy: f64,
    server_proxy: f64,
    node_proxy: f64,
    daemon: f64,
    bpf_ns: u64,
    bpf_runs: u64,
}

impl Cpu {
    fn minus(&self, b: &Cpu) -> Cpu {
        Cpu {
            machine_busy_s: self.machine_busy_s - b.machine_busy_s,
            wall: b.wall,
            client_app: self.client_app - b.client_app,
            server_app: self.server_app - b.server_app,
            client_proxy: self.client_proxy - b.client_proxy,
            server_proxy: self.server_proxy - b.server_proxy,
            node_proxy: self.node_proxy - b.node_proxy,
            daemon: self.daemon - b.daemon,
            bpf_ns: self.bpf_ns.saturating_sub(b.bpf_ns),
            bpf_runs: self.bpf_runs.saturating_sub(b.bpf_runs),
        }
    }
}

/// Removes the (empty) bpffs directories `kmbench-<pid>-…` of bench runs
/// that were killed before cleaning up; their daemons removed the pins.
fn sweep_stale_bpffs_dirs() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("kmbench-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            // Only empty directories go: a left pin means a daemon still
            // runs or crashed, and `kmesh-daemon uninstall` is for that.
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// CPU seconds all CPUs of the machine have been busy so far.
pub fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    proc_stat_busy(&stat).map(|(busy, _)| busy).unwrap_or(0) as f64 / clk_tck()
}

/// Programs attached directly to a cgroup: (id, name), from bpftool.
pub fn cgroup_programs(cg: &Path) -> anyhow::Result<Vec<(u32, String)>> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cg)
        .arg("-j")
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    ensure!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        cg.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool output {:?}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p["id"].as_u64()? as u32,
                        p["name"].as_str().unwrap_or("").to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// All HTTP runs: for each repetition, mode and connection count, every
/// scenario once, in an order rotated per repetition (so no scenario is
/// always first after a warm CPU cache or always last).
pub fn run(opts: &Opts, bed: &Bed) -> anyhow::Result<HttpResults> {
    let mut samples = Vec::new();
    let total = opts.reps * MODES.len() * opts.conns.len() * SCENARIOS.len();
    let mut n = 0;
    crate::step(&format!(
        "HTTP runs: {total} × ({} s warm-up + {} s measured)",
        opts.warmup_s, opts.duration_s
    ));
    for rep in 0..opts.reps {
        for mode in MODES {
            for &conns in &opts.conns {
                for k in 0..SCENARIOS.len() {
                    let scenario = SCENARIOS[(k + rep) % SCENARIOS.len()];
                    n += 1;
                    let s = bed.measure(opts, rep, mode, conns, scenario)?;
                    eprintln!(
                        "    [{n:>3}/{total}] rep {} {:<26} c={:<5} {:<25} {:>9.0} req/s  p50 {:>9} p99 {:>9}  mesh CPU {:.3} s  errors {}  other load {:.2} cores",
                        rep + 1,
                        mode.label(),
                        conns,
                        scenario.label(),
                        s.wrk.rps,
                        super::stats::fmt_us(s.wrk.p50_us),
                        super::stats::fmt_us(s.wrk.p99_us),
                        s.mesh_cpu_s,
                        s.wrk.socket_errors + s.wrk.non_2xx,
                        s.other_cores,
                    );
                    samples.push(s);
                }
            }
        }
    }
    Ok(HttpResults { samples })
}
