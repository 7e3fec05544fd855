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
    netns, sys,
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
    #[arg(long, env = "KMESH_CONFIG", conflicts_with = "xds_address")]
    config: Option<PathBuf>,

    /// Control plane (ADS) address. `http://host:port` is plaintext (Istiod's
    /// :15010); `https://host:port`, or a bare `host:15012` (Istio's default
    /// `istiod.istio-system.svc:15012`), is TLS verified with --xds-ca-cert.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,

    /// CA bundle (PEM) for a TLS control plane [default: Istio's root CA,
    /// /var/run/secrets/istio/root-cert.pem].
    #[arg(long, env = "KMESH_XDS_CA_CERT")]
    xds_ca_cert: Option<PathBuf>,

    /// Name the control plane's TLS certificate must carry [default: the
    /// host of --xds-address].
    #[arg(long, env = "KMESH_XDS_TLS_SERVER_NAME")]
    xds_tls_server_name: Option<String>,

    /// Use delta ADS instead of state of the world.
    #[arg(long, env = "KMESH_XDS_DELTA")]
    xds_delta: bool,

    /// Bearer token file sent to the control plane [default: Istio's
    /// projected token /var/run/secrets/tokens/istio-token, when present].
    #[arg(long, env = "KMESH_XDS_TOKEN")]
    xds_token: Option<PathBuf>,

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
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    KernelNative,
    DualEngine,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Uninstall { bpf_fs_path }) => uninstall(&bpf_fs_path),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(cli.run))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmesh-daemon: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Stops the xDS client before the dataplane is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.mode == Mode::DualEngine {
        bail!("--mode dual-engine is not implemented in this version; use --mode kernel-native");
    }
    let xds = match (&args.config, &args.xds_address) {
        (None, None) => bail!("no config: pass --config <file> (an Envoy bootstrap with static_resources) or --xds-address http://<control plane>:15010 (env XDS_ADDRESS)"),
        (_, Some(addr)) => {
            // Refuse an unusable address before loading anything.
            let (_, tls) =
                kmesh_daemon::xds::client::endpoint_uri(addr).map_err(anyhow::Error::msg)?;
            let ca = args
                .xds_ca_cert
                .clone()
                .unwrap_or_else(|| PathBuf::from(kmesh_daemon::xds::client::ISTIO_ROOT_CA));
            if tls && !ca.exists() {
                bail!(
                    "--xds-address {addr} is TLS but the CA bundle {} does not exist (hint: pass --xds-ca-cert, or use a plaintext http:// address)",
                    ca.display()
                );
            }
            let mut opts = kmesh_daemon::xds::ClientOptions::new(
                addr.clone(),
                kmesh_daemon::xds::NodeIdentity::from_env(),
            );
            opts.delta = args.xds_delta;
            opts.ca_cert = args.xds_ca_cert.clone();
            opts.tls_server_name = args.xds_tls_server_name.clone();
            opts.token_path = args.xds_token.clone().or_else(|| {
                let p = PathBuf::from("/var/run/secrets/tokens/istio-token");
                p.exists().then_some(p)
            });
            Some(opts)
        }
        (Some(_), None) => None,
    };
    let flat = match &args.config {
        Some(config_path) => {
            let text = std::fs::read_to_string(config_path)
                .with_context(|| format!("reading --config {}", config_path.display()))?;
            let flat = xds_adapter::compile_static_config(&text)
                .map_err(|e| anyhow::anyhow!("config {} rejected:\n{e}", config_path.display()))?;
            for w in &flat.warnings {
                tracing::warn!("config: {w}");
            }
            flat
        }
        // The control plane fills the maps; until then connects are left alone.
        None => xds_adapter::FlatConfig {
            services: Default::default(),
            warnings: vec![],
        },
    };

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
    let admin = tokio::spawn(admin::serve(args.admin_addr, state.clone()));

    let mut dp = Dataplane::load(&DataplaneOptions {
        pin_dir: Some(pins.clone()),
    })?;
    let summary = dp.apply(&flat)?;
    if let Some(p) = &args.config {
        tracing::info!(
            services = summary.added,
            slots = summary.slots_written,
            "config {} written to the kernel",
            p.display()
        );
    }
    for (path, cookie) in &cookies {
        dp.enroll(*cookie)?;
        tracing::info!(netns = %path.display(), cookie, "enrolled");
    }
    dp.attach(&cgroup)?;
    tracing::info!(cgroup = %cgroup.display(), programs = ?dp.program_ids(), "programs attached");
    *state.config.lock().unwrap_or_else(|p| p.into_inner()) = Some(flat);
    *state.dataplane.lock().unwrap_or_else(|p| p.into_inner()) = Some(dp);
    let _xds_task = match xds {
        Some(opts) => {
            let status = kmesh_daemon::xds::SharedStatus::default();
            *state.xds.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
            tracing::info!(address = %opts.address, delta = opts.delta, "subscribing to the control plane; ready after its first config");
            Some(AbortOnDrop(tokio::spawn(kmesh_daemon::xds::run(
                opts,
                kmesh_daemon::xds::DataplaneSink {
                    state: state.clone(),
                },
                status,
            ))))
        }
        None => {
            state.ready.store(true, Ordering::Release);
            tracing::info!("ready");
            None
        }
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: detaching"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: detaching"),
        r = admin => {
            r.context("admin task")??;
        }
    }
    state.ready.store(false, Ordering::Release);
    drop(_xds_task);
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
