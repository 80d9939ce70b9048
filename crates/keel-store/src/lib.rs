//! Durability for in-memory state machines, as the seeds' storage notes put it: a journal
//! (write-ahead log) plus snapshots.
//!
//! A service keeps its state in memory, appends every change to the [`Journal`] before it
//! acknowledges it, and now and then writes a [`Snapshot`] of the whole state so the journal
//! can be cut short. On start, [`Journal::open`] hands back the newest snapshot and the records
//! after it, to replay.
//!
//! - [`journal`]: segment files of checksummed, length-prefixed records; one writer thread
//!   with group commit; fsync policies `always`, `interval` and `never`; recovery that cuts
//!   off a crash-torn tail and refuses (naming file and offset) damage anywhere else.
//! - [`snapshot`]: snapshot files, written to a temporary name, synced, then renamed.
//! - [`queue`]: a durable queue on the journal: at-least-once delivery with leases and
//!   acknowledgements, compacted by snapshots.
//! - [`lock`]: one process per directory, by an exclusive lock on a `LOCK` file.
//! - [`stream`]: the same journal contract on a NATS JetStream stream (replicated on other
//!   machines), with appends fenced by the stream's expected last sequence; [`Log`] is either
//!   kind, chosen by a [`LogTarget`] (a directory or a `nats://` address).
//! - [`feed`]: a stream journal read as a queue, through a durable JetStream consumer
//!   (at-least-once, redelivered when a follower dies).
//! - `record`: the byte layout, as pure functions.
//!
//! The on-disk format is specified in `docs/storage.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod feed;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod journal;
pub mod lock;
mod log;
pub mod queue;
mod record;
pub mod snapshot;
pub mod stream;
#[doc(hidden)]
pub mod testing;

pub use feed::{FeedRecord, StreamFeed};
pub use journal::{
    Appended, Journal, JournalOptions, JournalStats, Record, Recovered, SyncPolicy, TornTail,
};
pub use lock::DirLock;
pub use log::{Log, LogTarget};
pub use queue::{Delivery, DurableQueue};
pub use snapshot::Snapshot;
pub use stream::{StreamJournal, StreamOptions};

/// What went wrong in the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error (shared: one failure is reported to every waiting append).
        source: Arc<std::io::Error>,
    },
    /// A file holds data that fails its checks somewhere other than a torn tail.
    #[error("{} is damaged at byte {offset}: {reason}", file.display())]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// Byte offset of the first bad data.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A record larger than the configured maximum.
    #[error("record of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The record's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A snapshot for an index that has not been appended yet.
    #[error("snapshot at index {index}, but the journal's next index is {next}")]
    InvalidSnapshot {
        /// The snapshot's index.
        index: u64,
        /// The next index the journal would assign.
        next: u64,
    },
    /// The journal is closed.
    #[error("journal is closed")]
    Closed,
    /// Another process (or another open journal in this one) holds the directory.
    #[error("{} is in use by {}: one process may open a journal directory at a time", dir.display(), holder_text(*pid))]
    Locked {
        /// The journal's directory.
        dir: PathBuf,
        /// The holder's process id, as it wrote it in the lock file, when readable.
        pid: Option<u32>,
    },
    /// A setting the store was given is not valid: a journal address, a stream name.
    #[error("{setting} {value:?}: {reason}")]
    InvalidSetting {
        /// Which setting: `journal address`, `stream name`.
        setting: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A stream journal's engine (NATS JetStream) failed or could not be reached.
    #[error("nats stream {stream}: {reason}")]
    Engine {
        /// The stream.
        stream: String,
        /// What failed.
        reason: String,
    },
    /// Another writer appended to the stream: this one's append was refused by the stream
    /// (its expected last sequence did not hold), and the journal takes no more.
    #[error(
        "nats stream {stream}: append {index} refused because another writer appended first ({reason}); this writer has been replaced"
    )]
    Fenced {
        /// The stream.
        stream: String,
        /// The refused record's index.
        index: u64,
        /// JetStream's answer.
        reason: String,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("process {pid}"),
        None => "another process".to_owned(),
    }
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_owned(),
            source: Arc::new(source),
        }
    }
}
