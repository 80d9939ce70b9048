//! A chat instance's settings: `[chat]` in a TOML file, every field with a default.

use std::time::Duration;

use serde::Deserialize;

/// Settings of one chat instance. Durations are whole milliseconds (`*_ms`) in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Address to listen on.
    pub listen: String,
    /// Directory of the rooms' journal.
    pub data_dir: String,
    /// The rooms' journal in a NATS JetStream stream instead of `data_dir`:
    /// `nats://HOST:PORT[,HOST:PORT…][?replicas=N]`, in stream `keel-chat-<instance>`.
    /// Empty: in `data_dir`.
    pub journal: String,
    /// This instance's name, told to clients in `joined`.
    pub instance: String,
    /// Key that signs and checks login tokens (HS256). Instances behind one gateway share it.
    /// Empty: a random key for this process (tokens then die with it).
    pub secret: String,
    /// How long a login token holds.
    #[serde(with = "keel_net::duration::ms", rename = "token_ttl_ms")]
    pub token_ttl: Duration,
    /// Origins allowed to open a WebSocket (the `Origin` header, e.g. `https://chat.example`);
    /// empty allows any. Clients that send no `Origin` (not browsers) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Messages kept per room.
    pub history: usize,
    /// Messages journaled between two snapshots of the rooms (after one, the journal drops
    /// the records it covers).
    pub snapshot_every: u64,
    /// Largest WebSocket message accepted, in bytes (larger: close 1009).
    pub max_message_bytes: usize,
    /// Longest text of a message, in characters (longer: error `too_long`).
    pub max_text_chars: usize,
    /// Frames queued for one connection before it is cut with 4009.
    pub send_queue: usize,
    /// Bytes of frames queued for one connection before it is cut with 4009.
    pub send_queue_bytes: usize,
    /// Messages a connection may send per second, on average.
    pub sends_per_second: f64,
    /// Messages a connection may send at once.
    pub send_burst: f64,
    /// Sends refused by the rate limit in a row before the connection is closed with 4008.
    pub abuse_after: u32,
    /// Rooms one connection may be in.
    pub max_rooms_per_connection: usize,
    /// Users one room may hold.
    pub max_members_per_room: usize,
    /// A connection is pinged this often.
    #[serde(with = "keel_net::duration::ms", rename = "ping_interval_ms")]
    pub ping_interval: Duration,
    /// A connection from which nothing (not even a pong) arrives for this long is dropped.
    #[serde(with = "keel_net::duration::ms", rename = "pong_timeout_ms")]
    pub pong_timeout: Duration,
    /// A write that makes no progress for this long drops the connection.
    #[serde(with = "keel_net::duration::ms", rename = "write_timeout_ms")]
    pub write_timeout: Duration,
    /// Logins per second from one address, on average.
    pub logins_per_second: f64,
    /// Logins from one address at once.
    pub login_burst: f64,
    /// Connections open at once (beyond it new ones are closed at once).
    pub max_connections: usize,
    /// Every instance of this chat, this one included, each `NAME` or `NAME=HOST:PORT`:
    /// rooms are spread over them, and members on any of them see every message. Empty:
    /// this instance alone.
    pub peers: Vec<String>,
    /// The naming service where instances register (service `chat`) and find each other:
    /// Keel's registry (`HOST:PORT`) or etcd (`etcd://HOST:PORT,…`). Empty: none.
    pub registry: String,
    /// A NATS server (`nats://HOST:PORT`): instances reach each other over NATS subjects
    /// instead of direct WebSockets. Empty: direct.
    pub nats: String,
    /// Another instance unheard this long counts as down: its members leave its rooms.
    #[serde(with = "keel_net::duration::ms", rename = "peer_timeout_ms")]
    pub peer_timeout: Duration,
    /// A request forwarded to the instance holding a room and unanswered this long is
    /// answered with `unavailable`.
    #[serde(with = "keel_net::duration::ms", rename = "request_timeout_ms")]
    pub request_timeout: Duration,
}

impl Default for ChatConfig {
    fn default() -> ChatConfig {
        ChatConfig {
            listen: "127.0.0.1:7600".into(),
            data_dir: "keel-data/chat-0".into(),
            journal: String::new(),
            instance: "chat-0".into(),
            secret: String::new(),
            token_ttl: Duration::from_secs(24 * 3600),
            allowed_origins: Vec::new(),
            history: 1000,
            snapshot_every: 100_000,
            max_message_bytes: 16 * 1024,
            max_text_chars: 4000,
            send_queue: 1024,
            send_queue_bytes: 8 << 20,
            sends_per_second: 20.0,
            send_burst: 40.0,
            abuse_after: 100,
            max_rooms_per_connection: 100,
            max_members_per_room: 100_000,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            logins_per_second: 20.0,
            login_burst: 200.0,
            max_connections: 200_000,
            peers: Vec::new(),
            registry: String::new(),
            nats: String::new(),
            peer_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A setting the instance cannot run with, and why (naming the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl From<String> for ConfigError {
    fn from(problem: String) -> ConfigError {
        ConfigError(problem)
    }
}

impl From<&str> for ConfigError {
    fn from(problem: &str) -> ConfigError {
        ConfigError(problem.to_owned())
    }
}

impl ChatConfig {
    /// The peers' names and fixed addresses.
    pub fn peer_list(&self) -> Result<Vec<(String, Option<String>)>, ConfigError> {
        let mut list = Vec::new();
        for peer in &self.peers {
            let (name, address) = match peer.split_once('=') {
                Some((name, address)) if !address.is_empty() => (name, Some(address.to_owned())),
                Some(_) => {
                    return Err(format!("peer {peer:?}: the address after '=' is empty").into());
                }
                None => (peer.as_str(), None),
            };
            crate::cluster::check_instance_name(name)
                .map_err(|e| ConfigError(format!("peers: {e}")))?;
            list.push((name.to_owned(), address));
        }
        Ok(list)
    }

    /// Checks what serde cannot: a clear error instead of a server that misbehaves.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.history == 0
            || self.send_queue == 0
            || self.send_queue_bytes < (2 << 20)
            || self.snapshot_every == 0
            || self.max_message_bytes < 128
        {
            return Err(
                "history, send_queue and snapshot_every must be positive, send_queue_bytes at least 2097152 (two whole history frames), max_message_bytes at least 128"
                    .into(),
            );
        }
        if !(self.sends_per_second > 0.0 && self.send_burst >= 1.0) {
            return Err("sends_per_second must be positive and send_burst at least 1".into());
        }
        if !(self.logins_per_second > 0.0 && self.login_burst >= 1.0) {
            return Err("logins_per_second must be positive and login_burst at least 1".into());
        }
        if self.ping_interval.is_zero() || self.pong_timeout <= self.ping_interval {
            return Err(
                "pong_timeout_ms must be longer than ping_interval_ms (both positive)".into(),
            );
        }
        if self.write_timeout.is_zero() || self.token_ttl.is_zero() {
            return Err("write_timeout_ms and token_ttl_ms must be positive".into());
        }
        if !self.peers.is_empty() {
            if self.secret.is_empty() {
                return Err("instances with peers must share a secret (the links between them are signed with it)".into());
            }
            if self.peer_timeout < 2 * crate::transport::HEARTBEAT || self.request_timeout.is_zero()
            {
                return Err("peer_timeout_ms must be at least 2000 (two greetings) and request_timeout_ms positive".into());
            }
            let peers = self.peer_list()?;
            for (name, address) in &peers {
                if address.is_none()
                    && self.registry.is_empty()
                    && self.nats.is_empty()
                    && *name != self.instance
                {
                    return Err(format!(
                        "peer {name} has no address (NAME=HOST:PORT) and there is neither a registry nor NATS to find it"
                    )
                    .into());
                }
            }
        }
        Ok(())
    }
}
