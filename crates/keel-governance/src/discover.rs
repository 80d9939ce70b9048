//! Discovery: the live list of a service's instances.
//!
//! A [`Discover`] implementation hands out a `watch` receiver per service. The receiver always
//! holds the latest [`Endpoints`]; a balancer reads it on every pick (a cheap `borrow`) and
//! never waits on the registry. Implementations keep serving the last known list while their
//! source is unreachable, marking it [`Endpoints::stale`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The default weight of an instance that sets none.
pub const DEFAULT_WEIGHT: u32 = 100;

/// One instance of a service, as a caller sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique within the service.
    pub id: String,
    /// Where to connect, `host:port`.
    pub address: String,
    /// Relative share of traffic (see [`DEFAULT_WEIGHT`]).
    pub weight: u32,
    /// Zone (rack, data centre) the instance runs in; empty if unknown.
    #[serde(default)]
    pub zone: String,
    /// Free labels (version, shard, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl Instance {
    /// An instance with the default weight, no zone and no labels.
    pub fn new(id: impl Into<String>, address: impl Into<String>) -> Instance {
        Instance {
            id: id.into(),
            address: address.into(),
            weight: DEFAULT_WEIGHT,
            zone: String::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// The instances of a service at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// The instances that take traffic, sorted by id.
    pub instances: Vec<Instance>,
    /// The source's revision for this list (0 if it has none).
    pub revision: u64,
    /// False until a first list has arrived (from the source or a local cache).
    pub resolved: bool,
    /// The source is unreachable; this is the last list it gave (or the cached one).
    pub stale: bool,
    /// The registry is protecting this service from an empty push: some listed instances
    /// have lost their leases, which may be a network fault rather than an outage.
    pub protected: bool,
}

/// Discovery failed for a reason other than the source being unreachable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoverError {
    /// The service name is not valid for this source.
    #[error("invalid service name {0:?}")]
    InvalidName(String),
    /// The discovery source has shut down.
    #[error("discovery is shut down")]
    Closed,
}

/// A source of service instances.
pub trait Discover: Send + Sync + 'static {
    /// Subscribes to `service`. The receiver holds the latest list and is marked changed
    /// whenever it changes. Several subscriptions to one service share one upstream watch.
    fn subscribe(&self, service: &str) -> Result<watch::Receiver<Arc<Endpoints>>, DiscoverError>;
}

/// A fixed set of services, for tests and deployments without a registry. Lists can be
/// replaced at run time with [`StaticDiscover::set`].
#[derive(Debug, Default)]
pub struct StaticDiscover {
    services: Mutex<HashMap<String, watch::Sender<Arc<Endpoints>>>>,
}

impl StaticDiscover {
    /// An empty set.
    pub fn new() -> StaticDiscover {
        StaticDiscover::default()
    }

    /// Sets (or replaces) the instances of `service`; subscribers see the change.
    pub fn set(&self, service: &str, mut instances: Vec<Instance>) {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        let mut map = self.services.lock();
        let sender = map
            .entry(service.to_owned())
            .or_insert_with(|| watch::Sender::new(Arc::new(Endpoints::default())));
        let revision = sender.borrow().revision + 1;
        sender.send_replace(Arc::new(Endpoints {
            instances,
            revision,
            resolved: true,
            stale: false,
            protected: false,
        }));
    }
}

impl Discover for StaticDiscover {
    fn subscribe(&self, service: &str) -> Result<watch::Receiver<Arc<Endpoints>>, DiscoverError> {
        let mut map = self.services.lock();
        let sender = map.entry(service.to_owned()).or_insert_with(|| {
            watch::Sender::new(Arc::new(Endpoints {
                resolved: true,
                ..Endpoints::default()
            }))
        });
        Ok(sender.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_lists_are_live() {
        let d = StaticDiscover::new();
        let mut rx = d.subscribe("a").unwrap();
        assert!(rx.borrow().resolved && rx.borrow().instances.is_empty());
        d.set(
            "a",
            vec![
                Instance::new("2", "127.0.0.1:2"),
                Instance::new("1", "127.0.0.1:1"),
            ],
        );
        rx.changed().await.unwrap();
        let ids: Vec<_> = rx.borrow().instances.iter().map(|i| i.id.clone()).collect();
        assert_eq!(ids, ["1", "2"]);
    }
}
