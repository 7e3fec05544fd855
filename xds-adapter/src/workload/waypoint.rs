//! Waypoints → the kernel's destination → waypoint table.
//!
//! A service's waypoint applies to each VIP:port of the service; a
//! workload's to each of its addresses on any port (key port 0). The
//! waypoint address is picked per address family: a VIP or workload
//! address is steered only to a waypoint address of its own family (a
//! socket cannot change family at connect). A waypoint named by hostname
//! resolves to that service's VIPs on the waypoint port, which must be one
//! of the service's ports so the kernel load balances it over the
//! waypoint's endpoints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use super::{LocalConfig, Waypoint, WaypointDestination};
use crate::{ConfigError, ConfigErrors};

/// Destination → waypoint address. A workload destination has port 0
/// (any port).
pub type WaypointTable = BTreeMap<SocketAddr, SocketAddr>;

/// Resolves every `waypoint` of the config.
pub fn waypoint_table(cfg: &LocalConfig) -> Result<WaypointTable, ConfigErrors> {
    let mut errors = Vec::new();
    let mut out = WaypointTable::new();
    let mut put = |res: &str, wp: &Waypoint, dst: SocketAddr, errors: &mut Vec<ConfigError>| {
        match resolve(cfg, wp, dst.ip()) {
            Ok(Some(addr)) => {
                out.insert(dst, addr);
            }
            Ok(None) => errors.push(
                ConfigError::new(
                    res,
                    "waypoint.destination",
                    format!(
                        "the waypoint has no {} address for {}",
                        if dst.is_ipv4() { "IPv4" } else { "IPv6" },
                        dst.ip()
                    ),
                )
                .with_hint("a connection keeps its address family: give the waypoint an address of each family its destinations use"),
            ),
            Err(e) => errors.push(ConfigError::new(res, "waypoint.destination", e)),
        }
    };
    for s in &cfg.services {
        let Some(wp) = &s.waypoint else { continue };
        let res = format!("service \"{}/{}\"", s.namespace, s.name);
        for vip in &s.vips {
            for port in s.ports.keys() {
                put(&res, wp, SocketAddr::new(*vip, *port), &mut errors);
            }
        }
    }
    for w in &cfg.workloads {
        let Some(wp) = &w.waypoint else { continue };
        let res = format!("workload \"{}/{}\"", w.namespace, w.name);
        for ip in &w.ips {
            put(&res, wp, SocketAddr::new(*ip, 0), &mut errors);
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The waypoint address for a destination of `ip`'s family; `Ok(None)`
/// when the waypoint has none of that family.
fn resolve(cfg: &LocalConfig, wp: &Waypoint, ip: IpAddr) -> Result<Option<SocketAddr>, String> {
    match &wp.destination {
        WaypointDestination::Address(a) => {
            Ok((a.is_ipv4() == ip.is_ipv4()).then(|| SocketAddr::new(*a, wp.port)))
        }
        WaypointDestination::Hostname(key) => {
            let svc = cfg
                .services
                .iter()
                .find(|s| s.key() == *key)
                .ok_or_else(|| format!("no service with namespace/hostname {key}"))?;
            if !svc.ports.contains_key(&wp.port) {
                return Err(format!(
                    "waypoint service {key} has no port {} (its ports: {:?})",
                    wp.port,
                    svc.ports.keys().collect::<Vec<_>>()
                ));
            }
            if svc.waypoint.is_some() {
                return Err(format!(
                    "waypoint service {key} has a waypoint itself; a waypoint's traffic is never steered again"
                ));
            }
            Ok(svc
                .vips
                .iter()
                .find(|v| v.is_ipv4() == ip.is_ipv4())
                .map(|v| SocketAddr::new(*v, wp.port)))
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::workload::compile_local_config;

    const BASE: &str = r#"
workloads:
- name: web-0
  namespace: default
  workloadIps: ["10.244.0.3", "fd00::3"]
  services: {"default/web.default.svc.cluster.local": {80: 8080}}
  WAYPOINT_W
- name: wp-0
  namespace: default
  workloadIps: ["10.244.0.9"]
  services: {"default/wp.default.svc.cluster.local": {}}
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8080, 81: 8081}
  WAYPOINT_S
- name: wp
  namespace: default
  hostname: wp.default.svc.cluster.local
  vips: ["/10.96.0.99"]
  ports: {15088: 15088}
"#;

    fn cfg(w: &str, s: &str) -> String {
        BASE.replace("WAYPOINT_W", w).replace("WAYPOINT_S", s)
    }

    #[test]
    fn service_waypoint_by_address_covers_every_vip_port() {
        let de = compile_local_config(&cfg(
            "",
            r#"waypoint: {destination: "/10.244.0.9", hboneMtlsPort: 15088}"#,
        ))
        .unwrap();
        let want: Vec<(String, String)> = de
            .waypoints
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            want,
            [
                ("10.96.0.10:80".into(), "10.244.0.9:15088".into()),
                ("10.96.0.10:81".into(), "10.244.0.9:15088".into()),
            ]
        );
        assert!(de.config.warnings.iter().all(|w| !w.contains("waypoint")));
    }

    #[test]
    fn workload_waypoint_by_hostname_is_the_waypoint_service_vip() {
        let de = compile_local_config(&cfg(
            r#"waypoint: {destination: {hostname: {namespace: default, hostname: wp.default.svc.cluster.local}}, hboneMtlsPort: 15088}"#,
            "",
        ));
        // The workload has an IPv6 address and the waypoint service no IPv6 VIP.
        let e = de.unwrap_err().to_string();
        assert!(
            e.contains("workload \"default/web-0\"") && e.contains("no IPv6 address"),
            "{e}"
        );
        let text = cfg(
            r#"waypoint: {destination: {hostname: {namespace: default, hostname: wp.default.svc.cluster.local}}, hboneMtlsPort: 15088}"#,
            "",
        )
        .replace(r#"["10.244.0.3", "fd00::3"]"#, r#"["10.244.0.3"]"#);
        let de = compile_local_config(&text).unwrap();
        assert_eq!(
            de.waypoints.get(&"10.244.0.3:0".parse().unwrap()),
            Some(&"10.96.0.99:15088".parse().unwrap())
        );
    }

    #[test]
    fn bad_waypoints_name_resource_and_field() {
        for (s, field, what) in [
            (
                r#"waypoint: {destination: "/10.244.0.9"}"#,
                "waypoint.hboneMtlsPort",
                "missing",
            ),
            (
                r#"waypoint: {destination: "nope", hboneMtlsPort: 1}"#,
                "waypoint.destination",
                "not \"network/ip\"",
            ),
            (
                r#"waypoint: {destination: {hostname: {namespace: default, hostname: x}}, hboneMtlsPort: 15088}"#,
                "waypoint.destination",
                "no service",
            ),
            (
                r#"waypoint: {destination: {hostname: {namespace: default, hostname: wp.default.svc.cluster.local}}, hboneMtlsPort: 15008}"#,
                "waypoint.destination",
                "has no port 15008",
            ),
        ] {
            let e = compile_local_config(&cfg("", s)).unwrap_err().to_string();
            assert!(
                e.contains("service \"default/web\"") && e.contains(field) && e.contains(what),
                "{s}: {e}"
            );
        }
    }
}
