//! Kernel tests of HTTP/1.1 routing decided by the sk_msg program: a
//! client pod dials an L7 service VIP, connect4 steers it to a listener in
//! the node namespace (standing in for the connector), and every request
//! head written on the kept-alive connection leaves a decision in
//! `KM_L7_CONN`, which must equal what the string matcher of the same
//! table (Envoy's semantics) decides. Then the daemon end to end (an Envoy
//! bootstrap in, the connector relaying to server pods), and the same
//! bootstrap served by real Envoy: both must send every request to the same
//! cluster, and split 90/10 alike.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Stdio;

use common::{mesh, Bpffs, Daemon};
use kmesh_abi::l7::{hash, FB_DUPLICATE, FB_INCOMPLETE, L7_DECIDED, L7_FALLBACK, L7_NO_ROUTE};
use kmesh_daemon::l7::L7Kernel;
use xds_adapter::l7::{
    HeaderCond, HeaderTest, L7Route, L7Table, L7Vhost, Outcome, PathMatch, QueryCond, Request,
};
use xds_adapter::model::TcpRoute;

const VIP: &str = "10.96.0.20:80";
const CONNECTOR: &str = "10.244.0.1:15006";

fn route(index: u32, path: PathMatch, cluster: &str) -> L7Route {
    L7Route {
        index,
        path,
        headers: vec![],
        query: vec![],
        action: TcpRoute::Cluster(cluster.into()),
    }
}

fn table() -> L7Table {
    let mut jason = route(0, PathMatch::Prefix("/".into()), "v2");
    jason.headers.push(HeaderCond {
        name: "end-user".into(),
        test: HeaderTest::Exact("jason".into()),
        invert: false,
    });
    let mut health = route(2, PathMatch::Exact("/health".into()), "health");
    health.query.push(QueryCond {
        name: "probe".into(),
        value: Some("1".into()),
    });
    let mut stat = route(3, PathMatch::Prefix("/static".into()), "static");
    stat.headers.push(HeaderCond {
        name: "x-canary".into(),
        test: HeaderTest::Present(true),
        invert: true,
    });
    L7Table {
        vhosts: vec![
            L7Vhost {
                name: "reviews".into(),
                domains: vec!["reviews".into(), "reviews:80".into()],
                routes: vec![
                    jason,
                    route(1, PathMatch::Separated("/api".into()), "api"),
                    health,
                    stat,
                    route(4, PathMatch::Prefix("/".into()), "v1"),
                ],
            },
            L7Vhost {
                name: "any".into(),
                domains: vec!["*".into()],
                routes: vec![route(0, PathMatch::Prefix("/only".into()), "other")],
            },
        ],
    }
}

/// (target, headers, expected cluster or None for 404).
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<&'a str>);

const CLUSTERS: [&str; 6] = ["v1", "v2", "api", "health", "static", "other"];

fn cluster_id(name: &str) -> u32 {
    CLUSTERS.iter().position(|c| *c == name).unwrap() as u32 + 1
}

fn head(target: &str, headers: &[(&str, &str)]) -> String {
    let mut s = format!("GET {target} HTTP/1.1\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s + "\r\n"
}

/// A listener in the node namespace (where the connector runs).
fn node_listener(netns: std::path::PathBuf, addr: SocketAddr) -> TcpListener {
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).unwrap();
        // SAFETY: `f` is a namespace fd; only this thread changes namespace.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        TcpListener::bind(addr).unwrap()
    })
    .join()
    .unwrap()
}

#[test]
fn kernel_decides_each_request_on_a_kept_alive_connection_like_the_matcher() {
    let mut m = mesh(0, &[]);
    let mut l7 = L7Kernel::load(&mut m.dp).expect("load sk_msg");
    let t = table();
    l7.install(
        1,
        VIP.parse().unwrap(),
        CONNECTOR.parse().unwrap(),
        &t,
        cluster_id,
    )
    .expect("install");
    let listener = node_listener(m.node.netns_path(), CONNECTOR.parse().unwrap());
    // The stand-in connector: answers every read with one line.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        tx.send(peer).unwrap();
        let mut buf = [0u8; 8192];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(b"ok\n").is_err() {
                break;
            }
        }
    });
    let mut client = m
        .node
        .pod_command(&m.client)
        .arg("send")
        .arg(VIP)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let mut send = |bytes: &str| {
        writeln!(stdin, "{}", serde_json::to_string(bytes).unwrap()).unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "ok",
            "the steered connection must reach the connector"
        );
    };

    // (target, headers, expected cluster or None for 404)
    let cases: Vec<Case> = vec![
        (
            "/",
            vec![("Host", "reviews"), ("end-user", "jason")],
            Some("v2"),
        ),
        // The second request on the connection routes elsewhere.
        ("/api/x", vec![("Host", "reviews")], Some("api")),
        ("/api", vec![("Host", "reviews")], Some("api")),
        ("/apix", vec![("Host", "reviews")], Some("v1")),
        ("/health?probe=1", vec![("Host", "reviews")], Some("health")),
        (
            "/health?probe=2&probe=1",
            vec![("Host", "reviews")],
            Some("v1"),
        ),
        ("/health", vec![("Host", "reviews")], Some("v1")),
        (
            "/static/a",
            vec![("Host", "reviews"), ("X-Canary", "1")],
            Some("v1"),
        ),
        ("/static/a", vec![("Host", "REVIEWS:80")], Some("static")),
        (
            "/x",
            vec![("Host", "reviews"), ("End-User", " jason ")],
            Some("v2"),
        ),
        (
            "/x",
            vec![("Host", "reviews"), ("end-user", "jasonx")],
            Some("v1"),
        ),
        ("/only/x", vec![("Host", "unknown.example")], Some("other")),
        ("/nothing", vec![("Host", "unknown.example")], None),
    ];
    let mut seq = 0;
    let peer = rx
        .recv()
        .unwrap_or_else(|_| panic!("no connection reached the connector"));
    for (target, headers, want) in &cases {
        send(&head(target, headers));
        seq += 1;
        let d = l7.decision(peer).expect("decision entry");
        let what = format!("{target} {headers:?}: {d:?}");
        assert_eq!(d.seq, seq, "{what}");
        assert_eq!(d.target_hash, hash(l7.seed(), target.as_bytes()), "{what}");
        let req = Request {
            host: headers[0].1,
            target,
            headers: headers.clone(),
        };
        match (want, t.route(&req)) {
            (
                Some(c),
                Outcome::Route {
                    route,
                    vhost,
                    action,
                },
            ) => {
                assert_eq!(action, &TcpRoute::Cluster(c.to_string()), "matcher: {what}");
                assert_eq!(d.status, L7_DECIDED, "{what}");
                assert_eq!((d.vhost, d.route), (vhost, route), "{what}");
                assert_eq!(d.cluster, cluster_id(c), "{what}");
            }
            (None, Outcome::NoRoute) => assert_eq!(d.status, L7_NO_ROUTE, "{what}"),
            (w, o) => panic!("matcher disagrees with the expectation {w:?}: {o:?}"),
        }
    }
    // What the kernel leaves to the connector.
    send("GET / HTTP/1.1\r\nHost: reviews\r\nHost: other\r\n\r\n");
    let d = l7.decision(peer).unwrap();
    assert_eq!(
        (d.seq, d.status, d.reason),
        (seq + 1, L7_FALLBACK, FB_DUPLICATE),
        "{d:?}"
    );
    send("GET / HTTP/1.1\r\nHost: reviews\r\n");
    let d = l7.decision(peer).unwrap();
    assert_eq!(
        (d.seq, d.status, d.reason),
        (seq + 2, L7_FALLBACK, FB_INCOMPLETE),
        "{d:?}"
    );
    // Bytes that do not start a request head (a body) leave the decision alone.
    send("{\"not\": \"a request\"}\n");
    assert_eq!(l7.decision(peer).unwrap().seq, seq + 2);

    let stats: std::collections::BTreeMap<_, _> = l7.stats().unwrap().into_iter().collect();
    assert_eq!(stats["l7_steered"], 1, "{stats:?}");
    assert_eq!(stats["l7_decided"], 12, "{stats:?}");
    assert_eq!(stats["l7_no_route"], 1, "{stats:?}");
    assert_eq!(stats["l7_fallback"], 2, "{stats:?}");
    drop(stdin);
    let _ = client.wait();
}

/// The routes of the end-to-end tests, as an Envoy bootstrap with listener
/// `reviews` on `listen` and clusters v1, v2, api on `eps`.
fn http_bootstrap(listen: SocketAddr, eps: [SocketAddr; 3]) -> String {
    let mut y = format!(
        r#"static_resources:
  listeners:
  - name: reviews
    address: {{ socket_address: {{ address: "{ip}", port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: reviews
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: reviews
            virtual_hosts:
            - name: reviews
              domains: ["reviews", "reviews:80"]
              routes:
              - match: {{ prefix: "/", headers: [{{ name: end-user, string_match: {{ exact: jason }} }}] }}
                route: {{ cluster: v2 }}
              - match: {{ prefix: "/api" }}
                route: {{ cluster: api }}
              - match: {{ prefix: "/canary" }}
                route: {{ weighted_clusters: {{ clusters: [{{ name: v1, weight: 90 }}, {{ name: v2, weight: 10 }}] }} }}
              - match: {{ path: "/health", query_parameters: [{{ name: probe, string_match: {{ exact: "1" }} }}] }}
                route: {{ cluster: api }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: v1 }}
            - name: other
              domains: ["other"]
              routes:
              - match: {{ prefix: "/only" }}
                route: {{ cluster: v2 }}
  clusters:
"#,
        ip = listen.ip(),
        port = listen.port()
    );
    for (name, ep) in ["v1", "v2", "api"].iter().zip(eps) {
        y.push_str(&format!(
            "  - name: {name}\n    connect_timeout: 1s\n    type: STATIC\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: \"{}\", port_value: {} }} }} }}\n",
            ep.ip(),
            ep.port()
        ));
    }
    y
}

/// (Host, target, extra headers, expected body = server name, or None for 404).
type E2eCase = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    Option<&'static str>,
);

/// The table of requests both proxies must route alike: server pods are
/// srv0 (v1), srv1 (v2), srv2 (api).
const E2E: &[E2eCase] = &[
    ("reviews", "/", &[("end-user", "jason")], Some("srv1")),
    // The next request on the connection routes elsewhere.
    ("reviews", "/api/x", &[], Some("srv2")),
    ("reviews", "/x", &[], Some("srv0")),
    ("reviews", "/x", &[("End-User", "jasonx")], Some("srv0")),
    ("reviews", "/health?probe=1", &[], Some("srv2")),
    ("reviews", "/health?probe=2", &[], Some("srv0")),
    ("REVIEWS:80", "/api", &[], Some("srv2")),
    ("other", "/only/a", &[], Some("srv1")),
    // No route in the virtual host.
    ("other", "/nothing", &[], None),
    // Host matching no virtual host.
    ("nope.example", "/", &[], None),
    ("reviews", "/x", &[("end-user", "jason")], Some("srv1")),
];

/// A client pod with one kept-alive connection to `addr` (`http-client`).
struct HttpClient {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl HttpClient {
    fn start(node: &bpf_tests::Node, pod: &bpf_tests::Pod, addr: SocketAddr) -> HttpClient {
        let mut child = node
            .pod_command(pod)
            .arg("http-client")
            .arg(addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        HttpClient {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    /// Sends one request; (status, body, getpeername of the connection).
    fn get(&mut self, host: &str, target: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
        let mut req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        writeln!(self.stdin, "{}", serde_json::to_string(&req).unwrap()).unwrap();
        self.answer().expect("the client pod exited")
    }

    /// The next answer, or None when the client exited (connect refused).
    fn answer(&mut self) -> Option<(u16, String, String)> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        if line.is_empty() {
            return None;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("client output {line:?}: {e}"));
        Some((
            v["status"].as_u64().unwrap_or(0) as u16,
            v["body"].as_str().unwrap_or("").to_string(),
            v["peer"].as_str().unwrap_or("").to_string(),
        ))
    }
}

impl Drop for HttpClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node, client pod and three HTTP server pods (srv0..2 on :8080).
fn http_node() -> (bpf_tests::Node, bpf_tests::Pod, [SocketAddr; 3]) {
    bpf_tests::require_root();
    let mut node = bpf_tests::Node::new("kmt", std::path::Path::new(common::TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let mut eps = Vec::new();
    for i in 0..3 {
        let pod = node.add_pod(&format!("srv{i}")).unwrap();
        node.serve_http(&pod, &pod.name.clone(), &[pod.addr4(8080)])
            .unwrap();
        eps.push(pod.addr4(8080));
    }
    (node, client, eps.try_into().unwrap())
}

/// Runs the request table on one kept-alive connection to `addr`, then
/// `n` requests to the 90/10 canary route: returns the v1 (srv0) count.
fn run_table(client: &mut HttpClient, who: &str, n: usize) -> usize {
    for (host, target, headers, want) in E2E {
        let (status, body, _) = client.get(host, target, headers);
        match want {
            Some(srv) => assert_eq!(
                (status, body.as_str()),
                (200, *srv),
                "{who}: {host} {target} {headers:?}"
            ),
            None => assert_eq!(status, 404, "{who}: {host} {target} {headers:?}: {body}"),
        }
    }
    let mut v1 = 0;
    for _ in 0..n {
        let (status, body, _) = client.get("reviews", "/canary/x", &[]);
        assert_eq!(status, 200, "{who}: canary");
        match body.as_str() {
            "srv0" => v1 += 1,
            "srv1" => {}
            other => panic!("{who}: canary answered by {other:?}"),
        }
    }
    v1
}

/// Pearson chi-square of a 90/10 split over `n` with `v1` on the 90 side;
/// 10.83 is the 0.1 % critical value for one degree of freedom.
fn assert_90_10(who: &str, v1: usize, n: usize) {
    let (e1, e2) = (n as f64 * 0.9, n as f64 * 0.1);
    let (o1, o2) = (v1 as f64, (n - v1) as f64);
    let chi2 = (o1 - e1).powi(2) / e1 + (o2 - e2).powi(2) / e2;
    assert!(
        chi2 < 10.83,
        "{who}: {v1}/{n} on v1 is not 90/10 (chi2 {chi2:.2})"
    );
}

const VIP_E2E: &str = "10.96.0.21:80";
const CANARY_N: usize = 400;

#[test]
fn daemon_routes_each_request_through_the_connector_like_envoy_would() {
    let (node, client, eps) = http_node();
    let vip: SocketAddr = VIP_E2E.parse().unwrap();
    let bpffs = Bpffs::new("l7");
    let cfg = bpffs.write_config(&http_bootstrap(vip, eps));
    let netns = node.netns_path();
    let daemon = Daemon::start(
        cfg,
        &client,
        &node.cgroup,
        &bpffs.0,
        &[
            "--l7-connector-addr",
            CONNECTOR,
            "--l7-connector-netns",
            netns.to_str().unwrap(),
        ],
    );
    let mut c = HttpClient::start(&node, &client, vip);
    // getpeername() shows the VIP, not the connector.
    let (status, _, peer) = c.get("reviews", "/x", &[]);
    assert_eq!((status, peer.as_str()), (200, VIP_E2E));
    let v1 = run_table(&mut c, "kmesh", CANARY_N);
    assert_90_10("kmesh", v1, CANARY_N);
    // A head longer than the kernel parses (1 KiB): the kernel falls back,
    // the connector decides on strings — the same route.
    let pad = "p".repeat(2000);
    let (status, body, _) = c.get("reviews", "/x", &[("x-pad", &pad), ("end-user", "jason")]);
    assert_eq!((status, body.as_str()), (200, "srv1"));
    // A second connection works as well; closing the client closes it.
    drop(c);
    let mut c = HttpClient::start(&node, &client, vip);
    assert_eq!(c.get("reviews", "/api", &[]).1, "srv2");
    // Every request head but the long one was decided in the kernel and
    // the connector used those decisions (404s included).
    let (code, body) = bpf_tests::http_get(daemon.admin, "/debug/l7").unwrap();
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    let requests = (2 + E2E.len() + CANARY_N) as u64;
    let no_route = E2E.iter().filter(|c| c.3.is_none()).count() as u64;
    assert_eq!(st["l7_steered"], 2, "{st}");
    assert_eq!(st["l7_decided"], requests - no_route, "{st}");
    assert_eq!(st["l7_no_route"], no_route, "{st}");
    assert_eq!(st["l7_fallback"], 1, "{st}");
    assert_eq!(st["connector_kernel_decided"], requests - no_route, "{st}");
    assert_eq!(st["connector_user_decided"], 1, "{st}");
    assert_eq!(st["connector_no_route"], no_route, "{st}");
}

fn envoy_path() -> std::path::PathBuf {
    let p = std::env::var_os("KMESH_TEST_ENVOY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/envoy")
        });
    assert!(
        p.exists(),
        "Envoy not found at {} (hint: `cargo xtask test` installs it; or set KMESH_TEST_ENVOY)",
        p.display()
    );
    p
}

#[test]
fn envoy_routes_the_same_table_to_the_same_clusters() {
    let (node, client, eps) = http_node();
    // Envoy's copy of the bootstrap: the listener on a real address of the
    // node namespace (pods reach it; the kernel programs leave it alone).
    let listen: SocketAddr = "10.244.0.1:18080".parse().unwrap();
    let bpffs = Bpffs::new("l7envoy");
    let cfg = bpffs.write_config(&http_bootstrap(listen, eps));
    let mut envoy = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.netns_path().display()))
        .arg(envoy_path())
        .arg("-c")
        .arg(cfg)
        .args([
            "--concurrency",
            "1",
            "-l",
            "warning",
            "--disable-hot-restart",
        ])
        .arg("--base-id")
        .arg(((std::process::id() % 10_000) * 10 + 7).to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting envoy");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let envoy = Kill(&mut envoy);
    // Wait for the listener.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut c = loop {
        let mut c = HttpClient::start(&node, &client, listen);
        let _ = writeln!(
            c.stdin,
            "{}",
            serde_json::to_string("GET /x HTTP/1.1\r\nHost: reviews\r\n\r\n").unwrap()
        );
        if c.answer().is_some_and(|a| a.0 == 200) {
            break c;
        }
        assert!(envoy.0.try_wait().unwrap().is_none(), "envoy exited");
        assert!(
            std::time::Instant::now() < deadline,
            "envoy not listening in 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let v1 = run_table(&mut c, "envoy", CANARY_N);
    assert_90_10("envoy", v1, CANARY_N);
}

#[test]
fn routes_from_xds_are_installed_and_replaced_per_request() {
    use kmesh_daemon::xds::fixture::AdsFixture;
    use kmesh_daemon::xds::store::{CLUSTER_TYPE, LISTENER_TYPE};
    use kmesh_daemon::xds::to_any;
    let (node, client, eps) = http_node();
    let vip: SocketAddr = VIP_E2E.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let f = rt.block_on(AdsFixture::start()).unwrap();
    // The same bootstrap, served over ADS (listener with an inline route
    // configuration, STATIC clusters).
    let serve = |yaml: &str| {
        let res = xds_adapter::parse_static_config(yaml).unwrap();
        f.set(
            CLUSTER_TYPE,
            res.clusters
                .iter()
                .map(|c| (c.name.clone(), to_any(c)))
                .collect(),
        );
        f.set(
            LISTENER_TYPE,
            res.listeners
                .iter()
                .map(|l| (l.name.clone(), to_any(l)))
                .collect(),
        );
    };
    serve(&http_bootstrap(vip, eps));
    let bpffs = Bpffs::new("l7xds");
    let admin: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let netns = node.netns_path();
    let daemon = std::process::Command::new(common::workspace_bin("kmesh-daemon"))
        .args(["--mode", "kernel-native", "--xds-address"])
        .arg(f.uri())
        .arg("--enroll-netns")
        .arg(&client.netns_path)
        .arg("--cgroup2-path")
        .arg(&node.cgroup)
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", common::free_port()))
        .args(["--l7-connector-addr", CONNECTOR, "--l7-connector-netns"])
        .arg(&netns)
        .env_remove("XDS_ADDRESS")
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = Kill(daemon);
    // Routed once the config is in (a new connection per attempt).
    let api_answer = |node: &bpf_tests::Node, daemon: &mut Kill| {
        assert!(daemon.0.try_wait().unwrap().is_none(), "daemon exited");
        let mut c = HttpClient::start(node, &client, vip);
        let _ = writeln!(
            c.stdin,
            "{}",
            serde_json::to_string("GET /api HTTP/1.1\r\nHost: reviews\r\n\r\n").unwrap()
        );
        c.answer().map(|a| a.1).unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while api_answer(&node, &mut daemon) != "srv2" {
        assert!(
            std::time::Instant::now() < deadline,
            "L7 route from xDS not installed in 30 s: {:?} {:?}",
            bpf_tests::http_get(admin, "/debug/l7"),
            bpf_tests::http_get(admin, "/debug/config_dump/kernel-native")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut c = HttpClient::start(&node, &client, vip);
    let v1 = run_table(&mut c, "kmesh over xDS", 100);
    assert!(v1 > 50, "canary: {v1}/100 on v1");
    // A new route configuration: /api now goes to v2 (srv1).
    serve(&http_bootstrap(vip, eps).replace(
        "route: { cluster: api }\n              - match: { prefix: \"/canary\" }",
        "route: { cluster: v2 }\n              - match: { prefix: \"/canary\" }",
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while api_answer(&node, &mut daemon) != "srv1" {
        assert!(
            std::time::Instant::now() < deadline,
            "route update not applied in 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The connection opened before the update keeps working.
    assert_eq!(c.get("reviews", "/x", &[]).1, "srv0");
}
