//! The Prometheus endpoint: `/status/metric` (Istio's path on :15020) and
//! `/metrics`, in the text exposition format 0.0.4.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};

use crate::admin::AdminState;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/status/metric", get(metrics))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The exposition text for `state` (empty Istio families before telemetry starts).
pub fn render(state: &AdminState) -> String {
    // The connect counters need the dataplane lock only for a few map reads.
    let connect = state
        .dataplane
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|dp| dp.stats().ok());
    match state.telemetry.get() {
        Some(t) => t.render(connect.as_ref()),
        None => String::new(),
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    // Map walks are blocking syscalls: keep them off the async workers.
    let body = tokio::task::spawn_blocking(move || render(&s))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

/// Binds `addr` and serves metrics until the process ends.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("metrics endpoint cannot bind {addr}: {e} (hint: another process on this port? pass --metrics-addr)"),
        )
    })?;
    tracing::info!(%addr, "metrics on /status/metric and /metrics");
    axum::serve(listener, router(state)).await
}
