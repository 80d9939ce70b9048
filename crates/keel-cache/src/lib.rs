//! Keel's two-level cache, as the seeds' cache notes put it: a local cache in each process in
//! front of a distributed one, loads coalesced, entries invalidated when the data changes.
//!
//! - [`TwoLevel`]: the cache. A read looks in the process's own tier (a bounded
//!   [`moka`] LRU with a time to live), then in the shared tier, and only then loads from the
//!   source; concurrent misses of one key share a single load (single-flight), also across
//!   the two tiers. [`TwoLevel::invalidate`] drops a key from this process, from the shared
//!   tier, and, through the shared tier, from every other process's local tier.
//! - [`SharedTier`]: what a shared tier does; [`RedisTier`] is the one to run at scale
//!   (values under a key prefix with a time to live, invalidations over pub/sub), and
//!   [`MemoryTier`] the same contract inside one process.
//!
//! A load that was running when its key was invalidated answers its own callers, but its
//! value is kept in neither tier: locally it is dropped, and in the shared tier it is written
//! only if the key's version (raised by every invalidation, from any process) is still the one
//! read before loading, checked and written atomically. So a read that starts after an
//! invalidation never sees data from before it, in this process; other processes drop their
//! local copy when the invalidation reaches them over pub/sub, and the local time to live
//! bounds what a lost message can leave behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;

mod tiers;

pub use tiers::{Invalidation, MemoryTier, RedisTier, SharedTier};

/// What a shared tier can fail with. The cache itself never fails on these: a shared tier
/// that cannot answer counts as a miss, and a failed write is logged and counted.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Anything else the tier reports.
    #[error("{0}")]
    Other(String),
}

/// Settings of a [`TwoLevel`] cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Names the cache in the shared tier (see [`RedisTier`] for the keys it uses there).
    pub name: String,
    /// Entries the local tier holds at most (least recently used go first).
    pub local_capacity: u64,
    /// How long a local entry lives.
    pub local_ttl: Duration,
    /// How long a shared entry lives.
    pub shared_ttl: Duration,
}

impl CacheConfig {
    /// A cache named `name`: 10,000 local entries, one second in each tier.
    pub fn new(name: impl Into<String>) -> CacheConfig {
        CacheConfig {
            name: name.into(),
            local_capacity: 10_000,
            local_ttl: Duration::from_secs(1),
            shared_ttl: Duration::from_secs(1),
        }
    }
}

/// Counters of a [`TwoLevel`] cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads answered by the local tier.
    pub local_hits: AtomicU64,
    /// Reads answered by the shared tier.
    pub shared_hits: AtomicU64,
    /// Loads from the source.
    pub loads: AtomicU64,
    /// Reads that waited for a load another read had started.
    pub coalesced: AtomicU64,
    /// Invalidations made here.
    pub invalidations: AtomicU64,
    /// Invalidations from other processes applied here.
    pub remote_invalidations: AtomicU64,
    /// Shared-tier operations that failed.
    pub shared_errors: AtomicU64,
}

type Flight<V, E> = Arc<OnceCell<Result<V, E>>>;

struct Inner<V: Clone + Send + Sync + 'static, E> {
    config: CacheConfig,
    local: moka::sync::Cache<String, V>,
    shared: Option<Arc<dyn SharedTier>>,
    flights: Mutex<HashMap<String, Flight<V, E>>>,
    stats: CacheStats,
}

/// A two-level cache of `V` by string key, loading with errors of type `E`.
pub struct TwoLevel<V: Clone + Send + Sync + 'static, E = String> {
    inner: Arc<Inner<V, E>>,
}

impl<V: Clone + Send + Sync + 'static, E> Clone for TwoLevel<V, E> {
    fn clone(&self) -> Self {
        TwoLevel {
            inner: self.inner.clone(),
        }
    }
}

impl<V: Clone + Send + Sync + 'static, E> std::fmt::Debug for TwoLevel<V, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwoLevel")
            .field("name", &self.inner.config.name)
            .field("shared", &self.inner.shared.is_some())
            .field("local_entries", &self.inner.local.entry_count())
            .finish()
    }
}

impl<V, E> TwoLevel<V, E>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A cache with only the local tier.
    pub fn local(config: CacheConfig) -> TwoLevel<V, E> {
        TwoLevel::build(config, None)
    }

    /// A cache with the local tier in front of `shared`; follows the invalidations other
    /// processes publish there for as long as the cache lives. Needs a Tokio runtime.
    pub async fn with_shared(
        config: CacheConfig,
        shared: Arc<dyn SharedTier>,
    ) -> Result<TwoLevel<V, E>, CacheError> {
        let mut invalidations = shared.invalidations(&config.name).await?;
        let cache = TwoLevel::build(config, Some(shared));
        let weak = Arc::downgrade(&cache.inner);
        tokio::spawn(async move {
            while let Some(invalidation) = invalidations.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                inner
                    .stats
                    .remote_invalidations
                    .fetch_add(1, Ordering::Relaxed);
                match invalidation {
                    Invalidation::Key(key) => drop_local(&inner, &key),
                    Invalidation::All => {
                        inner.flights.lock().clear();
                        inner.local.invalidate_all();
                    }
                }
            }
        });
        Ok(cache)
    }

    fn build(config: CacheConfig, shared: Option<Arc<dyn SharedTier>>) -> TwoLevel<V, E> {
        let local = moka::sync::Cache::builder()
            .max_capacity(config.local_capacity)
            .time_to_live(config.local_ttl)
            .build();
        TwoLevel {
            inner: Arc::new(Inner {
                config,
                local,
                shared,
                flights: Mutex::new(HashMap::new()),
                stats: CacheStats::default(),
            }),
        }
    }

    /// The value of `key`: from the local tier, else the shared tier, else `load` (whose
    /// value then goes into both). Concurrent calls for one key share one lookup and one load;
    /// a failed load is answered to those waiting for it and kept nowhere.
    pub async fn get_or_load<F, Fut>(&self, key: &str, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let inner = &self.inner;
        if let Some(v) = inner.local.get(key) {
            inner.stats.local_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(v);
        }
        let flight = {
            let mut flights = inner.flights.lock();
            match flights.get(key) {
                Some(f) => {
                    inner.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                    f.clone()
                }
                None => {
                    let f: Flight<V, E> = Arc::new(OnceCell::new());
                    flights.insert(key.to_owned(), f.clone());
                    f
                }
            }
        };
        // The first caller's lookup runs; the others wait for it (and one of them takes over
        // if the first is cancelled).
        let result = flight
            .get_or_init(|| self.lookup(key, &flight, load))
            .await
            .clone();
        // The first to finish files the value, if the flight is still the key's current one
        // (an invalidation since it started removed it).
        {
            let mut flights = inner.flights.lock();
            if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                flights.remove(key);
                if let Ok(v) = &result {
                    inner.local.insert(key.to_owned(), v.clone());
                }
            }
        }
        result
    }

    async fn lookup<F, Fut>(&self, key: &str, flight: &Flight<V, E>, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let inner = &self.inner;
        let name = &inner.config.name;
        if let Some(shared) = &inner.shared {
            match shared.get(name, key).await {
                Ok(Some(bytes)) => match serde_json::from_slice::<V>(&bytes) {
                    Ok(v) => {
                        inner.stats.shared_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(e) => {
                        tracing::warn!(cache = %name, key, error = %e, "unreadable shared cache entry; loading");
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    inner.stats.shared_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(cache = %name, key, error = %e, "shared cache unavailable; loading");
                }
            }
        }
        // The key's version before loading: the value goes into the shared tier only if no
        // invalidation (from any process) came in between.
        let version = match &inner.shared {
            Some(shared) => match shared.version(name, key).await {
                Ok(v) => Some(v),
                Err(e) => {
                    inner.stats.shared_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(cache = %name, key, error = %e, "shared cache unavailable");
                    None
                }
            },
            None => None,
        };
        inner.stats.loads.fetch_add(1, Ordering::Relaxed);
        let value = load().await?;
        let still_current = inner
            .flights
            .lock()
            .get(key)
            .is_some_and(|f| Arc::ptr_eq(f, flight));
        if let (Some(shared), Some(version)) = (&inner.shared, version)
            && still_current
            && let Ok(bytes) = serde_json::to_vec(&value)
            && let Err(e) = shared
                .set_if_version(name, key, bytes, inner.config.shared_ttl, version)
                .await
        {
            inner.stats.shared_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(cache = %name, key, error = %e, "writing the shared cache failed");
        }
        Ok(value)
    }

    /// Drops `key` here, from the shared tier, and (through the shared tier) from the other
    /// processes' local tiers. A load of `key` already running is not kept.
    pub async fn invalidate(&self, key: &str) {
        let inner = &self.inner;
        inner.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        drop_local(inner, key);
        if let Some(shared) = &inner.shared
            && let Err(e) = shared.invalidate(&inner.config.name, key).await
        {
            inner.stats.shared_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key, error = %e, "invalidating the shared cache failed");
        }
    }

    /// The counters.
    pub fn stats(&self) -> &CacheStats {
        &self.inner.stats
    }
}

fn drop_local<V: Clone + Send + Sync + 'static, E>(inner: &Inner<V, E>, key: &str) {
    // Both under the flights lock: a load finishing now either sees its flight gone (and
    // keeps nothing) or filed its value before this removes it.
    let mut flights = inner.flights.lock();
    flights.remove(key);
    inner.local.invalidate(key);
}
