//! Observability end to end, with the real binaries: `kmesh-daemon` under
//! traffic in the netns harness, `kmeshctl` switching its access log and
//! log levels, and a real Prometheus (Debian package) scraping it with the
//! shipped scrape config; `promtool check metrics` must be clean and every
//! panel query of the shipped Grafana dashboards must return data (needs
//! root, `prometheus` and `promtool`; `cargo xtask test` installs them).

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bpf_tests::http_get;
use common::{
    bootstrap, free_port, workspace_bin, Bpffs, ClusterSpec, Daemon, ListenerSpec, TESTPOD,
};

/// The two tests each start a daemon and a Prometheus on ports picked by
/// `free_port` (bind to 0, then release); side by side, the other test's
/// outgoing connections (ephemeral ports) can take such a port before it
/// is bound (seen once in CI). One at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A temp directory and processes, removed/killed on drop.
struct Scratch {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: plain kill(2) on our own child; SIGTERM lets the
            // daemon detach and unpin.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let bpffs = self.dir.join("bpffs");
        let _ = Command::new("umount").arg(&bpffs).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn require_tool(name: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} not installed: run `cargo xtask test` (installs the Debian package prometheus) or `apt-get install prometheus`"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kmeshctl(admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("kmeshctl"))
        .arg("--admin-addr")
        .arg(admin.to_string())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Which daemon mode a dashboard panel is about: panels under a row whose
/// title says "(dual-engine mode)" need a dual-engine daemon; the others
/// a kernel-native one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    KernelNative,
    DualEngine,
}

/// `(mode, title, expr)` of every panel target of a Grafana dashboard.
fn panel_queries(path: &Path) -> Vec<(Mode, String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    let mut mode = Mode::KernelNative;
    for p in v["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap().to_string();
        if p["type"] == "row" {
            mode = if title.contains("(dual-engine mode)") {
                Mode::DualEngine
            } else {
                Mode::KernelNative
            };
            continue;
        }
        for t in p["targets"].as_array().expect("targets") {
            out.push((
                mode,
                title.clone(),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    assert!(!out.is_empty(), "{} has no queries", path.display());
    out
}

/// Panels of the shipped dashboards for `mode` whose query returns no
/// data; panics if `mode` has no panels at all.
fn panels_without_data(prom: SocketAddr, mode: Mode) -> Vec<String> {
    let mut empty = Vec::new();
    let mut checked = 0;
    for board in ["kmesh-service.json", "kmesh-dataplane.json"] {
        for (m, title, expr) in panel_queries(&repo_root().join("deploy/grafana").join(board)) {
            if m != mode {
                continue;
            }
            checked += 1;
            let result = prom_query(prom, &expr);
            if result.as_array().is_none_or(|a| a.is_empty()) {
                empty.push(format!("{board} / {title}: {expr}"));
            }
        }
    }
    assert!(checked > 0, "no dashboard panel for {mode:?}");
    empty
}

/// `promtool check metrics` on the daemon's exposition must be clean.
fn lint_metrics(promtool: &Path, metrics: SocketAddr) -> String {
    let (code, body) = http_get(metrics, "/status/metric").unwrap();
    assert_eq!(code, 200);
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let lint = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && lint.trim().is_empty(),
        "promtool check metrics: {lint}\n{body}"
    );
    body
}

/// A real Prometheus with the shipped scrape config pointed at `metrics`,
/// scraping every second; returns once it has scraped the daemon.
fn start_prometheus(
    scratch: &mut Scratch,
    prometheus: &Path,
    promtool: &Path,
    metrics: SocketAddr,
) -> SocketAddr {
    let dir = scratch.dir.clone();
    let shipped =
        std::fs::read_to_string(repo_root().join("deploy/prometheus/prometheus.yml")).unwrap();
    let prom_cfg = shipped
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("127.0.0.1:15020", &metrics.to_string());
    assert_ne!(prom_cfg, shipped, "the shipped config changed shape");
    std::fs::write(dir.join("prometheus.yml"), &prom_cfg).unwrap();
    let ok = Command::new(promtool)
        .args(["check", "config"])
        .arg(dir.join("prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    scratch.children.push(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Prometheus answers 503 until its storage is open.
    wait_until("Prometheus ready", 60, || {
        http_get(prom, "/-/ready").map(|r| r.0) == Some(200)
    });
    wait_until("Prometheus scraping the daemon", 60, || {
        prom_query(prom, "up == 1")
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    prom
}

fn prom_query(prom: SocketAddr, q: &str) -> serde_json::Value {
    let (code, body) = http_get(prom, &format!("/api/v1/query?query={}", encode(q)))
        .unwrap_or_else(|| panic!("Prometheus at {prom} does not answer"));
    assert_eq!(code, 200, "query {q}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "query {q}: {body}");
    v["data"]["result"].clone()
}

#[test]
fn prometheus_scrapes_the_daemon_and_every_dashboard_panel_has_data() {
    bpf_tests::require_root();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let prometheus = require_tool("prometheus");
    let promtool = require_tool("promtool");
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kmo", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv = node.add_pod("srv0").unwrap();
    node.serve(&srv, "srv0", &[srv.addr4(8080)]).unwrap();

    let dir = std::env::temp_dir().join(format!("kmo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("bpffs")).unwrap();
    let mut scratch = Scratch {
        dir: dir.clone(),
        children: Vec::new(),
    };
    assert!(Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir.join("bpffs"))
        .status()
        .unwrap()
        .success());
    let cluster = "outbound|80||web.shop.svc.cluster.local";
    std::fs::write(
        dir.join("mesh.yaml"),
        bootstrap(
            &[ListenerSpec {
                name: "web",
                vip,
                clusters: vec![(cluster, 1)],
            }],
            &[ClusterSpec {
                name: cluster,
                lb: "ROUND_ROBIN",
                endpoints: vec![(srv.addr4(8080), 1)],
            }],
        ),
    )
    .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.join("daemon.out")).unwrap();
    let err = std::fs::File::create(dir.join("daemon.err")).unwrap();
    scratch.children.push(
        Command::new(workspace_bin("kmesh-daemon"))
            .args(["--mode", "kernel-native", "--config"])
            .arg(dir.join("mesh.yaml"))
            .arg("--enroll-netns")
            .arg(&client.netns_path)
            .arg("--cgroup2-path")
            .arg(&node.cgroup)
            .arg("--bpf-fs-path")
            .arg(dir.join("bpffs"))
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--workload")
            .arg(format!("{}=shop/client", client.netns_path.display()))
            .arg("--workload")
            .arg(format!("{}=shop/web-v1", srv.netns_path.display()))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap(),
    );
    let ready = Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/debug/ready").map(|r| r.0) != Some(200) {
        let stderr = std::fs::read_to_string(dir.join("daemon.err")).unwrap_or_default();
        assert!(
            scratch.children[0].try_wait().unwrap().is_none(),
            "daemon exited: {stderr}"
        );
        assert!(Instant::now() < ready, "daemon not ready in 30 s: {stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }

    for m in kmesh_daemon::dataplane::TELEMETRY_MAPS {
        assert!(
            dir.join("bpffs/kmesh").join(m).exists(),
            "map {m} not pinned"
        );
    }

    // kmeshctl against the daemon: access log on, a log level, authz refused.
    let (code, out, err) = kmeshctl(admin, &["accesslog", "enable"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("accesslog") && out.contains("enabled"),
        "{out}"
    );
    let (code, out, err) = kmeshctl(admin, &["log", "--set", "telemetry:debug", "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let levels: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(levels["telemetry"], "debug", "{out}");
    let (code, _, err) = kmeshctl(admin, &["log", "--set", "nosuch:debug"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("unknown logger"), "{err}");
    // Kernel log lines, switched on at runtime, arrive in the daemon's log.
    let (code, out, err) = kmeshctl(admin, &["log", "--set", "bpf:debug"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("bpf") && out.contains("debug"), "{out}");
    let (code, _, err) = kmeshctl(admin, &["authz", "status"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("not implemented"), "{err}");
    let (code, out, _) = kmeshctl(admin, &["dump", "-o", "json"]);
    assert_eq!(code, 0);
    assert!(out.contains("10.96.0.10:80"), "{out}");

    // Real traffic; the access log shows every connection with its bytes.
    let r = node.talk(&client, vip, 10, 300).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    wait_until("10 access log lines", 10, || {
        std::fs::read_to_string(dir.join("daemon.out"))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("accesslog: "))
            .count()
            == 10
    });
    let text = std::fs::read_to_string(dir.join("daemon.out")).unwrap();
    for l in text.lines().filter(|l| l.starts_with("accesslog: ")) {
        assert!(
            l.contains("dst.service=web.shop.svc.cluster.local, ")
                && l.contains("direction=OUTBOUND, sent_bytes=300, received_bytes=305, ")
                && l.contains("src.workload=client, src.namespace=shop, ")
                && l.contains("dst.workload=web-v1, dst.namespace=shop, "),
            "{l}"
        );
    }
    let (code, _, _) = kmeshctl(admin, &["accesslog", "disable"]);
    assert_eq!(code, 0);
    wait_until("kernel log lines of the closes", 10, || {
        std::fs::read_to_string(dir.join("daemon.err"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("closed: sent 300 received 305"))
            .count()
            == 10
    });
    let (code, _, _) = kmeshctl(admin, &["log", "--set", "bpf:warn"]);
    assert_eq!(code, 0);

    // The exposition is clean for promtool's linter.
    let body = lint_metrics(&promtool, metrics);
    assert!(
        body.contains("istio_tcp_connections_opened_total{reporter=\"source\""),
        "{body}"
    );

    let prom = start_prometheus(&mut scratch, &prometheus, &promtool, metrics);
    // Traffic across several scrapes, so rates have two samples to work on.
    for _ in 0..4 {
        node.talk(&client, vip, 10, 100).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
    }

    let series = prom_query(prom, "istio_tcp_connections_opened_total");
    let labels = &series[0]["metric"];
    for l in [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_principal",
        "source_canonical_service",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_service",
        "destination_service_name",
        "destination_canonical_service",
        "connection_security_policy",
        "response_flags",
    ] {
        assert!(labels.get(l).is_some(), "label {l} missing: {labels}");
    }
    assert_eq!(labels["destination_service_name"], "web");
    assert_eq!(labels["source_workload"], "client", "{labels}");
    assert_eq!(labels["destination_workload"], "web-v1", "{labels}");
    assert_eq!(labels["destination_workload_namespace"], "shop", "{labels}");
    let total: f64 = prom_query(prom, "sum(istio_tcp_connections_opened_total)")[0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(total >= 10.0, "{total}");

    let empty = panels_without_data(prom, Mode::KernelNative);
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // Switch semantics: no access log without monitoring; one command for both.
    let (code, out, err) = kmeshctl(admin, &["monitoring", "disable", "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["monitoring"].as_bool(), v["accesslog"].as_bool()),
        (Some(false), Some(false))
    );
    let (code, _, err) = kmeshctl(admin, &["accesslog", "enable"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("monitoring is disabled"), "{err}");
    let (code, out, err) = kmeshctl(admin, &["monitoring", "enable", "--accesslog"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("monitoring   enabled") && out.contains("accesslog    enabled"),
        "{out}"
    );
    let (code, _, err) = kmeshctl("127.0.0.1:1".parse().unwrap(), &["accesslog", "status"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    drop(scratch);
}

/// The authorization panels, with a dual-engine daemon deciding real
/// connections: allowed by an ALLOW policy, denied by a DENY policy.
#[test]
fn dual_engine_authorization_panels_have_data() {
    bpf_tests::require_root();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let prometheus = require_tool("prometheus");
    let promtool = require_tool("promtool");
    let mut node = bpf_tests::Node::new("kmoa", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let other = node.add_pod("other").unwrap();
    let srv = node.add_pod("srv0").unwrap();
    node.serve(&srv, "srv0", &[srv.addr4(8080)]).unwrap();
    let ip = |p: &bpf_tests::Pod| p.addr4(0).ip().to_string();
    let cfg = format!(
        r#"workloads:
- {{name: client, namespace: frontend, serviceAccount: web, workloadIps: ["{c}"], node: local}}
- {{name: other, namespace: frontend, serviceAccount: admin, workloadIps: ["{o}"]}}
- {{name: db, namespace: backend, serviceAccount: db, workloadIps: ["{s}"]}}
policies:
- name: only-frontend
  namespace: backend
  scope: Namespace
  action: Allow
  rules:
  - - - namespaces: [frontend]
- name: no-admin
  namespace: backend
  scope: Namespace
  action: Deny
  rules:
  - - - principals: ["cluster.local/ns/frontend/sa/admin"]
"#,
        c = ip(&client),
        o = ip(&other),
        s = ip(&srv)
    );
    let bpffs = Bpffs::new("obsde");
    let path = bpffs.write_config(&cfg);
    let srv_ns = srv.netns_path.display().to_string();
    let daemon = Daemon::start(
        path,
        &client,
        &node.cgroup,
        &bpffs.0,
        &["--mode", "dual-engine", "--enroll-netns", &srv_ns],
    );
    let dir = std::env::temp_dir().join(format!("kmoa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut scratch = Scratch {
        dir,
        children: Vec::new(),
    };

    let traffic = || {
        let r = node.connect(&client, srv.addr4(8080), 3).unwrap();
        assert_eq!((r.count("srv0"), r.errors), (3, 0), "{r:?}");
        let r = node
            .connect_timeout(&other, srv.addr4(8080), 1, 300)
            .unwrap();
        assert_eq!((r.count("srv0"), r.errors), (0, 1), "denied: {r:?}");
    };
    traffic();
    let body = lint_metrics(&promtool, daemon.metrics);
    for series in [
        "kmesh_authz_decisions_total{decision=\"denied_by_policy\"}",
        "kmesh_authz_policy_decisions_total{policy=\"backend/no-admin\"}",
        "kmesh_authz_workload_decisions_total{destination_workload=\"backend/db\",verdict=\"allow\"} 3",
        "kmesh_authz_workload_decisions_total{destination_workload=\"backend/db\",verdict=\"deny\"}",
    ] {
        assert!(body.contains(series), "{series} missing:\n{body}");
    }

    let prom = start_prometheus(&mut scratch, &prometheus, &promtool, daemon.metrics);
    for _ in 0..4 {
        traffic();
        std::thread::sleep(Duration::from_millis(1200));
    }
    let empty = panels_without_data(prom, Mode::DualEngine);
    assert!(
        empty.is_empty(),
        "authorization panels without data:\n{}",
        empty.join("\n")
    );
    // Both outcomes and both policies are on the panels.
    let outcomes = prom_query(
        prom,
        "sum by (decision) (kmesh_authz_decisions_total{decision=~\"allowed_by_policy|denied_by_policy\"}) > 0",
    );
    assert_eq!(outcomes.as_array().unwrap().len(), 2, "{outcomes}");
    let policies = prom_query(prom, "kmesh_authz_policy_decisions_total > 0");
    assert_eq!(policies.as_array().unwrap().len(), 2, "{policies}");
    drop(scratch);
    drop(daemon);
}
