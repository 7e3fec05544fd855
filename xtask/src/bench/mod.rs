//! `cargo xtask bench`: kmesh-rs against no mesh and against Envoy, the
//! kernel cost per connect, and config scale; results go to the terminal
//! and to the marked section of `BENCHMARKS.md`.
//!
//! Two stages. The plain xtask (built before anything is installed) runs
//! `setup`, installs wrk and Envoy, builds the daemon, the test pod and
//! xtask itself in release with the `bench` feature (which links the
//! daemon library, to time the map writer in-process), and runs that
//! binary with the same arguments. Everything measured is a release build.
//!
//! Options: `--reps N` (default 5), `--duration SECS` per measured run
//! (default 8), `--warmup SECS` (default 1), `--conns 1,64,1024`,
//! `--quick` (1 s runs, 1 repetition: checks the plumbing, numbers are
//! noise), `--no-write` (do not touch BENCHMARKS.md).

#[cfg(feature = "bench")]
mod http;
#[cfg(feature = "bench")]
mod kernel;
#[cfg(feature = "bench")]
mod report;
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
mod stats;

use anyhow::{bail, Context};

/// LB policies the kernel-cost runs can use (`--lb`).
pub const LB_POLICIES: [&str; 4] = ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "MAGLEV"];

/// Options of one bench run.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
pub struct Opts {
    pub reps: usize,
    pub duration_s: u32,
    pub warmup_s: u32,
    pub conns: Vec<usize>,
    pub write: bool,
    pub quick: bool,
    /// Only the kernel cost per connect (no HTTP runs, no config scale),
    /// written to its own section of BENCHMARKS.md.
    pub kernel_only: bool,
    /// LB policies of the generated clusters for the kernel-cost runs.
    pub lb: Vec<String>,
    /// The command line as typed, for the report.
    pub command: String,
}

fn parse_opts(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        reps: 5,
        duration_s: 8,
        warmup_s: 1,
        conns: vec![1, 64, 1024],
        write: true,
        quick: false,
        kernel_only: false,
        lb: vec!["ROUND_ROBIN".into()],
        command: std::iter::once("cargo xtask bench".to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value"))
                .cloned()
        };
        match a.as_str() {
            "--reps" => o.reps = value("--reps")?.parse().context("--reps")?,
            "--duration" => o.duration_s = value("--duration")?.parse().context("--duration")?,
            "--warmup" => o.warmup_s = value("--warmup")?.parse().context("--warmup")?,
            "--conns" => {
                o.conns = value("--conns")?
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--conns takes a list like 1,64,1024")?
            }
            "--no-write" => o.write = false,
            "--kernel-only" => o.kernel_only = true,
            "--lb" => {
                o.lb = value("--lb")?
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .collect();
                if let Some(bad) = o.lb.iter().find(|p| !LB_POLICIES.contains(&p.as_str())) {
                    bail!("--lb: unknown policy {bad:?}; one or more of {:?}", LB_POLICIES);
                }
            }
            "--quick" => {
                o.quick = true;
                o.reps = 1;
                o.duration_s = 1;
                o.warmup_s = 1;
            }
            other => bail!(
                "unknown option {other:?}; options: --reps N --duration SECS --warmup SECS --conns 1,64,1024 --quick --no-write --kernel-only --lb ROUND_ROBIN,RANDOM,LEAST_REQUEST,MAGLEV"
            ),
        }
    }
    if o.reps == 0 || o.duration_s == 0 || o.conns.is_empty() || o.conns.contains(&0) {
        bail!("--reps, --duration and every --conns value must be at least 1");
    }
    Ok(o)
}

/// Where cargo puts release binaries.
pub fn release_dir() -> std::path::PathBuf {
    crate::bin_dir()
        .parent()
        .expect("target dir")
        .join("release")
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let opts = parse_opts(args)?;
    if !crate::is_root() {
        bail!("the bench creates network namespaces and loads eBPF programs: run `sudo -E cargo xtask bench`");
    }
    #[cfg(feature = "bench")]
    {
        run_inner(&opts)
    }
    #[cfg(not(feature = "bench"))]
    {
        let _ = &opts;
        crate::setup::run()?;
        crate::step("checking the load generator and the proxies");
        crate::setup::ensure_debian(&[("wrk", "wrk")])?;
        crate::setup::ensure_envoy()?;
        crate::step(
            "building release binaries: kmesh-daemon, kmesh-testpod, xtask with --features bench",
        );
        let cargo = || std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        crate::run_cmd(cargo().args([
            "build",
            "--release",
            "--locked",
            "-p",
            "kmesh-daemon",
            "-p",
            "bpf-tests",
            "--bins",
        ]))?;
        crate::run_cmd(cargo().args([
            "build",
            "--release",
            "--locked",
            "-p",
            "xtask",
            "--features",
            "bench",
        ]))?;
        let exe = release_dir().join("xtask");
        let status = std::process::Command::new(&exe)
            .arg("bench")
            .args(args)
            .current_dir(crate::root())
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        if !status.success() {
            bail!("the bench failed ({status})");
        }
        Ok(())
    }
}

#[cfg(feature = "bench")]
fn run_inner(opts: &Opts) -> anyhow::Result<()> {
    crate::step("tools");
    crate::setup::ensure_debian(&[("wrk", "wrk"), ("ip", "iproute2"), ("bpftool", "bpftool")])?;
    let envoy = crate::setup::ensure_envoy()?;
    let rel = release_dir();
    for b in ["kmesh-daemon", "kmesh-testpod"] {
        if !rel.join(b).exists() {
            bail!(
                "{} missing: run `cargo xtask bench` (it builds the release binaries first)",
                rel.join(b).display()
            );
        }
    }
    let machine = report::Machine::probe(&envoy);
    // Kernel program run time is counted only while this fd is open
    // (BPF_ENABLE_STATS); it costs two clock reads per program run, for
    // every program on the machine, until the bench ends.
    let _stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling bpf_stats (BPF_ENABLE_STATS needs Linux 5.8+ and root)")?;
    let started = std::time::Instant::now();
    let bed = http::Bed::new(&envoy, &rel)?;
    let (md, start, end) = if opts.kernel_only {
        let kernel = kernel::run(opts, &bed)?;
        drop(bed);
        (
            report::render_kernel_only(opts, &machine, &kernel, started.elapsed()),
            report::KERNEL_START,
            report::KERNEL_END,
        )
    } else {
        let http = http::run(opts, &bed)?;
        let kernel = kernel::run(opts, &bed)?;
        // Stops every process and removes the namespaces and cgroups.
        drop(bed);
        (
            report::render(opts, &machine, &http, &kernel, started.elapsed()),
            report::START,
            report::END,
        )
    };
    println!("{md}");
    if opts.write {
        let path = crate::root().join("BENCHMARKS.md");
        let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
        let new = stats::replace_section(&old, start, end, &md)?;
        std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("\nwrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options() {
        let o = parse_opts(&[]).unwrap();
        assert_eq!((o.reps, o.duration_s, o.warmup_s), (5, 8, 1));
        assert_eq!(o.conns, vec![1, 64, 1024]);
        assert_eq!(o.command, "cargo xtask bench");
        let o = parse_opts(&args("--reps 7 --conns 1,8 --no-write")).unwrap();
        assert_eq!((o.reps, o.conns.clone(), o.write), (7, vec![1, 8], false));
        assert_eq!(
            o.command,
            "cargo xtask bench --reps 7 --conns 1,8 --no-write"
        );
        assert!(parse_opts(&args("--quick")).unwrap().quick);
        let o = parse_opts(&args("--kernel-only --lb MAGLEV,RANDOM")).unwrap();
        assert!(o.kernel_only);
        assert_eq!(o.lb, vec!["MAGLEV", "RANDOM"]);
        assert!(parse_opts(&args("--lb FOO")).is_err());
        assert!(parse_opts(&args("--reps")).is_err());
        assert!(parse_opts(&args("--reps 0")).is_err());
        assert!(parse_opts(&args("--conns 1,x")).is_err());
        assert!(parse_opts(&args("--frobnicate")).is_err());
    }
}
