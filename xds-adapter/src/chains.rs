//! Listeners with several filter chains (`filter_chain_match`), decided at
//! connect time.
//!
//! Istiod's outbound listeners carry several filter chains: `0.0.0.0_<port>`
//! has one chain per service VIP (`prefix_ranges: [VIP/32]`) and a default
//! chain to the `PassthroughCluster` (ORIGINAL_DST); ports shared by HTTP
//! and TCP services split on `application_protocols` / `transport_protocol`;
//! TLS services split on `server_names`. Envoy picks the chain from the
//! connection's destination, then from the first bytes (TLS SNI, ALPN,
//! HTTP inspection). The kernel only has the destination, in `connect()`.
//!
//! For each concrete destination a listener names (a `/32` or `/128` prefix
//! range, an IP-literal virtual host domain, or the listener's own IP), the
//! chains Envoy could pick are narrowed exactly as Envoy does on the
//! destination (`destination_port`, then the longest `prefix_ranges`
//! containing the IP). What is left is decided at connect time only when
//! every chain that may still be picked (and the default chain, when each
//! of them has a condition on the first bytes or on the source) routes the
//! same way. Otherwise the destination is not installed: the kernel leaves
//! those connects alone, and a warning names the chains and why. A
//! connection is never sent to a cluster its first bytes might not have
//! chosen.
//!
//! Cost: O(destinations × chains) per listener, once per compile.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::listener::v3 as pb_listener;

use crate::error::{index, join, Diag};

/// A chain's `filter_chain_match`, as far as the kernel can evaluate it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ChainMatch {
    pub dest_port: Option<u16>,
    /// (network, prefix length), canonical (IPv4-mapped → IPv4); empty =
    /// any destination IP.
    pub prefixes: Vec<(IpAddr, u8)>,
    /// Conditions on what the kernel does not see at connect time (the
    /// first bytes, the source), e.g. `server_names ["a.example.com"]`.
    pub opaque: Vec<String>,
}

impl ChainMatch {
    /// The host routes (`/32`, `/128`): the destinations this chain names.
    pub fn hosts(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.prefixes
            .iter()
            .filter(|(ip, len)| u32::from(*len) == max_len(*ip))
            .map(|(ip, _)| *ip)
    }

    /// The longest prefix containing `ip`: `Some(-1)` for "any IP" (no
    /// prefix ranges), `None` when no range contains it.
    fn best_prefix(&self, ip: IpAddr) -> Option<i32> {
        if self.prefixes.is_empty() {
            return Some(-1);
        }
        self.prefixes
            .iter()
            .filter(|(net, len)| contains(*net, *len, ip))
            .map(|(_, len)| i32::from(*len))
            .max()
    }
}

fn max_len(ip: IpAddr) -> u32 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & m == u32::from(i) & m
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & m == u128::from(i) & m
        }
        _ => false,
    }
}

/// Converts a chain's `filter_chain_match` (errors are what Envoy rejects
/// too: a prefix that is not an IP, a length beyond the address, a port
/// beyond 65535).
pub(crate) fn convert_match(
    m: Option<&pb_listener::FilterChainMatch>,
    d: &mut Diag,
    res: &str,
    path: &str,
) -> ChainMatch {
    let mut out = ChainMatch::default();
    let Some(m) = m else {
        return out;
    };
    let mpath = join(path, "filter_chain_match");
    if let Some(p) = &m.destination_port {
        match u16::try_from(p.value) {
            Ok(p) if p != 0 => out.dest_port = Some(p),
            _ => d.error(
                res,
                &join(&mpath, "destination_port"),
                format!("{} is out of range (1-65535)", p.value),
            ),
        }
    }
    for (i, r) in m.prefix_ranges.iter().enumerate() {
        let rpath = index(&join(&mpath, "prefix_ranges"), i);
        let Ok(ip) = r.address_prefix.parse::<IpAddr>() else {
            d.error(
                res,
                &join(&rpath, "address_prefix"),
                format!("{:?} is not an IP address", r.address_prefix),
            );
            continue;
        };
        // Envoy: an absent prefix_len is 0 (the whole address family).
        let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
        if len > max_len(ip) {
            d.error(
                res,
                &join(&rpath, "prefix_len"),
                format!("{len} is longer than the address ({} bits)", max_len(ip)),
            );
            continue;
        }
        // IPv4-mapped IPv6 ranges are the IPv4 ranges (as the kernel keys them).
        let (ip, len) = match ip {
            IpAddr::V6(v6) if len >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), len - 96),
                None => (ip, len),
            },
            _ => (ip, len),
        };
        out.prefixes.push((ip, len as u8));
    }
    let list = |v: &[String]| {
        let shown: Vec<String> = v.iter().take(3).map(|s| format!("{s:?}")).collect();
        let more = if v.len() > 3 { ", …" } else { "" };
        format!("[{}{more}]", shown.join(", "))
    };
    if !m.server_names.is_empty() {
        out.opaque
            .push(format!("server_names {}", list(&m.server_names)));
    }
    if !m.transport_protocol.is_empty() {
        out.opaque
            .push(format!("transport_protocol {:?}", m.transport_protocol));
    }
    if !m.application_protocols.is_empty() {
        out.opaque.push(format!(
            "application_protocols {}",
            list(&m.application_protocols)
        ));
    }
    if !m.direct_source_prefix_ranges.is_empty() {
        out.opaque.push("direct_source_prefix_ranges".into());
    }
    if m.source_type != 0 {
        out.opaque.push("source_type".into());
    }
    if !m.source_prefix_ranges.is_empty() {
        out.opaque.push("source_prefix_ranges".into());
    }
    if !m.source_ports.is_empty() {
        out.opaque.push("source_ports".into());
    }
    if !m.address_suffix.is_empty() || m.suffix_len.is_some() {
        out.opaque.push("address_suffix".into());
    }
    out
}

/// An ORIGINAL_DST cluster (Istio's `PassthroughCluster`): Envoy connects
/// to the connection's original destination, which is what the kernel does
/// with a connect it does not rewrite.
pub(crate) fn is_original_dst(c: &envoy_types::pb::envoy::config::cluster::v3::Cluster) -> bool {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    matches!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::OriginalDst as i32)
}

/// Which chains Envoy may pick for a connection to `dest`, from the
/// destination alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pick {
    /// Exactly these chains (indexes), and the default chain too when
    /// `or_default` (every one of them has a condition that may fail).
    Chains {
        chains: Vec<usize>,
        or_default: bool,
    },
    /// No chain matches the destination: the default chain.
    Default,
}

/// Envoy's filter chain selection, narrowed on the destination port and
/// IP (the first two criteria, which the kernel sees).
pub(crate) fn pick(matches: &[ChainMatch], dest: SocketAddr) -> Pick {
    let port_exact: Vec<usize> = (0..matches.len())
        .filter(|&i| matches[i].dest_port == Some(dest.port()))
        .collect();
    let by_port = if port_exact.is_empty() {
        (0..matches.len())
            .filter(|&i| matches[i].dest_port.is_none())
            .collect()
    } else {
        port_exact
    };
    let ip = dest.ip();
    let best = by_port
        .iter()
        .filter_map(|&i| matches[i].best_prefix(ip))
        .max();
    let Some(best) = best else {
        return Pick::Default;
    };
    let chains: Vec<usize> = by_port
        .into_iter()
        .filter(|&i| matches[i].best_prefix(ip) == Some(best))
        .collect();
    // A chain without conditions on the bytes or the source is the
    // fallback at every later criterion, so some chain always matches.
    let or_default = chains.iter().all(|&i| !matches[i].opaque.is_empty());
    Pick::Chains { chains, or_default }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(port: Option<u16>, prefixes: &[(&str, u8)], opaque: &[&str]) -> ChainMatch {
        ChainMatch {
            dest_port: port,
            prefixes: prefixes
                .iter()
                .map(|(ip, l)| (ip.parse().unwrap(), *l))
                .collect(),
            opaque: opaque.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn narrows_like_envoy() {
        let chains = [
            m(None, &[("10.96.0.10", 32)], &[]),
            m(None, &[("10.96.0.0", 16)], &[]),
            m(None, &[], &["transport_protocol \"tls\""]),
            m(Some(443), &[("10.96.0.10", 32)], &["server_names"]),
        ];
        // Longest prefix wins.
        assert_eq!(
            pick(&chains, sa("10.96.0.10:80")),
            Pick::Chains {
                chains: vec![0],
                or_default: false
            }
        );
        assert_eq!(
            pick(&chains, sa("10.96.1.1:80")),
            Pick::Chains {
                chains: vec![1],
                or_default: false
            }
        );
        // Only the byte-conditioned catch-all: it or the default.
        assert_eq!(
            pick(&chains, sa("10.1.1.1:80")),
            Pick::Chains {
                chains: vec![2],
                or_default: true
            }
        );
        // An exact destination_port beats every chain without one.
        assert_eq!(
            pick(&chains, sa("10.96.0.10:443")),
            Pick::Chains {
                chains: vec![3],
                or_default: true
            }
        );
        assert_eq!(pick(&chains[..2], sa("10.1.1.1:80")), Pick::Default);
    }

    #[test]
    fn prefixes_and_hosts() {
        let mut d = Diag::default();
        let pm = pb_listener::FilterChainMatch {
            prefix_ranges: vec![
                envoy_types::pb::envoy::config::core::v3::CidrRange {
                    address_prefix: "::ffff:10.96.0.10".into(),
                    prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 128 }),
                },
                envoy_types::pb::envoy::config::core::v3::CidrRange {
                    address_prefix: "10.0.0.0".into(),
                    prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 8 }),
                },
                envoy_types::pb::envoy::config::core::v3::CidrRange {
                    address_prefix: "10.0.0.0".into(),
                    prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 33 }),
                },
            ],
            ..Default::default()
        };
        let c = convert_match(Some(&pm), &mut d, "l", "filter_chains[0]");
        assert_eq!(d.errors.len(), 1);
        assert!(d.errors[0].field.ends_with("prefix_ranges[2].prefix_len"));
        let hosts: Vec<IpAddr> = c.hosts().collect();
        assert_eq!(hosts, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert!(contains(
            "10.0.0.0".parse().unwrap(),
            8,
            "10.9.9.9".parse().unwrap()
        ));
        assert!(!contains(
            "10.0.0.0".parse().unwrap(),
            8,
            "11.0.0.1".parse().unwrap()
        ));
        assert!(contains(
            "::".parse().unwrap(),
            0,
            "fd00::1".parse().unwrap()
        ));
    }
}
