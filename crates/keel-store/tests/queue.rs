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
    q.nack(second.seq);
    let third = q.pop(Duration::from_secs(5)).await;
    assert_eq!(third.seq, first.seq);
    assert!(q.ack(third.seq).await.unwrap());
    assert!(q.is_empty());
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
    {
        let q = open(dir.path(), 10);
        for n in 0..50 {
            q.push(format!("m{n}")).await.unwrap();
        }
        for _ in 0..40 {
            let d = q.pop(Duration::from_secs(60)).await;
            q.ack(d.seq).await.unwrap();
        }
    }
    let snapshots = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".snap")
        })
        .count();
    assert!(snapshots >= 1);
    let q = open(dir.path(), 10);
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
