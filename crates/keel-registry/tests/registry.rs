//! The registry from outside: over the network through the generated client where the wire
//! matters, and in process (calling the service trait) where paused time makes timers exact.

use std::time::Duration;

use keel_governance::Discover;
use keel_registry::proto::{
    self, CheckFenceRequest, ConfigRef, EventKind, GrantLeaseRequest, Instance, InstanceRef,
    LeaseRef, LockRef, LockRequest, PutConfigRequest, RegisterRequest, ServiceRef, UnlockRequest,
    WatchEvent, WatchRequest, watch_request::Target,
};
use keel_registry::{Registration, Registry, RegistryConfig, RegistryDiscover, RegistryHandle};
use keel_rpc::{Channel, ChannelConfig, Code, Context, Server, ServerConfig, Status};
use keel_store::SyncPolicy;
use proto::Registry as _;
use tokio::net::TcpListener;

fn ctx() -> Context {
    Context::new(None)
}

fn instance(service: &str, id: &str, port: u16, lease_id: u64) -> Instance {
    Instance {
        namespace: "prod".into(),
        service: service.into(),
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        lease_id,
        ..Instance::default()
    }
}

async fn grant(r: &Registry, ttl_ms: u64) -> u64 {
    r.grant_lease(ctx(), GrantLeaseRequest { ttl_ms })
        .await
        .unwrap()
        .id
}

async fn register(r: &Registry, i: Instance) -> u64 {
    r.register(ctx(), RegisterRequest { instance: Some(i) })
        .await
        .unwrap()
        .revision
}

async fn snapshot(r: &Registry, service: &str) -> proto::ServiceSnapshot {
    r.list_instances(
        ctx(),
        ServiceRef {
            namespace: "prod".into(),
            service: service.into(),
        },
    )
    .await
    .unwrap()
}

async fn ids(r: &Registry, service: &str) -> Vec<String> {
    snapshot(r, service)
        .await
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect()
}

/// Grants a one-minute lease over the network.
async fn remote_lease(handle: &RegistryHandle) -> u64 {
    handle
        .client()
        .grant_lease(&GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .id
}

/// Registers an instance over the network.
async fn remote_register(handle: &RegistryHandle, instance: Instance) {
    handle
        .client()
        .register(&RegisterRequest {
            instance: Some(instance),
        })
        .await
        .unwrap();
}

/// Registers instances i0..i3 of service `api`, each under its own 1 s lease.
async fn four_instances_one_lease_each(r: &Registry) -> Vec<u64> {
    let mut leases = Vec::new();
    for i in 0..4u16 {
        let lease = grant(r, 1000).await;
        register(r, instance("api", &format!("i{i}"), 8000 + i, lease)).await;
        leases.push(lease);
    }
    leases
}

/// Renews `leases` every 300 ms, `rounds` times.
async fn heartbeat(r: &Registry, leases: &[u64], rounds: usize) {
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for &id in leases {
            r.keep_alive(ctx(), LeaseRef { id }).await.unwrap();
        }
    }
}

async fn watch(r: &Registry, service: &str, after: u64) -> keel_rpc::ResponseStream<WatchEvent> {
    r.watch(
        ctx(),
        WatchRequest {
            namespace: "prod".into(),
            target: Some(Target::Service(service.into())),
            after_revision: after,
        },
    )
    .await
    .unwrap()
}

async fn next(stream: &mut keel_rpc::ResponseStream<WatchEvent>) -> WatchEvent {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch event")
        .expect("stream open")
        .expect("event ok")
}

/// A registry served on a port, with a handle to it.
struct Served {
    registry: Registry,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    async fn start(config: RegistryConfig) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Served::start_on(listener, config).await
    }

    async fn start_on(listener: TcpListener, config: RegistryConfig) -> Served {
        let registry = Registry::open(config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = Server::builder()
            .config(ServerConfig {
                shutdown_grace: Duration::from_millis(200),
                ..ServerConfig::default()
            })
            .add_service(registry.service())
            .build();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        Served {
            registry,
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn handle(&self) -> RegistryHandle {
        let config = ChannelConfig {
            backoff: keel_rpc::client::Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(100),
                ..keel_rpc::client::Backoff::default()
            },
            ..ChannelConfig::default()
        };
        RegistryHandle::new(
            Channel::connect(self.addr.to_string(), config)
                .await
                .unwrap(),
        )
    }

    async fn stop(mut self) -> Registry {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
        self.registry.close().await.unwrap();
        self.registry
    }
}

#[tokio::test]
async fn register_list_watch_and_deregister_over_the_network() {
    let served = Served::start(RegistryConfig::default()).await;
    let handle = served.handle().await;
    let client = handle.client();
    let lease = client
        .grant_lease(&GrantLeaseRequest { ttl_ms: 10_000 })
        .await
        .unwrap();
    for (id, port) in [("a", 7101), ("b", 7102)] {
        client
            .register(&RegisterRequest {
                instance: Some(instance("orders", id, port, lease.id)),
            })
            .await
            .unwrap();
    }
    let list = client
        .list_instances(&ServiceRef {
            namespace: "prod".into(),
            service: "orders".into(),
        })
        .await
        .unwrap();
    assert_eq!(list.instances.len(), 2);
    assert_eq!(list.instances[0].weight, 100, "weight defaults to 100");

    let mut stream = client
        .watch(&WatchRequest {
            namespace: "prod".into(),
            target: Some(Target::Service("orders".into())),
            after_revision: 0,
        })
        .await
        .unwrap();
    let reset = stream.message().await.unwrap().unwrap();
    assert_eq!(reset.kind, EventKind::Reset as i32);
    assert_eq!(reset.instances.len(), 2);
    assert!(!reset.compacted);

    client
        .register(&RegisterRequest {
            instance: Some(instance("orders", "c", 7103, lease.id)),
        })
        .await
        .unwrap();
    let put = stream.message().await.unwrap().unwrap();
    assert_eq!(put.kind, EventKind::Put as i32);
    assert_eq!(put.instance.unwrap().id, "c");
    assert!(put.revision > reset.revision);

    client
        .deregister(&InstanceRef {
            namespace: "prod".into(),
            service: "orders".into(),
            id: "a".into(),
        })
        .await
        .unwrap();
    let del = stream.message().await.unwrap().unwrap();
    assert_eq!(del.kind, EventKind::Delete as i32);
    assert_eq!(del.instance.unwrap().id, "a");
    drop(stream);
    served.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let lease = grant(&r, 5000).await;
    let cases = [
        (instance("orders", "a", 0, lease), "port"),
        (
            Instance {
                address: "nohost".into(),
                ..instance("orders", "a", 1, lease)
            },
            "host:port",
        ),
        (instance("", "a", 1, lease), "service is empty"),
        (instance("or ders", "a", 1, lease), "contains ' '"),
        (
            Instance {
                weight: 20_000,
                ..instance("orders", "a", 1, lease)
            },
            "weight",
        ),
        // A status this registry does not know: every reader would fail on it (the JSON
        // mapping has no name for it).
        (
            Instance {
                status: 7,
                ..instance("orders", "a", 1, lease)
            },
            "status 7",
        ),
        (instance("orders", "a", 1, 999), "lease 999"),
    ];
    for (i, want) in cases {
        let err = r
            .register(ctx(), RegisterRequest { instance: Some(i) })
            .await
            .unwrap_err();
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::NotFound),
            "{err}"
        );
        assert!(err.message().contains(want), "{err} should mention {want}");
    }
    let err = r
        .grant_lease(ctx(), GrantLeaseRequest { ttl_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_removes_its_instances_and_watchers_are_told() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let kept = grant(&r, 2000).await;
    let lapsing = grant(&r, 2000).await;
    register(&r, instance("orders", "kept", 1, kept)).await;
    register(&r, instance("orders", "lapsing", 2, lapsing)).await;
    let mut stream = watch(&r, "orders", 0).await;
    assert_eq!(next(&mut stream).await.instances.len(), 2);

    let start = tokio::time::Instant::now();
    // Heartbeats for one lease only, every 500 ms, for 5 s.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        r.keep_alive(ctx(), LeaseRef { id: kept }).await.unwrap();
    }
    assert_eq!(ids(&r, "orders").await, ["kept"]);
    let del = next(&mut stream).await;
    assert_eq!(del.kind, EventKind::Delete as i32);
    assert_eq!(del.instance.unwrap().id, "lapsing");
    // Expired on time: after its 2 s TTL, well before the test's 5 s.
    let expired_after = start.elapsed();
    assert!(expired_after >= Duration::from_secs(2), "{expired_after:?}");
    // A heartbeat on the expired lease says so, so the owner can register again.
    let err = r
        .keep_alive(ctx(), LeaseRef { id: lapsing })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_is_precise() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let lease = grant(&r, 2000).await;
    register(&r, instance("svc", "x", 1, lease)).await;
    let mut stream = watch(&r, "svc", 0).await;
    next(&mut stream).await;
    let start = tokio::time::Instant::now();
    let del = next(&mut stream).await;
    assert_eq!(del.kind, EventKind::Delete as i32);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(2000) && took <= Duration::from_millis(2010),
        "expired after {took:?} for a 2 s TTL"
    );
}

#[tokio::test]
async fn watches_resume_from_a_revision_or_get_a_compacted_reset() {
    let r = Registry::open(RegistryConfig {
        history_limit: 8,
        ..RegistryConfig::default()
    })
    .await
    .unwrap();
    let lease = grant(&r, 60_000).await;
    let first = register(&r, instance("svc", "i0", 1, lease)).await;
    for i in 1..4 {
        register(&r, instance("svc", &format!("i{i}"), 1 + i, lease)).await;
    }
    // Resuming after the first registration: exactly the three missed changes, in order.
    let mut stream = watch(&r, "svc", first).await;
    for i in 1..4 {
        let e = next(&mut stream).await;
        assert_eq!(e.kind, EventKind::Put as i32);
        assert_eq!(e.instance.unwrap().id, format!("i{i}"));
    }
    // Push the first registration out of the 8-change history.
    for i in 4..20 {
        register(&r, instance("svc", &format!("i{i}"), 1 + i, lease)).await;
    }
    let mut stream = watch(&r, "svc", first).await;
    let reset = next(&mut stream).await;
    assert_eq!(reset.kind, EventKind::Reset as i32);
    assert!(reset.compacted, "a reset replacing lost history says so");
    assert_eq!(reset.instances.len(), 20);
    // And the stream carries on live after it.
    register(&r, instance("svc", "late", 99, lease)).await;
    assert_eq!(next(&mut stream).await.instance.unwrap().id, "late");
    // A revision from the future (a registry whose data was replaced) also resets.
    let mut stream = watch(&r, "svc", 1_000_000).await;
    let reset = next(&mut stream).await;
    assert!(reset.compacted && reset.kind == EventKind::Reset as i32);
}

#[tokio::test]
async fn locks_exclude_each_other_and_fencing_refuses_a_stale_holder() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let a = grant(&r, 60_000).await;
    let b = grant(&r, 60_000).await;
    let req = |lease_id, no_wait| LockRequest {
        namespace: "prod".into(),
        name: "billing-leader".into(),
        lease_id,
        value: format!("node-{lease_id}").into(),
        no_wait,
    };
    let held = r.lock(ctx(), req(a, false)).await.unwrap();
    assert!(held.token > 0);
    // B cannot have it while A does.
    let err = r.lock(ctx(), req(b, true)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let deadline = Context::new(Some(
        tokio::time::Instant::now() + Duration::from_millis(50),
    ));
    let err = r.lock(deadline, req(b, false)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    // B waits; A's release hands it over with a larger token.
    let waiting = {
        let r = r.clone();
        tokio::spawn(async move { r.lock(ctx(), req(b, false)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "B must wait while A holds the lock");
    r.unlock(
        ctx(),
        UnlockRequest {
            namespace: "prod".into(),
            name: "billing-leader".into(),
            token: held.token,
        },
    )
    .await
    .unwrap();
    let b_holds = waiting.await.unwrap().unwrap();
    assert_eq!(b_holds.lease_id, b);
    assert!(b_holds.token > held.token, "fencing tokens only grow");
    assert_eq!(&b_holds.value[..], format!("node-{b}").as_bytes());
    let leader = r
        .holder(
            ctx(),
            LockRef {
                namespace: "prod".into(),
                name: "billing-leader".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(leader.token, b_holds.token);
    // A resource that checks tokens refuses A's now.
    let check = |token| CheckFenceRequest {
        namespace: "prod".into(),
        name: "billing-leader".into(),
        token,
    };
    assert!(
        !r.check_fence(ctx(), check(held.token))
            .await
            .unwrap()
            .current
    );
    assert!(
        r.check_fence(ctx(), check(b_holds.token))
            .await
            .unwrap()
            .current
    );
    // A stale holder cannot release the lock from under the new one.
    let err = r
        .unlock(
            ctx(),
            UnlockRequest {
                namespace: "prod".into(),
                name: "billing-leader".into(),
                token: held.token,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Revoking B's lease frees the lock.
    r.revoke_lease(ctx(), LeaseRef { id: b }).await.unwrap();
    assert!(
        !r.check_fence(ctx(), check(b_holds.token))
            .await
            .unwrap()
            .current
    );
}

#[tokio::test(start_paused = true)]
async fn many_leases_lapsing_at_once_are_kept_listed_under_protection() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let leases = four_instances_one_lease_each(&r).await;
    let mut stream = watch(&r, "api", 0).await;
    next(&mut stream).await;
    // Only i0 keeps heartbeating: three of four lapse together, like a network partition.
    heartbeat(&r, &leases[..1], 6).await;
    let snap = snapshot(&r, "api").await;
    assert!(snap.protected);
    assert_eq!(snap.instances.len(), 4, "nothing removed");
    assert_eq!(snap.instances.iter().filter(|i| i.lease_expired).count(), 3);
    assert_eq!(
        r.protected_services(),
        vec![("prod".into(), "api".into(), 3)]
    );
    let mut saw_protection = false;
    while let Ok(Some(Ok(e))) = tokio::time::timeout(
        Duration::from_millis(10),
        futures_util::StreamExt::next(&mut stream),
    )
    .await
    {
        saw_protection |= e.kind == EventKind::Protection as i32 && e.protected;
    }
    assert!(saw_protection, "watchers are told the service is protected");

    // The partition heals: the instances register again under new leases; protection ends.
    let lease = grant(&r, 60_000).await;
    for i in 1..4u16 {
        register(&r, instance("api", &format!("i{i}"), 8000 + i, lease)).await;
    }
    heartbeat(&r, &leases[..1], 5).await;
    let snap = snapshot(&r, "api").await;
    assert!(!snap.protected);
    assert_eq!(snap.instances.len(), 4);
    assert!(snap.instances.iter().all(|i| !i.lease_expired));
}

#[tokio::test(start_paused = true)]
async fn a_single_lapsed_lease_is_removed_not_protected() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let leases = four_instances_one_lease_each(&r).await;
    heartbeat(&r, &leases[1..], 6).await;
    assert_eq!(ids(&r, "api").await, ["i1", "i2", "i3"]);
    assert!(r.protected_services().is_empty());
}

#[tokio::test]
async fn writes_need_the_token_when_one_is_set() {
    let served = Served::start(RegistryConfig {
        token: Some("s3cret".into()),
        ..RegistryConfig::default()
    })
    .await;
    let handle = served.handle().await;
    let err = handle
        .client()
        .grant_lease(&GrantLeaseRequest { ttl_ms: 1000 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let wrong = handle.clone().with_token("nope");
    let err = wrong
        .client()
        .grant_lease_with(&GrantLeaseRequest { ttl_ms: 1000 }, wrong.options())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let right = handle.clone().with_token("s3cret");
    right
        .client()
        .grant_lease_with(&GrantLeaseRequest { ttl_ms: 1000 }, right.options())
        .await
        .unwrap();
    // Reads are open.
    handle
        .client()
        .list_instances(&ServiceRef::default())
        .await
        .unwrap();
    // The same over HTTP/JSON on the same port.
    let http = |auth: &str| {
        let addr = served.addr;
        let auth = auth.to_owned();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let body = r#"{"ttlMs":"1000"}"#;
            let req = format!(
                "POST /keel.registry.v1.Registry/GrantLease HTTP/1.1\r\nHost: r\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let out = http("").await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    let out = http("Authorization: Bearer s3cret\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"id\""), "{out}");
    served.stop().await;
}

#[tokio::test]
async fn config_is_versioned_and_compare_and_set() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let put = |value: &str, expected| PutConfigRequest {
        namespace: "prod".into(),
        key: "orders/limits".into(),
        value: value.to_owned().into(),
        expected_version: expected,
    };
    let v1 = r.put_config(ctx(), put("a", Some(0))).await.unwrap();
    assert_eq!(v1.version, 1);
    let err = r.put_config(ctx(), put("b", Some(0))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let v2 = r.put_config(ctx(), put("b", Some(1))).await.unwrap();
    assert_eq!(v2.version, 2);
    let got = r
        .get_config(
            ctx(),
            ConfigRef {
                namespace: "prod".into(),
                key: "orders/limits".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(&got.value[..], b"b");
    let mut stream = r
        .watch(
            ctx(),
            WatchRequest {
                namespace: "prod".into(),
                target: Some(Target::ConfigPrefix("orders/".into())),
                after_revision: v1.revision,
            },
        )
        .await
        .unwrap();
    let e = next(&mut stream).await;
    assert_eq!(e.config.unwrap().version, 2);
}

fn durable_config(dir: &std::path::Path) -> RegistryConfig {
    RegistryConfig {
        data_dir: Some(dir.to_owned()),
        sync: SyncPolicy::Always,
        ..RegistryConfig::default()
    }
}

#[tokio::test]
async fn state_survives_a_restart_and_snapshots_keep_the_journal_short() {
    let dir = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        snapshot_every: 25,
        ..durable_config(dir.path())
    };
    let r = Registry::open(config.clone()).await.unwrap();
    let lease = grant(&r, 60_000).await;
    for i in 0..100u16 {
        register(&r, instance("svc", &format!("i{i:03}"), 1000 + i, lease)).await;
    }
    r.put_config(
        ctx(),
        PutConfigRequest {
            namespace: "prod".into(),
            key: "k".into(),
            value: "v".into(),
            expected_version: None,
        },
    )
    .await
    .unwrap();
    let held = r
        .lock(
            ctx(),
            LockRequest {
                namespace: "prod".into(),
                name: "l".into(),
                lease_id: lease,
                value: Default::default(),
                no_wait: true,
            },
        )
        .await
        .unwrap();
    let revision = r.revision();
    // Wait for the background snapshot to land before closing.
    for _ in 0..200 {
        if r.stats()
            .snapshots
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        r.stats()
            .snapshots
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    r.close().await.unwrap();
    drop(r);

    let r = Registry::open(config).await.unwrap();
    assert_eq!(r.revision(), revision);
    assert_eq!(ids(&r, "svc").await.len(), 100);
    let check = r
        .check_fence(
            ctx(),
            CheckFenceRequest {
                namespace: "prod".into(),
                name: "l".into(),
                token: held.token,
            },
        )
        .await
        .unwrap();
    assert!(check.current, "the lock and its token survive the restart");
    // The lease survived too (with a fresh TTL), and new leases do not reuse its id.
    r.keep_alive(ctx(), LeaseRef { id: lease }).await.unwrap();
    assert!(grant(&r, 1000).await > lease);
}

#[tokio::test]
async fn a_torn_journal_tail_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(durable_config(dir.path())).await.unwrap();
    let lease = grant(&r, 60_000).await;
    register(&r, instance("svc", "a", 1, lease)).await;
    register(&r, instance("svc", "b", 2, lease)).await;
    r.close().await.unwrap();
    drop(r);
    // A crash in the middle of the next write: half a record at the end of the journal.
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0]);
    std::fs::write(&seg, bytes).unwrap();
    let r = Registry::open(durable_config(dir.path())).await.unwrap();
    assert_eq!(ids(&r, "svc").await, ["a", "b"]);
    register(&r, instance("svc", "c", 3, lease)).await;
    assert_eq!(ids(&r, "svc").await, ["a", "b", "c"]);
}

#[tokio::test]
async fn discovery_follows_changes_keeps_the_last_list_and_starts_from_its_cache() {
    let cache = tempfile::tempdir().unwrap();
    let served = Served::start(RegistryConfig::default()).await;
    let addr = served.addr;
    let handle = served.handle().await;
    let lease = remote_lease(&handle).await;
    remote_register(&handle, instance("orders", "a", 7201, lease)).await;
    let discover = RegistryDiscover::new(handle.clone(), "prod").with_cache_dir(cache.path());
    let mut rx = discover.subscribe("orders").unwrap();
    let got = rx
        .wait_for(|e| e.resolved && !e.stale && e.instances.len() == 1)
        .await
        .unwrap()
        .clone();
    assert_eq!(got.instances[0].address, "127.0.0.1:7201");

    remote_register(&handle, instance("orders", "b", 7202, lease)).await;
    rx.wait_for(|e| e.instances.len() == 2).await.unwrap();

    // The registry goes away: the list stays, marked stale.
    served.stop().await;
    let stale = rx.wait_for(|e| e.stale).await.unwrap().clone();
    assert_eq!(stale.instances.len(), 2);

    // A process starting now (the registry still down) begins with the cached list.
    let channel = Channel::with_config(addr.to_string(), ChannelConfig::default());
    let fresh =
        RegistryDiscover::new(RegistryHandle::new(channel), "prod").with_cache_dir(cache.path());
    let rx2 = fresh.subscribe("orders").unwrap();
    let cached = rx2.borrow().clone();
    assert!(cached.resolved && cached.stale);
    assert_eq!(cached.instances.len(), 2);
    drop(discover);
}

#[tokio::test]
async fn discovery_resumes_after_the_registry_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Served::start_on(listener, durable_config(dir.path())).await;
    let handle = served.handle().await;
    let lease = remote_lease(&handle).await;
    remote_register(&handle, instance("orders", "a", 7301, lease)).await;
    let discover = RegistryDiscover::new(handle.clone(), "prod");
    let mut rx = discover.subscribe("orders").unwrap();
    rx.wait_for(|e| e.instances.len() == 1 && !e.stale)
        .await
        .unwrap();
    served.stop().await;
    rx.wait_for(|e| e.stale).await.unwrap();

    // Same address, same data: the watch resumes and sees changes made after the restart.
    let listener = TcpListener::bind(addr).await.unwrap();
    let served = Served::start_on(listener, durable_config(dir.path())).await;
    let handle2 = served.handle().await;
    remote_register(&handle2, instance("orders", "b", 7302, lease)).await;
    let back = rx
        .wait_for(|e| !e.stale && e.instances.len() == 2)
        .await
        .unwrap()
        .clone();
    assert_eq!(back.instances[1].id, "b");
    served.stop().await;
}

#[tokio::test]
async fn a_registration_heartbeats_re_registers_after_losing_its_lease_and_deregisters() {
    let served = Served::start(RegistryConfig {
        min_ttl: Duration::from_millis(100),
        ..RegistryConfig::default()
    })
    .await;
    let handle = served.handle().await;
    let reg = Registration::start(
        handle.clone(),
        instance("pay", "p1", 7401, 0),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let first_lease = reg.lease_id();
    // Heartbeats keep it alive well past its TTL.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(ids(&served.registry, "pay").await, ["p1"]);
    // The lease is lost (as after a long partition): the registration notices and starts over.
    served
        .registry
        .revoke_lease(ctx(), LeaseRef { id: first_lease })
        .await
        .unwrap();
    assert!(ids(&served.registry, "pay").await.is_empty());
    let mut state = reg.watch_state();
    state
        .wait_for(|s| matches!(s, keel_registry::client::RegistrationState::Registered { lease_id } if *lease_id != first_lease))
        .await
        .unwrap();
    assert_eq!(ids(&served.registry, "pay").await, ["p1"]);
    // Graceful shutdown removes it at once.
    reg.deregister().await.unwrap();
    assert!(ids(&served.registry, "pay").await.is_empty());
    served.stop().await;
}

#[tokio::test]
async fn status_errors_from_the_service_keep_their_codes_over_the_wire() {
    let served = Served::start(RegistryConfig::default()).await;
    let handle = served.handle().await;
    let err: Status = handle
        .client()
        .keep_alive(&LeaseRef { id: 12345 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("12345"));
    served.stop().await;
}

#[tokio::test]
async fn callers_keep_calling_with_the_cached_list_while_the_registry_is_down() {
    use keel_governance::{ServiceChannel, ServiceChannelConfig};
    // A real service instance, registered in a real registry.
    let echo_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo_listener.local_addr().unwrap();
    let echo = Server::builder()
        .add_service(keel_echo::EchoServer::new(keel_echo::EchoService))
        .build();
    tokio::spawn(echo.serve(echo_listener, std::future::pending::<()>()));

    let served = Served::start(RegistryConfig::default()).await;
    let handle = served.handle().await;
    let lease = remote_lease(&handle).await;
    let mut i = instance("echo", "e1", echo_addr.port(), lease);
    i.address = echo_addr.to_string();
    remote_register(&handle, i).await;

    let discover = RegistryDiscover::new(handle.clone(), "prod");
    let channel = ServiceChannel::new(&discover, "echo", ServiceChannelConfig::default()).unwrap();
    let client = keel_echo::EchoClient::new(channel);
    let request = keel_echo::EchoRequest {
        message: "hi".into(),
        payload: Default::default(),
    };
    assert_eq!(client.echo(&request).await.unwrap().message, "hi");

    // The registry dies. Calls go on with the last list.
    served.stop().await;
    let mut rx = discover.subscribe("echo").unwrap();
    rx.wait_for(|e| e.stale).await.unwrap();
    for _ in 0..20 {
        assert_eq!(client.echo(&request).await.unwrap().message, "hi");
    }
}

/// A write's reply carries its own revision, also when it hands a lock to a waiter: the
/// hand-over is the next revision, so a client that watches from its write's revision sees
/// who holds the lock now.
#[tokio::test]
async fn an_unlock_or_revoke_that_hands_a_lock_over_replies_with_its_own_revision() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let req = |lease_id| LockRequest {
        namespace: "prod".into(),
        name: "l".into(),
        lease_id,
        value: Default::default(),
        no_wait: false,
    };
    let lock_ref = || LockRef {
        namespace: "prod".into(),
        name: "l".into(),
    };
    for by_revoke in [false, true] {
        let a = grant(&r, 60_000).await;
        let b = grant(&r, 60_000).await;
        let held = r.lock(ctx(), req(a)).await.unwrap();
        let waiting = {
            let r = r.clone();
            tokio::spawn(async move { r.lock(ctx(), req(b)).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut events = r
            .watch(
                ctx(),
                WatchRequest {
                    namespace: "prod".into(),
                    after_revision: r.revision(),
                    target: Some(Target::Lock("l".into())),
                },
            )
            .await
            .unwrap();
        let reply = if by_revoke {
            r.revoke_lease(ctx(), LeaseRef { id: a }).await.unwrap()
        } else {
            r.unlock(
                ctx(),
                UnlockRequest {
                    namespace: "prod".into(),
                    name: "l".into(),
                    token: held.token,
                },
            )
            .await
            .unwrap()
        };
        let b_holds = waiting.await.unwrap().unwrap();
        assert_eq!(
            b_holds.revision,
            reply.revision + 1,
            "the release is the reply's revision, B's acquisition the next (revoke: {by_revoke})"
        );
        assert_eq!(r.holder(ctx(), lock_ref()).await.unwrap().lease_id, b);
        // Watching from the reply's revision shows B taking the lock.
        let mut resumed = r
            .watch(
                ctx(),
                WatchRequest {
                    namespace: "prod".into(),
                    after_revision: reply.revision,
                    target: Some(Target::Lock("l".into())),
                },
            )
            .await
            .unwrap();
        let event = next(&mut resumed).await;
        assert_eq!(event.revision, b_holds.revision);
        // The live watch saw the release at the reply's revision, then the acquisition.
        let release = next(&mut events).await;
        assert_eq!(release.revision, reply.revision);
        r.revoke_lease(ctx(), LeaseRef { id: b }).await.unwrap();
    }
}

/// Instance metadata is bounded in bytes as well as in entries, config keys follow their own
/// documented rule, and errors never echo an unbounded input.
#[tokio::test]
async fn metadata_is_bounded_and_errors_do_not_echo_big_inputs() {
    let r = Registry::open(RegistryConfig::default()).await.unwrap();
    let mut big = instance("api", "a", 9000, 0);
    big.metadata.insert("blob".into(), "x".repeat(1 << 20));
    let err = r
        .register(
            ctx(),
            RegisterRequest {
                instance: Some(big),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("512"), "{}", err.message());
    assert!(err.message().len() < 300, "{}", err.message().len());
    let mut long_key = instance("api", "a", 9000, 0);
    long_key.metadata.insert("k".repeat(129), "v".into());
    let err = r
        .register(
            ctx(),
            RegisterRequest {
                instance: Some(long_key),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut fine = instance("api", "a", 9000, 0);
    fine.metadata.insert("zone-hint".into(), "v".repeat(512));
    register(&r, fine).await;

    // A 1 MiB key asked for: not found, without the key echoed back.
    let huge = "k".repeat(1 << 20);
    let err = r
        .get_config(
            ctx(),
            ConfigRef {
                namespace: "prod".into(),
                key: huge.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().len() < 300, "{}", err.message().len());
    let err = r
        .deregister(
            ctx(),
            InstanceRef {
                namespace: "prod".into(),
                service: "api".into(),
                id: huge,
            },
        )
        .await
        .unwrap_err();
    assert!(err.message().len() < 300, "{}", err.message().len());
    // Config keys may hold spaces (as docs/registry.md states); control characters are refused.
    let put = |key: &str| PutConfigRequest {
        namespace: "prod".into(),
        key: key.into(),
        value: b"v".to_vec().into(),
        expected_version: None,
    };
    r.put_config(ctx(), put("feature flags/new checkout"))
        .await
        .unwrap();
    let err = r.put_config(ctx(), put("bad\nkey")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_registry_that_keeps_nothing_on_disk_never_grants_an_id_twice() {
    // A client may still hold (and revoke) a lease granted before a restart: the restarted
    // registry must not give that id to somebody else.
    let before = Registry::open(RegistryConfig::default()).await.unwrap();
    let first = grant(&before, 5000).await;
    drop(before);
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let after = Registry::open(RegistryConfig::default()).await.unwrap();
    let second = grant(&after, 5000).await;
    assert!(
        second > first,
        "lease {second} granted again after a restart (first {first})"
    );
}
