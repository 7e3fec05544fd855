//! Connection telemetry: the `sockops` program's events → access log lines
//! and Istio-standard metrics; plus the daemon's own `kmesh_*` metrics.
//!
//! ```text
//! kernel sockops ──KM_EVENTS ring buffer──► reader task (AsyncFd) ──► TcpMetrics (Istio labels)
//!                                                                 └─► access log (stdout, if enabled)
//!        └──────KM_CONN (bytes at the last RTT sample)──► progress thread, every
//!                        --tcp-reporting-interval-ms ──► TcpMetrics (bytes of open connections)
//! /metrics scrape ──► Istio TCP metrics + kmesh_* (map entries/capacity, program run count/time,
//!                     ring-buffer drops, connect counters, config applies)
//! ```
//!
//! Switches (admin API): monitoring (kernel side: the sockops program
//! tracks nothing while off) and access log (daemon side).

pub mod accesslog;
pub mod admin;
pub mod event;
pub mod identity;
pub mod kernel;
pub mod metrics;
pub mod pods;
pub mod server;
pub mod workload;

use std::{
    io::Write,
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::SystemTime,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use kmesh_abi::{
    ConnState, TELEMETRY_CFG_FLAGS, TELEMETRY_CFG_LOG_LEVEL, TELEMETRY_CFG_MONITORING,
};
use tokio::io::unix::AsyncFd;
use xds_adapter::FlatConfig;

use crate::dataplane::{Dataplane, DataplaneError};
use event::{Connection, Kind};
use identity::Identity;
use metrics::TcpMetrics;

/// Config applies, counted by whoever applies config (`record_config_apply`).
static CONFIG_APPLIES_OK: AtomicU64 = AtomicU64::new(0);
static CONFIG_APPLIES_FAILED: AtomicU64 = AtomicU64::new(0);

/// Counts one config apply for `kmesh_config_applies_total{result}`.
pub fn record_config_apply(ok: bool) {
    if ok {
        CONFIG_APPLIES_OK.fetch_add(1, Ordering::Relaxed);
    } else {
        CONFIG_APPLIES_FAILED.fetch_add(1, Ordering::Relaxed);
    }
}

/// xDS responses by type (CDS, EDS, LDS, RDS; the workload API's WDS =
/// istio.workload.Address and AUTHZ = istio.security.Authorization) and
/// result (ACK, NACK), and ADS streams opened, counted by the xDS clients.
static XDS_TYPES: [&str; 6] = ["CDS", "EDS", "LDS", "RDS", "WDS", "AUTHZ"];
static XDS_RESPONSES: [[AtomicU64; 2]; 6] = [const { [const { AtomicU64::new(0) }; 2] }; 6];
static XDS_STREAMS: AtomicU64 = AtomicU64::new(0);

/// Counts one xDS response of `type_short` ("CDS"…) for
/// `kmesh_xds_responses_total{type,result}`.
pub fn record_xds_response(type_short: &str, acked: bool) {
    if let Some(i) = XDS_TYPES.iter().position(|t| *t == type_short) {
        XDS_RESPONSES[i][usize::from(!acked)].fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts one ADS stream opened (the first and every reconnect).
pub fn record_xds_stream() {
    XDS_STREAMS.fetch_add(1, Ordering::Relaxed);
}

/// Where access log lines go.
pub type Sink = Box<dyn Write + Send>;

/// Options of [`Telemetry::start`].
pub struct TelemetryOptions {
    pub accesslog: bool,
    pub accesslog_format: accesslog::Format,
    pub monitoring: bool,
    /// Default: stdout.
    pub sink: Option<Sink>,
    /// Kernel log level (see [`crate::logging::kernel_level`]); lines go
    /// through aya-log into this process' `log`/`tracing` output.
    pub kernel_log_level: u32,
    /// How often bytes of open connections are added to the Istio byte
    /// counters (Istio's `tcp_reporting_duration`).
    pub tcp_reporting_interval: std::time::Duration,
}

impl Default for TelemetryOptions {
    fn default() -> Self {
        TelemetryOptions {
            accesslog: false,
            accesslog_format: accesslog::Format::Text,
            monitoring: true,
            sink: None,
            kernel_log_level: crate::logging::KERNEL_LOG_DEFAULT,
            tcp_reporting_interval: std::time::Duration::from_secs(5),
        }
    }
}

/// Shared telemetry state: read by the metrics server and the admin API,
/// written by the ring-buffer reader.
pub struct Telemetry {
    accesslog: AtomicBool,
    monitoring: AtomicBool,
    format: accesslog::Format,
    identity: RwLock<Identity>,
    workloads: RwLock<workload::Workloads>,
    /// Workloads named on the command line (they win over Kubernetes').
    named: Mutex<Vec<(u64, Vec<std::net::IpAddr>, workload::Workload)>>,
    tcp: Mutex<TcpMetrics>,
    sink: Mutex<Sink>,
    kernel: kernel::KernelMetrics,
    cfg_map: Mutex<Array<MapData, u32>>,
    /// Events the daemon could not decode (kernel/daemon build mismatch).
    pub bad_events: AtomicU64,
    /// Events handled.
    pub events: AtomicU64,
    kernel_log_level: AtomicU64,
    /// Keeps BPF run-time statistics on (`bpf_stats`) while alive.
    _stats_fd: Option<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("map {0} missing from the eBPF object or already taken (daemon and kernel programs from different builds?)")]
    MissingMap(&'static str),
    #[error("map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("ring buffer: {0} (hint: the daemon needs an async runtime with I/O enabled)")]
    Poll(std::io::Error),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> TelemetryError {
    move |e| TelemetryError::Map {
        map,
        detail: e.to_string(),
    }
}

impl Telemetry {
    /// Takes the telemetry maps from the dataplane, switches monitoring as
    /// asked, turns on `bpf_stats` run-time accounting, and spawns the
    /// ring-buffer reader on the current tokio runtime. Call after
    /// [`Dataplane::load`]; events flow once the programs are attached.
    pub fn start(
        dp: &mut Dataplane,
        opts: TelemetryOptions,
    ) -> Result<Arc<Telemetry>, TelemetryError> {
        let take = |dp: &mut Dataplane, name: &'static str| {
            dp.take_map(name).ok_or(TelemetryError::MissingMap(name))
        };
        let ring: RingBuf<MapData> =
            RingBuf::try_from(take(dp, "KM_EVENTS")?).map_err(map_err("KM_EVENTS"))?;
        let counters: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(take(dp, "KM_TELEMETRY")?).map_err(map_err("KM_TELEMETRY"))?;
        let cfg_map: Array<MapData, u32> =
            Array::try_from(take(dp, "KM_TELEMETRY_CFG")?).map_err(map_err("KM_TELEMETRY_CFG"))?;
        let conns: BpfHashMap<MapData, u64, ConnState> =
            BpfHashMap::try_from(take(dp, "KM_CONN")?).map_err(map_err("KM_CONN"))?;
        // Run-time stats cost two clock reads per program run, system-wide,
        // while any holder keeps the fd open; the daemon keeps it for its
        // lifetime so `kmesh_bpf_prog_run_*` move.
        let stats_fd = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!("bpf_stats run time not enabled ({e}); kmesh_bpf_prog_run_* stay at 0 (needs Linux 5.8 and CAP_SYS_ADMIN)");
                None
            }
        };
        let t = Arc::new(Telemetry {
            accesslog: AtomicBool::new(opts.accesslog),
            monitoring: AtomicBool::new(opts.monitoring),
            format: opts.accesslog_format,
            identity: RwLock::new(Identity::default()),
            workloads: RwLock::new(workload::Workloads::default()),
            named: Mutex::new(Vec::new()),
            tcp: Mutex::new(TcpMetrics::default()),
            sink: Mutex::new(opts.sink.unwrap_or_else(|| Box::new(std::io::stdout()))),
            kernel: kernel::KernelMetrics::new(counters, dp.all_program_ids()),
            cfg_map: Mutex::new(cfg_map),
            bad_events: AtomicU64::new(0),
            events: AtomicU64::new(0),
            kernel_log_level: AtomicU64::new(0),
            _stats_fd: stats_fd,
        });
        t.set_monitoring(opts.monitoring)?;
        t.set_kernel_log_level(opts.kernel_log_level)?;
        start_kernel_logger(&dp.all_program_ids());
        // SAFETY: the ring buffer owns its map fd and keeps it open until it
        // is dropped, which is when the AsyncFd owning it is dropped; its
        // as_raw_fd always returns that fd.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| TelemetryError::Poll(e.into_parts().1))?;
        tokio::spawn(read_events(fd, t.clone()));
        let (weak, every) = (Arc::downgrade(&t), opts.tcp_reporting_interval);
        std::thread::Builder::new()
            .name("kmesh-tcp-report".into())
            .spawn(move || report_open_connections(conns, weak, every))
            .map_err(|e| TelemetryError::Map {
                map: "KM_CONN",
                detail: format!("starting the progress reader: {e}"),
            })?;
        Ok(t)
    }

    /// Adds the bytes open connections moved since the last read to the
    /// Istio byte counters. Cost: one map walk (two syscalls per open
    /// connection), then one lock of the counters.
    fn report_progress(&self, conns: &BpfHashMap<MapData, u64, ConnState>) {
        let mut live = std::collections::HashSet::new();
        let mut moved = Vec::new();
        for (cookie, s) in conns.iter().flatten() {
            live.insert(cookie);
            moved.push((
                cookie,
                s.acked.saturating_sub(s.base_acked),
                s.received.saturating_sub(s.base_received),
            ));
        }
        let mut tcp = self.tcp.lock().unwrap_or_else(|p| p.into_inner());
        for (cookie, sent, received) in moved {
            tcp.progress(cookie, sent, received);
        }
        tcp.forget_closed(&live);
    }

    /// Rebuilds the service identity tables from a config just applied.
    pub fn set_config(&self, cfg: &FlatConfig) {
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Identity::from_config(cfg);
    }

    /// Names the pod in network namespace `spec.netns`: its netns cookie
    /// (if its sockets are to be tracked it must be enrolled) and its
    /// non-loopback addresses, read now (addresses added later are not seen).
    pub fn register_workload(
        &self,
        spec: &workload::WorkloadSpec,
    ) -> std::io::Result<Vec<std::net::IpAddr>> {
        let cookie = crate::netns::cookie_of(&spec.netns)?;
        let ips = workload::addresses_of(&spec.netns)?;
        self.workloads
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Some(cookie), &ips, spec.workload.clone());
        self.named.lock().unwrap_or_else(|p| p.into_inner()).push((
            cookie,
            ips.clone(),
            spec.workload.clone(),
        ));
        Ok(ips)
    }

    /// Replaces the workloads known from Kubernetes (pod addresses and
    /// identities); names from `--workload` stay and win. O(pods).
    pub fn set_kubernetes_workloads(&self, pods: &[(Vec<std::net::IpAddr>, workload::Workload)]) {
        let mut table = workload::Workloads::default();
        for (ips, w) in pods {
            table.insert(None, ips, w.clone());
        }
        for (cookie, ips, w) in self.named.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            table.insert(Some(*cookie), ips, w.clone());
        }
        *self.workloads.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    pub fn accesslog_enabled(&self) -> bool {
        self.accesslog.load(Ordering::Relaxed)
    }

    pub fn monitoring_enabled(&self) -> bool {
        self.monitoring.load(Ordering::Relaxed)
    }

    pub fn set_accesslog(&self, on: bool) {
        self.accesslog.store(on, Ordering::Relaxed);
    }

    /// Switches connection tracking in the kernel (one map write).
    pub fn set_monitoring(&self, on: bool) -> Result<(), TelemetryError> {
        let word = if on { TELEMETRY_CFG_MONITORING } else { 0 };
        self.cfg_map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(TELEMETRY_CFG_FLAGS, word, 0)
            .map_err(map_err("KM_TELEMETRY_CFG"))?;
        self.monitoring.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Sets which kernel log statements run (0 off … 5 trace; one map write).
    pub fn set_kernel_log_level(&self, level: u32) -> Result<(), TelemetryError> {
        self.cfg_map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(TELEMETRY_CFG_LOG_LEVEL, level, 0)
            .map_err(map_err("KM_TELEMETRY_CFG"))?;
        self.kernel_log_level
            .store(u64::from(level), Ordering::Relaxed);
        Ok(())
    }

    pub fn kernel_log_level(&self) -> u32 {
        self.kernel_log_level.load(Ordering::Relaxed) as u32
    }

    /// Handles one decoded event: metrics always, access log line at close
    /// when enabled.
    pub fn handle(&self, c: &Connection) {
        self.events.fetch_add(1, Ordering::Relaxed);
        let id = self.identity.read().unwrap_or_else(|p| p.into_inner());
        let wl = self.workloads.read().unwrap_or_else(|p| p.into_inner());
        self.tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(c, &id, &wl);
        if c.kind == Kind::Close && self.accesslog_enabled() {
            let entry = accesslog::Entry::new(c, &id, &wl, SystemTime::now(), monotonic_ns());
            let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(sink, "{}", entry.render(self.format));
            let _ = sink.flush();
        }
    }

    /// The Istio TCP counters, per label set (for tests and dumps).
    pub fn tcp_series(&self) -> Vec<(metrics::LabelValues, metrics::TcpCounters)> {
        self.tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .series()
            .map(|(l, c)| (l.clone(), *c))
            .collect()
    }

    /// Our maps with capacity and entry counts (hash maps).
    pub fn map_usage(&self) -> Vec<kernel::MapUsage> {
        self.kernel.map_usage()
    }

    /// Kernel-side telemetry counters summed over CPUs.
    pub fn kernel_counters(&self) -> Result<kernel::TelemetryCounters, TelemetryError> {
        self.kernel.counters()
    }

    /// The whole exposition: Istio TCP metrics, then `kmesh_*`.
    /// `connect_stats` are the connect programs' counters, if the dataplane
    /// could be read.
    pub fn render(
        &self,
        connect_stats: Option<&std::collections::BTreeMap<&'static str, u64>>,
    ) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .render(&mut out);
        self.kernel.render(&mut out, connect_stats);
        let h = metrics::header;
        let s = metrics::sample;
        h(
            &mut out,
            "kmesh_config_applies_total",
            "Config applies to the kernel maps, by result.",
            "counter",
        );
        s(
            &mut out,
            "kmesh_config_applies_total",
            &[("result", "ok")],
            CONFIG_APPLIES_OK.load(Ordering::Relaxed) as f64,
        );
        s(
            &mut out,
            "kmesh_config_applies_total",
            &[("result", "error")],
            CONFIG_APPLIES_FAILED.load(Ordering::Relaxed) as f64,
        );
        h(
            &mut out,
            "kmesh_xds_responses_total",
            "xDS responses from the control plane, by type and by whether they were ACKed or NACKed.",
            "counter",
        );
        for (i, t) in XDS_TYPES.iter().enumerate() {
            for (j, result) in ["ack", "nack"].iter().enumerate() {
                s(
                    &mut out,
                    "kmesh_xds_responses_total",
                    &[("type", t), ("result", result)],
                    XDS_RESPONSES[i][j].load(Ordering::Relaxed) as f64,
                );
            }
        }
        h(
            &mut out,
            "kmesh_xds_streams_total",
            "ADS streams opened to the control plane (the first one and every reconnect).",
            "counter",
        );
        s(
            &mut out,
            "kmesh_xds_streams_total",
            &[],
            XDS_STREAMS.load(Ordering::Relaxed) as f64,
        );
        h(
            &mut out,
            "kmesh_telemetry_events_total",
            "Connection events read from the kernel ring buffer, by outcome.",
            "counter",
        );
        s(
            &mut out,
            "kmesh_telemetry_events_total",
            &[("outcome", "handled")],
            self.events.load(Ordering::Relaxed) as f64,
        );
        s(
            &mut out,
            "kmesh_telemetry_events_total",
            &[("outcome", "undecodable")],
            self.bad_events.load(Ordering::Relaxed) as f64,
        );
        h(
            &mut out,
            "kmesh_monitoring_enabled",
            "1 when the kernel tracks connections.",
            "gauge",
        );
        s(
            &mut out,
            "kmesh_monitoring_enabled",
            &[],
            u8::from(self.monitoring_enabled()) as f64,
        );
        h(
            &mut out,
            "kmesh_accesslog_enabled",
            "1 when access log lines are written.",
            "gauge",
        );
        s(
            &mut out,
            "kmesh_accesslog_enabled",
            &[],
            u8::from(self.accesslog_enabled()) as f64,
        );
        out
    }
}

/// Forwards the kernel programs' aya-log records into this process' `log`
/// output (bridged to `tracing`, target `kmesh_ebpf::…`). The logger opens
/// the programs' log ring buffer by program id and must stay alive while
/// it is read: it lives in the task. Failure only loses kernel log lines.
fn start_kernel_logger(programs: &[(String, u32)]) {
    let Some((_, id)) = programs
        .iter()
        .find(|(n, _)| n == crate::dataplane::SOCKOPS_PROGRAM)
    else {
        return;
    };
    let logger = match aya_log::EbpfLogger::init_from_id(*id) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("kernel log lines unavailable: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's map fd until it is dropped,
    // which is when the AsyncFd owning it is dropped.
    let fd = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
    {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("kernel log lines unavailable: {}", e.into_parts().1);
            return;
        }
    };
    tokio::spawn(async move {
        let mut fd = fd;
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads open connections' progress every `every` until the telemetry
/// state is dropped.
fn report_open_connections(
    conns: BpfHashMap<MapData, u64, ConnState>,
    t: std::sync::Weak<Telemetry>,
    every: std::time::Duration,
) {
    loop {
        std::thread::sleep(every);
        match t.upgrade() {
            Some(t) => t.report_progress(&conns),
            None => return,
        }
    }
}

/// Drains the ring buffer whenever the kernel signals data. Runs until the
/// runtime shuts down.
async fn read_events(mut fd: AsyncFd<RingBuf<MapData>>, t: Arc<Telemetry>) {
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("connection events: polling the ring buffer failed: {e}; access log and Istio metrics stop");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match Connection::decode(&item) {
                Ok(c) => t.handle(&c),
                Err(e) => {
                    t.bad_events.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("connection events: {e}");
                }
            }
        }
        guard.clear_ready();
    }
}
