//! The registry server: the [`proto::Registry`] service over the state machine, with lease
//! expiry timers, lock waiters, watches driven by a durability watermark, and the journal.
//!
//! Write path: under the state lock a request becomes a command, is applied to the state and
//! appended to the journal (so journal order is apply order); outside the lock the call waits
//! for the append to be durable, then raises the watermark, which wakes the watches. So a
//! write is acknowledged, and seen by watchers, only once it would survive a crash.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::stream;
use keel_rpc::__private::prost::Message;
use keel_rpc::{Context, ResponseStream, Status};
use keel_store::{Appended, Journal, JournalOptions, SyncPolicy};
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::RegistryError;
use crate::proto::{
    self, CheckFenceReply, CheckFenceRequest, Command, ConfigEntry, ConfigList, ConfigPrefix,
    ConfigRef, GrantLeaseRequest, InstanceRef, InstanceStatus, Lease, LeaseRef, LockHolder,
    LockRef, LockRequest, NamespaceRef, RegisterRequest, RevokeCommand, ServiceList, ServiceRef,
    ServiceSnapshot, UnlockRequest, WatchEvent, WatchRequest, WriteReply, command::Op,
    watch_request::Target,
};
use crate::state::{Compacted, NameKey, State, WatchTarget};

/// Registry settings. Every field has a default.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Where the journal and snapshots live; `None` keeps everything in memory (tests).
    pub data_dir: Option<PathBuf>,
    /// When journal writes reach the disk.
    pub sync: SyncPolicy,
    /// When set, writes must carry `authorization: Bearer <token>` metadata (or header).
    pub token: Option<String>,
    /// Shortest lease TTL granted; shorter requests are raised to it.
    pub min_ttl: Duration,
    /// Longest lease TTL granted; longer requests are lowered to it.
    pub max_ttl: Duration,
    /// Changes kept for watches to resume from.
    pub history_limit: usize,
    /// Journal records between snapshots.
    pub snapshot_every: u64,
    /// Protection: when more than this share of a service's instances have lost their
    /// leases, the expired ones stay listed. 1.0 turns protection off.
    pub protect_threshold: f64,
    /// Protection applies only to services with at least this many instances.
    pub protect_min_instances: usize,
    /// Expiries within this window count together toward the protection threshold.
    pub protect_window: Duration,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            data_dir: None,
            sync: SyncPolicy::Always,
            token: None,
            min_ttl: Duration::from_millis(500),
            max_ttl: Duration::from_secs(24 * 3600),
            history_limit: 100_000,
            snapshot_every: 50_000,
            protect_threshold: 0.5,
            protect_min_instances: 3,
            protect_window: Duration::from_secs(60),
        }
    }
}

/// Counters of a registry.
#[derive(Debug, Default)]
pub struct RegistryStats {
    /// Commands applied and journaled since start.
    pub writes: AtomicU64,
    /// Leases that expired.
    pub expired_leases: AtomicU64,
    /// Watch streams open now.
    pub watchers: AtomicU64,
    /// Snapshots written.
    pub snapshots: AtomicU64,
}

/// Lease deadlines, soonest first.
#[derive(Debug, Default)]
struct Deadlines {
    by_time: BTreeSet<(Instant, u64)>,
    by_lease: HashMap<u64, Instant>,
}

impl Deadlines {
    fn set(&mut self, lease: u64, at: Instant) {
        if let Some(old) = self.by_lease.insert(lease, at) {
            self.by_time.remove(&(old, lease));
        }
        self.by_time.insert((at, lease));
    }

    fn remove(&mut self, lease: u64) {
        if let Some(old) = self.by_lease.remove(&lease) {
            self.by_time.remove(&(old, lease));
        }
    }

    fn next(&self) -> Option<Instant> {
        self.by_time.first().map(|(at, _)| *at)
    }

    fn due(&self, now: Instant) -> Vec<u64> {
        self.by_time
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect()
    }
}

#[derive(Debug)]
struct LockWaiter {
    lease_id: u64,
    value: bytes::Bytes,
    tx: oneshot::Sender<Result<LockHolder, Status>>,
}

#[derive(Debug)]
struct Inner {
    config: RegistryConfig,
    state: Mutex<State>,
    journal: Option<Journal>,
    since_snapshot: AtomicU64,
    snapshotting: AtomicBool,
    durable: watch::Sender<u64>,
    deadlines: Mutex<Deadlines>,
    expiry_wake: Arc<Notify>,
    /// Taken only while holding `state`.
    waiters: Mutex<HashMap<NameKey, VecDeque<LockWaiter>>>,
    /// When expiry last removed instances, per service, within the protection window.
    recent_removals: Mutex<HashMap<crate::state::ServiceKey, VecDeque<(Instant, usize)>>>,
    /// Locks handed to a waiter that had already given up, to be released again.
    unclaimed: tokio::sync::mpsc::UnboundedSender<LockHolder>,
    stats: RegistryStats,
}

/// The registry service. Cheap to clone; clones share the state.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// What a commit hands back once durable.
struct Committed {
    /// The revision of the request's own last command: what its reply says.
    revision: u64,
    /// The last revision this commit wrote, lock hand-overs it caused included: the
    /// durability watermark is raised to it.
    upto: u64,
    /// Lock waiters promoted by this commit, to be told once it is durable.
    promoted: Vec<(oneshot::Sender<Result<LockHolder, Status>>, LockHolder)>,
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

fn namespace(ns: &str) -> Result<String, Status> {
    let ns = if ns.is_empty() { "default" } else { ns };
    check_name("namespace", ns)?;
    Ok(ns.to_owned())
}

/// `text` quoted for an error message, cut to its first 64 characters: a reply never echoes
/// unbounded input back.
fn shown(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// Names (namespaces, services, instance ids, lock names): 1 to 253 bytes of letters,
/// digits and `. _ - : /`.
fn check_name(what: &str, name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(bad(format!("{what} is empty")));
    }
    if name.len() > 253 {
        return Err(bad(format!(
            "{what} is {} bytes; the limit is 253",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')))
    {
        return Err(bad(format!(
            "{what} {} contains {c:?}; use letters, digits and . _ - : /",
            shown(name)
        )));
    }
    Ok(())
}

/// Config keys: 1 to 1024 bytes of UTF-8 without control characters (spaces and any other
/// printable character allowed, so keys can mirror paths and titles).
fn check_config_key(key: &str) -> Result<(), Status> {
    if key.is_empty() || key.len() > MAX_CONFIG_KEY {
        return Err(bad(format!(
            "config key must be 1 to {MAX_CONFIG_KEY} bytes, not {}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(bad("config key contains control characters"));
    }
    Ok(())
}

fn check_address(address: &str) -> Result<(), Status> {
    let port = address
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(p))) if !host.is_empty() && p != 0 => Ok(()),
        _ => Err(bad(format!(
            "address {} is not host:port with a port from 1 to 65535",
            shown(address)
        ))),
    }
}

const MAX_CONFIG_VALUE: usize = 1 << 20;
const MAX_CONFIG_KEY: usize = 1024;
/// Instance metadata: at most this many entries...
const MAX_METADATA: usize = 64;
/// ...each key 1 to 128 bytes and each value at most 512 bytes (Consul's limits for service
/// metadata), so an instance's metadata stays under 40 KiB.
const MAX_METADATA_KEY: usize = 128;
const MAX_METADATA_VALUE: usize = 512;

impl Registry {
    /// Opens the registry: recovers the state from `data_dir` (if set) and starts the lease
    /// expiry timer. Leases recovered from disk get a full TTL from now, as etcd does.
    pub async fn open(config: RegistryConfig) -> Result<Registry, RegistryError> {
        let history = config.history_limit;
        let (state, journal) = match &config.data_dir {
            None => {
                // Nothing on disk: a lease granted before a restart may still be held (and
                // revoked) by a client, so ids start from the clock, 1,024 per millisecond.
                let mut state = State::new(history);
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                state.start_lease_ids_at(now_ms.saturating_mul(1024));
                (state, None)
            }
            Some(dir) => {
                let dir = dir.clone();
                let options = JournalOptions {
                    sync: config.sync,
                    ..JournalOptions::default()
                };
                let (journal, recovered) =
                    tokio::task::spawn_blocking(move || Journal::open(dir, options))
                        .await
                        .map_err(|e| RegistryError::Startup(e.to_string()))??;
                if let Some(torn) = &recovered.torn_tail {
                    tracing::warn!(file = %torn.file.display(), offset = torn.offset,
                        dropped = torn.dropped_bytes, reason = %torn.reason,
                        "registry journal had a torn tail (a crash mid-write); cut off");
                }
                let mut state = match &recovered.snapshot {
                    Some(snap) => State::restore(
                        proto::StateSnapshot::decode(snap.data.clone()).map_err(|e| {
                            RegistryError::Startup(format!(
                                "snapshot at index {} does not decode: {e}",
                                snap.index
                            ))
                        })?,
                        history,
                    ),
                    None => State::new(history),
                };
                for record in &recovered.records {
                    let applied = Command::decode(record.payload.clone())
                        .map_err(|e| e.to_string())
                        .and_then(|cmd| state.apply(&cmd).map_err(|e| e.to_string()));
                    if let Err(e) = applied {
                        // Only a bug can get here: every journaled command applied once.
                        tracing::error!(index = record.index, error = %e,
                            "journal record does not apply; skipped");
                    }
                }
                tracing::info!(
                    revision = state.revision(),
                    records = recovered.records.len(),
                    snapshot = recovered.snapshot.is_some(),
                    "registry recovered"
                );
                (state, Some(journal))
            }
        };
        let now = Instant::now();
        let mut deadlines = Deadlines::default();
        for (id, ttl) in state.leases() {
            deadlines.set(id, now + Duration::from_millis(ttl));
        }
        let (durable, _) = watch::channel(state.revision());
        let (unclaimed, unclaimed_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(state),
            journal,
            since_snapshot: AtomicU64::new(0),
            snapshotting: AtomicBool::new(false),
            durable,
            deadlines: Mutex::new(deadlines),
            expiry_wake: Arc::new(Notify::new()),
            waiters: Mutex::new(HashMap::new()),
            recent_removals: Mutex::new(HashMap::new()),
            unclaimed,
            stats: RegistryStats::default(),
        });
        tokio::spawn(run_expiry(Arc::downgrade(&inner)));
        tokio::spawn(run_unclaimed(Arc::downgrade(&inner), unclaimed_rx));
        Ok(Registry { inner })
    }

    /// The service to add to a `keel_rpc::Server`.
    pub fn service(&self) -> proto::RegistryServer<Registry> {
        proto::RegistryServer::new(self.clone())
    }

    /// Counters.
    pub fn stats(&self) -> &RegistryStats {
        &self.inner.stats
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.inner.state.lock().revision()
    }

    /// Services under protection now, with how many expired instances each keeps listed.
    pub fn protected_services(&self) -> Vec<(String, String, usize)> {
        self.inner
            .state
            .lock()
            .protected_services()
            .into_iter()
            .map(|((ns, svc), n)| (ns, svc, n))
            .collect()
    }

    /// Writes everything out and closes the journal. Calls after this fail.
    pub async fn close(&self) -> Result<(), RegistryError> {
        if let Some(journal) = &self.inner.journal {
            journal.close().await?;
        }
        Ok(())
    }

    fn authorize(&self, ctx: &Context) -> Result<(), Status> {
        let Some(token) = &self.inner.config.token else {
            return Ok(());
        };
        let presented = ctx
            .metadata()
            .get("authorization")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(p) if keel_net::constant_time_eq(p.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong registry token")),
            None => Err(Status::unauthenticated(
                "this registry requires a token for writes: send `authorization: Bearer <token>`",
            )),
        }
    }

    /// Applies and journals the commands `build` returns, under the state lock; then waits,
    /// outside it, until they are durable.
    async fn commit(
        &self,
        build: impl FnOnce(&State) -> Result<Vec<Command>, Status>,
    ) -> Result<u64, Status> {
        let committed = {
            let mut state = self.inner.state.lock();
            let commands = build(&state)?;
            self.apply_locked(&mut state, commands)?
        };
        self.finish(committed).await
    }

    /// Applies commands (and promotes lock waiters freed by them) with the state locked.
    fn apply_locked(
        &self,
        state: &mut State,
        commands: Vec<Command>,
    ) -> Result<(Vec<Appended>, Committed), Status> {
        let mut appends = Vec::new();
        let mut committed = Committed {
            revision: state.revision(),
            upto: state.revision(),
            promoted: Vec::new(),
        };
        // The request's own commands come first; the acquisitions of promoted waiters are
        // queued after them, so the reply's revision is that of the last own command.
        let mut own = commands.len();
        let mut queue: VecDeque<Command> = commands.into();
        while let Some(cmd) = queue.pop_front() {
            let frees_locks = matches!(cmd.op, Some(Op::Revoke(_)) | Some(Op::Release(_)));
            committed.upto = state
                .apply(&cmd)
                .map_err(|e| Status::new(keel_rpc::Code::FailedPrecondition, e.0))?;
            if own > 0 {
                own -= 1;
                committed.revision = committed.upto;
            }
            if let Some(journal) = &self.inner.journal {
                appends.push(journal.append(cmd.encode_to_vec()).map_err(store_status)?);
            }
            self.inner.stats.writes.fetch_add(1, Ordering::Relaxed);
            if let Some(Op::Revoke(r)) = &cmd.op {
                self.inner.deadlines.lock().remove(r.lease_id);
            }
            if frees_locks {
                self.promote_waiters(state, &mut queue, &mut committed);
            }
        }
        // The acquiring commands set each promoted holder's token: report what they set.
        for (_, holder) in &mut committed.promoted {
            if let Some(h) = state.lock_holder(&(holder.namespace.clone(), holder.name.clone())) {
                *holder = h.clone();
            }
        }
        Ok((appends, committed))
    }

    /// For every lock that is free and has waiters, hands it to the first waiter still
    /// waiting whose lease is alive.
    fn promote_waiters(
        &self,
        state: &State,
        queue: &mut VecDeque<Command>,
        committed: &mut Committed,
    ) {
        let mut waiters = self.inner.waiters.lock();
        let free: Vec<NameKey> = waiters
            .keys()
            .filter(|k| state.lock_holder(k).is_none())
            .cloned()
            .collect();
        for key in free {
            let Some(line) = waiters.get_mut(&key) else {
                continue;
            };
            while let Some(w) = line.pop_front() {
                if w.tx.is_closed() || state.lease_ttl(w.lease_id).is_none() {
                    continue;
                }
                // Token and revision are set by the acquiring command when it applies.
                let holder = LockHolder {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    lease_id: w.lease_id,
                    value: w.value,
                    token: 0,
                    revision: 0,
                };
                queue.push_back(Command {
                    op: Some(Op::Acquire(holder.clone())),
                });
                committed.promoted.push((w.tx, holder));
                break;
            }
            if line.is_empty() {
                waiters.remove(&key);
            }
        }
    }

    async fn finish(
        &self,
        (appends, committed): (Vec<Appended>, Committed),
    ) -> Result<u64, Status> {
        let written = appends.len() as u64;
        for append in appends {
            append.await.map_err(store_status)?;
        }
        let upto = committed.upto;
        self.inner.durable.send_if_modified(|d| {
            let raise = upto > *d;
            if raise {
                *d = upto;
            }
            raise
        });
        for (tx, holder) in committed.promoted {
            if let Err(Ok(holder)) = tx.send(Ok(holder)) {
                // The waiter gave up just as the lock came free: let the next one have it.
                let _ = self.inner.unclaimed.send(holder);
            }
        }
        self.maybe_snapshot(written);
        Ok(committed.revision)
    }

    /// Waits until every write up to `revision` is durable. A read captures its answer and the
    /// revision it reflects under the state lock, then waits here before it replies: it never
    /// shows a write that a crash could still take back.
    async fn durable(&self, revision: u64) -> Result<(), Status> {
        durable_at(&mut self.inner.durable.subscribe(), revision).await
    }

    fn maybe_snapshot(&self, written: u64) {
        let Some(journal) = &self.inner.journal else {
            return;
        };
        if written == 0 {
            return;
        }
        let count = self
            .inner
            .since_snapshot
            .fetch_add(written, Ordering::Relaxed)
            + written;
        if count < self.inner.config.snapshot_every
            || self.inner.snapshotting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (index, data) = {
            let state = self.inner.state.lock();
            // Appends happen under this lock, so every record before `next_index` is in
            // the state being copied, and nothing after it is.
            (journal.next_index() - 1, state.snapshot().encode_to_vec())
        };
        self.inner.since_snapshot.store(0, Ordering::Relaxed);
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(journal) = &this.inner.journal {
                match journal.snapshot(index, data.into()).await {
                    Ok(()) => {
                        this.inner.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::error!(error = %e, "registry snapshot failed"),
                }
            }
            this.inner.snapshotting.store(false, Ordering::Release);
        });
    }

    async fn release(&self, ns: &str, name: &str, token: u64) -> Result<u64, Status> {
        let key = (ns.to_owned(), name.to_owned());
        self.commit(|state| match state.lock_holder(&key) {
            Some(h) if h.token == token => Ok(vec![Command {
                op: Some(Op::Release(LockRef {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                })),
            }]),
            Some(h) => Err(Status::new(
                keel_rpc::Code::FailedPrecondition,
                format!(
                    "lock {} is held with token {}, not {token}: a newer holder has it",
                    shown(name),
                    h.token
                ),
            )),
            None => Err(Status::not_found(format!(
                "lock {} is not held",
                shown(name)
            ))),
        })
        .await
    }

    /// Expires every lease whose deadline has passed (together, for protection), then ends
    /// protection where it is over.
    async fn expire_due(&self) {
        let now = Instant::now();
        let due = self.inner.deadlines.lock().due(now);
        let config = &self.inner.config;
        if !due.is_empty() {
            let recent: HashMap<crate::state::ServiceKey, usize> = {
                let mut recent = self.inner.recent_removals.lock();
                recent.retain(|_, times| {
                    while times
                        .front()
                        .is_some_and(|(t, _)| now.duration_since(*t) > config.protect_window)
                    {
                        times.pop_front();
                    }
                    !times.is_empty()
                });
                recent
                    .iter()
                    .map(|(k, v)| (k.clone(), v.iter().map(|(_, n)| n).sum()))
                    .collect()
            };
            let mut removed = HashMap::new();
            let result = self
                .commit(|state| {
                    let (commands, gone) = state.plan_expiry(
                        &due,
                        &recent,
                        config.protect_threshold,
                        config.protect_min_instances,
                    );
                    removed = gone;
                    Ok(commands)
                })
                .await;
            match result {
                Ok(_) => {
                    self.inner
                        .stats
                        .expired_leases
                        .fetch_add(due.len() as u64, Ordering::Relaxed);
                    let mut recent = self.inner.recent_removals.lock();
                    for (k, n) in removed {
                        recent.entry(k).or_default().push_back((now, n));
                    }
                }
                Err(e) => tracing::error!(error = %e, "expiring leases failed"),
            }
            let mut deadlines = self.inner.deadlines.lock();
            for lease in due {
                deadlines.remove(lease);
            }
        }
        let threshold = config.protect_threshold;
        let over = self
            .commit(|state| {
                Ok(state
                    .protection_over(threshold)
                    .into_iter()
                    .map(|(namespace, service)| Command {
                        op: Some(Op::EndProtection(ServiceRef { namespace, service })),
                    })
                    .collect())
            })
            .await;
        if let Err(e) = over {
            tracing::error!(error = %e, "ending protection failed");
        }
    }
}

fn store_status(e: keel_store::StoreError) -> Status {
    Status::unavailable(format!("registry journal: {e}"))
}

/// Releases locks whose promoted waiter had gone.
async fn run_unclaimed(
    inner: Weak<Inner>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<LockHolder>,
) {
    while let Some(holder) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let registry = Registry { inner };
        if let Err(e) = registry
            .release(&holder.namespace, &holder.name, holder.token)
            .await
        {
            tracing::debug!(lock = %holder.name, error = %e, "releasing an unclaimed lock");
        }
    }
}

/// Sleeps until the next lease deadline (or a new, earlier one), then expires what is due.
/// Holds only a weak reference while sleeping, so it ends with the registry.
async fn run_expiry(inner: Weak<Inner>) {
    loop {
        let (next, wake) = {
            let Some(inner) = inner.upgrade() else { return };
            let next = inner.deadlines.lock().next();
            (next, inner.expiry_wake.clone())
        };
        let notified = wake.notified();
        // Protection is re-checked at least once a second even without expiries.
        let until = next
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
            .min(Instant::now() + Duration::from_secs(1));
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = notified => continue,
        }
        let Some(inner) = inner.upgrade() else { return };
        Registry { inner }.expire_due().await;
    }
}

impl proto::Registry for Registry {
    async fn grant_lease(&self, ctx: Context, req: GrantLeaseRequest) -> Result<Lease, Status> {
        self.authorize(&ctx)?;
        if req.ttl_ms == 0 {
            return Err(bad("ttl_ms must be positive"));
        }
        let config = &self.inner.config;
        let ttl = Duration::from_millis(req.ttl_ms).clamp(config.min_ttl, config.max_ttl);
        let ttl_ms = ttl.as_millis() as u64;
        let (granted, committed) = {
            let mut state = self.inner.state.lock();
            let granted = state.next_lease_id();
            let cmd = Command {
                op: Some(Op::Grant(Lease {
                    id: granted,
                    ttl_ms,
                })),
            };
            let committed = self.apply_locked(&mut state, vec![cmd])?;
            self.inner
                .deadlines
                .lock()
                .set(granted, Instant::now() + ttl);
            (granted, committed)
        };
        self.inner.expiry_wake.notify_one();
        self.finish(committed).await?;
        Ok(Lease {
            id: granted,
            ttl_ms,
        })
    }

    async fn keep_alive(&self, ctx: Context, req: LeaseRef) -> Result<Lease, Status> {
        self.authorize(&ctx)?;
        let state = self.inner.state.lock();
        let ttl_ms = state.lease_ttl(req.id).ok_or_else(|| {
            Status::not_found(format!("lease {} has expired or was revoked", req.id))
        })?;
        self.inner
            .deadlines
            .lock()
            .set(req.id, Instant::now() + Duration::from_millis(ttl_ms));
        Ok(Lease { id: req.id, ttl_ms })
    }

    async fn revoke_lease(&self, ctx: Context, req: LeaseRef) -> Result<WriteReply, Status> {
        self.authorize(&ctx)?;
        let revision = self
            .commit(|state| {
                if state.lease_ttl(req.id).is_none() {
                    return Err(Status::not_found(format!(
                        "lease {} has expired or was revoked",
                        req.id
                    )));
                }
                Ok(vec![Command {
                    op: Some(Op::Revoke(RevokeCommand {
                        lease_id: req.id,
                        kept: Vec::new(),
                        expired: false,
                    })),
                }])
            })
            .await?;
        Ok(WriteReply { revision })
    }

    async fn register(&self, ctx: Context, req: RegisterRequest) -> Result<WriteReply, Status> {
        self.authorize(&ctx)?;
        let mut instance = req
            .instance
            .ok_or_else(|| bad("register needs an instance"))?;
        instance.namespace = namespace(&instance.namespace)?;
        check_name("service", &instance.service)?;
        check_name("instance id", &instance.id)?;
        check_address(&instance.address)?;
        if instance.weight == 0 {
            instance.weight = keel_governance::discover::DEFAULT_WEIGHT;
        }
        if InstanceStatus::try_from(instance.status).is_err() {
            return Err(bad(format!(
                "status {} is not one of UP (0) and DOWN (1)",
                instance.status
            )));
        }
        if instance.weight > 10_000 {
            return Err(bad(format!(
                "weight {} is over the limit of 10000",
                instance.weight
            )));
        }
        if instance.metadata.len() > MAX_METADATA {
            return Err(bad(format!("more than {MAX_METADATA} metadata entries")));
        }
        for (key, value) in &instance.metadata {
            if key.is_empty() || key.len() > MAX_METADATA_KEY {
                return Err(bad(format!(
                    "metadata key {} is {} bytes; keys are 1 to {MAX_METADATA_KEY} bytes",
                    shown(key),
                    key.len()
                )));
            }
            if value.len() > MAX_METADATA_VALUE {
                return Err(bad(format!(
                    "metadata value of {} is {} bytes; the limit is {MAX_METADATA_VALUE}",
                    shown(key),
                    value.len()
                )));
            }
        }
        if instance.zone.len() > 253 {
            return Err(bad("zone is over 253 bytes"));
        }
        instance.lease_expired = false;
        let revision = self
            .commit(|state| {
                if instance.lease_id != 0 && state.lease_ttl(instance.lease_id).is_none() {
                    return Err(Status::not_found(format!(
                        "lease {} has expired or was revoked",
                        instance.lease_id
                    )));
                }
                Ok(vec![Command {
                    op: Some(Op::Register(instance)),
                }])
            })
            .await?;
        Ok(WriteReply { revision })
    }

    async fn deregister(&self, ctx: Context, req: InstanceRef) -> Result<WriteReply, Status> {
        self.authorize(&ctx)?;
        let ns = namespace(&req.namespace)?;
        let revision = self
            .commit(|state| {
                let listed = state
                    .list_instances(&(ns.clone(), req.service.clone()))
                    .instances
                    .iter()
                    .any(|i| i.id == req.id);
                if !listed {
                    return Err(Status::not_found(format!(
                        "no instance {} of service {}",
                        shown(&req.id),
                        shown(&req.service)
                    )));
                }
                Ok(vec![Command {
                    op: Some(Op::Deregister(InstanceRef {
                        namespace: ns.clone(),
                        ..req
                    })),
                }])
            })
            .await?;
        Ok(WriteReply { revision })
    }

    async fn list_instances(
        &self,
        _ctx: Context,
        req: ServiceRef,
    ) -> Result<ServiceSnapshot, Status> {
        let ns = namespace(&req.namespace)?;
        let snapshot = self.inner.state.lock().list_instances(&(ns, req.service));
        self.durable(snapshot.revision).await?;
        Ok(snapshot)
    }

    async fn list_services(&self, _ctx: Context, req: NamespaceRef) -> Result<ServiceList, Status> {
        let ns = namespace(&req.namespace)?;
        let list = {
            let state = self.inner.state.lock();
            ServiceList {
                services: state.list_services(&ns),
                revision: state.revision(),
            }
        };
        self.durable(list.revision).await?;
        Ok(list)
    }

    async fn watch(
        &self,
        _ctx: Context,
        req: WatchRequest,
    ) -> Result<ResponseStream<WatchEvent>, Status> {
        let ns = namespace(&req.namespace)?;
        let target = match req.target {
            Some(Target::Service(s)) => {
                check_name("service", &s)?;
                WatchTarget::Service((ns, s))
            }
            Some(Target::ConfigPrefix(p)) => WatchTarget::ConfigPrefix(ns, p),
            Some(Target::Lock(l)) => {
                check_name("lock", &l)?;
                WatchTarget::Lock((ns, l))
            }
            None => return Err(bad("watch needs a service, a config_prefix or a lock")),
        };
        let watcher = Watcher {
            registry: self.clone(),
            target,
            after: req.after_revision,
            started: false,
            durable: self.inner.durable.subscribe(),
            pending: VecDeque::new(),
        };
        self.inner.stats.watchers.fetch_add(1, Ordering::Relaxed);
        Ok(Box::pin(stream::unfold(watcher, |mut w| async move {
            w.next().await.map(|event| (Ok(event), w))
        })))
    }

    async fn put_config(
        &self,
        ctx: Context,
        req: proto::PutConfigRequest,
    ) -> Result<ConfigEntry, Status> {
        self.authorize(&ctx)?;
        let ns = namespace(&req.namespace)?;
        check_config_key(&req.key)?;
        if req.value.len() > MAX_CONFIG_VALUE {
            return Err(bad(format!(
                "config value of {} bytes is over the limit of {MAX_CONFIG_VALUE}",
                req.value.len()
            )));
        }
        let key = (ns.clone(), req.key.clone());
        let mut entry = ConfigEntry::default();
        let revision = self
            .commit(|state| {
                let current = state.config(&key).map_or(0, |e| e.version);
                if let Some(expected) = req.expected_version
                    && expected != current
                {
                    return Err(Status::new(
                        keel_rpc::Code::FailedPrecondition,
                        format!(
                            "config {} is at version {current}, not {expected}",
                            shown(&req.key)
                        ),
                    ));
                }
                entry = ConfigEntry {
                    namespace: ns.clone(),
                    key: req.key.clone(),
                    value: req.value.clone(),
                    version: current + 1,
                    revision: 0,
                };
                Ok(vec![Command {
                    op: Some(Op::PutConfig(entry.clone())),
                }])
            })
            .await?;
        entry.revision = revision;
        Ok(entry)
    }

    async fn get_config(&self, _ctx: Context, req: ConfigRef) -> Result<ConfigEntry, Status> {
        let ns = namespace(&req.namespace)?;
        let (found, revision) = {
            let state = self.inner.state.lock();
            (
                state.config(&(ns, req.key.clone())).cloned(),
                state.revision(),
            )
        };
        self.durable(revision).await?;
        found.ok_or_else(|| Status::not_found(format!("no config {}", shown(&req.key))))
    }

    async fn delete_config(&self, ctx: Context, req: ConfigRef) -> Result<WriteReply, Status> {
        self.authorize(&ctx)?;
        let ns = namespace(&req.namespace)?;
        let key = (ns.clone(), req.key.clone());
        let revision = self
            .commit(|state| {
                if state.config(&key).is_none() {
                    return Err(Status::not_found(format!("no config {}", shown(&req.key))));
                }
                Ok(vec![Command {
                    op: Some(Op::DeleteConfig(ConfigRef {
                        namespace: ns.clone(),
                        key: req.key.clone(),
                    })),
                }])
            })
            .await?;
        Ok(WriteReply { revision })
    }

    async fn list_config(&self, _ctx: Context, req: ConfigPrefix) -> Result<ConfigList, Status> {
        let ns = namespace(&req.namespace)?;
        let list = {
            let state = self.inner.state.lock();
            ConfigList {
                entries: state.list_config(&ns, &req.prefix),
                revision: state.revision(),
            }
        };
        self.durable(list.revision).await?;
        Ok(list)
    }

    async fn lock(&self, ctx: Context, req: LockRequest) -> Result<LockHolder, Status> {
        self.authorize(&ctx)?;
        let ns = namespace(&req.namespace)?;
        check_name("lock", &req.name)?;
        if req.lease_id == 0 {
            return Err(bad("a lock must be taken under a lease (lease_id)"));
        }
        let key = (ns.clone(), req.name.clone());
        enum Next {
            Acquired((Vec<Appended>, Committed)),
            Held(LockHolder),
            Wait(oneshot::Receiver<Result<LockHolder, Status>>),
        }
        let next = {
            let mut state = self.inner.state.lock();
            if state.lease_ttl(req.lease_id).is_none() {
                return Err(Status::not_found(format!(
                    "lease {} has expired or was revoked",
                    req.lease_id
                )));
            }
            match state.lock_holder(&key) {
                None => {
                    let cmd = Command {
                        op: Some(Op::Acquire(LockHolder {
                            namespace: ns.clone(),
                            name: req.name.clone(),
                            lease_id: req.lease_id,
                            value: req.value.clone(),
                            token: 0,
                            revision: 0,
                        })),
                    };
                    Next::Acquired(self.apply_locked(&mut state, vec![cmd])?)
                }
                // The same lease asking again already holds it.
                Some(h) if h.lease_id == req.lease_id => Next::Held(h.clone()),
                Some(h) if req.no_wait => {
                    return Err(Status::new(
                        keel_rpc::Code::Aborted,
                        format!("lock {} is held (token {})", shown(&req.name), h.token),
                    ));
                }
                Some(_) => {
                    let (tx, rx) = oneshot::channel();
                    self.inner
                        .waiters
                        .lock()
                        .entry(key.clone())
                        .or_default()
                        .push_back(LockWaiter {
                            lease_id: req.lease_id,
                            value: req.value.clone(),
                            tx,
                        });
                    Next::Wait(rx)
                }
            }
        };
        let waiting = match next {
            Next::Held(holder) => {
                // Perhaps taken by a call of this lease whose write is still on its way.
                self.durable(self.revision()).await?;
                return Ok(holder);
            }
            Next::Acquired(committed) => {
                self.finish(committed).await?;
                return self
                    .inner
                    .state
                    .lock()
                    .lock_holder(&key)
                    .filter(|h| h.lease_id == req.lease_id)
                    .cloned()
                    .ok_or_else(|| Status::aborted("lock was lost right after it was taken"));
            }
            Next::Wait(rx) => rx,
        };
        let received = match ctx.deadline() {
            Some(d) => tokio::time::timeout_at(d, waiting).await.map_err(|_| {
                Status::deadline_exceeded(format!(
                    "lock {} still held at the deadline",
                    shown(&req.name)
                ))
            })?,
            None => waiting.await,
        };
        received
            .map_err(|_| Status::unavailable("registry shut down while waiting for the lock"))?
    }

    async fn unlock(&self, ctx: Context, req: UnlockRequest) -> Result<WriteReply, Status> {
        self.authorize(&ctx)?;
        let ns = namespace(&req.namespace)?;
        let revision = self.release(&ns, &req.name, req.token).await?;
        Ok(WriteReply { revision })
    }

    async fn holder(&self, _ctx: Context, req: LockRef) -> Result<LockHolder, Status> {
        let ns = namespace(&req.namespace)?;
        let (found, revision) = {
            let state = self.inner.state.lock();
            (
                state.lock_holder(&(ns, req.name.clone())).cloned(),
                state.revision(),
            )
        };
        self.durable(revision).await?;
        found.ok_or_else(|| Status::not_found(format!("lock {} is not held", shown(&req.name))))
    }

    async fn check_fence(
        &self,
        _ctx: Context,
        req: CheckFenceRequest,
    ) -> Result<CheckFenceReply, Status> {
        let ns = namespace(&req.namespace)?;
        let (current_token, revision) = {
            let state = self.inner.state.lock();
            (
                state.lock_holder(&(ns, req.name)).map_or(0, |h| h.token),
                state.revision(),
            )
        };
        self.durable(revision).await?;
        Ok(CheckFenceReply {
            current: current_token != 0 && current_token == req.token,
            current_token,
        })
    }
}

/// How long a read waits for the writes it shows to become durable before it gives up.
const READ_DURABLE_WAIT: Duration = Duration::from_secs(10);

async fn durable_at(durable: &mut watch::Receiver<u64>, revision: u64) -> Result<(), Status> {
    match tokio::time::timeout(READ_DURABLE_WAIT, durable.wait_for(|d| *d >= revision)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(Status::unavailable("the registry is shutting down")),
        Err(_) => Err(Status::unavailable(format!(
            "revision {revision} did not reach the disk within {READ_DURABLE_WAIT:?}"
        ))),
    }
}

/// One watch stream's position.
struct Watcher {
    registry: Registry,
    target: WatchTarget,
    after: u64,
    started: bool,
    durable: watch::Receiver<u64>,
    pending: VecDeque<WatchEvent>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.registry
            .inner
            .stats
            .watchers
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Watcher {
    async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let upto = *self.durable.borrow_and_update();
            let reset = {
                let state = self.registry.inner.state.lock();
                if self.after > state.revision() {
                    // A revision this registry never reached (its data was replaced): the
                    // watcher's view cannot be patched, only replaced.
                    Some(state.reset(&self.target, true))
                } else if !self.started && self.after == 0 {
                    Some(state.reset(&self.target, false))
                } else {
                    self.started = true;
                    match state.changes(&self.target, self.after, upto) {
                        Ok(events) => {
                            self.after = self.after.max(upto);
                            self.pending.extend(events);
                            None
                        }
                        Err(Compacted) => Some(state.reset(&self.target, true)),
                    }
                }
            };
            if let Some(reset) = reset {
                // A full view is sent only once all it shows is durable, like any read.
                durable_at(&mut self.durable, reset.revision).await.ok()?;
                self.after = reset.revision;
                self.started = true;
                return Some(reset);
            }
            if self.pending.is_empty() && self.durable.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Registry as _;

    /// A write applied in memory but not yet durable is not shown by any read: reads wait
    /// until what they show would survive a crash, then answer with it.
    #[tokio::test]
    async fn reads_show_only_durable_writes() {
        let r = Registry::open(crate::RegistryConfig::default())
            .await
            .unwrap();
        let entry = ConfigEntry {
            namespace: "default".into(),
            key: "k".into(),
            value: b"v".to_vec().into(),
            version: 1,
            revision: 0,
        };
        // Applied, its append "in flight": not finished, so not durable.
        let in_flight = {
            let mut state = r.inner.state.lock();
            r.apply_locked(
                &mut state,
                vec![Command {
                    op: Some(Op::PutConfig(entry)),
                }],
            )
            .unwrap()
        };
        let get = || {
            let r = r.clone();
            tokio::spawn(async move {
                r.get_config(
                    Context::new(None),
                    ConfigRef {
                        namespace: String::new(),
                        key: "k".into(),
                    },
                )
                .await
            })
        };
        let list = || {
            let r = r.clone();
            tokio::spawn(async move {
                r.list_config(
                    Context::new(None),
                    ConfigPrefix {
                        namespace: String::new(),
                        prefix: String::new(),
                    },
                )
                .await
            })
        };
        let (got, listed) = (get(), list());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !got.is_finished(),
            "GetConfig answered a write not yet durable"
        );
        assert!(
            !listed.is_finished(),
            "ListConfig answered a write not yet durable"
        );
        let revision = r.finish(in_flight).await.unwrap();
        let got = got.await.unwrap().unwrap();
        assert_eq!(got.revision, revision);
        let listed = listed.await.unwrap().unwrap();
        assert_eq!(listed.revision, revision);
        assert_eq!(listed.entries.len(), 1);
    }
}
