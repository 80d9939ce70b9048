//! Rooms: their members, their order of messages, and their durable history.
//!
//! Each room numbers its messages 1, 2, 3… A send takes the next number under the room's
//! lock and appends the message to the journal in that same step, so numbers and journal
//! order agree. The message is delivered — to every member, the sender included, and as an
//! `ack` to the sender — only once the journal has it on disk, and strictly in number order:
//! a message whose append finished early waits for the ones before it. Members therefore
//! see every message of a room in one order, without gaps, and an acknowledged message
//! survives a crash.
//!
//! On start the journal (after its newest snapshot) is replayed into each room's history;
//! every `snapshot_every` appends a snapshot of all rooms' histories lets the journal drop
//! what it no longer needs.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::cluster::{Frame, Links, Relay};
use crate::protocol::{self, Message, code, frame_list, to_frame};

/// Settings of the rooms.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This instance's name, given to clients in `joined`.
    pub instance: String,
    /// Messages kept per room (for `history` and `join` with `since`).
    pub history: usize,
    /// Users per room.
    pub max_members: usize,
    /// Most messages one `history` request returns.
    pub max_page: usize,
    /// Appends between two snapshots of the rooms.
    pub snapshot_every: u64,
}

impl Default for HubConfig {
    fn default() -> HubConfig {
        HubConfig {
            instance: "chat-0".into(),
            history: 1000,
            max_members: 100_000,
            max_page: 200,
            snapshot_every: 100_000,
        }
    }
}

/// What went wrong opening the rooms' journal.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The journal could not be opened or read.
    #[error(transparent)]
    Store(#[from] keel_store::StoreError),
    /// A record or snapshot is not one this server wrote.
    #[error("journal record {index} is not a chat message: {error}")]
    Record {
        /// The record's index (0 for the snapshot).
        index: u64,
        /// Why it could not be read.
        error: serde_json::Error,
    },
}

/// One connection, as the rooms see it: who it is and its bounded queue of frames to send.
///
/// The queue is a plain deque under a lock, empty (and unallocated) while the connection is
/// idle, which matters when most of 100,000 connections are.
#[derive(Debug)]
pub struct Peer {
    /// Unique per connection within the process.
    pub id: u64,
    /// The signed-in user.
    pub user: Arc<str>,
    capacity: usize,
    max_bytes: usize,
    queue: Mutex<Queue>,
    /// Wakes the connection's task; a wake-up sent while it is busy is kept for its next wait.
    ready: tokio::sync::Notify,
    /// Set when a frame found the queue full: the connection is cut with 4009.
    behind: AtomicBool,
    /// A close code the server decided on (0: none).
    cut: std::sync::atomic::AtomicU16,
}

/// A connection's frames waiting to be written, and their size.
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Arc<str>>,
    bytes: usize,
}

impl Peer {
    /// A peer whose queue holds at most `capacity` frames and `max_bytes` bytes of them.
    pub fn new(id: u64, user: Arc<str>, capacity: usize, max_bytes: usize) -> Arc<Peer> {
        Arc::new(Peer {
            id,
            user,
            capacity: capacity.max(1),
            max_bytes,
            queue: Mutex::new(Queue::default()),
            ready: tokio::sync::Notify::new(),
            behind: AtomicBool::new(false),
            cut: std::sync::atomic::AtomicU16::new(0),
        })
    }

    /// Queues a frame. A full queue marks the connection as fallen behind (it will be closed
    /// with 4009); nothing waits and nothing grows.
    pub fn send(&self, frame: Arc<str>) {
        let mut queue = self.queue.lock();
        if queue.frames.len() >= self.capacity || queue.bytes + frame.len() > self.max_bytes {
            drop(queue);
            self.behind.store(true, Ordering::Release);
            self.ready.notify_one();
            return;
        }
        queue.bytes += frame.len();
        queue.frames.push_back(frame);
        let first = queue.frames.len() == 1;
        drop(queue);
        if first {
            self.ready.notify_one();
        }
    }

    /// Moves queued frames to `out` through `encode` until `out` holds `max_bytes`; whether
    /// any were moved. Frames left over wake the next [`wait`](Peer::wait) at once.
    pub fn take(
        &self,
        out: &mut bytes::BytesMut,
        max_bytes: usize,
        mut encode: impl FnMut(&str, &mut bytes::BytesMut),
    ) -> bool {
        let mut queue = self.queue.lock();
        let any = !queue.frames.is_empty();
        while out.len() < max_bytes {
            match queue.frames.pop_front() {
                Some(frame) => {
                    queue.bytes -= frame.len();
                    encode(&frame, out);
                }
                None => break,
            }
        }
        if !queue.frames.is_empty() {
            // More than one batch: the next wait returns at once for the rest.
            self.ready.notify_one();
        } else if queue.frames.capacity() > 16 {
            // A burst is over: give its memory back.
            queue.frames = VecDeque::new();
        }
        any
    }

    /// Waits until a frame may have been queued (or the queue overflowed).
    pub async fn wait(&self) {
        self.ready.notified().await;
    }

    /// Whether a frame for this connection was dropped because its queue was full.
    pub fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// Asks the connection to close with `code` (the first such request wins).
    pub fn cut(&self, code: u16) {
        let _ = self
            .cut
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.ready.notify_one();
    }

    /// The close code the server asked for with [`cut`](Peer::cut), if any.
    pub fn cut_requested(&self) -> Option<u16> {
        match self.cut.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    /// Empties the queue and forgets that it overflowed; whether it had.
    pub(crate) fn reset(&self) -> bool {
        let mut queue = self.queue.lock();
        *queue = Queue::default();
        self.behind.swap(false, Ordering::AcqRel)
    }
}

/// A delivered message with its frame, serialised once.
#[derive(Debug, Clone)]
struct Stored {
    msg: Message,
    frame: Arc<str>,
}

/// Where the answer to a request goes: a connection of this instance, or a connection of
/// another instance (through the link to it, naming the request it answers).
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A connection here.
    Local(Arc<Peer>),
    /// Connection `conn` of `instance`, which asked with request `req`.
    Remote {
        instance: Arc<str>,
        conn: u64,
        req: u64,
    },
}

/// Who joins an owned room: a connection here, or a user of another instance (`again` when
/// that connection is in the room already, so it only gets its answer again).
pub(crate) enum Who<'a> {
    Local(&'a Arc<Peer>),
    Remote {
        instance: &'a Arc<str>,
        user: &'a Arc<str>,
        again: bool,
    },
}

/// Where a connection that leaves an owned room is: here (its id) or on another instance.
pub(crate) enum Place<'a> {
    Here(u64),
    There(&'a Arc<str>),
}

/// A message numbered and handed to the journal, not yet delivered.
#[derive(Debug)]
struct Pending {
    msg: Message,
    durable: bool,
    /// Who gets an `ack` when it is delivered: the sender, and anyone who resent it meanwhile.
    ackers: Vec<(Target, String)>,
}

#[derive(Debug, Default)]
struct Room {
    /// Users in the room, with their number of connections in it (here and elsewhere).
    members: FxHashMap<Arc<str>, u32>,
    subscribers: FxHashMap<u64, Arc<Peer>>,
    /// The other instances with connections in the room: their users and connections each.
    remote: FxHashMap<Arc<str>, FxHashMap<Arc<str>, u32>>,
    /// The newest delivered messages, oldest first.
    history: VecDeque<Stored>,
    /// The number the next message gets.
    next_id: u64,
    /// The last delivered message's number.
    delivered: u64,
    pending: BTreeMap<u64, Pending>,
    /// `(user, client_msg_id)` of the messages kept, to answer a resend with the first number.
    sent: FxHashMap<(Arc<str>, String), u64>,
}

impl Room {
    fn new() -> Room {
        Room {
            next_id: 1,
            ..Room::default()
        }
    }

    fn keep(&mut self, stored: Stored, limit: usize) {
        self.history.push_back(stored);
        while self.history.len() > limit {
            if let Some(old) = self.history.pop_front() {
                self.sent
                    .remove(&(Arc::from(old.msg.user.as_str()), old.msg.client_msg_id));
            }
        }
    }

    fn member_list(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.members.keys().map(|u| &**u).collect();
        names.sort_unstable();
        names
    }

    /// Nothing to keep: no message, no one in it here or elsewhere.
    fn forgettable(&self) -> bool {
        self.subscribers.is_empty()
            && self.remote.is_empty()
            && self.history.is_empty()
            && self.pending.is_empty()
    }

    /// The messages after `since` that fit in `budget` bytes, and whether they are all of
    /// them; when history no longer reaches back to `since`, the newest that fit instead.
    fn after(&self, since: u64, budget: usize) -> (Vec<&Stored>, bool) {
        let first_kept = self
            .history
            .front()
            .map_or(self.delivered + 1, |s| s.msg.msg_id);
        // Whole when nothing after `since` has left the history. A `since` past the room's
        // last message is not: the client saw numbers this room does not have.
        let reaches =
            since == self.delivered || (since < self.delivered && since + 1 >= first_kept);
        let (kept, fits) = if reaches {
            newest_within_budget(self.history.iter().filter(|s| s.msg.msg_id > since), budget)
        } else {
            newest_within_budget(self.history.iter(), budget)
        };
        (kept, reaches && fits)
    }

    /// Adds `delta` connections of `user`; a user who arrives or goes is announced.
    fn count(&mut self, user: &Arc<str>, delta: i64) -> Option<&'static str> {
        let before = self.members.get(user).copied().unwrap_or(0);
        let after = (i64::from(before) + delta).clamp(0, i64::from(u32::MAX)) as u32;
        if after == 0 {
            self.members.remove(user);
        } else {
            self.members.insert(user.clone(), after);
        }
        match (before, after) {
            (0, 1..) => Some("member_joined"),
            (1.., 0) => Some("member_left"),
            _ => None,
        }
    }
}

/// Most bytes of messages one `joined` (its `missed`) or `history` frame carries.
pub const MAX_LIST_BYTES: usize = 1 << 20;

/// Most bytes of messages one answer between instances carries over NATS (a NATS message
/// holds 1 MiB, and a batch of lines may add 256 KiB of others to it).
pub const NATS_LIST_BYTES: usize = 384 << 10;

/// The newest of `stored` (oldest first) whose frames fit in `budget` bytes, oldest first,
/// and whether all of them did.
fn newest_within_budget<'a>(
    stored: impl DoubleEndedIterator<Item = &'a Stored>,
    budget: usize,
) -> (Vec<&'a Stored>, bool) {
    let mut kept = Vec::new();
    let mut bytes = 0;
    let mut all = true;
    for s in stored.rev() {
        bytes += s.frame.len() + 1;
        if bytes > budget {
            all = false;
            break;
        }
        kept.push(s);
    }
    kept.reverse();
    (kept, all)
}

fn frames_of(stored: &[&Stored]) -> Vec<Arc<str>> {
    stored.iter().map(|s| s.frame.clone()).collect()
}

/// The journal's records.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotData {
    rooms: Vec<RoomSnapshot>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RoomSnapshot {
    room: String,
    messages: Vec<Message>,
}

/// All rooms of one chat instance: those it owns (all of them when it runs alone), and,
/// through [`Links`], the connections it serves in rooms other instances own.
#[derive(Debug)]
pub struct Hub {
    config: HubConfig,
    journal: keel_store::Log,
    rooms: Mutex<FxHashMap<String, Arc<Mutex<Room>>>>,
    /// Each user's connections, for direct messages.
    users: Mutex<FxHashMap<Arc<str>, Vec<Arc<Peer>>>>,
    appends: AtomicU64,
    snapshotting: AtomicBool,
    /// Set when an append failed: the journal is unusable and sends are refused.
    failed: AtomicBool,
    /// The other instances, when there are any.
    links: Option<Links>,
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefused {
    /// The room has `max_members` users.
    Full,
}

impl Hub {
    /// Opens (or creates) the rooms' journal in `dir` and replays it; `links` to the other
    /// instances when it is one of several.
    pub async fn open(
        dir: impl Into<PathBuf>,
        config: HubConfig,
        links: Option<Links>,
    ) -> Result<Arc<Hub>, HubError> {
        let target = keel_store::LogTarget::Dir {
            dir: dir.into(),
            options: keel_store::JournalOptions::default(),
        };
        Hub::open_log(target, config, links).await
    }

    /// Opens the rooms' journal at `target` — a local directory, or a JetStream stream whose
    /// replicas keep the history beyond this machine's disk — and replays it.
    pub async fn open_log(
        target: keel_store::LogTarget,
        config: HubConfig,
        links: Option<Links>,
    ) -> Result<Arc<Hub>, HubError> {
        let (journal, recovered) = keel_store::Log::open(target).await?;
        let hub = Hub {
            config,
            journal,
            rooms: Mutex::default(),
            users: Mutex::default(),
            appends: AtomicU64::new(0),
            snapshotting: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            links,
        };
        if let Some(snapshot) = recovered.snapshot {
            let data: SnapshotData = serde_json::from_slice(&snapshot.data)
                .map_err(|error| HubError::Record { index: 0, error })?;
            for room in data.rooms {
                for msg in room.messages {
                    hub.restore(msg);
                }
            }
        }
        for record in recovered.records {
            let msg: Message =
                serde_json::from_slice(&record.payload).map_err(|error| HubError::Record {
                    index: record.index,
                    error,
                })?;
            hub.restore(msg);
        }
        Ok(Arc::new(hub))
    }

    /// Applies a recovered message (a snapshot and the records after it may both hold it).
    fn restore(&self, msg: Message) {
        let room = self.room(&msg.room);
        let mut room = room.lock();
        if msg.msg_id < room.next_id {
            return;
        }
        room.next_id = msg.msg_id + 1;
        room.delivered = msg.msg_id;
        room.sent.insert(
            (Arc::from(msg.user.as_str()), msg.client_msg_id.clone()),
            msg.msg_id,
        );
        let frame = msg.frame();
        room.keep(Stored { msg, frame }, self.config.history);
    }

    fn room(&self, name: &str) -> Arc<Mutex<Room>> {
        let mut rooms = self.rooms.lock();
        match rooms.get(name) {
            Some(room) => room.clone(),
            None => {
                let room = Arc::new(Mutex::new(Room::new()));
                rooms.insert(name.to_owned(), room.clone());
                room
            }
        }
    }

    /// Messages journaled since the start.
    pub fn messages_stored(&self) -> u64 {
        self.appends.load(Ordering::Relaxed)
    }

    /// Every room in memory, taken out of the map's lock.
    fn all_rooms(&self) -> Vec<(String, Arc<Mutex<Room>>)> {
        self.rooms
            .lock()
            .iter()
            .map(|(name, room)| (name.clone(), room.clone()))
            .collect()
    }

    /// Rooms held in memory (those with messages, members or messages on their way).
    pub fn room_count(&self) -> usize {
        self.rooms.lock().len()
    }

    /// The instance's name.
    pub fn instance(&self) -> &str {
        &self.config.instance
    }

    /// Registers a connection for direct messages to its user.
    pub fn connect(&self, peer: &Arc<Peer>) {
        self.users
            .lock()
            .entry(peer.user.clone())
            .or_default()
            .push(peer.clone());
    }

    /// Removes a connection from every room in `rooms` and from its user's connections.
    pub fn disconnect(&self, peer: &Peer, rooms: &[String]) {
        for room in rooms {
            self.leave(peer, room);
        }
        let mut users = self.users.lock();
        if let Some(peers) = users.get_mut(&peer.user) {
            peers.retain(|p| p.id != peer.id);
            if peers.is_empty() {
                users.remove(&peer.user);
            }
        }
    }

    /// The other instances, when this one has any.
    pub(crate) fn links(&self) -> Option<&Links> {
        self.links.as_ref()
    }

    /// The links, when another instance owns room `name`.
    fn elsewhere(&self, name: &str) -> Option<(&Links, Arc<str>)> {
        let links = self.links.as_ref()?;
        let owner = links.owner(name);
        (*owner != *links.me()).then(|| (links, owner.clone()))
    }

    /// Queues `frame` for the room's connections here (but `except`) and sends it to the
    /// instances with connections in it; `msg_id` for a message, which they check for gaps.
    fn fan_out(
        &self,
        name: &str,
        room: &Room,
        frame: &Arc<str>,
        except: Option<u64>,
        msg_id: Option<u64>,
    ) {
        for (id, peer) in &room.subscribers {
            if Some(*id) != except {
                peer.send(frame.clone());
            }
        }
        if let Some(links) = &self.links
            && !room.remote.is_empty()
        {
            let relay = match msg_id {
                Some(msg_id) => Relay::Msg {
                    room: name.to_owned(),
                    msg_id,
                    frame: Frame::from(frame),
                },
                None => Relay::Member {
                    room: name.to_owned(),
                    frame: Frame::from(frame),
                },
            };
            let line = relay.line();
            for instance in room.remote.keys() {
                links.post(instance, line.clone());
            }
        }
    }

    /// Queues `frame` for the connection `target` names, here or on another instance.
    pub(crate) fn answer(&self, target: &Target, frame: Arc<str>) {
        match target {
            Target::Local(peer) => peer.send(frame),
            Target::Remote {
                instance,
                conn,
                req,
            } => {
                if let Some(links) = &self.links {
                    let relay = Relay::Conn {
                        req: *req,
                        conn: *conn,
                        frame: Frame::from(&frame),
                    };
                    links.post(instance, relay.line());
                }
            }
        }
    }

    /// Queues `frame` for every connection here of the users in `users`.
    pub(crate) fn to_users(&self, users: &[&str], frame: &Arc<str>) {
        let map = self.users.lock();
        let mut seen: Vec<&str> = Vec::with_capacity(users.len());
        for user in users {
            if seen.contains(user) {
                continue;
            }
            seen.push(user);
            for peer in map.get(*user).into_iter().flatten() {
                peer.send(frame.clone());
            }
        }
    }

    /// Adds a connection to a room and queues its `joined` frame (with what it missed after
    /// `since`), before any message of the room that follows. A room another instance owns
    /// is joined there: the answer comes through the link.
    pub fn join(
        &self,
        peer: &Arc<Peer>,
        name: &str,
        since: Option<u64>,
    ) -> Result<(), JoinRefused> {
        if let Some((links, owner)) = self.elsewhere(name) {
            links.join(peer, name, since, &owner);
            return Ok(());
        }
        self.join_owned(Who::Local(peer), name, since, |frame, _| peer.send(frame))
    }

    /// Joins a room this instance owns; `answer` gets the `joined` frame and the room's last
    /// number while the room is still locked, so the frame is on its way before any message
    /// that follows it.
    pub(crate) fn join_owned(
        &self,
        who: Who<'_>,
        name: &str,
        since: Option<u64>,
        answer: impl FnOnce(Arc<str>, u64),
    ) -> Result<(), JoinRefused> {
        // The room is locked before the map is let go, so `leave` cannot forget it between
        // the two (it checks for subscribers under the map's lock).
        let mut rooms = self.rooms.lock();
        let room = rooms
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Room::new())))
            .clone();
        let mut room = room.lock();
        drop(rooms);
        let user = match &who {
            Who::Local(peer) => peer.user.clone(),
            Who::Remote { user, .. } => (*user).clone(),
        };
        let count = room.members.get(&user).copied().unwrap_or(0);
        // A second join of the same connection only answers again (with what it missed).
        let (again, except) = match &who {
            Who::Local(peer) => (room.subscribers.contains_key(&peer.id), Some(peer.id)),
            Who::Remote { again, .. } => (*again, None),
        };
        if count == 0 && room.members.len() >= self.config.max_members {
            return Err(JoinRefused::Full);
        }
        if !again {
            match &who {
                Who::Local(peer) => {
                    room.subscribers.insert(peer.id, (*peer).clone());
                }
                Who::Remote { instance, .. } => {
                    *room
                        .remote
                        .entry((*instance).clone())
                        .or_default()
                        .entry(user.clone())
                        .or_insert(0) += 1;
                }
            }
            if let Some(kind) = room.count(&user, 1) {
                self.fan_out(name, &room, &member_change(kind, name, &user), except, None);
            }
        }
        #[derive(Serialize)]
        struct Joined<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            room: &'a str,
            members: Vec<&'a str>,
            last_msg_id: u64,
            instance: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            recovered: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            missed: Option<Box<serde_json::value::RawValue>>,
        }
        // An answer that crosses to another instance must fit in what the link carries.
        let budget = match (&who, &self.links) {
            (Who::Remote { .. }, Some(links)) => links.list_bytes(),
            _ => MAX_LIST_BYTES,
        };
        let (recovered, missed) = match since {
            None => (None, None),
            Some(since) => {
                let (kept, whole) = room.after(since, budget);
                (Some(whole), Some(frame_list(&frames_of(&kept))))
            }
        };
        // The instance serving the connection, which is not the room's when it is elsewhere.
        let serving = match &who {
            Who::Local(_) => &*self.config.instance,
            Who::Remote { instance, .. } => &***instance,
        };
        let frame = to_frame(&Joined {
            kind: "joined",
            room: name,
            members: room.member_list(),
            last_msg_id: room.delivered,
            instance: serving,
            recovered,
            missed,
        });
        answer(frame, room.delivered);
        Ok(())
    }

    /// Removes a connection from a room; its user leaves when it was their last connection
    /// there. Whether the connection was in the room (or on its way in).
    pub fn leave(&self, peer: &Peer, name: &str) -> bool {
        if let Some((links, owner)) = self.elsewhere(name) {
            return links.leave(peer, name, &owner);
        }
        self.leave_owned(name, &peer.user, Place::Here(peer.id))
    }

    /// Removes a connection of `user` from a room this instance owns.
    pub(crate) fn leave_owned(&self, name: &str, user: &Arc<str>, place: Place<'_>) -> bool {
        let Some(room) = self.rooms.lock().get(name).cloned() else {
            return false;
        };
        let mut room = room.lock();
        match place {
            Place::Here(id) => {
                if room.subscribers.remove(&id).is_none() {
                    return false;
                }
            }
            Place::There(instance) => {
                let Some(users) = room.remote.get_mut(instance) else {
                    return false;
                };
                let Some(count) = users.get_mut(user) else {
                    return false;
                };
                *count -= 1;
                if *count == 0 {
                    users.remove(user);
                }
                if users.is_empty() {
                    room.remote.remove(instance);
                }
            }
        }
        if let Some(kind) = room.count(user, -1) {
            self.fan_out(name, &room, &member_change(kind, name, user), None, None);
        }
        if room.forgettable() {
            drop(room);
            self.forget_if_empty(name);
        }
        true
    }

    /// Drops a room that holds nothing: joining and leaving made-up rooms must not grow the
    /// map. Checked again under the map's lock, taken first as everywhere.
    fn forget_if_empty(&self, name: &str) {
        let mut rooms = self.rooms.lock();
        if rooms.get(name).is_some_and(|r| r.lock().forgettable()) {
            rooms.remove(name);
        }
    }

    /// Sets the connections `instance` has in room `name` (owned here) to `users`, and
    /// answers it (while the room is locked, before any later message) with the messages
    /// after `since` (it lost some, or this instance restarted).
    pub(crate) fn sync_owned(
        &self,
        instance: &Arc<str>,
        name: &str,
        users: &[(String, u32)],
        since: u64,
    ) {
        let room = self.room(name);
        let mut room = room.lock();
        let old = room.remote.remove(instance).unwrap_or_default();
        let new: FxHashMap<Arc<str>, u32> = users
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(u, n)| (Arc::from(u.as_str()), *n))
            .collect();
        let mut changes = Vec::new();
        for user in old
            .keys()
            .chain(new.keys().filter(|u| !old.contains_key(*u)))
        {
            let delta = i64::from(new.get(user).copied().unwrap_or(0))
                - i64::from(old.get(user).copied().unwrap_or(0));
            if delta != 0
                && let Some(kind) = room.count(user, delta)
            {
                changes.push((kind, user.clone()));
            }
        }
        if !new.is_empty() {
            room.remote.insert(instance.clone(), new);
        }
        for (kind, user) in changes {
            self.fan_out(name, &room, &member_change(kind, name, &user), None, None);
        }
        let budget = self
            .links
            .as_ref()
            .map_or(MAX_LIST_BYTES, Links::list_bytes);
        let (kept, whole) = room.after(since, budget);
        let synced = Relay::Synced {
            room: name.to_owned(),
            last_msg_id: room.delivered,
            recovered: whole,
            missed: kept
                .iter()
                .map(|s| (s.msg.msg_id, Frame::from(&s.frame)))
                .collect(),
        };
        if let Some(links) = &self.links {
            links.post(instance, synced.line());
        }
        if room.forgettable() {
            drop(room);
            self.forget_if_empty(name);
        }
    }

    /// Forgets every connection `instance` had in the rooms owned here (it restarted, or
    /// has not been heard from): its users leave where it was their last connection.
    pub(crate) fn forget_instance(&self, instance: &str) {
        let rooms = self.all_rooms();
        for (name, room) in rooms {
            let mut room = room.lock();
            let Some(users) = room.remote.remove(instance) else {
                continue;
            };
            for (user, n) in users {
                if let Some(kind) = room.count(&user, -i64::from(n)) {
                    self.fan_out(&name, &room, &member_change(kind, &name, &user), None, None);
                }
            }
            if room.forgettable() {
                drop(room);
                self.forget_if_empty(&name);
            }
        }
    }

    /// Queues a `presence` frame with the room's members.
    pub fn presence(&self, peer: &Arc<Peer>, name: &str) {
        match self.elsewhere(name) {
            Some((links, owner)) => links.presence(peer, name, &owner),
            None => peer.send(self.presence_frame(name)),
        }
    }

    /// The `presence` frame of a room owned here.
    pub(crate) fn presence_frame(&self, name: &str) -> Arc<str> {
        #[derive(Serialize)]
        struct Presence<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            room: &'a str,
            members: Vec<&'a str>,
        }
        let room = self.rooms.lock().get(name).cloned();
        match room {
            Some(room) => {
                let room = room.lock();
                to_frame(&Presence {
                    kind: "presence",
                    room: name,
                    members: room.member_list(),
                })
            }
            None => to_frame(&Presence {
                kind: "presence",
                room: name,
                members: Vec::new(),
            }),
        }
    }

    /// Queues a `history` frame: the newest `limit` messages below `before`, oldest first.
    pub fn history(&self, peer: &Arc<Peer>, name: &str, before: Option<u64>, limit: Option<usize>) {
        match self.elsewhere(name) {
            Some((links, owner)) => links.history(peer, name, before, limit, &owner),
            None => peer.send(self.history_frame(name, before, limit, MAX_LIST_BYTES)),
        }
    }

    /// The `history` frame of a room owned here, its messages within `budget` bytes.
    pub(crate) fn history_frame(
        &self,
        name: &str,
        before: Option<u64>,
        limit: Option<usize>,
        budget: usize,
    ) -> Arc<str> {
        #[derive(Serialize)]
        struct History<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            room: &'a str,
            messages: Box<serde_json::value::RawValue>,
        }
        let limit = limit.unwrap_or(50).min(self.config.max_page);
        let before = before.unwrap_or(u64::MAX);
        let frames: Vec<Arc<str>> = match self.rooms.lock().get(name).cloned() {
            Some(room) => {
                let room = room.lock();
                let mut below: Vec<&Stored> = room
                    .history
                    .iter()
                    .rev()
                    .filter(|s| s.msg.msg_id < before)
                    .take(limit)
                    .collect();
                below.reverse();
                frames_of(&newest_within_budget(below.into_iter(), budget).0)
            }
            None => Vec::new(),
        };
        to_frame(&History {
            kind: "history",
            room: name,
            messages: frame_list(&frames),
        })
    }

    /// Sends a message to a room (or, with `to`, to a user): numbered, journaled, then
    /// delivered and acknowledged. A resend of a `client_msg_id` the room still holds is
    /// acknowledged with the first number and not delivered again.
    ///
    /// The message is numbered and handed to the journal now, so a connection's messages keep
    /// the order it sent them in; the returned future (`None` when nothing is left to do)
    /// waits for the journal and delivers. It can run in a task of its own. A room another
    /// instance owns is sent to there, and the answer comes through the link.
    pub fn send(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        room_name: &str,
        to: Option<&str>,
        text: String,
        client_msg_id: String,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if let Some((links, owner)) = self.elsewhere(room_name) {
            links.send(peer, room_name, to, text, client_msg_id, &owner);
            return None;
        }
        self.send_owned(
            peer.user.clone(),
            Target::Local(peer.clone()),
            room_name,
            to,
            text,
            client_msg_id,
        )
    }

    /// Sends a message of `user` to a room owned here; the answer goes to `target`.
    pub(crate) fn send_owned(
        self: &Arc<Self>,
        user: Arc<str>,
        target: Target,
        room_name: &str,
        to: Option<&str>,
        text: String,
        client_msg_id: String,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if self.failed.load(Ordering::Acquire) {
            self.answer(
                &target,
                protocol::error(
                    code::UNAVAILABLE,
                    "the message store has failed; messages cannot be accepted",
                    Some(&client_msg_id),
                ),
            );
            return None;
        }
        let room = self.room(room_name);
        let (id, appended) = {
            let mut r = room.lock();
            // A connection elsewhere may send to a room only once its join was counted here
            // (its instance lists the room before the answer comes).
            // Nothing at all from its instance: this one may have restarted and not have its
            // members back yet, so the answer is to try again.
            if let Target::Remote { instance, .. } = &target
                && to.is_none()
                && !r
                    .remote
                    .get(instance)
                    .is_some_and(|users| users.contains_key(&user))
            {
                let refusal = match r.remote.contains_key(instance) {
                    true => protocol::error(
                        code::NOT_JOINED,
                        &format!("join {room_name} before sending to it"),
                        Some(&client_msg_id),
                    ),
                    false => protocol::error(
                        code::UNAVAILABLE,
                        &format!(
                            "{room_name} does not count this connection's instance yet; send again"
                        ),
                        Some(&client_msg_id),
                    ),
                };
                drop(r);
                self.answer(&target, refusal);
                self.forget_if_empty(room_name);
                return None;
            }
            let key = (user.clone(), client_msg_id);
            if let Some(&id) = r.sent.get(&key) {
                let (_, client_msg_id) = key;
                if id <= r.delivered {
                    let ts = r
                        .history
                        .iter()
                        .find(|s| s.msg.msg_id == id)
                        .map_or(0, |s| s.msg.ts);
                    self.answer(&target, ack(&client_msg_id, id, ts));
                } else if let Some(p) = r.pending.get_mut(&id) {
                    p.ackers.push((target, client_msg_id));
                }
                return None;
            }
            let (_, client_msg_id) = key;
            let msg = Message {
                room: room_name.to_owned(),
                msg_id: r.next_id,
                user: user.to_string(),
                to: to.map(str::to_owned),
                text,
                ts: now_ms(),
                client_msg_id,
            };
            let record = Bytes::from(serde_json::to_vec(&msg).unwrap_or_default());
            let appended = match self.journal.append(record) {
                Ok(appended) => appended,
                Err(e) => {
                    self.answer(
                        &target,
                        protocol::error(
                            code::UNAVAILABLE,
                            &format!("the message was not stored: {e}"),
                            Some(&msg.client_msg_id),
                        ),
                    );
                    return None;
                }
            };
            let id = msg.msg_id;
            r.next_id += 1;
            r.sent.insert((user, msg.client_msg_id.clone()), id);
            let ackers = vec![(target, msg.client_msg_id.clone())];
            r.pending.insert(
                id,
                Pending {
                    msg,
                    durable: false,
                    ackers,
                },
            );
            (id, appended)
        };
        let hub = self.clone();
        let name = room_name.to_owned();
        Some(async move { hub.complete(name, room, id, appended).await })
    }

    /// Waits for a message's append, then delivers what is ready in the room.
    async fn complete(
        self: Arc<Self>,
        name: String,
        room: Arc<Mutex<Room>>,
        id: u64,
        appended: keel_store::Appended,
    ) {
        match appended.await {
            Ok(_) => {
                let mut r = room.lock();
                if let Some(p) = r.pending.get_mut(&id) {
                    p.durable = true;
                }
                self.deliver(&name, &mut r);
            }
            Err(e) => {
                // The journal is broken: later appends fail as well, so no later message of
                // the room can be delivered past this one's gap.
                self.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "a chat message could not be journaled; refusing sends");
                let mut r = room.lock();
                if let Some(p) = r.pending.remove(&id) {
                    for (acker, client_msg_id) in p.ackers {
                        self.answer(
                            &acker,
                            protocol::error(
                                code::UNAVAILABLE,
                                &format!("the message was not stored: {e}"),
                                Some(&client_msg_id),
                            ),
                        );
                    }
                }
            }
        }
        let appends = self.appends.fetch_add(1, Ordering::Relaxed) + 1;
        if appends.is_multiple_of(self.config.snapshot_every.max(1)) {
            self.clone().snapshot_soon();
        }
    }

    /// Delivers the room's pending messages that are durable, in number order, stopping at
    /// the first that is not.
    fn deliver(&self, name: &str, room: &mut Room) {
        while let Some(entry) = room.pending.first_entry() {
            if *entry.key() != room.delivered + 1 || !entry.get().durable {
                break;
            }
            let p = entry.remove();
            let frame = p.msg.frame();
            match &p.msg.to {
                None => self.fan_out(name, room, &frame, None, Some(p.msg.msg_id)),
                Some(to) => {
                    // A conversation's connections are wherever its two users are.
                    let users = [p.msg.user.as_str(), to.as_str()];
                    self.to_users(&users, &frame);
                    if let Some(links) = &self.links {
                        let relay = Relay::Users {
                            users: users.iter().map(|u| (*u).to_owned()).collect(),
                            frame: Frame::from(&frame),
                        };
                        links.post_all(relay.line());
                    }
                }
            }
            for (acker, client_msg_id) in &p.ackers {
                self.answer(acker, ack(client_msg_id, p.msg.msg_id, p.msg.ts));
            }
            room.delivered = p.msg.msg_id;
            room.keep(Stored { msg: p.msg, frame }, self.config.history);
        }
    }

    /// Writes a snapshot of every room in the background (one at a time), so the journal can
    /// drop the records it covers.
    fn snapshot_soon(self: Arc<Self>) {
        if self.snapshotting.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = self.snapshot().await {
                tracing::warn!(error = %e, "chat snapshot failed; the journal keeps its records");
            }
            self.snapshotting.store(false, Ordering::Release);
        });
    }

    /// Writes a snapshot now.
    pub async fn snapshot(&self) -> Result<(), keel_store::StoreError> {
        // Everything appended up to `index` is on disk once the sync returns; the rooms are
        // read after it, so the snapshot holds at least every record up to `index` (it may
        // hold later ones too, which replay skips by number).
        // A stream keeps every record (replicated, it is not this disk's to cut).
        let keel_store::Log::Local(local) = &self.journal else {
            return Ok(());
        };
        let index = self.journal.next_index() - 1;
        if index == 0 {
            return Ok(());
        }
        self.journal.sync().await?;
        let rooms = self.all_rooms();
        let mut data = SnapshotData { rooms: Vec::new() };
        for (name, room) in rooms {
            let room = room.lock();
            let messages: Vec<Message> = room
                .history
                .iter()
                .map(|s| s.msg.clone())
                .chain(room.pending.values().map(|p| p.msg.clone()))
                .collect();
            if !messages.is_empty() {
                data.rooms.push(RoomSnapshot {
                    room: name,
                    messages,
                });
            }
        }
        let bytes = Bytes::from(serde_json::to_vec(&data).unwrap_or_default());
        local.snapshot(index, bytes).await
    }

    /// Waits for every append so far, then stops the journal.
    pub async fn close(&self) -> Result<(), keel_store::StoreError> {
        self.journal.close().await
    }
}

/// The internal room of a conversation between two users.
pub fn dm_room(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    // A newline cannot be part of a user name (names are checked), so pairs cannot collide.
    format!("dm\n{x}\n{y}")
}

fn member_change(kind: &'static str, room: &str, user: &str) -> Arc<str> {
    #[derive(Serialize)]
    struct Change<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        user: &'a str,
    }
    to_frame(&Change { kind, room, user })
}

fn ack(client_msg_id: &str, msg_id: u64, ts: u64) -> Arc<str> {
    #[derive(Serialize)]
    struct Ack<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        client_msg_id: &'a str,
        msg_id: u64,
        ts: u64,
    }
    to_frame(&Ack {
        kind: "ack",
        client_msg_id,
        msg_id,
        ts,
    })
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(id: u64, text_len: usize) -> Stored {
        let msg = Message {
            room: "r".into(),
            msg_id: id,
            user: "u".into(),
            to: None,
            text: "x".repeat(text_len),
            ts: 0,
            client_msg_id: id.to_string(),
        };
        Stored {
            frame: msg.frame(),
            msg,
        }
    }

    #[test]
    fn a_list_of_messages_keeps_the_newest_that_fit_in_one_frame() {
        let history: Vec<Stored> = (1..=400).map(|id| stored(id, 4000)).collect();
        let (kept, all) = newest_within_budget(history.iter(), MAX_LIST_BYTES);
        let frames = frames_of(&kept);
        assert!(!all);
        let bytes: usize = frames.iter().map(|f| f.len() + 1).sum();
        assert!(
            bytes <= MAX_LIST_BYTES && bytes + 4100 > MAX_LIST_BYTES,
            "{bytes}"
        );
        let first: serde_json::Value = serde_json::from_str(&frames[0]).unwrap();
        let last: serde_json::Value = serde_json::from_str(frames.last().unwrap()).unwrap();
        assert_eq!(last["msg_id"], 400, "the newest are kept");
        assert_eq!(
            first["msg_id"].as_u64().unwrap() + frames.len() as u64 - 1,
            400,
            "without a hole"
        );
        let small: Vec<Stored> = (1..=10).map(|id| stored(id, 10)).collect();
        let (kept, all) = newest_within_budget(small.iter(), MAX_LIST_BYTES);
        assert!(all);
        assert_eq!(
            frames_of(&kept),
            small.iter().map(|s| s.frame.clone()).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn rooms_without_messages_or_members_are_forgotten_and_a_queue_is_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(dir.path(), HubConfig::default(), None)
            .await
            .unwrap();
        let peer = Peer::new(1, Arc::from("ann"), 10_000, 64 * 1024);
        for i in 0..100 {
            let name = format!("made-up-{i}");
            hub.join(&peer, &name, None).unwrap();
            assert!(hub.leave(&peer, &name));
        }
        assert_eq!(
            hub.room_count(),
            0,
            "joining and leaving leaves nothing behind"
        );
        hub.join(&peer, "kept", None).unwrap();
        assert_eq!(hub.room_count(), 1);
        assert!(!peer.is_behind());
        // 64 KiB of frames at most, whatever their number.
        for _ in 0..20 {
            peer.send(Arc::from("y".repeat(4096)));
        }
        assert!(peer.is_behind(), "the byte bound cut it");
        hub.close().await.unwrap();
    }
}
