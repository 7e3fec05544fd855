//! Admin HTTP API, Kmesh-compatible paths, bound to loopback by default.
//!
//! | path | answer |
//! |---|---|
//! | `/version` | daemon and ABI version |
//! | `/debug/ready` | 200 once config is written and programs attached, else 503 |
//! | `/debug/config_dump/kernel-native` | the config the daemon holds (with `xds`: resources and versions held, NACKs) |
//! | `/debug/config_dump/bpf/kernel-native` | the same read back from the kernel maps |
//! | `/accesslog`, `/monitoring`, `/authz`, `/debug/loggers` | see [`crate::telemetry::admin`] |
//! | `/debug/config_dump/dual-engine` | dual-engine: workloads, services, policies as validated (with `xds` when from the workload API) |
//! | `/debug/config_dump/bpf/dual-engine` | dual-engine: authorization maps and decision counters read back from the kernel |
//! | `/debug/l7` | HTTP routing per request: kernel and connector counters (see [`crate::connector`]) |

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use xds_adapter::FlatConfig;

use crate::dataplane::Dataplane;

/// What the admin API reads. The daemon's main task writes it.
pub struct AdminState {
    pub ready: AtomicBool,
    pub dataplane: Mutex<Option<Dataplane>>,
    pub config: Mutex<Option<FlatConfig>>,
    /// Set once telemetry has started.
    pub telemetry: OnceLock<Arc<crate::telemetry::Telemetry>>,
    /// Set when the process installed a reloadable log filter.
    pub logging: OnceLock<crate::logging::LogControl>,
    /// Dual-engine mode only: the local config and the authorization maps.
    pub dual_engine: Mutex<Option<crate::authz::DualEngineState>>,
    /// The xDS client's status (resources held with versions, NACKs), when
    /// the config comes from a control plane.
    pub xds: Mutex<Option<crate::xds::SharedStatus>>,
    /// Set when HTTP services routed per request are installed.
    pub l7: OnceLock<Arc<crate::connector::Connector>>,
}

impl AdminState {
    pub fn new() -> Arc<Self> {
        Arc::new(AdminState {
            ready: AtomicBool::new(false),
            dataplane: Mutex::new(None),
            config: Mutex::new(None),
            telemetry: OnceLock::new(),
            logging: OnceLock::new(),
            dual_engine: Mutex::new(None),
            xds: Mutex::new(None),
            l7: OnceLock::new(),
        })
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/debug/ready", get(ready))
        .route("/debug/config_dump/kernel-native", get(config_dump))
        .route("/debug/config_dump/bpf/kernel-native", get(bpf_dump))
        .route("/debug/l7", get(crate::connector::admin_stats))
        .merge(crate::telemetry::admin::routes())
        .route(
            "/debug/config_dump/dual-engine",
            get(crate::authz::config_dump),
        )
        .route(
            "/debug/config_dump/bpf/dual-engine",
            get(crate::authz::bpf_dump),
        )
        .with_state(state)
}

/// Binds `addr` and serves until the process ends.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("admin API cannot bind {addr}: {e} (hint: another kmesh-daemon running? pass --admin-addr)"),
        )
    })?;
    tracing::info!(%addr, "admin API listening");
    axum::serve(listener, router(state)).await
}

async fn version() -> impl IntoResponse {
    Json(serde_json::json!({
        "version": crate::VERSION,
        "abi_version": kmesh_abi::ABI_VERSION,
    }))
}

async fn ready(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn config_dump(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut v = {
        let cfg = s.config.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_value(&*cfg).unwrap_or_default()
    };
    // With xDS: the resources held (names and versions), NACKs and what is
    // held but not installed, next to the `services` the kernel should hold.
    let xds = s.xds.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(xds) = xds {
        let status = xds.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !v.is_object() {
            v = serde_json::json!({ "services": {}, "warnings": [] });
        }
        v["xds"] = serde_json::to_value(status).unwrap_or_default();
    }
    Json(v)
}

async fn bpf_dump(State(s): State<Arc<AdminState>>) -> axum::response::Response {
    let dp = s.dataplane.lock().unwrap_or_else(|p| p.into_inner());
    match dp.as_ref().map(Dataplane::dump) {
        Some(Ok(dump)) => Json(dump).into_response(),
        Some(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "dataplane not loaded\n").into_response(),
    }
}
