//! Shared tiers: where processes share cached values and tell each other what changed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::CacheError;

/// A change another process (or this one) published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// This key changed.
    Key(String),
    /// Anything may have changed (the tier lost messages, e.g. while reconnecting).
    All,
}

/// A tier that several processes share. Each cache (by name) has its own keys and its own
/// stream of invalidations.
pub trait SharedTier: Send + Sync + 'static {
    /// The value of `key` in cache `cache`, if there is one.
    fn get<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, CacheError>>;
    /// The key's version: a number every invalidation raises (0 if never invalidated, or
    /// long ago).
    fn version<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<u64, CacheError>>;
    /// Stores `value` for `ttl` if the key's version is still `version` (read before the value
    /// was loaded), atomically with that check: a value loaded before an invalidation never
    /// lands after it. True if stored.
    fn set_if_version<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
        version: u64,
    ) -> BoxFuture<'a, Result<bool, CacheError>>;
    /// Raises the key's version, deletes its value and tells every subscriber of `cache`
    /// (this process's too).
    fn invalidate<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// The invalidations of `cache` from now on. Subscribed when this returns.
    fn invalidations<'a>(
        &'a self,
        cache: &'a str,
    ) -> BoxFuture<'a, Result<mpsc::UnboundedReceiver<Invalidation>, CacheError>>;
}

/// The key of a value in a shared tier: `keel-cache:<cache>:<key>`.
pub(crate) fn data_key(cache: &str, key: &str) -> String {
    format!("keel-cache:{cache}:{key}")
}

/// The key of a value's version: `keel-cache:<cache>:<key>:version`.
pub(crate) fn version_key(cache: &str, key: &str) -> String {
    format!("keel-cache:{cache}:{key}:version")
}

/// How long a version outlives the last invalidation (longer than any load takes; a version
/// that has expired reads as 0, which no loader that read a later one matches).
const VERSION_TTL: Duration = Duration::from_secs(600);

/// The pub/sub channel of a cache's invalidations: `keel-cache:<cache>:invalidations`.
pub(crate) fn channel(cache: &str) -> String {
    format!("keel-cache:{cache}:invalidations")
}

/// A shared tier inside one process (for one process, and for tests of the contract).
#[derive(Debug, Default)]
pub struct MemoryTier {
    values: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
    versions: Mutex<HashMap<String, u64>>,
    channels: Mutex<HashMap<String, broadcast::Sender<String>>>,
}

impl MemoryTier {
    /// An empty tier.
    pub fn new() -> Arc<MemoryTier> {
        Arc::new(MemoryTier::default())
    }

    fn sender(&self, cache: &str) -> broadcast::Sender<String> {
        self.channels
            .lock()
            .entry(cache.to_owned())
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }
}

impl SharedTier for MemoryTier {
    fn get<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, CacheError>> {
        let key = data_key(cache, key);
        let mut values = self.values.lock();
        let value = match values.get(&key) {
            Some((v, until)) if Instant::now() < *until => Some(v.clone()),
            Some(_) => {
                values.remove(&key);
                None
            }
            None => None,
        };
        Box::pin(async move { Ok(value) })
    }

    fn version<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<u64, CacheError>> {
        let v = self
            .versions
            .lock()
            .get(&data_key(cache, key))
            .copied()
            .unwrap_or(0);
        Box::pin(async move { Ok(v) })
    }

    fn set_if_version<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
        version: u64,
    ) -> BoxFuture<'a, Result<bool, CacheError>> {
        let k = data_key(cache, key);
        // Checked and stored under the versions lock, which invalidations take too.
        let versions = self.versions.lock();
        let stored = versions.get(&k).copied().unwrap_or(0) == version;
        if stored {
            self.values.lock().insert(k, (value, Instant::now() + ttl));
        }
        drop(versions);
        Box::pin(async move { Ok(stored) })
    }

    fn invalidate<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        {
            let mut versions = self.versions.lock();
            *versions.entry(data_key(cache, key)).or_insert(0) += 1;
            self.values.lock().remove(&data_key(cache, key));
        }
        let _ = self.sender(cache).send(key.to_owned());
        Box::pin(async { Ok(()) })
    }

    fn invalidations<'a>(
        &'a self,
        cache: &'a str,
    ) -> BoxFuture<'a, Result<mpsc::UnboundedReceiver<Invalidation>, CacheError>> {
        let mut rx = self.sender(cache).subscribe();
        let (tx, out) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let next = match rx.recv().await {
                    Ok(key) => Invalidation::Key(key),
                    Err(broadcast::error::RecvError::Lagged(_)) => Invalidation::All,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(next).is_err() {
                    return;
                }
            }
        });
        Box::pin(async move { Ok(out) })
    }
}

/// `SET KEYS[1] ARGV[1] PX ARGV[2]` if `KEYS[2]` (the version, absent = 0) is `ARGV[3]`.
const SET_IF_VERSION: &str = "local v = redis.call('GET', KEYS[2]) or '0' \
if v == ARGV[3] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end return 0";

/// The shared tier on Redis: values under `keel-cache:<cache>:<key>` with a time to live,
/// written only if the key's version (`...:<key>:version`) is still the one read before the
/// value was loaded (a Lua compare-and-set); invalidations as `INCR` of the version, `DEL`
/// and a `PUBLISH` of the key on `keel-cache:<cache>:invalidations`, in one transaction. Commands go through a connection that reconnects on
/// its own and gives up on a command after 500 ms (the cache then loads from the source);
/// the subscription reconnects too, and reports [`Invalidation::All`] after a gap, since
/// messages published meanwhile are lost.
#[derive(Clone)]
pub struct RedisTier {
    client: redis::Client,
    commands: redis::aio::ConnectionManager,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("server", &self.client.get_connection_info().addr())
            .finish()
    }
}

impl RedisTier {
    /// Connects to the Redis at `url` (`redis://host:port/db`).
    pub async fn connect(url: &str) -> Result<Arc<RedisTier>, CacheError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(2);
        let commands =
            redis::aio::ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(Arc::new(RedisTier { client, commands }))
    }
}

impl SharedTier for RedisTier {
    fn get<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, CacheError>> {
        let mut conn = self.commands.clone();
        Box::pin(async move {
            Ok(redis::cmd("GET")
                .arg(data_key(cache, key))
                .query_async(&mut conn)
                .await?)
        })
    }

    fn version<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<u64, CacheError>> {
        let mut conn = self.commands.clone();
        Box::pin(async move {
            let v: Option<u64> = redis::cmd("GET")
                .arg(version_key(cache, key))
                .query_async(&mut conn)
                .await?;
            Ok(v.unwrap_or(0))
        })
    }

    fn set_if_version<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
        version: u64,
    ) -> BoxFuture<'a, Result<bool, CacheError>> {
        let mut conn = self.commands.clone();
        Box::pin(async move {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            // Compare and set in one script: Redis runs it whole, so no invalidation can
            // come between the check and the write.
            let stored: i64 = redis::cmd("EVAL")
                .arg(SET_IF_VERSION)
                .arg(2)
                .arg(data_key(cache, key))
                .arg(version_key(cache, key))
                .arg(value)
                .arg(ms)
                .arg(version)
                .query_async(&mut conn)
                .await?;
            Ok(stored == 1)
        })
    }

    fn invalidate<'a>(
        &'a self,
        cache: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        let mut conn = self.commands.clone();
        Box::pin(async move {
            redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg(version_key(cache, key))
                .ignore()
                .cmd("PEXPIRE")
                .arg(version_key(cache, key))
                .arg(VERSION_TTL.as_millis() as u64)
                .ignore()
                .cmd("DEL")
                .arg(data_key(cache, key))
                .ignore()
                .cmd("PUBLISH")
                .arg(channel(cache))
                .arg(key)
                .ignore()
                .query_async::<()>(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn invalidations<'a>(
        &'a self,
        cache: &'a str,
    ) -> BoxFuture<'a, Result<mpsc::UnboundedReceiver<Invalidation>, CacheError>> {
        let client = self.client.clone();
        let channel = channel(cache);
        Box::pin(async move {
            // The first subscription is made before this returns, so nothing published
            // after it is missed.
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let (tx, out) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                loop {
                    let mut messages = pubsub.into_on_message();
                    while let Some(message) = messages.next().await {
                        let Ok(key) = message.get_payload::<String>() else {
                            continue;
                        };
                        if tx.send(Invalidation::Key(key)).is_err() {
                            return;
                        }
                    }
                    // The connection broke: subscribe again, then assume anything changed.
                    tracing::warn!(%channel, "cache invalidation subscription lost; reconnecting");
                    pubsub = loop {
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let Ok(mut p) = client.get_async_pubsub().await else {
                            continue;
                        };
                        if p.subscribe(&channel).await.is_ok() {
                            break p;
                        }
                    };
                    if tx.send(Invalidation::All).is_err() {
                        return;
                    }
                }
            });
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_channels_carry_the_cache_name() {
        assert_eq!(data_key("items", "item-1"), "keel-cache:items:item-1");
        assert_eq!(channel("items"), "keel-cache:items:invalidations");
    }
}
