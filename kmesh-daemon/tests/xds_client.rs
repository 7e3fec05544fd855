//! The daemon's ADS client against the in-process control plane: initial
//! sync, updates, removals, NACK with partial acceptance, control-plane
//! restart, delta reconnect. The sink records what would be written to the
//! kernel (the kernel path itself is covered in bpf-tests).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kmesh_daemon::xds::fixture::{resources as r, AdsFixture, Kind};
use kmesh_daemon::xds::store::{Store, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use kmesh_daemon::xds::{self, to_any, ClientOptions, NodeIdentity, Sink, XdsStatus};
use xds_adapter::{Compiled, FlatConfig};

const T: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<FlatConfig>>>);

impl Sink for Recorder {
    fn apply(&mut self, c: &Compiled, _: &Store) -> Result<(), String> {
        self.0.lock().unwrap().push(c.flat.clone());
        Ok(())
    }
}

impl Recorder {
    fn last(&self) -> Option<FlatConfig> {
        self.0.lock().unwrap().last().cloned()
    }
    /// Waits until the last applied config satisfies `pred`.
    async fn wait(&self, what: &str, pred: impl Fn(&FlatConfig) -> bool) -> FlatConfig {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(c) = self.last() {
                if pred(&c) {
                    return c;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last applied: {:?}",
                self.last()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn node() -> NodeIdentity {
    NodeIdentity {
        ip: "10.244.0.5".into(),
        pod: "kmesh-test".into(),
        namespace: "kmesh-system".into(),
        cluster_id: "Kubernetes".into(),
        istio_version: "1.26.0".into(),
        extra: Default::default(),
    }
}

fn slots(c: &FlatConfig, vip: &str) -> Vec<SocketAddr> {
    c.services
        .get(&sa(vip))
        .map(|s| s.slots.clone())
        .unwrap_or_default()
}

/// web: VIP 10.96.0.10:80 → EDS cluster "web" with `eps`.
fn serve_web(f: &AdsFixture, eps: &[SocketAddr]) {
    f.set(
        CLUSTER_TYPE,
        vec![("web".into(), to_any(&r::eds_cluster("web")))],
    );
    f.set(
        ENDPOINT_TYPE,
        vec![("web".into(), to_any(&r::cla("web", eps)))],
    );
    f.set(
        LISTENER_TYPE,
        vec![(
            "web".into(),
            to_any(&r::tcp_listener("web", sa("10.96.0.10:80"), "web")),
        )],
    );
}

fn start_client(
    f: &AdsFixture,
    delta: bool,
) -> (Recorder, Arc<Mutex<XdsStatus>>, tokio::task::JoinHandle<()>) {
    let rec = Recorder::default();
    let status = Arc::new(Mutex::new(XdsStatus::default()));
    let mut opts = ClientOptions::new(f.uri(), node());
    opts.delta = delta;
    opts.backoff_initial = Duration::from_millis(50);
    opts.backoff_max = Duration::from_millis(400);
    let task = tokio::spawn(xds::run(opts, rec.clone(), status.clone()));
    (rec, status, task)
}

async fn initial_sync_update_removal(delta: bool) {
    let f = AdsFixture::start().await.unwrap();
    let (a, b, c) = (
        sa("10.244.1.1:8080"),
        sa("10.244.1.2:8080"),
        sa("10.244.1.3:8080"),
    );
    serve_web(&f, &[a, b]);
    let (rec, status, task) = start_client(&f, delta);

    let cfg = rec
        .wait("initial sync", |c| slots(c, "10.96.0.10:80").len() == 2)
        .await;
    assert_eq!(cfg.services.len(), 1);
    // Warming order: CDS first, then EDS, then LDS.
    let ev = f.events();
    let order: Vec<&str> = ev
        .iter()
        .filter(|e| e.kind == Kind::Request)
        .map(|e| e.type_url.as_str())
        .collect();
    assert_eq!(
        order[..3],
        [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE],
        "{ev:?}"
    );
    assert_eq!(
        ev[0].node_id.as_deref(),
        Some("sidecar~10.244.0.5~kmesh-test.kmesh-system~kmesh-system.svc.cluster.local")
    );
    for t in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE] {
        f.wait_for(0, T, |e| e.type_url == t && e.kind == Kind::Ack)
            .await
            .unwrap();
    }
    assert!(f.events().iter().all(|e| e.kind != Kind::Nack));

    // An endpoint added.
    let n = f.events().len();
    f.set(
        ENDPOINT_TYPE,
        vec![("web".into(), to_any(&r::cla("web", &[a, b, c])))],
    );
    rec.wait("endpoint added", |cfg| {
        slots(cfg, "10.96.0.10:80").len() == 3
    })
    .await;
    f.wait_for(n, T, |e| e.type_url == ENDPOINT_TYPE && e.kind == Kind::Ack)
        .await
        .unwrap();

    // The listener removed: the service goes away.
    f.set(LISTENER_TYPE, vec![]);
    rec.wait("listener removed", |c| c.services.is_empty())
        .await;
    let s = status.lock().unwrap().clone();
    assert!(s.connected);
    assert!(s.last_nack.is_empty(), "{:?}", s.last_nack);
    task.abort();
}

#[tokio::test]
async fn sotw_initial_sync_update_removal() {
    initial_sync_update_removal(false).await;
}

#[tokio::test]
async fn delta_initial_sync_update_removal() {
    initial_sync_update_removal(true).await;
}

async fn nack_keeps_last_good(delta: bool) {
    let f = AdsFixture::start().await.unwrap();
    let a = sa("10.244.1.1:8080");
    serve_web(&f, &[a]);
    f.upsert(CLUSTER_TYPE, "api", to_any(&r::eds_cluster("api")));
    f.upsert(
        ENDPOINT_TYPE,
        "api",
        to_any(&r::cla("api", &[sa("10.244.2.1:9090")])),
    );
    f.upsert(
        LISTENER_TYPE,
        "api",
        to_any(&r::tcp_listener("api", sa("10.96.0.20:90"), "api")),
    );
    let (rec, status, task) = start_client(&f, delta);
    rec.wait("both services", |c| c.services.len() == 2).await;

    // A bad version of "api" (port 70000) and a new good listener "db" in
    // the same push: "db" applies, "api" keeps its last good version.
    let n = f.events().len();
    let mut bad = r::tcp_listener("api", sa("10.96.0.21:90"), "api");
    if let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) =
        bad.address.as_mut().and_then(|a| a.address.as_mut())
    {
        s.port_specifier = Some(
            envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                70000,
            ),
        );
    }
    f.set(
        LISTENER_TYPE,
        vec![
            ("api".into(), to_any(&bad)),
            (
                "db".into(),
                to_any(&r::tcp_listener("db", sa("10.96.0.30:5432"), "web")),
            ),
            (
                "web".into(),
                to_any(&r::tcp_listener("web", sa("10.96.0.10:80"), "web")),
            ),
        ],
    );
    let nack = f
        .wait_for(n, T, |e| {
            e.type_url == LISTENER_TYPE && e.kind == Kind::Nack
        })
        .await
        .unwrap();
    let msg = nack.error.unwrap();
    assert!(
        msg.contains("listener \"api\": field address.socket_address.port_value: 70000 is out of range (0-65535)"),
        "{msg}"
    );
    let cfg = rec.wait("db applied", |c| c.services.len() == 3).await;
    assert_eq!(
        slots(&cfg, "10.96.0.20:90"),
        vec![sa("10.244.2.1:9090")],
        "last good api"
    );
    assert!(!cfg.services.contains_key(&sa("10.96.0.21:90")));
    if !delta {
        // SotW NACK carries the previous accepted version.
        assert_ne!(
            nack.version,
            f.events().last().unwrap().version.clone() + "x"
        );
        let acked = status.lock().unwrap().accepted_versions["LDS"].clone();
        assert_eq!(nack.version, acked);
    }
    assert!(status.lock().unwrap().last_nack["LDS"].contains("70000"));
    task.abort();
}

#[tokio::test]
async fn sotw_nack_partial_acceptance() {
    nack_keeps_last_good(false).await;
}

#[tokio::test]
async fn delta_nack_partial_acceptance() {
    nack_keeps_last_good(true).await;
}

async fn restart(delta: bool) {
    let f = AdsFixture::start().await.unwrap();
    let addr = f.addr;
    let (a, b) = (sa("10.244.1.1:8080"), sa("10.244.1.2:8080"));
    serve_web(&f, &[a]);
    let (rec, status, task) = start_client(&f, delta);
    rec.wait("initial", |c| slots(c, "10.96.0.10:80") == vec![a])
        .await;
    let applies = rec.0.lock().unwrap().len();

    // Control plane gone: the client retries, nothing is withdrawn.
    let snap = f.snapshot();
    f.stop();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!status.lock().unwrap().connected);
    assert_eq!(
        rec.0.lock().unwrap().len(),
        applies,
        "no apply while disconnected"
    );

    // Back, with one change made while it was down.
    let f = AdsFixture::start_on(addr, snap).await.unwrap();
    f.set(
        ENDPOINT_TYPE,
        vec![("web".into(), to_any(&r::cla("web", &[a, b])))],
    );
    rec.wait("update after restart", |c| {
        slots(c, "10.96.0.10:80").len() == 2
    })
    .await;
    let cds = f
        .wait_for(0, T, |e| {
            e.type_url == CLUSTER_TYPE && e.kind == Kind::Request
        })
        .await
        .unwrap();
    if delta {
        // The reconnect says what is held so only differences come.
        assert_eq!(
            cds.initial_versions.keys().collect::<Vec<_>>(),
            vec!["web"],
            "{cds:?}"
        );
        let eds = f
            .wait_for(0, T, |e| {
                e.type_url == ENDPOINT_TYPE && e.kind == Kind::Request
            })
            .await
            .unwrap();
        assert!(eds.initial_versions.contains_key("web"), "{eds:?}");
    } else {
        assert!(
            !cds.version.is_empty(),
            "SotW reconnect sends the held version"
        );
    }
    assert!(status.lock().unwrap().streams >= 2);
    task.abort();
}

#[tokio::test]
async fn sotw_control_plane_restart() {
    restart(false).await;
}

#[tokio::test]
async fn delta_reconnect_sends_initial_resource_versions() {
    restart(true).await;
}

#[tokio::test]
async fn rds_routes_and_content_dependent_routes() {
    let f = AdsFixture::start().await.unwrap();
    let a = sa("10.244.1.1:8080");
    f.set(
        CLUSTER_TYPE,
        vec![(
            "outbound|80||web.default.svc.cluster.local".into(),
            to_any(&r::eds_cluster(
                "outbound|80||web.default.svc.cluster.local",
            )),
        )],
    );
    f.set(
        ENDPOINT_TYPE,
        vec![(
            "outbound|80||web.default.svc.cluster.local".into(),
            to_any(&r::cla("outbound|80||web.default.svc.cluster.local", &[a])),
        )],
    );
    f.set(
        LISTENER_TYPE,
        vec![(
            "0.0.0.0_80".into(),
            to_any(&r::http_listener("0.0.0.0_80", sa("0.0.0.0:80"), "80")),
        )],
    );
    f.set(
        ROUTE_TYPE,
        vec![(
            "80".into(),
            to_any(&r::route_config(
                "80",
                &[(
                    "web.default.svc.cluster.local:80",
                    vec![
                        "web.default.svc.cluster.local".into(),
                        "10.96.0.10".into(),
                        "10.96.0.10:80".into(),
                    ],
                    "outbound|80||web.default.svc.cluster.local",
                )],
            )),
        )],
    );
    let (rec, _status, task) = start_client(&f, false);
    rec.wait("service from RDS", |c| slots(c, "10.96.0.10:80") == vec![a])
        .await;
    f.wait_for(0, T, |e| {
        e.type_url == ROUTE_TYPE && e.kind == Kind::Ack && e.names == vec!["80"]
    })
    .await
    .unwrap();
    task.abort();
}

/// A CA and a server certificate for `istiod.istio-system.svc`, made with
/// the openssl CLI (installed by `cargo xtask setup`).
fn certificates(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (hint: cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=kmesh-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=istiod",
    ]);
    run(&csr);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:istiod.istio-system.svc\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "1",
        "-extfile",
        "ext",
    ]);
    (
        std::fs::read(dir.join("srv.pem")).unwrap(),
        std::fs::read(dir.join("srv.key")).unwrap(),
    )
}

#[tokio::test]
async fn tls_with_root_ca_and_bearer_token() {
    let dir = std::env::temp_dir().join(format!("kmesh-xds-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = certificates(&dir);
    std::fs::write(dir.join("istio-token"), "header.payload.signature\n").unwrap();
    let f = AdsFixture::start_tls(&cert, &key).await.unwrap();
    serve_web(&f, &[sa("10.244.1.1:8080")]);

    let rec = Recorder::default();
    let status = Arc::new(Mutex::new(XdsStatus::default()));
    let mut opts = ClientOptions::new(format!("https://{}", f.addr), node());
    opts.ca_cert = Some(dir.join("ca.pem"));
    opts.tls_server_name = Some("istiod.istio-system.svc".into());
    opts.token_path = Some(dir.join("istio-token"));
    let task = tokio::spawn(xds::run(opts.clone(), rec.clone(), status.clone()));
    rec.wait("sync over TLS", |c| c.services.len() == 1).await;
    let ev = f.events();
    assert_eq!(
        ev[0].authorization.as_deref(),
        Some("Bearer header.payload.signature")
    );
    task.abort();

    // A server certificate that does not chain to the CA is refused.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    certificates(&other);
    let mut bad = opts;
    bad.ca_cert = Some(other.join("ca.pem"));
    let status = Arc::new(Mutex::new(XdsStatus::default()));
    let n = f.events().len();
    let task = tokio::spawn(xds::run(bad, Recorder::default(), status.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        f.events().len(),
        n,
        "no request may pass an untrusted server"
    );
    assert!(!status.lock().unwrap().connected);
    assert!(status.lock().unwrap().last_error.is_some());
    task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What Istiod sends a sidecar (catch-all, inbound and per-port listeners
/// with several filter chains, ORIGINAL_DST and black-hole clusters): every
/// response is ACKed, and the concrete destinations are installed.
async fn istio_sidecar_shapes(delta: bool) {
    let text = include_str!("../../xds-adapter/tests/data/istio-sidecar-config-dump.yaml");
    let res = xds_adapter::parse_static_config(text).expect("fixture parses");
    let f = AdsFixture::start().await.unwrap();
    f.set(
        CLUSTER_TYPE,
        res.clusters
            .iter()
            .map(|c| (c.name.clone(), to_any(c)))
            .collect(),
    );
    f.set(
        ENDPOINT_TYPE,
        res.load_assignments
            .iter()
            .map(|c| (c.cluster_name.clone(), to_any(c)))
            .collect(),
    );
    f.set(
        LISTENER_TYPE,
        res.listeners
            .iter()
            .map(|l| (l.name.clone(), to_any(l)))
            .collect(),
    );
    f.set(
        ROUTE_TYPE,
        res.route_configs
            .iter()
            .map(|r| (r.name.clone(), to_any(r)))
            .collect(),
    );
    let (rec, status, task) = start_client(&f, delta);
    let want = [
        "10.96.10.10:9080",
        "10.96.20.5:27017",
        "10.96.20.6:27017",
        "10.96.30.3:8000",
        "10.96.40.8:3306",
    ];
    let cfg = rec
        .wait("the Istio services", |c| {
            want.iter().all(|v| !slots(c, v).is_empty())
        })
        .await;
    let got: Vec<SocketAddr> = cfg.services.keys().copied().collect();
    let want: Vec<SocketAddr> = want.iter().map(|v| sa(v)).collect();
    assert_eq!(got, want);
    // RDS is the last type to arrive; once it is ACKed every type has been.
    f.wait_for(0, T, |e| e.type_url == ROUTE_TYPE && e.kind == Kind::Ack)
        .await
        .unwrap();
    let nacks: Vec<_> = f
        .events()
        .into_iter()
        .filter(|e| e.kind == Kind::Nack)
        .collect();
    assert!(nacks.is_empty(), "NACKed: {nacks:?}");
    let s = status.lock().unwrap();
    for t in ["CDS", "EDS", "LDS", "RDS"] {
        assert!(s.accepted_versions.contains_key(t), "{t} not accepted");
    }
    // The 0.0.0.0_443 SNI chain and the canary split are reported, not NACKed.
    assert!(s.last_nack.is_empty(), "{:?}", s.last_nack);
    drop(s);
    assert!(cfg
        .warnings
        .iter()
        .any(|w| w.contains("10.96.30.4:8000: not installed")));
    task.abort();
}

#[tokio::test]
async fn sotw_istio_sidecar_listeners_are_acked() {
    istio_sidecar_shapes(false).await;
}

#[tokio::test]
async fn delta_istio_sidecar_listeners_are_acked() {
    istio_sidecar_shapes(true).await;
}
