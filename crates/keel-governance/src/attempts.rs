//! [`Attempts`]: the policy around one request's attempts, written once for every caller that
//! spreads requests over several endpoints — [`ServiceChannel`](crate::ServiceChannel)'s
//! unary and streaming calls and the gateway's forwarding.
//!
//! The caller keeps its own I/O (an RPC call, an HTTP exchange on a pooled connection) and
//! runs this loop, asking the driver at each step:
//!
//! ```text
//! let mut attempts = Attempts::new(&budget, max_attempts, deadline, &stats); // counts the request
//! loop {
//!     let Some(endpoint) = pick(attempts.tried()) else { break };  // balancer, minus the tried
//!     let time_left = attempts.start()?;                          // deadline check
//!     match send(endpoint, time_left).await {
//!         Ok(answer) => return Ok(answer),
//!         Err(e) if safe_to_send_again(&e) => attempts.retry(endpoint.id, e)?, // or give up
//!         Err(e) => return Err(e),
//!     }
//! }
//! // no endpoint left to pick: attempts.take_last_error() (None if nothing was tried)
//! ```
//!
//! What the driver decides, the same for everyone:
//! - every request is counted in the [`RetryBudget`], and every retry and backup request
//!   ([`Attempts::hedge`]) is taken from it; a refusal is counted in
//!   [`RetryStats::budget_exhausted`], a retry made in [`RetryStats::retries`];
//! - at most `max_attempts` attempts in all: no budget is spent on a retry that could not be
//!   made;
//! - with a deadline, no attempt starts after it, and each attempt is given the time left;
//! - an endpoint that failed is not picked again for the same request ([`Attempts::tried`]).
//!
//! Which failures are safe to send again is the caller's to say: an RPC call that did not run
//! (`unavailable`, `overloaded`), an HTTP request that got no answer and can be replayed.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::RetryBudget;

/// Counters of the retries a caller made and could not make.
#[derive(Debug, Default)]
pub struct RetryStats {
    /// Retries sent.
    pub retries: AtomicU64,
    /// Retries and backup requests refused by the budget.
    pub budget_exhausted: AtomicU64,
}

/// Why a request is not tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp<E> {
    /// `max_attempts` attempts were made; the last one's error.
    Attempts(E),
    /// The retry budget is spent; the last attempt's error.
    Budget(E),
    /// The deadline passed before another attempt could start; the last attempt's error, if
    /// one was made.
    Deadline(Option<E>),
}

impl<E> GiveUp<E> {
    /// The last attempt's error, if there was an attempt.
    pub fn into_error(self) -> Option<E> {
        match self {
            GiveUp::Attempts(e) | GiveUp::Budget(e) => Some(e),
            GiveUp::Deadline(e) => e,
        }
    }
}

/// One request's attempts; see the [module docs](self).
#[derive(Debug)]
pub struct Attempts<'a, Id, E> {
    budget: &'a RetryBudget,
    stats: &'a RetryStats,
    max_attempts: u32,
    deadline: Option<Instant>,
    made: u32,
    tried: Vec<Id>,
    last_error: Option<E>,
}

impl<'a, Id: PartialEq, E> Attempts<'a, Id, E> {
    /// The attempts of a new request (counted in `budget` now): at most `max_attempts` (at
    /// least one), none starting after `deadline`.
    pub fn new(
        budget: &'a RetryBudget,
        max_attempts: u32,
        deadline: Option<Instant>,
        stats: &'a RetryStats,
    ) -> Attempts<'a, Id, E> {
        budget.deposit();
        Attempts {
            budget,
            stats,
            max_attempts: max_attempts.max(1),
            deadline,
            made: 0,
            tried: Vec::new(),
            last_error: None,
        }
    }

    /// The endpoints that failed this request: not to be picked again.
    pub fn tried(&self) -> &[Id] {
        &self.tried
    }

    /// An attempt starts now: the time left before the deadline (`None` without one), or
    /// [`GiveUp::Deadline`] if it has passed.
    pub fn start(&mut self) -> Result<Option<Duration>, GiveUp<E>> {
        let left = match self.deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(GiveUp::Deadline(self.last_error.take()));
                }
                Some(left)
            }
        };
        self.made += 1;
        Ok(left)
    }

    /// The attempt on `endpoint` failed with `error`, which another endpoint may not meet:
    /// `Ok` to send the request again (counted as a retry, `endpoint` excluded from now on),
    /// or why not.
    pub fn retry(&mut self, endpoint: Id, error: E) -> Result<(), GiveUp<E>> {
        self.tried.push(endpoint);
        if self.made >= self.max_attempts {
            return Err(GiveUp::Attempts(error));
        }
        if !self.budget.withdraw() {
            self.stats.budget_exhausted.fetch_add(1, Relaxed);
            return Err(GiveUp::Budget(error));
        }
        self.stats.retries.fetch_add(1, Relaxed);
        self.last_error = Some(error);
        Ok(())
    }

    /// May a backup request be sent beside the attempt in flight (hedging)? Takes it from the
    /// budget; a refusal is counted.
    pub fn hedge(&self) -> bool {
        if self.budget.withdraw() {
            true
        } else {
            self.stats.budget_exhausted.fetch_add(1, Relaxed);
            false
        }
    }

    /// When no endpoint is left to pick: the last failed attempt's error (taken), `None` if
    /// no attempt was made (nothing was available at all).
    pub fn take_last_error(&mut self) -> Option<E> {
        self.last_error.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> RetryBudget {
        RetryBudget::new(0.2, 10)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_max_attempts_without_spending_budget_on_the_last() {
        let (budget, stats) = (budget(), RetryStats::default());
        let mut attempts: Attempts<'_, u32, &str> = Attempts::new(&budget, 3, None, &stats);
        for id in 0..2 {
            assert_eq!(attempts.start(), Ok(None));
            assert_eq!(attempts.retry(id, "down"), Ok(()));
        }
        assert_eq!(attempts.start(), Ok(None));
        assert_eq!(attempts.retry(2, "down"), Err(GiveUp::Attempts("down")));
        assert_eq!(attempts.tried(), &[0, 1, 2]);
        assert_eq!(stats.retries.load(Relaxed), 2);
        assert_eq!(stats.budget_exhausted.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_refuses_the_retry_and_counts_it() {
        let budget = RetryBudget::new(0.0, 0);
        let stats = RetryStats::default();
        let mut attempts: Attempts<'_, u32, &str> = Attempts::new(&budget, 5, None, &stats);
        attempts.start().unwrap();
        assert_eq!(attempts.retry(7, "down"), Err(GiveUp::Budget("down")));
        assert!(!attempts.hedge());
        assert_eq!(stats.budget_exhausted.load(Relaxed), 2);
        assert_eq!(stats.retries.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_after_the_deadline_and_each_gets_the_time_left() {
        let (budget, stats) = (budget(), RetryStats::default());
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut attempts: Attempts<'_, u32, &str> =
            Attempts::new(&budget, 5, Some(deadline), &stats);
        assert_eq!(attempts.start(), Ok(Some(Duration::from_millis(100))));
        tokio::time::advance(Duration::from_millis(60)).await;
        attempts.retry(1, "slow").unwrap();
        assert_eq!(attempts.start(), Ok(Some(Duration::from_millis(40))));
        attempts.retry(2, "slower").unwrap();
        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(attempts.start(), Err(GiveUp::Deadline(Some("slower"))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_error_is_kept_for_when_no_endpoint_is_left() {
        let (budget, stats) = (budget(), RetryStats::default());
        let mut untouched: Attempts<'_, u32, &str> = Attempts::new(&budget, 3, None, &stats);
        assert_eq!(untouched.take_last_error(), None);
        let mut attempts: Attempts<'_, u32, &str> = Attempts::new(&budget, 3, None, &stats);
        attempts.start().unwrap();
        attempts.retry(1, "refused").unwrap();
        assert_eq!(attempts.take_last_error(), Some("refused"));
    }
}
