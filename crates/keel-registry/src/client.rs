//! Using the registry from a service: [`RegistryHandle`] (the generated client plus the write
//! token), [`Registration`] (register an instance and keep its lease alive) and
//! [`RegistryDiscover`] (follow services' instance lists).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_governance::{Discover, DiscoverError, Endpoints, Instance};
use keel_rpc::client::{Backoff, CallTransport};
use keel_rpc::{CallOptions, Channel, Code, Status};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use futures_util::StreamExt;

use crate::backend::NamingBackend;
use crate::proto::{self, EventKind, InstanceStatus};

/// The registry's generated client together with the token its writes need.
#[derive(Debug, Clone)]
pub struct RegistryHandle<T: CallTransport = Channel> {
    client: proto::RegistryClient<T>,
    token: Option<String>,
    timeout: Duration,
}

impl<T: CallTransport> RegistryHandle<T> {
    /// A handle over `transport` (a [`Channel`] to the registry's address, usually).
    pub fn new(transport: T) -> RegistryHandle<T> {
        RegistryHandle {
            client: proto::RegistryClient::new(transport),
            token: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// Sends `authorization: Bearer <token>` with every call.
    pub fn with_token(mut self, token: impl Into<String>) -> RegistryHandle<T> {
        self.token = Some(token.into());
        self
    }

    /// Deadline of each unary call (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> RegistryHandle<T> {
        self.timeout = timeout;
        self
    }

    /// The generated client, for calls this handle has no helper for.
    pub fn client(&self) -> &proto::RegistryClient<T> {
        &self.client
    }

    /// Call options carrying the token and the per-call deadline.
    pub fn options(&self) -> CallOptions {
        let options = CallOptions::default().timeout(self.timeout);
        match &self.token {
            Some(t) => options.metadata("authorization", format!("Bearer {t}")),
            None => options,
        }
    }

    /// Call options with the token but no deadline (watches, lock waits).
    pub fn options_without_deadline(&self) -> CallOptions {
        let options = CallOptions::default();
        match &self.token {
            Some(t) => options.metadata("authorization", format!("Bearer {t}")),
            None => options,
        }
    }
}

/// What a [`Registration`] is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// Registered under this lease, heartbeats answered.
    Registered {
        /// The lease.
        lease_id: u64,
    },
    /// The registry is unreachable or refused a heartbeat; retrying (the reason is given).
    Retrying(String),
}

/// Keeps one instance registered: grants a lease, registers under it, sends a heartbeat every
/// third of the TTL, and, if the lease is lost (expired during a network fault), grants a new
/// one and registers again. [`Registration::deregister`] removes the instance at shutdown.
#[derive(Debug)]
pub struct Registration<B: NamingBackend + Clone = RegistryHandle<Channel>> {
    state: watch::Receiver<RegistrationState>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    lease: Arc<Mutex<u64>>,
    backend: B,
    instance: proto::Instance,
}

impl<B: NamingBackend + Clone> Registration<B> {
    /// Registers `instance` with a lease of `ttl`, and keeps it registered in the background.
    /// Fails if the first registration fails.
    pub async fn start(
        backend: B,
        instance: proto::Instance,
        ttl: Duration,
    ) -> Result<Registration<B>, Status> {
        let lease_id = register_once(&backend, &instance, ttl).await?;
        let (tx, state) = watch::channel(RegistrationState::Registered { lease_id });
        let stop = CancellationToken::new();
        let lease = Arc::new(Mutex::new(lease_id));
        let task = tokio::spawn(keep_registered(
            backend.clone(),
            instance.clone(),
            ttl,
            lease.clone(),
            tx,
            stop.clone(),
        ));
        Ok(Registration {
            state,
            stop,
            task: Some(task),
            lease,
            backend,
            instance,
        })
    }

    /// The current state.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// A receiver that changes with the state.
    pub fn watch_state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// The lease the instance is registered under now.
    pub fn lease_id(&self) -> u64 {
        *self.lease.lock()
    }

    /// Stops the heartbeats, removes the instance and revokes its lease: callers stop picking
    /// it at once instead of after the TTL.
    pub async fn deregister(mut self) -> Result<(), Status> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let removed = self
            .backend
            .deregister(
                &self.instance.namespace,
                &self.instance.service,
                &self.instance.id,
            )
            .await;
        let lease_id = *self.lease.lock();
        let revoked = self.backend.revoke_lease(lease_id).await;
        match (removed, revoked) {
            (Err(e), _) if e.code() != Code::NotFound => Err(e),
            (_, Err(e)) if e.code() != Code::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl<B: NamingBackend + Clone> Drop for Registration<B> {
    fn drop(&mut self) {
        // Dropped without deregister: stop the heartbeats; the lease expires on its own.
        self.stop.cancel();
    }
}

async fn register_once<B: NamingBackend>(
    backend: &B,
    instance: &proto::Instance,
    ttl: Duration,
) -> Result<u64, Status> {
    let lease = backend.grant_lease(ttl).await?;
    let mut instance = instance.clone();
    instance.lease_id = lease;
    backend.register(&instance).await?;
    Ok(lease)
}

async fn keep_registered<B: NamingBackend>(
    backend: B,
    instance: proto::Instance,
    ttl: Duration,
    lease: Arc<Mutex<u64>>,
    state: watch::Sender<RegistrationState>,
    stop: CancellationToken,
) {
    let every = (ttl / 3).max(Duration::from_millis(50));
    let backoff = Backoff {
        initial: every.min(Duration::from_millis(200)),
        max: every,
        ..Backoff::default()
    };
    let mut failures = 0u32;
    loop {
        let wait = if failures == 0 {
            every
        } else {
            backoff.delay(failures - 1)
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let id = *lease.lock();
        let result = backend.keep_alive(id).await;
        let outcome = match result {
            Ok(()) => Ok(id),
            // The lease is gone (it expired while we could not reach the registry): start
            // over with a new one.
            Err(e) if e.code() == Code::NotFound => register_once(&backend, &instance, ttl).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(id) => {
                failures = 0;
                *lease.lock() = id;
                state.send_if_modified(|s| {
                    let next = RegistrationState::Registered { lease_id: id };
                    let changed = *s != next;
                    *s = next;
                    changed
                });
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(service = %instance.service, id = %instance.id, error = %e,
                    "registry heartbeat failed; retrying");
                state.send_replace(RegistrationState::Retrying(e.to_string()));
            }
        }
    }
}

/// Discovery from the Keel registry: for each service subscribed to, one watch that keeps a
/// local copy of the instance list. While the registry is unreachable the last list keeps
/// being served (marked stale) and the watch reconnects with backoff, resuming from its last
/// revision. With a cache directory, every list is also written to disk, so a process that
/// restarts while the registry is down starts with the last list it saw.
#[derive(Debug)]
pub struct RegistryDiscover<B: NamingBackend + Clone = RegistryHandle<Channel>> {
    backend: B,
    namespace: String,
    cache_dir: Option<PathBuf>,
    subscriptions: Mutex<HashMap<String, watch::Sender<Arc<Endpoints>>>>,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl<B: NamingBackend + Clone> RegistryDiscover<B> {
    /// Discovery of the services of `namespace` through `backend` (a [`RegistryHandle`] for
    /// Keel's registry, or an etcd backend).
    pub fn new(backend: B, namespace: impl Into<String>) -> RegistryDiscover<B> {
        let stop = CancellationToken::new();
        RegistryDiscover {
            backend,
            namespace: namespace.into(),
            cache_dir: None,
            subscriptions: Mutex::new(HashMap::new()),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        }
    }

    /// Keeps a copy of every list in `dir` and starts from it when the registry is down.
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> RegistryDiscover<B> {
        self.cache_dir = Some(dir.into());
        self
    }

    fn cache_path(&self, service: &str) -> Option<PathBuf> {
        let ns = if self.namespace.is_empty() {
            "default"
        } else {
            &self.namespace
        };
        self.cache_dir
            .as_ref()
            .map(|d| d.join(ns).join(format!("{service}.json")))
    }
}

impl<B: NamingBackend + Clone> Discover for RegistryDiscover<B> {
    fn subscribe(&self, service: &str) -> Result<watch::Receiver<Arc<Endpoints>>, DiscoverError> {
        if service.is_empty()
            || !service
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
        {
            return Err(DiscoverError::InvalidName(service.to_owned()));
        }
        if self.stop.is_cancelled() {
            return Err(DiscoverError::Closed);
        }
        let mut subs = self.subscriptions.lock();
        if let Some(sender) = subs.get(service) {
            return Ok(sender.subscribe());
        }
        let cache = self.cache_path(service);
        let initial = cache
            .as_deref()
            .and_then(read_cache)
            .map(|mut e| {
                e.resolved = true;
                e.stale = true;
                e
            })
            .unwrap_or_default();
        let sender = watch::Sender::new(Arc::new(initial));
        let rx = sender.subscribe();
        subs.insert(service.to_owned(), sender.clone());
        tokio::spawn(follow(
            self.backend.clone(),
            self.namespace.clone(),
            service.to_owned(),
            cache,
            sender,
            self.stop.clone(),
        ));
        Ok(rx)
    }
}

fn read_cache(path: &Path) -> Option<Endpoints> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable discovery cache");
            None
        }
    }
}

fn write_cache(path: &Path, endpoints: &Endpoints) {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(endpoints)?)?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(file = %path.display(), error = %e, "could not write the discovery cache");
    }
}

fn to_instance(i: &proto::Instance) -> Instance {
    Instance {
        id: i.id.clone(),
        address: i.address.clone(),
        weight: i.weight,
        zone: i.zone.clone(),
        metadata: i
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Follows one service: watch, apply events to a local copy, publish; on failure keep the
/// last list (stale) and resume after a backoff.
async fn follow<B: NamingBackend>(
    backend: B,
    namespace: String,
    service: String,
    cache: Option<PathBuf>,
    out: watch::Sender<Arc<Endpoints>>,
    stop: CancellationToken,
) {
    let mut listed: BTreeMap<String, proto::Instance> = BTreeMap::new();
    let mut protected = false;
    let mut revision = 0u64;
    let mut failures = 0u32;
    let backoff = Backoff::default();
    let publish = |listed: &BTreeMap<String, proto::Instance>, revision, protected, stale| {
        let endpoints = Endpoints {
            instances: listed
                .values()
                .filter(|i| i.status == InstanceStatus::Up as i32)
                .map(to_instance)
                .collect(),
            revision,
            resolved: true,
            stale,
            protected,
        };
        if !stale && let Some(path) = &cache {
            write_cache(path, &endpoints);
        }
        out.send_replace(Arc::new(endpoints));
    };
    loop {
        if failures > 0 {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.delay(failures - 1)) => {}
            }
        }
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            r = backend.watch(&namespace, &service, revision) => r,
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::debug!(%service, error = %e, "registry watch failed to start");
                if out.borrow().resolved && !out.borrow().stale && revision > 0 {
                    publish(&listed, revision, protected, true);
                }
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                m = stream.next() => m,
            };
            match message {
                Some(Ok(event)) => {
                    failures = 0;
                    match EventKind::try_from(event.kind) {
                        Ok(EventKind::Reset) => {
                            listed = event
                                .instances
                                .into_iter()
                                .map(|i| (i.id.clone(), i))
                                .collect();
                            protected = event.protected;
                        }
                        Ok(EventKind::Put) => {
                            if let Some(i) = event.instance {
                                listed.insert(i.id.clone(), i);
                            }
                        }
                        Ok(EventKind::Delete) => {
                            if let Some(i) = event.instance {
                                listed.remove(&i.id);
                            }
                        }
                        Ok(EventKind::Protection) => protected = event.protected,
                        Err(_) => {}
                    }
                    revision = revision.max(event.revision);
                    publish(&listed, revision, protected, false);
                }
                None | Some(Err(_)) => {
                    failures = failures.saturating_add(1);
                    if revision > 0 {
                        publish(&listed, revision, protected, true);
                    }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns").join("svc.json");
        let e = Endpoints {
            instances: vec![Instance::new("a", "127.0.0.1:1")],
            revision: 7,
            resolved: true,
            stale: false,
            protected: false,
        };
        write_cache(&path, &e);
        assert_eq!(read_cache(&path), Some(e));
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(read_cache(&path), None);
    }
}

/// A change to the config entries under a followed prefix (see [`follow_config`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigChange {
    /// Every entry under the prefix now: replace what you have. Comes first, and again after
    /// a break whose changes the registry no longer keeps.
    Reset {
        /// The entries.
        entries: Vec<proto::ConfigEntry>,
        /// The revision they are current at.
        revision: u64,
    },
    /// An entry set (at its `revision`).
    Put(proto::ConfigEntry),
    /// An entry deleted.
    Delete {
        /// Its key.
        key: String,
        /// The revision of the deletion.
        revision: u64,
    },
}

impl ConfigChange {
    /// The revision the follower is at once it has applied this change.
    pub fn revision(&self) -> u64 {
        match self {
            ConfigChange::Reset { revision, .. } | ConfigChange::Delete { revision, .. } => {
                *revision
            }
            ConfigChange::Put(entry) => entry.revision,
        }
    }
}

/// Follows the config entries under `prefix` in `namespace`: a [`ConfigChange::Reset`] with
/// the current entries, then each change as it happens. After a broken stream it resumes from
/// the last revision seen (retrying with backoff while the registry is away), so no change is
/// missed. Ends when the receiver is dropped. Needs a Tokio runtime.
pub fn follow_config<B: NamingBackend + Clone>(
    backend: B,
    namespace: impl Into<String>,
    prefix: impl Into<String>,
) -> tokio::sync::mpsc::Receiver<ConfigChange> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let (namespace, prefix) = (namespace.into(), prefix.into());
    tokio::spawn(async move {
        let mut revision = 0;
        let mut backoff = Duration::from_millis(100);
        while !tx.is_closed() {
            let opened = backend.watch_config(&namespace, &prefix, revision).await;
            let mut stream = match opened {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%prefix, error = %e, "config watch failed to start");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                let event = tokio::select! {
                    () = tx.closed() => return,
                    m = stream.next() => match m {
                        Some(Ok(event)) => event,
                        None => break,
                        Some(Err(e)) => {
                            tracing::debug!(%prefix, error = %e, "config watch broke; resuming");
                            break;
                        }
                    },
                };
                backoff = Duration::from_millis(100);
                revision = revision.max(event.revision);
                let change = match EventKind::try_from(event.kind) {
                    Ok(EventKind::Reset) => ConfigChange::Reset {
                        entries: event.configs,
                        revision: event.revision,
                    },
                    Ok(EventKind::Put) => match event.config {
                        Some(c) => ConfigChange::Put(c),
                        None => continue,
                    },
                    Ok(EventKind::Delete) => match event.config {
                        Some(c) => ConfigChange::Delete {
                            key: c.key,
                            revision: event.revision,
                        },
                        None => continue,
                    },
                    _ => continue,
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(backoff).await;
        }
    });
    rx
}
