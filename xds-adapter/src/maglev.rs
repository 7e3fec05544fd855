//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), with weights:
//! a lookup table of prime size `M` in which every endpoint owns entries
//! in proportion to its weight. The kernel hashes the client onto the
//! table, so one client keeps its backend, and removing an endpoint moves
//! (almost) only the clients that were on it.
//!
//! Cost: O(M · rounds) to build, where a round gives every endpoint a turn
//! to claim its next preferred free entry; O(1) per connect.

use std::net::SocketAddr;

/// Table sizes used, all prime. The smallest with at least
/// [`ENTRIES_PER_ENDPOINT`] entries per endpoint is chosen (balance within
/// about 1%), capped by the largest. Few and coarse on purpose: a table of
/// another size shares nothing with the old one, so an endpoint change
/// that crosses a size (10 ↔ 11, 20 ↔ 21 endpoints) moves most clients.
pub const TABLE_SIZES: [u32; 3] = [1021, 2039, 4093];

/// Target entries per endpoint when choosing the table size.
pub const ENTRIES_PER_ENDPOINT: u32 = 100;

/// The table size for `n` endpoints; `None` if `n` exceeds the largest size.
pub fn table_size(n: usize) -> Option<u32> {
    let largest = TABLE_SIZES[TABLE_SIZES.len() - 1];
    if n > largest as usize {
        return None;
    }
    let want = (n as u64).saturating_mul(u64::from(ENTRIES_PER_ENDPOINT));
    Some(
        TABLE_SIZES
            .iter()
            .copied()
            .find(|&m| u64::from(m) >= want)
            .unwrap_or(largest),
    )
}

/// FNV-1a 64 of `bytes`, from `seed` (the basis): deterministic across
/// runs and platforms, which a consistent table needs.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Builds the table: entry → index into `endpoints`. An endpoint's
/// preference order depends only on its own address, so the table of a
/// changed endpoint set stays close to the old one. Weighted: each round,
/// an endpoint adds its weight to a credit and claims an entry per
/// `max_weight` of credit, so entries are owned in proportion to weights.
/// Needs `1 <= endpoints.len() <= m`, `m` prime, every weight ≥ 1.
pub fn table(endpoints: &[(SocketAddr, u32)], m: u32) -> Vec<usize> {
    let m64 = u64::from(m);
    let n = endpoints.len();
    let prefs: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|(a, _)| {
            let key = a.to_string();
            let offset = fnv1a(0xcbf2_9ce4_8422_2325, key.as_bytes()) % m64;
            let skip = fnv1a(0x84222325_cbf29ce4, key.as_bytes()) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_w = u64::from(endpoints.iter().map(|e| e.1).max().unwrap_or(1).max(1));
    let mut next = vec![0u64; n];
    let mut credit = vec![0u64; n];
    let mut entry: Vec<Option<usize>> = vec![None; m as usize];
    let mut filled = 0usize;
    while filled < m as usize {
        for i in 0..n {
            credit[i] += u64::from(endpoints[i].1.max(1));
            if credit[i] < max_w {
                continue;
            }
            credit[i] -= max_w;
            let (offset, skip) = prefs[i];
            // `skip` is in 1..m and m is prime: the sequence visits every
            // entry, so a free one is found within m steps.
            loop {
                let c = ((offset + next[i] * skip) % m64) as usize;
                next[i] += 1;
                if entry[c].is_none() {
                    entry[c] = Some(i);
                    filled += 1;
                    break;
                }
            }
            if filled == m as usize {
                break;
            }
        }
    }
    entry.into_iter().map(|e| e.unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                (
                    format!("10.1.{}.{}:8080", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                    1,
                )
            })
            .collect()
    }

    fn owned(t: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in t {
            c[i] += 1;
        }
        c
    }

    #[test]
    fn sizes() {
        assert_eq!(table_size(1), Some(1021));
        assert_eq!(table_size(10), Some(1021));
        assert_eq!(table_size(11), Some(2039));
        assert_eq!(table_size(21), Some(4093));
        assert_eq!(table_size(4093), Some(4093));
        assert_eq!(table_size(4094), None);
    }

    #[test]
    fn balanced() {
        for n in [1, 2, 3, 7, 10, 40] {
            let m = table_size(n).unwrap();
            let t = table(&eps(n), m);
            assert_eq!(t.len(), m as usize);
            let c = owned(&t, n);
            let (lo, hi) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
            // Equal weights: shares differ by at most one entry per round.
            assert!(hi - lo <= 1, "n={n}: {c:?}");
        }
    }

    #[test]
    fn weighted() {
        let mut e = eps(3);
        e[1].1 = 3;
        let t = table(&e, 1021);
        let c = owned(&t, 3);
        // 1 : 3 : 1 of 1021 entries.
        assert!((c[1] as f64 / 1021.0 - 0.6).abs() < 0.01, "{c:?}");
        assert!((c[0] as i64 - c[2] as i64).abs() <= 1, "{c:?}");
    }

    #[test]
    fn minimal_disruption() {
        let all = eps(10);
        let m = table_size(10).unwrap();
        let before = table(&all, m);
        // Remove endpoint 4: entries it owned must move; few others may.
        let mut rest = all.clone();
        rest.remove(4);
        let after = table(&rest, m);
        let moved_other = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 4 && all[**b].0 != rest[**a].0)
            .count();
        // Every entry of the removed endpoint moved, to a remaining one.
        assert_eq!(after.len(), before.len());
        // The paper reports a few % of extra disruption; allow 5% of M.
        assert!(
            (moved_other as f64) < 0.05 * f64::from(m),
            "{moved_other} of {m} entries of remaining endpoints moved"
        );
        // Adding it back restores the original table exactly.
        assert_eq!(table(&all, m), before);
    }
}
