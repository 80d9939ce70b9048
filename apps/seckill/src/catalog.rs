//! The sale's catalog: the items, the ones out of the storefront, and the transfers of units
//! between shards not known to be finished.
//!
//! Two stores, one [`Catalog`]:
//! - a local journal (`keel-store`), for an API that runs alone (no naming service);
//! - the naming service's config entries (Keel's registry, or etcd at scale), shared by every
//!   API of the sale: keys under `seckill/catalog/` (`item/<id>`, `hidden/<id>`,
//!   `transfer/<id>`), followed with a watch. A write returns once durable there and once this
//!   API's copy has caught up with it, so an API reads its own writes; the others see it a
//!   watch event later. An item is created with a compare-and-set (only if its key is new), so
//!   two APIs creating items at once never give two items one id.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_registry::{ConfigChange, Naming, NamingBackend, follow_config};
use keel_rpc::Code;
use keel_store::{Journal, JournalOptions, StoreError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::peers::NAMESPACE;

/// Where the shared catalog's entries are, in the naming service's config.
pub const CATALOG_PREFIX: &str = "seckill/catalog/";

/// How long a write waits for this API's copy to catch up before it applies the change itself.
const CATCH_UP: Duration = Duration::from_secs(5);

/// An item of the sale, as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemDef {
    /// Its id.
    pub item_id: String,
    /// Display name.
    pub name: String,
    /// Price in cents.
    pub price_cents: u64,
    /// Units for sale.
    pub stock: u64,
    /// Unix time (ms) the sale opens.
    pub starts_at_ms: u64,
    /// Units one user may buy.
    pub per_user_limit: u32,
    /// The shards holding its stock, in the order of their shares (empty in items written
    /// before shards existed: the API's first shard holds it all).
    #[serde(default)]
    pub shards: Vec<String>,
}

/// Units of an item moved from one shard to another whose share sold out first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Unique; the inventories' idempotency key.
    pub id: String,
    /// The item.
    pub item_id: String,
    /// The shard giving units.
    pub from: String,
    /// The shard receiving them.
    pub to: String,
    /// Units asked for (the giver may have fewer).
    pub units: u64,
}

/// The catalog journal's other records (items are stored as plain [`ItemDef`]s).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CatalogOp {
    /// A transfer about to start.
    Transfer(Transfer),
    /// A transfer finished (by id).
    TransferDone(String),
    /// An item taken out of the storefront (by id); its orders stay.
    Hidden(String),
    /// An item nobody had reserved, dropped from the catalog (by id).
    Removed(String),
}

/// Why a catalog change was not made.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The local journal failed.
    #[error("catalog journal: {0}")]
    Journal(#[from] StoreError),
    /// The naming service failed or could not be reached.
    #[error("catalog in the naming service: {0}")]
    Naming(String),
    /// Another API created an item with this id first.
    #[error("item {0} exists already")]
    Taken(String),
}

/// What the catalog holds.
#[derive(Debug, Default)]
struct State {
    /// Oldest first.
    items: Vec<ItemDef>,
    /// Items out of the storefront (their orders stay readable).
    hidden: std::collections::BTreeSet<String>,
    /// Transfers begun and not known to be finished.
    pending: std::collections::BTreeMap<String, Transfer>,
}

impl State {
    fn add(&mut self, item: ItemDef) {
        match self.items.iter_mut().find(|i| i.item_id == item.item_id) {
            Some(known) => *known = item,
            None => self.items.push(item),
        }
    }

    fn remove(&mut self, item_id: &str) {
        self.items.retain(|i| i.item_id != item_id);
        self.hidden.remove(item_id);
    }

    /// Applies a shared entry (`key` under [`CATALOG_PREFIX`]): set to `value`, or deleted.
    fn apply_entry(&mut self, key: &str, value: Option<&[u8]>) {
        let Some(key) = key.strip_prefix(CATALOG_PREFIX) else {
            return;
        };
        let unreadable = |what: &str| tracing::warn!(key, "unreadable catalog {what} skipped");
        match (key.split_once('/'), value) {
            (Some(("item", _)), Some(v)) => match serde_json::from_slice::<ItemDef>(v) {
                Ok(item) => self.add(item),
                Err(_) => unreadable("item"),
            },
            (Some(("item", id)), None) => self.remove(id),
            (Some(("hidden", id)), Some(_)) => {
                self.hidden.insert(id.to_owned());
            }
            (Some(("hidden", id)), None) => {
                self.hidden.remove(id);
            }
            (Some(("transfer", _)), Some(v)) => match serde_json::from_slice::<Transfer>(v) {
                Ok(t) => {
                    self.pending.insert(t.id.clone(), t);
                }
                Err(_) => unreadable("transfer"),
            },
            (Some(("transfer", id)), None) => {
                self.pending.remove(id);
            }
            _ => {}
        }
    }
}

/// Where the catalog is kept.
#[derive(Debug)]
enum Store {
    /// A local journal: this API alone.
    Journal(Journal),
    /// The naming service's config, shared by every API; `applied` is the revision this
    /// API's copy has caught up with.
    Shared {
        naming: Naming,
        applied: watch::Receiver<u64>,
        follower: tokio::task::JoinHandle<()>,
    },
}

/// The catalog of items, and the transfers between shards not known to be finished.
#[derive(Debug)]
pub struct Catalog {
    store: Store,
    state: Arc<Mutex<State>>,
}

impl Drop for Catalog {
    fn drop(&mut self) {
        if let Store::Shared { follower, .. } = &self.store {
            follower.abort();
        }
    }
}

fn naming_error(e: keel_rpc::Status) -> CatalogError {
    CatalogError::Naming(e.to_string())
}

impl Catalog {
    /// Opens the catalog in the local journal in `dir`. Blocking.
    pub fn open(dir: impl AsRef<Path>) -> Result<Catalog, StoreError> {
        let (journal, recovered) = Journal::open(dir, JournalOptions::default())?;
        let mut state = State::default();
        for r in &recovered.records {
            if let Ok(item) = serde_json::from_slice::<ItemDef>(&r.payload) {
                state.items.push(item);
            } else {
                match serde_json::from_slice::<CatalogOp>(&r.payload) {
                    Ok(CatalogOp::Transfer(t)) => {
                        state.pending.insert(t.id.clone(), t);
                    }
                    Ok(CatalogOp::TransferDone(id)) => {
                        state.pending.remove(&id);
                    }
                    Ok(CatalogOp::Hidden(id)) => {
                        state.hidden.insert(id);
                    }
                    Ok(CatalogOp::Removed(id)) => state.remove(&id),
                    Err(e) => {
                        tracing::warn!(index = r.index, error = %e, "unreadable catalog record skipped")
                    }
                }
            }
        }
        Ok(Catalog {
            store: Store::Journal(journal),
            state: Arc::new(Mutex::new(state)),
        })
    }

    /// Opens the catalog shared by every API in `naming`'s config entries, and follows it;
    /// returns once the current entries are read (an error after 30 s without an answer).
    pub async fn shared(naming: Naming) -> Result<Catalog, CatalogError> {
        let state = Arc::new(Mutex::new(State::default()));
        let (applied_tx, mut applied) = watch::channel(0u64);
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<()>();
        let follower = tokio::spawn(follow(
            naming.clone(),
            Arc::downgrade(&state),
            applied_tx,
            ready_tx,
        ));
        if tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .is_err()
        {
            follower.abort();
            return Err(CatalogError::Naming(
                "no answer in 30 s reading the catalog".into(),
            ));
        }
        applied.mark_unchanged();
        Ok(Catalog {
            store: Store::Shared {
                naming,
                applied,
                follower,
            },
            state,
        })
    }

    /// Copies what the local catalog `from` holds into this (shared) one, unless this one
    /// has items already: how a sale started with a local catalog moves to a shared one.
    /// Returns how many items were copied.
    pub async fn import(&self, from: &Catalog) -> Result<usize, CatalogError> {
        if !self.all().is_empty() || matches!(self.store, Store::Journal(_)) {
            return Ok(0);
        }
        let mut copied = 0;
        for item in from.all() {
            let id = item.item_id.clone();
            match self.add(item).await {
                Ok(()) => copied += 1,
                Err(CatalogError::Taken(_)) => {}
                Err(e) => return Err(e),
            }
            if from.is_hidden(&id) {
                self.hide(&id).await?;
            }
        }
        for t in from.pending_transfers() {
            self.begin_transfer(&t).await?;
        }
        Ok(copied)
    }

    /// Waits (up to [`CATCH_UP`]) until this API's copy of the shared catalog has applied
    /// `revision`; if it does not in time, applies `change` itself.
    async fn caught_up(&self, revision: u64, change: impl FnOnce(&mut State)) {
        let Store::Shared { applied, .. } = &self.store else {
            return;
        };
        let mut applied = applied.clone();
        let seen = tokio::time::timeout(CATCH_UP, applied.wait_for(|r| *r >= revision)).await;
        if !matches!(seen, Ok(Ok(_))) {
            change(&mut self.state.lock());
        }
    }

    /// Adds an item; returns once durable. On a shared catalog the item's id must be new
    /// ([`CatalogError::Taken`] otherwise).
    pub async fn add(&self, item: ItemDef) -> Result<(), CatalogError> {
        match &self.store {
            Store::Journal(journal) => {
                let appended = {
                    let mut state = self.state.lock();
                    let a = journal.append(serde_json::to_vec(&item).unwrap_or_default())?;
                    state.items.push(item);
                    a
                };
                appended.await?;
            }
            Store::Shared { naming, .. } => {
                let key = format!("{CATALOG_PREFIX}item/{}", item.item_id);
                let value = serde_json::to_vec(&item).unwrap_or_default();
                let entry = match naming.put_config_if(NAMESPACE, &key, value.into(), 0).await {
                    Ok(entry) => entry,
                    Err(e) if e.code() == Code::FailedPrecondition => {
                        return Err(CatalogError::Taken(item.item_id));
                    }
                    Err(e) => return Err(naming_error(e)),
                };
                self.caught_up(entry.revision, |s| s.add(item)).await;
            }
        }
        Ok(())
    }

    /// Records a transfer before it starts; returns once durable.
    pub async fn begin_transfer(&self, transfer: &Transfer) -> Result<(), CatalogError> {
        match &self.store {
            Store::Journal(journal) => {
                let appended = {
                    let mut state = self.state.lock();
                    let op = CatalogOp::Transfer(transfer.clone());
                    let a = journal.append(serde_json::to_vec(&op).unwrap_or_default())?;
                    state.pending.insert(transfer.id.clone(), transfer.clone());
                    a
                };
                appended.await?;
            }
            Store::Shared { naming, .. } => {
                let key = format!("{CATALOG_PREFIX}transfer/{}", transfer.id);
                let value = serde_json::to_vec(transfer).unwrap_or_default();
                let entry = naming
                    .put_config(NAMESPACE, &key, value.into())
                    .await
                    .map_err(naming_error)?;
                self.caught_up(entry.revision, |s| {
                    s.pending.insert(transfer.id.clone(), transfer.clone());
                })
                .await;
            }
        }
        Ok(())
    }

    /// Records that a transfer finished.
    pub async fn end_transfer(&self, id: &str) -> Result<(), CatalogError> {
        if !self.state.lock().pending.contains_key(id) {
            return Ok(());
        }
        match &self.store {
            Store::Journal(journal) => {
                let appended = {
                    let mut state = self.state.lock();
                    if state.pending.remove(id).is_none() {
                        return Ok(());
                    }
                    let op = CatalogOp::TransferDone(id.to_owned());
                    journal.append(serde_json::to_vec(&op).unwrap_or_default())?
                };
                appended.await?;
            }
            Store::Shared { naming, .. } => {
                let key = format!("{CATALOG_PREFIX}transfer/{id}");
                let revision = naming
                    .delete_config(NAMESPACE, &key)
                    .await
                    .map_err(naming_error)?;
                self.caught_up(revision, |s| {
                    s.pending.remove(id);
                })
                .await;
                // Deleted by another API already (revision 0): gone from here too.
                self.state.lock().pending.remove(id);
            }
        }
        Ok(())
    }

    /// Takes an item out of the storefront; returns once durable. Its orders stay.
    pub async fn hide(&self, item_id: &str) -> Result<(), CatalogError> {
        match &self.store {
            Store::Journal(journal) => {
                let appended = {
                    let mut state = self.state.lock();
                    let op = CatalogOp::Hidden(item_id.to_owned());
                    let a = journal.append(serde_json::to_vec(&op).unwrap_or_default())?;
                    state.hidden.insert(item_id.to_owned());
                    a
                };
                appended.await?;
            }
            Store::Shared { naming, .. } => {
                let key = format!("{CATALOG_PREFIX}hidden/{item_id}");
                let entry = naming
                    .put_config(NAMESPACE, &key, bytes::Bytes::from_static(b"1"))
                    .await
                    .map_err(naming_error)?;
                self.caught_up(entry.revision, |s| {
                    s.hidden.insert(item_id.to_owned());
                })
                .await;
            }
        }
        Ok(())
    }

    /// Drops an item from the catalog; returns once durable.
    pub async fn remove(&self, item_id: &str) -> Result<(), CatalogError> {
        match &self.store {
            Store::Journal(journal) => {
                let appended = {
                    let mut state = self.state.lock();
                    let op = CatalogOp::Removed(item_id.to_owned());
                    let a = journal.append(serde_json::to_vec(&op).unwrap_or_default())?;
                    state.remove(item_id);
                    a
                };
                appended.await?;
            }
            Store::Shared { naming, .. } => {
                let hidden = format!("{CATALOG_PREFIX}hidden/{item_id}");
                let item = format!("{CATALOG_PREFIX}item/{item_id}");
                // The item first: if the second deletion fails, what is left is a mark on an
                // item that is gone, never an item back in the storefront.
                let revision = naming
                    .delete_config(NAMESPACE, &item)
                    .await
                    .map_err(naming_error)?;
                naming
                    .delete_config(NAMESPACE, &hidden)
                    .await
                    .map_err(naming_error)?;
                self.caught_up(revision, |s| s.remove(item_id)).await;
                self.state.lock().remove(item_id);
            }
        }
        Ok(())
    }

    /// Whether an item is out of the storefront.
    pub fn is_hidden(&self, item_id: &str) -> bool {
        self.state.lock().hidden.contains(item_id)
    }

    /// An item the storefront shows (looked up as [`Catalog::find`] does).
    pub async fn shown(&self, item_id: &str) -> Option<ItemDef> {
        self.find(item_id)
            .await
            .filter(|i| !self.is_hidden(&i.item_id))
    }

    /// Transfers begun and not known to be finished.
    pub fn pending_transfers(&self) -> Vec<Transfer> {
        self.state.lock().pending.values().cloned().collect()
    }

    /// An item.
    pub fn get(&self, item_id: &str) -> Option<ItemDef> {
        self.state
            .lock()
            .items
            .iter()
            .find(|i| i.item_id == item_id)
            .cloned()
    }

    /// An item, asking the naming service when this API's copy does not know it yet (an item
    /// another API created a moment ago).
    pub async fn find(&self, item_id: &str) -> Option<ItemDef> {
        if let Some(item) = self.get(item_id) {
            return Some(item);
        }
        let Store::Shared { naming, .. } = &self.store else {
            return None;
        };
        // Only ids this catalog could have made (`item-<n>`), so requests for made-up ids do
        // not each cost a trip to the naming service.
        let made_here = item_id.strip_prefix("item-").is_some_and(|n| {
            !n.is_empty() && n.len() <= 12 && n.bytes().all(|b| b.is_ascii_digit())
        });
        if !made_here {
            return None;
        }
        let key = format!("{CATALOG_PREFIX}item/{item_id}");
        let entry = naming.get_config(NAMESPACE, &key).await.ok()??;
        let item: ItemDef = serde_json::from_slice(&entry.value).ok()?;
        self.caught_up(entry.revision, |s| s.add(item.clone()))
            .await;
        Some(item)
    }

    /// All items, oldest first.
    pub fn all(&self) -> Vec<ItemDef> {
        self.state.lock().items.clone()
    }

    /// Whether the catalog is shared by several APIs (kept in the naming service).
    pub fn is_shared(&self) -> bool {
        matches!(self.store, Store::Shared { .. })
    }
}

/// Keeps `state` equal to the shared catalog: the entries, then each change, in revision
/// order; `applied` says how far it has got, `ready` fires after the first list.
async fn follow(
    naming: Naming,
    state: std::sync::Weak<Mutex<State>>,
    applied: watch::Sender<u64>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut changes = follow_config(naming, NAMESPACE, CATALOG_PREFIX);
    while let Some(change) = changes.recv().await {
        let Some(state) = state.upgrade() else {
            return;
        };
        let revision = change.revision();
        {
            let mut state = state.lock();
            match change {
                ConfigChange::Reset { mut entries, .. } => {
                    // Items are never rewritten, so their revision is their creation's.
                    entries.sort_by_key(|e| e.revision);
                    let mut fresh = State::default();
                    for entry in &entries {
                        fresh.apply_entry(&entry.key, Some(&entry.value));
                    }
                    *state = fresh;
                }
                ConfigChange::Put(entry) => state.apply_entry(&entry.key, Some(&entry.value)),
                ConfigChange::Delete { key, .. } => state.apply_entry(&key, None),
            }
        }
        applied.send_modify(|r| *r = (*r).max(revision));
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
    }
}
