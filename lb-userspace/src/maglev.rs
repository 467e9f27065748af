//! Weighted Maglev slot tables (Eisenbud et al., NSDI 2016), pure and deterministic.
//!
//! Each backend walks its own permutation of the M slots (offset and skip from two hashes of
//! its key) and claims the next free one in turn. Weights are turns: every round each backend
//! earns its weight in credit and claims a slot per `max_weight` of credit, so shares follow
//! the weights for any weights (no "weights must sum to M"). Backends are ordered by key before
//! filling, so the table depends only on the set, never on insertion order.

/// A backend as Maglev sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Value written into the slots (the backend id in the data plane).
    pub id: u32,
    /// Stable identity (for example `"10.0.0.2:80"`): decides the backend's permutation.
    pub key: String,
    /// Relative weight; 0 takes no slots.
    pub weight: u32,
}

/// Deterministic 64-bit hash of `bytes` with `seed` (FNV-1a, then a murmur finaliser); stable
/// across Rust versions, unlike `DefaultHasher`.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// True when `n` is prime (trial division; M is at most a few million).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds a slot table of `m` entries (m prime). Returns an empty vector when no backend has
/// a positive weight (the VIP then has no backend).
pub fn build(backends: &[MaglevBackend], m: u32) -> Vec<u32> {
    assert!(is_prime(m), "Maglev table size must be prime");
    let mut live: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return Vec::new();
    }
    live.sort_by(|a, b| a.key.cmp(&b.key).then(a.id.cmp(&b.id)));
    let m64 = u64::from(m);
    let perm: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = stable_hash(b.key.as_bytes(), 0x6d61_676c_6576_3031) % m64;
            let skip = stable_hash(b.key.as_bytes(), 0x6d61_676c_6576_3032) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = u64::from(live.iter().map(|b| b.weight).max().unwrap_or(1));
    let mut next = vec![0u64; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut table = vec![u32::MAX; m as usize];
    let mut filled = 0u32;
    while filled < m {
        for (i, b) in live.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = perm[i];
            // Walk this backend's permutation to its next free slot.
            loop {
                let slot = ((offset + next[i] * skip) % m64) as usize;
                next[i] += 1;
                if table[slot] == u32::MAX {
                    table[slot] = b.id;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn backends(n: u32) -> Vec<MaglevBackend> {
        (1..=n)
            .map(|i| MaglevBackend {
                id: i,
                key: format!("10.1.{}.{}:80", i / 250, i % 250),
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut h = HashMap::new();
        for id in table {
            *h.entry(*id).or_default() += 1;
        }
        h
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(2) && is_prime(16381) && is_prime(251));
        assert!(!is_prime(0) && !is_prime(1) && !is_prime(65536) && !is_prime(65535));
    }

    #[test]
    fn balance_equal_weights() {
        for n in [3u32, 10, 100, 600] {
            let m = [65537u32, 16381, 1009]
                .into_iter()
                .find(|m| *m >= 100 * n)
                .unwrap_or(65537);
            let table = build(&backends(n), m);
            let s = shares(&table);
            assert_eq!(s.len(), n as usize);
            let mean = f64::from(m) / f64::from(n);
            let max = *s.values().max().unwrap() as f64;
            assert!(max / mean <= 1.02, "n={n} m={m}: max/mean {}", max / mean);
        }
    }

    #[test]
    fn weights_are_followed() {
        let weights = [1u32, 2, 3, 10, 100, 7];
        let bs: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| MaglevBackend {
                id: i as u32 + 1,
                key: format!("b{i}"),
                weight: *w,
            })
            .collect();
        let table = build(&bs, 65537);
        let s = shares(&table);
        let total: u32 = weights.iter().sum();
        for b in &bs {
            let got = s[&b.id] as f64 / 65537.0;
            let want = f64::from(b.weight) / f64::from(total);
            // Relative: a weight-1 backend (0.8 % here) with no slots must fail.
            assert!(
                (got - want).abs() <= 0.05 * want,
                "backend {} got {got:.4} want {want:.4}",
                b.id
            );
        }
    }

    #[test]
    fn zero_weight_and_empty() {
        let mut bs = backends(3);
        bs[1].weight = 0;
        let table = build(&bs, 251);
        assert!(!table.contains(&2));
        assert!(build(&[], 251).is_empty());
        bs.iter_mut().for_each(|b| b.weight = 0);
        assert!(build(&bs, 251).is_empty());
    }

    #[test]
    fn removal_disrupts_little() {
        let m = 65537;
        for n in [5u32, 10, 50] {
            let all = backends(n);
            let before = build(&all, m);
            for removed in [1u32, n / 2 + 1, n] {
                let rest: Vec<_> = all.iter().filter(|b| b.id != removed).cloned().collect();
                let after = build(&rest, m);
                let moved_others = before
                    .iter()
                    .zip(&after)
                    .filter(|(a, b)| a != b && **a != removed)
                    .count();
                assert!(
                    moved_others as f64 <= 0.01 * f64::from(m),
                    "n={n}: removing {removed} moved {moved_others} other slots"
                );
            }
        }
    }

    #[test]
    fn addition_disrupts_little() {
        let m = 65537;
        for n in [5u32, 10, 50] {
            let before = build(&backends(n), m);
            let after = build(&backends(n + 1), m);
            let moved_others = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b && **b != n + 1)
                .count();
            assert!(
                moved_others as f64 <= 0.01 * f64::from(m),
                "n={n}: adding moved {moved_others}"
            );
        }
    }

    #[test]
    fn deterministic_whatever_the_order() {
        let bs = backends(20);
        let mut rev = bs.clone();
        rev.reverse();
        let a = build(&bs, 16381);
        assert_eq!(a, build(&rev, 16381));
        assert_eq!(a, build(&bs, 16381));
    }
}
