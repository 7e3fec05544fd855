//! The ADS client: one gRPC stream to the control plane carrying CDS, EDS,
//! LDS and RDS, state-of-the-world or delta.
//!
//! - **Warming order** (as Envoy): CDS is requested first; the EDS names of
//!   the EDS clusters are subscribed as soon as the clusters arrive; LDS is
//!   requested once the first CDS response is in and the first EDS response
//!   too (when there are EDS clusters); RDS names follow the listeners. A
//!   cluster without endpoints yet is never installed (the lenient compile
//!   leaves it and whatever routes to it out), so nothing routes to a
//!   cluster before its endpoints are known.
//! - **ACK/NACK**: every response is answered: ACK = the response's
//!   version and nonce; NACK = the previous accepted version, the nonce,
//!   and an `error_detail` (google.rpc.Status INVALID_ARGUMENT) with one
//!   line per rejected resource naming it and the reason. A response with
//!   some bad resources is partially accepted: the good ones apply, the bad
//!   ones keep their last good version, and the response is NACKed.
//! - **All-or-nothing per response**: what a response changed is compiled
//!   incrementally (only the services that depend on the changed
//!   resources, [`xds_adapter::Incremental`]) and written with
//!   [`Sink::apply_services`]; the first response, and any change the
//!   incremental compile cannot place, compile the whole held set and write
//!   it with [`Sink::apply`]. If the write fails (e.g. a kernel map would
//!   overflow) the store goes back to what it was before the response and
//!   the response is NACKed with the reason.
//! - **Transport**: plaintext (`http://`, Istiod's :15010) or TLS
//!   (`https://`, or a bare `host:15012`) verified against the Istio root
//!   CA, with the projected `istio-token` as a bearer token.
//! - **Reconnect**: any stream or connect error → exponential backoff
//!   (0.5 s doubling to 30 s, each delay drawn uniformly from its upper half
//!   so a fleet of daemons does not reconnect in step), reset after a
//!   response. The kernel keeps the last good config all the while: nothing
//!   is removed because the control plane is unreachable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use xds_adapter::{Compiled, Incremental};

/// What the status keeps of a compile (not the services themselves).
trait CloneSummary {
    fn clone_summary(&self) -> Compiled;
}

impl CloneSummary for Compiled {
    fn clone_summary(&self) -> Compiled {
        Compiled {
            flat: xds_adapter::FlatConfig {
                services: Default::default(),
                l7: Vec::new(),
                warnings: Vec::new(),
            },
            excluded: self.excluded.clone(),
        }
    }
}

use super::node::NodeIdentity;
use super::store::{
    short, Outcome, Rejected, Store, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE,
};

/// `google.rpc.Code.INVALID_ARGUMENT`.
const INVALID_ARGUMENT: i32 = 3;

/// Largest response accepted (a full mesh's CDS can be tens of MB).
const MAX_MESSAGE: usize = 512 << 20;

/// How to reach the control plane.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `http://host:port` (plaintext). `https://` and bare `host:15012`
    /// (Istiod's TLS port) are refused with a clear error: TLS is not
    /// implemented in this version.
    pub address: String,
    pub node: NodeIdentity,
    /// Delta ADS instead of state of the world.
    pub delta: bool,
    /// A bearer token file sent as `authorization: Bearer …` (Istio's
    /// projected `istio-token`), read at every connect.
    pub token_path: Option<PathBuf>,
    /// For TLS: the CA bundle (PEM) the server certificate must chain to
    /// [default: Istio's root CA, [`ISTIO_ROOT_CA`]], read at every connect.
    pub ca_cert: Option<PathBuf>,
    /// For TLS: the name the server certificate must carry [default: the
    /// address's host]. Istiod's certificate names
    /// `istiod.istio-system.svc`.
    pub tls_server_name: Option<String>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl ClientOptions {
    pub fn new(address: impl Into<String>, node: NodeIdentity) -> Self {
        ClientOptions {
            address: address.into(),
            node,
            delta: false,
            token_path: None,
            ca_cert: None,
            tls_server_name: None,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Where Istio mounts its root CA (the `istio-ca-root-cert` ConfigMap).
pub const ISTIO_ROOT_CA: &str = "/var/run/secrets/istio/root-cert.pem";

/// Turns a user-given address into a URI and whether it is TLS:
/// `http://…` is plaintext, `https://…` is TLS; a bare `host:port` is TLS
/// on Istiod's port 15012 and plaintext otherwise.
pub fn endpoint_uri(address: &str) -> Result<(String, bool), String> {
    if address.starts_with("https://") {
        return Ok((address.to_string(), true));
    }
    if address.starts_with("http://") {
        return Ok((address.to_string(), false));
    }
    if address.contains("://") {
        return Err(format!(
            "{address}: unknown scheme; use http://host:port (plaintext) or https://host:port (TLS)"
        ));
    }
    if address.ends_with(":15012") {
        return Ok((format!("https://{address}"), true));
    }
    Ok((format!("http://{address}"), false))
}

/// Where accepted configs go: the daemon writes them to the kernel; tests
/// record them.
pub trait Sink: Send {
    /// Makes the dataplane hold `compiled`. On error the previous config
    /// must still be in force (the dataplane's apply is all-or-nothing).
    fn apply(&mut self, compiled: &Compiled, store: &Store) -> Result<(), String>;

    /// Only the services at `vips` changed in `compiled` (a VIP absent
    /// from it is removed). The default applies everything.
    fn apply_services(
        &mut self,
        compiled: &Compiled,
        vips: &[std::net::SocketAddr],
        store: &Store,
    ) -> Result<(), String> {
        let _ = vips;
        self.apply(compiled, store)
    }
}

/// What the client reports (admin dump, tests).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct XdsStatus {
    pub address: String,
    pub mode: &'static str,
    pub node_id: String,
    pub connected: bool,
    /// Streams opened so far (1 + reconnects).
    pub streams: u64,
    pub last_error: Option<String>,
    /// Per type (CDS, EDS, LDS, RDS): the last accepted version.
    pub accepted_versions: BTreeMap<&'static str, String>,
    /// Per type: the last NACK sent (the error_detail message).
    pub last_nack: BTreeMap<&'static str, String>,
    /// Resources rejected by the last response of each type.
    pub rejected: BTreeMap<&'static str, Vec<Rejected>>,
    /// Resources held: type → name → version.
    pub resources: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// What the last compile left out and why.
    pub excluded: Vec<String>,
    /// Responses applied to the dataplane.
    pub applies: u64,
}

pub type SharedStatus = Arc<Mutex<XdsStatus>>;

pub(super) fn lock(s: &SharedStatus) -> std::sync::MutexGuard<'_, XdsStatus> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The type URL as one of the four types asked for, if it is one.
fn known_type(type_url: &str) -> Option<&'static str> {
    super::store::TYPES.into_iter().find(|t| *t == type_url)
}

pub(super) fn mark_connected(status: &SharedStatus) {
    let mut s = lock(status);
    s.connected = true;
    s.last_error = None;
}

/// Records a response's outcome for the admin dump and the metrics.
fn record_outcome(status: &SharedStatus, t: &'static str, version: &str, nack: Option<&str>) {
    crate::telemetry::record_xds_response(short(t), nack.is_none());
    let mut s = lock(status);
    match nack {
        None => {
            s.accepted_versions.insert(short(t), version.to_string());
        }
        Some(m) => {
            s.last_nack.insert(short(t), m.to_string());
        }
    }
}

/// Per-type protocol state of one stream.
#[derive(Debug, Default, Clone)]
struct TypeState {
    /// Version last accepted (kept across streams, as Envoy does).
    version: String,
    /// Nonce of the last response on this stream.
    nonce: String,
    /// Names subscribed (EDS/RDS; LDS/CDS are wildcard).
    names: BTreeSet<String>,
    /// A request was sent on this stream.
    requested: bool,
    /// A response arrived on this stream.
    responded: bool,
}

/// Runs the client forever (until the task is dropped).
pub async fn run(opts: ClientOptions, mut sink: impl Sink, status: SharedStatus) {
    {
        let mut s = lock(&status);
        s.address = opts.address.clone();
        s.mode = if opts.delta { "delta" } else { "sotw" };
        s.node_id = opts.node.node_id();
    }
    let mut store = Store::new();
    // The last full compile, kept for incremental endpoint updates.
    let mut inc: Option<Incremental> = None;
    let mut versions: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut attempt: u32 = 0;
    let mut rng = seed();
    loop {
        lock(&status).streams += 1;
        crate::telemetry::record_xds_stream();
        let mut progressed = false;
        let r = if opts.delta {
            run_delta(
                &opts,
                &mut store,
                &mut inc,
                &mut sink,
                &status,
                &mut progressed,
            )
            .await
        } else {
            run_sotw(
                &opts,
                &mut store,
                &mut inc,
                &mut versions,
                &mut sink,
                &status,
                &mut progressed,
            )
            .await
        };
        reconnect_pause(&opts, &status, "xDS", r, progressed, &mut attempt, &mut rng).await;
    }
}

/// After a stream ended with `r`: logs why, marks the status
/// disconnected and sleeps the backoff delay of the next attempt (the
/// attempt count restarts when the stream had made progress).
pub(super) async fn reconnect_pause(
    opts: &ClientOptions,
    status: &SharedStatus,
    what: &str,
    r: Result<(), String>,
    progressed: bool,
    attempt: &mut u32,
    rng: &mut u64,
) {
    if progressed {
        *attempt = 0;
    }
    let why = r
        .err()
        .unwrap_or_else(|| "the control plane closed the stream".into());
    let delay = backoff_delay(opts, *attempt, rng);
    *attempt = attempt.saturating_add(1);
    tracing::warn!(
        address = %opts.address,
        retry_in_ms = delay.as_millis() as u64,
        "{what}: {why}; the kernel keeps the last good config"
    );
    {
        let mut s = lock(status);
        s.connected = false;
        s.last_error = Some(why);
    }
    tokio::time::sleep(delay).await;
}

/// The delay before reconnect attempt `attempt` (0, 1, …): exponential
/// from `backoff_initial` up to `backoff_max`, uniform in its upper half.
pub(super) fn backoff_delay(opts: &ClientOptions, attempt: u32, rng: &mut u64) -> Duration {
    let cap = opts
        .backoff_initial
        .saturating_mul(1u32 << attempt.min(16))
        .min(opts.backoff_max);
    // Uniform in [cap/2, cap].
    cap / 2 + cap.mul_f64(next_f64(rng) / 2.0)
}

pub(super) fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (t ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

/// xorshift64*: plenty for jitter.
fn next_f64(s: &mut u64) -> f64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
}

pub(super) async fn connect(
    opts: &ClientOptions,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, String> {
    let (uri, tls) = endpoint_uri(&opts.address)?;
    let mut ep = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|e| format!("bad xDS address {uri:?}: {e}"))?;
    if tls {
        let ca = opts
            .ca_cert
            .clone()
            .unwrap_or_else(|| PathBuf::from(ISTIO_ROOT_CA));
        let pem = std::fs::read(&ca).map_err(|e| {
            format!("reading the CA bundle {}: {e} (hint: TLS needs the control plane's root CA: --xds-ca-cert, default Istio's {ISTIO_ROOT_CA})", ca.display())
        })?;
        let mut cfg = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem));
        if let Some(name) = &opts.tls_server_name {
            cfg = cfg.domain_name(name.clone());
        }
        ep = ep
            .tls_config(cfg)
            .map_err(|e| format!("TLS setup for {uri}: {e}"))?;
    }
    let ep = ep
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let ch = ep.connect().await.map_err(|e| {
        format!("cannot connect to {uri}: {e} (hint: is the control plane running and --xds-address right?)")
    })?;
    Ok(AggregatedDiscoveryServiceClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Opens a delta ADS stream fed by `rx` (with the token, if any) and
/// marks the client connected.
pub(super) async fn open_delta(
    client: &mut AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    opts: &ClientOptions,
    rx: mpsc::Receiver<DeltaDiscoveryRequest>,
    status: &SharedStatus,
) -> Result<tonic::Streaming<DeltaDiscoveryResponse>, String> {
    let req = with_token(opts, ReceiverStream::new(rx))?;
    let stream = client
        .delta_aggregated_resources(req)
        .await
        .map_err(|e| format!("opening the delta ADS stream: {e}"))?
        .into_inner();
    mark_connected(status);
    Ok(stream)
}

pub(super) fn with_token<T>(opts: &ClientOptions, body: T) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(body);
    if let Some(p) = &opts.token_path {
        let tok = std::fs::read_to_string(p)
            .map_err(|e| format!("reading the token {}: {e}", p.display()))?;
        let v = format!("Bearer {}", tok.trim())
            .parse()
            .map_err(|e| format!("token {} is not a valid header value: {e}", p.display()))?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

/// Compiles the held set and hands it to the sink; on failure restores
/// `backup` into the store. Returns the error for the NACK.
fn commit(
    store: &mut Store,
    backup: Vec<Backup>,
    sink: &mut impl Sink,
    status: &SharedStatus,
    inc: &mut Option<Incremental>,
) -> Result<(), String> {
    let full = Incremental::full(&store.resources().refs());
    // The decoded resources of the compile are gone; give their pages back.
    crate::sys::release_freed_memory();
    let full = match full {
        Ok(c) => c,
        Err(e) => {
            restore(store, backup);
            return Err(format!("the config does not fit the kernel: {e}"));
        }
    };
    if let Err(e) = sink.apply(full.compiled(), store) {
        restore(store, backup);
        // The kernel still holds what the previous compile produced.
        *inc = Incremental::full(&store.resources().refs()).ok();
        return Err(format!("writing the config to the kernel failed: {e}"));
    }
    let compiled = full.compiled().clone_summary();
    *inc = Some(full);
    let mut s = lock(status);
    s.applies += 1;
    s.resources = store.summary();
    s.excluded = compiled.excluded.iter().map(ToString::to_string).collect();
    drop(s);
    if !compiled.excluded.is_empty() {
        tracing::info!(
            excluded = compiled.excluded.len(),
            first = %compiled.excluded[0],
            "xDS: resources held but not installed (see /debug/config_dump/kernel-native)"
        );
    }
    Ok(())
}

/// The NACK message: one line per rejected resource.
pub(super) fn nack_message(type_short: &str, rejected: &[Rejected]) -> String {
    let mut m = format!("{type_short}: {} resource(s) rejected", rejected.len());
    for r in rejected {
        m.push_str(&format!("\n{:?}: {}", r.name, r.reason));
    }
    m
}

/// What to put back if a response cannot be applied.
enum Backup {
    /// A whole type.
    Whole(&'static str, BTreeMap<String, super::store::Held>),
    /// One resource (absent before: `None`).
    Entry(&'static str, String, Option<super::store::Held>),
}

/// Copies what a response of `type_url` can change: the named resources
/// (`touched`, a delta response's names) or the whole type; plus the
/// EDS/RDS maps when the response can garbage-collect them (CDS/LDS).
/// Cost: O(what the response touches), so an endpoint update does not copy
/// the other 10,000 assignments.
fn take_backup(store: &Store, type_url: &'static str, touched: Option<&[String]>) -> Vec<Backup> {
    let mut out = Vec::new();
    let whole = |t: &'static str| Backup::Whole(t, store.of(t).cloned().unwrap_or_default());
    match touched {
        None => out.push(whole(type_url)),
        Some(names) => {
            for n in names {
                let old = store.of(type_url).and_then(|m| m.get(n)).cloned();
                out.push(Backup::Entry(type_url, n.clone(), old));
            }
        }
    }
    // A state-of-the-world CDS/LDS response can drop references to any
    // EDS/RDS name: those maps are copied whole (the response is the whole
    // set anyway). A delta response's garbage is put back from what
    // `collect_garbage` returns.
    if touched.is_none() && matches!(type_url, CLUSTER_TYPE | LISTENER_TYPE) {
        for t in [ENDPOINT_TYPE, ROUTE_TYPE] {
            out.push(whole(t));
        }
    }
    out
}

/// The EDS/RDS names the resources in `backup` referenced before the
/// update: the only ones a delta update can leave unreferenced.
fn referenced_before(backup: &[Backup]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for b in backup {
        if let Backup::Entry(_, _, Some(h)) = b {
            match &h.refs {
                super::store::Refs::Eds(n) => {
                    out.insert(n.clone());
                }
                super::store::Refs::Rds(v) => out.extend(v.iter().cloned()),
                super::store::Refs::None => {}
            }
        }
    }
    out
}

fn restore(store: &mut Store, backup: Vec<Backup>) {
    for b in backup {
        match b {
            Backup::Whole(t, m) => {
                store.types.insert(t, m);
            }
            Backup::Entry(t, n, Some(h)) => {
                store.types.entry(t).or_default().insert(n, h);
            }
            Backup::Entry(t, n, None) => {
                if let Some(m) = store.types.get_mut(t) {
                    m.remove(&n);
                }
            }
        }
    }
}

/// Handles one response's resources: store, compile (incrementally for
/// endpoint changes), apply. Returns the NACK message if any. `touched`:
/// the resource names a delta response carries (upserts and removals);
/// `None` for a state-of-the-world response (the whole type may change).
/// Public for the benchmark, which drives the same path without gRPC.
pub fn accept(
    type_url: &'static str,
    store: &mut Store,
    sink: &mut impl Sink,
    status: &SharedStatus,
    inc: &mut Option<Incremental>,
    touched: Option<&[String]>,
    update: impl FnOnce(&mut Store) -> Outcome,
) -> Option<String> {
    let mut backup = take_backup(store, type_url, touched);
    let outcome = update(store);
    // Only clusters and listeners can drop references to EDS/RDS names.
    let mut collected = false;
    if matches!(type_url, CLUSTER_TYPE | LISTENER_TYPE) {
        let before = touched.map(|_| referenced_before(&backup));
        let dropped = store.collect_garbage(before.as_ref());
        collected = !dropped.is_empty();
        backup.extend(
            dropped
                .into_iter()
                .map(|(t, n, h)| Backup::Entry(t, n, Some(h))),
        );
    }
    for w in outcome.warnings.iter().take(20) {
        tracing::debug!("xDS {}: {w}", short(type_url));
    }
    let mut nack = None;
    if !outcome.rejected.is_empty() {
        let m = nack_message(short(type_url), &outcome.rejected);
        tracing::warn!("xDS NACK: {m}");
        nack = Some(m);
    }
    lock(status)
        .rejected
        .insert(short(type_url), outcome.rejected.clone());
    if !(outcome.changed || collected) {
        return nack;
    }
    // Redo just the services that depend on what changed.
    if let Some(vips) = incremental(type_url, store, &outcome, inc) {
        let Some(i) = inc.as_ref() else {
            return nack;
        };
        match sink.apply_services(i.compiled(), &vips, store) {
            Ok(()) => {
                let mut s = lock(status);
                s.applies += 1;
                if collected {
                    s.resources = store.summary();
                } else {
                    let held = store.of(type_url);
                    let versions = s.resources.entry(short(type_url)).or_default();
                    for name in &outcome.upserted {
                        if let Some(h) = held.and_then(|m| m.get(name)) {
                            versions.insert(name.clone(), h.version.clone());
                        }
                    }
                    for name in &outcome.removed {
                        versions.remove(name);
                    }
                }
                if type_url != ENDPOINT_TYPE {
                    s.excluded = i
                        .compiled()
                        .excluded
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                }
                return nack;
            }
            Err(e) => {
                restore(store, backup);
                *inc = Incremental::full(&store.resources().refs()).ok();
                let e = format!("writing the config to the kernel failed: {e}");
                tracing::error!("xDS NACK: {e}");
                return Some(e);
            }
        }
    }
    if let Err(e) = commit(store, backup, sink, status, inc) {
        tracing::error!("xDS NACK: {e}");
        return Some(e);
    }
    nack
}

/// Applies what a response changed to the kept compile; the VIPs whose
/// records changed, or `None` when a full compile is needed (then `inc`
/// is dropped).
fn incremental(
    type_url: &str,
    store: &Store,
    outcome: &Outcome,
    inc: &mut Option<Incremental>,
) -> Option<Vec<std::net::SocketAddr>> {
    let i = inc.as_mut()?;
    let names: Vec<String> = outcome
        .upserted
        .iter()
        .chain(&outcome.removed)
        .cloned()
        .collect();
    let mut ch = xds_adapter::Changes::default();
    match type_url {
        LISTENER_TYPE => ch.listeners = names,
        ROUTE_TYPE => ch.route_configs = names,
        CLUSTER_TYPE => ch.clusters = names,
        ENDPOINT_TYPE => ch.load_assignments = names,
        _ => return None,
    }
    // Resources dropped by garbage collection are referenced by nothing
    // held, so they change no service.
    let vips = i.update(store, &ch);
    if vips.is_none() {
        *inc = None;
    }
    vips
}

pub(super) fn rpc_status(message: String) -> RpcStatus {
    RpcStatus {
        code: INVALID_ARGUMENT,
        message,
        details: vec![],
    }
}

async fn run_sotw(
    opts: &ClientOptions,
    store: &mut Store,
    inc: &mut Option<Incremental>,
    versions: &mut BTreeMap<&'static str, String>,
    sink: &mut impl Sink,
    status: &SharedStatus,
    progressed: &mut bool,
) -> Result<(), String> {
    let mut client = connect(opts).await?;
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
    let node = opts.node.to_node();
    let mut types: BTreeMap<&'static str, TypeState> = BTreeMap::new();
    for t in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
        types.insert(
            t,
            TypeState {
                version: versions.get(t).cloned().unwrap_or_default(),
                ..Default::default()
            },
        );
    }
    let mut first = true;
    let send = |tx: &mpsc::Sender<DiscoveryRequest>,
                first: &mut bool,
                t: &'static str,
                st: &TypeState,
                error: Option<String>| {
        let req = DiscoveryRequest {
            version_info: st.version.clone(),
            node: if std::mem::take(first) {
                Some(node.clone())
            } else {
                None
            },
            resource_names: st.names.iter().cloned().collect(),
            type_url: t.to_string(),
            response_nonce: st.nonce.clone(),
            error_detail: error.map(rpc_status),
            ..Default::default()
        };
        tx.try_send(req).map_err(|e| format!("request queue: {e}"))
    };
    // CDS first (warming order).
    send(&tx, &mut first, CLUSTER_TYPE, &types[CLUSTER_TYPE], None)?;
    types.get_mut(CLUSTER_TYPE).expect("type").requested = true;
    if store.of(CLUSTER_TYPE).is_some_and(|m| !m.is_empty()) {
        // A reconnect: what is held is warm already, subscribe to all now.
        for (t, names) in [
            (ENDPOINT_TYPE, store.eds_names()),
            (LISTENER_TYPE, BTreeSet::new()),
            (ROUTE_TYPE, store.rds_names()),
        ] {
            if t != LISTENER_TYPE && names.is_empty() {
                continue;
            }
            let st = types.get_mut(t).expect("type");
            st.names = names;
            st.requested = true;
            send(&tx, &mut first, t, &types[t], None)?;
        }
    }
    let req = with_token(opts, ReceiverStream::new(rx))?;
    let mut stream = client
        .stream_aggregated_resources(req)
        .await
        .map_err(|e| format!("opening the ADS stream: {e}"))?
        .into_inner();
    mark_connected(status);
    tracing::info!(address = %opts.address, node = %opts.node.node_id(), "xDS: ADS stream open (state of the world)");
    loop {
        let resp: DiscoveryResponse = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("ADS stream: {e}")),
        };
        *progressed = true;
        let Some(t) = known_type(&resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "xDS: response of a type never asked for; ignored");
            continue;
        };
        let nack = accept(t, store, sink, status, inc, None, |s| {
            s.apply_sotw(t, &resp.version_info, &resp.resources)
        });
        {
            let st = types.get_mut(t).expect("type");
            st.nonce = resp.nonce.clone();
            st.responded = true;
            if nack.is_none() {
                st.version = resp.version_info.clone();
                versions.insert(t, st.version.clone());
            }
        }
        record_outcome(status, t, &resp.version_info, nack.as_deref());
        send(&tx, &mut first, t, &types[t], nack)?;
        // Subscriptions that follow from what is now held.
        for (dep, names) in [
            (ENDPOINT_TYPE, store.eds_names()),
            (ROUTE_TYPE, store.rds_names()),
        ] {
            let st = types.get_mut(dep).expect("type");
            if st.names != names || (!st.requested && !names.is_empty()) {
                st.names = names;
                st.requested = true;
                send(&tx, &mut first, dep, &types[dep], None)?;
            }
        }
        let cds = &types[CLUSTER_TYPE];
        let eds = &types[ENDPOINT_TYPE];
        if !types[LISTENER_TYPE].requested
            && cds.responded
            && (eds.names.is_empty() || eds.responded)
        {
            types.get_mut(LISTENER_TYPE).expect("type").requested = true;
            send(&tx, &mut first, LISTENER_TYPE, &types[LISTENER_TYPE], None)?;
        }
    }
}

async fn run_delta(
    opts: &ClientOptions,
    store: &mut Store,
    inc: &mut Option<Incremental>,
    sink: &mut impl Sink,
    status: &SharedStatus,
    progressed: &mut bool,
) -> Result<(), String> {
    let mut client = connect(opts).await?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    let node = opts.node.to_node();
    let mut first = true;
    let mut types: BTreeMap<&'static str, TypeState> = BTreeMap::new();
    let send = |tx: &mpsc::Sender<DeltaDiscoveryRequest>, req: DeltaDiscoveryRequest| {
        tx.try_send(req).map_err(|e| format!("request queue: {e}"))
    };
    // The first request of a type carries what is held of it, so the
    // server sends only what changed while the stream was down.
    let initial = |store: &Store,
                   first: &mut bool,
                   t: &'static str,
                   names: &BTreeSet<String>|
     -> DeltaDiscoveryRequest {
        let mut held = store.versions(t);
        if matches!(t, ENDPOINT_TYPE | ROUTE_TYPE) {
            held.retain(|k, _| names.contains(k));
        }
        DeltaDiscoveryRequest {
            node: if std::mem::take(first) {
                Some(node.clone())
            } else {
                None
            },
            type_url: t.to_string(),
            resource_names_subscribe: names.iter().cloned().collect(),
            initial_resource_versions: held.into_iter().collect(),
            ..Default::default()
        }
    };
    send(
        &tx,
        initial(store, &mut first, CLUSTER_TYPE, &BTreeSet::new()),
    )?;
    types.entry(CLUSTER_TYPE).or_default().requested = true;
    if store.of(CLUSTER_TYPE).is_some_and(|m| !m.is_empty()) {
        // A reconnect: what is held is warm already, subscribe to all now,
        // each with the versions held.
        for (t, names) in [
            (ENDPOINT_TYPE, store.eds_names()),
            (LISTENER_TYPE, BTreeSet::new()),
            (ROUTE_TYPE, store.rds_names()),
        ] {
            if t != LISTENER_TYPE && names.is_empty() {
                continue;
            }
            let st = types.entry(t).or_default();
            st.names = names.clone();
            st.requested = true;
            send(&tx, initial(store, &mut first, t, &names))?;
        }
    }
    let mut stream = open_delta(&mut client, opts, rx, status).await?;
    tracing::info!(address = %opts.address, node = %opts.node.node_id(), "xDS: delta ADS stream open");
    loop {
        let resp: DeltaDiscoveryResponse = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("delta ADS stream: {e}")),
        };
        *progressed = true;
        let Some(t) = known_type(&resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "xDS: response of a type never asked for; ignored");
            continue;
        };
        let items: Vec<(String, String, Option<_>)> = resp
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone(), r.resource.clone()))
            .collect();
        let mut removed = resp.removed_resources.clone();
        removed.extend(resp.removed_resource_names.iter().map(|n| n.name.clone()));
        let touched: Vec<String> = items
            .iter()
            .map(|i| i.0.clone())
            .chain(removed.iter().cloned())
            .collect();
        let nack = accept(t, store, sink, status, inc, Some(&touched), |s| {
            s.apply_delta(t, &items, &removed)
        });
        let st = types.entry(t).or_default();
        st.responded = true;
        record_outcome(status, t, &resp.system_version_info, nack.as_deref());
        send(
            &tx,
            DeltaDiscoveryRequest {
                type_url: t.to_string(),
                response_nonce: resp.nonce.clone(),
                error_detail: nack.map(rpc_status),
                ..Default::default()
            },
        )?;
        for (dep, names) in [
            (ENDPOINT_TYPE, store.eds_names()),
            (ROUTE_TYPE, store.rds_names()),
        ] {
            let st = types.entry(dep).or_default();
            if !st.requested {
                if names.is_empty() {
                    continue;
                }
                st.requested = true;
                st.names = names.clone();
                send(&tx, initial(store, &mut first, dep, &names))?;
            } else if st.names != names {
                let sub: Vec<String> = names.difference(&st.names).cloned().collect();
                let unsub: Vec<String> = st.names.difference(&names).cloned().collect();
                st.names = names;
                send(
                    &tx,
                    DeltaDiscoveryRequest {
                        type_url: dep.to_string(),
                        resource_names_subscribe: sub,
                        resource_names_unsubscribe: unsub,
                        ..Default::default()
                    },
                )?;
            }
        }
        let cds = types.get(CLUSTER_TYPE).cloned().unwrap_or_default();
        let eds = types.get(ENDPOINT_TYPE).cloned().unwrap_or_default();
        let lds_requested = types.get(LISTENER_TYPE).is_some_and(|s| s.requested);
        if !lds_requested && cds.responded && (eds.names.is_empty() || eds.responded) {
            types.entry(LISTENER_TYPE).or_default().requested = true;
            send(
                &tx,
                initial(store, &mut first, LISTENER_TYPE, &BTreeSet::new()),
            )?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let u = |a: &str| endpoint_uri(a).unwrap();
        assert_eq!(
            u("istiod.istio-system.svc:15010"),
            ("http://istiod.istio-system.svc:15010".into(), false)
        );
        assert_eq!(
            u("istiod.istio-system.svc:15012"),
            ("https://istiod.istio-system.svc:15012".into(), true)
        );
        assert_eq!(u("https://x:443"), ("https://x:443".into(), true));
        assert_eq!(
            u("http://127.0.0.1:1"),
            ("http://127.0.0.1:1".into(), false)
        );
        assert!(endpoint_uri("grpc://x:1")
            .unwrap_err()
            .contains("unknown scheme"));
    }

    #[test]
    fn jitter_is_in_range() {
        let mut s = seed();
        for _ in 0..1000 {
            let x = next_f64(&mut s);
            assert!((0.0..1.0).contains(&x));
        }
    }
}
