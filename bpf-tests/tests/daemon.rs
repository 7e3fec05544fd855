//! The `kmesh-daemon` binary end to end: config file in, kernel routes,
//! admin API answers, SIGTERM detaches and unpins (needs root).

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bpf_tests::http_get;
use common::{bootstrap, workspace_bin, ClusterSpec, ListenerSpec, TESTPOD};

/// A private bpffs mount (`.0`) and a config file path (`.1`), both
/// removed on drop.
struct Bpffs(PathBuf, PathBuf);

impl Bpffs {
    fn new(tag: &str) -> Bpffs {
        let base = std::env::temp_dir().join(format!("kmt-{}-{tag}", std::process::id()));
        let dir = base.with_extension("bpffs");
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mount bpffs at {}", dir.display());
        Bpffs(dir, base.with_extension("yaml"))
    }

    fn write_config(&self, text: &str) -> &Path {
        std::fs::write(&self.1, text).unwrap();
        &self.1
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
        let _ = std::fs::remove_file(&self.1);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn daemon_routes_serves_admin_and_detaches_on_sigterm() {
    bpf_tests::require_root();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut node = bpf_tests::Node::new("kmt", Path::new(TESTPOD)).unwrap();
    let client = node.add_pod("client").unwrap();
    let srv = node.add_pod("srv0").unwrap();
    node.serve(&srv, "srv0", &[srv.addr4(8080)]).unwrap();
    node.serve_on_node("node", &[vip]).unwrap();
    let bpffs = Bpffs::new("e2e");
    let cfg = bpffs.write_config(&bootstrap(
        &[ListenerSpec {
            name: "web",
            vip,
            clusters: vec![("web", 1)],
        }],
        &[ClusterSpec {
            name: "web",
            lb: "ROUND_ROBIN",
            endpoints: vec![(srv.addr4(8080), 1)],
        }],
    ));
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut daemon = Command::new(workspace_bin("kmesh-daemon"))
        .arg("--config")
        .arg(cfg)
        .arg("--enroll-netns")
        .arg(&client.netns_path)
        .arg("--cgroup2-path")
        .arg(&node.cgroup)
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/debug/ready").map(|r| r.0) != Some(200) {
        assert!(daemon.try_wait().unwrap().is_none(), "daemon exited early");
        assert!(Instant::now() < deadline, "daemon not ready in 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    let r = node.connect(&client, vip, 10).unwrap();
    assert_eq!((r.count("srv0"), r.errors), (10, 0), "{r:?}");
    for m in kmesh_daemon::dataplane::MAPS {
        assert!(bpffs.0.join("kmesh").join(m).exists(), "map {m} not pinned");
    }
    let (code, body) = http_get(admin, "/debug/config_dump/bpf/kernel-native").unwrap();
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["services"][0]["vip"], "10.96.0.10:80", "{body}");
    assert_eq!(
        dump["services"][0]["slots"][0],
        srv.addr4(8080).to_string(),
        "{body}"
    );
    assert_eq!(http_get(admin, "/version").unwrap().0, 200);

    // SIGTERM: detach, unpin, exit 0.
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(!bpffs.0.join("kmesh").exists(), "pins left behind");
    let r = node.connect(&client, vip, 3).unwrap();
    assert_eq!(
        r.count("node"),
        3,
        "programs still attached after SIGTERM: {r:?}"
    );
}

#[test]
fn bad_config_is_rejected_with_resource_and_field_and_nothing_is_loaded() {
    bpf_tests::require_root();
    let bpffs = Bpffs::new("bad");
    let cfg = bpffs.write_config(
        &bootstrap(
            &[ListenerSpec {
                name: "web",
                vip: "10.96.0.10:80".parse().unwrap(),
                clusters: vec![("web", 1)],
            }],
            &[ClusterSpec {
                name: "web",
                lb: "ROUND_ROBIN",
                endpoints: vec![("10.244.0.2:8080".parse().unwrap(), 1)],
            }],
        )
        .replace("port_value: 8080", "port_value: 70000"),
    );
    let out = Command::new(workspace_bin("kmesh-daemon"))
        .arg("--config")
        .arg(cfg)
        .arg("--bpf-fs-path")
        .arg(&bpffs.0)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster \"web\""), "{err}");
    assert!(err.contains("port_value"), "{err}");
    assert!(err.contains("70000"), "{err}");
    assert!(
        !bpffs.0.join("kmesh").exists(),
        "a rejected config must load nothing"
    );
}
