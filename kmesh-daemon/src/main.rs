//! `kmesh-daemon`: the kmesh-rs node agent.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::Ordering,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use kmesh_daemon::{
    admin::{self, AdminState},
    dataplane::{Dataplane, DataplaneOptions},
    logging, netns, sys, telemetry,
};

#[derive(Parser, Debug)]
#[command(
    name = "kmesh-daemon",
    version,
    about = "kmesh-rs node agent: routes service traffic in the kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Remove everything kmesh-daemon pinned under --bpf-fs-path.
    Uninstall {
        #[arg(long, env = "KMESH_BPF_FS_PATH", default_value = "/sys/fs/bpf")]
        bpf_fs_path: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Dataplane mode. Only kernel-native is implemented in this version.
    #[arg(long, value_enum, env = "KMESH_MODE", default_value = "kernel-native")]
    mode: Mode,

    /// Static mesh config: an Envoy v3 bootstrap (`static_resources`) or an
    /// Envoy config_dump, YAML or JSON.
    #[arg(long, env = "KMESH_CONFIG")]
    config: Option<PathBuf>,

    /// Network namespace to enroll (e.g. /var/run/netns/NAME, or
    /// /proc/1/ns/net for the host); repeatable.
    #[arg(long = "enroll-netns", value_name = "PATH")]
    enroll_netns: Vec<PathBuf>,

    /// cgroup v2 directory to attach the programs to [default: the cgroup2
    /// mount point from /proc/mounts].
    #[arg(long, env = "KMESH_CGROUP2_PATH")]
    cgroup2_path: Option<PathBuf>,

    /// bpffs mount; maps are pinned under <bpf-fs-path>/kmesh.
    #[arg(long, env = "KMESH_BPF_FS_PATH", default_value = "/sys/fs/bpf")]
    bpf_fs_path: PathBuf,

    /// Admin API address.
    #[arg(long, env = "KMESH_ADMIN_ADDR", default_value = "127.0.0.1:15200")]
    admin_addr: SocketAddr,

    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[derive(clap::Args, Debug)]
struct TelemetryArgs {
    /// Prometheus endpoint (/status/metric and /metrics), as Istio's :15020.
    #[arg(long, env = "KMESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Start with the access log on (switch at runtime: POST /accesslog?enable=).
    #[arg(long, env = "KMESH_ACCESSLOG")]
    accesslog: bool,
    /// Access log line format.
    #[arg(
        long,
        value_enum,
        env = "KMESH_ACCESSLOG_FORMAT",
        default_value = "text"
    )]
    accesslog_format: telemetry::accesslog::Format,
    /// Start with connection tracking off (switch at runtime: POST /monitoring?enable=).
    #[arg(long, env = "KMESH_NO_MONITORING")]
    no_monitoring: bool,
    /// Name the pod in a network namespace for metrics and access logs
    /// (without Kubernetes, workloads are otherwise "unknown"); repeatable.
    #[arg(long = "workload", value_name = "NETNS_PATH=NAMESPACE/NAME")]
    workloads: Vec<telemetry::workload::WorkloadSpec>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    KernelNative,
    DualEngine,
}

fn main() -> ExitCode {
    let log_control = logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Uninstall { bpf_fs_path }) => uninstall(&bpf_fs_path),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(cli.run, log_control))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmesh-daemon: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn pin_dir(bpf_fs_path: &Path) -> PathBuf {
    bpf_fs_path.join("kmesh")
}

fn uninstall(bpf_fs_path: &Path) -> anyhow::Result<()> {
    let dir = pin_dir(bpf_fs_path);
    if !dir.exists() {
        println!("nothing to remove: {} does not exist", dir.display());
        return Ok(());
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("removed {}", dir.display());
    Ok(())
}

async fn run(args: RunArgs, log_control: logging::LogControl) -> anyhow::Result<()> {
    if args.mode == Mode::DualEngine {
        bail!("--mode dual-engine is not implemented in this version; use --mode kernel-native");
    }
    let Some(config_path) = &args.config else {
        bail!("no config: pass --config <file> (an Envoy bootstrap with static_resources); the xDS client is not implemented in this version");
    };
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("reading --config {}", config_path.display()))?;
    let flat = xds_adapter::compile_static_config(&text)
        .map_err(|e| anyhow::anyhow!("config {} rejected:\n{e}", config_path.display()))?;
    for w in &flat.warnings {
        tracing::warn!("config: {w}");
    }

    let cgroup = match &args.cgroup2_path {
        Some(p) => p.clone(),
        None => sys::cgroup2_mount()?,
    };
    let cookies = args
        .enroll_netns
        .iter()
        .map(|p| netns::cookie_of(p).map(|c| (p, c)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("--enroll-netns")?;

    if sys::ensure_bpffs(&args.bpf_fs_path)? {
        tracing::info!(path = %args.bpf_fs_path.display(), "mounted bpffs");
    }
    let pins = pin_dir(&args.bpf_fs_path);
    if pins.exists() {
        bail!(
            "{} already exists: another kmesh-daemon is running, or one stopped without cleaning up; if none is running, remove it with `kmesh-daemon uninstall --bpf-fs-path {}`",
            pins.display(),
            args.bpf_fs_path.display()
        );
    }

    let state = AdminState::new();
    let _ = state.logging.set(log_control);
    let admin = tokio::spawn(admin::serve(args.admin_addr, state.clone()));
    // Metrics are not worth failing the dataplane for: a busy port is logged.
    let metrics_state = state.clone();
    tokio::spawn(async move {
        if let Err(e) = telemetry::server::serve(args.telemetry.metrics_addr, metrics_state).await {
            tracing::error!("{e}");
        }
    });

    let mut dp = Dataplane::load(&DataplaneOptions {
        pin_dir: Some(pins.clone()),
        ..Default::default()
    })?;
    let tel = telemetry::Telemetry::start(
        &mut dp,
        telemetry::TelemetryOptions {
            accesslog: args.telemetry.accesslog,
            accesslog_format: args.telemetry.accesslog_format,
            monitoring: !args.telemetry.no_monitoring,
            ..Default::default()
        },
    )?;
    let applied = dp.apply(&flat);
    telemetry::record_config_apply(applied.is_ok());
    let summary = applied?;
    tel.set_config(&flat);
    for w in &args.telemetry.workloads {
        let ips = tel
            .register_workload(w)
            .with_context(|| format!("--workload {}", w.netns.display()))?;
        tracing::info!(netns = %w.netns.display(), workload = %format!("{}/{}", w.workload.namespace, w.workload.name), ?ips, "workload named");
    }
    let _ = state.telemetry.set(tel);
    tracing::info!(
        services = summary.added,
        slots = summary.slots_written,
        "config {} written to the kernel",
        config_path.display()
    );
    for (path, cookie) in &cookies {
        dp.enroll(*cookie)?;
        tracing::info!(netns = %path.display(), cookie, "enrolled");
    }
    dp.attach(&cgroup)?;
    tracing::info!(cgroup = %cgroup.display(), programs = ?dp.program_ids(), "programs attached");
    *state.config.lock().unwrap_or_else(|p| p.into_inner()) = Some(flat);
    *state.dataplane.lock().unwrap_or_else(|p| p.into_inner()) = Some(dp);
    state.ready.store(true, Ordering::Release);
    tracing::info!("ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: detaching"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: detaching"),
        r = admin => {
            r.context("admin task")??;
        }
    }
    state.ready.store(false, Ordering::Release);
    // Dropping the dataplane detaches the programs and removes the pins.
    drop(
        state
            .dataplane
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(),
    );
    tracing::info!("detached and unpinned; bye");
    Ok(())
}
