//! A journal stream read as a queue (`StreamFeed`) against the real NATS server on
//! 127.0.0.1:4222 (or `KEEL_NATS_URL`): every record delivered, shared between followers of
//! one name, delivered again when a follower dies without acknowledging, and a backlog that
//! is zero only once everything is acknowledged. Skipped with a message when no server is
//! there, failed instead when `KEEL_REQUIRE_SERVICES=1`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_store::testing::{DeleteStreams, nats_up, nats_url, unique_stream};
use keel_store::{StreamFeed, StreamJournal, StreamOptions};

#[tokio::test]
async fn records_are_shared_between_followers_and_redelivered_when_one_dies() {
    if !nats_up("records_are_shared_between_followers_and_redelivered_when_one_dies") {
        return;
    }
    let name = unique_stream("feed");
    let _guard = DeleteStreams::new(vec![name.clone()]);
    let options = StreamOptions::parse(&nats_url(), &name).unwrap();
    // The follower may come first: it makes the stream, and the writer appends to it.
    let ack_wait = Duration::from_millis(800);
    let first = StreamFeed::open(&options, "orders", ack_wait)
        .await
        .unwrap();
    let (journal, recovered) = StreamJournal::open(options.clone()).await.unwrap();
    assert!(recovered.records.is_empty());
    // One at a time, so each record is a message of its own.
    for i in 1..=300 {
        journal.append(format!("r{i}")).unwrap().await.unwrap();
    }
    assert_eq!(first.backlog().await.unwrap(), 300);

    // A follower takes 50 and dies without acknowledging them.
    {
        let dying = StreamFeed::open(&options, "orders", ack_wait)
            .await
            .unwrap();
        let taken = dying.next(50, Duration::from_secs(2)).await.unwrap();
        assert_eq!(taken.len(), 50);
        assert_eq!(taken[0].index, 1);
    }
    // The other follower gets every record, the dead one's again once their wait is over.
    let mut seen: BTreeMap<u64, i64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 300 {
        assert!(
            Instant::now() < deadline,
            "only {} records came",
            seen.len()
        );
        let batch = first.next(64, Duration::from_millis(300)).await.unwrap();
        for record in &batch {
            assert_eq!(record.payload, format!("r{}", record.index).as_bytes());
            seen.insert(record.index, record.delivered);
        }
        first.ack(&batch).await.unwrap();
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=300).collect::<Vec<_>>()
    );
    assert!(
        seen.range(1..=50).all(|(_, delivered)| *delivered >= 2),
        "the dead follower's records came again: {:?}",
        seen.range(1..=5).collect::<Vec<_>>()
    );
    settles_at_zero(&first).await;

    // A restarted follower of the same name goes on after what was acknowledged.
    drop(first);
    journal.append("r301").unwrap().await.unwrap();
    let again = StreamFeed::open(&options, "orders", ack_wait)
        .await
        .unwrap();
    assert_eq!(again.backlog().await.unwrap(), 1);
    let batch = again.next(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(batch.iter().map(|r| r.index).collect::<Vec<_>>(), vec![301]);
    again.ack(&batch).await.unwrap();
    // Nothing comes when nothing is there.
    assert!(
        again
            .next(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(again.backlog().await.unwrap(), 0);
    journal.close().await.unwrap();
}

/// Records appended together travel in shared messages: a follower gets each once, with its
/// index, and acknowledging a batch settles every message in it.
#[tokio::test]
async fn records_sharing_messages_come_one_by_one_with_their_indexes() {
    if !nats_up("records_sharing_messages_come_one_by_one_with_their_indexes") {
        return;
    }
    let name = unique_stream("feedbatch");
    let _guard = DeleteStreams::new(vec![name.clone()]);
    let mut options = StreamOptions::parse(&nats_url(), &name).unwrap();
    options.max_in_flight = 1;
    let (journal, _) = StreamJournal::open(options.clone()).await.unwrap();
    let appended: Vec<_> = (1..=2000)
        .map(|i| journal.append(format!("r{i}")).unwrap())
        .collect();
    futures_util::future::try_join_all(appended).await.unwrap();
    let messages = journal
        .stats()
        .batches
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        messages < 2000,
        "2,000 appends at once went in {messages} messages"
    );
    let feed = StreamFeed::open(&options, "orders", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(feed.backlog().await.unwrap(), messages);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 2000 {
        assert!(
            Instant::now() < deadline,
            "only {} records came",
            seen.len()
        );
        let batch = feed.next(7, Duration::from_millis(300)).await.unwrap();
        for record in &batch {
            assert_eq!(record.payload, format!("r{}", record.index).as_bytes());
            seen.push(record.index);
        }
        feed.ack(&batch).await.unwrap();
    }
    assert_eq!(seen, (1..=2000).collect::<Vec<_>>());
    settles_at_zero(&feed).await;
    journal.close().await.unwrap();
}

/// Acknowledgements reach the consumer's state a moment after the server has them.
async fn settles_at_zero(feed: &StreamFeed) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let backlog = feed.backlog().await.unwrap();
        if backlog == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "backlog stays at {backlog}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_bad_consumer_name_is_a_clear_error() {
    if !nats_up("a_bad_consumer_name_is_a_clear_error") {
        return;
    }
    let options = StreamOptions::parse(&nats_url(), unique_stream("feedname")).unwrap();
    let err = StreamFeed::open(&options, "a.b", Duration::from_secs(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("consumer name \"a.b\""), "{err}");
}
