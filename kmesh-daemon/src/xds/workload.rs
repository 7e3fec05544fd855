//! The workload API client (dual-engine mode): one delta ADS stream
//! subscribed, as an ambient node proxy (ztunnel node id), to
//! `istio.workload.Address` (workloads and services) and
//! `istio.security.Authorization` (L4 policies).
//!
//! - Each response is applied per resource (the adapter's
//!   [`WorkloadApiState`]): good resources replace their held version, bad
//!   ones keep their last good version and the response is NACKed with one
//!   line per rejected resource naming it; removals drop the named
//!   resources.
//! - When the held set changed it is compiled for this node
//!   ([`DualEngineConfig::compile`], the same compile as the local file)
//!   and written through [`WorkloadSink::apply`]; if either fails, the
//!   held set goes back to what it was before the response and the
//!   response is NACKed with the reason. Cost per change: a copy of the
//!   held set (for that rollback) and a full compile.
//! - Connect, TLS, token and reconnect backoff are the Envoy-type
//!   client's ([`super::client`]); after a reconnect the first request of
//!   each type carries the versions held, so only differences are sent.

use tokio::sync::mpsc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use xds_adapter::workload::api::{DeltaItem, WorkloadApiState, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use xds_adapter::workload::{DualEngineConfig, LocalNode};

use super::client::{
    connect, lock, nack_message, open_delta, reconnect_pause, rpc_status, seed, ClientOptions,
    SharedStatus,
};
use super::store::Rejected;

/// The two types, in the order they are requested (workloads and
/// services before the policies that name them).
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

/// Short name of a workload API type for logs, status and metrics.
pub fn short(type_url: &str) -> &'static str {
    match type_url {
        ADDRESS_TYPE => "WDS",
        AUTHORIZATION_TYPE => "AUTHZ",
        _ => "?",
    }
}

/// Where accepted dual-engine configs go: the daemon writes them to the
/// kernel; tests record them.
pub trait WorkloadSink: Send {
    /// Makes the dataplane hold `config` (services and authorization).
    fn apply(&mut self, config: &DualEngineConfig) -> Result<(), String>;
}

/// Runs the client forever (until the task is dropped).
pub async fn run(
    opts: ClientOptions,
    node: LocalNode,
    mut sink: impl WorkloadSink,
    status: SharedStatus,
) {
    {
        let mut s = lock(&status);
        s.address = opts.address.clone();
        s.mode = "delta";
        s.node_id = opts.node.ztunnel_node_id();
    }
    let mut held = WorkloadApiState::default();
    // Until a first write, every response is written even when it holds
    // nothing new (an empty mesh is a config too: the daemon becomes ready).
    let mut written = false;
    let mut attempt: u32 = 0;
    let mut rng = seed();
    loop {
        lock(&status).streams += 1;
        crate::telemetry::record_xds_stream();
        let mut progressed = false;
        let r = run_stream(
            &opts,
            &node,
            &mut held,
            &mut written,
            &mut sink,
            &status,
            &mut progressed,
        )
        .await;
        reconnect_pause(
            &opts,
            &status,
            "workload API",
            r,
            progressed,
            &mut attempt,
            &mut rng,
        )
        .await;
    }
}

async fn run_stream(
    opts: &ClientOptions,
    node: &LocalNode,
    held: &mut WorkloadApiState,
    written: &mut bool,
    sink: &mut impl WorkloadSink,
    status: &SharedStatus,
    progressed: &mut bool,
) -> Result<(), String> {
    let mut client = connect(opts).await?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    let send =
        |req: DeltaDiscoveryRequest| tx.try_send(req).map_err(|e| format!("request queue: {e}"));
    for (i, t) in TYPES.into_iter().enumerate() {
        send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| opts.node.to_ztunnel_node(&node.node)),
            type_url: t.to_string(),
            initial_resource_versions: held.versions(t).into_iter().collect(),
            ..Default::default()
        })?;
    }
    let mut stream = open_delta(&mut client, opts, rx, status).await?;
    tracing::info!(address = %opts.address, node = %opts.node.ztunnel_node_id(), "workload API: delta ADS stream open (Address, Authorization)");
    loop {
        let resp: DeltaDiscoveryResponse = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("delta ADS stream: {e}")),
        };
        *progressed = true;
        let Some(t) = TYPES.into_iter().find(|t| *t == resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "workload API: response of a type never asked for; ignored");
            continue;
        };
        let nack = accept(t, &resp, held, node, !*written, sink, status);
        *written |= lock(status).applies > 0;
        crate::telemetry::record_xds_response(short(t), nack.is_none());
        {
            let mut s = lock(status);
            match &nack {
                None => {
                    s.accepted_versions
                        .insert(short(t), resp.system_version_info.clone());
                }
                Some(m) => {
                    s.last_nack.insert(short(t), m.clone());
                }
            }
        }
        send(DeltaDiscoveryRequest {
            type_url: t.to_string(),
            response_nonce: resp.nonce.clone(),
            error_detail: nack.map(rpc_status),
            ..Default::default()
        })?;
    }
}

/// Applies one delta response to `held` and, when it changed (or
/// `force`), compiles and writes the result. Returns the NACK message, if
/// any.
pub fn accept(
    type_url: &'static str,
    resp: &DeltaDiscoveryResponse,
    held: &mut WorkloadApiState,
    node: &LocalNode,
    force: bool,
    sink: &mut impl WorkloadSink,
    status: &SharedStatus,
) -> Option<String> {
    let items: Vec<DeltaItem> = resp
        .resources
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                r.version.as_str(),
                r.resource
                    .as_ref()
                    .map(|a| (a.type_url.as_str(), a.value.as_slice())),
            )
        })
        .collect();
    let mut removed = resp.removed_resources.clone();
    removed.extend(resp.removed_resource_names.iter().map(|n| n.name.clone()));
    let backup = held.clone();
    let outcome = held.apply_delta(type_url, &items, &removed);
    let rejected: Vec<Rejected> = outcome
        .rejected
        .iter()
        .map(|(name, reason)| Rejected {
            name: name.clone(),
            reason: reason.clone(),
        })
        .collect();
    let mut nack = None;
    if !rejected.is_empty() {
        let m = nack_message(short(type_url), &rejected);
        tracing::warn!("workload API NACK: {m}");
        nack = Some(m);
    }
    for w in outcome.warnings.iter().take(20) {
        tracing::warn!("workload API: {w}");
    }
    lock(status).rejected.insert(short(type_url), rejected);
    if !(outcome.changed || force) {
        return nack;
    }
    let t = std::time::Instant::now();
    let written = DualEngineConfig::compile(held.config(), node)
        .map_err(|e| format!("the config does not fit the kernel: {e}"))
        .and_then(|de| {
            sink.apply(&de)
                .map(|()| de)
                .map_err(|e| format!("writing the config to the kernel failed: {e}"))
        });
    let de = match written {
        Ok(de) => de,
        Err(e) => {
            *held = backup;
            tracing::error!("workload API NACK: {e}");
            return Some(e);
        }
    };
    tracing::info!(
        workloads = de.config.workloads.len(),
        services = de.config.services.len(),
        policies = de.config.policies.len(),
        vip_ports = de.flat.services.len(),
        micros = t.elapsed().as_micros() as u64,
        "workload API update written to the kernel"
    );
    let mut s = lock(status);
    s.applies += 1;
    for t in TYPES {
        s.resources.insert(short(t), held.versions(t));
    }
    nack
}
