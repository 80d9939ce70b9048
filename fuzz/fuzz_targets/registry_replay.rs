//! Feeds arbitrary bytes to the registry's recovery: a snapshot's bytes (a `StateSnapshot`),
//! then journal records (each a `Command`), decoded and applied as `Registry::open` does. It
//! may not panic. Every applied command advances the revision by exactly one and a refused
//! one changes nothing; the state's snapshot restores to the same state; and replaying the
//! same records on the restored snapshot comes to the same results, so recovery is
//! deterministic.
#![no_main]

use keel_registry::fuzzing::{Applied, Replay};
use libfuzzer_sys::fuzz_target;

/// Changes kept for watches, small so that compaction is reached.
const HISTORY: usize = 8;

/// The pieces of `input`: each is a little-endian `u16` length, then that many bytes.
fn pieces(mut input: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while input.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([input[0], input[1]])).min(input.len() - 2);
        out.push(&input[2..2 + len]);
        input = &input[2 + len..];
    }
    out
}

fn replay(state: &mut Replay, records: &[&[u8]]) -> Vec<Applied> {
    records
        .iter()
        .map(|record| {
            let before = state.revision();
            let snapshot = state.snapshot();
            let applied = state.apply(record);
            match &applied {
                Applied::Revision(revision) => {
                    assert_eq!(*revision, before + 1, "{applied:?}");
                    assert_eq!(state.revision(), *revision);
                }
                Applied::NotACommand | Applied::Rejected(_) => {
                    assert_eq!(
                        state.snapshot(),
                        snapshot,
                        "a refused command changed the state"
                    );
                }
            }
            applied
        })
        .collect()
}

fuzz_target!(|input: &[u8]| {
    // The first piece is the snapshot (an empty one starts from nothing), the rest records.
    let pieces = pieces(input);
    let Some((snapshot, records)) = pieces.split_first() else {
        return;
    };
    let start = if snapshot.is_empty() {
        Some(Replay::new(HISTORY))
    } else {
        Replay::restore(snapshot, HISTORY)
    };
    let Some(mut state) = start else {
        return;
    };
    let restored = state.snapshot_bytes();
    let applied = replay(&mut state, records);

    // The state's own snapshot restores to the same state.
    let again = Replay::restore(&state.snapshot_bytes(), HISTORY).expect("its own snapshot");
    assert_eq!(again.snapshot(), state.snapshot());
    assert_eq!(again.revision(), state.revision());

    // Recovery from the same snapshot and records comes to the same place.
    let mut second = Replay::restore(&restored, HISTORY).expect("its own snapshot");
    assert_eq!(replay(&mut second, records), applied);
    assert_eq!(second.snapshot(), state.snapshot());
});
