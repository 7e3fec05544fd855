//! Envoy's priority load split: how much of a cluster's traffic each
//! priority level gets, from the health of its endpoints.
//!
//! - health(P) = min(100, 1.4 × 100 × healthy(P) / total(P)), integer
//!   percent (overprovisioning factor 1.4, Envoy's default);
//! - normalized total health = min(100, Σ health(P));
//! - load(P) = min(100 − Σ load(higher priorities),
//!   health(P) × 100 / normalized total health), so a priority spills to
//!   the next only what its health cannot carry;
//! - rounding leftovers go to the first priority with health.
//!
//! Not modelled: panic mode (below 50% total health Envoy also sends to
//! unhealthy endpoints; here they never get traffic) and degraded hosts.

/// Envoy's default overprovisioning factor, in percent.
pub const OVERPROVISIONING: u64 = 140;

/// The load in percent of each priority, from (healthy, total) endpoint
/// counts per priority. Sums to 100 when any endpoint is healthy; when the
/// health percentages all round down to 0 (e.g. 1 healthy of 200), the
/// first priority with a healthy endpoint gets everything. All zero when
/// nothing is healthy.
pub fn loads(health: &[(u32, u32)]) -> Vec<u32> {
    let per: Vec<u64> = health
        .iter()
        .map(|&(h, t)| {
            if t == 0 {
                0
            } else {
                (OVERPROVISIONING * u64::from(h) / u64::from(t)).min(100)
            }
        })
        .collect();
    let mut out = vec![0u32; health.len()];
    let total = per.iter().sum::<u64>().min(100);
    if total == 0 {
        if let Some(i) = health.iter().position(|&(h, _)| h > 0) {
            out[i] = 100;
        }
        return out;
    }
    let mut given = 0u64;
    for (i, h) in per.iter().enumerate() {
        let l = (100 - given).min(h * 100 / total);
        out[i] = l as u32;
        given += l;
    }
    if given < 100 {
        if let Some(i) = per.iter().position(|&h| h > 0) {
            out[i] += (100 - given) as u32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of Envoy's "Priority levels" documentation, with 10
    /// endpoints per priority (healthy percent → healthy count).
    #[test]
    fn envoy_documented_examples() {
        let p = |h0: u32, h1: u32| loads(&[(h0, 100), (h1, 100)]);
        // P0 100% healthy: everything stays at P0.
        assert_eq!(p(100, 100), vec![100, 0]);
        // 72% healthy × 1.4 = 100.8 → still 100% at P0.
        assert_eq!(p(72, 100), vec![100, 0]);
        // 71% × 1.4 = 99.4 → 99 / 1.
        assert_eq!(p(71, 100), vec![99, 1]);
        // 50% × 1.4 = 70 → 70 / 30.
        assert_eq!(p(50, 100), vec![70, 30]);
        // 25% → 35 / 65.
        assert_eq!(p(25, 100), vec![35, 65]);
        // 0% → all to P1.
        assert_eq!(p(0, 100), vec![0, 100]);
        // Both degraded (20% → health 28 each): normalised to 56 → 50/50.
        assert_eq!(p(20, 20), vec![50, 50]);
    }

    #[test]
    fn three_levels_and_edges() {
        // P0 20% (28), P1 20% (28), P2 100% (100): total 100.
        assert_eq!(loads(&[(2, 10), (2, 10), (10, 10)]), vec![28, 28, 44]);
        assert_eq!(loads(&[(1, 200), (0, 3)]), vec![100, 0]);
        assert_eq!(loads(&[(0, 2), (0, 3)]), vec![0, 0]);
        // A priority with no endpoints at all is skipped.
        assert_eq!(loads(&[(0, 0), (4, 4)]), vec![0, 100]);
        // Rounding: 1/3 healthy → health 46 each of two → 50/50.
        assert_eq!(loads(&[(1, 3), (1, 3)]), vec![50, 50]);
    }
}
