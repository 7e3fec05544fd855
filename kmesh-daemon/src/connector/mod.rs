//! The L7 connector: where connects to an HTTP service routed per request
//! land (the kernel's connect4/6 rewrite them to this listener). For every
//! request on a client connection it
//!
//! 1. reads the head, and the kernel's decision for the connection
//!    (`KM_L7_CONN`, keyed by the client address this listener sees);
//! 2. matches the head on strings with the same table (Envoy's order); the
//!    kernel's pick of a weighted cluster is used when the decision is for
//!    this request (`seq` and target hash agree) and names the same route,
//!    otherwise the request is decided here — a hash collision, a head the
//!    kernel gave up on (`L7_FALLBACK`) or a pipelined request never goes
//!    to another cluster than the string matcher picks;
//! 3. answers 404 (no virtual host or route) or 503 (no endpoint, connect
//!    failed) itself, as Envoy does;
//! 4. otherwise relays the request to an endpoint of the cluster (the
//!    cluster's weighted slots, random pick) on a kept-alive upstream
//!    connection — one per cluster per client connection — and relays the
//!    response back.
//!
//! Close propagation: the client's EOF closes the upstream connections; an
//! upstream that closes mid-response closes the client connection; a
//! response without length ends with the upstream's close and closes the
//! client too. Backpressure: bodies are relayed write-before-read.
//! Requests are handled in order: pipelined requests wait for the previous
//! response (they are decided in userspace, the kernel's decision being for
//! the first head of the write).
//!
//! The connector runs on its own thread with its own single-threaded
//! runtime, optionally inside another network namespace (all its sockets,
//! listener and upstream, are created there).

pub mod http1;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kmesh_abi::l7::{hash, L7Conn, L7_DECIDED};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use xds_adapter::l7::{L7Table, Outcome, Request};
use xds_adapter::model::TcpRoute;
use xds_adapter::FlatL7;

use crate::dataplane::DataplaneError;
use crate::l7::{Installed, L7Kernel};
use http1::{local_reply, parse_request, parse_response, Framing, Peer};

/// Default listen address of the connector (Istio's inbound capture port).
pub const DEFAULT_ADDR: &str = "0.0.0.0:15006";

/// Upstream connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP service routed per request.
#[derive(PartialEq)]
struct Service {
    table: L7Table,
    /// Cluster → weighted slots (empty: 503).
    slots: BTreeMap<String, Vec<SocketAddr>>,
}

/// Counters of the connector.
#[derive(Debug, Default)]
pub struct ConnectorStats {
    /// Requests whose cluster the kernel's decision gave.
    pub kernel_decided: AtomicU64,
    /// Requests decided in userspace (fallback, mismatch, pipelining).
    pub user_decided: AtomicU64,
    pub no_route: AtomicU64,
    pub no_endpoint: AtomicU64,
}

/// The installed services.
#[derive(Default)]
struct Routing {
    /// By kernel service id. A connection keeps the `Arc` it started with.
    services: BTreeMap<u32, Arc<Service>>,
    /// By VIP: what the kernel holds for it.
    installed: BTreeMap<SocketAddr, Installed>,
    /// Cluster id (index + 1) → name, as numbered in the kernel groups;
    /// only ever appended to, so ids in flight stay valid.
    clusters: Vec<String>,
    next_id: u32,
}

/// What the connector needs: the kernel's decisions and the tables.
pub struct Connector {
    kernel: Mutex<L7Kernel>,
    seed: u64,
    /// Where connects to L7 services are steered.
    advertised: SocketAddr,
    routing: RwLock<Routing>,
    rng: AtomicU64,
    pub stats: ConnectorStats,
}

impl Connector {
    /// A connector with no service yet; clients reach it at `advertised`.
    pub fn new(kernel: L7Kernel, advertised: SocketAddr) -> Connector {
        let seed = std::collections::hash_map::RandomState::new();
        Connector {
            seed: kernel.seed(),
            kernel: Mutex::new(kernel),
            advertised,
            routing: RwLock::new(Routing {
                next_id: 1,
                ..Routing::default()
            }),
            rng: AtomicU64::new(std::hash::BuildHasher::hash_one(&seed, 0u8)),
            stats: ConnectorStats::default(),
        }
    }

    /// Makes the installed services those of `l7` (a full config). A
    /// service whose table changed is installed under a new id before the
    /// old one is removed, so a connect always finds complete tables;
    /// endpoint-only changes touch no kernel map. Connections already
    /// open keep the service they started with.
    pub fn update(&self, l7: &[FlatL7]) -> Result<(), DataplaneError> {
        let mut kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = self.routing.write().unwrap_or_else(|p| p.into_inner());
        let mut keep = std::collections::BTreeSet::new();
        for svc in l7 {
            keep.insert(svc.vip);
            let new = Service {
                table: svc.table.clone(),
                slots: svc.clusters.clone(),
            };
            let old = r.installed.get(&svc.vip).cloned();
            if let Some(old) = &old {
                let cur = &r.services[&old.l7_id];
                if **cur == new {
                    continue;
                }
                if cur.table == new.table {
                    r.services.insert(old.l7_id, Arc::new(new));
                    continue;
                }
            }
            let id = r.next_id;
            r.next_id += 1;
            let Routing { clusters, .. } = &mut *r;
            let inst = kernel.install(id, svc.vip, self.advertised, &new.table, |c| {
                let pos = clusters.iter().position(|n| n == c).unwrap_or_else(|| {
                    clusters.push(c.to_string());
                    clusters.len() - 1
                });
                pos as u32 + 1
            })?;
            r.services.insert(id, Arc::new(new));
            r.installed.insert(svc.vip, inst);
            if let Some(old) = old {
                kernel.remove(&old, false);
                r.services.remove(&old.l7_id);
            }
        }
        let gone: Vec<SocketAddr> = r
            .installed
            .keys()
            .filter(|v| !keep.contains(v))
            .copied()
            .collect();
        for vip in gone {
            if let Some(old) = r.installed.remove(&vip) {
                kernel.remove(&old, true);
                r.services.remove(&old.l7_id);
            }
        }
        Ok(())
    }

    /// Starts the connector thread: binds `listen` (inside the network
    /// namespace at `netns` when given) and serves until the process exits.
    /// Returns the bound address.
    pub fn spawn(
        self: Arc<Self>,
        listen: SocketAddr,
        netns: Option<PathBuf>,
    ) -> std::io::Result<SocketAddr> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("l7-connector".into())
            .spawn(move || {
                let setup = || -> std::io::Result<(tokio::runtime::Runtime, TcpListener)> {
                    if let Some(ns) = &netns {
                        let f = std::fs::File::open(ns)?;
                        // SAFETY: `f` is an open namespace fd; setns(2)
                        // changes the namespace of this thread only.
                        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let l = rt.block_on(TcpListener::bind(listen))?;
                    Ok((rt, l))
                };
                match setup() {
                    Ok((rt, l)) => {
                        let _ = tx.send(l.local_addr());
                        rt.block_on(self.serve(l));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        rx.recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("connector thread died")))
    }

    async fn serve(self: Arc<Self>, l: TcpListener) {
        loop {
            match l.accept().await {
                Ok((s, peer)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.relay(s, peer).await {
                            tracing::debug!(%peer, "l7 connection: {e}");
                        }
                        me.kernel
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .forget(peer);
                    });
                }
                Err(e) => {
                    tracing::warn!("l7 connector accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn decision(&self, peer: SocketAddr) -> Option<L7Conn> {
        self.kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decision(peer)
    }

    fn random(&self) -> u64 {
        // splitmix64 over a shared counter.
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A weighted pick of one of the action's clusters.
    fn pick<'a>(&self, action: &'a TcpRoute) -> &'a str {
        let cs = action.clusters();
        let total: u64 = cs.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut r = self.random() % total.max(1);
        for (c, w) in &cs {
            if r < u64::from(*w) {
                return c;
            }
            r -= u64::from(*w);
        }
        cs[0].0
    }

    /// The cluster for request number `seq` that matched `(vhost, route,
    /// action)`: the kernel's pick when its decision is for this request and
    /// this route, else a userspace pick.
    fn choose<'a>(
        &self,
        d: Option<L7Conn>,
        seq: u32,
        target: &str,
        (vhost, route, action): (u32, u32, &'a TcpRoute),
    ) -> &'a str {
        if let Some(d) = d.filter(|d| {
            d.seq == seq
                && d.status == L7_DECIDED
                && (d.vhost, d.route) == (vhost, route)
                && d.target_hash == hash(self.seed, target.as_bytes())
        }) {
            let r = self.routing.read().unwrap_or_else(|p| p.into_inner());
            let name = r.clusters.get((d.cluster as usize).wrapping_sub(1));
            if let Some((c, _)) = action
                .clusters()
                .into_iter()
                .find(|(c, _)| Some(*c) == name.map(String::as_str))
            {
                self.stats.kernel_decided.fetch_add(1, Ordering::Relaxed);
                return c;
            }
        }
        self.stats.user_decided.fetch_add(1, Ordering::Relaxed);
        self.pick(action)
    }

    async fn connect(&self, slots: &[SocketAddr]) -> std::io::Result<Peer> {
        let addr = slots[(self.random() % slots.len() as u64) as usize];
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok(Peer::new(s))
    }

    async fn relay(&self, client: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
        let svc = self.decision(peer).and_then(|d| {
            let r = self.routing.read().unwrap_or_else(|p| p.into_inner());
            r.services.get(&d.l7_id).cloned()
        });
        let Some(svc) = svc else {
            return Err(std::io::Error::other(
                "no kernel entry for this client: not steered by the kernel",
            ));
        };
        let mut c = Peer::new(client);
        let mut pool: HashMap<String, Peer> = HashMap::new();
        let mut seq = 0u32;
        while let Some(head) = c.read_head().await? {
            seq = seq.wrapping_add(1);
            let req = match parse_request(&head) {
                Ok(r) => r,
                Err(e) => {
                    c.stream.write_all(&local_reply(400, true)).await?;
                    return Err(e);
                }
            };
            let host = req
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("host"))
                .map_or("", |(_, v)| v.as_str());
            let m = Request {
                host,
                target: &req.target,
                headers: req
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect(),
            };
            let d = self.decision(peer);
            let cluster = match svc.table.route(&m) {
                Outcome::NoRoute => None,
                Outcome::Route {
                    vhost,
                    route,
                    action,
                } => Some(self.choose(d, seq, &req.target, (vhost, route, action))),
            };
            let Some(cluster) = cluster else {
                self.stats.no_route.fetch_add(1, Ordering::Relaxed);
                answer(&mut c, &req, 404).await?;
                if req.close {
                    return Ok(());
                }
                continue;
            };
            let slots = svc.slots.get(cluster).map_or(&[][..], Vec::as_slice);
            // A kept-alive upstream may have closed meanwhile: a request
            // without body is retried once on a fresh connection.
            let mut attempts = if req.framing == Framing::None { 2 } else { 1 };
            let resp = loop {
                attempts -= 1;
                let reused = pool.contains_key(cluster);
                let up = match pool.remove(cluster) {
                    Some(up) => up,
                    None if slots.is_empty() => break None,
                    None => match self.connect(slots).await {
                        Ok(up) => up,
                        Err(e) => {
                            tracing::debug!(cluster, "l7 upstream connect: {e}");
                            break None;
                        }
                    },
                };
                let mut up = up;
                let sent = async {
                    up.stream.write_all(&head).await?;
                    c.relay_body(req.framing, &mut up.stream).await?;
                    up.read_head().await
                }
                .await;
                match sent {
                    Ok(Some(h)) => break Some((up, h)),
                    _ if reused && attempts > 0 => continue,
                    Ok(None) => break None,
                    Err(e) => return Err(e),
                }
            };
            let Some((mut up, mut rhead)) = resp else {
                self.stats.no_endpoint.fetch_add(1, Ordering::Relaxed);
                answer(&mut c, &req, 503).await?;
                if req.close {
                    return Ok(());
                }
                continue;
            };
            let (framing, up_close) = loop {
                let r = parse_response(&rhead)?;
                c.stream.write_all(&rhead).await?;
                let f = r.framing(&req.method)?;
                up.relay_body(f, &mut c.stream).await?;
                if (100..200).contains(&r.status) && r.status != 101 {
                    rhead = up
                        .read_head()
                        .await?
                        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
                    continue;
                }
                break (f, r.close);
            };
            if framing == Framing::UntilClose || req.close {
                let _ = c.stream.shutdown().await;
                return Ok(());
            }
            if !up_close {
                pool.insert(cluster.to_string(), up);
            }
        }
        Ok(())
    }
}

/// Answers a request locally: its body is read and dropped first.
async fn answer(c: &mut Peer, req: &http1::RequestHead, status: u16) -> std::io::Result<()> {
    c.relay_body(req.framing, &mut tokio::io::sink()).await?;
    c.stream.write_all(&local_reply(status, req.close)).await
}

impl Connector {
    /// Kernel counters (`KM_L7_STATS`) and the connector's, by name.
    pub fn stats_json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        out.insert("program_id".into(), kernel.program_id().into());
        if let Ok(k) = kernel.stats() {
            for (name, v) in k {
                out.insert(name.into(), v.into());
            }
        }
        drop(kernel);
        let s = &self.stats;
        for (name, v) in [
            ("connector_kernel_decided", &s.kernel_decided),
            ("connector_user_decided", &s.user_decided),
            ("connector_no_route", &s.no_route),
            ("connector_no_endpoint", &s.no_endpoint),
        ] {
            out.insert(name.into(), v.load(Ordering::Relaxed).into());
        }
        out.into()
    }
}

/// `GET /debug/l7`.
pub async fn admin_stats(
    axum::extract::State(state): axum::extract::State<Arc<crate::admin::AdminState>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match state.l7.get() {
        Some(c) => axum::Json(c.stats_json()).into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            "no HTTP service is routed per request\n",
        )
            .into_response(),
    }
}
