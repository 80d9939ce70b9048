//! Load balancers: given the endpoints of a service, pick one for the next call.
//!
//! Each balancer sees an [`EndpointView`] per candidate: its weight, whether it may take
//! traffic now, its calls in flight and its latency estimate. Callers keep those statistics
//! (see `endpoint.rs`); the balancers only read them, so they are pure policy and are tested
//! as such (`tests` below, with proptest for the distributions).
//!
//! - [`RoundRobin`]: each available endpoint in turn.
//! - [`SmoothWeighted`]: nginx's smooth weighted round robin: weights honoured exactly over a
//!   cycle, with picks of one endpoint spread out rather than bunched.
//! - [`Random`]: weighted random.
//! - [`LeastConnections`]: the fewest calls in flight relative to weight, ties taken in turn.
//! - [`P2c`]: power of two choices over `(in-flight + 1) × peak-EWMA latency`, as Finagle and
//!   linkerd do: two random candidates, the less loaded wins.
//! - [`ConsistentHash`]: a ring with virtual nodes proportional to weight; a call's key maps
//!   to the same endpoint while the set is stable, and a change moves about 1/N of the keys.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use rand::Rng;

/// What a balancer knows about one endpoint.
#[derive(Debug, Clone)]
pub struct EndpointView<'a> {
    /// Stable identity (instance id), for balancers that keep state per endpoint.
    pub id: &'a str,
    /// Relative share of traffic.
    pub weight: u32,
    /// Whether it may be picked now (connected, not ejected).
    pub available: bool,
    /// Calls in flight to it.
    pub inflight: usize,
    /// Peak-EWMA latency estimate in microseconds (0 if unknown).
    pub latency_us: f64,
}

/// Picks an endpoint: the index into `endpoints`, or `None` if none is available.
pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// Picks among `endpoints`; `key` is the call's hash key, if it gave one.
    fn pick(&self, endpoints: &[EndpointView<'_>], key: Option<u64>) -> Option<usize>;
}

/// A balancer as configuration names it: `round_robin`, `weighted`, `random`, `p2c`,
/// `least_conn` or `consistent_hash` (also accepted: `rr`; `swrr` and
/// `weighted_round_robin`; `least_loaded`; `least_connections`; `chash`). Read from config
/// files as one of those strings; an unknown one is refused with the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum BalancerKind {
    /// [`RoundRobin`].
    RoundRobin,
    /// [`SmoothWeighted`].
    Weighted,
    /// [`Random`].
    Random,
    /// [`P2c`].
    P2c,
    /// [`LeastConnections`].
    LeastConn,
    /// [`ConsistentHash`].
    ConsistentHash,
}

impl BalancerKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [BalancerKind; 6] = [
        BalancerKind::RoundRobin,
        BalancerKind::Weighted,
        BalancerKind::Random,
        BalancerKind::P2c,
        BalancerKind::LeastConn,
        BalancerKind::ConsistentHash,
    ];

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            BalancerKind::RoundRobin => "round_robin",
            BalancerKind::Weighted => "weighted",
            BalancerKind::Random => "random",
            BalancerKind::P2c => "p2c",
            BalancerKind::LeastConn => "least_conn",
            BalancerKind::ConsistentHash => "consistent_hash",
        }
    }

    /// A new balancer of this kind (with its own state).
    pub fn build(self) -> Box<dyn Balancer> {
        match self {
            BalancerKind::RoundRobin => Box::new(RoundRobin::default()),
            BalancerKind::Weighted => Box::new(SmoothWeighted::default()),
            BalancerKind::Random => Box::new(Random),
            BalancerKind::P2c => Box::new(P2c),
            BalancerKind::LeastConn => Box::new(LeastConnections::default()),
            BalancerKind::ConsistentHash => Box::new(ConsistentHash::default()),
        }
    }
}

impl std::fmt::Display for BalancerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BalancerKind {
    type Err = UnknownBalancer;

    fn from_str(name: &str) -> Result<BalancerKind, UnknownBalancer> {
        Ok(match name {
            "round_robin" | "rr" => BalancerKind::RoundRobin,
            "weighted" | "swrr" | "weighted_round_robin" => BalancerKind::Weighted,
            "random" => BalancerKind::Random,
            "p2c" | "least_loaded" => BalancerKind::P2c,
            "least_conn" | "least_connections" => BalancerKind::LeastConn,
            "consistent_hash" | "chash" => BalancerKind::ConsistentHash,
            _ => return Err(UnknownBalancer(name.to_owned())),
        })
    }
}

impl TryFrom<String> for BalancerKind {
    type Error = UnknownBalancer;

    fn try_from(name: String) -> Result<BalancerKind, UnknownBalancer> {
        name.parse()
    }
}

/// A balancer name that is none of [`BalancerKind`]'s; its message lists the known names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownBalancer(pub String);

impl std::fmt::Display for UnknownBalancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = BalancerKind::ALL.iter().map(|k| k.name()).collect();
        write!(
            f,
            "unknown balancer {:?} (use one of {})",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownBalancer {}

/// Each available endpoint in turn, ignoring weights.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Balancer for RoundRobin {
    fn pick(&self, endpoints: &[EndpointView<'_>], _key: Option<u64>) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| endpoints[i].available)
    }
}

/// The available endpoint with the fewest calls in flight per unit of weight (nginx's
/// `least_conn`); among equals, each in turn, so an idle pool still spreads its calls.
#[derive(Debug, Default)]
pub struct LeastConnections {
    next: AtomicUsize,
}

impl Balancer for LeastConnections {
    fn pick(&self, endpoints: &[EndpointView<'_>], _key: Option<u64>) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let e = &endpoints[i];
            if !e.available {
                continue;
            }
            // Compare inflight_a / weight_a with inflight_b / weight_b without division.
            let better = match best {
                None => true,
                Some(j) => {
                    let o = &endpoints[j];
                    (e.inflight as u128) * u128::from(o.weight.max(1))
                        < (o.inflight as u128) * u128::from(e.weight.max(1))
                }
            };
            if better {
                best = Some(i);
            }
        }
        best
    }
}

/// Smooth weighted round robin (the algorithm of nginx's upstream module): every pick adds
/// each endpoint's weight to its running score, takes the highest, and subtracts the total
/// from the winner. Over a cycle of `sum(weights)` picks each endpoint gets exactly its
/// weight, interleaved.
#[derive(Debug, Default)]
pub struct SmoothWeighted {
    current: Mutex<std::collections::HashMap<String, i64>>,
}

impl Balancer for SmoothWeighted {
    fn pick(&self, endpoints: &[EndpointView<'_>], _key: Option<u64>) -> Option<usize> {
        let mut current = self.current.lock();
        // Forget endpoints that left, so a returning one starts fresh.
        if current.len() > endpoints.len() * 2 + 16 {
            current.retain(|id, _| endpoints.iter().any(|e| e.id == id));
        }
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, e) in endpoints.iter().enumerate().filter(|(_, e)| e.available) {
            let w = i64::from(e.weight.max(1));
            total += w;
            // Look up before inserting: only an endpoint seen for the first time allocates.
            let score = match current.get_mut(e.id) {
                Some(score) => score,
                None => current.entry(e.id.to_owned()).or_insert(0),
            };
            *score += w;
            if best.is_none_or(|(_, s)| *score > s) {
                best = Some((i, *score));
            }
        }
        let (winner, _) = best?;
        if let Some(score) = current.get_mut(endpoints[winner].id) {
            *score -= total;
        }
        Some(winner)
    }
}

/// Weighted random.
#[derive(Debug, Default)]
pub struct Random;

impl Balancer for Random {
    fn pick(&self, endpoints: &[EndpointView<'_>], _key: Option<u64>) -> Option<usize> {
        let total: u64 = endpoints
            .iter()
            .filter(|e| e.available)
            .map(|e| u64::from(e.weight.max(1)))
            .sum();
        if total == 0 {
            return None;
        }
        let mut point = rand::rng().random_range(0..total);
        for (i, e) in endpoints.iter().enumerate().filter(|(_, e)| e.available) {
            let w = u64::from(e.weight.max(1));
            if point < w {
                return Some(i);
            }
            point -= w;
        }
        None
    }
}

/// Power of two choices over load: two distinct random available endpoints, the one with the
/// lower `(inflight + 1) × latency / weight` wins. An endpoint with no latency sample yet
/// counts as the fastest seen, so new endpoints get tried.
#[derive(Debug, Default)]
pub struct P2c;

impl P2c {
    fn cost(e: &EndpointView<'_>, floor_latency: f64) -> f64 {
        let latency = if e.latency_us > 0.0 {
            e.latency_us
        } else {
            floor_latency
        };
        (e.inflight as f64 + 1.0) * latency.max(1.0) / f64::from(e.weight.max(1))
    }
}

impl Balancer for P2c {
    fn pick(&self, endpoints: &[EndpointView<'_>], _key: Option<u64>) -> Option<usize> {
        let available: Vec<usize> = (0..endpoints.len())
            .filter(|&i| endpoints[i].available)
            .collect();
        match available.len() {
            0 => return None,
            1 => return Some(available[0]),
            _ => {}
        }
        let mut rng = rand::rng();
        let a = available[rng.random_range(0..available.len())];
        let mut b = available[rng.random_range(0..available.len() - 1)];
        if b == a {
            b = available[available.len() - 1];
        }
        let floor = endpoints
            .iter()
            .map(|e| e.latency_us)
            .filter(|l| *l > 0.0)
            .fold(f64::INFINITY, f64::min);
        let floor = if floor.is_finite() { floor } else { 1.0 };
        if Self::cost(&endpoints[a], floor) <= Self::cost(&endpoints[b], floor) {
            Some(a)
        } else {
            Some(b)
        }
    }
}

pub use keel_rpc::client::hash_key;

/// Virtual nodes per endpoint of the default weight (100).
const VNODES_PER_100: u32 = 160;

/// A hash ring with virtual nodes proportional to weight. Calls without a key get a random
/// point. Unavailable endpoints are skipped by walking on along the ring, so their keys spread
/// over the others and come back when they do.
#[derive(Debug, Default)]
pub struct ConsistentHash {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    /// Identity of the endpoint set the ring was built for: (id, weight) in order.
    built_for: Vec<(String, u32)>,
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, usize)>,
}

impl Ring {
    fn build(endpoints: &[EndpointView<'_>]) -> Ring {
        let mut points = Vec::new();
        for (i, e) in endpoints.iter().enumerate() {
            let vnodes = (u64::from(e.weight.max(1)) * u64::from(VNODES_PER_100) / 100).max(1);
            for v in 0..vnodes {
                points.push((hash_key(format!("{}#{v}", e.id).as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring {
            built_for: endpoints
                .iter()
                .map(|e| (e.id.to_owned(), e.weight))
                .collect(),
            points,
        }
    }

    fn matches(&self, endpoints: &[EndpointView<'_>]) -> bool {
        self.built_for.len() == endpoints.len()
            && self
                .built_for
                .iter()
                .zip(endpoints)
                .all(|((id, w), e)| id == e.id && *w == e.weight)
    }
}

impl Balancer for ConsistentHash {
    fn pick(&self, endpoints: &[EndpointView<'_>], key: Option<u64>) -> Option<usize> {
        if !endpoints.iter().any(|e| e.available) {
            return None;
        }
        let mut ring = self.ring.lock();
        if !ring.matches(endpoints) {
            *ring = Ring::build(endpoints);
        }
        let point = key.unwrap_or_else(|| rand::rng().random());
        let start = ring.points.partition_point(|(p, _)| *p < point);
        let n = ring.points.len();
        (0..n)
            .map(|k| ring.points[(start + k) % n].1)
            .find(|&i| endpoints[i].available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn views(weights: &[u32]) -> Vec<(String, u32)> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("i{i}"), *w))
            .collect()
    }

    fn as_views(v: &[(String, u32)]) -> Vec<EndpointView<'_>> {
        v.iter()
            .map(|(id, w)| EndpointView {
                id,
                weight: *w,
                available: true,
                inflight: 0,
                latency_us: 0.0,
            })
            .collect()
    }

    fn counts(b: &dyn Balancer, eps: &[EndpointView<'_>], picks: usize) -> Vec<usize> {
        let mut c = vec![0; eps.len()];
        for _ in 0..picks {
            c[b.pick(eps, None).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_per_weight() {
        let v = views(&[100, 100, 200]);
        let mut eps = as_views(&v);
        eps[0].inflight = 3;
        eps[1].inflight = 1;
        eps[2].inflight = 3; // 1.5 per 100 of weight: more loaded than [1]
        let b = LeastConnections::default();
        assert_eq!(b.pick(&eps, None), Some(1));
        eps[1].available = false;
        assert_eq!(b.pick(&eps, None), Some(2));
        // All idle: every endpoint gets its turn.
        let eps = as_views(&v);
        let c = counts(&b, &eps, 300);
        assert_eq!(c, vec![100, 100, 100]);
    }

    #[test]
    fn round_robin_skips_unavailable_endpoints() {
        let v = views(&[100, 100, 100]);
        let mut eps = as_views(&v);
        eps[1].available = false;
        let c = counts(&RoundRobin::default(), &eps, 300);
        assert_eq!(c[1], 0);
        assert_eq!(c[0] + c[2], 300);
        assert!((c[0] as i64 - c[2] as i64).abs() <= 100);
        eps[0].available = false;
        eps[2].available = false;
        assert_eq!(RoundRobin::default().pick(&eps, None), None);
    }

    #[test]
    fn smooth_weighted_interleaves() {
        let v = views(&[5, 1, 1]);
        let eps = as_views(&v);
        let b = SmoothWeighted::default();
        let seq: Vec<usize> = (0..7).map(|_| b.pick(&eps, None).unwrap()).collect();
        // nginx's example: a a b a c a a (not a a a a a b c).
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let v = views(&[100, 100]);
        let mut eps = as_views(&v);
        eps[0].inflight = 50;
        eps[0].latency_us = 1000.0;
        eps[1].latency_us = 1000.0;
        let c = counts(&P2c, &eps, 1000);
        assert_eq!(c[1], 1000, "with two endpoints both are always compared");
    }

    proptest! {
        // Each case makes tens of thousands of picks; 32 cases keep the suite quick.
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn smooth_weighted_honours_weights_exactly_per_cycle(weights in proptest::collection::vec(1u32..20, 1..8)) {
            let v = views(&weights);
            let eps = as_views(&v);
            let b = SmoothWeighted::default();
            let total: u32 = weights.iter().sum();
            let c = counts(&b, &eps, total as usize * 3);
            for (i, w) in weights.iter().enumerate() {
                prop_assert_eq!(c[i], *w as usize * 3);
            }
        }

        #[test]
        fn random_distribution_follows_weights(weights in proptest::collection::vec(1u32..10, 2..6)) {
            let v = views(&weights);
            let eps = as_views(&v);
            let picks = 40_000;
            let c = counts(&Random, &eps, picks);
            let total: u32 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let expected = picks as f64 * f64::from(*w) / f64::from(total);
                // Within 5 standard deviations of a binomial: fails by chance ~1 in 10^6.
                let p = f64::from(*w) / f64::from(total);
                let sd = (picks as f64 * p * (1.0 - p)).sqrt();
                prop_assert!((c[i] as f64 - expected).abs() <= 5.0 * sd + 1.0,
                    "endpoint {} got {} picks, expected {:.0}", i, c[i], expected);
            }
        }

        #[test]
        fn consistent_hash_moves_about_one_nth_of_keys_when_a_node_joins(n in 3usize..12) {
            let before = views(&vec![100; n]);
            let mut after = before.clone();
            after.push((format!("i{n}"), 100));
            let (b1, b2) = (ConsistentHash::default(), ConsistentHash::default());
            let (e1, e2) = (as_views(&before), as_views(&after));
            let keys = 20_000u64;
            let mut moved = 0;
            for k in 0..keys {
                let key = hash_key(&k.to_le_bytes());
                let x = b1.pick(&e1, Some(key)).unwrap();
                let y = b2.pick(&e2, Some(key)).unwrap();
                if e1[x].id != e2[y].id {
                    // A key only ever moves to the new node.
                    prop_assert_eq!(y, n);
                    moved += 1;
                }
            }
            let share = moved as f64 / keys as f64;
            let ideal = 1.0 / (n as f64 + 1.0);
            prop_assert!((share - ideal).abs() < ideal * 0.5 + 0.02,
                "{} of keys moved; 1/N is {}", share, ideal);
        }

        #[test]
        fn consistent_hash_respects_weights(w in 1u32..4) {
            let v = vec![("a".to_owned(), 100 * w), ("b".to_owned(), 100)];
            let eps = as_views(&v);
            let b = ConsistentHash::default();
            let mut a = 0;
            let keys = 20_000u64;
            for k in 0..keys {
                if b.pick(&eps, Some(hash_key(&k.to_le_bytes()))).unwrap() == 0 {
                    a += 1;
                }
            }
            let share = a as f64 / keys as f64;
            let ideal = f64::from(w) / f64::from(w + 1);
            prop_assert!((share - ideal).abs() < 0.08, "{} vs {}", share, ideal);
        }

        #[test]
        fn consistent_hash_skips_an_unavailable_node_and_only_its_keys_move(n in 3usize..8) {
            let v = views(&vec![100; n]);
            let mut eps = as_views(&v);
            let b = ConsistentHash::default();
            let keys: Vec<u64> = (0..5_000u64).map(|k| hash_key(&k.to_le_bytes())).collect();
            let first: Vec<usize> = keys.iter().map(|k| b.pick(&eps, Some(*k)).unwrap()).collect();
            eps[0].available = false;
            for (k, was) in keys.iter().zip(&first) {
                let now = b.pick(&eps, Some(*k)).unwrap();
                prop_assert!(now != 0);
                if *was != 0 {
                    prop_assert_eq!(now, *was);
                }
            }
        }
    }
}
