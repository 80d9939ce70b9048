//! Service governance for Keel clients (and the gateway): how a caller finds the instances of a
//! service and spreads calls over them, and what it does when some of them fail.
//!
//! - [`discover`]: the [`Discover`] trait that registries implement (Keel's own registry, etcd)
//!   and a static list for tests and fixed deployments. A client depends only on the trait.
//! - [`balance`]: balancers (round robin, smooth weighted, random, P2C peak-EWMA, consistent
//!   hash), pure policy over per-endpoint views.
//! - [`endpoint`]: per-endpoint statistics: calls in flight, peak-EWMA latency, and outlier
//!   ejection with half-open probes.
//! - [`budget`]: the retry budget that bounds the extra load of retries and hedges.
//! - [`attempts`]: [`Attempts`], the policy around one request's attempts (budget, attempt
//!   count, deadline, endpoints already tried), shared by [`ServiceChannel`] and the gateway.
//! - [`channel`]: [`ServiceChannel`], the `CallTransport` that puts them together: calls by
//!   service name with zone preference, balancing, retries, hedging and ejection.

pub mod attempts;
pub mod balance;
pub mod budget;
pub mod channel;
pub mod discover;
pub mod endpoint;

pub use attempts::{Attempts, GiveUp, RetryStats};
pub use balance::{Balancer, BalancerKind};
pub use budget::{RetryBudget, RetryConfig};
pub use channel::{ServiceChannel, ServiceChannelConfig};
pub use discover::{Discover, DiscoverError, Endpoints, Instance, StaticDiscover};
pub use endpoint::OutlierConfig;
