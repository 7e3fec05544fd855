//! The authorization programs under BPF_PROG_TEST_RUN: verdicts on
//! hand-built packets (no namespaces needed) and the kernel's time per
//! packet for the shortest and the longest chain (needs root).

use std::net::Ipv4Addr;

use kmesh_daemon::{
    authz::{AccessLog, Authz},
    dataplane::{Dataplane, DataplaneOptions},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Ethernet + IPv4 + TCP (20-byte headers, checksums not checked by XDP).
fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    p
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn config(policies: &str) -> String {
    format!(
        "workloads:
- {{name: a, namespace: front, serviceAccount: web, workloadIps: [10.1.0.1]}}
- {{name: b, namespace: front, serviceAccount: admin, workloadIps: [10.1.0.2]}}
- {{name: d, namespace: back, serviceAccount: db, workloadIps: [10.1.0.9]}}
policies:
{policies}"
    )
}

#[test]
fn verdicts_and_cost_per_packet() {
    bpf_tests::require_root();
    let mut dp = Dataplane::load(&DataplaneOptions::default()).expect("load");
    let mut authz = Authz::load(dp.ebpf_mut()).expect("load authz");
    let a = Ipv4Addr::new(10, 1, 0, 1);
    let b = Ipv4Addr::new(10, 1, 0, 2);
    let d = Ipv4Addr::new(10, 1, 0, 9);
    let run = |authz: &Authz, dp: &mut Dataplane, pkt: &[u8], n| {
        authz.test_run(dp.ebpf_mut(), pkt, n).expect("test run")
    };

    // One ALLOW slot: a may connect, b may not; non-SYN packets pass.
    let cfg = xds_adapter::workload::compile_local_config(&config(
        "- {name: p, namespace: back, scope: Namespace, action: Allow, rules: [[[{principals: [cluster.local/ns/front/sa/web]}]]]}\n",
    ))
    .unwrap();
    authz.write(&cfg.authz).unwrap();
    let mut log = AccessLog::take(dp.ebpf_mut(), cfg.authz.policy_names.clone()).unwrap();
    assert_eq!(run(&authz, &mut dp, &tcp4(a, d, 80, SYN), 1).0, XDP_PASS);
    assert_eq!(run(&authz, &mut dp, &tcp4(b, d, 80, SYN), 1).0, XDP_DROP);
    let events: Vec<String> = log.drain().iter().map(ToString::to_string).collect();
    assert_eq!(
        events,
        [
            "authz allow src=10.1.0.1 dst=10.1.0.9:80 reason=policy policy=back/p",
            "authz deny src=10.1.0.2 dst=10.1.0.9:80 reason=no_allow_match",
        ]
    );
    assert_eq!(
        run(&authz, &mut dp, &tcp4(b, d, 80, SYN | ACK), 1).0,
        XDP_PASS
    );
    assert_eq!(run(&authz, &mut dp, &tcp4(b, d, 80, ACK), 1).0, XDP_PASS);
    // Not a workload with a chain: untouched.
    assert_eq!(run(&authz, &mut dp, &tcp4(b, a, 80, SYN), 1).0, XDP_PASS);
    // Truncated packet: passes (nothing to decide on).
    assert_eq!(
        run(&authz, &mut dp, &tcp4(b, d, 80, SYN)[..40], 1).0,
        XDP_PASS
    );
    assert!(log.drain().is_empty(), "only evaluated SYNs are logged");

    const N: u32 = 100_000;
    let short = run(&authz, &mut dp, &tcp4(a, d, 80, SYN), N).1;
    let other = run(&authz, &mut dp, &tcp4(b, a, 80, SYN), N).1;

    // The longest chain: MAX_CHAIN_LEN slots, the last one decides.
    let max = kmesh_abi::authz::MAX_CHAIN_LEN as usize;
    let mut m: Vec<String> = (0..max - 1)
        .map(|i| format!("{{destinationPorts: [{}]}}", 20000 + i))
        .collect();
    m.push("{principals: [cluster.local/ns/front/sa/web]}".into());
    let cfg = xds_adapter::workload::compile_local_config(&config(&format!(
        "- {{name: p, namespace: back, scope: Namespace, action: Allow, rules: [[[{}]]]}}\n",
        m.join(", ")
    )))
    .unwrap();
    authz.write(&cfg.authz).unwrap();
    assert_eq!(run(&authz, &mut dp, &tcp4(a, d, 80, SYN), 1).0, XDP_PASS);
    assert_eq!(run(&authz, &mut dp, &tcp4(b, d, 80, SYN), 1).0, XDP_DROP);
    let long = run(&authz, &mut dp, &tcp4(a, d, 80, SYN), N).1;
    let stats = authz.stats().unwrap();
    assert_eq!(stats["denied_error"], 0, "{stats:?}");
    eprintln!(
        "XDP authz per SYN (BPF_PROG_TEST_RUN, mean of {N}): no chain {} ns, 1-slot chain {} ns, {max}-slot chain {} ns",
        other.as_nanos(),
        short.as_nanos(),
        long.as_nanos()
    );
}
