//! Inventory: one instance's share of each item's stock.
//!
//! An item's stock is split into buckets spread over the inventory instances, so no single
//! counter takes every buyer; this type holds the buckets of one instance. A reservation takes
//! one unit from a bucket that has one, under the item's lock, and is appended to the journal
//! before the lock is released (so the journal's order is the decisions' order); the buyer is
//! answered only once the record is durable. A crash before that loses a reservation nobody
//! was told about; a crash after it loses nothing, because opening the journal replays it.
//!
//! - **Never oversold**: a unit is taken under the item's lock and only from a bucket above
//!   zero; releases put back only units that were taken.
//! - **Per-user limit**: a user's live reservations of an item (not released) stay within the
//!   item's limit — in this instance; across instances the services must send a user's
//!   requests for an item to one instance.
//! - **Idempotent**: the same (user, item, request id) gets the same reservation, however often
//!   and however concurrently it is sent, also after its unit was released (its order expired);
//!   only successes are remembered, so a refused request sent again is decided again.
//! - **Paid is final**: [`Inventory::commit`] marks a reservation sold (its order was paid);
//!   a committed reservation is never released, and a release must name the reservation's
//!   buyer.
//! - **Sold out early**: once the local buckets of an item are empty, a flag says so; a request
//!   then only checks (briefly, under the lock) whether it is the retry of one that holds a
//!   unit, and the buckets are not searched.
//! - **Transfers**: units not yet sold move between instances ([`Inventory::transfer_out`],
//!   [`Inventory::transfer_in`]), journaled and idempotent by transfer id, so an instance
//!   whose share sold out first can take over some of another's.
//! - **A failed journal write** (disk full, I/O error) stops the instance from taking more
//!   reservations: the unit it took stays taken, so nothing is sold twice, and the caller gets
//!   an error, not an acknowledgement.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use keel_store::{Journal, JournalOptions, Log, LogTarget, Recovered, StoreError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// No unit left in this instance's buckets.
    SoldOut,
    /// The user holds the item's limit already.
    LimitReached,
    /// No such item here.
    NotFound,
}

/// Errors that are not answers: the instance cannot decide.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The journal failed; the instance takes no more reservations.
    #[error("inventory journal: {0}")]
    Journal(#[from] StoreError),
    /// A previous journal failure stopped the instance.
    #[error("inventory stopped after a journal failure")]
    Failed,
    /// A journal record could not be read back.
    #[error("inventory journal record {index}: {reason}")]
    BadRecord {
        /// The record's index.
        index: u64,
        /// What was wrong.
        reason: String,
    },
    /// The item exists already with other settings.
    #[error("item {0} exists already")]
    Exists(String),
    /// The request does not make sense.
    #[error("{0}")]
    Invalid(String),
}

/// A unit held for a buyer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Unique within this instance's journal.
    pub reservation_id: u64,
    /// The item.
    pub item_id: String,
    /// The buyer.
    pub user_id: String,
    /// The buyer's request id (the idempotency key with user and item).
    pub request_id: String,
    /// The bucket the unit came from.
    pub bucket: u32,
}

/// What the journal holds, one per state change.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    CreateItem {
        item_id: String,
        buckets: Vec<u64>,
        per_user_limit: u32,
    },
    Reserve(Reservation),
    Release {
        reservation_id: u64,
    },
    Commit {
        reservation_id: u64,
    },
    /// Units moved out to another instance: (bucket, units) taken.
    TransferOut {
        item_id: String,
        transfer_id: String,
        taken: Vec<(u32, u64)>,
    },
    /// Units moved in from another instance: (bucket, units) added.
    TransferIn {
        item_id: String,
        transfer_id: String,
        added: Vec<(u32, u64)>,
    },
    /// A new owner took the journal over (after replaying it); written by [`Inventory::claim`].
    Owner {
        owner: String,
        token: u64,
    },
}

/// A reservation and what became of it.
#[derive(Debug, Clone)]
struct Held {
    reservation: Reservation,
    /// Its order was paid: the unit is sold and can no longer be released.
    committed: bool,
    /// Its unit went back to stock.
    released: bool,
}

#[derive(Debug)]
struct Item {
    /// Units left per bucket.
    buckets: Vec<u64>,
    /// Units each bucket started with.
    initial: Vec<u64>,
    per_user_limit: u32,
    /// Live reservations per user.
    held: HashMap<String, u32>,
    /// (user, request id) → reservation id, for idempotency.
    requests: HashMap<(String, String), u64>,
    /// Next bucket to try, so consecutive reservations spread over the buckets.
    next_bucket: usize,
    /// Transfers out (id → units taken) and in (id → units added), for idempotency.
    transfers_out: HashMap<String, u64>,
    transfers_in: HashMap<String, u64>,
}

/// What a reservation request comes to, decided under the item's lock.
enum Decision {
    /// The same request holds this reservation already.
    Known(u64),
    Refused(Refusal),
    /// A unit taken, its record appended (not yet durable).
    Taken(Reservation, keel_store::Appended),
}

/// What one item's shared state looks like from outside the lock.
#[derive(Debug)]
struct ItemCell {
    state: Mutex<Item>,
    sold_out: AtomicBool,
}

/// Stock figures of one item in this instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockView {
    /// Units this instance started with.
    pub initial: u64,
    /// Units left.
    pub left: u64,
    /// Units reserved (live reservations).
    pub reserved: u64,
    /// Units moved out to other instances by transfers.
    pub moved_out: u64,
    /// Units moved in from other instances by transfers.
    pub moved_in: u64,
}

/// One inventory instance.
#[derive(Debug)]
pub struct Inventory {
    journal: Log,
    items: Mutex<HashMap<String, Arc<ItemCell>>>,
    /// Every reservation made, live or not (a retried request is answered from it).
    reservations: Mutex<std::collections::BTreeMap<u64, Held>>,
    next_reservation: AtomicU64,
    failed: AtomicBool,
    /// Woken when `failed` is set.
    failure: tokio::sync::Notify,
    /// The last owner that claimed the journal: (owner, fencing token).
    owner: Mutex<Option<(String, u64)>>,
}

impl Inventory {
    /// Opens the inventory kept in `dir` (created if absent), replaying its journal.
    /// Blocking; call it at start-up or from `spawn_blocking`.
    pub fn open(
        dir: impl AsRef<Path>,
        options: JournalOptions,
    ) -> Result<Inventory, InventoryError> {
        let (journal, recovered) = Journal::open(dir, options)?;
        Inventory::replayed(Log::Local(journal), recovered)
    }

    /// Opens the inventory whose journal is at `target` (a directory or a JetStream stream),
    /// replaying it. With a stream, every append is fenced: once another process has opened
    /// the stream and appended, this one's next append fails and it takes no more
    /// reservations.
    pub async fn open_at(target: LogTarget) -> Result<Inventory, InventoryError> {
        let (journal, recovered) = Log::open(target).await?;
        Inventory::replayed(journal, recovered)
    }

    fn replayed(journal: Log, recovered: Recovered) -> Result<Inventory, InventoryError> {
        if let Some(torn) = &recovered.torn_tail {
            tracing::warn!(file = %torn.file.display(), dropped = torn.dropped_bytes, "inventory journal had a torn tail (a crash mid-write); cut off");
        }
        let inventory = Inventory {
            journal,
            items: Mutex::new(HashMap::new()),
            reservations: Mutex::new(std::collections::BTreeMap::new()),
            next_reservation: AtomicU64::new(1),
            failed: AtomicBool::new(false),
            failure: tokio::sync::Notify::new(),
            owner: Mutex::new(None),
        };
        for record in &recovered.records {
            let op: Op =
                serde_json::from_slice(&record.payload).map_err(|e| InventoryError::BadRecord {
                    index: record.index,
                    reason: e.to_string(),
                })?;
            inventory
                .apply(op)
                .map_err(|reason| InventoryError::BadRecord {
                    index: record.index,
                    reason,
                })?;
        }
        Ok(inventory)
    }

    /// Applies a replayed record; a record that contradicts the state (a unit taken from an
    /// empty bucket) is an error, not something to paper over.
    fn apply(&self, op: Op) -> Result<(), String> {
        match op {
            Op::CreateItem {
                item_id,
                buckets,
                per_user_limit,
            } => {
                self.items
                    .lock()
                    .insert(item_id, Arc::new(new_item(buckets, per_user_limit)));
            }
            Op::Reserve(r) => {
                let cell = self
                    .cell(&r.item_id)
                    .ok_or_else(|| format!("reservation of unknown item {}", r.item_id))?;
                {
                    let mut item = cell.state.lock();
                    match item.buckets.get_mut(r.bucket as usize) {
                        Some(units) if *units > 0 => *units -= 1,
                        _ => {
                            return Err(format!(
                                "reservation {} takes from empty bucket {} of {}",
                                r.reservation_id, r.bucket, r.item_id
                            ));
                        }
                    }
                    *item.held.entry(r.user_id.clone()).or_default() += 1;
                    item.requests
                        .insert((r.user_id.clone(), r.request_id.clone()), r.reservation_id);
                    cell.sold_out
                        .store(item.buckets.iter().all(|b| *b == 0), Ordering::Relaxed);
                }
                self.next_reservation
                    .fetch_max(r.reservation_id + 1, Ordering::Relaxed);
                self.reservations.lock().insert(
                    r.reservation_id,
                    Held {
                        reservation: r,
                        committed: false,
                        released: false,
                    },
                );
            }
            Op::Release { reservation_id } => {
                let reservation = {
                    let mut all = self.reservations.lock();
                    let held = all
                        .get_mut(&reservation_id)
                        .ok_or_else(|| format!("release of unknown {reservation_id}"))?;
                    held.released = true;
                    held.reservation.clone()
                };
                if let Some(cell) = self.cell(&reservation.item_id) {
                    release_unit(&mut cell.state.lock(), &reservation);
                    cell.sold_out.store(false, Ordering::Relaxed);
                }
            }
            Op::Commit { reservation_id } => {
                if let Some(held) = self.reservations.lock().get_mut(&reservation_id) {
                    held.committed = true;
                }
            }
            Op::TransferOut {
                item_id,
                transfer_id,
                taken,
            } => {
                let cell = self
                    .cell(&item_id)
                    .ok_or_else(|| format!("transfer out of unknown item {item_id}"))?;
                let mut item = cell.state.lock();
                for &(bucket, units) in &taken {
                    match item.buckets.get_mut(bucket as usize) {
                        Some(left) if *left >= units => *left -= units,
                        _ => {
                            return Err(format!(
                                "transfer {transfer_id} takes {units} from bucket {bucket} of {item_id}, which has fewer"
                            ));
                        }
                    }
                }
                let total = taken.iter().map(|t| t.1).sum();
                item.transfers_out.insert(transfer_id, total);
                cell.sold_out
                    .store(item.buckets.iter().all(|b| *b == 0), Ordering::Relaxed);
            }
            Op::TransferIn {
                item_id,
                transfer_id,
                added,
            } => {
                let cell = self
                    .cell(&item_id)
                    .ok_or_else(|| format!("transfer into unknown item {item_id}"))?;
                let mut item = cell.state.lock();
                add_units(&mut item, &added)
                    .map_err(|b| format!("transfer {transfer_id} adds to missing bucket {b}"))?;
                let total = added.iter().map(|t| t.1).sum();
                item.transfers_in.insert(transfer_id, total);
                cell.sold_out
                    .store(item.buckets.iter().all(|b| *b == 0), Ordering::Relaxed);
            }
            Op::Owner { owner, token } => {
                *self.owner.lock() = Some((owner, token));
            }
        }
        Ok(())
    }

    fn cell(&self, item_id: &str) -> Option<Arc<ItemCell>> {
        self.items.lock().get(item_id).cloned()
    }

    fn check_running(&self) -> Result<(), InventoryError> {
        if self.failed.load(Ordering::Acquire) {
            Err(InventoryError::Failed)
        } else {
            Ok(())
        }
    }

    /// Waits for an append, and stops the instance if it failed.
    async fn durable(&self, appended: keel_store::Appended) -> Result<(), InventoryError> {
        match appended.await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.failed.store(true, Ordering::Release);
                self.failure.notify_waiters();
                tracing::error!(error = %e, "inventory journal write failed; no more reservations");
                Err(e.into())
            }
        }
    }

    /// Whether a journal failure (an I/O error, or on a stream another writer's append) has
    /// stopped the instance.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Resolves once a journal failure has stopped the instance.
    pub async fn failed(&self) {
        loop {
            let woken = self.failure.notified();
            if self.has_failed() {
                return;
            }
            woken.await;
        }
    }

    /// The last owner that claimed the journal, with its fencing token.
    pub fn owner(&self) -> Option<(String, u64)> {
        self.owner.lock().clone()
    }

    /// Takes the journal over for `owner`, elected with fencing token `token`: appends an
    /// owner record right after what was replayed, answered once durable. On a stream the
    /// append carries the expected last sequence, so it fails with
    /// [`StoreError::Fenced`] if the previous owner appended after the replay (reopen and
    /// claim again); once it succeeds, no earlier writer can append any more.
    pub async fn claim(&self, owner: &str, token: u64) -> Result<(), InventoryError> {
        self.check_running()?;
        let op = Op::Owner {
            owner: owner.to_owned(),
            token,
        };
        let appended = self.journal.append(encode(&op))?;
        self.durable(appended).await?;
        *self.owner.lock() = Some((owner.to_owned(), token));
        Ok(())
    }

    /// Closes the journal (after the appends made so far are durable).
    pub async fn close(&self) -> Result<(), InventoryError> {
        Ok(self.journal.close().await?)
    }

    /// Creates an item with this instance's buckets (units per bucket). Creating it again
    /// with the same settings is accepted (a retried call); with others it is an error.
    pub async fn create_item(
        &self,
        item_id: &str,
        buckets: Vec<u64>,
        per_user_limit: u32,
    ) -> Result<(), InventoryError> {
        self.check_running()?;
        if buckets
            .iter()
            .try_fold(0u64, |sum, b| sum.checked_add(*b))
            .is_none()
        {
            return Err(InventoryError::Invalid(
                "the buckets add up to more than 2^64 units".into(),
            ));
        }
        // Decided under the lock; waited for after it.
        let appended = {
            let mut items = self.items.lock();
            match items.get(item_id) {
                Some(cell) => {
                    let item = cell.state.lock();
                    if item.initial != buckets || item.per_user_limit != per_user_limit {
                        return Err(InventoryError::Exists(item_id.to_owned()));
                    }
                    None
                }
                None => {
                    let op = Op::CreateItem {
                        item_id: item_id.to_owned(),
                        buckets: buckets.clone(),
                        per_user_limit,
                    };
                    let appended = self.journal.append(encode(&op))?;
                    items.insert(
                        item_id.to_owned(),
                        Arc::new(new_item(buckets, per_user_limit)),
                    );
                    Some(appended)
                }
            }
        };
        let Some(appended) = appended else {
            // A retry: answered once the first creation is durable.
            self.journal.sync().await?;
            return Ok(());
        };
        self.durable(appended).await
    }

    /// Reserves one unit of `item_id` for `user_id`; answered once durable.
    pub async fn reserve(
        &self,
        item_id: &str,
        user_id: &str,
        request_id: &str,
    ) -> Result<Result<Reservation, Refusal>, InventoryError> {
        self.check_running()?;
        let Some(cell) = self.cell(item_id) else {
            return Ok(Err(Refusal::NotFound));
        };
        let key = (user_id.to_owned(), request_id.to_owned());
        // Sold out: answered after only looking the request up (its retry, if it holds a unit,
        // must get the same answer).
        if cell.sold_out.load(Ordering::Relaxed) && !cell.state.lock().requests.contains_key(&key) {
            return Ok(Err(Refusal::SoldOut));
        }
        let decision = {
            let mut item = cell.state.lock();
            if let Some(id) = item.requests.get(&key).copied() {
                Decision::Known(id)
            } else if item.held.get(user_id).copied().unwrap_or(0) >= item.per_user_limit {
                Decision::Refused(Refusal::LimitReached)
            } else {
                let n = item.buckets.len();
                let start = item.next_bucket;
                match (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&b| item.buckets[b] > 0)
                {
                    None => {
                        cell.sold_out.store(true, Ordering::Relaxed);
                        Decision::Refused(Refusal::SoldOut)
                    }
                    Some(bucket) => {
                        let reservation = Reservation {
                            reservation_id: self.next_reservation.fetch_add(1, Ordering::Relaxed),
                            item_id: item_id.to_owned(),
                            user_id: user_id.to_owned(),
                            request_id: request_id.to_owned(),
                            bucket: bucket as u32,
                        };
                        let appended = self
                            .journal
                            .append(encode(&Op::Reserve(reservation.clone())))?;
                        item.buckets[bucket] -= 1;
                        item.next_bucket = (bucket + 1) % n;
                        *item.held.entry(user_id.to_owned()).or_default() += 1;
                        item.requests.insert(key, reservation.reservation_id);
                        if item.buckets.iter().all(|b| *b == 0) {
                            cell.sold_out.store(true, Ordering::Relaxed);
                        }
                        self.reservations.lock().insert(
                            reservation.reservation_id,
                            Held {
                                reservation: reservation.clone(),
                                committed: false,
                                released: false,
                            },
                        );
                        Decision::Taken(reservation, appended)
                    }
                }
            }
        };
        match decision {
            Decision::Refused(refusal) => Ok(Err(refusal)),
            Decision::Taken(reservation, appended) => {
                self.durable(appended).await?;
                Ok(Ok(reservation))
            }
            // Seen before: once everything appended so far is durable, so is its record. The
            // answer is the same reservation, also if its unit was released since (its order
            // expired): the caller finds that order.
            Decision::Known(id) => {
                self.journal.sync().await?;
                let known = self
                    .reservations
                    .lock()
                    .get(&id)
                    .map(|h| h.reservation.clone());
                Ok(known.ok_or(Refusal::NotFound))
            }
        }
    }

    /// Returns a reservation's unit to stock (its order expired unpaid). Only a live, not
    /// committed reservation of `user_id` is released; anything else does nothing and says so
    /// (false).
    pub async fn release(
        &self,
        reservation_id: u64,
        user_id: &str,
    ) -> Result<bool, InventoryError> {
        self.check_running()?;
        let appended = {
            let Some(held) = self.reservations.lock().get(&reservation_id).cloned() else {
                return Ok(false);
            };
            let r = held.reservation;
            if r.user_id != user_id {
                return Ok(false);
            }
            let Some(cell) = self.cell(&r.item_id) else {
                return Ok(false);
            };
            let mut item = cell.state.lock();
            // Checked again under the item's lock: two releases cannot both pass.
            let appended = {
                let mut all = self.reservations.lock();
                let Some(held) = all.get_mut(&reservation_id) else {
                    return Ok(false);
                };
                if held.released || held.committed {
                    if held.committed {
                        tracing::warn!(reservation_id, "refused to release a paid reservation");
                    }
                    return Ok(false);
                }
                let appended = self
                    .journal
                    .append(encode(&Op::Release { reservation_id }))?;
                held.released = true;
                appended
            };
            release_unit(&mut item, &r);
            cell.sold_out.store(false, Ordering::Relaxed);
            appended
        };
        self.durable(appended).await?;
        Ok(true)
    }

    /// Marks a reservation as sold for good (its order was paid): it can no longer be
    /// released. False if it is not live (released, or unknown).
    pub async fn commit(&self, reservation_id: u64) -> Result<bool, InventoryError> {
        self.check_running()?;
        let appended = {
            let mut all = self.reservations.lock();
            match all.get_mut(&reservation_id) {
                Some(held) if !held.released => {
                    if held.committed {
                        None
                    } else {
                        let appended = self
                            .journal
                            .append(encode(&Op::Commit { reservation_id }))?;
                        held.committed = true;
                        Some(appended)
                    }
                }
                _ => return Ok(false),
            }
        };
        match appended {
            Some(a) => self.durable(a).await?,
            None => self.journal.sync().await?,
        }
        Ok(true)
    }

    /// Moves up to `units` of the item's unsold units out of this instance, for another
    /// instance whose share sold out first; returns how many it took (0 if none are left).
    /// Durable before it answers; the same `transfer_id` gets the same answer, so a transfer
    /// retried after a crash takes nothing twice. A transfer that took nothing is not kept:
    /// asked again later, it may take what has come back since.
    pub async fn transfer_out(
        &self,
        item_id: &str,
        transfer_id: &str,
        units: u64,
    ) -> Result<Option<u64>, InventoryError> {
        self.check_running()?;
        let Some(cell) = self.cell(item_id) else {
            return Ok(None);
        };
        let decided = {
            let mut item = cell.state.lock();
            if let Some(&taken) = item.transfers_out.get(transfer_id) {
                Err(taken)
            } else {
                // From the fullest buckets first, so the rest stay spread.
                let mut order: Vec<usize> = (0..item.buckets.len()).collect();
                order.sort_by_key(|&b| std::cmp::Reverse(item.buckets[b]));
                let mut want = units;
                let mut taken = Vec::new();
                for b in order {
                    if want == 0 {
                        break;
                    }
                    let n = item.buckets[b].min(want);
                    if n > 0 {
                        taken.push((b as u32, n));
                        want -= n;
                    }
                }
                if taken.is_empty() {
                    return Ok(Some(0));
                }
                let appended = self.journal.append(encode(&Op::TransferOut {
                    item_id: item_id.to_owned(),
                    transfer_id: transfer_id.to_owned(),
                    taken: taken.clone(),
                }))?;
                for &(b, n) in &taken {
                    item.buckets[b as usize] -= n;
                }
                let total = taken.iter().map(|t| t.1).sum::<u64>();
                item.transfers_out.insert(transfer_id.to_owned(), total);
                if item.buckets.iter().all(|b| *b == 0) {
                    cell.sold_out.store(true, Ordering::Relaxed);
                }
                Ok((appended, total))
            }
        };
        let (appended, total) = match decided {
            Ok(taken) => taken,
            // Made before: answered once everything appended so far is durable.
            Err(known) => {
                self.journal.sync().await?;
                return Ok(Some(known));
            }
        };
        self.durable(appended).await?;
        Ok(Some(total))
    }

    /// Adds `units` moved here from another instance (spread over the buckets); the same
    /// `transfer_id` is added once. Durable before it answers. False if the item is unknown.
    pub async fn transfer_in(
        &self,
        item_id: &str,
        transfer_id: &str,
        units: u64,
    ) -> Result<bool, InventoryError> {
        self.check_running()?;
        let Some(cell) = self.cell(item_id) else {
            return Ok(false);
        };
        let appended = {
            let mut item = cell.state.lock();
            if item.transfers_in.contains_key(transfer_id) || units == 0 {
                None
            } else {
                let n = item.buckets.len().max(1) as u64;
                let added: Vec<(u32, u64)> = (0..n)
                    .map(|i| (i as u32, units / n + u64::from(i < units % n)))
                    .filter(|a| a.1 > 0)
                    .collect();
                let appended = self.journal.append(encode(&Op::TransferIn {
                    item_id: item_id.to_owned(),
                    transfer_id: transfer_id.to_owned(),
                    added: added.clone(),
                }))?;
                // The buckets exist (created with the item); nothing can fail here.
                let _ = add_units(&mut item, &added);
                item.transfers_in.insert(transfer_id.to_owned(), units);
                cell.sold_out.store(false, Ordering::Relaxed);
                Some(appended)
            }
        };
        match appended {
            Some(a) => self.durable(a).await?,
            None => self.journal.sync().await?,
        }
        Ok(true)
    }

    /// The (user, request id) of every reservation of the item here (released ones too),
    /// at most `limit`; `None` if there are more (or the item is unknown).
    pub fn holders(&self, item_id: &str, limit: usize) -> Option<Vec<(String, String)>> {
        let cell = self.cell(item_id)?;
        let item = cell.state.lock();
        (item.requests.len() <= limit).then(|| item.requests.keys().cloned().collect())
    }

    /// The stock of an item here.
    pub fn stock(&self, item_id: &str) -> Option<StockView> {
        let cell = self.cell(item_id)?;
        let item = cell.state.lock();
        let initial: u64 = item.initial.iter().sum();
        let left: u64 = item.buckets.iter().sum();
        Some(StockView {
            initial,
            left,
            reserved: item.held.values().map(|n| u64::from(*n)).sum(),
            moved_out: item.transfers_out.values().sum(),
            moved_in: item.transfers_in.values().sum(),
        })
    }

    /// Reservations after `after` (by id, at most `limit`), released ones included, once
    /// their records are durable: the instance's journal is the outbox the orders consume
    /// from, each consumer keeping its position, so no acknowledged reservation can be left
    /// without an order.
    pub async fn reservations_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Reservation>, InventoryError> {
        let list: Vec<Reservation> = self
            .reservations
            .lock()
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, h)| h.reservation.clone())
            .collect();
        // Everything listed was appended before this: once it is all on disk, so are they.
        if !list.is_empty() {
            self.journal.sync().await?;
        }
        Ok(list)
    }

    /// A live reservation (not released).
    pub fn reservation(&self, reservation_id: u64) -> Option<Reservation> {
        self.reservations
            .lock()
            .get(&reservation_id)
            .filter(|h| !h.released)
            .map(|h| h.reservation.clone())
    }

    /// Whether the item is sold out here (read from its flag, without its lock).
    pub fn is_sold_out(&self, item_id: &str) -> bool {
        self.cell(item_id)
            .is_some_and(|c| c.sold_out.load(Ordering::Relaxed))
    }
}

fn new_item(buckets: Vec<u64>, per_user_limit: u32) -> ItemCell {
    let sold_out = buckets.iter().all(|b| *b == 0);
    ItemCell {
        state: Mutex::new(Item {
            initial: buckets.clone(),
            buckets,
            per_user_limit,
            held: HashMap::new(),
            requests: HashMap::new(),
            next_bucket: 0,
            transfers_out: HashMap::new(),
            transfers_in: HashMap::new(),
        }),
        sold_out: AtomicBool::new(sold_out),
    }
}

/// Puts a released reservation's unit back and frees its slot in the user's limit. The
/// request stays known: sent again, it gets the same (released) reservation.
fn release_unit(item: &mut Item, r: &Reservation) {
    if let Some(units) = item.buckets.get_mut(r.bucket as usize) {
        *units += 1;
    }
    if let Some(n) = item.held.get_mut(&r.user_id) {
        *n = n.saturating_sub(1);
    }
}

/// Adds (bucket, units) pairs; `Err(bucket)` for a bucket the item does not have.
fn add_units(item: &mut Item, added: &[(u32, u64)]) -> Result<(), u32> {
    if let Some(&(b, _)) = added
        .iter()
        .find(|(b, _)| *b as usize >= item.buckets.len())
    {
        return Err(b);
    }
    for &(b, n) in added {
        item.buckets[b as usize] += n;
    }
    Ok(())
}

/// The reservation a journal record of an inventory holds, if it is one (other records, such
/// as releases or an owner's claim, give `None`): how a follower of the journal itself (the
/// orders, in the scale-out profile) reads it. An error means the record is not an inventory
/// journal record at all.
pub fn reservation_in(record: &[u8]) -> Result<Option<Reservation>, serde_json::Error> {
    match serde_json::from_slice::<Op>(record)? {
        Op::Reserve(reservation) => Ok(Some(reservation)),
        _ => Ok(None),
    }
}

fn encode(op: &Op) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::to_vec(op).unwrap_or_default())
}
