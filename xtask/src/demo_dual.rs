//! `cargo xtask demo`, second part: dual-engine mode. A sandbox with a
//! client, an intruder and two servers; `kmesh-daemon --mode dual-engine`
//! on the embedded ztunnel-style local config (`demo/local.yaml`): the
//! service VIP is load-balanced at connect time, and the XDP program on the
//! servers' interfaces lets the client in and drops the intruder's SYNs.
//! Then a real Envoy runs as the waypoint of `shop/reviews`: the client's
//! HTTP requests to the reviews VIP are steered to it with a PROXY v2
//! header, and it routes them by header.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use bpf_tests::{http_get, waypoint_envoy_bootstrap, Node, PodEnvoy};

use crate::{bin_dir, step};

const LOCAL: &str = include_str!("../demo/local.yaml");
const ADMIN: &str = "127.0.0.1:15201";

pub fn run() -> anyhow::Result<()> {
    step("dual-engine: a sandbox with client, intruder, srv0, srv1");
    let mut node = Node::new("kmdual", &bin_dir().join("kmesh-testpod"))?;
    let client = node.add_pod("client")?;
    let intruder = node.add_pod("intruder")?;
    let srv0 = node.add_pod("srv0")?;
    let srv1 = node.add_pod("srv1")?;
    let waypoint = node.add_pod("waypoint")?;
    let v1 = node.add_pod("reviews-v1")?;
    let v2 = node.add_pod("reviews-v2")?;
    ensure!(
        client.ip4.octets() == [10, 244, 0, 2] && v2.ip4.octets() == [10, 244, 0, 8],
        "pod addresses differ from the ones demo/local.yaml names"
    );
    for s in [&srv0, &srv1] {
        node.serve(s, &s.name.clone(), &[s.addr4(8080)])?;
    }
    for s in [&v1, &v2] {
        node.serve_http(s, &s.name.clone(), &[s.addr4(9080)])?;
    }
    let envoy_bin = crate::setup::ensure_envoy()?;

    step("starting kmesh-daemon --mode dual-engine on demo/local.yaml");
    let cfg = std::env::temp_dir().join(format!("{}-local.yaml", node.name));
    std::fs::write(&cfg, LOCAL)?;
    let log = std::env::temp_dir().join(format!("{}-daemon.log", node.name));
    let mut cmd = Command::new(bin_dir().join("kmesh-daemon"));
    cmd.args(["--mode", "dual-engine", "--config"])
        .arg(&cfg)
        .arg("--cgroup2-path")
        .arg(&node.cgroup)
        .args(["--bpf-fs-path", "/sys/fs/bpf"])
        .args(["--admin-addr", ADMIN]);
    for p in [&client, &intruder, &srv0, &srv1] {
        cmd.arg("--enroll-netns").arg(&p.netns_path);
    }
    cmd.arg("--waypoint-netns").arg(&waypoint.netns_path);
    let mut daemon = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting kmesh-daemon")?;
    let result = drive(&node, &client, &intruder, &srv0, &mut daemon)
        .and_then(|()| drive_waypoint(&node, &client, &waypoint, &v2, &envoy_bin));
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
    result?;
    ensure!(status.success(), "kmesh-daemon exited with {status}");
    drop(node);
    eprintln!("    sandbox removed");
    Ok(())
}

fn drive(
    node: &Node,
    client: &bpf_tests::Pod,
    intruder: &bpf_tests::Pod,
    srv0: &bpf_tests::Pod,
    daemon: &mut std::process::Child,
) -> anyhow::Result<()> {
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
    step("dual-engine: connections (a denied SYN is dropped; the client times out after 400 ms)");
    let vip: SocketAddr = "10.96.0.30:80".parse()?;
    let runs = [
        (client, "client (frontend/web)", vip, 10),
        (client, "client (frontend/web)", srv0.addr4(8080), 2),
        (intruder, "intruder (frontend/admin)", vip, 2),
        (intruder, "intruder (frontend/admin)", srv0.addr4(8080), 2),
    ];
    eprintln!(
        "    {:<26} {:<18} {:>5}  {:<8} {:>6} {:>7}",
        "from", "to", "conns", "verdict", "srv0", "srv1"
    );
    eprintln!("    {}", "-".repeat(76));
    let mut allowed_ok = false;
    let mut denied_ok = false;
    for (pod, label, to, n) in runs {
        let r = node.connect_timeout(pod, to, n, 400)?;
        let ok = r.count("srv0") + r.count("srv1");
        let verdict = if ok == n {
            "ALLOWED"
        } else if ok == 0 {
            "DENIED"
        } else {
            "MIXED"
        };
        allowed_ok |= pod.name == "client" && verdict == "ALLOWED";
        denied_ok |= pod.name == "intruder" && verdict == "DENIED";
        eprintln!(
            "    {label:<26} {:<18} {n:>5}  {verdict:<8} {:>6} {:>7}",
            to.to_string(),
            r.count("srv0"),
            r.count("srv1")
        );
    }
    let (_, body) =
        http_get(admin, "/debug/config_dump/bpf/dual-engine").context("dual-engine bpf dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    eprintln!(
        "\n    kernel decision counters (KM_AZ_STATS): {}",
        dump["stats"]
    );
    eprintln!(
        "    per policy (KM_AZ_POLICY_STATS): {}",
        dump["policy_decisions"]
    );
    ensure!(
        allowed_ok && denied_ok,
        "expected the client allowed and the intruder denied"
    );
    Ok(())
}

/// The waypoint part: Envoy in the waypoint pod, HTTP requests from the
/// client to the reviews VIP with and without `x-canary: 1`.
fn drive_waypoint(
    node: &Node,
    client: &bpf_tests::Pod,
    waypoint: &bpf_tests::Pod,
    canary: &bpf_tests::Pod,
    envoy_bin: &std::path::Path,
) -> anyhow::Result<()> {
    step("dual-engine: a real Envoy as the waypoint of shop/reviews (PROXY v2 on :15088)");
    let mut envoy = PodEnvoy::start(
        envoy_bin,
        waypoint,
        &waypoint_envoy_bootstrap(15088, canary.addr4(9080)),
    )?;
    // Listening once a request without a PROXY header is no longer refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        ensure!(envoy.running(), "Envoy exited (its log is above)");
        let r = node.http_requests(client, waypoint.addr4(15088), 1, None)?;
        if !r.error_kinds.contains_key("ConnectionRefused") {
            break;
        }
        ensure!(Instant::now() < deadline, "Envoy not listening after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let vip: SocketAddr = "10.96.0.31:80".parse()?;
    eprintln!(
        "    {:<34} {:>4}  {:>10} {:>10} {:>6}",
        "client → 10.96.0.31:80 (reviews)", "reqs", "reviews-v1", "reviews-v2", "errors"
    );
    eprintln!("    {}", "-".repeat(70));
    let mut ok = true;
    for (label, header, want) in [
        ("GET /", None, "reviews-v1"),
        ("GET / with x-canary: 1", Some("x-canary: 1"), "reviews-v2"),
    ] {
        let r = node.http_requests(client, vip, 4, header)?;
        ok &= r.count(want) == 4;
        eprintln!(
            "    {label:<34} {:>4}  {:>10} {:>10} {:>6}",
            4,
            r.count("reviews-v1"),
            r.count("reviews-v2"),
            r.errors
        );
    }
    let (_, body) =
        http_get(ADMIN.parse()?, "/debug/config_dump/bpf/kernel-native").context("kernel dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    eprintln!(
        "\n    waypoint counters (KM_WP_STATS): {}",
        dump["waypoint_stats"]
    );
    ensure!(
        ok,
        "expected plain requests answered by reviews-v1 (the original destination) and canary ones by reviews-v2"
    );
    Ok(())
}
