//! The durable queue: order, leases and redelivery, acknowledgements across restarts,
//! compaction, and concurrent consumers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_store::{DurableQueue, JournalOptions};

fn open(dir: &std::path::Path, snapshot_every: u64) -> DurableQueue {
    DurableQueue::open(dir, JournalOptions::default(), snapshot_every).unwrap()
}

#[tokio::test]
async fn what_is_not_acknowledged_comes_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = open(dir.path(), 1000);
        for m in ["a", "b", "c"] {
            q.push(m).await.unwrap();
        }
        let first = q.pop(Duration::from_secs(60)).await;
        assert_eq!(
            (first.seq, &first.payload[..], first.redelivered),
            (1, &b"a"[..], false)
        );
        assert!(q.ack(first.seq).await.unwrap());
        assert!(!q.ack(first.seq).await.unwrap(), "once only");
        let second = q.pop(Duration::from_secs(60)).await;
        assert_eq!(&second.payload[..], b"b");
        // Not acknowledged: the process "crashes" here.
    }
    let q = open(dir.path(), 1000);
    assert_eq!(q.len(), 2);
    let again = q.pop(Duration::from_secs(60)).await;
    assert_eq!((&again.payload[..], again.redelivered), (&b"b"[..], true));
    let third = q.pop(Duration::from_secs(60)).await;
    assert_eq!(&third.payload[..], b"c");
    assert_eq!(
        q.push("d").await.unwrap(),
        4,
        "sequence numbers are not reused"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_runs_out_or_a_nack_hands_the_message_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(open(dir.path(), 1000));
    q.push("job").await.unwrap();
    let first = q.pop(Duration::from_secs(5)).await;
    // Leased: another consumer waits until the lease runs out.
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.pop(Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!waiter.is_finished());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = waiter.await.unwrap();
    assert_eq!((second.seq, second.redelivered), (first.seq, true));
    q.nack(&first); // stale: that lease went to `second`; ignored
    assert!(
        tokio::time::timeout(Duration::from_millis(1), q.pop(Duration::from_secs(5)))
            .await
            .is_err(),
        "still leased"
    );
    q.nack(&second);
    let third = q.pop(Duration::from_secs(5)).await;
    assert_eq!(third.seq, first.seq);
    assert!(q.ack(third.seq).await.unwrap());
    assert!(q.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_was_already_waiting_gets_a_message_whose_lease_ran_out() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(open(dir.path(), 1000));
    // Two consumers wait on an empty queue; one push wakes one of them, which then dies
    // without acknowledging.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move { q.pop(Duration::from_secs(5)).await })
        })
        .collect();
    tokio::task::yield_now().await;
    q.push("job").await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (done, still): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|t| t.is_finished());
    assert_eq!((done.len(), still.len()), (1, 1));
    let first = done.into_iter().next().unwrap().await.unwrap();
    drop(first); // the consumer dies
    // The other one gets it when the lease runs out, with no further push or nack.
    let second = tokio::time::timeout(Duration::from_secs(10), still.into_iter().next().unwrap())
        .await
        .expect("handed out again once the lease ran out")
        .unwrap();
    assert_eq!(
        (second.seq, second.redelivered, second.attempt),
        (1, true, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_consumers_see_every_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(open(dir.path(), 1000));
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..50 {
                    let d = q.pop(Duration::from_secs(60)).await;
                    assert!(q.ack(d.seq).await.unwrap());
                    got.push(String::from_utf8(d.payload.to_vec()).unwrap());
                }
                got
            })
        })
        .collect();
    for n in 0..200 {
        q.push(format!("m{n}")).await.unwrap();
    }
    let mut seen = HashSet::new();
    for c in consumers {
        for m in c.await.unwrap() {
            assert!(seen.insert(m), "delivered twice");
        }
    }
    assert_eq!(seen.len(), 200);
    assert!(q.is_empty());
}

#[tokio::test]
async fn snapshots_keep_the_journal_short_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small = JournalOptions {
        segment_bytes: 256,
        ..JournalOptions::default()
    };
    let wal_files = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".wal")
            })
            .count()
    };
    let first_segment = dir.path().join(format!("{:020}.wal", 1));
    {
        let q = DurableQueue::open(dir.path(), small.clone(), 10).unwrap();
        for n in 0..50 {
            q.push(format!("m{n}")).await.unwrap();
        }
        let before = wal_files();
        assert!(first_segment.exists());
        for _ in 0..40 {
            let d = q.pop(Duration::from_secs(60)).await;
            q.ack(d.seq).await.unwrap();
        }
        assert!(
            !first_segment.exists(),
            "segments covered by a snapshot are dropped"
        );
        assert!(
            wal_files() < before,
            "{} segments, {before} before",
            wal_files()
        );
    }
    let q = DurableQueue::open(dir.path(), small, 10).unwrap();
    assert_eq!(q.len(), 10);
    let d = q.pop(Duration::from_secs(60)).await;
    assert_eq!(&d.payload[..], b"m40");
    assert_eq!(q.push("next").await.unwrap(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_taken_while_pushes_are_in_flight_lose_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let pushed = {
        // A snapshot after every acknowledgement, while producers push.
        let q = Arc::new(open(dir.path(), 1));
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let q = q.clone();
                tokio::spawn(async move {
                    for n in 0..100 {
                        q.push(format!("p{p}-{n}")).await.unwrap();
                    }
                })
            })
            .collect();
        let consumer = {
            let q = q.clone();
            tokio::spawn(async move {
                // Done while the producers still push: the last snapshot is taken with
                // pushes in flight.
                for _ in 0..50 {
                    let d = q.pop(Duration::from_secs(60)).await;
                    q.ack(d.seq).await.unwrap();
                }
            })
        };
        for p in producers {
            p.await.unwrap();
        }
        consumer.await.unwrap();
        q.len()
    };
    assert_eq!(pushed, 350);
    let q = open(dir.path(), 1);
    assert_eq!(
        q.len(),
        350,
        "every unacknowledged message survives the snapshots"
    );
}
