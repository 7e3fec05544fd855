//! `kmeshctl` reaching a real daemon through a fake Kubernetes API server:
//! pod GET/list, and the portforward subresource as the API server speaks
//! it (WebSocket, subprotocol `v4.channel.k8s.io`, first byte of every
//! binary message the channel: 0 data and 1 error of the first port; each
//! channel opens with a 2-byte little-endian port number). The forwarded
//! bytes reach the daemon's real admin API (needs root).

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use axum::{
    body::Body,
    extract::{Path as UrlPath, Query, Request, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use bpf_tests::http_get;
use common::{one_service, workspace_bin, Bpffs, Daemon, TESTPOD};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::{
    tungstenite::{handshake::derive_accept_key, protocol::Role, Message},
    WebSocketStream,
};

const ADMIN_PORT: u16 = 15200;

#[derive(Clone)]
struct Fake {
    pods: Arc<Vec<Value>>,
    /// Where port 15200 of a pod leads (the real daemon's admin API).
    admin: SocketAddr,
    /// Port-forward sessions that completed with correct client framing.
    forwards: Arc<AtomicUsize>,
    /// Framing errors seen from the client.
    errors: Arc<Mutex<Vec<String>>>,
}

fn pod(ns: &str, name: &str, node: &str, phase: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": phase}
    })
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        Json(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}),
        ),
    )
        .into_response()
}

/// RBAC of the fake: namespace `locked` is forbidden.
fn forbidden(ns: &str) -> Option<Response> {
    (ns == "locked").then(|| {
        status(
            403,
            "Forbidden",
            &format!("pods is forbidden: User \"dev\" cannot get resource \"pods\" in the namespace \"{ns}\""),
        )
    })
}

impl Fake {
    fn find(&self, ns: &str, name: &str) -> Option<Value> {
        self.pods
            .iter()
            .find(|p| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == name)
            .cloned()
    }
}

async fn list(
    State(f): State<Fake>,
    UrlPath(ns): UrlPath<String>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = forbidden(&ns) {
        return r;
    }
    let node = q
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("spec.nodeName="));
    let labels: Vec<(&str, &str)> = q
        .get("labelSelector")
        .map(|s| s.split(',').filter_map(|kv| kv.split_once('=')).collect())
        .unwrap_or_default();
    let items: Vec<Value> = f
        .pods
        .iter()
        .filter(|p| p["metadata"]["namespace"] == ns.as_str())
        .filter(|p| node.is_none_or(|n| p["spec"]["nodeName"] == n))
        .filter(|p| labels.iter().all(|(k, v)| p["metadata"]["labels"][k] == *v))
        .cloned()
        .collect();
    Json(json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}))
        .into_response()
}

async fn get_pod(
    State(f): State<Fake>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    if let Some(r) = forbidden(&ns) {
        return r;
    }
    match f.find(&ns, &name) {
        Some(p) => Json(p).into_response(),
        None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

/// The portforward subresource: upgrade to a WebSocket and relay channel 0
/// to a TCP connection to the daemon's admin API.
async fn portforward(
    State(f): State<Fake>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
    req: Request,
) -> Response {
    if f.find(&ns, &name).is_none() {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    }
    if q.get("ports").map(String::as_str) != Some("15200") {
        return status(400, "BadRequest", &format!("ports {:?}", q.get("ports")));
    }
    let h = req.headers();
    let protocols = h
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !protocols
        .split(',')
        .any(|p| p.trim() == "v4.channel.k8s.io")
        || h.get(header::UPGRADE).is_none_or(|u| u != "websocket")
    {
        return status(
            400,
            "BadRequest",
            &format!("not a v4 channel upgrade: {protocols:?}"),
        );
    }
    let accept = derive_accept_key(h.get(header::SEC_WEBSOCKET_KEY).unwrap().as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let upgraded = on_upgrade.await.expect("upgrade");
        let ws = WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        relay(ws, f).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(header::SEC_WEBSOCKET_PROTOCOL, "v4.channel.k8s.io")
        .body(Body::empty())
        .unwrap()
}

async fn relay<S>(mut ws: WebSocketStream<S>, f: Fake)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let port = ADMIN_PORT.to_le_bytes();
    for ch in [0u8, 1] {
        ws.send(Message::binary(vec![ch, port[0], port[1]]))
            .await
            .unwrap();
    }
    let mut tcp = tokio::net::TcpStream::connect(f.admin).await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let mut ok = true;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    if b.first() != Some(&0) {
                        f.errors.lock().unwrap().push(format!("client frame on channel {:?}", b.first()));
                        ok = false;
                        break;
                    }
                    tcp.write_all(&b[1..]).await.unwrap();
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    f.errors.lock().unwrap().push(e.to_string());
                    ok = false;
                    break;
                }
            },
            n = tcp.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    // The daemon closed its side: the API server closes the stream.
                    let _ = ws.close(None).await;
                    break;
                }
                Ok(n) => {
                    let mut m = Vec::with_capacity(n + 1);
                    m.push(0);
                    m.extend_from_slice(&buf[..n]);
                    ws.send(Message::binary(m)).await.unwrap();
                }
            },
        }
    }
    if ok {
        f.forwards.fetch_add(1, Ordering::SeqCst);
    }
}

struct Kubeconfig(PathBuf);

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn kubeconfig(server: SocketAddr) -> Kubeconfig {
    let path = std::env::temp_dir().join(format!("kmt-kubeconfig-{}", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{server}\n\
contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: dev\ncurrent-context: fake\n\
users:\n- name: dev\n  user:\n    token: t\n"
        ),
    )
    .unwrap();
    Kubeconfig(path)
}

/// kmeshctl with only this kubeconfig (no admin address, not in a cluster).
fn kmeshctl(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("kmeshctl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KMESH_ADMIN_ADDR")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kmeshctl_reaches_the_daemon_by_pod_name_through_the_api_server() {
    bpf_tests::require_root();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kmk", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv = node.add_pod("srv0").unwrap();
    let bpffs = Bpffs::new("kubectl");
    let cfg = bpffs.write_config(&one_service(vip, "ROUND_ROBIN", vec![(srv.addr4(8080), 1)]));
    let daemon = Daemon::start(cfg, &client, &node.cgroup, &bpffs.0, &[]);

    let kmesh = json!({"app": "kmesh"});
    let fake = Fake {
        pods: Arc::new(vec![
            pod(
                "kmesh-system",
                "kmesh-a1",
                "node-a",
                "Running",
                kmesh.clone(),
            ),
            pod(
                "kmesh-system",
                "kmesh-b1",
                "node-b",
                "Pending",
                kmesh.clone(),
            ),
            pod("shop", "web-1", "node-a", "Running", json!({"app": "web"})),
            pod("shop", "db-1", "node-c", "Running", json!({"app": "db"})),
        ]),
        admin: daemon.admin,
        forwards: Arc::default(),
        errors: Arc::default(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let api = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/api/v1/namespaces/{ns}/pods", get(list))
        .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/portforward",
            get(portforward),
        )
        .with_state(fake.clone());
    rt.spawn(async move { axum::serve(listener, app).await });
    let kc = kubeconfig(api);

    // By the kmesh pod's name: the dump comes from the real daemon.
    let (code, out, err) = kmeshctl(&kc.0, &["dump", "kmesh-a1", "kernel-native", "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let dump: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        dump["services"][vip.to_string()]["slots"][0],
        srv.addr4(8080).to_string(),
        "{out}"
    );
    // By an application pod: the kmesh pod of its node; table output.
    let (code, out, err) = kmeshctl(&kc.0, &["dump", "shop/web-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("10.96.0.10:80") && out.contains("VIP"),
        "{out}"
    );
    // Set a log level through the port-forward; the daemon itself shows it.
    let (code, out, err) = kmeshctl(&kc.0, &["log", "kmesh-a1", "--set", "telemetry:debug"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("telemetry") && out.contains("debug"), "{out}");
    let (_, body) = http_get(daemon.admin, "/debug/loggers").unwrap();
    let levels: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(levels["telemetry"], "debug", "{body}");
    // By node; the one positional is the logger name then.
    let (code, out, err) = kmeshctl(
        &kc.0,
        &["--node", "node-a", "log", "telemetry", "-o", "json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"telemetry": "debug"})
    );
    let (code, out, err) = kmeshctl(&kc.0, &["accesslog", "kmesh-a1", "enable"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, body) = http_get(daemon.admin, "/accesslog").unwrap();
    assert!(body.contains("\"enabled\":true"), "{body}");
    assert_eq!(fake.forwards.load(Ordering::SeqCst), 5);
    assert!(fake.errors.lock().unwrap().is_empty(), "{:?}", fake.errors);

    // Errors say what to try, with their exit codes.
    let (code, _, err) = kmeshctl(&kc.0, &["dump", "nosuch"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("kmesh-system/nosuch: not found") && err.contains("kubectl"),
        "{err}"
    );
    let (code, _, err) = kmeshctl(&kc.0, &["--node", "node-b", "dump"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("not running (phase Pending)"), "{err}");
    let (code, _, err) = kmeshctl(&kc.0, &["dump", "shop/db-1"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("no kmesh pod") && err.contains("node-c"),
        "{err}"
    );
    let (code, _, err) = kmeshctl(&kc.0, &["dump", "locked/x"]);
    assert_eq!(code, 6, "{err}");
    assert!(
        err.contains("forbidden by RBAC") && err.contains("pods/portforward"),
        "{err}"
    );
    let (code, _, err) = kmeshctl(&kc.0, &["--admin-addr", "127.0.0.1:1", "dump", "kmesh-a1"]);
    assert_eq!(code, 2, "{err}");
    let home = std::env::temp_dir().join(format!("kmt-nohome-{}", std::process::id()));
    let out = Command::new(workspace_bin("kmeshctl"))
        .args(["dump", "kmesh-a1"])
        .env("KUBECONFIG", home.join("missing"))
        .env("HOME", &home)
        .env_remove("KMESH_ADMIN_ADDR")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("--admin-addr"), "{err}");
    assert_eq!(
        fake.forwards.load(Ordering::SeqCst),
        5,
        "failed lookups must not forward"
    );
    drop(srv);
}
