//! Domain model → the records the kernel maps hold: one service per
//! listener VIP:port, its endpoints expanded into weighted slots.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use kmesh_abi::{MAX_SERVICES, MAX_SLOTS, MAX_SLOTS_PER_SERVICE};

use crate::error::{ConfigErrors, Diag};
use crate::model::{cluster_label, listener_label, LbPolicy, Listener};
use crate::MeshConfig;

/// What the kernel maps should hold.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlatConfig {
    /// One service per listener, by VIP:port (the service map key is
    /// [`crate::addr::to_abi`] of it).
    pub services: BTreeMap<SocketAddr, FlatService>,
    /// HTTP services decided per request, by VIP:port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub l7: Vec<FlatL7>,
    /// The mesh warnings followed by those of flattening.
    pub warnings: Vec<String>,
}

impl FlatConfig {
    /// Total number of slots over all services (what the slot map must hold).
    pub fn slot_count(&self) -> usize {
        self.services.values().map(|s| s.slots.len()).sum()
    }
}

/// An HTTP service routed per request: its route table and, for every
/// cluster the table names, the slots a request to it picks from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlatL7 {
    pub listener: String,
    pub vip: SocketAddr,
    pub table: crate::l7::L7Table,
    /// Cluster → slots (weighted as for a service of that one cluster).
    /// Empty when the cluster has no endpoint: requests to it get 503.
    pub clusters: BTreeMap<String, Vec<SocketAddr>>,
}

/// One service: a VIP:port and the slots the kernel picks a backend from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlatService {
    /// Name of the listener the service comes from.
    pub listener: String,
    pub vip: SocketAddr,
    /// `kmesh_abi::LB_*`.
    pub lb_policy: u32,
    /// The cluster whose connection counters and circuit breaker apply:
    /// set when the route has a single cluster (a split route counts
    /// nothing per cluster).
    pub cluster: Option<String>,
    /// `kmesh_abi::ServiceValue::cluster_id` ([`cluster_id`] of `cluster`, or 0).
    pub cluster_id: u32,
    /// The cluster's circuit breaker (0 = none).
    pub max_connections: u32,
    /// The endpoints behind the VIP with their effective weights (for
    /// display; the kernel only sees `slots`).
    pub endpoints: Vec<FlatEndpoint>,
    /// The endpoints expanded by weight and interleaved — or, for MAGLEV
    /// and RING_HASH, the Maglev lookup table; the kernel picks
    /// `slots[i]`. Never empty; every slot is one of `endpoints`.
    pub slots: Vec<SocketAddr>,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlatEndpoint {
    /// The cluster the endpoint belongs to.
    pub cluster: String,
    pub addr: SocketAddr,
    /// Effective weight: the number of slots the endpoint has. It is the
    /// endpoint weight × locality weight (× cluster share for weighted
    /// clusters), reduced by the common divisor of all weights of the
    /// service and, beyond `MAX_SLOTS_PER_SERVICE` slots, scaled down.
    pub weight: u32,
}

/// Flattens the mesh into kernel records. Deterministic: the same mesh
/// always gives the same `FlatConfig`.
pub fn flatten(mesh: &MeshConfig) -> Result<FlatConfig, ConfigErrors> {
    let (flat, errors) = flatten_impl(mesh)?;
    if errors.is_empty() {
        Ok(flat)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Like [`flatten`], but a service with a problem (e.g. too many endpoints)
/// is left out and listed instead of failing everything. Whole-config limits
/// (the service and slot maps' capacity) still fail the call.
pub fn flatten_lenient(
    mesh: &MeshConfig,
) -> Result<(FlatConfig, Vec<crate::ConfigError>), ConfigErrors> {
    flatten_impl(mesh)
}

fn flatten_impl(mesh: &MeshConfig) -> Result<(FlatConfig, Vec<crate::ConfigError>), ConfigErrors> {
    let mut d = Diag {
        errors: Vec::new(),
        warnings: mesh.warnings.clone(),
    };
    if mesh.listeners.len() > MAX_SERVICES as usize {
        d.error_hint(
            "config",
            "",
            format!(
                "map full: {} services asked for, the service map holds MAX_SERVICES = {MAX_SERVICES}",
                mesh.listeners.len()
            ),
            "each listener is one service",
        );
        return Err(ConfigErrors(d.errors));
    }
    let mut ids: BTreeMap<u32, &str> = BTreeMap::new();
    for name in mesh.clusters.keys() {
        if let Some(other) = ids.insert(cluster_id(name), name) {
            d.error_hint(
                &cluster_label(name),
                "name",
                format!("its counter id collides with cluster {other:?}'s"),
                "rename one of the two clusters",
            );
        }
    }
    if !d.errors.is_empty() {
        return Err(ConfigErrors(d.errors));
    }
    let mut services = BTreeMap::new();
    for l in &mesh.listeners {
        if let Some(prev) = services
            .get(&l.address)
            .map(|s: &FlatService| s.listener.clone())
        {
            d.error(
                &listener_label(&l.name),
                "address",
                format!("{} is already captured by listener {prev:?}", l.address),
            );
            continue;
        }
        if let Some(s) = service(l, mesh, &mut d) {
            services.insert(l.address, s);
        }
    }
    let total: usize = services.values().map(|s| s.slots.len()).sum();
    if total > MAX_SLOTS as usize {
        d.error_hint(
            "config",
            "",
            format!(
                "map full: {total} slots asked for, the slot map holds MAX_SLOTS = {MAX_SLOTS}"
            ),
            "use fewer endpoints or weights with a larger common divisor",
        );
        return Err(ConfigErrors(d.errors));
    }
    let l7 = flatten_l7(&mesh.l7, mesh);
    Ok((
        FlatConfig {
            services,
            l7,
            warnings: d.warnings,
        },
        d.errors,
    ))
}

/// The endpoints of one priority of one cluster of a route: (cluster,
/// cluster weight × the priority's load percent, [(address, endpoint
/// weight × locality weight)]).
type Group<'a> = (&'a str, u64, Vec<(SocketAddr, u128)>);

/// The key of a cluster's kernel counters: FNV-1a 32 of its name, never 0
/// (0 means "no cluster"). Stable across updates and restarts, so active
/// counts carry over; [`flatten`] refuses two clusters with one id.
pub fn cluster_id(name: &str) -> u32 {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h.max(1)
}

pub(crate) fn service(l: &Listener, mesh: &MeshConfig, d: &mut Diag) -> Option<FlatService> {
    let res = listener_label(&l.name);
    let before = d.errors.len();
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut policies = BTreeSet::new();
    let mut used = Vec::new();
    for (name, cluster_weight) in l.route.clusters() {
        let Some(c) = mesh.clusters.get(name) else {
            d.error(&res, "route", format!("cluster {name:?} is not defined"));
            continue;
        };
        policies.insert(c.lb);
        let loads = crate::priority::loads(&c.priority_health);
        let mut any = false;
        for (p, load) in loads.iter().enumerate() {
            let eps: Vec<(SocketAddr, u128)> = c
                .endpoints
                .iter()
                .filter(|e| e.priority as usize == p)
                .map(|e| (e.addr, u128::from(e.weight) * u128::from(e.locality_weight)))
                .filter(|(_, w)| *w > 0)
                .collect();
            if *load == 0 || eps.is_empty() {
                continue;
            }
            any = true;
            if cluster_weight > 0 {
                groups.push((name, u64::from(cluster_weight) * u64::from(*load), eps));
            }
        }
        if !any {
            d.error(
                &cluster_label(name),
                "load_assignment.endpoints",
                "cluster has no endpoints",
            );
            continue;
        }
        if cluster_weight > 0 {
            used.push(c);
        }
    }
    if d.errors.len() != before {
        return None;
    }
    if groups.is_empty() {
        d.error(
            &res,
            "route",
            "no cluster of the route has a weight above 0",
        );
        return None;
    }
    let lb = match policies.iter().collect::<Vec<_>>().as_slice() {
        [one] => **one,
        _ => {
            d.warn(
                &res,
                "route",
                "the weighted clusters have different lb_policy values; using ROUND_ROBIN",
            );
            LbPolicy::RoundRobin
        }
    };

    let (cluster, cluster_id, max_connections) = match used.as_slice() {
        [c] => (Some(c.name.clone()), cluster_id(&c.name), c.max_connections),
        many => {
            if many.iter().any(|c| c.max_connections > 0) {
                d.warn(
                    &res,
                    "route",
                    "circuit breakers apply to routes with a single cluster; not enforced for this split route",
                );
            }
            (None, 0, 0)
        }
    };

    let n: usize = groups.iter().map(|g| g.2.len()).sum();
    if n > MAX_SLOTS_PER_SERVICE as usize {
        d.error_hint(
            &res,
            "",
            format!(
                "map full: {n} endpoints need at least {n} slots, a service holds at most MAX_SLOTS_PER_SERVICE = {MAX_SLOTS_PER_SERVICE}"
            ),
            "split the service or use fewer endpoints",
        );
        return None;
    }
    let weights = exact_weights(&groups).unwrap_or_else(|| approx_weights(&groups));
    let mut counts = reduce(weights);
    let asked: u128 = counts.iter().sum();
    if asked > u128::from(MAX_SLOTS_PER_SERVICE) {
        counts = reduce(scale(&counts, u128::from(MAX_SLOTS_PER_SERVICE)));
        let got: u128 = counts.iter().sum();
        d.warn(
            &res,
            "",
            format!(
                "endpoint weights need {asked} slots, more than MAX_SLOTS_PER_SERVICE = {MAX_SLOTS_PER_SERVICE}; scaled down to {got} slots (shares are approximate, every endpoint keeps at least one slot)"
            ),
        );
    }
    // Every count is now in 1..=MAX_SLOTS_PER_SERVICE.
    let counts: Vec<u32> = counts
        .into_iter()
        .map(|c| u32::try_from(c).unwrap_or(MAX_SLOTS_PER_SERVICE))
        .collect();
    let endpoints: Vec<FlatEndpoint> = groups
        .iter()
        .flat_map(|(cluster, _, eps)| {
            eps.iter().map(move |(addr, _)| FlatEndpoint {
                cluster: (*cluster).to_string(),
                addr: *addr,
                weight: 0,
            })
        })
        .zip(&counts)
        .map(|(mut e, c)| {
            e.weight = *c;
            e
        })
        .collect();
    let slots = if lb.is_hash() {
        maglev_slots(&endpoints, &res, d)?
    } else {
        interleave(&endpoints)
    };
    Some(FlatService {
        listener: l.name.clone(),
        vip: l.address,
        lb_policy: lb.to_abi(),
        cluster,
        cluster_id,
        max_connections,
        endpoints,
        slots,
    })
}

/// The Maglev table of `endpoints` (weighted by their slot counts) as slots.
fn maglev_slots(endpoints: &[FlatEndpoint], res: &str, d: &mut Diag) -> Option<Vec<SocketAddr>> {
    let Some(m) = crate::maglev::table_size(endpoints.len()) else {
        d.error_hint(
            res,
            "",
            format!(
                "{} endpoints do not fit a Maglev table of at most {} entries",
                endpoints.len(),
                crate::maglev::TABLE_SIZES[crate::maglev::TABLE_SIZES.len() - 1]
            ),
            "split the service or use fewer endpoints",
        );
        return None;
    };
    let weighted: Vec<(SocketAddr, u32)> = endpoints.iter().map(|e| (e.addr, e.weight)).collect();
    Some(
        crate::maglev::table(&weighted, m)
            .into_iter()
            .map(|i| endpoints[i].addr)
            .collect(),
    )
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Integer weights proportional to each endpoint's share of the traffic:
/// cluster_weight / Σ cluster weights × w / Σ w of its cluster, scaled by
/// Σ cluster weights × lcm(Σ w of each cluster). `None` when a weight or
/// their total overflows.
fn exact_weights(groups: &[Group<'_>]) -> Option<Vec<u128>> {
    let sums = groups
        .iter()
        .map(|g| {
            g.2.iter()
                .try_fold(0u128, |acc, (_, w)| acc.checked_add(*w))
        })
        .collect::<Option<Vec<u128>>>()?;
    let lcm = sums
        .iter()
        .try_fold(1u128, |acc, s| (acc / gcd(acc, *s)).checked_mul(*s))?;
    let mut out = Vec::new();
    let mut total = 0u128;
    for (g, sum) in groups.iter().zip(&sums) {
        let factor = (lcm / sum).checked_mul(u128::from(g.1))?;
        for (_, w) in &g.2 {
            let x = w.checked_mul(factor)?;
            // The total must fit too (it is summed later).
            total = total.checked_add(x)?;
            out.push(x);
        }
    }
    Some(out)
}

/// Floating-point fallback of [`exact_weights`] for weights too large to
/// combine exactly: shares scaled to 2^52, at least 1.
fn approx_weights(groups: &[Group<'_>]) -> Vec<u128> {
    let total: f64 = groups.iter().map(|g| g.1 as f64).sum();
    let mut out = Vec::new();
    for (_, cw, eps) in groups {
        let sum: f64 = eps.iter().map(|(_, w)| *w as f64).sum();
        for (_, w) in eps {
            let share = *cw as f64 / total * (*w as f64 / sum);
            out.push(((share * 4_503_599_627_370_496.0).round() as u128).max(1));
        }
    }
    out
}

/// Divides all weights by their greatest common divisor.
fn reduce(weights: Vec<u128>) -> Vec<u128> {
    let g = weights.iter().fold(0, |acc, w| gcd(acc, *w));
    if g <= 1 {
        return weights;
    }
    weights.into_iter().map(|w| w / g).collect()
}

/// Scales weights down to `max` slots in total, every weight keeping at
/// least 1: each gets 1 plus its share (largest remainder) of the other
/// `max - n` slots. Needs `n <= max`.
fn scale(weights: &[u128], max: u128) -> Vec<u128> {
    let n = weights.len() as u128;
    // Keep the products below u128::MAX: drop low bits of huge weights.
    let top = weights.iter().copied().max().unwrap_or(0);
    let shift = (128 - top.leading_zeros()).saturating_sub(100);
    let w: Vec<u128> = weights.iter().map(|x| (x >> shift).max(1)).collect();
    let sum: u128 = w.iter().sum();
    let spare = max.saturating_sub(n);
    let mut out: Vec<u128> = w.iter().map(|x| 1 + x * spare / sum).collect();
    let given: u128 = out.iter().sum::<u128>() - n;
    let mut order: Vec<usize> = (0..w.len()).collect();
    // Largest remainder first; ties go to the earlier endpoint.
    order.sort_by_key(|&i| std::cmp::Reverse(w[i] * spare % sum));
    for &i in order.iter().take((spare - given) as usize) {
        out[i] += 1;
    }
    out
}

/// Expands endpoints into slots, one round over the endpoints that still
/// have slots at a time, so that consecutive slots alternate between
/// endpoints.
fn interleave(endpoints: &[FlatEndpoint]) -> Vec<SocketAddr> {
    let mut left: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
    let mut active: Vec<usize> = (0..endpoints.len()).filter(|&i| left[i] > 0).collect();
    let mut slots = Vec::with_capacity(left.iter().map(|&c| c as usize).sum());
    while !active.is_empty() {
        for &i in &active {
            slots.push(endpoints[i].addr);
            left[i] -= 1;
        }
        active.retain(|&i| left[i] > 0);
    }
    slots
}

/// The slot tables of the clusters per-request routes name, for each L7
/// listener. A cluster without endpoints gets no slots: a 503 per request,
/// not a configuration error.
pub(crate) fn flatten_l7(l7: &[crate::l7::L7Listener], mesh: &MeshConfig) -> Vec<FlatL7> {
    let mut out = Vec::new();
    for l in l7 {
        let mut clusters = BTreeMap::new();
        for vh in &l.table.vhosts {
            for r in &vh.routes {
                for (c, _) in r.action.clusters() {
                    if clusters.contains_key(c) {
                        continue;
                    }
                    // A cluster without endpoints is a 503 per request, not
                    // a configuration error.
                    let one = Listener {
                        name: l.name.clone(),
                        address: l.address,
                        route: crate::model::TcpRoute::Cluster(c.to_string()),
                    };
                    let slots = service(&one, mesh, &mut Diag::default())
                        .map(|s| s.slots)
                        .unwrap_or_default();
                    clusters.insert(c.to_string(), slots);
                }
            }
        }
        out.push(FlatL7 {
            listener: l.name.clone(),
            vip: l.address,
            table: l.table.clone(),
            clusters,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reduce_and_scale() {
        assert_eq!(reduce(vec![2, 4, 6]), vec![1, 2, 3]);
        assert_eq!(reduce(vec![7]), vec![1]);
        let s = scale(&[1, 10_000], 4096);
        assert_eq!(s, vec![1, 4095]);
        let s = scale(&[1001, 2000, 3000], 4096);
        assert_eq!(s.iter().sum::<u128>(), 4096);
        assert_eq!(s, vec![684, 1365, 2047]);
        let s = scale(&[u128::MAX / 3, 1, u128::MAX / 2], 10);
        assert_eq!(s.iter().sum::<u128>(), 10);
        assert!(s.iter().all(|c| *c >= 1));
    }

    #[test]
    fn exact_weighted_shares() {
        let a = sa("10.0.0.1:1");
        let b = sa("10.0.0.2:1");
        let c = sa("10.0.0.3:1");
        // cluster x (weight 3): a:1, b:2; cluster y (weight 1): c:5
        let groups: Vec<Group<'_>> = vec![("x", 3, vec![(a, 1), (b, 2)]), ("y", 1, vec![(c, 5)])];
        let w = reduce(exact_weights(&groups).unwrap());
        // shares 1/4, 2/4, 1/4
        assert_eq!(w, vec![1, 2, 1]);
        let approx = reduce(approx_weights(&groups));
        assert_eq!(approx, vec![1, 2, 1]);
        let huge: Vec<Group<'_>> = vec![
            ("x", u64::MAX, vec![(a, u128::from(u64::MAX) - 1), (b, 1)]),
            ("y", 1, vec![(c, u128::from(u64::MAX) - 2)]),
        ];
        assert!(exact_weights(&huge).is_none());
        assert!(approx_weights(&huge).iter().all(|w| *w >= 1));
    }

    #[test]
    fn interleaving() {
        let e = |addr: &str, weight| FlatEndpoint {
            cluster: "c".into(),
            addr: sa(addr),
            weight,
        };
        let eps = [e("1.1.1.1:1", 3), e("2.2.2.2:2", 1), e("3.3.3.3:3", 2)];
        let slots = interleave(&eps);
        let names: Vec<u16> = slots.iter().map(SocketAddr::port).collect();
        assert_eq!(names, vec![1, 2, 3, 1, 3, 1]);
    }
}
