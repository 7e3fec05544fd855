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
    enroll::kubernetes::{self, HostResolver},
    logging, netns, pinlock, sys, telemetry,
};
use std::collections::BTreeSet;

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
    /// Exit 0 when the local daemon reports ready (GET /debug/ready), 1
    /// otherwise; for Kubernetes readiness probes.
    Probe {
        #[arg(long, env = "KMESH_ADMIN_ADDR", default_value = "127.0.0.1:15200")]
        admin_addr: SocketAddr,
    },
    /// Remove everything kmesh-daemon pinned under --bpf-fs-path.
    Uninstall {
        #[arg(long, env = "KMESH_BPF_FS_PATH", default_value = "/sys/fs/bpf")]
        bpf_fs_path: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Dataplane mode: `dual-engine` (the Istio workload API or a
    /// ztunnel-style local config: workloads, services and L4
    /// authorization policies enforced by XDP) or `kernel-native` (Envoy
    /// config, connect-time L4 routing).
    #[arg(long, value_enum, env = "KMESH_MODE", default_value = "dual-engine")]
    mode: Mode,

    /// Static mesh config. kernel-native: an Envoy v3 bootstrap
    /// (`static_resources`) or an Envoy config_dump, YAML or JSON.
    /// dual-engine: istio/ztunnel's local config (`workloads`, `services`,
    /// `policies`).
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

    /// dual-engine: network namespace of a waypoint pod to enroll
    /// (repeatable). Its connects are routed like any enrolled pod's but
    /// never steered to a waypoint (that would loop back to it).
    #[arg(long = "waypoint-netns", value_name = "PATH")]
    waypoint_netns: Vec<PathBuf>,

    /// cgroup v2 directory to attach the programs to [default: the cgroup2
    /// mount point from /proc/mounts].
    #[arg(long, env = "KMESH_CGROUP2_PATH")]
    cgroup2_path: Option<PathBuf>,

    /// bpffs mount; maps are pinned under <bpf-fs-path>/kmesh.
    #[arg(long, env = "KMESH_BPF_FS_PATH", default_value = "/sys/fs/bpf")]
    bpf_fs_path: PathBuf,

    /// Enroll the pods of this node from Kubernetes (namespace or pod label
    /// `istio.io/dataplane-mode=Kmesh`), using the in-cluster API config.
    #[arg(long, env = "KMESH_KUBERNETES")]
    kubernetes: bool,

    /// This node's name (pods are watched with spec.nodeName=<name>).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// dual-engine: this node's locality `region[/zone[/subzone]]`, what
    /// locality-aware load balancing ranks service endpoints against.
    #[arg(long, env = "KMESH_LOCALITY", default_value = "")]
    locality: xds_adapter::workload::Locality,

    /// dual-engine: this node's network (the workload API's `network`).
    #[arg(long, env = "NETWORK", default_value = "")]
    network: String,

    /// dual-engine: this node's cluster (the workload API's `cluster_id`).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,

    /// Where the host's /proc is mounted (to find pod network namespaces).
    #[arg(long, env = "KMESH_HOST_PROC", default_value = "/proc")]
    host_proc: PathBuf,

    /// What SIGTERM leaves behind: `detach` removes programs and pins;
    /// `keep` leaves programs attached and maps pinned, so the kernel keeps
    /// routing until the next daemon takes over (restarts and upgrades
    /// without traffic loss; `kmesh-daemon uninstall` removes it all).
    #[arg(long, value_enum, env = "KMESH_ON_EXIT", default_value = "detach")]
    on_exit: OnExit,

    /// dual-engine: the interface inside each `--enroll-netns` namespace
    /// that authorization (XDP) is attached to.
    #[arg(long, env = "KMESH_AUTHZ_INTERFACE", default_value = "eth0")]
    authz_interface: String,

    /// Where connects to HTTP services routed per request are steered and
    /// where the L7 connector listens: an address of this node that pods
    /// reach (the node IP, port 15006). Without it such services are not
    /// installed (connects to them are left alone).
    #[arg(long, env = "KMESH_L7_CONNECTOR_ADDR")]
    l7_connector_addr: Option<SocketAddr>,

    /// Network namespace the L7 connector's sockets live in (listener and
    /// upstream connections) [default: the daemon's, i.e. the host's for a
    /// hostNetwork pod].
    #[arg(long, env = "KMESH_L7_CONNECTOR_NETNS", value_name = "PATH")]
    l7_connector_netns: Option<PathBuf>,

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
    /// How often bytes of open connections are added to
    /// istio_tcp_sent_bytes_total/istio_tcp_received_bytes_total (the rest
    /// at close), in milliseconds.
    #[arg(long, env = "KMESH_TCP_REPORTING_INTERVAL_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    tcp_reporting_interval_ms: u64,
    /// Trust domain of workload principals (spiffe://<domain>/ns/<ns>/sa/<sa>),
    /// with --kubernetes.
    #[arg(long, env = "TRUST_DOMAIN", default_value = telemetry::pods::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnExit {
    Detach,
    Keep,
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
        Some(Command::Probe { admin_addr }) => probe(admin_addr),
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

/// Writes the Kubernetes-derived enrolled set into the running dataplane,
/// and the pods' identities into telemetry.
struct EnrollmentSink {
    state: std::sync::Arc<AdminState>,
    trust_domain: String,
}

impl kubernetes::EnrollSink for EnrollmentSink {
    fn set_pods(&mut self, pods: &[std::sync::Arc<k8s_openapi::api::core::v1::Pod>]) {
        if let Some(t) = self.state.telemetry.get() {
            let ids: Vec<_> = pods
                .iter()
                .filter_map(|p| telemetry::pods::workload_of(p, &self.trust_domain))
                .collect();
            tracing::debug!(workloads = ids.len(), "pod identities from Kubernetes");
            t.set_kubernetes_workloads(&ids);
        }
    }

    fn set_enrolled(&mut self, cookies: &BTreeSet<u64>) -> Result<(), String> {
        let mut dp = self
            .state
            .dataplane
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match dp.as_mut() {
            Some(dp) => dp.set_enrolled(cookies).map_err(|e| e.to_string()),
            None => Err("dataplane not loaded".into()),
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

fn probe(admin: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(1))
        .with_context(|| format!("admin API {admin} unreachable"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    write!(
        s,
        "GET /debug/ready HTTP/1.1\r\nHost: kmesh\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        code => bail!("not ready (HTTP {})", code.unwrap_or("?")),
    }
}

fn uninstall(bpf_fs_path: &Path) -> anyhow::Result<()> {
    let dir = pin_dir(bpf_fs_path);
    if !dir.exists() {
        println!("nothing to remove: {} does not exist", dir.display());
        return Ok(());
    }
    let Some(lock) = pinlock::try_acquire(&dir)? else {
        bail!(
            "a kmesh daemon is running on {} (it holds {}); stop it (delete the DaemonSet) before uninstalling",
            dir.display(),
            pinlock::lock_path(&dir).display()
        );
    };
    // The kernel releases a link whose last reference went away from a
    // workqueue, a little after the unlink (later still when cgroup_mutex
    // is contended): note the links' programs first and wait until they
    // are unloaded — a program is put only after its link detached it —
    // so that nothing is attached any more when this returns.
    let progs: Vec<u32> = std::fs::read_dir(dir.join("links"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| aya::programs::links::PinnedLink::from_pin(e.path()).ok())
                .filter_map(|p| aya::programs::links::FdLink::from(p).info().ok())
                .map(|i| i.program_id())
                .collect()
        })
        .unwrap_or_default();
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while aya::programs::loaded_programs()
        .flatten()
        .any(|p| progs.contains(&p.id()))
    {
        if std::time::Instant::now() > deadline {
            bail!(
                "removed {} but some of its programs are still loaded after 10 s",
                dir.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let lock_dir = lock.path().to_path_buf();
    drop(lock);
    // Best effort: a daemon starting right now may hold it again.
    let _ = std::fs::remove_dir(&lock_dir);
    println!(
        "removed {} ({} attached programs unloaded)",
        dir.display(),
        progs.len()
    );
    Ok(())
}

async fn run(args: RunArgs, log_control: logging::LogControl) -> anyhow::Result<()> {
    let dual_engine = args.mode == Mode::DualEngine;
    let local_node = xds_adapter::workload::LocalNode {
        locality: args.locality.clone(),
        node: args.node_name.clone().unwrap_or_default(),
        network: args.network.clone(),
        cluster_id: args.cluster_id.clone(),
    };
    let xds = match (&args.config, &args.xds_address) {
        (None, None) if !dual_engine => bail!("no config: pass --config <file> (an Envoy bootstrap with static_resources) or --xds-address http://<control plane>:15010 (env XDS_ADDRESS)"),
        (None, None) => None,
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
            // The workload API is served over delta ADS only.
            opts.delta = args.xds_delta || dual_engine;
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
    let mut dual = None;
    let flat = match &args.config {
        Some(config_path) => {
            let text = std::fs::read_to_string(config_path)
                .with_context(|| format!("reading --config {}", config_path.display()))?;
            let rejected = |e| anyhow::anyhow!("config {} rejected:\n{e}", config_path.display());
            let flat = if dual_engine {
                let de = xds_adapter::workload::compile_local_config_for(&text, &local_node)
                    .map_err(rejected)?;
                let flat = de.flat.clone();
                dual = Some(de);
                flat
            } else {
                xds_adapter::compile_static_config(&text).map_err(rejected)?
            };
            for w in &flat.warnings {
                tracing::warn!("config: {w}");
            }
            // The parsed resources and the text are gone; give their pages back.
            drop(text);
            sys::release_freed_memory();
            flat
        }
        // dual-engine: empty tables (no service is routed, no policy
        // applies) until the control plane sends the workload API.
        None if dual_engine => {
            let de =
                xds_adapter::workload::DualEngineConfig::compile(Default::default(), &local_node)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            let flat = de.flat.clone();
            dual = Some(de);
            flat
        }
        // The control plane fills the maps; until then connects are left alone.
        None => xds_adapter::FlatConfig {
            services: Default::default(),
            l7: Vec::new(),
            warnings: vec![],
        },
    };
    if dual_engine {
        tracing::info!(
            locality = %format!("{}/{}/{}", local_node.locality.region, local_node.locality.zone, local_node.locality.subzone),
            node = %local_node.node,
            network = %local_node.network,
            cluster = %local_node.cluster_id,
            "mode dual-engine: {}",
            match (&args.config, &args.xds_address) {
                (Some(p), _) => format!("local config {}", p.display()),
                (None, Some(a)) => format!("workload API (Address, Authorization) over delta ADS from {a}"),
                (None, None) => "no --config and no --xds-address: tables are empty (nothing is routed or authorized) until a config is given".into(),
            }
        );
    }

    sys::check_kernel()?;
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
    let waypoint_cookies = args
        .waypoint_netns
        .iter()
        .map(|p| netns::cookie_of(p).map(|c| (p, c)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("--waypoint-netns")?;

    if sys::ensure_bpffs(&args.bpf_fs_path)? {
        tracing::info!(path = %args.bpf_fs_path.display(), "mounted bpffs");
    }
    let pins = pin_dir(&args.bpf_fs_path);

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

    // Not ready (admin says so) while another daemon owns the pins.
    let pin_lock = match pinlock::try_acquire(&pins)? {
        Some(l) => l,
        None => {
            tracing::warn!(lock = %pinlock::lock_path(&pins).display(), "another kmesh daemon owns the pinned state; waiting for it to exit");
            let p = pins.clone();
            tokio::task::spawn_blocking(move || pinlock::acquire(&p)).await??
        }
    };
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
            tcp_reporting_interval: std::time::Duration::from_millis(
                args.telemetry.tcp_reporting_interval_ms,
            ),
            ..Default::default()
        },
    )?;
    tracing::info!(state = ?dp.pinned_state(), pins = %pins.display(), "maps loaded");
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
        added = summary.added,
        changed = summary.changed,
        removed = summary.removed,
        unchanged = summary.unchanged,
        slots_written = summary.slots_written,
        "config {} written to the kernel",
        args.config
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(none yet: waiting for the control plane)".into())
    );
    // Waypoint namespaces first, with their flag: set_enrolled leaves
    // existing entries as they are, so they are never steered to themselves.
    for (path, cookie) in &waypoint_cookies {
        dp.enroll_waypoint(*cookie)?;
        tracing::info!(netns = %path.display(), cookie, "enrolled as a waypoint");
    }
    let static_cookies: BTreeSet<u64> = cookies
        .iter()
        .chain(&waypoint_cookies)
        .map(|(_, c)| *c)
        .collect();
    if args.kubernetes {
        // The Kubernetes reconciler owns the full set; until its first
        // reconcile, enrollments inherited from pinned maps stay.
        for c in &static_cookies {
            dp.enroll(*c)?;
        }
    } else {
        dp.set_enrolled(&static_cookies)?;
    }
    for (path, cookie) in &cookies {
        tracing::info!(netns = %path.display(), cookie, "enrolled");
    }
    if let Some(de) = &dual {
        dp.set_waypoints(&de.waypoints)?;
        if !de.waypoints.is_empty() {
            tracing::info!(
                destinations = de.waypoints.len(),
                "waypoint steering written"
            );
        }
    }
    if let Some(de) = dual {
        let mut authz = kmesh_daemon::authz::Authz::load(dp.ebpf_mut())?;
        authz.write(&de.authz)?;
        let by_workload =
            std::sync::Arc::new(kmesh_daemon::authz::DecisionsByWorkload::new(&de.config));
        let log = kmesh_daemon::authz::AccessLog::take(dp.ebpf_mut(), authz.policy_names())?
            .counting(by_workload.clone());
        tokio::spawn(log.run());
        for (path, _) in cookies.iter().chain(&waypoint_cookies) {
            let mode = authz.attach(dp.ebpf_mut(), path, &args.authz_interface, Some(&pins))?;
            tracing::info!(netns = %path.display(), interface = %args.authz_interface, mode, "authorization attached");
        }
        authz.remove_stale_links(&pins);
        tracing::info!(
            policies = de.authz.policy_names.len(),
            workloads = de.authz.workloads.len(),
            slots = de.authz.slots.len(),
            "authorization tables written"
        );
        *state.dual_engine.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(kmesh_daemon::authz::DualEngineState {
                config: de.config,
                authz,
                by_workload,
            });
    }
    // HTTP services routed per request: tables into the kernel, then the
    // connector (its thread lives as long as the process; xDS updates go
    // through `AdminState::l7`).
    match args.l7_connector_addr {
        Some(addr) => {
            let kernel = kmesh_daemon::l7::L7Kernel::load(&mut dp)?;
            let connector =
                std::sync::Arc::new(kmesh_daemon::connector::Connector::new(kernel, addr));
            connector.update(&flat.l7)?;
            let bound = connector
                .clone()
                .spawn(addr, args.l7_connector_netns.clone())
                .with_context(|| format!("L7 connector on {addr}"))?;
            tracing::info!(%bound, services = flat.l7.len(), "L7 connector listening");
            let _ = state.l7.set(connector);
        }
        None => {
            for s in &flat.l7 {
                tracing::warn!(listener = %s.listener, vip = %s.vip, "HTTP service routed per request not installed: no --l7-connector-addr");
            }
        }
    }
    dp.attach(&cgroup)?;
    tracing::info!(cgroup = %cgroup.display(), programs = ?dp.program_ids(), "programs attached");
    *state.config.lock().unwrap_or_else(|p| p.into_inner()) = Some(flat);
    *state.dataplane.lock().unwrap_or_else(|p| p.into_inner()) = Some(dp);
    let _xds_task = match xds {
        Some(opts) if dual_engine => {
            let status = kmesh_daemon::xds::SharedStatus::default();
            *state.xds.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
            tracing::info!(address = %opts.address, "subscribing to the workload API (Address, Authorization); ready after its first config");
            Some(AbortOnDrop(tokio::spawn(kmesh_daemon::xds::workload::run(
                opts,
                local_node.clone(),
                kmesh_daemon::xds::DataplaneSink {
                    state: state.clone(),
                },
                status,
            ))))
        }
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
    if args.kubernetes {
        let node = args.node_name.clone().context(
            "--kubernetes needs the node name: set NODE_NAME (from spec.nodeName) or --node-name",
        )?;
        let client = kube::Client::try_default()
            .await
            .context("Kubernetes client (in-cluster config or KUBECONFIG)")?;
        let sink = EnrollmentSink {
            state: state.clone(),
            trust_domain: args.telemetry.trust_domain.clone(),
        };
        let resolver = HostResolver::new(args.host_proc.clone());
        tracing::info!(node, "enrolling pods from Kubernetes");
        tokio::spawn(async move {
            kubernetes::run(
                client,
                &node,
                sink,
                resolver,
                static_cookies,
                std::time::Duration::from_secs(5),
            )
            .await
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        r = admin => {
            r.context("admin task")??;
        }
    }
    state.ready.store(false, Ordering::Release);
    drop(_xds_task);
    let dp = state
        .dataplane
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(mut dp) = dp {
        if args.on_exit == OnExit::Keep {
            dp.keep_pinned();
            tracing::info!(pins = %pins.display(), "programs left attached and maps pinned for the next daemon");
            return Ok(());
        }
        // Dropping the dataplane detaches the programs and removes the pins;
        // the XDP links go with the authorization state.
        drop(
            state
                .dual_engine
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        drop(dp);
    }
    pinlock::release_and_remove(pin_lock);
    tracing::info!("detached and unpinned; bye");
    Ok(())
}
