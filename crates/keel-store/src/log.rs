//! One journal type over both places a journal can live: segment files in a local directory
//! ([`Journal`]) or a NATS JetStream stream ([`StreamJournal`]). A state machine written
//! against [`Log`] runs embedded on one machine and on JetStream across machines, chosen by
//! configuration ([`LogTarget`]).

use std::path::PathBuf;

use bytes::Bytes;

use crate::StoreError;
use crate::journal::{Appended, Journal, JournalOptions, JournalStats, Recovered};
use crate::stream::{StreamJournal, StreamOptions};

/// Where a journal lives.
#[derive(Debug, Clone)]
pub enum LogTarget {
    /// Segment files in a local directory.
    Dir {
        /// The directory (created if absent).
        dir: PathBuf,
        /// The journal's settings.
        options: JournalOptions,
    },
    /// A JetStream stream.
    Stream(StreamOptions),
}

impl LogTarget {
    /// The journal at `address` when one is given — `nats://host:port[,…]` with
    /// `?replicas=N&in_flight=M` if wanted, in a stream named `stream` — or else in the
    /// directory `dir` with default settings.
    pub fn choose(
        address: Option<&str>,
        dir: impl Into<PathBuf>,
        stream: &str,
    ) -> Result<LogTarget, StoreError> {
        match address.map(str::trim).filter(|a| !a.is_empty()) {
            Some(a) => StreamOptions::parse(a, stream).map(LogTarget::Stream),
            None => Ok(LogTarget::Dir {
                dir: dir.into(),
                options: JournalOptions::default(),
            }),
        }
    }

    /// Where it is, for messages: the directory, or `nats stream NAME`.
    pub fn describe(&self) -> String {
        match self {
            LogTarget::Dir { dir, .. } => dir.display().to_string(),
            LogTarget::Stream(o) => format!("nats stream {}", o.stream),
        }
    }
}

/// An open journal of either kind.
#[derive(Debug)]
pub enum Log {
    /// Local segment files.
    Local(Journal),
    /// A JetStream stream.
    Stream(StreamJournal),
}

impl Log {
    /// Opens the journal at `target` and replays it (a local one on a blocking thread).
    pub async fn open(target: LogTarget) -> Result<(Log, Recovered), StoreError> {
        match target {
            LogTarget::Dir { dir, options } => {
                let path = dir.clone();
                let (journal, recovered) =
                    tokio::task::spawn_blocking(move || Journal::open(dir, options))
                        .await
                        .map_err(|e| StoreError::io(&path, std::io::Error::other(e)))??;
                Ok((Log::Local(journal), recovered))
            }
            LogTarget::Stream(options) => {
                let (journal, recovered) = StreamJournal::open(options).await?;
                Ok((Log::Stream(journal), recovered))
            }
        }
    }

    /// Appends a record; its index is assigned now, in submission order. Await the result for
    /// the acknowledgement (on disk, or acknowledged by JetStream).
    pub fn append(&self, payload: impl Into<Bytes>) -> Result<Appended, StoreError> {
        match self {
            Log::Local(j) => j.append(payload),
            Log::Stream(j) => j.append(payload),
        }
    }

    /// The index the next append will get.
    pub fn next_index(&self) -> u64 {
        match self {
            Log::Local(j) => j.next_index(),
            Log::Stream(j) => j.next_index(),
        }
    }

    /// Waits until everything appended so far is as durable as an acknowledged append.
    pub async fn sync(&self) -> Result<(), StoreError> {
        match self {
            Log::Local(j) => j.sync().await,
            Log::Stream(j) => j.sync().await,
        }
    }

    /// Counters.
    pub fn stats(&self) -> &JournalStats {
        match self {
            Log::Local(j) => j.stats(),
            Log::Stream(j) => j.stats(),
        }
    }

    /// Stops accepting appends and waits for those submitted.
    pub async fn close(&self) -> Result<(), StoreError> {
        match self {
            Log::Local(j) => j.close().await,
            Log::Stream(j) => j.close().await,
        }
    }
}

impl From<Journal> for Log {
    fn from(journal: Journal) -> Log {
        Log::Local(journal)
    }
}
