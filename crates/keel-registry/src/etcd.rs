//! The etcd backend: [`NamingBackend`] on etcd v3, for deployments beyond one machine.
//!
//! Keys live under a prefix (default `/keel`):
//!
//! | key | value |
//! |---|---|
//! | `{prefix}/{ns}/services/{service}/{id}` | the instance as JSON (proto3 JSON mapping), attached to its lease |
//! | `{prefix}/{ns}/config/{key}` | the raw value; etcd's key version is the entry's version |
//! | `{prefix}/{ns}/locks/{name}/…` | etcd's lock service keys; the owner is the oldest |
//! | `{prefix}/{ns}/elections/{name}/…` | etcd's election service keys; the leader's value |
//!
//! Revisions are etcd's revisions. A lock's fencing token is the create revision of the
//! owner's key, which grows with every acquisition, as the registry's does. etcd has no
//! protection against empty pushes; `protected` is always false here.
//!
//! etcd keys a lock request or a campaign by its lease (`{name}/{lease}`): after an attempt
//! that timed out, try again under a new lease, or the clean-up of the abandoned attempt may
//! remove the new one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaderKey, LeaseKeepAliveStream,
    LeaseKeeper, LockOptions, PutOptions, ResignOptions, SortOrder, SortTarget, Txn, TxnOp,
    WatchOptions, WatchStream,
};
use futures_util::StreamExt;
use keel_rpc::Status;
use parking_lot::Mutex;

use crate::backend::{EventStream, NamingBackend};
use crate::proto::{ConfigEntry, EventKind, Instance, LockHolder, ServiceSnapshot, WatchEvent};

type Keeper = Arc<tokio::sync::Mutex<(LeaseKeeper, LeaseKeepAliveStream)>>;

/// [`NamingBackend`] on an etcd cluster.
#[derive(Clone)]
pub struct EtcdBackend {
    members: Arc<Members>,
    prefix: String,
    /// One keep-alive stream per lease, as etcd's own clients keep.
    keepers: Arc<Mutex<HashMap<u64, Keeper>>>,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Maps an etcd client error to a status with a fitting code.
fn status(e: etcd_client::Error) -> Status {
    use keel_rpc::Code;
    match &e {
        etcd_client::Error::GRpcStatus(s) => {
            let code = match s.code() {
                tonic::Code::NotFound => Code::NotFound,
                tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Code::InvalidArgument,
                tonic::Code::FailedPrecondition => Code::FailedPrecondition,
                tonic::Code::PermissionDenied => Code::PermissionDenied,
                tonic::Code::Unauthenticated => Code::Unauthenticated,
                tonic::Code::Cancelled => Code::Cancelled,
                tonic::Code::ResourceExhausted => Code::Overloaded,
                _ => Code::Unavailable,
            };
            Status::new(code, format!("etcd: {}", s.message()))
        }
        // Opening a keep-alive stream for a lease etcd no longer has.
        etcd_client::Error::LeaseKeepAliveError(m) if m.contains("not found") => {
            Status::not_found(format!("etcd: {m}"))
        }
        _ => Status::unavailable(format!("etcd: {e}")),
    }
}

fn namespace(ns: &str) -> &str {
    if ns.is_empty() { "default" } else { ns }
}

/// The cluster's members, one client each, and the one calls go to.
///
/// One client per member rather than etcd-client's balanced channel over all of them: that
/// channel keeps sending a share of the calls to a member that is down (its connection error
/// surfaces on the call), so with one member of three dead about a third of all calls fail.
/// Here calls go to one member that answers, and a prober moves them to another when it stops
/// answering a linearizable read — which a member cut off from the quorum cannot serve either.
struct Members {
    clients: Vec<Client>,
    current: std::sync::atomic::AtomicUsize,
}

/// Removes a lease's keep-alive stream from the keepers unless the renewal that uses it is
/// seen through (removing it only if it is still the one in the map).
struct Unfinished<'a> {
    keepers: &'a Mutex<HashMap<u64, Keeper>>,
    lease: u64,
    keeper: Option<Keeper>,
}

impl Unfinished<'_> {
    fn finished(mut self) {
        self.keeper = None;
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            let mut keepers = self.keepers.lock();
            if keepers
                .get(&self.lease)
                .is_some_and(|k| Arc::ptr_eq(k, &keeper))
            {
                keepers.remove(&self.lease);
            }
        }
    }
}

/// How long a lease renewal waits for its answer.
const KEEP_ALIVE_PATIENCE: Duration = Duration::from_secs(2);

/// How often the member in use is checked, and how long it has to answer.
const PROBE_EVERY: Duration = Duration::from_millis(250);
const PROBE_PATIENCE: Duration = Duration::from_millis(750);

/// Whether `client`'s member serves a linearizable read now.
async fn answers(mut client: Client, key: String) -> bool {
    tokio::time::timeout(PROBE_PATIENCE, client.get(key, None))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Keeps `members.current` on a member that answers, until the backend is dropped.
async fn follow_members(members: std::sync::Weak<Members>, probe_key: String) {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(m) = members.upgrade() else {
            return;
        };
        let count = m.clients.len();
        let now = m.current.load(Relaxed);
        if answers(m.clients[now].clone(), probe_key.clone()).await {
            continue;
        }
        for k in 1..count {
            let next = (now + k) % count;
            if answers(m.clients[next].clone(), probe_key.clone()).await {
                tracing::info!(
                    from = now,
                    to = next,
                    "etcd member not answering; calls move to another"
                );
                m.current.store(next, Relaxed);
                break;
            }
        }
    }
}

impl EtcdBackend {
    /// Connects to etcd at `endpoints` (`http://host:port`, any number of the cluster's
    /// members), keeping keys under `prefix`.
    pub async fn connect(
        endpoints: &[String],
        prefix: impl Into<String>,
    ) -> Result<EtcdBackend, Status> {
        if endpoints.is_empty() {
            return Err(Status::invalid_argument("etcd: no endpoint given"));
        }
        let mut clients = Vec::with_capacity(endpoints.len());
        // A call to a member without a leader (cut off from the quorum) fails at once instead
        // of waiting, and a connection that stops answering is found dead within seconds (its
        // calls and watches then fail, and are made again on the member in use by then). The
        // pings' patience is generous: a busy machine answers late, and a connection given up
        // for dead takes the process's lease renewals and watches down with it.
        let options = etcd_client::ConnectOptions::new()
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(Duration::from_secs(2));
        for endpoint in endpoints {
            clients.push(
                Client::connect([endpoint], Some(options.clone()))
                    .await
                    .map_err(status)?,
            );
        }
        let prefix = prefix.into().trim_end_matches('/').to_owned();
        // Processes start on different members, so no one member takes every call.
        let first = (std::process::id() as usize) % clients.len();
        let members = Arc::new(Members {
            clients,
            current: std::sync::atomic::AtomicUsize::new(first),
        });
        if members.clients.len() > 1 {
            tokio::spawn(follow_members(
                Arc::downgrade(&members),
                format!("{prefix}/probe"),
            ));
        }
        Ok(EtcdBackend {
            members,
            prefix,
            keepers: Arc::default(),
        })
    }

    /// A client of the member calls go to now.
    fn client(&self) -> Client {
        let i = self
            .members
            .current
            .load(std::sync::atomic::Ordering::Relaxed);
        self.members.clients[i].clone()
    }

    fn service_prefix(&self, ns: &str, service: &str) -> String {
        format!("{}/{}/services/{service}/", self.prefix, namespace(ns))
    }

    fn config_key(&self, ns: &str, key: &str) -> String {
        format!("{}/{}/config/{key}", self.prefix, namespace(ns))
    }

    /// The etcd key prefix a watch follows.
    fn watched_prefix(&self, ns: &str, watched: &Watched) -> String {
        match watched {
            Watched::Service(service) => self.service_prefix(ns, service),
            Watched::Config(prefix) => self.config_key(ns, prefix),
        }
    }

    fn open_watch(
        &self,
        namespace: &str,
        watched: Watched,
        after_revision: u64,
    ) -> Result<EventStream, Status> {
        let state = EtcdWatch {
            backend: self.clone(),
            namespace: namespace.to_owned(),
            watched,
            next_revision: after_revision as i64 + 1,
            reset: (after_revision == 0).then_some(false),
            stream: None,
            pending: VecDeque::new(),
        };
        Ok(futures_util::stream::unfold(state, |mut w| async move {
            w.next().await.map(|item| (item, w))
        })
        .boxed())
    }

    /// The config entries under `prefix` and the revision they are current at.
    async fn list_config(&self, ns: &str, prefix: &str) -> Result<(Vec<ConfigEntry>, u64), Status> {
        let key_prefix = self.config_key(ns, "");
        let resp = self
            .client()
            .get(
                self.config_key(ns, prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(status)?;
        let revision = resp.header().map_or(0, |h| h.revision() as u64);
        let entries = resp
            .kvs()
            .iter()
            .map(|kv| ConfigEntry {
                namespace: namespace(ns).to_owned(),
                key: kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(key_prefix.as_str()))
                    .unwrap_or_default()
                    .to_owned(),
                value: Bytes::copy_from_slice(kv.value()),
                version: kv.version() as u64,
                revision: kv.mod_revision() as u64,
            })
            .collect();
        Ok((entries, revision))
    }

    fn election_name(&self, ns: &str, name: &str) -> String {
        format!("{}/{}/elections/{name}", self.prefix, namespace(ns))
    }

    fn lock_name(&self, ns: &str, name: &str) -> String {
        format!("{}/{}/locks/{name}", self.prefix, namespace(ns))
    }

    /// The key of the lock's current owner and its create revision (the fencing token).
    async fn lock_owner(&self, ns: &str, name: &str) -> Result<Option<(Vec<u8>, u64)>, Status> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let resp = self
            .client()
            .get(format!("{}/", self.lock_name(ns, name)), Some(options))
            .await
            .map_err(status)?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.key().to_vec(), kv.create_revision() as u64)))
    }
}

/// Runs `fut`, giving up with `deadline_exceeded` after `timeout` if one is set.
async fn within<F: std::future::Future>(
    timeout: Option<Duration>,
    fut: F,
    what: impl FnOnce() -> String,
) -> Result<F::Output, Status> {
    match timeout {
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .map_err(|_| Status::deadline_exceeded(what())),
        None => Ok(fut.await),
    }
}

fn decode_instance(value: &[u8], revision: i64) -> Option<Instance> {
    let mut instance: Instance = serde_json::from_slice(value).ok()?;
    instance.revision = revision as u64;
    Some(instance)
}

impl NamingBackend for EtcdBackend {
    async fn grant_lease(&self, ttl: Duration) -> Result<u64, Status> {
        // etcd counts TTLs in whole seconds.
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let resp = self
            .client()
            .lease_grant(secs, None)
            .await
            .map_err(status)?;
        Ok(resp.id() as u64)
    }

    async fn keep_alive(&self, lease: u64) -> Result<(), Status> {
        let existing = self.keepers.lock().get(&lease).cloned();
        let keeper = match existing {
            Some(k) => k,
            None => {
                let pair = self
                    .client()
                    .lease_keep_alive(lease as i64)
                    .await
                    .map_err(status)?;
                let k: Keeper = Arc::new(tokio::sync::Mutex::new(pair));
                self.keepers.lock().insert(lease, k.clone());
                k
            }
        };
        // A renewal not seen through (its caller stopped waiting) may leave its answer in the
        // stream, where the next renewal would take it for its own and date the lease's expiry
        // from too late a sending: such a stream is dropped, and the next renewal opens another.
        let unfinished = Unfinished {
            keepers: &self.keepers,
            lease,
            keeper: Some(keeper.clone()),
        };
        // A member cut off leaves the stream silent: give up on it after a while, so the
        // next renewal opens a stream to the member calls go to by then.
        let renewed = tokio::time::timeout(KEEP_ALIVE_PATIENCE, async {
            let mut pair = keeper.lock().await;
            match pair.0.keep_alive().await.map_err(status) {
                Ok(()) => pair.1.message().await.map_err(status),
                Err(e) => Err(e),
            }
        })
        .await;
        let answer = renewed.unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "etcd: no answer to renewing lease {lease} in {KEEP_ALIVE_PATIENCE:?}"
            )))
        });
        match answer {
            Ok(Some(resp)) if resp.ttl() > 0 => {
                unfinished.finished();
                Ok(())
            }
            Ok(_) => {
                self.keepers.lock().remove(&lease);
                Err(Status::not_found(format!(
                    "lease {lease} has expired or was revoked"
                )))
            }
            Err(e) => {
                self.keepers.lock().remove(&lease);
                Err(e)
            }
        }
    }

    async fn revoke_lease(&self, lease: u64) -> Result<(), Status> {
        self.keepers.lock().remove(&lease);
        self.client()
            .lease_revoke(lease as i64)
            .await
            .map_err(status)?;
        Ok(())
    }

    async fn register(&self, instance: &Instance) -> Result<u64, Status> {
        if instance.service.is_empty() || instance.id.is_empty() {
            return Err(Status::invalid_argument(
                "instance needs a service and an id",
            ));
        }
        let mut instance = instance.clone();
        instance.namespace = namespace(&instance.namespace).to_owned();
        if instance.weight == 0 {
            instance.weight = keel_governance::discover::DEFAULT_WEIGHT;
        }
        let key = format!(
            "{}{}",
            self.service_prefix(&instance.namespace, &instance.service),
            instance.id
        );
        let value = serde_json::to_vec(&instance)
            .map_err(|e| Status::internal(format!("encoding the instance: {e}")))?;
        let options = (instance.lease_id != 0)
            .then(|| PutOptions::new().with_lease(instance.lease_id as i64));
        let resp = self
            .client()
            .put(key, value, options)
            .await
            .map_err(status)?;
        Ok(resp.header().map_or(0, |h| h.revision() as u64))
    }

    async fn deregister(&self, namespace: &str, service: &str, id: &str) -> Result<u64, Status> {
        let key = format!("{}{id}", self.service_prefix(namespace, service));
        let resp = self.client().delete(key, None).await.map_err(status)?;
        if resp.deleted() == 0 {
            return Err(Status::not_found(format!(
                "no instance {id:?} of service {service:?}"
            )));
        }
        Ok(resp.header().map_or(0, |h| h.revision() as u64))
    }

    async fn list(&self, namespace: &str, service: &str) -> Result<ServiceSnapshot, Status> {
        let resp = self
            .client()
            .get(
                self.service_prefix(namespace, service),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(status)?;
        Ok(ServiceSnapshot {
            instances: resp
                .kvs()
                .iter()
                .filter_map(|kv| decode_instance(kv.value(), kv.mod_revision()))
                .collect(),
            revision: resp.header().map_or(0, |h| h.revision() as u64),
            protected: false,
        })
    }

    async fn watch(
        &self,
        namespace: &str,
        service: &str,
        after_revision: u64,
    ) -> Result<EventStream, Status> {
        self.open_watch(
            namespace,
            Watched::Service(service.to_owned()),
            after_revision,
        )
    }

    async fn watch_config(
        &self,
        namespace: &str,
        prefix: &str,
        after_revision: u64,
    ) -> Result<EventStream, Status> {
        self.open_watch(
            namespace,
            Watched::Config(prefix.to_owned()),
            after_revision,
        )
    }

    async fn put_config(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
    ) -> Result<ConfigEntry, Status> {
        let resp = self
            .client()
            .put(
                self.config_key(namespace, key),
                value.to_vec(),
                Some(PutOptions::new().with_prev_key()),
            )
            .await
            .map_err(status)?;
        Ok(ConfigEntry {
            namespace: crate::etcd::namespace(namespace).to_owned(),
            key: key.to_owned(),
            value,
            version: resp.prev_key().map_or(0, |kv| kv.version() as u64) + 1,
            revision: resp.header().map_or(0, |h| h.revision() as u64),
        })
    }

    async fn put_config_if(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        expected_version: u64,
    ) -> Result<ConfigEntry, Status> {
        let full = self.config_key(namespace, key);
        let txn = Txn::new()
            .when([Compare::version(
                full.clone(),
                CompareOp::Equal,
                expected_version as i64,
            )])
            .and_then([TxnOp::put(full.clone(), value.to_vec(), None)]);
        let resp = self.client().txn(txn).await.map_err(status)?;
        if !resp.succeeded() {
            return Err(Status::new(
                keel_rpc::Code::FailedPrecondition,
                format!("config {key:?} is not at version {expected_version}"),
            ));
        }
        Ok(ConfigEntry {
            namespace: crate::etcd::namespace(namespace).to_owned(),
            key: key.to_owned(),
            value,
            version: expected_version + 1,
            revision: resp.header().map_or(0, |h| h.revision() as u64),
        })
    }

    async fn delete_config(&self, namespace: &str, key: &str) -> Result<u64, Status> {
        let resp = self
            .client()
            .delete(self.config_key(namespace, key), None)
            .await
            .map_err(status)?;
        if resp.deleted() == 0 {
            return Ok(0);
        }
        Ok(resp.header().map_or(0, |h| h.revision() as u64))
    }

    async fn get_config(&self, namespace: &str, key: &str) -> Result<Option<ConfigEntry>, Status> {
        let resp = self
            .client()
            .get(self.config_key(namespace, key), None)
            .await
            .map_err(status)?;
        Ok(resp.kvs().first().map(|kv| ConfigEntry {
            namespace: crate::etcd::namespace(namespace).to_owned(),
            key: key.to_owned(),
            value: Bytes::copy_from_slice(kv.value()),
            version: kv.version() as u64,
            revision: kv.mod_revision() as u64,
        }))
    }

    async fn lock(
        &self,
        namespace: &str,
        name: &str,
        lease: u64,
        timeout: Option<Duration>,
    ) -> Result<LockHolder, Status> {
        let mut client = self.client();
        let call = client.lock(
            self.lock_name(namespace, name),
            Some(LockOptions::new().with_lease(lease as i64)),
        );
        let resp = within(timeout, call, || {
            format!("lock {name:?} still held at the deadline")
        })
        .await?
        .map_err(status)?;
        let owned = self.client().get(resp.key(), None).await.map_err(status)?;
        let token = owned
            .kvs()
            .first()
            .map(|kv| kv.create_revision() as u64)
            .ok_or_else(|| Status::aborted("lock was lost right after it was taken"))?;
        Ok(LockHolder {
            namespace: crate::etcd::namespace(namespace).to_owned(),
            name: name.to_owned(),
            lease_id: lease,
            value: Bytes::new(),
            token,
            revision: token,
        })
    }

    async fn unlock(&self, namespace: &str, name: &str, token: u64) -> Result<(), Status> {
        match self.lock_owner(namespace, name).await? {
            Some((key, owner)) if owner == token => {
                self.client().unlock(key).await.map_err(status)?;
                Ok(())
            }
            Some((_, owner)) => Err(Status::new(
                keel_rpc::Code::FailedPrecondition,
                format!("lock {name:?} is held with token {owner}, not {token}"),
            )),
            None => Err(Status::not_found(format!("lock {name:?} is not held"))),
        }
    }

    async fn campaign(
        &self,
        namespace: &str,
        election: &str,
        lease: u64,
        value: Bytes,
        timeout: Option<Duration>,
    ) -> Result<LockHolder, Status> {
        let mut client = self.client();
        let call = client.campaign(
            self.election_name(namespace, election),
            value.to_vec(),
            lease as i64,
        );
        let resp = within(timeout, call, || {
            format!("not elected leader of {election:?} by the deadline")
        })
        .await?
        .map_err(status)?;
        let leader = resp
            .leader()
            .ok_or_else(|| Status::unavailable("etcd: campaign answered without a leader key"))?;
        Ok(LockHolder {
            namespace: crate::etcd::namespace(namespace).to_owned(),
            name: election.to_owned(),
            lease_id: leader.lease() as u64,
            value,
            token: leader.rev() as u64,
            revision: leader.rev() as u64,
        })
    }

    async fn leader(&self, namespace: &str, election: &str) -> Result<Option<LockHolder>, Status> {
        match self
            .client()
            .leader(self.election_name(namespace, election))
            .await
        {
            Ok(resp) => Ok(resp.kv().map(|kv| LockHolder {
                namespace: crate::etcd::namespace(namespace).to_owned(),
                name: election.to_owned(),
                lease_id: kv.lease() as u64,
                value: Bytes::copy_from_slice(kv.value()),
                token: kv.create_revision() as u64,
                revision: kv.create_revision() as u64,
            })),
            // etcd reports an election without candidates as an error.
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(status(e)),
        }
    }

    async fn resign(&self, namespace: &str, election: &str, token: u64) -> Result<(), Status> {
        let name = self.election_name(namespace, election);
        let resp = self.client().leader(name.clone()).await.map_err(status)?;
        let Some(kv) = resp.kv() else {
            return Err(Status::not_found(format!(
                "election {election:?} has no leader"
            )));
        };
        if kv.create_revision() as u64 != token {
            return Err(Status::new(
                keel_rpc::Code::FailedPrecondition,
                format!(
                    "election {election:?} is led with token {}, not {token}",
                    kv.create_revision()
                ),
            ));
        }
        let leader = LeaderKey::new()
            .with_name(name)
            .with_key(kv.key().to_vec())
            .with_rev(kv.create_revision())
            .with_lease(kv.lease());
        self.client()
            .resign(Some(ResignOptions::new().with_leader(leader)))
            .await
            .map_err(status)?;
        Ok(())
    }

    async fn check_fence(&self, namespace: &str, name: &str, token: u64) -> Result<bool, Status> {
        Ok(self
            .lock_owner(namespace, name)
            .await?
            .is_some_and(|(_, owner)| owner == token))
    }
}

/// A service watch on etcd: a reset (list) when asked for or when etcd compacted past the
/// resume point, then etcd's watch from the next revision.
/// What an etcd watch follows.
enum Watched {
    /// A service's instances.
    Service(String),
    /// The config entries under a key prefix.
    Config(String),
}

struct EtcdWatch {
    backend: EtcdBackend,
    namespace: String,
    watched: Watched,
    next_revision: i64,
    /// `Some(compacted)` when a reset is due.
    reset: Option<bool>,
    stream: Option<WatchStream>,
    pending: VecDeque<WatchEvent>,
}

impl EtcdWatch {
    async fn next(&mut self) -> Option<Result<WatchEvent, Status>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if let Some(compacted) = self.reset.take() {
                let event = match &self.watched {
                    Watched::Service(service) => {
                        match self.backend.list(&self.namespace, service).await {
                            Ok(snapshot) => WatchEvent {
                                revision: snapshot.revision,
                                kind: EventKind::Reset as i32,
                                instances: snapshot.instances,
                                compacted,
                                ..WatchEvent::default()
                            },
                            Err(e) => return Some(Err(e)),
                        }
                    }
                    Watched::Config(prefix) => {
                        match self.backend.list_config(&self.namespace, prefix).await {
                            Ok((configs, revision)) => WatchEvent {
                                revision,
                                kind: EventKind::Reset as i32,
                                configs,
                                compacted,
                                ..WatchEvent::default()
                            },
                            Err(e) => return Some(Err(e)),
                        }
                    }
                };
                self.next_revision = event.revision as i64 + 1;
                self.stream = None;
                return Some(Ok(event));
            }
            if self.stream.is_none() {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(self.next_revision);
                let prefix = self.backend.watched_prefix(&self.namespace, &self.watched);
                match self.backend.client().watch(prefix, Some(options)).await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(e) => return Some(Err(status(e))),
                }
            }
            let stream = self.stream.as_mut()?;
            let response = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return None,
                Err(e) => {
                    self.stream = None;
                    return Some(Err(status(e)));
                }
            };
            if response.compact_revision() > 0 || response.canceled() {
                // etcd no longer has the history we asked for: start over from a list.
                self.reset = Some(true);
                continue;
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let revision = kv.mod_revision();
                self.next_revision = self.next_revision.max(revision + 1);
                let key = kv.key_str().unwrap_or_default();
                let kind = match event.event_type() {
                    EventType::Put => EventKind::Put,
                    EventType::Delete => EventKind::Delete,
                };
                let ns = namespace(&self.namespace).to_owned();
                let watch_event = match &self.watched {
                    Watched::Service(service) => {
                        let prefix = self.backend.service_prefix(&self.namespace, service);
                        let id = key.strip_prefix(prefix.as_str()).unwrap_or_default();
                        let instance = match kind {
                            EventKind::Put => decode_instance(kv.value(), revision),
                            _ => Some(Instance {
                                namespace: ns,
                                service: service.clone(),
                                id: id.to_owned(),
                                revision: revision as u64,
                                ..Instance::default()
                            }),
                        };
                        instance.map(|instance| WatchEvent {
                            revision: revision as u64,
                            kind: kind as i32,
                            instance: Some(instance),
                            ..WatchEvent::default()
                        })
                    }
                    Watched::Config(_) => {
                        let prefix = self.backend.config_key(&self.namespace, "");
                        let entry = ConfigEntry {
                            namespace: ns,
                            key: key
                                .strip_prefix(prefix.as_str())
                                .unwrap_or_default()
                                .to_owned(),
                            value: Bytes::copy_from_slice(kv.value()),
                            version: kv.version() as u64,
                            revision: revision as u64,
                        };
                        Some(WatchEvent {
                            revision: revision as u64,
                            kind: kind as i32,
                            config: Some(entry),
                            ..WatchEvent::default()
                        })
                    }
                };
                if let Some(watch_event) = watch_event {
                    self.pending.push_back(watch_event);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::Context;
    use std::time::Duration;

    use crate::NamingBackend;

    #[tokio::test]
    async fn a_renewal_given_up_half_way_leaves_no_stream_behind() {
        let Some(etcd) = crate::testing::etcd("a_renewal_given_up_half_way").await else {
            return;
        };
        let backend = &etcd.backend;
        let lease = backend.grant_lease(Duration::from_secs(30)).await.unwrap();
        backend.keep_alive(lease).await.unwrap();
        let first = backend.keepers.lock().get(&lease).cloned().unwrap();

        // A renewal sent and then given up before its answer came.
        let mut renewal = Box::pin(backend.keep_alive(lease));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(renewal.as_mut().poll(&mut cx).is_pending());
        drop(renewal);
        assert!(
            backend.keepers.lock().get(&lease).is_none(),
            "the stream holding an unread answer was kept"
        );

        // The next renewal has a stream of its own, and renews.
        backend.keep_alive(lease).await.unwrap();
        let second = backend.keepers.lock().get(&lease).cloned().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
    }
}
