//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not a stable API): the
//! registry's recovery, on bytes. `Registry::open` restores the state machine from the
//! snapshot's bytes (a protobuf `StateSnapshot`) and applies each journal record's payload (a
//! protobuf `Command`); [`Replay`] does the same through the same calls. See
//! `docs/fuzzing.md`.

use keel_rpc::__private::prost::Message;

use crate::proto::{Command, StateSnapshot};
use crate::state::State;

/// What applying one journal record came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The payload does not decode as a `Command`.
    NotACommand,
    /// The command does not fit the state (recovery logs it and skips it).
    Rejected(String),
    /// Applied: the new revision.
    Revision(u64),
}

/// The registry's state machine, as recovery rebuilds it.
#[derive(Debug)]
pub struct Replay {
    state: State,
}

impl Replay {
    /// An empty state keeping `history_limit` changes, as recovery starts without a snapshot.
    pub fn new(history_limit: usize) -> Replay {
        Replay {
            state: State::new(history_limit),
        }
    }

    /// The state restored from the bytes of a snapshot, as recovery decodes and restores it;
    /// `None` if they do not decode (recovery then refuses to start).
    pub fn restore(snapshot: &[u8], history_limit: usize) -> Option<Replay> {
        let snapshot = StateSnapshot::decode(snapshot).ok()?;
        Some(Replay {
            state: State::restore(snapshot, history_limit),
        })
    }

    /// Decodes the payload of one journal record and applies it, as recovery does.
    pub fn apply(&mut self, record: &[u8]) -> Applied {
        let Ok(command) = Command::decode(record) else {
            return Applied::NotACommand;
        };
        match self.state.apply(&command) {
            Ok(revision) => Applied::Revision(revision),
            Err(rejected) => Applied::Rejected(rejected.0),
        }
    }

    /// The revision of the last applied command.
    pub fn revision(&self) -> u64 {
        self.state.revision()
    }

    /// The whole state, as a snapshot holds it.
    pub fn snapshot(&self) -> StateSnapshot {
        self.state.snapshot()
    }

    /// The bytes of a snapshot of the state, as the registry writes them.
    pub fn snapshot_bytes(&self) -> Vec<u8> {
        self.state.snapshot().encode_to_vec()
    }
}
