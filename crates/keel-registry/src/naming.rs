//! [`Naming`]: Keel's registry or etcd, chosen by an address, as one [`NamingBackend`] —
//! what a process takes from its configuration (`registry = "127.0.0.1:7000"` or
//! `registry = "etcd://h1:2379,h2:2379,h3:2379"`) without being written twice.

use std::time::Duration;

use bytes::Bytes;
use keel_rpc::{Channel, ChannelConfig, Status};

use crate::backend::{EventStream, NamingBackend};
use crate::proto::{ConfigEntry, Instance, LockHolder, ServiceSnapshot};
use crate::{EtcdBackend, RegistryHandle};

/// The key prefix of Keel's entries in etcd when the address names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/keel";

/// Where names are kept, as an address says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamingAddress {
    /// Keel's registry at `HOST:PORT`.
    Keel(String),
    /// An etcd cluster: its endpoints (`http://HOST:PORT`) and Keel's key prefix there.
    Etcd {
        /// The members to connect to (list them all: calls move between the listed ones).
        endpoints: Vec<String>,
        /// The key prefix.
        prefix: String,
    },
}

/// Why a naming service could not be named or reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamingError {
    /// The address is neither `HOST:PORT` nor `etcd://HOST:PORT[,HOST:PORT…][?prefix=/P]`.
    #[error("registry address {address:?}: {reason}")]
    BadAddress {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No member of the etcd cluster answered.
    #[error("cannot reach etcd at {endpoints:?}: {reason}")]
    Unreachable {
        /// The members tried.
        endpoints: Vec<String>,
        /// The client's error.
        reason: String,
    },
}

impl NamingAddress {
    /// Reads `HOST:PORT` (Keel's registry) or `etcd://HOST:PORT[,HOST:PORT…][?prefix=/P]`.
    pub fn parse(address: &str) -> Result<NamingAddress, NamingError> {
        let address = address.trim();
        let bad = |reason: String| NamingError::BadAddress {
            address: address.to_owned(),
            reason,
        };
        let Some(rest) = address.strip_prefix("etcd://") else {
            if address.is_empty() || address.contains("://") || !address.contains(':') {
                return Err(bad(
                    "use HOST:PORT (Keel's registry) or etcd://HOST:PORT[,HOST:PORT…]".to_owned(),
                ));
            }
            return Ok(NamingAddress::Keel(address.to_owned()));
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(bad("it names no etcd member".to_owned()));
        }
        let mut prefix = DEFAULT_ETCD_PREFIX.to_owned();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", p)) if p.starts_with('/') && p.len() > 1 => prefix = p.to_owned(),
                Some(("prefix", p)) => {
                    return Err(bad(format!(
                        "the prefix must start with / and name something, not {p:?}"
                    )));
                }
                _ => {
                    return Err(bad(format!("unknown setting {pair:?} (known: prefix)")));
                }
            }
        }
        Ok(NamingAddress::Etcd { endpoints, prefix })
    }
}

/// Keel's registry or etcd behind one [`NamingBackend`].
#[derive(Debug, Clone)]
pub enum Naming {
    /// Keel's registry (its channel connects lazily and reconnects by itself).
    Keel(RegistryHandle<Channel>),
    /// An etcd cluster (boxed: its client is large, and a handle is cloned into tasks).
    Etcd(Box<EtcdBackend>),
}

impl Naming {
    /// Connects to the naming service `address` names (see [`NamingAddress::parse`]). Keel's
    /// registry is reached lazily; etcd is connected here.
    pub async fn connect(address: &str) -> Result<Naming, NamingError> {
        match NamingAddress::parse(address)? {
            NamingAddress::Keel(address) => Ok(Naming::Keel(RegistryHandle::new(
                Channel::with_config(address, ChannelConfig::default()),
            ))),
            NamingAddress::Etcd { endpoints, prefix } => EtcdBackend::connect(&endpoints, prefix)
                .await
                .map(|b| Naming::Etcd(Box::new(b)))
                .map_err(|e| NamingError::Unreachable {
                    reason: e.message().to_owned(),
                    endpoints,
                }),
        }
    }
}

/// Forwards a call to whichever backend this is.
macro_rules! either {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            Naming::Keel($b) => $call.await,
            Naming::Etcd($b) => $call.await,
        }
    };
}

impl NamingBackend for Naming {
    async fn grant_lease(&self, ttl: Duration) -> Result<u64, Status> {
        either!(self, b => b.grant_lease(ttl))
    }

    async fn keep_alive(&self, lease: u64) -> Result<(), Status> {
        either!(self, b => b.keep_alive(lease))
    }

    async fn revoke_lease(&self, lease: u64) -> Result<(), Status> {
        either!(self, b => b.revoke_lease(lease))
    }

    async fn register(&self, instance: &Instance) -> Result<u64, Status> {
        either!(self, b => b.register(instance))
    }

    async fn deregister(&self, namespace: &str, service: &str, id: &str) -> Result<u64, Status> {
        either!(self, b => b.deregister(namespace, service, id))
    }

    async fn list(&self, namespace: &str, service: &str) -> Result<ServiceSnapshot, Status> {
        either!(self, b => b.list(namespace, service))
    }

    async fn watch(
        &self,
        namespace: &str,
        service: &str,
        after_revision: u64,
    ) -> Result<EventStream, Status> {
        either!(self, b => b.watch(namespace, service, after_revision))
    }

    async fn watch_config(
        &self,
        namespace: &str,
        prefix: &str,
        after_revision: u64,
    ) -> Result<EventStream, Status> {
        either!(self, b => b.watch_config(namespace, prefix, after_revision))
    }

    async fn put_config(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
    ) -> Result<ConfigEntry, Status> {
        either!(self, b => b.put_config(namespace, key, value))
    }

    async fn put_config_if(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        expected_version: u64,
    ) -> Result<ConfigEntry, Status> {
        either!(self, b => b.put_config_if(namespace, key, value, expected_version))
    }

    async fn delete_config(&self, namespace: &str, key: &str) -> Result<u64, Status> {
        either!(self, b => b.delete_config(namespace, key))
    }

    async fn get_config(&self, namespace: &str, key: &str) -> Result<Option<ConfigEntry>, Status> {
        either!(self, b => b.get_config(namespace, key))
    }

    async fn lock(
        &self,
        namespace: &str,
        name: &str,
        lease: u64,
        timeout: Option<Duration>,
    ) -> Result<LockHolder, Status> {
        either!(self, b => b.lock(namespace, name, lease, timeout))
    }

    async fn unlock(&self, namespace: &str, name: &str, token: u64) -> Result<(), Status> {
        either!(self, b => b.unlock(namespace, name, token))
    }

    async fn campaign(
        &self,
        namespace: &str,
        election: &str,
        lease: u64,
        value: Bytes,
        timeout: Option<Duration>,
    ) -> Result<LockHolder, Status> {
        either!(self, b => b.campaign(namespace, election, lease, value, timeout))
    }

    async fn leader(&self, namespace: &str, election: &str) -> Result<Option<LockHolder>, Status> {
        either!(self, b => b.leader(namespace, election))
    }

    async fn resign(&self, namespace: &str, election: &str, token: u64) -> Result<(), Status> {
        either!(self, b => b.resign(namespace, election, token))
    }

    async fn check_fence(&self, namespace: &str, name: &str, token: u64) -> Result<bool, Status> {
        either!(self, b => b.check_fence(namespace, name, token))
    }
}

#[cfg(test)]
mod tests {
    use super::NamingAddress;

    #[test]
    fn addresses_name_keels_registry_or_etcd() {
        assert_eq!(
            NamingAddress::parse("127.0.0.1:7000"),
            Ok(NamingAddress::Keel("127.0.0.1:7000".into()))
        );
        assert_eq!(
            NamingAddress::parse("etcd://h1:2379, h2:2379,h3:2379"),
            Ok(NamingAddress::Etcd {
                endpoints: vec![
                    "http://h1:2379".into(),
                    "http://h2:2379".into(),
                    "http://h3:2379".into()
                ],
                prefix: "/keel".into()
            })
        );
        assert_eq!(
            NamingAddress::parse("etcd://h1:2379?prefix=/shop"),
            Ok(NamingAddress::Etcd {
                endpoints: vec!["http://h1:2379".into()],
                prefix: "/shop".into()
            })
        );
        for bad in [
            "",
            "registry",
            "http://h1:2379",
            "etcd://",
            "etcd://h1:2379?prefix=shop",
            "etcd://h1:2379?ttl=3",
        ] {
            let err = NamingAddress::parse(bad).unwrap_err();
            assert!(
                matches!(&err, crate::NamingError::BadAddress { address, .. } if address == bad),
                "{bad}: {err:?}"
            );
            assert!(
                err.to_string().starts_with("registry address"),
                "{bad}: {err}"
            );
        }
    }
}
