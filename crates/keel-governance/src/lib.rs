//! Service governance for Keel clients (and the gateway): how a caller finds the instances of a
//! service and spreads calls over them.
//!
//! - [`discover`]: the [`Discover`] trait that registries implement (Keel's own registry, etcd)
//!   and a static list for tests and fixed deployments. A client depends only on the trait.

pub mod discover;

pub use discover::{Discover, DiscoverError, Endpoints, Instance, StaticDiscover};
