//! The registry's state machine: pure and deterministic, no I/O and no clocks. The server
//! turns each request into a [`Command`], applies it here under one lock, and journals it;
//! recovery replays the same commands, so the state after a restart is the state before it.
//!
//! Every applied command advances the revision by one and records its visible changes in a
//! bounded history, from which watches resume.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::proto::{
    Command, ConfigEntry, EventKind, Instance, InstanceRef, Lease, LockHolder, RevokeCommand,
    ServiceRef, ServiceSnapshot, StateSnapshot, WatchEvent, command::Op,
};

/// `(namespace, service)`.
pub(crate) type ServiceKey = (String, String);
/// `(namespace, key)` of a config entry or a lock.
pub(crate) type NameKey = (String, String);

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WatchTarget {
    Service(ServiceKey),
    ConfigPrefix(String, String),
    Lock(NameKey),
}

/// What one change touched.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Touched {
    Service(ServiceKey),
    Config(NameKey),
    Lock(NameKey),
}

impl WatchTarget {
    fn matches(&self, touched: &Touched) -> bool {
        match (self, touched) {
            (WatchTarget::Service(a), Touched::Service(b)) => a == b,
            (WatchTarget::ConfigPrefix(ns, prefix), Touched::Config((ns2, key))) => {
                ns == ns2 && key.starts_with(prefix.as_str())
            }
            (WatchTarget::Lock(a), Touched::Lock(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug)]
struct Change {
    touched: Touched,
    event: WatchEvent,
}

#[derive(Debug, Default, Clone)]
struct LeaseState {
    ttl_ms: u64,
    instances: BTreeSet<(String, String, String)>,
    locks: BTreeSet<NameKey>,
}

#[derive(Debug, Default)]
struct ServiceState {
    instances: BTreeMap<String, Instance>,
    protected: bool,
}

/// A command that does not fit the current state (unknown lease, lock already held...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Rejected(pub(crate) String);

/// The resume point of a watch is older than the history kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compacted;

/// The registry's whole state.
#[derive(Debug)]
pub(crate) struct State {
    revision: u64,
    next_lease_id: u64,
    leases: HashMap<u64, LeaseState>,
    services: BTreeMap<ServiceKey, ServiceState>,
    configs: BTreeMap<NameKey, ConfigEntry>,
    locks: BTreeMap<NameKey, LockHolder>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// Every change at or below this revision has left the history.
    compacted_through: u64,
}

fn instance_key(i: &Instance) -> (String, String, String) {
    (i.namespace.clone(), i.service.clone(), i.id.clone())
}

impl State {
    /// An empty registry keeping at most `history_limit` changes for watches to resume from.
    pub(crate) fn new(history_limit: usize) -> State {
        State {
            revision: 0,
            next_lease_id: 1,
            leases: HashMap::new(),
            services: BTreeMap::new(),
            configs: BTreeMap::new(),
            locks: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted_through: 0,
        }
    }

    /// The revision of the last applied command.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// The id the next granted lease gets.
    pub(crate) fn next_lease_id(&self) -> u64 {
        self.next_lease_id
    }

    /// Starts lease ids at `first` at least (a registry that keeps nothing on disk starts them
    /// from the clock, so that no lease gets the id of one granted before a restart).
    pub(crate) fn start_lease_ids_at(&mut self, first: u64) {
        self.next_lease_id = self.next_lease_id.max(first);
    }

    /// A lease's TTL, if the lease exists.
    pub(crate) fn lease_ttl(&self, id: u64) -> Option<u64> {
        self.leases.get(&id).map(|l| l.ttl_ms)
    }

    /// Every lease with its TTL (to arm expiry timers after recovery).
    pub(crate) fn leases(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.leases.iter().map(|(id, l)| (*id, l.ttl_ms))
    }

    /// Applies a command: checks it against the state first and changes nothing if it does
    /// not fit. Returns the new revision.
    pub(crate) fn apply(&mut self, cmd: &Command) -> Result<u64, Rejected> {
        let op = cmd
            .op
            .as_ref()
            .ok_or_else(|| Rejected("empty command".into()))?;
        self.check(op)?;
        self.revision += 1;
        let rev = self.revision;
        match op {
            Op::Grant(lease) => {
                self.leases.insert(
                    lease.id,
                    LeaseState {
                        ttl_ms: lease.ttl_ms,
                        ..LeaseState::default()
                    },
                );
                self.next_lease_id = self.next_lease_id.max(lease.id + 1);
            }
            Op::Revoke(revoke) => self.revoke(revoke, rev),
            Op::Register(instance) => {
                let mut instance = instance.clone();
                instance.revision = rev;
                instance.lease_expired = false;
                let key = instance_key(&instance);
                let skey = (instance.namespace.clone(), instance.service.clone());
                let service = self.services.entry(skey.clone()).or_default();
                if let Some(old) = service.instances.get(&instance.id)
                    && old.lease_id != instance.lease_id
                    && let Some(lease) = self.leases.get_mut(&old.lease_id)
                {
                    lease.instances.remove(&key);
                }
                if let Some(lease) = self.leases.get_mut(&instance.lease_id) {
                    lease.instances.insert(key);
                }
                service
                    .instances
                    .insert(instance.id.clone(), instance.clone());
                self.record_instance(skey, EventKind::Put, instance, rev);
            }
            Op::Deregister(r) => {
                self.remove_instance(&(r.namespace.clone(), r.service.clone()), &r.id, rev);
            }
            Op::PutConfig(entry) => {
                let mut entry = entry.clone();
                entry.revision = rev;
                let key = (entry.namespace.clone(), entry.key.clone());
                self.configs.insert(key.clone(), entry.clone());
                self.record(
                    Touched::Config(key),
                    WatchEvent {
                        revision: rev,
                        kind: EventKind::Put as i32,
                        config: Some(entry),
                        ..WatchEvent::default()
                    },
                );
            }
            Op::DeleteConfig(r) => {
                let key = (r.namespace.clone(), r.key.clone());
                if let Some(mut entry) = self.configs.remove(&key) {
                    entry.revision = rev;
                    self.record(
                        Touched::Config(key),
                        WatchEvent {
                            revision: rev,
                            kind: EventKind::Delete as i32,
                            config: Some(entry),
                            ..WatchEvent::default()
                        },
                    );
                }
            }
            Op::Acquire(holder) => {
                let mut holder = holder.clone();
                holder.token = rev;
                holder.revision = rev;
                let key = (holder.namespace.clone(), holder.name.clone());
                if let Some(lease) = self.leases.get_mut(&holder.lease_id) {
                    lease.locks.insert(key.clone());
                }
                self.locks.insert(key.clone(), holder.clone());
                self.record(
                    Touched::Lock(key),
                    WatchEvent {
                        revision: rev,
                        kind: EventKind::Put as i32,
                        holder: Some(holder),
                        ..WatchEvent::default()
                    },
                );
            }
            Op::Release(r) => self.release(&(r.namespace.clone(), r.name.clone()), rev),
            Op::EndProtection(r) => {
                let skey = (r.namespace.clone(), r.service.clone());
                let expired: Vec<String> = self
                    .services
                    .get(&skey)
                    .map(|s| {
                        s.instances
                            .values()
                            .filter(|i| i.lease_expired)
                            .map(|i| i.id.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for id in expired {
                    self.remove_instance(&skey, &id, rev);
                }
                self.set_protected(&skey, false, rev);
            }
        }
        Ok(rev)
    }

    fn check(&self, op: &Op) -> Result<(), Rejected> {
        let lease_exists = |id: u64| {
            if id == 0 || self.leases.contains_key(&id) {
                Ok(())
            } else {
                Err(Rejected(format!(
                    "lease {id} does not exist (expired or revoked)"
                )))
            }
        };
        match op {
            Op::Grant(lease) if self.leases.contains_key(&lease.id) => {
                Err(Rejected(format!("lease {} already exists", lease.id)))
            }
            Op::Revoke(r) if !self.leases.contains_key(&r.lease_id) => Err(Rejected(format!(
                "lease {} does not exist (expired or revoked)",
                r.lease_id
            ))),
            Op::Register(i) => lease_exists(i.lease_id),
            Op::Acquire(h) => {
                if h.lease_id == 0 {
                    return Err(Rejected("a lock must be held under a lease".into()));
                }
                lease_exists(h.lease_id)?;
                match self.locks.get(&(h.namespace.clone(), h.name.clone())) {
                    Some(held) => Err(Rejected(format!(
                        "lock {:?} is held (token {})",
                        h.name, held.token
                    ))),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn revoke(&mut self, revoke: &RevokeCommand, rev: u64) {
        let Some(lease) = self.leases.remove(&revoke.lease_id) else {
            return;
        };
        let kept: BTreeSet<(String, String, String)> = revoke
            .kept
            .iter()
            .map(|r| (r.namespace.clone(), r.service.clone(), r.id.clone()))
            .collect();
        for (ns, svc, id) in &lease.instances {
            let skey = (ns.clone(), svc.clone());
            if kept.contains(&(ns.clone(), svc.clone(), id.clone())) {
                let Some(instance) = self
                    .services
                    .get_mut(&skey)
                    .and_then(|s| s.instances.get_mut(id))
                else {
                    continue;
                };
                instance.lease_expired = true;
                instance.revision = rev;
                let instance = instance.clone();
                self.record_instance(skey.clone(), EventKind::Put, instance, rev);
                self.set_protected(&skey, true, rev);
            } else {
                self.remove_instance(&skey, id, rev);
            }
        }
        for key in &lease.locks {
            self.release(key, rev);
        }
    }

    fn release(&mut self, key: &NameKey, rev: u64) {
        if let Some(mut holder) = self.locks.remove(key) {
            if let Some(lease) = self.leases.get_mut(&holder.lease_id) {
                lease.locks.remove(key);
            }
            holder.revision = rev;
            self.record(
                Touched::Lock(key.clone()),
                WatchEvent {
                    revision: rev,
                    kind: EventKind::Delete as i32,
                    holder: Some(holder),
                    ..WatchEvent::default()
                },
            );
        }
    }

    fn remove_instance(&mut self, skey: &ServiceKey, id: &str, rev: u64) {
        let Some(service) = self.services.get_mut(skey) else {
            return;
        };
        let Some(mut instance) = service.instances.remove(id) else {
            return;
        };
        if let Some(lease) = self.leases.get_mut(&instance.lease_id) {
            lease.instances.remove(&instance_key(&instance));
        }
        let now_empty = service.instances.is_empty() && !service.protected;
        instance.revision = rev;
        self.record_instance(skey.clone(), EventKind::Delete, instance, rev);
        if now_empty {
            self.services.remove(skey);
        }
    }

    fn set_protected(&mut self, skey: &ServiceKey, on: bool, rev: u64) {
        let Some(service) = self.services.get_mut(skey) else {
            return;
        };
        if service.protected == on {
            return;
        }
        service.protected = on;
        let empty = service.instances.is_empty();
        self.record(
            Touched::Service(skey.clone()),
            WatchEvent {
                revision: rev,
                kind: EventKind::Protection as i32,
                protected: on,
                ..WatchEvent::default()
            },
        );
        if empty && !on {
            self.services.remove(skey);
        }
    }

    fn record_instance(&mut self, skey: ServiceKey, kind: EventKind, instance: Instance, rev: u64) {
        self.record(
            Touched::Service(skey),
            WatchEvent {
                revision: rev,
                kind: kind as i32,
                instance: Some(instance),
                ..WatchEvent::default()
            },
        );
    }

    fn record(&mut self, touched: Touched, event: WatchEvent) {
        self.history.push_back(Change { touched, event });
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted_through = self.compacted_through.max(old.event.revision);
            }
        }
    }

    /// The changes to `target` with revisions in `(after, upto]`, or [`Compacted`] if some of
    /// them have left the history.
    pub(crate) fn changes(
        &self,
        target: &WatchTarget,
        after: u64,
        upto: u64,
    ) -> Result<Vec<WatchEvent>, Compacted> {
        if after < self.compacted_through {
            return Err(Compacted);
        }
        // Revisions increase along the history: skip to the first one past `after`.
        let start = self.history.partition_point(|c| c.event.revision <= after);
        Ok(self
            .history
            .range(start..)
            .take_while(|c| c.event.revision <= upto)
            .filter(|c| target.matches(&c.touched))
            .map(|c| c.event.clone())
            .collect())
    }

    /// A RESET event holding the current state of `target`.
    pub(crate) fn reset(&self, target: &WatchTarget, compacted: bool) -> WatchEvent {
        let mut event = WatchEvent {
            revision: self.revision,
            kind: EventKind::Reset as i32,
            compacted,
            ..WatchEvent::default()
        };
        match target {
            WatchTarget::Service(skey) => {
                let snap = self.list_instances(skey);
                event.instances = snap.instances;
                event.protected = snap.protected;
            }
            WatchTarget::ConfigPrefix(ns, prefix) => {
                event.configs = self.list_config(ns, prefix);
            }
            WatchTarget::Lock(key) => event.holder = self.locks.get(key).cloned(),
        }
        event
    }

    /// The instances of a service.
    pub(crate) fn list_instances(&self, skey: &ServiceKey) -> ServiceSnapshot {
        let service = self.services.get(skey);
        ServiceSnapshot {
            instances: service
                .map(|s| s.instances.values().cloned().collect())
                .unwrap_or_default(),
            revision: self.revision,
            protected: service.is_some_and(|s| s.protected),
        }
    }

    /// The services of a namespace.
    pub(crate) fn list_services(&self, namespace: &str) -> Vec<String> {
        self.services
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, svc)| svc.clone())
            .collect()
    }

    /// One config entry.
    pub(crate) fn config(&self, key: &NameKey) -> Option<&ConfigEntry> {
        self.configs.get(key)
    }

    /// Config entries of a namespace whose keys start with `prefix`.
    pub(crate) fn list_config(&self, namespace: &str, prefix: &str) -> Vec<ConfigEntry> {
        let start = (namespace.to_owned(), prefix.to_owned());
        self.configs
            .range(start..)
            .take_while(|((ns, key), _)| ns == namespace && key.starts_with(prefix))
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// A lock's holder.
    pub(crate) fn lock_holder(&self, key: &NameKey) -> Option<&LockHolder> {
        self.locks.get(key)
    }

    /// The commands that expire the leases in `due` (all due at once), deciding which of
    /// their instances protection keeps listed; also returns how many instances each service
    /// loses.
    ///
    /// Per service: the instances losing their leases now, plus those already kept past their
    /// leases, plus `recently_removed` (instances expiry removed in the server's protection
    /// window), over the service's size including those. When that share is over `threshold`
    /// (and the service has at least `min_instances`), everything expiring now stays listed,
    /// marked `lease_expired`: so many leases lapsing together looks like a network fault
    /// between the instances and the registry, and an empty list would turn it into an outage.
    /// So within one window, expiry removes at most `threshold` of a service's instances.
    pub(crate) fn plan_expiry(
        &self,
        due: &[u64],
        recently_removed: &HashMap<ServiceKey, usize>,
        threshold: f64,
        min_instances: usize,
    ) -> (Vec<Command>, HashMap<ServiceKey, usize>) {
        let mut by_service: BTreeMap<ServiceKey, usize> = BTreeMap::new();
        for lease in due.iter().filter_map(|id| self.leases.get(id)) {
            for (ns, svc, _) in &lease.instances {
                *by_service.entry((ns.clone(), svc.clone())).or_default() += 1;
            }
        }
        let mut protect: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut removed: HashMap<ServiceKey, usize> = HashMap::new();
        for (skey, expiring) in by_service {
            let Some(service) = self.services.get(&skey) else {
                continue;
            };
            let recent = recently_removed.get(&skey).copied().unwrap_or(0);
            let already = service
                .instances
                .values()
                .filter(|i| i.lease_expired)
                .count();
            let total = service.instances.len() + recent;
            let share = (recent + already + expiring) as f64 / total.max(1) as f64;
            if threshold < 1.0 && total >= min_instances && share > threshold {
                protect.insert(skey);
            } else {
                removed.insert(skey, expiring);
            }
        }
        let commands = due
            .iter()
            .filter_map(|id| self.leases.get(id).map(|lease| (*id, lease)))
            .map(|(lease_id, lease)| {
                let kept = lease
                    .instances
                    .iter()
                    .filter(|(ns, svc, _)| protect.contains(&(ns.clone(), svc.clone())))
                    .map(|(ns, svc, id)| InstanceRef {
                        namespace: ns.clone(),
                        service: svc.clone(),
                        id: id.clone(),
                    })
                    .collect();
                Command {
                    op: Some(Op::Revoke(RevokeCommand {
                        lease_id,
                        kept,
                        expired: true,
                    })),
                }
            })
            .collect();
        (commands, removed)
    }

    /// Protected services whose share of expired instances has fallen to `threshold` or
    /// below (instances came back), so protection can end.
    pub(crate) fn protection_over(&self, threshold: f64) -> Vec<ServiceKey> {
        self.services
            .iter()
            .filter(|(_, s)| s.protected)
            .filter(|(_, s)| {
                let expired = s.instances.values().filter(|i| i.lease_expired).count();
                expired as f64 / s.instances.len().max(1) as f64 <= threshold || expired == 0
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Protected services, with how many instances each keeps past their leases.
    pub(crate) fn protected_services(&self) -> Vec<(ServiceKey, usize)> {
        self.services
            .iter()
            .filter(|(_, s)| s.protected)
            .map(|(k, s)| {
                (
                    k.clone(),
                    s.instances.values().filter(|i| i.lease_expired).count(),
                )
            })
            .collect()
    }

    /// The whole state, for a snapshot file.
    pub(crate) fn snapshot(&self) -> StateSnapshot {
        let mut leases: Vec<Lease> = self
            .leases
            .iter()
            .map(|(id, l)| Lease {
                id: *id,
                ttl_ms: l.ttl_ms,
            })
            .collect();
        leases.sort_by_key(|l| l.id);
        StateSnapshot {
            revision: self.revision,
            next_lease_id: self.next_lease_id,
            leases,
            instances: self
                .services
                .values()
                .flat_map(|s| s.instances.values().cloned())
                .collect(),
            configs: self.configs.values().cloned().collect(),
            locks: self.locks.values().cloned().collect(),
            protected_services: self
                .services
                .iter()
                .filter(|(_, s)| s.protected)
                .map(|((ns, svc), _)| ServiceRef {
                    namespace: ns.clone(),
                    service: svc.clone(),
                })
                .collect(),
        }
    }

    /// Rebuilds a state from a snapshot. Changes before the snapshot are not in its history,
    /// so a watch resuming from before it gets a reset.
    pub(crate) fn restore(snapshot: StateSnapshot, history_limit: usize) -> State {
        let mut state = State::new(history_limit);
        state.revision = snapshot.revision;
        state.compacted_through = snapshot.revision;
        state.next_lease_id = snapshot.next_lease_id.max(1);
        for lease in snapshot.leases {
            state.leases.insert(
                lease.id,
                LeaseState {
                    ttl_ms: lease.ttl_ms,
                    ..LeaseState::default()
                },
            );
        }
        for instance in snapshot.instances {
            if let Some(lease) = state.leases.get_mut(&instance.lease_id) {
                lease.instances.insert(instance_key(&instance));
            }
            state
                .services
                .entry((instance.namespace.clone(), instance.service.clone()))
                .or_default()
                .instances
                .insert(instance.id.clone(), instance);
        }
        for r in snapshot.protected_services {
            state
                .services
                .entry((r.namespace, r.service))
                .or_default()
                .protected = true;
        }
        for entry in snapshot.configs {
            state
                .configs
                .insert((entry.namespace.clone(), entry.key.clone()), entry);
        }
        for holder in snapshot.locks {
            let key = (holder.namespace.clone(), holder.name.clone());
            if let Some(lease) = state.leases.get_mut(&holder.lease_id) {
                lease.locks.insert(key.clone());
            }
            state.locks.insert(key, holder);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: u64) -> Command {
        Command {
            op: Some(Op::Grant(Lease { id, ttl_ms: 1000 })),
        }
    }

    fn register(svc: &str, id: &str, lease: u64) -> Command {
        Command {
            op: Some(Op::Register(Instance {
                namespace: "ns".into(),
                service: svc.into(),
                id: id.into(),
                address: format!("127.0.0.1:{}", 1000 + id.len()),
                lease_id: lease,
                ..Instance::default()
            })),
        }
    }

    fn svc(name: &str) -> ServiceKey {
        ("ns".into(), name.into())
    }

    #[test]
    fn revoking_a_lease_removes_its_instances_and_locks() {
        let mut s = State::new(100);
        s.apply(&grant(1)).unwrap();
        s.apply(&register("a", "x", 1)).unwrap();
        s.apply(&register("a", "y", 0)).unwrap();
        s.apply(&Command {
            op: Some(Op::Acquire(LockHolder {
                namespace: "ns".into(),
                name: "l".into(),
                lease_id: 1,
                ..LockHolder::default()
            })),
        })
        .unwrap();
        let rev = s
            .apply(&Command {
                op: Some(Op::Revoke(RevokeCommand {
                    lease_id: 1,
                    ..RevokeCommand::default()
                })),
            })
            .unwrap();
        let ids: Vec<_> = s
            .list_instances(&svc("a"))
            .instances
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["y"]);
        assert!(s.lock_holder(&("ns".into(), "l".into())).is_none());
        let events = s
            .changes(&WatchTarget::Service(svc("a")), rev - 1, rev)
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Delete as i32);
    }

    #[test]
    fn commands_that_do_not_fit_change_nothing() {
        let mut s = State::new(100);
        assert!(s.apply(&register("a", "x", 9)).is_err());
        assert_eq!(s.revision(), 0);
        s.apply(&grant(1)).unwrap();
        let acquire = Command {
            op: Some(Op::Acquire(LockHolder {
                namespace: "ns".into(),
                name: "l".into(),
                lease_id: 1,
                ..LockHolder::default()
            })),
        };
        let first = s.apply(&acquire).unwrap();
        assert!(s.apply(&acquire).is_err());
        assert_eq!(s.revision(), first);
    }

    #[test]
    fn history_compaction_is_reported() {
        let mut s = State::new(3);
        s.apply(&grant(1)).unwrap();
        for i in 0..5 {
            s.apply(&register("a", &format!("i{i}"), 1)).unwrap();
        }
        let target = WatchTarget::Service(svc("a"));
        assert_eq!(s.changes(&target, 1, s.revision()), Err(Compacted));
        assert_eq!(s.changes(&target, 3, s.revision()).unwrap().len(), 3);
        let reset = s.reset(&target, true);
        assert_eq!(reset.instances.len(), 5);
        assert!(reset.compacted);
    }

    #[test]
    fn protection_keeps_a_majority_of_expiring_instances() {
        let mut s = State::new(100);
        for l in 1..=4 {
            s.apply(&grant(l)).unwrap();
            s.apply(&register("a", &format!("i{l}"), l)).unwrap();
        }
        let none = HashMap::new();
        // One of four expiring: a quarter, under the threshold of a half: removed.
        let (cmds, removed) = s.plan_expiry(&[1], &none, 0.5, 3);
        for c in &cmds {
            s.apply(c).unwrap();
        }
        assert_eq!(s.list_instances(&svc("a")).instances.len(), 3);
        // Two more at once, with the one just removed: three of four: kept, marked, protected.
        let (cmds, _) = s.plan_expiry(&[2, 3], &removed, 0.5, 3);
        for c in &cmds {
            s.apply(c).unwrap();
        }
        let snap = s.list_instances(&svc("a"));
        assert!(snap.protected);
        assert_eq!(snap.instances.len(), 3);
        assert_eq!(snap.instances.iter().filter(|i| i.lease_expired).count(), 2);
        assert!(s.protection_over(0.5).is_empty());
        // The lost instances come back with new leases: protection ends.
        s.apply(&grant(10)).unwrap();
        s.apply(&register("a", "i2", 10)).unwrap();
        s.apply(&register("a", "i3", 10)).unwrap();
        assert_eq!(s.protection_over(0.5), vec![svc("a")]);
        s.apply(&Command {
            op: Some(Op::EndProtection(ServiceRef {
                namespace: "ns".into(),
                service: "a".into(),
            })),
        })
        .unwrap();
        assert!(!s.list_instances(&svc("a")).protected);
    }

    #[test]
    fn without_recent_removals_spread_expiries_are_removed_up_to_the_threshold() {
        let mut s = State::new(100);
        for l in 1..=4 {
            s.apply(&grant(l)).unwrap();
            s.apply(&register("a", &format!("i{l}"), l)).unwrap();
        }
        let mut recent: HashMap<ServiceKey, usize> = HashMap::new();
        for l in 1..=4 {
            let (cmds, removed) = s.plan_expiry(&[l], &recent, 0.5, 3);
            for c in &cmds {
                s.apply(c).unwrap();
            }
            for (k, n) in removed {
                *recent.entry(k).or_default() += n;
            }
        }
        // Two removed (half), the other two kept listed.
        let snap = s.list_instances(&svc("a"));
        assert_eq!(snap.instances.len(), 2);
        assert!(snap.protected);
    }

    #[test]
    fn snapshot_restore_round_trips() {
        let mut s = State::new(100);
        s.apply(&grant(1)).unwrap();
        s.apply(&register("a", "x", 1)).unwrap();
        s.apply(&Command {
            op: Some(Op::PutConfig(ConfigEntry {
                namespace: "ns".into(),
                key: "k".into(),
                value: "v".into(),
                version: 1,
                revision: 0,
            })),
        })
        .unwrap();
        let snap = s.snapshot();
        let r = State::restore(snap.clone(), 100);
        assert_eq!(r.snapshot(), snap);
        assert_eq!(r.revision(), 3);
        // History before the snapshot is gone: resuming from before it is a reset.
        assert_eq!(
            r.changes(&WatchTarget::Service(svc("a")), 1, 3),
            Err(Compacted)
        );
        assert_eq!(r.lease_ttl(1), Some(1000));
    }
}
