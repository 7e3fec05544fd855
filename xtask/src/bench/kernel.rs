//! Kernel cost per connect and config scale.
//!
//! - Connect cost: the real daemon on a generated mesh of N services (one
//!   listener VIP and one cluster each), real connects from the enrolled
//!   client pod to VIPs spread over the whole table, and bpf_stats
//!   (run_time_ns / run_cnt) of each program over those connects.
//! - Config scale, from the same daemon runs: time from spawn to
//!   `/debug/ready` (parse + adapter + program load + map writes + attach)
//!   and the daemon's RSS once ready. In-process, with the daemon library:
//!   adapter time, `Dataplane::apply` time of the whole table, and the time
//!   to apply a one-endpoint change (p50/p99 over many repetitions).

use std::{fmt::Write as _, net::SocketAddr, time::Instant};

use anyhow::{ensure, Context};
use kmesh_daemon::dataplane::{Dataplane, DataplaneOptions};

use super::{
    http::{cgroup_cpu_s, machine_busy_s, Bed},
    stats::{quantile, status_kb},
    Opts,
};

pub const CONNECT_SCALES: [usize; 3] = [10, 1_000, 10_000];
pub const CONFIG_SCALES: [usize; 2] = [1_000, 10_000];
/// Connect-cost rounds per scale (for the spread).
const ROUNDS: usize = 5;
/// VIPs dialled per round, spread over the table, and connects to each.
const VIPS_PER_ROUND: usize = 5;

/// Services a MAGLEV run can have: every one-endpoint service is a
/// 1021-entry table and the slot map holds `MAX_SLOTS` entries.
pub const MAGLEV_MAX_SERVICES: usize = 250;

pub struct ConnectCost {
    /// The clusters' `lb_policy`.
    pub lb: String,
    pub services: usize,
    /// Per round: mean ns per run of each program (name → ns), and runs.
    pub rounds: Vec<Vec<(String, f64, u64)>>,
    /// Per round: cores used by processes outside the node (other work
    /// on a shared machine), which inflates program run time.
    pub other_cores: Vec<f64>,
    pub ready_ms: f64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

pub struct ConfigScale {
    pub services: usize,
    pub adapter_ms: Vec<f64>,
    pub apply_ms: Vec<f64>,
    /// Sorted durations of one-endpoint updates, µs.
    pub update_us: Vec<f64>,
    /// Sorted durations of applying an unchanged table, µs.
    pub noop_us: Vec<f64>,
}

pub struct KernelResults {
    pub costs: Vec<ConnectCost>,
    pub scale: Vec<ConfigScale>,
    pub connects_per_round: usize,
}

/// VIP of service `i` (0-based): 10.96.0.0/16, skipping .0.0.
pub fn vip(i: usize) -> SocketAddr {
    let n = i + 1;
    SocketAddr::from(([10, 96, (n >> 8) as u8, (n & 0xff) as u8], 80))
}

/// An Envoy bootstrap with `n` services, each a listener on its own VIP
/// with a tcp_proxy to its own cluster of one endpoint, `backend`, with
/// load-balancing policy `lb`.
pub fn bootstrap(n: usize, backend: SocketAddr, lb: &str) -> String {
    assert!(n < 65_000, "VIPs come from one /16");
    let mut y = String::with_capacity(n * 700);
    y.push_str("static_resources:\n  listeners:\n");
    for i in 0..n {
        let v = vip(i);
        write!(
            y,
            "  - name: svc{i}
    address: {{ socket_address: {{ address: {}, port_value: {} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: svc{i}
          cluster: svc{i}
",
            v.ip(),
            v.port()
        )
        .expect("string write");
    }
    y.push_str("  clusters:\n");
    for i in 0..n {
        write!(
            y,
            "  - name: svc{i}
    connect_timeout: 1s
    type: STATIC
    lb_policy: {lb}
    load_assignment:
      cluster_name: svc{i}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}
",
            backend.ip(),
            backend.port()
        )
        .expect("string write");
    }
    y
}

pub fn run(opts: &Opts, bed: &Bed) -> anyhow::Result<KernelResults> {
    let backend = bed.server.addr4(9090);
    let per_vip = if opts.quick { 100 } else { 1_000 };
    let mut costs = Vec::new();
    crate::step("kernel cost per connect (bpf_stats), daemon load time and RSS");
    let runs = opts.lb.iter().flat_map(|lb| {
        CONNECT_SCALES.into_iter().map(move |n| {
            let n = if lb == "MAGLEV" {
                n.min(MAGLEV_MAX_SERVICES)
            } else {
                n
            };
            (lb.as_str(), n)
        })
    });
    let mut seen = Vec::new();
    for (lb, n) in runs {
        if seen.contains(&(lb, n)) {
            continue;
        }
        seen.push((lb, n));
        let d = bed.start_daemon(&bootstrap(n, backend, lb))?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.proc.pid()))?;
        let mut c = ConnectCost {
            lb: lb.to_string(),
            services: n,
            rounds: Vec::new(),
            other_cores: Vec::new(),
            ready_ms: d.ready_after.as_secs_f64() * 1e3,
            rss_kb: status_kb(&status, "VmRSS").unwrap_or(0),
            hwm_kb: status_kb(&status, "VmHWM").unwrap_or(0),
        };
        let names: Vec<String> = d.programs.iter().map(|(_, n)| n.clone()).collect();
        for _ in 0..ROUNDS {
            let before: Vec<(u64, u64)> = names
                .iter()
                .map(|p| d.bpf_stats(&[p.as_str()]))
                .collect::<anyhow::Result<_>>()?;
            let (t0, busy0, node0) = (
                Instant::now(),
                machine_busy_s(),
                cgroup_cpu_s(&bed.node.cgroup),
            );
            for k in 0..VIPS_PER_ROUND {
                let target = vip(k * (n - 1) / (VIPS_PER_ROUND - 1));
                let r = bed.node.connect(&bed.client, target, per_vip)?;
                ensure!(
                    r.count("server") == per_vip && r.errors == 0 && r.peer_mismatch == 0,
                    "{n} services: connects to {target} did not all reach the server with the VIP as peer: {r:?}"
                );
            }
            let busy = machine_busy_s() - busy0 - (cgroup_cpu_s(&bed.node.cgroup) - node0);
            c.other_cores
                .push((busy / t0.elapsed().as_secs_f64()).max(0.0));
            let mut round = Vec::new();
            for (p, (ns0, cnt0)) in names.iter().zip(before) {
                let (ns1, cnt1) = d.bpf_stats(&[p.as_str()])?;
                let runs = cnt1 - cnt0;
                let per = if runs > 0 {
                    (ns1 - ns0) as f64 / runs as f64
                } else {
                    f64::NAN
                };
                round.push((p.clone(), per, runs));
            }
            c.rounds.push(round);
        }
        eprintln!(
            "    {lb} {n:>6} services: ready in {:.0} ms, RSS {} KiB; connect4 {:?} ns/run",
            c.ready_ms,
            c.rss_kb,
            c.rounds
                .iter()
                .filter_map(|r| r.iter().find(|(p, _, _)| p == "kmesh_connect4"))
                .map(|(_, ns, _)| ns.round())
                .collect::<Vec<_>>()
        );
        costs.push(c);
    }

    let mut scale = Vec::new();
    if opts.kernel_only {
        return Ok(KernelResults {
            costs,
            scale,
            connects_per_round: per_vip * VIPS_PER_ROUND,
        });
    }
    crate::step("config scale in-process: adapter, Dataplane::apply, one-endpoint updates");
    for n in CONFIG_SCALES {
        let yaml = bootstrap(n, backend, "ROUND_ROBIN");
        let mut adapter_ms = Vec::new();
        let mut flat = None;
        for _ in 0..3 {
            let t = Instant::now();
            let f = xds_adapter::compile_static_config(&yaml)
                .map_err(|e| anyhow::anyhow!("generated config rejected: {e}"))?;
            adapter_ms.push(t.elapsed().as_secs_f64() * 1e3);
            flat = Some(f);
        }
        let mut flat = flat.expect("three compiles");
        ensure!(
            flat.services.len() == n,
            "adapter made {} services",
            flat.services.len()
        );
        let mut apply_ms = Vec::new();
        for _ in 0..3 {
            let mut dp = Dataplane::load(&DataplaneOptions::default())
                .context("loading the dataplane in-process")?;
            let t = Instant::now();
            dp.apply(&flat)?;
            apply_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // One endpoint of one service in the middle of the table flips
        // between two addresses; each apply is one make-before-break update.
        let mut dp = Dataplane::load(&DataplaneOptions::default())?;
        dp.apply(&flat)?;
        let key = vip(n / 2);
        let alt = SocketAddr::new(backend.ip(), backend.port() + 1);
        let reps = if opts.quick { 100 } else { 1_000 };
        let mut update_us = Vec::with_capacity(reps);
        for r in 0..reps {
            let to = if r % 2 == 0 { alt } else { backend };
            let svc = flat
                .services
                .get_mut(&key)
                .context("service in the middle")?;
            svc.slots = vec![to];
            svc.endpoints[0].addr = to;
            let t = Instant::now();
            let s = dp.apply(&flat)?;
            update_us.push(t.elapsed().as_secs_f64() * 1e6);
            ensure!(
                s.changed == 1 && s.unchanged == n - 1,
                "a one-endpoint update changed {s:?}"
            );
        }
        update_us.sort_by(f64::total_cmp);
        let mut noop_us = Vec::with_capacity(reps / 4);
        for _ in 0..(reps / 4).max(10) {
            let t = Instant::now();
            let s = dp.apply(&flat)?;
            noop_us.push(t.elapsed().as_secs_f64() * 1e6);
            ensure!(s.unchanged == n, "an unchanged apply changed {s:?}");
        }
        noop_us.sort_by(f64::total_cmp);
        eprintln!(
            "    {n:>6} services: adapter {:.0} ms, apply {:.0} ms, one-endpoint update p50 {:.0} µs p99 {:.0} µs",
            adapter_ms[0],
            apply_ms[0],
            quantile(&update_us, 0.5),
            quantile(&update_us, 0.99)
        );
        scale.push(ConfigScale {
            services: n,
            adapter_ms,
            apply_ms,
            update_us,
            noop_us,
        });
    }
    Ok(KernelResults {
        costs,
        scale,
        connects_per_round: per_vip * VIPS_PER_ROUND,
    })
}
