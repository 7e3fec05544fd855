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
    let (connect, clusters) = {
        let dp = state.dataplane.lock().unwrap_or_else(|p| p.into_inner());
        let dp = dp.as_ref();
        (
            dp.and_then(|dp| dp.stats().ok()),
            dp.map(|dp| dp.cluster_counters()).unwrap_or_default(),
        )
    };
    let mut out = match state.telemetry.get() {
        Some(t) => t.render(connect.as_ref()),
        None => String::new(),
    };
    render_clusters(&clusters, &mut out);
    render_authz(state, &mut out);
    out
}

/// Per-cluster connection counters of the connect pipeline (Envoy's
/// `upstream_cx_active` and `upstream_cx_overflow`).
fn render_clusters(clusters: &[crate::dataplane::ClusterCounters], out: &mut String) {
    use super::metrics::{header, sample};
    if clusters.is_empty() {
        return;
    }
    header(
        out,
        "kmesh_cluster_upstream_cx_active",
        "Connections steered to the cluster by the kernel and not closed yet.",
        "gauge",
    );
    for c in clusters {
        let labels = [("cluster", c.cluster.as_str())];
        sample(
            out,
            "kmesh_cluster_upstream_cx_active",
            &labels,
            c.active as f64,
        );
    }
    header(
        out,
        "kmesh_cluster_upstream_cx_overflow_total",
        "Connects refused (EPERM) because the cluster's circuit breaker (max_connections) was open.",
        "counter",
    );
    for c in clusters {
        let labels = [("cluster", c.cluster.as_str())];
        sample(
            out,
            "kmesh_cluster_upstream_cx_overflow_total",
            &labels,
            c.overflow as f64,
        );
    }
}

/// Dual-engine authorization decisions, read from the kernel's per-CPU
/// counters (nothing in kernel-native mode).
fn render_authz(state: &AdminState, out: &mut String) {
    use super::metrics::{header, sample};
    let de = state.dual_engine.lock().unwrap_or_else(|p| p.into_inner());
    let Some(de) = de.as_ref() else { return };
    if let Ok(stats) = de.authz.stats() {
        header(
            out,
            "kmesh_authz_decisions_total",
            "L4 authorization in the kernel: TCP SYNs to enrolled workloads, by decision.",
            "counter",
        );
        for (decision, n) in stats {
            sample(
                out,
                "kmesh_authz_decisions_total",
                &[("decision", decision)],
                n as f64,
            );
        }
    }
    if let Ok(per_policy) = de.authz.policy_stats() {
        header(
            out,
            "kmesh_authz_policy_decisions_total",
            "Connections decided by each authorization policy (namespace/name).",
            "counter",
        );
        for (policy, n) in per_policy {
            sample(
                out,
                "kmesh_authz_policy_decisions_total",
                &[("policy", &policy)],
                n as f64,
            );
        }
    }
    header(
        out,
        "kmesh_authz_workload_decisions_total",
        "Authorization decisions by destination workload (namespace/name) and verdict, from the decision events (a lower bound if events were dropped).",
        "counter",
    );
    for ((workload, verdict), n) in de.by_workload.snapshot() {
        sample(
            out,
            "kmesh_authz_workload_decisions_total",
            &[("destination_workload", &workload), ("verdict", verdict)],
            n as f64,
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ClusterCounters;

    #[test]
    fn cluster_counters_are_exposed_like_envoys() {
        let mut out = String::new();
        render_clusters(
            &[ClusterCounters {
                cluster: "outbound|80||web".into(),
                active: 3,
                overflow: 20,
            }],
            &mut out,
        );
        assert!(
            out.contains("# TYPE kmesh_cluster_upstream_cx_active gauge"),
            "{out}"
        );
        assert!(
            out.contains("kmesh_cluster_upstream_cx_active{cluster=\"outbound|80||web\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "kmesh_cluster_upstream_cx_overflow_total{cluster=\"outbound|80||web\"} 20\n"
            ),
            "{out}"
        );
        let mut none = String::new();
        render_clusters(&[], &mut none);
        assert!(none.is_empty());
    }
}
