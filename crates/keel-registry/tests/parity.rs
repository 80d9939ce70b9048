//! The behavioural suite every naming backend must pass, run against Keel's registry and
//! against a real etcd started on loopback in a temporary directory. Without an `etcd` binary
//! the etcd half is skipped with a message, or fails when `KEEL_REQUIRE_SERVICES=1`.

use std::time::Duration;

use futures_util::StreamExt;
use keel_governance::Discover;
use keel_registry::proto::{EventKind, Instance};
use keel_registry::{
    NamingBackend, Registration, Registry, RegistryConfig, RegistryDiscover, RegistryHandle,
};
use keel_rpc::{Channel, ChannelConfig, Code, Server};
use tokio::net::TcpListener;

const NS: &str = "parity";

/// A Keel registry served on a free port, with a handle to it.
struct KeelFixture {
    handle: RegistryHandle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn keel() -> KeelFixture {
    let registry = Registry::open(RegistryConfig {
        min_ttl: Duration::from_millis(100),
        ..RegistryConfig::default()
    })
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder().add_service(registry.service()).build();
    tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let channel = Channel::connect(addr.to_string(), ChannelConfig::default())
        .await
        .unwrap();
    KeelFixture {
        handle: RegistryHandle::new(channel),
        _stop: stop,
    }
}

fn instance(service: &str, id: &str, port: u16, lease: u64) -> Instance {
    Instance {
        namespace: NS.into(),
        service: service.into(),
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        lease_id: lease,
        ..Instance::default()
    }
}

async fn ids<B: NamingBackend>(b: &B, service: &str) -> Vec<String> {
    let mut v: Vec<String> = b
        .list(NS, service)
        .await
        .unwrap()
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect();
    v.sort();
    v
}

async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn registration_list_and_watch<B: NamingBackend>(b: &B) {
    let lease = b.grant_lease(Duration::from_secs(30)).await.unwrap();
    b.register(&instance("orders", "a", 7101, lease))
        .await
        .unwrap();
    b.register(&instance("orders", "b", 7102, lease))
        .await
        .unwrap();
    assert_eq!(ids(b, "orders").await, ["a", "b"]);
    let list = b.list(NS, "orders").await.unwrap();
    assert_eq!(list.instances[0].weight, 100);

    let mut watch = b.watch(NS, "orders", 0).await.unwrap();
    let reset = watch.next().await.unwrap().unwrap();
    assert_eq!(reset.kind, EventKind::Reset as i32);
    assert_eq!(reset.instances.len(), 2);
    b.register(&instance("orders", "c", 7103, lease))
        .await
        .unwrap();
    let put = watch.next().await.unwrap().unwrap();
    assert_eq!(
        (put.kind, put.instance.unwrap().id.as_str()),
        (EventKind::Put as i32, "c")
    );
    b.deregister(NS, "orders", "a").await.unwrap();
    let del = watch.next().await.unwrap().unwrap();
    assert_eq!(
        (del.kind, del.instance.unwrap().id.as_str()),
        (EventKind::Delete as i32, "a")
    );
    assert!(del.revision > put.revision && put.revision > reset.revision);

    // Resuming from the reset's revision replays exactly what happened since.
    let mut resumed = b.watch(NS, "orders", reset.revision).await.unwrap();
    let first = resumed.next().await.unwrap().unwrap();
    let second = resumed.next().await.unwrap().unwrap();
    assert_eq!(first.instance.unwrap().id, "c");
    assert_eq!(second.kind, EventKind::Delete as i32);
    assert_eq!(second.instance.unwrap().id, "a");

    let err = b.deregister(NS, "orders", "nobody").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn leases_expire_unless_kept_alive<B: NamingBackend>(b: &B) {
    let kept = b.grant_lease(Duration::from_secs(2)).await.unwrap();
    let lapsing = b.grant_lease(Duration::from_secs(2)).await.unwrap();
    b.register(&instance("pay", "kept", 7201, kept))
        .await
        .unwrap();
    b.register(&instance("pay", "lapsing", 7202, lapsing))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while ids(b, "pay").await.len() == 2 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "lease never expired"
        );
        b.keep_alive(kept).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(ids(b, "pay").await, ["kept"]);
    let err = b.keep_alive(lapsing).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    // Revoking removes at once.
    b.revoke_lease(kept).await.unwrap();
    assert!(ids(b, "pay").await.is_empty());
}

async fn locks_exclude_and_fence<B: NamingBackend>(b: &B) {
    let la = b.grant_lease(Duration::from_secs(30)).await.unwrap();
    let lb = b.grant_lease(Duration::from_secs(30)).await.unwrap();
    let a = b.lock(NS, "leader", la, None).await.unwrap();
    let err = b
        .lock(NS, "leader", lb, Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(b.check_fence(NS, "leader", a.token).await.unwrap());
    b.unlock(NS, "leader", a.token).await.unwrap();
    // A fresh lease after a timed-out attempt: on etcd a lock request is keyed by its lease,
    // and the clean-up of the cancelled attempt could remove a new one under the same lease.
    let lb = b.grant_lease(Duration::from_secs(30)).await.unwrap();
    let bh = b
        .lock(NS, "leader", lb, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(
        bh.token > a.token,
        "fencing tokens grow: {} then {}",
        a.token,
        bh.token
    );
    assert!(!b.check_fence(NS, "leader", a.token).await.unwrap());
    assert!(b.check_fence(NS, "leader", bh.token).await.unwrap());
    let err = b.unlock(NS, "leader", a.token).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // The lock goes with its lease.
    b.revoke_lease(lb).await.unwrap();
    assert!(!b.check_fence(NS, "leader", bh.token).await.unwrap());
    let again = b
        .lock(NS, "leader", la, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(again.token > bh.token);
}

async fn elections_have_one_leader_at_a_time<B: NamingBackend + Clone>(b: &B) {
    assert!(b.leader(NS, "scheduler").await.unwrap().is_none());
    let la = b.grant_lease(Duration::from_secs(30)).await.unwrap();
    let lb = b.grant_lease(Duration::from_secs(30)).await.unwrap();
    let a = b
        .campaign(NS, "scheduler", la, "node-a".into(), None)
        .await
        .unwrap();
    let leader = b.leader(NS, "scheduler").await.unwrap().unwrap();
    assert_eq!((&leader.value[..], leader.token), (&b"node-a"[..], a.token));
    // B stands too, but A leads until it resigns.
    let err = b
        .campaign(
            NS,
            "scheduler",
            lb,
            "node-b".into(),
            Some(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    // A fresh lease for the second try: on etcd a campaign is keyed by its lease, and the
    // clean-up of the cancelled campaign above could remove a new one made under the same lease.
    let lc = b.grant_lease(Duration::from_secs(30)).await.unwrap();
    let waiting = {
        let b2 = b.clone();
        tokio::spawn(async move {
            b2.campaign(
                NS,
                "scheduler",
                lc,
                "node-b".into(),
                Some(Duration::from_secs(10)),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.resign(NS, "scheduler", a.token).await.unwrap();
    let bh = waiting.await.unwrap().unwrap();
    assert!(bh.token > a.token, "leadership tokens grow");
    let leader = b.leader(NS, "scheduler").await.unwrap().unwrap();
    assert_eq!(
        (&leader.value[..], leader.token),
        (&b"node-b"[..], bh.token)
    );
    // A's old token no longer resigns anything.
    let err = b.resign(NS, "scheduler", a.token).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

async fn config_is_versioned<B: NamingBackend>(b: &B) {
    assert!(b.get_config(NS, "limits").await.unwrap().is_none());
    let v1 = b.put_config(NS, "limits", "10".into()).await.unwrap();
    let v2 = b.put_config(NS, "limits", "20".into()).await.unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    let got = b.get_config(NS, "limits").await.unwrap().unwrap();
    assert_eq!((&got.value[..], got.version), (&b"20"[..], 2));
    // Compare-and-set: only at the expected version (0: only a new key).
    let err = b
        .put_config_if(NS, "limits", "30".into(), 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let v3 = b.put_config_if(NS, "limits", "30".into(), 2).await.unwrap();
    assert_eq!(v3.version, 3);
    let err = b
        .put_config_if(NS, "limits", "x".into(), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let fresh = b.put_config_if(NS, "fresh", "1".into(), 0).await.unwrap();
    assert_eq!(fresh.version, 1);
    // Deleting removes the entry, and deleting again is no error.
    assert!(b.delete_config(NS, "fresh").await.unwrap() > 0);
    assert_eq!(b.delete_config(NS, "fresh").await.unwrap(), 0);
    assert!(b.get_config(NS, "fresh").await.unwrap().is_none());
    assert_eq!(
        b.put_config_if(NS, "fresh", "2".into(), 0)
            .await
            .unwrap()
            .version,
        1
    );
}

async fn config_changes_are_followed<B: NamingBackend + Clone>(b: &B) {
    use keel_registry::{ConfigChange, follow_config};
    b.put_config(NS, "open/a", "1".into()).await.unwrap();
    b.put_config(NS, "other", "x".into()).await.unwrap();
    let mut changes = follow_config(b.clone(), NS, "open/");
    let next = async |changes: &mut tokio::sync::mpsc::Receiver<ConfigChange>| {
        tokio::time::timeout(Duration::from_secs(5), changes.recv())
            .await
            .expect("a config change in time")
            .expect("the follower runs")
    };
    match next(&mut changes).await {
        ConfigChange::Reset { entries, .. } => {
            let got: Vec<(String, Vec<u8>)> = entries
                .into_iter()
                .map(|e| (e.key, e.value.to_vec()))
                .collect();
            assert_eq!(got, [("open/a".to_owned(), b"1".to_vec())]);
        }
        other => panic!("expected a reset first, got {other:?}"),
    }
    let b_put = b.put_config(NS, "open/b", "2".into()).await.unwrap();
    b.put_config(NS, "closed/c", "x".into()).await.unwrap();
    b.put_config(NS, "open/a", "3".into()).await.unwrap();
    match next(&mut changes).await {
        ConfigChange::Put(e) => assert_eq!((e.key.as_str(), &e.value[..]), ("open/b", &b"2"[..])),
        other => panic!("expected open/b, got {other:?}"),
    }
    match next(&mut changes).await {
        ConfigChange::Put(e) => assert_eq!(
            (e.key.as_str(), &e.value[..], e.version),
            ("open/a", &b"3"[..], 2)
        ),
        other => panic!("expected open/a, got {other:?}"),
    }
    b.delete_config(NS, "open/b").await.unwrap();
    match next(&mut changes).await {
        ConfigChange::Delete { key, .. } => assert_eq!(key, "open/b"),
        other => panic!("expected open/b deleted, got {other:?}"),
    }
    // A watch resumed after open/b's revision starts with what came after it.
    let mut resumed = b.watch_config(NS, "open/", b_put.revision).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.kind, EventKind::Put as i32);
    assert_eq!(event.config.unwrap().key, "open/a");
}

async fn discovery_and_registration_helpers<B: NamingBackend + Clone>(b: &B) {
    let discover = RegistryDiscover::new(b.clone(), NS);
    let mut rx = discover.subscribe("search").unwrap();
    let reg = Registration::start(
        b.clone(),
        instance("search", "s1", 7301, 0),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    rx.wait_for(|e| e.resolved && e.instances.len() == 1)
        .await
        .unwrap();
    // Heartbeats keep it past several TTLs.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(ids(b, "search").await, ["s1"]);
    reg.deregister().await.unwrap();
    rx.wait_for(|e| e.instances.is_empty()).await.unwrap();
    eventually("instance gone", || async {
        ids(b, "search").await.is_empty()
    })
    .await;
}

macro_rules! parity {
    ($($name:ident),* $(,)?) => {
        mod keel_backend {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let fixture = keel().await;
                    super::$name(&fixture.handle).await;
                }
            )*
        }
        mod etcd_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(fixture) = keel_registry::testing::etcd("the etcd half of the parity suite").await else {
                        return;
                    };
                    super::$name(&fixture.backend).await;
                }
            )*
        }
    };
}

parity!(
    registration_list_and_watch,
    leases_expire_unless_kept_alive,
    locks_exclude_and_fence,
    elections_have_one_leader_at_a_time,
    config_is_versioned,
    config_changes_are_followed,
    discovery_and_registration_helpers,
);
