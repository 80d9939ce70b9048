//! How the sale's processes find each other: by a fixed address, or by name through Keel's
//! registry, where each process registers itself under a lease.
//!
//! Names: an inventory shard `S` registers as `seckill-inventory-S`, the orders instance that
//! follows it as `seckill-orders-S`, and each API instance as `seckill-api` (the gateway's pool
//! follows that name). Calls go through a governed [`ServiceChannel`] either way, so a peer
//! that restarts on another port is found again through the registry's watch.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use keel_governance::{Discover, Instance, ServiceChannel, ServiceChannelConfig, StaticDiscover};
use keel_registry::{Naming, Registration, RegistryDiscover, proto as reg};

/// How calls to the sale's services travel.
pub type Transport = ServiceChannel;

/// The registry's namespace of the sale.
pub const NAMESPACE: &str = "default";

/// The registered name of the inventory shard `shard`.
pub fn inventory_service(shard: &str) -> String {
    format!("seckill-inventory-{shard}")
}

/// The registered name of the orders instance that follows shard `shard`.
pub fn orders_service(shard: &str) -> String {
    format!("seckill-orders-{shard}")
}

/// The registered name of the API instances.
pub const API_SERVICE: &str = "seckill-api";

/// Registry config keys of the items' opening times (`<prefix><item id>` = RFC 3339), which
/// the gateway's gate on the buy route follows.
pub const OPENS_PREFIX: &str = "seckill/opens/";

/// Registry config keys that say an item's stock changed outside the API (`<prefix><item id>` =
/// the time, set by an orders instance that returned expired units), which the API follows to
/// invalidate its cached figure.
pub const STOCK_PREFIX: &str = "seckill/stock/";

/// A shard name: 1 to 32 characters of `a-z`, `0-9` and `-`, starting with a letter (it
/// prefixes order ids, so it must not need escaping anywhere).
pub fn check_shard(name: &str) -> anyhow::Result<()> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!("shard name {name:?}: use 1 to 32 of a-z, 0-9 and '-', starting with a letter");
    }
    Ok(())
}

/// Where peers are found.
pub struct Peers {
    registry: Option<(Naming, Arc<RegistryDiscover<Naming>>)>,
    fixed: Arc<StaticDiscover>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("registry", &self.registry.is_some())
            .finish()
    }
}

impl Peers {
    /// Peers at fixed addresses only, or also through the naming service at `registry`:
    /// Keel's registry (`HOST:PORT`, reached lazily) or etcd (`etcd://HOST:PORT,…`, connected
    /// here). Needs a Tokio runtime.
    pub async fn connect(registry: Option<&str>) -> anyhow::Result<Peers> {
        let registry = match registry {
            None => None,
            Some(address) => {
                let naming = Naming::connect(address)
                    .await
                    .map_err(|e| anyhow::anyhow!("--registry: {e}"))?;
                let discover = Arc::new(RegistryDiscover::new(naming.clone(), NAMESPACE));
                Some((naming, discover))
            }
        };
        Ok(Peers {
            registry,
            fixed: Arc::new(StaticDiscover::new()),
        })
    }

    /// The naming service, if there is one.
    pub fn registry(&self) -> Option<&Naming> {
        self.registry.as_ref().map(|(naming, _)| naming)
    }

    /// A channel to `service`: at `address` if one is given, otherwise wherever the registry
    /// says it is.
    pub fn channel(&self, service: &str, address: Option<&str>) -> anyhow::Result<Transport> {
        let config = ServiceChannelConfig::default();
        match (address, &self.registry) {
            (Some(address), _) => {
                self.fixed
                    .set(service, vec![Instance::new(address, address.to_owned())]);
                Ok(ServiceChannel::new(self.fixed.as_ref(), service, config)?)
            }
            (None, Some((_, discover))) => Ok(ServiceChannel::new(
                discover.as_ref() as &dyn Discover,
                service,
                config,
            )?),
            (None, None) => bail!("{service} has no address and there is no --registry"),
        }
    }

    /// Registers this process as an instance of `service` at `address` (kept alive in the
    /// background until the returned value is dropped or deregistered); nothing without a
    /// registry.
    pub async fn register(
        &self,
        service: &str,
        address: std::net::SocketAddr,
    ) -> anyhow::Result<Option<Registration<Naming>>> {
        let Some((handle, _)) = &self.registry else {
            return Ok(None);
        };
        // The id carries the process id: a process restarted on the same address registers
        // anew while the dead one's lease runs out.
        let instance = reg::Instance {
            namespace: NAMESPACE.into(),
            service: service.to_owned(),
            id: format!("{address}/{}", std::process::id()),
            address: address.to_string(),
            ..Default::default()
        };
        let registration = Registration::start(handle.clone(), instance, Duration::from_secs(3))
            .await
            .with_context(|| format!("registering {service} at {address}"))?;
        Ok(Some(registration))
    }
}

/// `NAME` or `NAME=HOST:PORT`.
pub fn parse_peer(text: &str) -> Result<(String, Option<String>), String> {
    let (name, address) = match text.split_once('=') {
        Some((n, a)) if !a.is_empty() => (n, Some(a.to_owned())),
        Some(_) => return Err(format!("{text:?}: the address after '=' is empty")),
        None => (text, None),
    };
    check_shard(name).map_err(|e| e.to_string())?;
    Ok((name.to_owned(), address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_and_shard_names_are_checked() {
        assert_eq!(parse_peer("inv-0"), Ok(("inv-0".into(), None)));
        assert_eq!(
            parse_peer("inv-1=127.0.0.1:7200"),
            Ok(("inv-1".into(), Some("127.0.0.1:7200".into())))
        );
        assert!(parse_peer("inv-1=").is_err());
        assert!(parse_peer("Inv").is_err());
        assert!(parse_peer("0inv").is_err());
        assert!(parse_peer("a/b").is_err());
        assert!(parse_peer("").is_err());
    }
}
