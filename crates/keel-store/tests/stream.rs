//! The stream journal against a real NATS server with JetStream: the one on 127.0.0.1:4222
//! (or `KEEL_NATS_URL`) for most checks, and servers started here (own ports, own data
//! directories) for those that kill the server. Skipped with a message when no server is
//! there, failed instead when `KEEL_REQUIRE_SERVICES=1`.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_store::testing::{DeleteStreams, nats_up, nats_url, unique_stream as unique};
use keel_store::{StoreError, StreamJournal, StreamOptions};

fn options(url: &str, name: &str) -> (StreamOptions, DeleteStreams) {
    let options = StreamOptions::parse(url, name).unwrap();
    let guard = DeleteStreams {
        url: url.to_owned(),
        names: vec![name.to_owned()],
    };
    (options, guard)
}

#[tokio::test]
async fn records_come_back_in_order_and_appends_go_on_after_them() {
    if !nats_up("records_come_back_in_order_and_appends_go_on_after_them") {
        return;
    }
    let (options, _guard) = options(&nats_url(), &unique("order"));
    let (journal, recovered) = StreamJournal::open(options.clone()).await.unwrap();
    assert!(recovered.records.is_empty());
    // Many appends in flight at once: indexes in submission order, all acknowledged.
    let appended: Vec<_> = (0..500)
        .map(|i| journal.append(format!("record {i}")).unwrap())
        .collect();
    let indexes = futures_util::future::try_join_all(appended).await.unwrap();
    assert_eq!(indexes, (1..=500).collect::<Vec<u64>>());
    journal.sync().await.unwrap();
    journal.close().await.unwrap();

    let (journal, recovered) = StreamJournal::open(options.clone()).await.unwrap();
    assert_eq!(recovered.records.len(), 500);
    for (i, r) in recovered.records.iter().enumerate() {
        assert_eq!(r.index, i as u64 + 1);
        assert_eq!(r.payload, format!("record {i}").as_bytes());
    }
    assert_eq!(journal.append("after").unwrap().await.unwrap(), 501);
    journal.close().await.unwrap();

    // Appends that pile up while a message awaits its acknowledgement share the next one;
    // they come back one by one, numbered on from the records before them.
    let mut grouped = options.clone();
    grouped.max_in_flight = 1;
    let (journal, recovered) = StreamJournal::open(grouped.clone()).await.unwrap();
    assert_eq!(recovered.records.len(), 501);
    let appended: Vec<_> = (0..3000)
        .map(|i| journal.append(format!("grouped {i}")).unwrap())
        .collect();
    let indexes = futures_util::future::try_join_all(appended).await.unwrap();
    assert_eq!(indexes, (502..=3501).collect::<Vec<u64>>());
    let messages = journal
        .stats()
        .batches
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        messages < 3000,
        "3,000 appends at once went in {messages} messages"
    );
    journal.close().await.unwrap();
    let (journal, recovered) = StreamJournal::open(grouped).await.unwrap();
    assert_eq!(recovered.records.len(), 3501);
    for (i, r) in recovered.records.iter().enumerate().skip(501) {
        assert_eq!(r.index, i as u64 + 1);
        assert_eq!(r.payload, format!("grouped {}", i - 501).as_bytes());
    }
    assert_eq!(journal.append("after").unwrap().await.unwrap(), 3502);
    journal.close().await.unwrap();

    // Too large for the journal's limit: refused before it is sent, nothing changes.
    let mut small = options;
    small.max_record_bytes = 16;
    let (journal, recovered) = StreamJournal::open(small).await.unwrap();
    assert_eq!(recovered.records.len(), 3502);
    assert!(matches!(
        journal.append(vec![0u8; 17]),
        Err(StoreError::TooLarge { len: 17, max: 16 })
    ));
    journal.close().await.unwrap();
}

#[tokio::test]
async fn a_replaced_writer_has_its_next_append_refused_by_the_stream() {
    if !nats_up("a_replaced_writer_has_its_next_append_refused_by_the_stream") {
        return;
    }
    let (options, _guard) = options(&nats_url(), &unique("fence"));
    let (old, _) = StreamJournal::open(options.clone()).await.unwrap();
    for i in 0..5 {
        old.append(format!("old {i}")).unwrap().await.unwrap();
    }
    // A second writer opens the stream (as a new owner does after an election), replays, and
    // appends.
    let (new, recovered) = StreamJournal::open(options.clone()).await.unwrap();
    assert_eq!(recovered.records.len(), 5);
    assert_eq!(new.append("new 5").unwrap().await.unwrap(), 6);

    // The old writer still thinks it is at 6: the stream refuses it.
    let refused = old.append("old 5").unwrap().await;
    match refused {
        Err(StoreError::Fenced { index: 6, .. }) => {}
        other => panic!("expected a fenced append at 6, got {other:?}"),
    }
    // And it takes no more, at once.
    assert!(matches!(
        old.append("old 6"),
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        old.sync().await,
        Ok(()) | Err(StoreError::Fenced { .. })
    ));
    assert_eq!(new.append("new 6").unwrap().await.unwrap(), 7);
    new.close().await.unwrap();

    let (_, recovered) = StreamJournal::open(options).await.unwrap();
    let payloads: Vec<_> = recovered
        .records
        .iter()
        .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        [
            "old 0", "old 1", "old 2", "old 3", "old 4", "new 5", "new 6"
        ]
    );
}

/// The premise of chaining a writer's messages: a message sent behind another by the same
/// writer is refused when another writer's message got in between, although the sequence it
/// expects is the stream's last; a resend of a stored message is still answered as a
/// duplicate.
#[tokio::test]
async fn jetstream_refuses_a_message_whose_predecessor_is_not_the_last() {
    if !nats_up("jetstream_refuses_a_message_whose_predecessor_is_not_the_last") {
        return;
    }
    let name = unique("chain");
    let (options, _guard) = options(&nats_url(), &name);
    let (journal, _) = StreamJournal::open(options.clone()).await.unwrap();
    journal.close().await.unwrap();
    let client = async_nats::connect(nats_url().as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let send = |id: &'static str, last: u64, after: Option<&'static str>| {
        let js = js.clone();
        let subject = options.subject();
        async move {
            let mut m = async_nats::jetstream::message::PublishMessage::build()
                .payload(id.into())
                .message_id(id)
                .expected_last_sequence(last);
            if let Some(after) = after {
                m = m.expected_last_message_id(after);
            }
            js.send_publish(subject, m).await.unwrap().await
        }
    };
    assert_eq!(send("old-1", 0, None).await.unwrap().sequence, 1);
    // The new writer's claim lands at 2; the old writer's 2 is refused, and its 3, which
    // expects 2 as the last sequence, is refused for its predecessor.
    assert_eq!(send("new-2", 1, None).await.unwrap().sequence, 2);
    assert!(send("old-2", 1, Some("old-1")).await.is_err());
    let behind = send("old-3", 2, Some("old-2")).await.unwrap_err();
    assert_eq!(
        behind.kind(),
        async_nats::jetstream::context::PublishErrorKind::WrongLastMessageId,
        "{behind}"
    );
    assert_eq!(send("new-3", 2, Some("new-2")).await.unwrap().sequence, 3);
    let again = send("new-3", 2, Some("new-2")).await.unwrap();
    assert_eq!((again.sequence, again.duplicate), (3, true));
}

/// The premise of resending an append in doubt: JetStream answers a message id it has
/// stored with the first sequence (a duplicate), before it checks the expected last sequence.
#[tokio::test]
async fn jetstream_answers_a_resent_message_with_its_first_sequence() {
    if !nats_up("jetstream_answers_a_resent_message_with_its_first_sequence") {
        return;
    }
    let name = unique("dedup");
    let (options, _guard) = options(&nats_url(), &name);
    let (journal, _) = StreamJournal::open(options.clone()).await.unwrap();
    journal.close().await.unwrap();
    let client = async_nats::connect(nats_url().as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let publish = |payload: &'static str, id: &str| {
        async_nats::jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(id)
            .expected_last_sequence(0)
    };
    let first = js
        .send_publish(options.subject(), publish("once", "writer-1"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((first.sequence, first.duplicate), (1, false));
    let again = js
        .send_publish(options.subject(), publish("once", "writer-1"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((again.sequence, again.duplicate), (1, true));
    // Another id with the stale expectation is refused.
    let other = js
        .send_publish(options.subject(), publish("other", "writer-2"))
        .await
        .unwrap()
        .await;
    assert_eq!(
        other.unwrap_err().kind(),
        async_nats::jetstream::context::PublishErrorKind::WrongLastSequence
    );
}

#[tokio::test]
async fn a_bad_address_or_name_is_a_clear_error() {
    for (address, wanted) in [
        ("http://127.0.0.1:4222", "does not start with nats://"),
        ("nats://", "names no server"),
        (
            "nats://127.0.0.1:4222?replicas=2",
            "replicas must be 1, 3 or 5",
        ),
        ("nats://127.0.0.1:4222?replica=3", "unknown setting"),
        (
            "nats://127.0.0.1:4222?in_flight=0",
            "in_flight must be 1 to 1024",
        ),
        (
            "nats://127.0.0.1:4222?in_flight=2000",
            "in_flight must be 1 to 1024",
        ),
    ] {
        let e = StreamOptions::parse(address, "ok").unwrap_err();
        assert!(
            matches!(&e, StoreError::InvalidSetting { setting: "journal address", value, .. } if value == address),
            "{address}: {e:?}"
        );
        assert!(e.to_string().contains(wanted), "{address}: {e}");
    }
    let good = StreamOptions::parse("nats://a:1,b:2?replicas=3&in_flight=16", "ok").unwrap();
    assert_eq!((good.replicas, good.max_in_flight), (3, 16));
    assert_eq!(good.servers, vec!["nats://a:1", "nats://b:2"]);
    let e = StreamOptions::parse("nats://127.0.0.1:4222", "a.b").unwrap_err();
    assert!(
        matches!(
            &e,
            StoreError::InvalidSetting {
                setting: "stream name",
                ..
            }
        ),
        "{e:?}"
    );
    // Nothing listens there: an error within the connect bound, not a hang.
    let port = free_port();
    let mut options = StreamOptions::parse(&format!("nats://127.0.0.1:{port}"), "x").unwrap();
    options.retry_for = Duration::from_secs(1);
    let started = Instant::now();
    let e = StreamJournal::open(options).await.unwrap_err();
    assert!(e.to_string().contains("no server"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A NATS server of the test's own, killed with SIGKILL when dropped.
struct OwnServer {
    child: Child,
}

impl OwnServer {
    fn start(port: u16, dir: &Path) -> Option<OwnServer> {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = OwnServer { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn nats_server_present(test: &str) -> bool {
    let present = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        assert!(
            std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{test}: nats-server is required (KEEL_REQUIRE_SERVICES=1) but not installed"
        );
        eprintln!("skipping {test}: nats-server is not installed");
    }
    present
}

#[tokio::test]
async fn appends_in_doubt_when_the_server_dies_are_resent_and_stored_once() {
    if !nats_server_present("appends_in_doubt_when_the_server_dies_are_resent_and_stored_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = OwnServer::start(port, dir.path()).unwrap();
    let mut options = StreamOptions::parse(&format!("nats://127.0.0.1:{port}"), "doubt").unwrap();
    options.ack_timeout = Duration::from_millis(500);
    options.retry_for = Duration::from_secs(30);
    let (journal, _) = StreamJournal::open(options.clone()).await.unwrap();
    for i in 0..50 {
        journal.append(format!("r{i}")).unwrap().await.unwrap();
    }
    // Appends in flight while the server is killed and, a moment later, started again on the
    // same port and data directory.
    let pending: Vec<_> = (50..300)
        .map(|i| journal.append(format!("r{i}")).unwrap())
        .collect();
    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _server = OwnServer::start(port, dir.path()).unwrap();
    let indexes = futures_util::future::try_join_all(pending).await.unwrap();
    assert_eq!(indexes, (51..=300).collect::<Vec<u64>>());
    let resends = journal
        .stats()
        .resends
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(resends > 0, "the appends in flight were resent");
    journal.close().await.unwrap();

    let (_, recovered) = StreamJournal::open(options).await.unwrap();
    let payloads: Vec<_> = recovered
        .records
        .iter()
        .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
        .collect();
    let wanted: Vec<String> = (0..300).map(|i| format!("r{i}")).collect();
    assert_eq!(payloads, wanted, "every record once, in order");
}
