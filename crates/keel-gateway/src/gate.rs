//! The opening-time gate: a route that sells something from a given moment on (a flash sale)
//! refuses requests for it that come early, at the gateway, before they cost the service
//! anything.
//!
//! Opening times live in the naming service (Keel's registry or etcd) as config entries: the key is the gate's `prefix`
//! followed by the request's key (a segment of its path), the value the opening time as
//! RFC 3339 text or Unix milliseconds. The gateway follows the prefix with a watch (resuming
//! from its last revision after a break: `keel_registry::follow_config`). A request whose key has an opening time still to
//! come gets 403 `not_started` with `Retry-After`; any other passes — the service behind
//! stays the authority, the gate only spares it the early crowd.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use keel_registry::{ConfigChange, Naming, NamingAddress, follow_config};
use serde::Deserialize;

/// `[routes.gate]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// Where the opening times are: Keel's registry (`HOST:PORT`) or etcd
    /// (`etcd://HOST:PORT[,HOST:PORT…][?prefix=/P]`).
    pub registry: String,
    /// The registry namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Config keys under this prefix are opening times.
    pub prefix: String,
    /// Which segment of the request's path is its key, counting from 1
    /// (`/api/items/{id}/buy`: 3).
    pub path_segment: usize,
}

fn default_namespace() -> String {
    "default".into()
}

impl GateConfig {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.registry.is_empty() || self.prefix.is_empty() {
            return Err("gate needs a registry and a prefix".into());
        }
        NamingAddress::parse(&self.registry).map_err(|e| format!("gate: {e}"))?;
        if self.path_segment == 0 {
            return Err("gate path_segment counts from 1".into());
        }
        Ok(())
    }
}

/// A route's gate: the opening times it knows.
#[derive(Debug)]
pub(crate) struct Gate {
    config: GateConfig,
    opens: ArcSwap<HashMap<String, u64>>,
    started: AtomicBool,
}

/// An opening time in an entry's value: RFC 3339 or Unix milliseconds.
fn parse_time(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if let Ok(ms) = text.parse::<u64>() {
        return Some(ms);
    }
    let at = humantime::parse_rfc3339_weak(text).ok()?;
    Some(at.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Gate {
    pub(crate) fn new(config: &GateConfig) -> Gate {
        Gate {
            config: config.clone(),
            opens: ArcSwap::from_pointee(HashMap::new()),
            started: AtomicBool::new(false),
        }
    }

    /// The request's key: its path's `path_segment`-th segment.
    fn key<'a>(&self, path: &'a str) -> Option<&'a str> {
        path.split('/')
            .filter(|s| !s.is_empty())
            .nth(self.config.path_segment - 1)
    }

    /// `Err(wait)` if the request for `path` comes `wait` before its opening time.
    pub(crate) fn check(&self, path: &str) -> Result<(), Duration> {
        let Some(key) = self.key(path) else {
            return Ok(());
        };
        match self.opens.load().get(key) {
            Some(&opens) => {
                let now = now_ms();
                if now < opens {
                    Err(Duration::from_millis(opens - now))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }

    fn apply(&self, entries: impl IntoIterator<Item = (String, Option<u64>)>, reset: bool) {
        let mut next = if reset {
            HashMap::new()
        } else {
            (**self.opens.load()).clone()
        };
        for (key, opens) in entries {
            let Some(key) = key.strip_prefix(&self.config.prefix) else {
                continue;
            };
            match opens {
                Some(ms) => next.insert(key.to_owned(), ms),
                None => next.remove(key),
            };
        }
        self.opens.store(Arc::new(next));
    }
}

/// Starts following the gate's registry prefix (once; later calls do nothing). The watch
/// ends when the gate is dropped, e.g. replaced by a reload.
pub(crate) fn start(gate: &Arc<Gate>) {
    if gate.started.swap(true, Ordering::Relaxed) {
        return;
    }
    tokio::spawn(follow(Arc::downgrade(gate), gate.config.clone()));
}

async fn follow(gate: Weak<Gate>, config: GateConfig) {
    // Keel's registry is reached lazily; etcd is connected here, retried while it is away.
    let backoff = keel_net::Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
        ..keel_net::Backoff::default()
    };
    let mut attempt = 0;
    let naming = loop {
        match Naming::connect(&config.registry).await {
            Ok(naming) => break naming,
            Err(e) => {
                if gate.strong_count() == 0 {
                    return;
                }
                tracing::warn!(registry = %config.registry, error = %e, "the gate cannot reach its registry; retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
        }
    };
    let mut changes = follow_config(naming, config.namespace.clone(), config.prefix.clone());
    loop {
        // Wake now and then to notice that the gate is gone.
        let change = tokio::select! {
            c = changes.recv() => c,
            () = tokio::time::sleep(Duration::from_secs(5)) => {
                if gate.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let (Some(change), Some(gate)) = (change, gate.upgrade()) else {
            return;
        };
        match change {
            ConfigChange::Reset { entries, .. } => gate.apply(
                entries.into_iter().map(|c| {
                    let opens = parse_time(&c.value);
                    (c.key, opens)
                }),
                true,
            ),
            ConfigChange::Put(c) => {
                let opens = parse_time(&c.value);
                gate.apply([(c.key, opens)], false);
            }
            ConfigChange::Delete { key, .. } => gate.apply([(key, None)], false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_times_are_read_and_keys_taken_from_the_path() {
        assert_eq!(parse_time(b"1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time(b"2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        assert_eq!(parse_time(b"soon"), None);
        let gate = Gate::new(&GateConfig {
            registry: "127.0.0.1:1".into(),
            namespace: "default".into(),
            prefix: "sale/opens/".into(),
            path_segment: 3,
        });
        assert_eq!(gate.key("/api/items/item-7/buy"), Some("item-7"));
        assert_eq!(gate.key("/api/items"), None);
        let later = now_ms() + 60_000;
        gate.apply(
            [
                ("sale/opens/item-7".to_owned(), Some(later)),
                ("sale/opens/item-8".to_owned(), Some(1)),
                ("other/item-9".to_owned(), Some(later)),
            ],
            true,
        );
        let wait = gate.check("/api/items/item-7/buy").unwrap_err();
        assert!(wait > Duration::from_secs(55), "{wait:?}");
        assert!(gate.check("/api/items/item-8/buy").is_ok(), "opened");
        assert!(gate.check("/api/items/item-9/buy").is_ok(), "not ours");
        gate.apply([("sale/opens/item-7".to_owned(), None)], false);
        assert!(gate.check("/api/items/item-7/buy").is_ok(), "deleted");
    }
}
