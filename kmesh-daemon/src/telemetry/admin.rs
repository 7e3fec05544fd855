//! Admin API switches: `/accesslog`, `/monitoring`, `/authz`,
//! `/debug/loggers` (merged into the admin router).
//!
//! - `GET /accesslog` → `{"enabled":bool}`; `POST /accesslog?enable=true|false`.
//!   Enabling needs monitoring on (the events come from it): else 409.
//! - `GET /monitoring`; `POST /monitoring?enable=true|false`; disabling also
//!   disables the access log (nothing would feed it).
//! - `/authz`: 501, authorization is not implemented in this version.
//! - `GET /debug/loggers` → levels by logger; `POST {"name","level"}`.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{any, get},
    Json, Router,
};
use serde::Deserialize;
use serde_json::json;

use crate::admin::AdminState;

pub fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/accesslog", get(accesslog_get).post(accesslog_set))
        .route("/monitoring", get(monitoring_get).post(monitoring_set))
        .route("/authz", any(authz))
        .route("/debug/loggers", get(loggers_get).post(loggers_set))
}

#[derive(Deserialize)]
struct Enable {
    enable: Option<String>,
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({ "error": msg.into() }))).into_response()
}

/// `enable=true|false`, or the message of a 400 answer.
fn parse_enable(q: &Enable, path: &str) -> Result<bool, String> {
    match q.enable.as_deref() {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => Err(format!("{path}: enable={v:?} is not true or false")),
        None => Err(format!("{path}: missing query parameter enable=true|false")),
    }
}

fn not_running() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "telemetry is not running (the dataplane is not loaded yet)",
    )
}

fn switches(s: &AdminState) -> Option<serde_json::Value> {
    let t = s.telemetry.get()?;
    Some(json!({"accesslog": t.accesslog_enabled(), "monitoring": t.monitoring_enabled()}))
}

async fn accesslog_get(State(s): State<Arc<AdminState>>) -> Response {
    match s.telemetry.get() {
        Some(t) => Json(json!({"enabled": t.accesslog_enabled()})).into_response(),
        None => not_running(),
    }
}

async fn accesslog_set(State(s): State<Arc<AdminState>>, Query(q): Query<Enable>) -> Response {
    let on = match parse_enable(&q, "/accesslog") {
        Ok(v) => v,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let Some(t) = s.telemetry.get() else {
        return not_running();
    };
    if on && !t.monitoring_enabled() {
        return error(
            StatusCode::CONFLICT,
            "monitoring is disabled, so no connection events reach the access log: enable it first (POST /monitoring?enable=true, or `kmeshctl monitoring enable --accesslog`)",
        );
    }
    t.set_accesslog(on);
    tracing::info!(enabled = on, "access log switched");
    Json(switches(&s)).into_response()
}

async fn monitoring_get(State(s): State<Arc<AdminState>>) -> Response {
    match s.telemetry.get() {
        Some(t) => Json(json!({"enabled": t.monitoring_enabled()})).into_response(),
        None => not_running(),
    }
}

async fn monitoring_set(State(s): State<Arc<AdminState>>, Query(q): Query<Enable>) -> Response {
    let on = match parse_enable(&q, "/monitoring") {
        Ok(v) => v,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let Some(t) = s.telemetry.get() else {
        return not_running();
    };
    if let Err(e) = t.set_monitoring(on) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    if !on {
        t.set_accesslog(false);
    }
    tracing::info!(enabled = on, "monitoring switched");
    Json(switches(&s)).into_response()
}

async fn authz() -> Response {
    error(
        StatusCode::NOT_IMPLEMENTED,
        "authorization is not implemented in this version of kmesh-rs: there is no policy to enable, disable or report",
    )
}

async fn loggers_get(State(s): State<Arc<AdminState>>) -> Response {
    match s.logging.get() {
        Some(l) => Json(l.levels()).into_response(),
        None => error(
            StatusCode::NOT_IMPLEMENTED,
            "log levels are not adjustable in this process (no reload handle installed)",
        ),
    }
}

#[derive(Deserialize)]
struct SetLevel {
    name: String,
    level: String,
}

async fn loggers_set(State(s): State<Arc<AdminState>>, body: Option<Json<SetLevel>>) -> Response {
    let Some(Json(req)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"name\": \"default\", \"level\": \"debug\"}",
        );
    };
    let Some(l) = s.logging.get() else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "log levels are not adjustable in this process (no reload handle installed)",
        );
    };
    if req.name == "bpf" {
        // The kernel side first: if it cannot be set, nothing changes.
        let (Some(t), Some(level)) = (s.telemetry.get(), crate::logging::kernel_level(&req.level))
        else {
            return match crate::logging::kernel_level(&req.level) {
                None => error(
                    StatusCode::BAD_REQUEST,
                    crate::logging::LogError::Level(req.level).to_string(),
                ),
                Some(_) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    crate::logging::LogError::Bpf.to_string(),
                ),
            };
        };
        if let Err(e) = t.set_kernel_log_level(level) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    }
    match l.set(&req.name, &req.level) {
        Ok(()) => Json(l.levels()).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}
