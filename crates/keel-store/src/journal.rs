//! The journal: an append-only log of records in numbered segment files, written by one
//! thread that batches concurrent appends into one write and (with [`SyncPolicy::Always`]) one
//! fsync — group commit — and replayed on open.
//!
//! Recovery reads the newest valid snapshot, then every record after it. A record cut short or
//! garbled at the very end of the last segment is what a crash in the middle of a write leaves:
//! it is cut off, and reported in [`Recovered::torn_tail`]. A bad record with valid records
//! after it, or in any segment but the last, is damage that dropping would lose acknowledged
//! data: opening fails with [`StoreError::Corrupt`], naming the file and offset.
//!
//! A journal directory belongs to one process: opening takes an exclusive lock on its `LOCK`
//! file ([`DirLock`]), and a second opener is refused with [`StoreError::Locked`].

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::StoreError;
use crate::lock::DirLock;
use crate::record::{self, Defect};
use crate::snapshot::{self, Snapshot};

/// When appended records are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every append is on disk (fsync'd) before it is acknowledged. Appends that arrive while
    /// a sync runs share the next one (group commit), so throughput grows with concurrency.
    Always,
    /// Appends are acknowledged once written to the OS; a background sync runs at most this
    /// long after a write. A machine crash can lose that window; a process crash loses nothing.
    Interval(Duration),
    /// Appends are acknowledged once written to the OS and never synced explicitly.
    Never,
}

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// When records reach stable storage.
    pub sync: SyncPolicy,
    /// A segment file is closed and a new one started once it holds this many bytes.
    pub segment_bytes: u64,
    /// Largest record accepted; also the sanity bound applied to lengths read back.
    pub max_record_bytes: usize,
    /// Most bytes gathered into one write (and one fsync) by group commit.
    pub max_batch_bytes: usize,
}

impl Default for JournalOptions {
    fn default() -> JournalOptions {
        JournalOptions {
            sync: SyncPolicy::Always,
            segment_bytes: 64 << 20,
            max_record_bytes: 16 << 20,
            max_batch_bytes: 4 << 20,
        }
    }
}

/// One record read back on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its position in the journal, from 1.
    pub index: u64,
    /// What was appended.
    pub payload: Bytes,
}

/// A torn tail found and cut off on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file.
    pub file: PathBuf,
    /// Where the file now ends: the end of its last valid record.
    pub offset: u64,
    /// Bytes cut off.
    pub dropped_bytes: u64,
    /// What was wrong with the first dropped record.
    pub reason: String,
}

/// What [`Journal::open`] found on disk.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The newest valid snapshot, if any; restore it first.
    pub snapshot: Option<Snapshot>,
    /// The records after the snapshot, in order; apply them after it.
    pub records: Vec<Record>,
    /// A crash-torn tail that was cut off, if there was one.
    pub torn_tail: Option<TornTail>,
    /// Snapshot files that failed their checks and were passed over for an older one.
    pub bad_snapshots: Vec<StoreError>,
}

impl Recovered {
    /// The index of the last record recovered (or of the snapshot), 0 for an empty journal.
    pub fn last_index(&self) -> u64 {
        self.records
            .last()
            .map(|r| r.index)
            .or(self.snapshot.as_ref().map(|s| s.index))
            .unwrap_or(0)
    }
}

/// Counters of one journal.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Records appended since open.
    pub appends: AtomicU64,
    /// Group-commit batches written.
    pub batches: AtomicU64,
    /// fsync calls on segment files.
    pub syncs: AtomicU64,
    /// Record bytes written.
    pub bytes: AtomicU64,
    /// Snapshots written.
    pub snapshots: AtomicU64,
    /// Segment files deleted after a snapshot made them unnecessary.
    pub segments_removed: AtomicU64,
    /// Appends sent again because their acknowledgement did not come (stream journals).
    pub resends: AtomicU64,
}

type Done = oneshot::Sender<Result<(), StoreError>>;

enum Op {
    Append {
        index: u64,
        payload: Bytes,
        done: Done,
    },
    Sync {
        done: Done,
    },
    /// Delete segments whose records are all at or below `upto`.
    Compact {
        upto: u64,
        done: Done,
    },
}

struct Submit {
    tx: Option<mpsc::Sender<Op>>,
    next_index: u64,
}

/// An open journal. Appends may come from many tasks at once; they are numbered in the order
/// they are submitted, and that is the order they are written and replayed in.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    options: JournalOptions,
    submit: Mutex<Submit>,
    stats: Arc<JournalStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Snapshots are written one at a time.
    snapshot_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Submit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submit")
            .field("open", &self.tx.is_some())
            .field("next_index", &self.next_index)
            .finish()
    }
}

/// An append in flight: its index is known at once; awaiting it waits until the record is as
/// durable as the [`SyncPolicy`] promises.
#[derive(Debug)]
#[must_use = "an append is only acknowledged once awaited"]
pub struct Appended {
    /// The record's index.
    pub index: u64,
    rx: oneshot::Receiver<Result<(), StoreError>>,
}

impl Appended {
    /// An append whose acknowledgement arrives on `rx`.
    pub(crate) fn new(index: u64, rx: oneshot::Receiver<Result<(), StoreError>>) -> Appended {
        Appended { index, rx }
    }
}

impl Future for Appended {
    type Output = Result<u64, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let index = self.index;
        Pin::new(&mut self.rx).poll(cx).map(|r| match r {
            Ok(Ok(())) => Ok(index),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Closed),
        })
    }
}

struct SegmentFile {
    first_index: u64,
    path: PathBuf,
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.wal")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".wal")?.parse().ok()
}

impl Journal {
    /// Opens (or creates) the journal in `dir`: recovers its contents, cuts off a torn tail,
    /// and starts the writer thread. Blocking; call it at start-up or from `spawn_blocking`.
    pub fn open(
        dir: impl AsRef<Path>,
        options: JournalOptions,
    ) -> Result<(Journal, Recovered), StoreError> {
        let dir = dir.as_ref().to_owned();
        // Taken before anything is read: a second process on this directory would interleave
        // its records with ours. The writer thread holds it until its last sync is done.
        let lock = DirLock::acquire(&dir)?;
        let (segments, snapshots) = list_dir(&dir)?;

        let mut recovered = Recovered::default();
        for (index, path) in snapshots.iter().rev() {
            match snapshot::read(path) {
                Ok(snap) if snap.index == *index => {
                    recovered.snapshot = Some(snap);
                    break;
                }
                Ok(snap) => recovered.bad_snapshots.push(StoreError::Corrupt {
                    file: path.clone(),
                    offset: 8,
                    reason: format!("holds index {} but is named for {index}", snap.index),
                }),
                Err(e) => recovered.bad_snapshots.push(e),
            }
        }
        for e in &recovered.bad_snapshots {
            tracing::warn!(error = %e, "skipping a damaged snapshot");
        }
        let snap_index = recovered.snapshot.as_ref().map_or(0, |s| s.index);

        let mut expected = snap_index + 1;
        let mut kept: Vec<SegmentFile> = Vec::new();
        let mut last_end = None;
        let firsts: Vec<u64> = segments.iter().map(|(first, _)| *first).collect();
        for (i, (first_index, path)) in segments.into_iter().enumerate() {
            let last = i + 1 == firsts.len();
            // Every record of this segment is in the snapshot when the next segment starts at
            // or before the first record the snapshot lacks.
            let covered = firsts
                .get(i + 1)
                .is_some_and(|&next| next <= snap_index + 1);
            let bytes = fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
            if bytes.len() < record::SEGMENT_HEADER_LEN && last {
                // Created, then the crash came before its header was on disk.
                recovered.torn_tail = Some(TornTail {
                    file: path.clone(),
                    offset: 0,
                    dropped_bytes: bytes.len() as u64,
                    reason: "segment header cut short".into(),
                });
                fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                continue;
            }
            if record::decode_segment_header(&bytes) != Some(first_index) {
                return Err(StoreError::Corrupt {
                    file: path,
                    offset: 0,
                    reason: "bad segment header".into(),
                });
            }
            if first_index > expected {
                return Err(StoreError::Corrupt {
                    file: path,
                    offset: 0,
                    reason: format!(
                        "journal gap: starts at record {first_index}, but {expected} is missing"
                    ),
                });
            }
            let bytes = Bytes::from(bytes);
            let body = bytes.slice(record::SEGMENT_HEADER_LEN..);
            let scan = record::scan(&body, first_index, options.max_record_bytes);
            if let Some(defect) = &scan.defect {
                let offset = (record::SEGMENT_HEADER_LEN + scan.valid_end) as u64;
                let next = first_index + scan.records.len() as u64;
                let torn = last
                    && !matches!(defect, Defect::WrongIndex { .. })
                    && !record::valid_record_after(
                        &body,
                        scan.valid_end,
                        next,
                        options.max_record_bytes,
                    );
                if covered {
                    tracing::warn!(file = %path.display(), offset, reason = %defect,
                        "damage in a segment the snapshot already covers; ignored");
                } else if !torn {
                    return Err(StoreError::Corrupt {
                        file: path,
                        offset,
                        reason: defect.to_string(),
                    });
                } else {
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| StoreError::io(&path, e))?;
                    file.set_len(offset)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| StoreError::io(&path, e))?;
                    tracing::warn!(file = %path.display(), offset, reason = %defect,
                        "cut off a torn journal tail");
                    recovered.torn_tail = Some(TornTail {
                        file: path.clone(),
                        offset,
                        dropped_bytes: bytes.len() as u64 - offset,
                        reason: defect.to_string(),
                    });
                }
            }
            if last {
                last_end = Some(first_index + scan.records.len() as u64);
            }
            for found in scan.records {
                if found.index >= expected {
                    recovered.records.push(Record {
                        index: found.index,
                        payload: body.slice(found.payload),
                    });
                    expected = found.index + 1;
                }
            }
            kept.push(SegmentFile { first_index, path });
        }

        let next_index = expected;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(JournalStats::default());
        let writer = Writer::start(
            &dir,
            options.clone(),
            kept,
            last_end,
            next_index,
            stats.clone(),
            lock,
        )?;
        let thread = std::thread::Builder::new()
            .name("keel-journal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::io(&dir, e))?;
        let journal = Journal {
            dir,
            options,
            submit: Mutex::new(Submit {
                tx: Some(tx),
                next_index,
            }),
            stats,
            thread: Mutex::new(Some(thread)),
            snapshot_lock: tokio::sync::Mutex::new(()),
        };
        Ok((journal, recovered))
    }

    /// Appends a record. The index is assigned now, in submission order; await the result for
    /// the acknowledgement.
    pub fn append(&self, payload: impl Into<Bytes>) -> Result<Appended, StoreError> {
        let payload = payload.into();
        if payload.len() > self.options.max_record_bytes {
            return Err(StoreError::TooLarge {
                len: payload.len(),
                max: self.options.max_record_bytes,
            });
        }
        let (done, rx) = oneshot::channel();
        let mut submit = self.submit.lock();
        let index = submit.next_index;
        let tx = submit.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Op::Append {
            index,
            payload,
            done,
        })
        .map_err(|_| StoreError::Closed)?;
        submit.next_index += 1;
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        Ok(Appended { index, rx })
    }

    /// The index the next append will get.
    pub fn next_index(&self) -> u64 {
        self.submit.lock().next_index
    }

    /// Waits until everything appended so far is on stable storage, whatever the policy.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let rx = self.send(|done| Op::Sync { done })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes a snapshot of the state at `index` (every record up to and including `index`
    /// applied), then drops what recovery no longer needs: snapshots older than the previous
    /// one, and segments wholly covered by the previous snapshot. The previous snapshot and
    /// the records after it stay, so a damaged newest snapshot still leaves a way back.
    pub async fn snapshot(&self, index: u64, data: Bytes) -> Result<(), StoreError> {
        let _one_at_a_time = self.snapshot_lock.lock().await;
        if index >= self.next_index() {
            return Err(StoreError::InvalidSnapshot {
                index,
                next: self.next_index(),
            });
        }
        // The records the snapshot covers reach the disk first, so the journal never has a
        // hole under a snapshot that a later recovery would trip on.
        self.sync().await?;
        let dir = self.dir.clone();
        let previous = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            snapshot::write(&dir, index, &data)?;
            let (_, snapshots) = list_dir(&dir)?;
            let mut older: Vec<(u64, PathBuf)> =
                snapshots.into_iter().filter(|(i, _)| *i < index).collect();
            let previous = older.pop().map_or(0, |(i, _)| i);
            for (_, path) in older {
                fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            }
            Ok(previous)
        })
        .await
        .map_err(|e| StoreError::io(&self.dir, std::io::Error::other(e)))??;
        self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        let rx = self.send(|done| Op::Compact {
            upto: previous,
            done,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Counters.
    pub fn stats(&self) -> &JournalStats {
        &self.stats
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops accepting appends, writes and syncs what was submitted, and stops the writer.
    pub async fn close(&self) -> Result<(), StoreError> {
        let result = self.sync().await;
        self.submit.lock().tx = None;
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        match result {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        }
    }

    fn send(
        &self,
        op: impl FnOnce(Done) -> Op,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (done, rx) = oneshot::channel();
        let submit = self.submit.lock();
        let tx = submit.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(op(done)).map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what was submitted, sync, and exit; it
        // is waited for, so the directory's lock is free once the journal is gone.
        self.submit.lock().tx = None;
        if let Some(thread) = self.thread.get_mut().take() {
            let _ = thread.join();
        }
    }
}

/// Segment and snapshot files in `dir`, each sorted by index; stray temp files are removed.
#[allow(clippy::type_complexity)]
fn list_dir(dir: &Path) -> Result<(Vec<(u64, PathBuf)>, Vec<(u64, PathBuf)>), StoreError> {
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(i) = parse_segment_name(name) {
            segments.push((i, entry.path()));
        } else if let Some(i) = snapshot::parse_name(name) {
            snapshots.push((i, entry.path()));
        } else if name.ends_with(".snap.tmp") {
            // A snapshot whose writing a crash interrupted; the previous one still stands.
            let _ = fs::remove_file(entry.path());
        }
    }
    segments.sort();
    snapshots.sort();
    Ok((segments, snapshots))
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    options: JournalOptions,
    segments: VecDeque<SegmentFile>,
    file: File,
    file_len: u64,
    /// Index of the next record, to check submission order and to name new segments.
    next_index: u64,
    dirty: bool,
    last_sync: Instant,
    failed: Option<StoreError>,
    stats: Arc<JournalStats>,
    buf: Vec<u8>,
    /// Held for as long as this writer may write.
    _lock: DirLock,
}

impl Writer {
    fn start(
        dir: &Path,
        options: JournalOptions,
        kept: Vec<SegmentFile>,
        last_end: Option<u64>,
        next_index: u64,
        stats: Arc<JournalStats>,
        lock: DirLock,
    ) -> Result<Writer, StoreError> {
        let mut segments: VecDeque<SegmentFile> = kept.into();
        // Append to the last segment if it ends right before `next_index`; otherwise (no
        // segment yet, or a snapshot reaches past the journal's end) start a new one.
        let reuse = match segments.back() {
            Some(seg) if last_end == Some(next_index) => Some(
                fs::metadata(&seg.path)
                    .map_err(|e| StoreError::io(&seg.path, e))?
                    .len(),
            ),
            _ => None,
        };
        let (file, file_len) = match reuse {
            Some(len) => {
                let seg = segments.back().expect("checked above");
                let file = OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(|e| StoreError::io(&seg.path, e))?;
                (file, len)
            }
            None => {
                let (file, seg) = create_segment(dir, next_index)?;
                segments.push_back(seg);
                (file, record::SEGMENT_HEADER_LEN as u64)
            }
        };
        Ok(Writer {
            dir: dir.to_owned(),
            options,
            segments,
            file,
            file_len,
            next_index,
            dirty: false,
            last_sync: Instant::now(),
            failed: None,
            stats,
            buf: Vec::with_capacity(64 * 1024),
            _lock: lock,
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Op>) {
        loop {
            let first = match (self.options.sync, self.dirty) {
                (SyncPolicy::Interval(every), true) => {
                    let wait = every.saturating_sub(self.last_sync.elapsed());
                    match rx.recv_timeout(wait) {
                        Ok(op) => op,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = self.sync_now();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(op) => op,
                    Err(_) => break,
                },
            };
            let mut batch = vec![first];
            let mut bytes = 0usize;
            while bytes < self.options.max_batch_bytes {
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Append { payload, .. } = &op {
                            bytes += record::record_len(payload.len());
                        }
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
        if self.dirty && self.failed.is_none() {
            let _ = self.sync_now();
        }
    }

    fn process(&mut self, batch: Vec<Op>) {
        let mut waiters: Vec<Done> = Vec::with_capacity(batch.len());
        let mut compacts: Vec<(u64, Done)> = Vec::new();
        let mut force_sync = false;
        self.buf.clear();
        let mut result = self.failed.clone().map_or(Ok(()), Err);
        for op in batch {
            match op {
                Op::Append {
                    index,
                    payload,
                    done,
                } => {
                    waiters.push(done);
                    if result.is_err() {
                        continue;
                    }
                    debug_assert_eq!(index, self.next_index, "appends arrive in index order");
                    let len = record::record_len(payload.len()) as u64;
                    if self.file_len + self.buf.len() as u64 + len > self.options.segment_bytes
                        && self.file_len + self.buf.len() as u64 > record::SEGMENT_HEADER_LEN as u64
                    {
                        result = self.roll(index);
                        if result.is_err() {
                            continue;
                        }
                    }
                    record::encode_record(index, &payload, &mut self.buf);
                    self.next_index = index + 1;
                }
                Op::Sync { done } => {
                    force_sync = true;
                    waiters.push(done);
                }
                Op::Compact { upto, done } => compacts.push((upto, done)),
            }
        }
        if result.is_ok() {
            result = self.write_buf();
        }
        if result.is_ok() && (force_sync || self.options.sync == SyncPolicy::Always) && self.dirty {
            result = self.sync_now();
        }
        if let Err(e) = &result {
            // A journal that failed a write or an fsync cannot know what reached the disk:
            // refuse everything from now on rather than acknowledge on top of a hole.
            tracing::error!(error = %e, "journal write failed; refusing further appends");
            self.failed.get_or_insert_with(|| e.clone());
        }
        for done in waiters {
            let _ = done.send(result.clone());
        }
        for (upto, done) in compacts {
            let _ = done.send(self.compact(upto));
        }
    }

    fn write_buf(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = &self.segments.back().expect("a current segment").path;
        self.file
            .write_all(&self.buf)
            .map_err(|e| StoreError::io(path, e))?;
        self.file_len += self.buf.len() as u64;
        self.stats
            .bytes
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.buf.clear();
        self.dirty = true;
        Ok(())
    }

    fn sync_now(&mut self) -> Result<(), StoreError> {
        let path = &self.segments.back().expect("a current segment").path;
        self.file.sync_data().map_err(|e| StoreError::io(path, e))?;
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Finishes the current segment (written and synced) and starts one at `first_index`.
    fn roll(&mut self, first_index: u64) -> Result<(), StoreError> {
        self.write_buf()?;
        if self.dirty && self.options.sync != SyncPolicy::Never {
            self.sync_now()?;
        }
        let (file, seg) = create_segment(&self.dir, first_index)?;
        self.file = file;
        self.file_len = record::SEGMENT_HEADER_LEN as u64;
        self.segments.push_back(seg);
        Ok(())
    }

    fn compact(&mut self, upto: u64) -> Result<(), StoreError> {
        // A segment can go when the next one starts at or below `upto + 1`: all its records
        // are then at or below `upto`. The current segment always stays.
        while self.segments.len() > 1 && self.segments[1].first_index <= upto + 1 {
            let seg = self.segments.pop_front().expect("len > 1");
            fs::remove_file(&seg.path).map_err(|e| StoreError::io(&seg.path, e))?;
            self.stats.segments_removed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn create_segment(dir: &Path, first_index: u64) -> Result<(File, SegmentFile), StoreError> {
    let path = dir.join(segment_name(first_index));
    let io = |e| StoreError::io(&path, e);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let mut header = Vec::with_capacity(record::SEGMENT_HEADER_LEN);
    record::encode_segment_header(first_index, &mut header);
    file.write_all(&header).map_err(io)?;
    file.sync_all().map_err(io)?;
    snapshot::sync_dir(dir)?;
    Ok((file, SegmentFile { first_index, path }))
}
