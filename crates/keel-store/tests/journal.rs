//! The journal from outside: replay, group commit, snapshots and compaction, torn tails,
//! damage, and a real kill -9 in the middle of a burst of appends.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use keel_store::{Journal, JournalOptions, StoreError, SyncPolicy};

fn options(sync: SyncPolicy) -> JournalOptions {
    JournalOptions {
        sync,
        ..JournalOptions::default()
    }
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("record {i} {}", "x".repeat((i % 7) as usize)))
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

async fn append_n(journal: &Journal, from: u64, n: u64) {
    let pending: Vec<_> = (from..from + n)
        .map(|i| journal.append(payload(i)).unwrap())
        .collect();
    for (i, p) in (from..).zip(pending) {
        assert_eq!(p.await.unwrap(), i);
    }
}

#[tokio::test]
async fn appends_replay_in_order_under_every_policy() {
    for sync in [
        SyncPolicy::Always,
        SyncPolicy::Interval(Duration::from_millis(5)),
        SyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (journal, recovered) = Journal::open(dir.path(), options(sync)).unwrap();
        assert!(recovered.records.is_empty() && recovered.snapshot.is_none());
        append_n(&journal, 1, 100).await;
        journal.close().await.unwrap();

        let (journal, recovered) = Journal::open(dir.path(), options(sync)).unwrap();
        assert_eq!(recovered.records.len(), 100, "{sync:?}");
        for (i, r) in (1..).zip(&recovered.records) {
            assert_eq!((r.index, &r.payload), (i, &payload(i)));
        }
        assert!(recovered.torn_tail.is_none());
        // Numbering continues where it stopped.
        assert_eq!(journal.next_index(), 101);
        append_n(&journal, 101, 5).await;
        journal.close().await.unwrap();
        let (_, recovered) = Journal::open(dir.path(), options(sync)).unwrap();
        assert_eq!(recovered.last_index(), 105);
    }
}

#[tokio::test]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
    append_n(&journal, 1, 1000).await;
    let syncs = journal
        .stats()
        .syncs
        .load(std::sync::atomic::Ordering::Relaxed);
    // One fsync per append would be 1000; group commit folds appends that wait together.
    assert!(syncs < 1000, "{syncs} fsyncs for 1000 appends");
    assert!(syncs >= 1);
}

#[tokio::test]
async fn snapshots_cut_the_journal_and_recovery_replays_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        segment_bytes: 256,
        ..options(SyncPolicy::Always)
    };
    let (journal, _) = Journal::open(dir.path(), opts.clone()).unwrap();
    append_n(&journal, 1, 100).await;
    let before = segments(dir.path()).len();
    assert!(before > 10, "small segments roll over ({before})");
    journal
        .snapshot(50, Bytes::from_static(b"state@50"))
        .await
        .unwrap();
    // The first snapshot keeps every segment: it is the only way back if it is damaged.
    assert_eq!(segments(dir.path()).len(), before);
    journal
        .snapshot(90, Bytes::from_static(b"state@90"))
        .await
        .unwrap();
    let after = segments(dir.path());
    assert!(
        after.len() < before,
        "segments covered by the older snapshot are gone"
    );
    // Whatever is left still reaches back to record 51 (the older snapshot's successor).
    let first: u64 = after[0]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(first <= 51, "{first}");
    journal.close().await.unwrap();

    let (journal, recovered) = Journal::open(dir.path(), opts.clone()).unwrap();
    let snap = recovered.snapshot.as_ref().unwrap();
    assert_eq!((snap.index, &snap.data[..]), (90, &b"state@90"[..]));
    let indexes: Vec<u64> = recovered.records.iter().map(|r| r.index).collect();
    assert_eq!(indexes, (91..=100).collect::<Vec<_>>());
    // A snapshot may not claim records that do not exist yet.
    assert!(matches!(
        journal.snapshot(500, Bytes::new()).await,
        Err(StoreError::InvalidSnapshot { .. })
    ));
}

#[tokio::test]
async fn a_damaged_newest_snapshot_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
    append_n(&journal, 1, 20).await;
    journal
        .snapshot(10, Bytes::from_static(b"s10"))
        .await
        .unwrap();
    journal
        .snapshot(15, Bytes::from_static(b"s15"))
        .await
        .unwrap();
    journal.close().await.unwrap();
    let newest = dir.path().join("snap-00000000000000000015.snap");
    let mut bytes = fs::read(&newest).unwrap();
    *bytes.last_mut().unwrap() ^= 0x55;
    fs::write(&newest, bytes).unwrap();

    let (_, recovered) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
    assert_eq!(recovered.snapshot.as_ref().unwrap().index, 10);
    assert_eq!(recovered.bad_snapshots.len(), 1);
    assert!(
        recovered.bad_snapshots[0]
            .to_string()
            .contains("snap-00000000000000000015")
    );
    let indexes: Vec<u64> = recovered.records.iter().map(|r| r.index).collect();
    assert_eq!(indexes, (11..=20).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_and_reported_and_appends_continue() {
    for cut in [1u64, 5, 16, 17, 20] {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
        append_n(&journal, 1, 10).await;
        journal.close().await.unwrap();
        let seg = segments(dir.path()).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        let file = fs::OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(len - cut).unwrap();
        drop(file);

        let (journal, recovered) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
        assert_eq!(recovered.last_index(), 9, "cut {cut}");
        let torn = recovered.torn_tail.as_ref().expect("torn tail reported");
        assert_eq!(torn.file, seg);
        assert_eq!(torn.dropped_bytes, payload(10).len() as u64 + 16 - cut);
        // The next append takes index 10 again, and everything reads back whole.
        append_n(&journal, 10, 3).await;
        journal.close().await.unwrap();
        let (_, recovered) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
        assert!(recovered.torn_tail.is_none());
        for (i, r) in (1..).zip(&recovered.records) {
            assert_eq!((r.index, &r.payload), (i, &payload(i)));
        }
        assert_eq!(recovered.last_index(), 12);
    }
}

#[tokio::test]
async fn zeroes_after_the_last_record_are_a_torn_tail() {
    // A crash after the file grew but before the data landed leaves zero-filled blocks.
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
    append_n(&journal, 1, 3).await;
    journal.close().await.unwrap();
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&seg, bytes).unwrap();
    let (_, recovered) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
    assert_eq!(recovered.last_index(), 3);
    assert_eq!(recovered.torn_tail.unwrap().dropped_bytes, 4096);
}

#[tokio::test]
async fn damage_before_valid_records_is_an_error_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
    append_n(&journal, 1, 5).await;
    journal.close().await.unwrap();
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    // Inside the payload of record 2: segment header 16, record 1 = 16 + payload.
    let record2 = 16 + 16 + payload(1).len();
    bytes[record2 + 16 + 2] ^= 0xff;
    fs::write(&seg, &bytes).unwrap();
    match Journal::open(dir.path(), options(SyncPolicy::Always)) {
        Err(StoreError::Corrupt {
            file,
            offset,
            reason,
        }) => {
            assert_eq!(file, seg);
            assert_eq!(offset, record2 as u64);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    // Nothing was cut: the damaged file is left as it was for an operator to look at.
    assert_eq!(fs::read(&seg).unwrap(), bytes);
}

#[tokio::test]
async fn damage_in_an_earlier_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        segment_bytes: 128,
        ..options(SyncPolicy::Always)
    };
    let (journal, _) = Journal::open(dir.path(), opts.clone()).unwrap();
    append_n(&journal, 1, 40).await;
    journal.close().await.unwrap();
    let first = segments(dir.path()).remove(0);
    let len = fs::metadata(&first).unwrap().len();
    // Cutting an earlier segment short loses records that later ones build on.
    fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = Journal::open(dir.path(), opts).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { file, .. } if *file == first),
        "{err}"
    );
}

#[tokio::test]
async fn oversized_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        max_record_bytes: 100,
        ..options(SyncPolicy::Always)
    };
    let (journal, _) = Journal::open(dir.path(), opts).unwrap();
    assert!(matches!(
        journal.append(vec![0u8; 101]),
        Err(StoreError::TooLarge { len: 101, max: 100 })
    ));
    assert_eq!(journal.append(vec![0u8; 100]).unwrap().await.unwrap(), 1);
}

#[tokio::test]
async fn a_journal_directory_is_opened_by_one_journal_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
    journal.append(payload(1)).unwrap().await.unwrap();
    let err = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Locked { .. }), "{text}");
    assert!(
        text.contains(&format!("process {}", std::process::id())),
        "{text}"
    );
    // Once the first is gone, the directory opens again with everything in it.
    drop(journal);
    let (_, recovered) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
    assert_eq!(recovered.last_index(), 1);
}

/// The child side of the kill -9 test: appends as fast as it can and prints each index once
/// its append has been acknowledged.
#[test]
#[ignore = "a child process: kill_9_during_appends_loses_no_acknowledged_record starts it (and SIGKILLs it) in every cargo test run"]
fn child_appender() {
    let Ok(dir) = std::env::var("KEEL_STORE_CHILD_DIR") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (journal, recovered) = Journal::open(&dir, options(SyncPolicy::Always)).unwrap();
        let mut next = recovered.last_index() + 1;
        loop {
            // Eight appends in flight at a time, so group commit is in play when the kill lands.
            let batch: Vec<_> = (0..8)
                .map(|k| journal.append(payload(next + k)).unwrap())
                .collect();
            for p in batch {
                let i = p.await.unwrap();
                println!("{i}");
            }
            next += 8;
        }
    });
}

#[test]
fn kill_9_during_appends_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked_max = 0u64;
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_appender",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KEEL_STORE_CHILD_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        while let Some(Ok(line)) = lines.next() {
            if let Ok(i) = line.trim().parse::<u64>() {
                assert!(i > acked_max, "round {round}: index {i} reused");
                acked_max = i;
                seen += 1;
                if seen == 300 + round * 97 {
                    break;
                }
            }
        }
        assert!(seen > 0, "child acknowledged nothing");
        // While the child writes, nobody else may open its journal; the error names the
        // directory and the child's pid.
        match Journal::open(dir.path(), options(SyncPolicy::Always)) {
            Err(StoreError::Locked { dir: d, pid }) => {
                assert_eq!(d, dir.path());
                assert_eq!(pid, Some(child.id()), "round {round}");
            }
            other => panic!("round {round}: a second opener got {other:?}"),
        }
        child.kill().unwrap(); // SIGKILL: the kernel drops the lock with the process
        child.wait().unwrap();

        let (_, recovered) = Journal::open(dir.path(), options(SyncPolicy::Always)).unwrap();
        assert!(
            recovered.last_index() >= acked_max,
            "round {round}: acknowledged {acked_max}, recovered up to {}",
            recovered.last_index()
        );
        for (i, r) in (1..).zip(&recovered.records) {
            assert_eq!((r.index, &r.payload), (i, &payload(i)), "round {round}");
        }
        acked_max = recovered.last_index();
    }
}
