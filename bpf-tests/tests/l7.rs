//! Kernel tests of HTTP/1.1 routing decided by the sk_msg program: a
//! client pod dials an L7 service VIP, connect4 steers it to a listener in
//! the node namespace (standing in for the connector), and every request
//! head written on the kept-alive connection leaves a decision in
//! `KM_L7_CONN`, which must equal what the string matcher of the same
//! table (Envoy's semantics) decides.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Stdio;

use common::mesh;
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
