//! A node of pods on one machine, for kernel tests and the demo.
//!
//! A [`Node`] is a network namespace with a bridge (the node's pod network,
//! `10.244.0.0/16` and `fd00:244::/64`) and a cgroup v2 directory where the
//! programs under test are attached. Each [`Pod`] is a network namespace
//! joined to the bridge by a veth pair, plus a child cgroup of the node's.
//! Servers and clients are `kmesh-testpod` processes that enter a pod's
//! namespace and cgroup before doing any I/O, so real sockets make real
//! connects through the programs attached to the node cgroup.
//!
//! Traffic never leaves the namespaces a node creates. Everything is named
//! `<prefix>-<pid>-<n>`; dropping the node kills its processes and removes
//! its namespaces and cgroups (also on panic), and a new node first removes
//! what crashed runs of the same prefix left behind.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`; an error carries ip's own message.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running `ip` (install iproute2): {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount in /proc/mounts"))
}

/// Fails with a clear message unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("kernel tests need root (namespaces, cgroups, BPF): run `sudo -E cargo xtask test`");
    }
}

/// A pod: network namespace + cgroup + addresses on the node network.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// `ip netns` name.
    pub netns: String,
    /// `/var/run/netns/<netns>`, for enrollment.
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4), port)
    }
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }
}

/// Outcome of `kmesh-testpod connect`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ConnectReport {
    /// Backend name → connections that reached it.
    pub backends: BTreeMap<String, usize>,
    pub errors: usize,
    /// Connections whose getpeername() differed from the dialled address.
    pub peer_mismatch: usize,
    pub error_kinds: BTreeMap<String, usize>,
}

impl ConnectReport {
    pub fn count(&self, backend: &str) -> usize {
        self.backends.get(backend).copied().unwrap_or(0)
    }
    pub fn total(&self) -> usize {
        self.backends.values().sum()
    }
}

/// A client connecting in a loop (`kmesh-testpod loop`).
pub struct Looping(Option<Child>);

impl Looping {
    /// Waits for the loop to end and returns what it saw.
    pub fn finish(mut self) -> io::Result<ConnectReport> {
        let child = self.0.take().expect("finished once");
        json_report("loop", child.wait_with_output()?)
    }
}

impl Drop for Looping {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Outcome of `kmesh-testpod talk`: byte totals as the application saw them.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct TalkReport {
    pub backends: BTreeMap<String, usize>,
    pub errors: usize,
    pub sent: u64,
    pub received: u64,
}

/// Connections held open by a client (`kmesh-testpod hold`).
pub struct Held {
    pub backends: BTreeMap<String, usize>,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Held {
    /// Sends a probe on every held connection; returns how many echoed it.
    pub fn check(&mut self) -> io::Result<usize> {
        writeln!(self.stdin, "check")?;
        self.stdin.flush()?;
        let v = read_json(&mut self.stdout)?;
        Ok(v["echoed"].as_u64().unwrap_or(0) as usize)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json(r: &mut impl BufRead) -> io::Result<serde_json::Value> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    serde_json::from_str(&line)
        .map_err(|e| io::Error::other(format!("bad testpod output {line:?}: {e}")))
}

/// A node with pods. See the module docs.
pub struct Node {
    /// `<prefix>-<pid>-<n>`; also the node's netns name.
    pub name: String,
    /// Node cgroup: attach programs here.
    pub cgroup: PathBuf,
    testpod: PathBuf,
    pods: Vec<Pod>,
    servers: Vec<Child>,
    node_lo_addrs: usize,
}

impl Node {
    /// Creates the node namespace, bridge and cgroup. `testpod` is the path
    /// of the `kmesh-testpod` binary.
    pub fn new(prefix: &str, testpod: &Path) -> io::Result<Node> {
        sweep_stale(prefix);
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let cgroup = cgroup2_root()?.join(&name);
        // From here on, Drop cleans up whatever was created.
        let node = Node {
            name: name.clone(),
            cgroup: cgroup.clone(),
            testpod: testpod.to_path_buf(),
            pods: Vec::new(),
            servers: Vec::new(),
            node_lo_addrs: 0,
        };
        std::fs::create_dir(&cgroup)
            .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", cgroup.display())))?;
        ip(&["netns", "add", &name])?;
        let nn = name.as_str();
        ip(&["-n", nn, "link", "set", "lo", "up"])?;
        ip(&["-n", nn, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", nn, "addr", "add", "10.244.0.1/16", "dev", "br0"])?;
        ip(&[
            "-n",
            nn,
            "addr",
            "add",
            "fd00:244::1/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&["-n", nn, "link", "set", "br0", "up"])?;
        Ok(node)
    }

    /// Adds a pod with the next free addresses (10.244.0.N, fd00:244::N).
    pub fn add_pod(&mut self, pod_name: &str) -> io::Result<Pod> {
        let idx = self.pods.len() + 2;
        assert!(idx < 250, "too many pods");
        let netns = format!("{}-{pod_name}", self.name);
        let cgroup = self.cgroup.join(pod_name);
        let pod = Pod {
            name: pod_name.to_string(),
            netns_path: PathBuf::from("/var/run/netns").join(&netns),
            netns: netns.clone(),
            cgroup: cgroup.clone(),
            ip4: Ipv4Addr::new(10, 244, 0, idx as u8),
            ip6: format!("fd00:244::{idx:x}").parse().expect("valid v6"),
        };
        std::fs::create_dir(&cgroup)?;
        self.pods.push(pod.clone());
        ip(&["netns", "add", &netns])?;
        let host_if = format!("vp{idx}");
        // Both ends are created directly in their namespaces: no name can
        // clash with this machine's interfaces.
        ip(&[
            "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &host_if,
            "netns", &self.name,
        ])?;
        ip(&["-n", &self.name, "link", "set", &host_if, "master", "br0"])?;
        ip(&["-n", &self.name, "link", "set", &host_if, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/16", pod.ip4),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/64", pod.ip6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", "10.244.0.1"])?;
        ip(&[
            "-n",
            &netns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:244::1",
        ])?;
        Ok(pod)
    }

    /// The netns path of the node itself.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn testpod(&self, netns: &Path, cgroup: Option<&Path>) -> Command {
        let mut c = Command::new(&self.testpod);
        c.arg("--netns").arg(netns);
        if let Some(cg) = cgroup {
            c.arg("--cgroup").arg(cg);
        }
        c
    }

    fn spawn_server(&mut self, mut cmd: Command) -> io::Result<()> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        self.servers.push(child);
        if line.trim() != "ready" {
            return Err(io::Error::other(format!("server did not start: {line:?}")));
        }
        Ok(())
    }

    /// Starts a server named `name` in `pod`, listening on `addrs`.
    pub fn serve(&mut self, pod: &Pod, name: &str, addrs: &[SocketAddr]) -> io::Result<()> {
        let mut cmd = self.testpod(&pod.netns_path, Some(&pod.cgroup));
        cmd.arg("serve")
            .arg(name)
            .args(addrs.iter().map(|a| a.to_string()));
        self.spawn_server(cmd)
    }

    /// Starts an HTTP server in `pod` on `addrs` that answers every request
    /// with `name` as the body (`kmesh-testpod http-named`).
    pub fn serve_http(&mut self, pod: &Pod, name: &str, addrs: &[SocketAddr]) -> io::Result<()> {
        let mut cmd = self.testpod(&pod.netns_path, Some(&pod.cgroup));
        cmd.arg("http-named")
            .arg(name)
            .args(addrs.iter().map(|a| a.to_string()));
        self.spawn_server(cmd)
    }

    /// Makes `count` sequential HTTP GET requests from `pod` to `addr`
    /// (one connection each), with the extra request header `header`
    /// (`name: value`); the report counts response bodies as backends.
    pub fn http_requests(
        &self,
        pod: &Pod,
        addr: SocketAddr,
        count: usize,
        header: Option<&str>,
    ) -> io::Result<ConnectReport> {
        let out = self
            .testpod(&pod.netns_path, Some(&pod.cgroup))
            .arg("get")
            .arg(addr.to_string())
            .arg(count.to_string())
            .args(header)
            .stderr(Stdio::inherit())
            .output()?;
        json_report("get", out)
    }

    /// Starts a server in the node namespace itself on `addrs`, adding
    /// their IPs to the node's loopback: whatever reaches a VIP without
    /// being rewritten by the kernel programs lands here, so a test can
    /// tell "untouched" from "routed" and from "refused".
    pub fn serve_on_node(&mut self, name: &str, addrs: &[SocketAddr]) -> io::Result<()> {
        for a in addrs {
            let cidr = match a.ip() {
                IpAddr::V4(v4) => format!("{v4}/32"),
                IpAddr::V6(v6) => format!("{v6}/128"),
            };
            let mut args = vec![
                "-n",
                self.name.as_str(),
                "addr",
                "add",
                cidr.as_str(),
                "dev",
                "lo",
            ];
            if a.is_ipv6() {
                args.push("nodad");
            }
            match ip(&args) {
                Ok(()) => self.node_lo_addrs += 1,
                Err(e) if e.to_string().contains("exists") => {}
                Err(e) => return Err(e),
            }
        }
        let mut cmd = self.testpod(&self.netns_path(), None);
        cmd.arg("serve")
            .arg(name)
            .args(addrs.iter().map(|a| a.to_string()));
        self.spawn_server(cmd)
    }

    /// Makes `count` sequential connections from `pod` to `addr` (3 s
    /// connect timeout, testpod's default).
    pub fn connect(&self, pod: &Pod, addr: SocketAddr, count: usize) -> io::Result<ConnectReport> {
        self.connect_timeout(pod, addr, count, 3_000)
    }

    /// Like [`Node::connect`] with a connect timeout of `timeout_ms` (a
    /// dropped SYN then fails after that long instead of 3 s).
    pub fn connect_timeout(
        &self,
        pod: &Pod,
        addr: SocketAddr,
        count: usize,
        timeout_ms: u64,
    ) -> io::Result<ConnectReport> {
        let out = self
            .testpod(&pod.netns_path, Some(&pod.cgroup))
            .arg("--timeout-ms")
            .arg(timeout_ms.to_string())
            .arg("connect")
            .arg(addr.to_string())
            .arg(count.to_string())
            .stderr(Stdio::inherit())
            .output()?;
        json_report("connect", out)
    }

    /// Starts sequential connections from `pod` to `addr` for `millis`
    /// milliseconds in the background; [`Looping::finish`] collects the
    /// report.
    pub fn start_loop(&self, pod: &Pod, addr: SocketAddr, millis: u64) -> io::Result<Looping> {
        self.start_loop_timeout(pod, addr, millis, 3_000)
    }

    /// [`Node::start_loop`] with a connect timeout of `timeout_ms`: a
    /// dropped SYN fails that fast, so a denied client keeps trying.
    pub fn start_loop_timeout(
        &self,
        pod: &Pod,
        addr: SocketAddr,
        millis: u64,
        timeout_ms: u64,
    ) -> io::Result<Looping> {
        let child = self
            .testpod(&pod.netns_path, Some(&pod.cgroup))
            .arg("--timeout-ms")
            .arg(timeout_ms.to_string())
            .arg("loop")
            .arg(addr.to_string())
            .arg(millis.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Looping(Some(child)))
    }

    /// Makes `count` sequential connections from `pod` to `addr`, sending
    /// `bytes` bytes on each and reading them back (see `kmesh-testpod talk`).
    pub fn talk(
        &self,
        pod: &Pod,
        addr: SocketAddr,
        count: usize,
        bytes: usize,
    ) -> io::Result<TalkReport> {
        let out = self
            .testpod(&pod.netns_path, Some(&pod.cgroup))
            .arg("talk")
            .arg(addr.to_string())
            .arg(count.to_string())
            .arg(bytes.to_string())
            .stderr(Stdio::inherit())
            .output()?;
        json_report("talk", out)
    }

    /// A `kmesh-testpod` command that runs inside `pod` (add its subcommand).
    pub fn pod_command(&self, pod: &Pod) -> Command {
        self.testpod(&pod.netns_path, Some(&pod.cgroup))
    }

    /// Opens `count` connections from `pod` to `addr` and keeps them open.
    pub fn hold(&self, pod: &Pod, addr: SocketAddr, count: usize) -> io::Result<Held> {
        let mut child = self
            .testpod(&pod.netns_path, Some(&pod.cgroup))
            .arg("hold")
            .arg(addr.to_string())
            .arg(count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let v = read_json(&mut stdout)?;
        let backends = serde_json::from_value(v["backends"].clone())
            .map_err(|e| io::Error::other(format!("bad hold output: {e}")))?;
        Ok(Held {
            backends,
            child,
            stdin,
            stdout,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in self.pods.iter().rev() {
            let _ = ip(&["netns", "del", &p.netns]);
        }
        let _ = ip(&["netns", "del", &self.name]);
        remove_cgroup_tree(&self.cgroup);
    }
}

/// Removes a cgroup directory and its children (deepest first). Processes
/// still inside are moved to the parent first, so removal cannot fail on
/// a straggler.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    if let (Some(parent), Ok(procs)) = (
        dir.parent(),
        std::fs::read_to_string(dir.join("cgroup.procs")),
    ) {
        for pid in procs.lines() {
            let _ = std::fs::write(parent.join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes namespaces and cgroups named `<prefix>-<pid>-…` whose process is
/// gone (a run that was killed before its Drop ran).
fn sweep_stale(prefix: &str) {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
            return false;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            return false;
        };
        pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if dead(name) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    if let Ok(root) = cgroup2_root() {
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if dead(&e.file_name().to_string_lossy()) {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
    }
}

/// A minimal HTTP/1.1 GET for admin API checks: `(status, body)`, or `None`
/// when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kmesh\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The JSON line a finished `kmesh-testpod` printed, or why there is none.
fn json_report<T: serde::de::DeserializeOwned>(
    what: &str,
    out: std::process::Output,
) -> io::Result<T> {
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "testpod {what} failed: {}",
            out.status
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| io::Error::other(format!("bad testpod {what} output: {e}")))
}

/// A real Envoy running inside a pod (its network namespace and cgroup),
/// killed on drop; its config file is removed with it.
pub struct PodEnvoy {
    child: Child,
    config: PathBuf,
}

impl PodEnvoy {
    /// Starts the Envoy binary `envoy` on `config` (a bootstrap YAML)
    /// inside `pod`. Its admin listens on the pod's loopback.
    pub fn start(envoy: &Path, pod: &Pod, config: &str) -> io::Result<PodEnvoy> {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let path = std::env::temp_dir().join(format!(
            "kmt-envoy-{}-{}.yaml",
            std::process::id(),
            pod.netns
        ));
        std::fs::write(&path, config)?;
        let ns = std::fs::File::open(&pod.netns_path)?;
        let procs = std::ffi::CString::new(
            pod.cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(io::Error::other)?;
        let mut cmd = Command::new(envoy);
        cmd.arg("-c")
            .arg(&path)
            // Several Envoys may run on one machine: no shared-memory clash.
            .args(["--log-level", "warn", "--use-dynamic-base-id"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: runs in the forked child before exec and only makes
        // async-signal-safe calls (setns, open, write, close), with
        // everything allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process: the child, before exec.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn()?;
        Ok(PodEnvoy {
            child,
            config: path,
        })
    }

    /// True while Envoy runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for PodEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// An Envoy bootstrap for a waypoint: one listener on `[::]:port` (IPv4
/// too) that reads the PROXY protocol v2 header
/// (`envoy.filters.listener.proxy_protocol`), then routes HTTP requests
/// with `x-canary: 1` to the static cluster `canary` (one endpoint,
/// `canary`) and all others to the ORIGINAL_DST cluster `original`: the
/// destination the header carried. Admin on 127.0.0.1, port chosen by
/// the kernel.
pub fn waypoint_envoy_bootstrap(port: u16, canary: SocketAddr) -> String {
    format!(
        r#"
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: waypoint
    address: {{socket_address: {{address: "::", port_value: {port}, ipv4_compat: true}}}}
    listener_filters:
    - name: envoy.filters.listener.proxy_protocol
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: waypoint
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/", headers: [{{name: x-canary, string_match: {{exact: "1"}}}}]}}
                route: {{cluster: canary}}
              - match: {{prefix: "/"}}
                route: {{cluster: original}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: canary
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: canary
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: "{ip}", port_value: {cport}}}}}}}
  - name: original
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#,
        ip = canary.ip(),
        cport = canary.port()
    )
}
