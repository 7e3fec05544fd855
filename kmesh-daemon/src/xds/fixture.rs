//! An in-process ADS server (state of the world and delta) for tests: it
//! serves whatever resources the test sets, pushes changes to every open
//! stream, and records every request with whether it ACKed or NACKed a
//! response. The same fixture serves real Envoy (to check it against a
//! real xDS client) and the daemon's client.
//!
//! Semantics: per type, the fixture holds name → (version, resource). A
//! state-of-the-world response for LDS/CDS carries every resource of the
//! type; for EDS/RDS the requested names (all when none are named). Delta
//! streams track what the client has (seeded from
//! `initial_resource_versions`) and send only differences and removals.
//! Every first request of a type gets a response, even an empty one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// What a recorded request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A subscription (first request of a type, or changed names).
    Request,
    /// Accepted a response (nonce of a response, no error_detail).
    Ack,
    /// Rejected a response (error_detail set).
    Nack,
}

/// One request the fixture received.
#[derive(Debug, Clone)]
pub struct Event {
    pub stream: u64,
    pub delta: bool,
    pub type_url: String,
    pub kind: Kind,
    /// SotW `version_info` (empty for delta).
    pub version: String,
    pub nonce: String,
    /// SotW resource_names, or delta resource_names_subscribe.
    pub names: Vec<String>,
    /// Delta `initial_resource_versions`.
    pub initial_versions: BTreeMap<String, String>,
    /// The NACK's error_detail message.
    pub error: Option<String>,
    /// The node id, when the request carried the node.
    pub node_id: Option<String>,
    /// The stream's `authorization` header.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct State {
    /// type → name → (version, resource)
    resources: BTreeMap<String, BTreeMap<String, (String, Any)>>,
    /// type → version counter
    versions: BTreeMap<String, u64>,
    events: Vec<Event>,
    nonce: u64,
    streams: u64,
    /// Nonces sent and not yet answered: nonce → type.
    pending: BTreeMap<String, String>,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    kill: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new stream; returns its id (1, 2, …).
    fn open_stream(&self) -> u64 {
        let mut s = self.lock();
        s.streams += 1;
        s.streams
    }
}

/// A running fixture. Dropping it stops the server and ends its streams.
pub struct AdsFixture {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

/// The resources a fixture holds, to restart a fixture with the same config.
#[derive(Clone, Default)]
pub struct Snapshot(
    BTreeMap<String, BTreeMap<String, (String, Any)>>,
    BTreeMap<String, u64>,
);

impl AdsFixture {
    /// Starts on 127.0.0.1 on a free port.
    pub async fn start() -> std::io::Result<AdsFixture> {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), Snapshot::default()).await
    }

    /// Starts on `addr` with `snapshot`'s resources (a control plane
    /// restart: same address, same config, new streams).
    pub async fn start_on(addr: SocketAddr, snapshot: Snapshot) -> std::io::Result<AdsFixture> {
        Self::start_inner(addr, snapshot, None).await
    }

    /// Starts on 127.0.0.1 serving TLS with this certificate chain and key
    /// (PEM).
    pub async fn start_tls(cert_pem: &[u8], key_pem: &[u8]) -> std::io::Result<AdsFixture> {
        let id = tonic::transport::Identity::from_pem(cert_pem, key_pem);
        Self::start_inner(
            "127.0.0.1:0".parse().expect("addr"),
            Snapshot::default(),
            Some(id),
        )
        .await
    }

    async fn start_inner(
        addr: SocketAddr,
        snapshot: Snapshot,
        tls: Option<tonic::transport::Identity>,
    ) -> std::io::Result<AdsFixture> {
        // The port of a just-stopped fixture may take a moment to free.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 && e.kind() == std::io::ErrorKind::AddrInUse => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                resources: snapshot.0,
                versions: snapshot.1,
                ..Default::default()
            }),
            changed: watch::channel(0).0,
            kill: watch::channel(false).0,
        });
        let svc = AggregatedDiscoveryServiceServer::from_arc(Arc::new(Service {
            shared: shared.clone(),
        }))
        .max_decoding_message_size(512 << 20)
        .max_encoding_message_size(512 << 20);
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let mut builder = tonic::transport::Server::builder();
        if let Some(id) = tls {
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(id))
                .map_err(std::io::Error::other)?;
        }
        let server = tokio::spawn(async move {
            let _ = builder.add_service(svc).serve_with_incoming(incoming).await;
        });
        Ok(AdsFixture {
            addr,
            shared,
            server,
        })
    }

    /// `http://127.0.0.1:port`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The resources held, for [`AdsFixture::start_on`].
    pub fn snapshot(&self) -> Snapshot {
        let s = self.shared.lock();
        Snapshot(s.resources.clone(), s.versions.clone())
    }

    /// Stops serving: the listener closes and every open stream ends with
    /// UNAVAILABLE.
    pub fn stop(self) {}

    fn bump(&self, s: &mut State, type_url: &str) -> String {
        let v = s.versions.entry(type_url.to_string()).or_insert(0);
        *v += 1;
        v.to_string()
    }

    fn notify(&self) {
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// Replaces every resource of `type_url` (name, resource).
    pub fn set(&self, type_url: &str, resources: Vec<(String, Any)>) {
        let mut s = self.shared.lock();
        let v = self.bump(&mut s, type_url);
        let old = s.resources.remove(type_url).unwrap_or_default();
        let mut m = BTreeMap::new();
        for (name, any) in resources {
            // Unchanged resources keep their version (delta sends only changes).
            let ver = match old.get(&name) {
                Some((ov, oa)) if *oa == any => ov.clone(),
                _ => v.clone(),
            };
            m.insert(name, (ver, any));
        }
        s.resources.insert(type_url.to_string(), m);
        drop(s);
        self.notify();
    }

    /// Adds or replaces one resource.
    pub fn upsert(&self, type_url: &str, name: &str, any: Any) {
        let mut s = self.shared.lock();
        let v = self.bump(&mut s, type_url);
        s.resources
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), (v, any));
        drop(s);
        self.notify();
    }

    /// Removes one resource.
    pub fn remove(&self, type_url: &str, name: &str) {
        let mut s = self.shared.lock();
        self.bump(&mut s, type_url);
        if let Some(m) = s.resources.get_mut(type_url) {
            m.remove(name);
        }
        drop(s);
        self.notify();
    }

    /// Every request received so far.
    pub fn events(&self) -> Vec<Event> {
        self.shared.lock().events.clone()
    }

    /// Waits until `pred` holds for some event recorded after the first
    /// `from` events; returns that event.
    pub async fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Result<Event, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let s = self.shared.lock();
                if let Some(e) = s.events.iter().skip(from).find(|e| pred(e)) {
                    return Ok(e.clone());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let s = self.shared.lock();
                let tail: Vec<String> = s
                    .events
                    .iter()
                    .skip(from)
                    .map(|e| {
                        format!(
                            "{:?} {} v={} n={} names={:?} err={:?}",
                            e.kind, e.type_url, e.version, e.nonce, e.names, e.error
                        )
                    })
                    .collect();
                return Err(format!(
                    "timed out after {timeout:?}; events since {from}:\n{}",
                    tail.join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Number of responses sent and not yet ACKed or NACKed.
    pub fn unanswered(&self) -> usize {
        self.shared.lock().pending.len()
    }
}

impl Drop for AdsFixture {
    fn drop(&mut self) {
        self.server.abort();
        let _ = self.shared.kill.send(true);
    }
}

struct Service {
    shared: Arc<Shared>,
}

fn classify(s: &mut State, nonce: &str, has_error: bool) -> Kind {
    if !nonce.is_empty() && s.pending.remove(nonce).is_some() {
        if has_error {
            Kind::Nack
        } else {
            Kind::Ack
        }
    } else {
        Kind::Request
    }
}

fn next_nonce(s: &mut State, type_url: &str) -> String {
    s.nonce += 1;
    let n = format!("n{}", s.nonce);
    s.pending.insert(n.clone(), type_url.to_string());
    n
}

/// A SotW response for `type_url` and the requested names.
fn sotw_response(s: &mut State, type_url: &str, names: &BTreeSet<String>) -> DiscoveryResponse {
    let all = s.resources.get(type_url).cloned().unwrap_or_default();
    let wildcard = names.is_empty() || names.contains("*");
    let resources = all
        .iter()
        .filter(|(n, _)| wildcard || names.contains(*n))
        .map(|(_, (_, a))| a.clone())
        .collect();
    let version = s.versions.get(type_url).copied().unwrap_or(0).to_string();
    DiscoveryResponse {
        version_info: version,
        resources,
        type_url: type_url.to_string(),
        nonce: next_nonce(s, type_url),
        ..Default::default()
    }
}

#[derive(Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
    has: BTreeMap<String, String>,
}

fn delta_response(
    s: &mut State,
    type_url: &str,
    sub: &mut DeltaSub,
    always: bool,
) -> Option<DeltaDiscoveryResponse> {
    let all = s.resources.get(type_url).cloned().unwrap_or_default();
    let wants = |n: &str| sub.wildcard || sub.names.contains(n);
    let mut resources = Vec::new();
    for (name, (ver, any)) in &all {
        if wants(name) && sub.has.get(name) != Some(ver) {
            resources.push(Resource {
                name: name.clone(),
                version: ver.clone(),
                resource: Some(any.clone()),
                ..Default::default()
            });
            sub.has.insert(name.clone(), ver.clone());
        }
    }
    let removed: Vec<String> = sub
        .has
        .keys()
        .filter(|n| !all.contains_key(*n) || !wants(n))
        .cloned()
        .collect();
    for n in &removed {
        sub.has.remove(n);
    }
    if resources.is_empty() && removed.is_empty() && !always {
        return None;
    }
    Some(DeltaDiscoveryResponse {
        system_version_info: s.versions.get(type_url).copied().unwrap_or(0).to_string(),
        resources,
        type_url: type_url.to_string(),
        removed_resources: removed,
        nonce: next_nonce(s, type_url),
        ..Default::default()
    })
}

fn authorization<T>(r: &tonic::Request<T>) -> Option<String> {
    r.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

type SotwStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
type DeltaStream = ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<SotwStream>, tonic::Status> {
        let auth = authorization(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let shared = self.shared.clone();
        let id = shared.open_stream();
        tokio::spawn(async move {
            let mut changed = shared.changed.subscribe();
            let mut kill = shared.kill.subscribe();
            // type → (names, version sent)
            let mut subs: BTreeMap<String, (BTreeSet<String>, u64)> = BTreeMap::new();
            loop {
                let mut out = Vec::new();
                tokio::select! {
                    m = inbound.message() => {
                        let Ok(Some(req)) = m else { break };
                        let mut s = shared.lock();
                        let kind = classify(&mut s, &req.response_nonce, req.error_detail.is_some());
                        s.events.push(Event {
                            stream: id,
                            delta: false,
                            type_url: req.type_url.clone(),
                            kind,
                            version: req.version_info.clone(),
                            nonce: req.response_nonce.clone(),
                            names: req.resource_names.clone(),
                            initial_versions: BTreeMap::new(),
                            error: req.error_detail.as_ref().map(|e| e.message.clone()),
                            node_id: req.node.as_ref().map(|n| n.id.clone()),
                            authorization: auth.clone(),
                        });
                        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
                        let first = !subs.contains_key(&req.type_url);
                        let differs = subs.get(&req.type_url).is_some_and(|(n, _)| *n != names);
                        if first || differs {
                            let v = s.versions.get(&req.type_url).copied().unwrap_or(0);
                            subs.insert(req.type_url.clone(), (names.clone(), v));
                            out.push(sotw_response(&mut s, &req.type_url, &names));
                        }
                    }
                    r = changed.changed() => {
                        if r.is_err() { break }
                        let mut s = shared.lock();
                        for (t, (names, sent)) in subs.iter_mut() {
                            let v = s.versions.get(t).copied().unwrap_or(0);
                            if v != *sent {
                                *sent = v;
                                out.push(sotw_response(&mut s, t, names));
                            }
                        }
                    }
                    _ = kill.changed() => {
                        let _ = tx.send(Err(tonic::Status::unavailable("control plane stopped"))).await;
                        break;
                    }
                }
                for r in out {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaStream>, tonic::Status> {
        let auth = authorization(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let shared = self.shared.clone();
        let id = shared.open_stream();
        tokio::spawn(async move {
            let mut changed = shared.changed.subscribe();
            let mut kill = shared.kill.subscribe();
            let mut subs: BTreeMap<String, DeltaSub> = BTreeMap::new();
            loop {
                let mut out = Vec::new();
                tokio::select! {
                    m = inbound.message() => {
                        let Ok(Some(req)) = m else { break };
                        let mut s = shared.lock();
                        let kind = classify(&mut s, &req.response_nonce, req.error_detail.is_some());
                        s.events.push(Event {
                            stream: id,
                            delta: true,
                            type_url: req.type_url.clone(),
                            kind,
                            version: String::new(),
                            nonce: req.response_nonce.clone(),
                            names: req.resource_names_subscribe.clone(),
                            initial_versions: req.initial_resource_versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                            error: req.error_detail.as_ref().map(|e| e.message.clone()),
                            node_id: req.node.as_ref().map(|n| n.id.clone()),
                            authorization: auth.clone(),
                        });
                        if kind != Kind::Request {
                            continue;
                        }
                        let first = !subs.contains_key(&req.type_url);
                        let sub = subs.entry(req.type_url.clone()).or_default();
                        if first {
                            sub.has = req.initial_resource_versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                            sub.wildcard = req.resource_names_subscribe.is_empty()
                                || req.resource_names_subscribe.iter().any(|n| n == "*");
                        }
                        for n in &req.resource_names_subscribe {
                            if n != "*" {
                                sub.names.insert(n.clone());
                            }
                        }
                        for n in &req.resource_names_unsubscribe {
                            sub.names.remove(n);
                        }
                        if let Some(r) = delta_response(&mut s, &req.type_url, sub, first) {
                            out.push(r);
                        }
                    }
                    r = changed.changed() => {
                        if r.is_err() { break }
                        let mut s = shared.lock();
                        for (t, sub) in subs.iter_mut() {
                            if let Some(r) = delta_response(&mut s, t, sub, false) {
                                out.push(r);
                            }
                        }
                    }
                    _ = kill.changed() => {
                        let _ = tx.send(Err(tonic::Status::unavailable("control plane stopped"))).await;
                        break;
                    }
                }
                for r in out {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// The real Envoy binary tests check against: `KMESH_TEST_ENVOY`, else
/// the one `cargo xtask setup` installs in `target/venv`. Panics with a
/// hint when it is missing.
pub fn envoy_binary() -> std::path::PathBuf {
    let p = std::env::var_os("KMESH_TEST_ENVOY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/envoy")
        });
    assert!(
        p.exists(),
        "Envoy not found at {} (hint: `cargo xtask setup` installs it; or set KMESH_TEST_ENVOY)",
        p.display()
    );
    p
}

/// Builders of the resources tests serve, shaped as Istiod sends them.
pub mod resources {
    use std::net::SocketAddr;

    use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
    use envoy_types::pb::envoy::config::core::v3::{
        address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion,
        ConfigSource, SocketAddress,
    };
    use envoy_types::pb::envoy::config::endpoint::v3::{
        lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
    };
    use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
    use envoy_types::pb::envoy::config::route::v3::{
        route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
        VirtualHost,
    };
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager, http_filter, HttpConnectionManager, HttpFilter, Rds,
    };
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        tcp_proxy, TcpProxy,
    };
    use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration};

    use crate::xds::to_any;

    pub fn addr(a: SocketAddr) -> Address {
        Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: a.ip().to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    a.port(),
                ))),
                ..Default::default()
            })),
        }
    }

    fn ads() -> ConfigSource {
        ConfigSource {
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                AggregatedConfigSource {},
            )),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }
    }

    /// A listener for `vip` with a tcp_proxy to `cluster`. `bind_to_port`
    /// is false: Envoy accepts it without binding anything (the kernel
    /// path ignores the field).
    pub fn tcp_listener(name: &str, vip: SocketAddr, cluster: &str) -> Listener {
        let tp = TcpProxy {
            stat_prefix: name.into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        };
        Listener {
            name: name.into(),
            address: Some(addr(vip)),
            bind_to_port: Some(BoolValue { value: false }),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(to_any(&tp))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// An HTTP listener (Istio outbound style, e.g. `0.0.0.0:80`) whose
    /// routes come by RDS as `route_config`.
    pub fn http_listener(name: &str, listen: SocketAddr, route_config: &str) -> Listener {
        let hcm = HttpConnectionManager {
            stat_prefix: name.into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: Some(ads()),
                route_config_name: route_config.into(),
            })),
            http_filters: vec![HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(to_any(
                    &Router::default(),
                ))),
                ..Default::default()
            }],
            ..Default::default()
        };
        Listener {
            name: name.into(),
            address: Some(addr(listen)),
            bind_to_port: Some(BoolValue { value: false }),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(to_any(&hcm))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A route configuration with one virtual host per (name, domains,
    /// cluster), each with a catch-all route.
    pub fn route_config(name: &str, vhosts: &[(&str, Vec<String>, &str)]) -> RouteConfiguration {
        RouteConfiguration {
            name: name.into(),
            virtual_hosts: vhosts
                .iter()
                .map(|(vh, domains, cluster)| VirtualHost {
                    name: (*vh).into(),
                    domains: domains.clone(),
                    routes: vec![Route {
                        name: "default".into(),
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                                (*cluster).into(),
                            )),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// An EDS cluster (endpoints by ADS), round robin.
    pub fn eds_cluster(name: &str) -> Cluster {
        Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: String::new(),
            }),
            connect_timeout: Some(PbDuration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    /// The endpoints of cluster `name`.
    pub fn cla(name: &str, endpoints: &[SocketAddr]) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: endpoints
                    .iter()
                    .map(|a| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(addr(*a)),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

/// Builders of workload API resources (`istio.workload.Address`,
/// `istio.security.Authorization`) as Istiod sends them to an ambient
/// node proxy, with the resource names Istiod uses (a workload's uid, a
/// service's `namespace/hostname`, a policy's `namespace/name`).
pub mod workload_api {
    use std::net::IpAddr;

    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;
    use xds_adapter::workload::api::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
    use xds_adapter::workload::proto;

    fn ip_bytes(ip: IpAddr) -> Vec<u8> {
        match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    /// `Kubernetes//Pod/<ns>/<name>`, the uid Istiod gives a pod.
    pub fn uid(namespace: &str, name: &str) -> String {
        format!("Kubernetes//Pod/{namespace}/{name}")
    }

    /// A pod: `namespace/name`, service account `sa`, one address, member
    /// of `services` (`namespace/hostname`, service port → target port).
    pub fn workload(
        namespace: &str,
        name: &str,
        sa: &str,
        ip: IpAddr,
        services: &[(&str, u16, u16)],
    ) -> proto::Workload {
        let mut w = proto::Workload {
            uid: uid(namespace, name),
            name: name.into(),
            namespace: namespace.into(),
            addresses: vec![ip_bytes(ip)],
            service_account: sa.into(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            ..Default::default()
        };
        for (svc, port, target) in services {
            w.services
                .entry(svc.to_string())
                .or_default()
                .ports
                .push(proto::Port {
                    service_port: u32::from(*port),
                    target_port: u32::from(*target),
                });
        }
        w
    }

    /// A service `namespace/name` with hostname `<name>.<namespace>.svc.cluster.local`.
    pub fn service(
        namespace: &str,
        name: &str,
        vip: IpAddr,
        ports: &[(u16, u16)],
    ) -> proto::Service {
        proto::Service {
            name: name.into(),
            namespace: namespace.into(),
            hostname: format!("{name}.{namespace}.svc.cluster.local"),
            addresses: vec![proto::NetworkAddress {
                network: String::new(),
                address: ip_bytes(vip),
            }],
            ports: ports
                .iter()
                .map(|(p, t)| proto::Port {
                    service_port: u32::from(*p),
                    target_port: u32::from(*t),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// `namespace/hostname`: the service's resource name and the key
    /// workloads use in `services`.
    pub fn service_key(s: &proto::Service) -> String {
        format!("{}/{}", s.namespace, s.hostname)
    }

    /// A namespace-scoped DENY policy matching the given source principals.
    pub fn deny_principals(
        namespace: &str,
        name: &str,
        principals: &[&str],
    ) -> proto::Authorization {
        proto::Authorization {
            name: name.into(),
            namespace: namespace.into(),
            scope: 1,
            action: 1,
            rules: vec![proto::Rule {
                clauses: vec![proto::Clause {
                    matches: vec![proto::Match {
                        principals: principals
                            .iter()
                            .map(|p| proto::StringMatch {
                                match_type: Some(proto::string_match::MatchType::Exact(
                                    p.to_string(),
                                )),
                            })
                            .collect(),
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        }
    }

    pub fn workload_any(w: &proto::Workload) -> Any {
        Any {
            type_url: ADDRESS_TYPE.into(),
            value: proto::Address {
                r#type: Some(proto::address::Type::Workload(Box::new(w.clone()))),
            }
            .encode_to_vec(),
        }
    }

    pub fn service_any(s: &proto::Service) -> Any {
        Any {
            type_url: ADDRESS_TYPE.into(),
            value: proto::Address {
                r#type: Some(proto::address::Type::Service(Box::new(s.clone()))),
            }
            .encode_to_vec(),
        }
    }

    pub fn policy_any(p: &proto::Authorization) -> Any {
        Any {
            type_url: AUTHORIZATION_TYPE.into(),
            value: p.encode_to_vec(),
        }
    }
}
