//! `cargo xtask demo`: the whole path on one machine, in a sandbox.
//!
//! A node namespace with a client pod, three server pods and an outsider
//! pod (not enrolled); the real `kmesh-daemon` binary on the embedded mesh
//! (`demo/mesh.yaml`, an Envoy bootstrap), attached to the sandbox's cgroup
//! only; real connections; a table of where they went; then SIGTERM and a
//! check that nothing of ours is left attached or pinned.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use bpf_tests::{http_get, ConnectReport, Node, Pod};

use crate::{bin_dir, step};

const MESH: &str = include_str!("../demo/mesh.yaml");
const ADMIN: &str = "127.0.0.1:15200";
const BPF_FS: &str = "/sys/fs/bpf";
const METRICS: &str = "127.0.0.1:15020";

pub fn run() -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the demo loads eBPF programs and creates network namespaces: run `sudo -E cargo xtask demo`");
    }
    crate::setup::run()?;
    crate::build()?;

    step("creating the sandbox: a node namespace, 5 pods (netns + cgroup + veth)");
    let mut node = Node::new("kmdemo", &bin_dir().join("kmesh-testpod"))?;
    let client = node.add_pod("client")?;
    let mut servers = Vec::new();
    for i in 0..3 {
        let pod = node.add_pod(&format!("srv{i}"))?;
        node.serve(
            &pod,
            &pod.name.clone(),
            &[pod.addr4(8080), pod.addr6(8080), pod.addr4(9090)],
        )?;
        servers.push(pod);
    }
    let outsider = node.add_pod("outsider")?;
    ensure!(
        client.ip4.octets() == [10, 244, 0, 2] && servers[2].ip4.octets() == [10, 244, 0, 5],
        "pod addresses differ from the ones demo/mesh.yaml names"
    );
    // Whatever reaches a VIP unrewritten is answered by the node itself.
    node.serve_on_node(
        "(no rewrite: VIP itself)",
        &["10.96.0.10:80".parse()?, "10.96.0.20:80".parse()?],
    )?;
    for p in std::iter::once(&client).chain(&servers).chain([&outsider]) {
        eprintln!(
            "    pod {:<9} {:<12} {:<13} cgroup {}",
            p.name,
            p.ip4,
            p.ip6,
            p.cgroup.display()
        );
    }

    step("starting kmesh-daemon --mode kernel-native on the embedded mesh (demo/mesh.yaml)");
    let cfg = std::env::temp_dir().join(format!("{}-mesh.yaml", node.name));
    std::fs::write(&cfg, MESH)?;
    let log = std::env::temp_dir().join(format!("{}-daemon.log", node.name));
    let mut daemon = Command::new(bin_dir().join("kmesh-daemon"))
        .args(["--mode", "kernel-native", "--config"])
        .arg(&cfg)
        .arg("--enroll-netns")
        .arg(&client.netns_path)
        .arg("--cgroup2-path")
        .arg(&node.cgroup)
        .args(["--bpf-fs-path", BPF_FS, "--admin-addr", ADMIN])
        .args(["--metrics-addr", METRICS])
        .arg("--workload")
        .arg(format!("{}=demo/client", client.netns_path.display()))
        .args(servers.iter().flat_map(|s| {
            [
                "--workload".to_string(),
                format!("{}=demo/{}", s.netns_path.display(), s.name),
            ]
        }))
        .stdout(std::fs::File::create(log.with_extension("accesslog"))?)
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting kmesh-daemon")?;
    let result = drive(&node, &client, &outsider, &mut daemon).and_then(|ids| {
        observe(&node, &client, &log.with_extension("accesslog"))?;
        Ok(ids)
    });
    let _ = std::fs::remove_file(log.with_extension("accesslog"));
    if daemon.try_wait()?.is_none() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    }
    let status = daemon.wait()?;
    let _ = std::fs::remove_file(&cfg);
    eprintln!("\n    daemon log ({}):", log.display());
    for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
        eprintln!("      {line}");
    }
    let prog_ids = result?;
    ensure!(status.success(), "kmesh-daemon exited with {status}");

    step("after SIGTERM: checking that nothing is left attached or pinned");
    let pins = Path::new(BPF_FS).join("kmesh");
    ensure!(!pins.exists(), "{} still exists", pins.display());
    eprintln!("    {} removed", pins.display());
    for id in prog_ids {
        let gone = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true);
        ensure!(gone, "program id {id} is still loaded");
    }
    eprintln!("    every program that was attached to the sandbox cgroup is unloaded");
    step("tearing down the sandbox");
    drop(node);
    eprintln!("    done");
    Ok(())
}

/// Waits for readiness, shows the programs, drives traffic, prints the
/// table; returns the kernel ids of our programs.
fn drive(
    node: &Node,
    client: &Pod,
    outsider: &Pod,
    daemon: &mut std::process::Child,
) -> anyhow::Result<Vec<u32>> {
    let admin: SocketAddr = ADMIN.parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/debug/ready").map(|r| r.0) != Some(200) {
        if let Some(s) = daemon.try_wait()? {
            bail!("kmesh-daemon exited before it was ready ({s})");
        }
        ensure!(
            Instant::now() < deadline,
            "kmesh-daemon not ready after 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("    {ADMIN}/debug/ready answered 200");

    // Ours are exactly the programs attached to the sandbox's cgroup (other
    // processes on the machine may load programs with similar names).
    step("bpftool prog show (the programs attached to the sandbox cgroup)");
    let mut ids: Vec<u32> = Vec::new();
    match Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&node.cgroup)
        .output()
    {
        Ok(out) if out.status.success() => {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(id) = line.split_whitespace().next().and_then(|i| i.parse().ok()) {
                    ids.push(id);
                }
            }
            for id in &ids {
                if let Ok(p) = Command::new("bpftool")
                    .args(["prog", "show", "id", &id.to_string()])
                    .output()
                {
                    if let Some(line) = String::from_utf8_lossy(&p.stdout).lines().next() {
                        eprintln!("    {line}");
                    }
                }
            }
        }
        _ => eprintln!("    (bpftool not available)"),
    }

    step("driving traffic: sequential TCP connects to the service VIPs");
    let runs: [(&Pod, &str, &str, usize); 4] = [
        (client, "web (ROUND_ROBIN)", "10.96.0.10:80", 30),
        (client, "api (75/25 split, RANDOM)", "10.96.0.20:80", 200),
        (client, "web-v6 (ROUND_ROBIN)", "[fd00:96::10]:80", 20),
        (
            outsider,
            "web, from a pod NOT enrolled",
            "10.96.0.10:80",
            10,
        ),
    ];
    eprintln!();
    eprintln!(
        "    {:<9} {:<30} {:<18} {:>5}  {:<26} {:>5} {:>6}",
        "from", "service", "VIP", "conns", "landed on", "count", "share"
    );
    eprintln!("    {}", "-".repeat(108));
    let mut mismatches = 0;
    for (pod, label, vip, n) in runs {
        let r: ConnectReport = node.connect(pod, vip.parse()?, n)?;
        let mut first = true;
        for (backend, count) in &r.backends {
            let (from, svc, v, total) = if first {
                (pod.name.as_str(), label, vip, n.to_string())
            } else {
                ("", "", "", String::new())
            };
            eprintln!(
                "    {from:<9} {svc:<30} {v:<18} {total:>5}  {backend:<26} {count:>5} {:>5.0}%",
                100.0 * *count as f64 / n as f64
            );
            first = false;
        }
        if r.errors > 0 {
            eprintln!(
                "    {:<9} {:<30} {:<18} {:>5}  {:<26} {:>5}",
                "", "", "", "", "failed connects", r.errors
            );
        }
        mismatches += r.peer_mismatch;
    }
    if mismatches == 0 {
        eprintln!("\n    getpeername() on every socket returned the VIP the client dialled.");
    } else {
        eprintln!("\n    getpeername() differed from the dialled VIP on {mismatches} connections");
    }

    let (_, body) =
        http_get(admin, "/debug/config_dump/bpf/kernel-native").context("bpf config dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    eprintln!("    kernel counters (KM_STATS): {}", dump["stats"]);
    Ok(ids)
}

/// Access log and metrics of a few connections, switched on with kmeshctl.
fn observe(node: &Node, client: &Pod, accesslog: &Path) -> anyhow::Result<()> {
    step("observability: kmeshctl accesslog enable, 3 connections, their log lines and metrics");
    let out = Command::new(bin_dir().join("kmeshctl"))
        .args(["--admin-addr", ADMIN, "accesslog", "enable"])
        .output()
        .context("running kmeshctl")?;
    ensure!(
        out.status.success(),
        "kmeshctl accesslog enable: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        eprintln!("    {line}");
    }
    let r = node.talk(client, "10.96.0.10:80".parse()?, 3, 1000)?;
    ensure!(r.errors == 0, "talk: {r:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let text = std::fs::read_to_string(accesslog).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("accesslog: "))
            .map(str::to_string)
            .collect();
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!();
    for l in &lines {
        eprintln!("    {l}");
    }
    ensure!(
        lines.len() == 3,
        "expected 3 access log lines, got {}",
        lines.len()
    );
    let (_, body) = http_get(METRICS.parse()?, "/status/metric").context("metrics")?;
    eprintln!("\n    http://{METRICS}/status/metric (excerpt):");
    for l in body.lines().filter(|l| {
        l.starts_with("istio_tcp_sent_bytes_total{reporter=\"source\"")
            && l.contains("destination_service=\"web\"")
            || l.starts_with("kmesh_map_entries")
    }) {
        eprintln!("    {l}");
    }
    // Kernel cost per program run, from the bpf_stats counters.
    let value = |metric: &str, program: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(&format!("{metric}{{program=\"{program}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    eprintln!("\n    {:<20} {:>8} {:>12}", "program", "runs", "ns per run");
    for p in [
        "kmesh_connect4",
        "kmesh_connect6",
        "kmesh_getpeername4",
        "kmesh_sockops",
    ] {
        if let (Some(n), Some(t)) = (
            value("kmesh_bpf_prog_run_count_total", p),
            value("kmesh_bpf_prog_run_time_seconds_total", p),
        ) {
            let per = if n > 0.0 { t * 1e9 / n } else { 0.0 };
            eprintln!("    {p:<20} {n:>8} {per:>12.0}");
        }
    }
    Ok(())
}
