//! The Istio workload API (`istio.workload.Address`,
//! `istio.security.Authorization`) → the same domain types the local
//! config produces ([`Workload`], [`Service`], [`Policy`]), converted once
//! at the protobuf boundary with `TryFrom` (errors name the resource and
//! the field), and [`WorkloadApiState`], the set held from a control plane
//! with per-resource accept/reject and removal.
//!
//! Unlike a local file, the set from a control plane is eventually
//! consistent: a workload may name a service or a policy that has not
//! arrived yet. Such references are not errors; they take effect when the
//! referenced resource arrives.

use std::collections::BTreeMap;
use std::net::IpAddr;

use prost::Message;

use super::proto;
use super::{
    Action, Cidr, HealthPolicy, LbMode, LoadBalancing, LocalConfig, Locality, LocalityMode,
    LocalityScope, Match, Policy, Scope, Service, StringMatch, Waypoint, WaypointDestination,
    Workload,
};
use crate::{ConfigError, ConfigErrors};

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// A converted resource and what of it is not honoured.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked<T> {
    pub value: T,
    pub warnings: Vec<String>,
}

/// Collects the errors and warnings of one resource.
struct Report {
    resource: String,
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
}

impl Report {
    fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Report {
            resource: format!("{kind} \"{namespace}/{name}\""),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn err(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.errors
            .push(ConfigError::new(&self.resource, field, msg));
    }

    fn warn(&mut self, field: &str, msg: &str) {
        self.warnings
            .push(format!("{}: field {field}: {msg}", self.resource));
    }

    fn required(&mut self, field: &str, v: &str) {
        if v.is_empty() {
            self.err(field, "missing (required)");
        }
    }

    fn finish<T>(self, value: T) -> Result<Checked<T>, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(Checked {
                value,
                warnings: self.warnings,
            })
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

fn port_map(r: &mut Report, field: &str, ports: &[proto::Port]) -> BTreeMap<u16, u16> {
    let mut out = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match (u16::try_from(p.service_port), u16::try_from(p.target_port)) {
            (Ok(0), _) => r.err(format!("{f}.service_port"), "0 is not a port"),
            (Ok(sp), Ok(tp)) => {
                if out.insert(sp, tp).is_some() {
                    r.err(
                        format!("{f}.service_port"),
                        format!("port {sp} is listed twice"),
                    );
                }
            }
            (Err(_), _) => r.err(
                format!("{f}.service_port"),
                format!("{} is not a port (1-65535)", p.service_port),
            ),
            (_, Err(_)) => r.err(
                format!("{f}.target_port"),
                format!("{} is not a port (0-65535)", p.target_port),
            ),
        }
    }
    out
}

impl TryFrom<proto::Workload> for Checked<Workload> {
    type Error = ConfigErrors;

    fn try_from(w: proto::Workload) -> Result<Self, ConfigErrors> {
        let mut r = Report::new("workload", &w.namespace, &w.name);
        r.required("name", &w.name);
        r.required("namespace", &w.namespace);
        let mut ips = Vec::new();
        for (i, a) in w.addresses.iter().enumerate() {
            match ip_of(a) {
                Some(ip) => ips.push(ip),
                None => r.err(
                    format!("addresses[{i}]"),
                    format!("{} bytes is not an IPv4 (4) or IPv6 (16) address", a.len()),
                ),
            }
        }
        if w.addresses.is_empty() {
            r.warn(
                "addresses",
                "no address: the workload is neither a service endpoint nor a known source identity",
            );
        }
        let mut services = BTreeMap::new();
        for (key, pl) in &w.services {
            if !key.contains('/') {
                r.err(format!("services.{key}"), "key must be namespace/hostname");
            }
            let ports = port_map(&mut r, &format!("services.{key}.ports"), &pl.ports);
            services.insert(key.clone(), ports);
        }
        for (j, p) in w.authorization_policies.iter().enumerate() {
            if !p.contains('/') {
                r.err(
                    format!("authorization_policies[{j}]"),
                    format!("{p:?} is not \"namespace/name\" of a policy"),
                );
            }
        }
        let healthy = match w.status {
            0 => true,
            1 => false,
            other => {
                r.err(
                    "status",
                    format!("{other} is not HEALTHY (0) or UNHEALTHY (1)"),
                );
                true
            }
        };
        let waypoint = w.waypoint.and_then(|g| waypoint(&mut r, g));
        if w.application_tunnel
            .as_ref()
            .is_some_and(|t| t.protocol != 0)
        {
            r.warn(
                "application_tunnel",
                "the PROXY protocol tunnel is not implemented; connections arrive without a PROXY header",
            );
        }
        if w.capacity.as_ref().is_some_and(|c| c.value != 1) {
            r.warn(
                "capacity",
                "endpoint capacity (weight) is not implemented; the workload gets one slot like every endpoint",
            );
        }
        if w.network_gateway.is_some() {
            r.warn(
                "network_gateway",
                "network gateways are not implemented; the workload is reached directly",
            );
        }
        let locality = w
            .locality
            .map(|l| Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            })
            .unwrap_or_default();
        let value = Workload {
            waypoint,
            service_account: if w.service_account.is_empty() {
                "default".into()
            } else {
                w.service_account
            },
            trust_domain: if w.trust_domain.is_empty() {
                "cluster.local".into()
            } else {
                w.trust_domain
            },
            name: w.name,
            namespace: w.namespace,
            node: w.node,
            network: w.network,
            cluster_id: w.cluster_id,
            locality,
            healthy,
            ips,
            services,
            authorization_policies: w.authorization_policies,
        };
        r.finish(value)
    }
}

impl TryFrom<proto::Service> for Checked<Service> {
    type Error = ConfigErrors;

    fn try_from(s: proto::Service) -> Result<Self, ConfigErrors> {
        let mut r = Report::new("service", &s.namespace, &s.name);
        r.required("name", &s.name);
        r.required("namespace", &s.namespace);
        r.required("hostname", &s.hostname);
        let mut vips = Vec::new();
        for (i, a) in s.addresses.iter().enumerate() {
            match ip_of(&a.address) {
                Some(ip) => vips.push(ip),
                None => r.err(
                    format!("addresses[{i}].address"),
                    format!(
                        "{} bytes is not an IPv4 (4) or IPv6 (16) address",
                        a.address.len()
                    ),
                ),
            }
        }
        let ports = port_map(&mut r, "ports", &s.ports);
        let waypoint = s.waypoint.and_then(|g| waypoint(&mut r, g));
        let load_balancing = s.load_balancing.map(|lb| load_balancing(&mut r, lb));
        let value = Service {
            waypoint,
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            ports,
            lb: LbMode::Random,
            load_balancing,
        };
        r.finish(value)
    }
}

/// `waypoint` of a workload or service → the same [`Waypoint`] the local
/// config produces; `None` (with an error in `r`) when it is invalid.
fn waypoint(r: &mut Report, g: proto::GatewayAddress) -> Option<Waypoint> {
    use proto::gateway_address::Destination;
    let port = match u16::try_from(g.hbone_mtls_port) {
        Ok(0) => {
            r.err(
                "waypoint.hbone_mtls_port",
                "missing (required): the port the waypoint accepts connections on",
            );
            None
        }
        Ok(p) => Some(p),
        Err(_) => {
            r.err(
                "waypoint.hbone_mtls_port",
                format!("{} is not a port (1-65535)", g.hbone_mtls_port),
            );
            None
        }
    };
    let destination = match g.destination {
        None => {
            r.err(
                "waypoint.destination",
                "missing (required): one of address or hostname",
            );
            None
        }
        Some(Destination::Address(a)) => match ip_of(&a.address) {
            Some(ip) => Some(WaypointDestination::Address(ip)),
            None => {
                r.err(
                    "waypoint.address.address",
                    format!(
                        "{} bytes is not an IPv4 (4) or IPv6 (16) address",
                        a.address.len()
                    ),
                );
                None
            }
        },
        Some(Destination::Hostname(h)) => {
            r.required("waypoint.hostname.namespace", &h.namespace);
            r.required("waypoint.hostname.hostname", &h.hostname);
            (!h.namespace.is_empty() && !h.hostname.is_empty())
                .then(|| WaypointDestination::Hostname(format!("{}/{}", h.namespace, h.hostname)))
        }
    };
    Some(Waypoint {
        destination: destination?,
        port: port?,
    })
}

fn load_balancing(r: &mut Report, lb: proto::LoadBalancing) -> LoadBalancing {
    use proto::{health_policy, mode, scope};
    let mut routing_preference = Vec::new();
    for (i, s) in lb.routing_preference.iter().enumerate() {
        routing_preference.push(match *s {
            scope::REGION => LocalityScope::Region,
            scope::ZONE => LocalityScope::Zone,
            scope::SUBZONE => LocalityScope::Subzone,
            scope::NODE => LocalityScope::Node,
            scope::CLUSTER => LocalityScope::Cluster,
            scope::NETWORK => LocalityScope::Network,
            other => {
                r.err(
                    format!("load_balancing.routing_preference[{i}]"),
                    format!("{other} is not a scope (REGION 1 … NETWORK 6)"),
                );
                continue;
            }
        });
    }
    let mode = match lb.mode {
        mode::UNSPECIFIED => LocalityMode::Standard,
        mode::STRICT => LocalityMode::Strict,
        mode::FAILOVER => LocalityMode::Failover,
        mode::PASSTHROUGH => {
            r.err(
                "load_balancing.mode",
                "PASSTHROUGH (send to the original destination, no service load balancing) is not supported by the kernel engine",
            );
            LocalityMode::Standard
        }
        other => {
            r.err(
                "load_balancing.mode",
                format!("{other} is not UNSPECIFIED_MODE, STRICT or FAILOVER"),
            );
            LocalityMode::Standard
        }
    };
    let health_policy = match lb.health_policy {
        health_policy::ONLY_HEALTHY => HealthPolicy::OnlyHealthy,
        health_policy::ALLOW_ALL => HealthPolicy::AllowAll,
        other => {
            r.err(
                "load_balancing.health_policy",
                format!("{other} is not ONLY_HEALTHY or ALLOW_ALL"),
            );
            HealthPolicy::OnlyHealthy
        }
    };
    LoadBalancing {
        routing_preference,
        mode,
        health_policy,
    }
}

impl TryFrom<proto::Authorization> for Checked<Policy> {
    type Error = ConfigErrors;

    fn try_from(a: proto::Authorization) -> Result<Self, ConfigErrors> {
        let mut r = Report::new("policy", &a.namespace, &a.name);
        r.required("name", &a.name);
        r.required("namespace", &a.namespace);
        let scope = match a.scope {
            0 => Scope::Global,
            1 => Scope::Namespace,
            2 => Scope::WorkloadSelector,
            other => {
                r.err(
                    "scope",
                    format!("{other} is not GLOBAL, NAMESPACE or WORKLOAD_SELECTOR"),
                );
                Scope::Namespace
            }
        };
        let action = match a.action {
            0 => Action::Allow,
            1 => Action::Deny,
            other => {
                r.err("action", format!("{other} is not ALLOW or DENY"));
                Action::Allow
            }
        };
        if a.dry_run {
            r.err(
                "dry_run",
                "dry-run policies are not supported by the kernel engine",
            );
        }
        let mut rules = Vec::new();
        for (ri, rule) in a.rules.iter().enumerate() {
            let mut clauses = Vec::new();
            for (ci, clause) in rule.clauses.iter().enumerate() {
                let mut matches = Vec::new();
                for (mi, m) in clause.matches.iter().enumerate() {
                    let f = format!("rules[{ri}].clauses[{ci}].matches[{mi}]");
                    matches.push(convert_match(&mut r, &f, m));
                }
                clauses.push(matches);
            }
            rules.push(clauses);
        }
        let value = Policy {
            name: a.name,
            namespace: a.namespace,
            scope,
            action,
            rules,
        };
        r.finish(value)
    }
}

fn convert_match(r: &mut Report, f: &str, m: &proto::Match) -> Match {
    use proto::string_match::MatchType;
    let strings = |r: &mut Report, name: &str, v: &[proto::StringMatch], principal: bool| {
        let mut out = Vec::new();
        for (i, s) in v.iter().enumerate() {
            // Principals are written without `spiffe://`; accept it.
            let strip = |x: &str| {
                if principal {
                    x.strip_prefix("spiffe://").unwrap_or(x).to_string()
                } else {
                    x.to_string()
                }
            };
            match &s.match_type {
                Some(MatchType::Exact(x)) => out.push(StringMatch::Exact(strip(x))),
                Some(MatchType::Prefix(x)) => out.push(StringMatch::Prefix(strip(x))),
                Some(MatchType::Suffix(x)) => out.push(StringMatch::Suffix(x.clone())),
                Some(MatchType::Presence(_)) => out.push(StringMatch::Presence),
                None => r.err(
                    format!("{f}.{name}[{i}]"),
                    "no match_type (exact, prefix, suffix or presence)",
                ),
            }
        }
        out
    };
    let sas = |v: &[proto::ServiceAccountMatch]| {
        v.iter()
            .map(|s| (s.namespace.clone(), s.service_account.clone()))
            .collect()
    };
    let cidrs = |r: &mut Report, name: &str, v: &[proto::CidrAddress]| {
        let mut out = Vec::new();
        for (i, c) in v.iter().enumerate() {
            let field = format!("{f}.{name}[{i}]");
            let Some(ip) = ip_of(&c.address) else {
                r.err(
                    field,
                    format!(
                        "{} bytes is not an IPv4 (4) or IPv6 (16) address",
                        c.address.len()
                    ),
                );
                continue;
            };
            match u8::try_from(c.length)
                .map_err(|_| format!("prefix length {} is too long", c.length))
                .and_then(|len| Cidr::new(ip, len))
            {
                Ok(c) => out.push(c),
                Err(e) => r.err(format!("{field}.length"), e),
            }
        }
        out
    };
    let ports = |r: &mut Report, name: &str, v: &[u32]| {
        let mut out = Vec::new();
        for (i, p) in v.iter().enumerate() {
            match u16::try_from(*p) {
                Ok(p) => out.push(p),
                Err(_) => r.err(format!("{f}.{name}[{i}]"), format!("{p} is not a port")),
            }
        }
        out
    };
    Match {
        namespaces: strings(r, "namespaces", &m.namespaces, false),
        not_namespaces: strings(r, "not_namespaces", &m.not_namespaces, false),
        principals: strings(r, "principals", &m.principals, true),
        not_principals: strings(r, "not_principals", &m.not_principals, true),
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        source_ips: cidrs(r, "source_ips", &m.source_ips),
        not_source_ips: cidrs(r, "not_source_ips", &m.not_source_ips),
        destination_ips: cidrs(r, "destination_ips", &m.destination_ips),
        not_destination_ips: cidrs(r, "not_destination_ips", &m.not_destination_ips),
        destination_ports: ports(r, "destination_ports", &m.destination_ports),
        not_destination_ports: ports(r, "not_destination_ports", &m.not_destination_ports),
        l7_fields: Vec::new(),
    }
}

/// One held resource of the workload API.
#[derive(Debug, Clone, PartialEq)]
enum Held {
    Workload(Workload),
    Service(Service),
    Policy(Policy),
}

/// A decoded, checked resource (the body of an `Any`).
fn decode(type_url: &str, any_type: &str, bytes: &[u8]) -> Result<Checked<Held>, String> {
    if any_type != type_url {
        return Err(format!("resource type {any_type} in a {type_url} response"));
    }
    let errs = |e: ConfigErrors| e.to_string();
    match type_url {
        ADDRESS_TYPE => {
            let a = proto::Address::decode(bytes).map_err(|e| format!("Address: {e}"))?;
            match a.r#type {
                Some(proto::address::Type::Workload(w)) => {
                    let c = Checked::<Workload>::try_from(*w).map_err(errs)?;
                    Ok(Checked {
                        value: Held::Workload(c.value),
                        warnings: c.warnings,
                    })
                }
                Some(proto::address::Type::Service(s)) => {
                    let c = Checked::<Service>::try_from(*s).map_err(errs)?;
                    Ok(Checked {
                        value: Held::Service(c.value),
                        warnings: c.warnings,
                    })
                }
                None => Err("Address: neither workload nor service is set".into()),
            }
        }
        AUTHORIZATION_TYPE => {
            let a =
                proto::Authorization::decode(bytes).map_err(|e| format!("Authorization: {e}"))?;
            let c = Checked::<Policy>::try_from(a).map_err(errs)?;
            Ok(Checked {
                value: Held::Policy(c.value),
                warnings: c.warnings,
            })
        }
        other => Err(format!("unsupported resource type {other}")),
    }
}

/// One resource of a delta response: name, version, and the `Any`'s
/// type URL and bytes (`None`: a TTL refresh without a body).
pub type DeltaItem<'a> = (&'a str, &'a str, Option<(&'a str, &'a [u8])>);

/// What [`WorkloadApiState::apply_delta`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeltaOutcome {
    /// The held set changed: a compile and write are needed.
    pub changed: bool,
    /// (resource name, reason) of each rejected resource; its last good
    /// version (if any) stays.
    pub rejected: Vec<(String, String)>,
    /// Warnings of the resources accepted from this response (what of
    /// them is not honoured).
    pub warnings: Vec<String>,
}

/// The workload API resources held from a control plane: the last good
/// version of each, by type and resource name (a workload's uid, a
/// service's `namespace/hostname`, a policy's `namespace/name`).
#[derive(Debug, Clone, Default)]
pub struct WorkloadApiState {
    /// type URL → name → entry.
    held: BTreeMap<&'static str, BTreeMap<String, Entry>>,
}

/// One held resource with its version and warnings.
#[derive(Debug, Clone)]
struct Entry {
    version: String,
    resource: Held,
    warnings: Vec<String>,
}

impl WorkloadApiState {
    /// Name → version of a type (delta's `initial_resource_versions`).
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.held
            .get(type_url)
            .map(|m| {
                m.iter()
                    .map(|(k, e)| (k.clone(), e.version.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies a delta response of `type_url`: each good resource replaces
    /// its held version, each bad one is rejected (naming it) and keeps
    /// its last good version; `removed` names go away.
    pub fn apply_delta(
        &mut self,
        type_url: &str,
        items: &[DeltaItem],
        removed: &[String],
    ) -> DeltaOutcome {
        let t = match type_url {
            ADDRESS_TYPE => ADDRESS_TYPE,
            AUTHORIZATION_TYPE => AUTHORIZATION_TYPE,
            other => {
                return DeltaOutcome {
                    changed: false,
                    rejected: vec![(String::new(), format!("unsupported resource type {other}"))],
                    warnings: Vec::new(),
                }
            }
        };
        let mut out = DeltaOutcome::default();
        let held = self.held.entry(t).or_default();
        for (name, version, body) in items {
            let Some((any_type, bytes)) = body else {
                continue;
            };
            match decode(t, any_type, bytes) {
                Ok(c) => {
                    let same = held.get(*name).is_some_and(|old| old.resource == c.value);
                    out.changed |= !same;
                    if !same {
                        out.warnings.extend(c.warnings.iter().cloned());
                    }
                    held.insert(
                        name.to_string(),
                        Entry {
                            version: version.to_string(),
                            resource: c.value,
                            warnings: c.warnings,
                        },
                    );
                }
                Err(reason) => out.rejected.push((name.to_string(), reason)),
            }
        }
        for name in removed {
            out.changed |= held.remove(name).is_some();
        }
        out
    }

    /// Everything held as one config (what the local file would say).
    /// Cost: a copy of every held resource.
    pub fn config(&self) -> LocalConfig {
        let mut c = LocalConfig::default();
        for m in self.held.values() {
            for e in m.values() {
                c.warnings.extend(e.warnings.iter().cloned());
                match &e.resource {
                    Held::Workload(w) => c.workloads.push(w.clone()),
                    Held::Service(s) => c.services.push(s.clone()),
                    Held::Policy(p) => c.policies.push(p.clone()),
                }
            }
        }
        c
    }

    /// Number of resources held per kind: (workloads, services, policies).
    pub fn counts(&self) -> (usize, usize, usize) {
        let c = self.config();
        (c.workloads.len(), c.services.len(), c.policies.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, ip: [u8; 4]) -> proto::Workload {
        proto::Workload {
            uid: format!("Kubernetes//Pod/ns/{name}"),
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![ip.to_vec()],
            service_account: "sa".into(),
            node: "node-a".into(),
            services: [(
                "ns/web.ns.svc.cluster.local".to_string(),
                proto::PortList {
                    ports: vec![proto::Port {
                        service_port: 80,
                        target_port: 8080,
                    }],
                },
            )]
            .into(),
            locality: Some(proto::Locality {
                region: "eu".into(),
                zone: "eu-1a".into(),
                subzone: String::new(),
            }),
            ..Default::default()
        }
    }

    fn any_bytes<M: Message>(m: &M) -> Vec<u8> {
        m.encode_to_vec()
    }

    #[test]
    fn a_workload_converts_to_the_local_config_shape() {
        let c = Checked::<Workload>::try_from(workload("w", [10, 0, 0, 1])).unwrap();
        let w = c.value;
        assert_eq!(w.principal(), "cluster.local/ns/ns/sa/sa");
        assert_eq!(w.ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.services["ns/web.ns.svc.cluster.local"][&80], 8080);
        assert_eq!(w.locality.zone, "eu-1a");
        assert!(w.healthy);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut w = workload("w", [10, 0, 0, 1]);
        w.addresses.push(vec![1, 2, 3]);
        w.status = 7;
        let e = Checked::<Workload>::try_from(w).unwrap_err().to_string();
        assert!(e.contains("workload \"ns/w\": field addresses[1]"), "{e}");
        assert!(e.contains("field status"), "{e}");
        let s = proto::Service {
            name: "web".into(),
            namespace: "ns".into(),
            hostname: "web.ns.svc".into(),
            ports: vec![proto::Port {
                service_port: 70000,
                target_port: 1,
            }],
            load_balancing: Some(proto::LoadBalancing {
                routing_preference: vec![9],
                mode: proto::mode::PASSTHROUGH,
                health_policy: 0,
            }),
            ..Default::default()
        };
        let e = Checked::<Service>::try_from(s).unwrap_err().to_string();
        assert!(
            e.contains("service \"ns/web\": field ports[0].service_port"),
            "{e}"
        );
        assert!(
            e.contains("field load_balancing.routing_preference[0]"),
            "{e}"
        );
        assert!(e.contains("field load_balancing.mode"), "{e}");
        let a = proto::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            action: 1,
            rules: vec![proto::Rule {
                clauses: vec![proto::Clause {
                    matches: vec![proto::Match {
                        source_ips: vec![proto::CidrAddress {
                            address: vec![10, 0, 0, 0],
                            length: 40,
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        let e = Checked::<Policy>::try_from(a).unwrap_err().to_string();
        assert!(
            e.contains(
                "policy \"ns/p\": field rules[0].clauses[0].matches[0].source_ips[0].length"
            ),
            "{e}"
        );
    }

    #[test]
    fn unhonoured_fields_are_warned_about() {
        let mut w = workload("w", [10, 0, 0, 1]);
        w.capacity = Some(proto::UInt32Value { value: 3 });
        w.network_gateway = Some(proto::GatewayAddress {
            destination: None,
            hbone_mtls_port: 15008,
        });
        let c = Checked::<Workload>::try_from(w).unwrap();
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("field capacity"), "{:?}", c.warnings);
        assert!(
            c.warnings[1].contains("field network_gateway"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn waypoints_convert_to_the_local_config_shape() {
        use proto::gateway_address::Destination;
        // Address form, on a workload; the bytes round-trip through the
        // wire encoding so the field numbers are exercised too.
        let mut w = workload("w", [10, 0, 0, 1]);
        w.waypoint = Some(proto::GatewayAddress {
            destination: Some(Destination::Address(proto::NetworkAddress {
                network: String::new(),
                address: vec![10, 0, 0, 9],
            })),
            hbone_mtls_port: 15008,
        });
        let w = proto::Workload::decode(any_bytes(&w).as_slice()).unwrap();
        let c = Checked::<Workload>::try_from(w).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(
            c.value.waypoint,
            Some(Waypoint {
                destination: WaypointDestination::Address("10.0.0.9".parse().unwrap()),
                port: 15008,
            })
        );
        // Hostname form, on a service.
        let s = proto::Service {
            name: "web".into(),
            namespace: "ns".into(),
            hostname: "web.ns.svc.cluster.local".into(),
            waypoint: Some(proto::GatewayAddress {
                destination: Some(Destination::Hostname(proto::NamespacedHostname {
                    namespace: "ns".into(),
                    hostname: "wp.ns.svc.cluster.local".into(),
                })),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        };
        let s = proto::Service::decode(any_bytes(&s).as_slice()).unwrap();
        let c = Checked::<Service>::try_from(s).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(
            c.value.waypoint,
            Some(Waypoint {
                destination: WaypointDestination::Hostname("ns/wp.ns.svc.cluster.local".into()),
                port: 15008,
            })
        );
    }

    #[test]
    fn invalid_waypoints_are_rejected_naming_the_field() {
        use proto::gateway_address::Destination;
        let mut w = workload("w", [10, 0, 0, 1]);
        w.waypoint = Some(proto::GatewayAddress {
            destination: Some(Destination::Address(proto::NetworkAddress {
                network: String::new(),
                address: vec![10, 0, 9],
            })),
            hbone_mtls_port: 0,
        });
        let e = Checked::<Workload>::try_from(w).unwrap_err().to_string();
        assert!(
            e.contains("workload \"ns/w\": field waypoint.address.address"),
            "{e}"
        );
        assert!(e.contains("field waypoint.hbone_mtls_port"), "{e}");
        let s = proto::Service {
            name: "web".into(),
            namespace: "ns".into(),
            hostname: "web.ns.svc.cluster.local".into(),
            waypoint: Some(proto::GatewayAddress {
                destination: None,
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        };
        let e = Checked::<Service>::try_from(s).unwrap_err().to_string();
        assert!(
            e.contains("service \"ns/web\": field waypoint.destination"),
            "{e}"
        );
        let s = proto::Service {
            name: "web".into(),
            namespace: "ns".into(),
            hostname: "web.ns.svc.cluster.local".into(),
            waypoint: Some(proto::GatewayAddress {
                destination: Some(Destination::Hostname(proto::NamespacedHostname {
                    namespace: "ns".into(),
                    hostname: String::new(),
                })),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        };
        let e = Checked::<Service>::try_from(s).unwrap_err().to_string();
        assert!(e.contains("field waypoint.hostname.hostname"), "{e}");
    }

    #[test]
    fn delta_upserts_rejects_and_removes_by_name() {
        let mut st = WorkloadApiState::default();
        let good = any_bytes(&proto::Address {
            r#type: Some(proto::address::Type::Workload(Box::new(workload(
                "a",
                [10, 0, 0, 1],
            )))),
        });
        let mut bad_w = workload("b", [10, 0, 0, 2]);
        bad_w.addresses = vec![vec![1]];
        let bad = any_bytes(&proto::Address {
            r#type: Some(proto::address::Type::Workload(Box::new(bad_w))),
        });
        let out = st.apply_delta(
            ADDRESS_TYPE,
            &[
                ("a", "1", Some((ADDRESS_TYPE, &good))),
                ("b", "1", Some((ADDRESS_TYPE, &bad))),
            ],
            &[],
        );
        assert!(out.changed);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].0, "b");
        assert!(out.rejected[0].1.contains("workload \"ns/b\""), "{out:?}");
        assert_eq!(st.counts(), (1, 0, 0));
        // The same bytes again: nothing changes.
        let out = st.apply_delta(
            ADDRESS_TYPE,
            &[("a", "2", Some((ADDRESS_TYPE, &good)))],
            &[],
        );
        assert!(!out.changed);
        assert_eq!(st.versions(ADDRESS_TYPE)["a"], "2");
        let out = st.apply_delta(ADDRESS_TYPE, &[], &["a".into()]);
        assert!(out.changed);
        assert_eq!(st.counts(), (0, 0, 0));
        // A body of another type is rejected.
        let out = st.apply_delta(
            AUTHORIZATION_TYPE,
            &[("x", "1", Some((ADDRESS_TYPE, &good)))],
            &[],
        );
        assert!(out.rejected[0].1.contains("resource type"), "{out:?}");
    }
}
