//! One interface over the naming backends: Keel's registry (over Keel RPC) and etcd. A
//! service written against [`NamingBackend`] runs embedded on one machine and on etcd beyond
//! it; the behavioural test suite (`tests/parity.rs`) runs the same checks against both.
//!
//! The vocabulary is the registry's protobuf types (`Instance`, `WatchEvent`, `ConfigEntry`,
//! `LockHolder`) and errors are [`Status`] codes: `not_found` for a lease that is gone,
//! `deadline_exceeded` for a lock not obtained in time, `failed_precondition` for a stale
//! fencing token, `unavailable` when the backend cannot be reached.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use keel_rpc::client::CallTransport;
use keel_rpc::{Code, Status};

use crate::client::RegistryHandle;
use crate::proto::{
    CheckFenceRequest, ConfigEntry, ConfigRef, GrantLeaseRequest, Instance, InstanceRef, LeaseRef,
    LockHolder, LockRef, LockRequest, PutConfigRequest, RegisterRequest, ServiceRef,
    ServiceSnapshot, UnlockRequest, WatchEvent, WatchRequest, watch_request::Target,
};

/// A stream of watch events.
pub type EventStream = BoxStream<'static, Result<WatchEvent, Status>>;

/// What a service needs from a naming backend.
pub trait NamingBackend: Send + Sync + 'static {
    /// Grants a lease of (at least) `ttl`; returns its id.
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<u64, Status>> + Send;
    /// Renews a lease; `not_found` if it has expired or was revoked.
    fn keep_alive(&self, lease: u64) -> impl Future<Output = Result<(), Status>> + Send;
    /// Revokes a lease and removes what it holds.
    fn revoke_lease(&self, lease: u64) -> impl Future<Output = Result<(), Status>> + Send;
    /// Registers (or replaces) an instance under `instance.lease_id`; returns the revision.
    fn register(&self, instance: &Instance) -> impl Future<Output = Result<u64, Status>> + Send;
    /// Removes an instance; returns the revision.
    fn deregister(
        &self,
        namespace: &str,
        service: &str,
        id: &str,
    ) -> impl Future<Output = Result<u64, Status>> + Send;
    /// The instances of a service and the revision they are current at.
    fn list(
        &self,
        namespace: &str,
        service: &str,
    ) -> impl Future<Output = Result<ServiceSnapshot, Status>> + Send;
    /// Changes to a service after `after_revision` (0: a reset with the current list first).
    /// A resume point the backend no longer has history for yields a reset marked
    /// `compacted`.
    fn watch(
        &self,
        namespace: &str,
        service: &str,
        after_revision: u64,
    ) -> impl Future<Output = Result<EventStream, Status>> + Send;
    /// Changes to the config entries under `prefix` after `after_revision` (0: a reset with
    /// the current entries first), as [`WatchEvent`]s: `Reset` with `configs`, `Put` and
    /// `Delete` with `config`. A resume point the backend no longer has history for yields a
    /// reset marked `compacted`.
    fn watch_config(
        &self,
        namespace: &str,
        prefix: &str,
        after_revision: u64,
    ) -> impl Future<Output = Result<EventStream, Status>> + Send;
    /// Sets a config value; returns the entry with its new version.
    fn put_config(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<ConfigEntry, Status>> + Send;
    /// Sets a config value only if it is at `expected_version` now (0: only if it is not set);
    /// `failed_precondition` otherwise.
    fn put_config_if(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        expected_version: u64,
    ) -> impl Future<Output = Result<ConfigEntry, Status>> + Send;
    /// Removes a config value; returns the revision of the deletion (nothing happens if it
    /// is not set, and the revision is 0).
    fn delete_config(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<u64, Status>> + Send;
    /// A config value, if set.
    fn get_config(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<ConfigEntry>, Status>> + Send;
    /// Takes a lock under a lease, waiting up to `timeout` (forever if `None`). The holder's
    /// `token` is the fencing token: larger for every later holder.
    fn lock(
        &self,
        namespace: &str,
        name: &str,
        lease: u64,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<LockHolder, Status>> + Send;
    /// Releases a lock held with `token`; `failed_precondition` if another holder has it.
    fn unlock(
        &self,
        namespace: &str,
        name: &str,
        token: u64,
    ) -> impl Future<Output = Result<(), Status>> + Send;
    /// Campaigns to lead `election`, publishing `value`, under `lease`; waits (up to
    /// `timeout`) until elected. The leader's `token` fences like a lock's.
    fn campaign(
        &self,
        namespace: &str,
        election: &str,
        lease: u64,
        value: Bytes,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<LockHolder, Status>> + Send;
    /// The current leader of `election` (its value and token), if there is one.
    fn leader(
        &self,
        namespace: &str,
        election: &str,
    ) -> impl Future<Output = Result<Option<LockHolder>, Status>> + Send;
    /// Gives up leadership held with `token`; the next candidate is elected.
    fn resign(
        &self,
        namespace: &str,
        election: &str,
        token: u64,
    ) -> impl Future<Output = Result<(), Status>> + Send;
    /// Whether `token` is the lock's current fencing token.
    fn check_fence(
        &self,
        namespace: &str,
        name: &str,
        token: u64,
    ) -> impl Future<Output = Result<bool, Status>> + Send;
}

impl<T: CallTransport> RegistryHandle<T> {
    /// Opens a watch of `target` after `after_revision`, as a stream of events.
    async fn open_watch(
        &self,
        namespace: &str,
        target: Target,
        after_revision: u64,
    ) -> Result<EventStream, Status> {
        let req = WatchRequest {
            namespace: namespace.into(),
            target: Some(target),
            after_revision,
        };
        let stream = self
            .client()
            .watch_with(&req, self.options_without_deadline())
            .await?;
        Ok(futures_util::stream::unfold(stream, |mut s| async move {
            match s.message().await {
                Ok(Some(event)) => Some((Ok(event), s)),
                Ok(None) => None,
                Err(e) => Some((Err(e), s)),
            }
        })
        .boxed())
    }
    /// Takes a lock (publishing `value`), waiting up to `timeout` if one is set.
    async fn take_lock(
        &self,
        namespace: &str,
        name: &str,
        lease: u64,
        value: Bytes,
        timeout: Option<Duration>,
    ) -> Result<LockHolder, Status> {
        let req = LockRequest {
            namespace: namespace.into(),
            name: name.into(),
            lease_id: lease,
            value,
            no_wait: false,
        };
        let options = match timeout {
            Some(t) => self.options_without_deadline().timeout(t),
            None => self.options_without_deadline(),
        };
        self.client().lock_with(&req, options).await
    }
}

impl<T: CallTransport> NamingBackend for RegistryHandle<T> {
    async fn grant_lease(&self, ttl: Duration) -> Result<u64, Status> {
        let req = GrantLeaseRequest {
            ttl_ms: ttl.as_millis() as u64,
        };
        Ok(self
            .client()
            .grant_lease_with(&req, self.options())
            .await?
            .id)
    }

    async fn keep_alive(&self, lease: u64) -> Result<(), Status> {
        let req = LeaseRef { id: lease };
        self.client().keep_alive_with(&req, self.options()).await?;
        Ok(())
    }

    async fn revoke_lease(&self, lease: u64) -> Result<(), Status> {
        let req = LeaseRef { id: lease };
        self.client()
            .revoke_lease_with(&req, self.options())
            .await?;
        Ok(())
    }

    async fn register(&self, instance: &Instance) -> Result<u64, Status> {
        let req = RegisterRequest {
            instance: Some(instance.clone()),
        };
        Ok(self
            .client()
            .register_with(&req, self.options())
            .await?
            .revision)
    }

    async fn deregister(&self, namespace: &str, service: &str, id: &str) -> Result<u64, Status> {
        let req = InstanceRef {
            namespace: namespace.into(),
            service: service.into(),
            id: id.into(),
        };
        Ok(self
            .client()
            .deregister_with(&req, self.options())
            .await?
            .revision)
    }

    async fn list(&self, namespace: &str, service: &str) -> Result<ServiceSnapshot, Status> {
        let req = ServiceRef {
            namespace: namespace.into(),
            service: service.into(),
        };
        self.client()
            .list_instances_with(&req, self.options())
            .await
    }

    async fn watch(
        &self,
        namespace: &str,
        service: &str,
        after_revision: u64,
    ) -> Result<EventStream, Status> {
        self.open_watch(namespace, Target::Service(service.into()), after_revision)
            .await
    }

    async fn watch_config(
        &self,
        namespace: &str,
        prefix: &str,
        after_revision: u64,
    ) -> Result<EventStream, Status> {
        self.open_watch(
            namespace,
            Target::ConfigPrefix(prefix.into()),
            after_revision,
        )
        .await
    }

    async fn put_config(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
    ) -> Result<ConfigEntry, Status> {
        let req = PutConfigRequest {
            namespace: namespace.into(),
            key: key.into(),
            value,
            expected_version: None,
        };
        self.client().put_config_with(&req, self.options()).await
    }

    async fn put_config_if(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        expected_version: u64,
    ) -> Result<ConfigEntry, Status> {
        let req = PutConfigRequest {
            namespace: namespace.into(),
            key: key.into(),
            value,
            expected_version: Some(expected_version),
        };
        self.client().put_config_with(&req, self.options()).await
    }

    async fn delete_config(&self, namespace: &str, key: &str) -> Result<u64, Status> {
        let req = ConfigRef {
            namespace: namespace.into(),
            key: key.into(),
        };
        match self.client().delete_config_with(&req, self.options()).await {
            Ok(reply) => Ok(reply.revision),
            Err(e) if e.code() == Code::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn get_config(&self, namespace: &str, key: &str) -> Result<Option<ConfigEntry>, Status> {
        let req = ConfigRef {
            namespace: namespace.into(),
            key: key.into(),
        };
        match self.client().get_config_with(&req, self.options()).await {
            Ok(entry) => Ok(Some(entry)),
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn lock(
        &self,
        namespace: &str,
        name: &str,
        lease: u64,
        timeout: Option<Duration>,
    ) -> Result<LockHolder, Status> {
        self.take_lock(namespace, name, lease, Bytes::new(), timeout)
            .await
    }

    async fn unlock(&self, namespace: &str, name: &str, token: u64) -> Result<(), Status> {
        let req = UnlockRequest {
            namespace: namespace.into(),
            name: name.into(),
            token,
        };
        self.client().unlock_with(&req, self.options()).await?;
        Ok(())
    }

    async fn campaign(
        &self,
        namespace: &str,
        election: &str,
        lease: u64,
        value: Bytes,
        timeout: Option<Duration>,
    ) -> Result<LockHolder, Status> {
        // An election is a lock whose holder publishes a value.
        self.take_lock(namespace, election, lease, value, timeout)
            .await
    }

    async fn leader(&self, namespace: &str, election: &str) -> Result<Option<LockHolder>, Status> {
        let req = LockRef {
            namespace: namespace.into(),
            name: election.into(),
        };
        match self.client().holder_with(&req, self.options()).await {
            Ok(holder) => Ok(Some(holder)),
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn resign(&self, namespace: &str, election: &str, token: u64) -> Result<(), Status> {
        self.unlock(namespace, election, token).await
    }

    async fn check_fence(&self, namespace: &str, name: &str, token: u64) -> Result<bool, Status> {
        let req = CheckFenceRequest {
            namespace: namespace.into(),
            name: name.into(),
            token,
        };
        Ok(self
            .client()
            .check_fence_with(&req, self.options())
            .await?
            .current)
    }
}
