//! A retry budget: retries (and hedged requests) may add at most `ratio` extra load over a
//! sliding window of about ten seconds, plus a small floor of `min_per_sec` so a quiet client
//! can still retry. Without a budget, retries on an overloaded service multiply its load
//! exactly when it can least take it.

use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

const SLOTS: usize = 10;
const SLOT: Duration = Duration::from_secs(1);

/// Retry settings of a service channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per call, the first included (1 disables retries).
    pub max_attempts: u32,
    /// Extra load retries may add, as a share of calls (0.1 = 10%).
    pub budget_ratio: f64,
    /// Retries allowed each second whatever the ratio.
    pub min_retries_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            budget_ratio: 0.1,
            min_retries_per_sec: 10,
        }
    }
}

#[derive(Debug)]
struct Window {
    /// (calls, retries) per one-second slot.
    slots: [(u64, u64); SLOTS],
    current: usize,
    slot_start: Instant,
}

/// The shared budget of one service channel.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: u64,
    window: Mutex<Window>,
}

impl RetryBudget {
    /// A budget allowing `ratio` extra load plus `min_per_sec` retries a second.
    pub fn new(ratio: f64, min_per_sec: u32) -> RetryBudget {
        RetryBudget {
            ratio: ratio.max(0.0),
            min_per_sec: u64::from(min_per_sec),
            window: Mutex::new(Window {
                slots: [(0, 0); SLOTS],
                current: 0,
                slot_start: Instant::now(),
            }),
        }
    }

    fn rotate(w: &mut Window, now: Instant) {
        let mut steps = 0;
        while now.duration_since(w.slot_start) >= SLOT && steps < SLOTS {
            w.current = (w.current + 1) % SLOTS;
            w.slots[w.current] = (0, 0);
            w.slot_start += SLOT;
            steps += 1;
        }
        if now.duration_since(w.slot_start) >= SLOT {
            // Idle for longer than the whole window.
            w.slot_start = now;
        }
    }

    /// Counts a call.
    pub fn deposit(&self) {
        let mut w = self.window.lock();
        Self::rotate(&mut w, Instant::now());
        let current = w.current;
        w.slots[current].0 += 1;
    }

    /// Takes a retry from the budget; false if the budget is spent.
    pub fn withdraw(&self) -> bool {
        let mut w = self.window.lock();
        Self::rotate(&mut w, Instant::now());
        let (calls, retries) = w
            .slots
            .iter()
            .fold((0, 0), |(c, r), (c2, r2)| (c + c2, r + r2));
        let current = w.current;
        let allowed = (retries as f64 + 1.0) <= calls as f64 * self.ratio
            || w.slots[current].1 < self.min_per_sec;
        if allowed {
            w.slots[current].1 += 1;
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_the_ratio_plus_the_floor() {
        let b = RetryBudget::new(0.1, 10);
        let mut granted = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                granted += 1;
            }
        }
        // 10% of 1000 calls, plus at most the floor of 10 for this second.
        assert!(granted <= 110, "{granted}");
        assert!(granted >= 100, "{granted}");
        // The window forgets: after ten quiet seconds only the floor remains.
        tokio::time::advance(Duration::from_secs(11)).await;
        let mut floor = 0;
        for _ in 0..100 {
            if b.withdraw() {
                floor += 1;
            }
        }
        assert_eq!(floor, 10);
    }
}
