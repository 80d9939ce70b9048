//! The ownership loop of an inventory shard (`keel_seckill::owner`) against a real Keel
//! registry and a real etcd (started by the test), and the NATS server on 127.0.0.1:4222 (or
//! `KEEL_NATS_URL`): one owner at a time,
//! a partition between the owner and the registry that makes it step down and a standby take
//! over, a resignation that hands the shard over at once, and an owner that stops answering
//! deposed by a standby before its lease runs out. Skipped with a message when no NATS server
//! answers, failed instead when `KEEL_REQUIRE_SERVICES=1`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_registry::{EtcdBackend, NamingBackend, RegistryHandle};
use keel_seckill::InventoryService;
use keel_seckill::owner::{self, Ownership, Role};
use keel_store::testing::{DeleteStreams, nats_up, nats_url, unique_stream};
use keel_store::{LogTarget, StreamOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_millis(1000);

/// A TCP relay to `upstream` that can be cut: while cut, its connections are closed and new
/// ones are closed at once, as if the link were down.
struct Relay {
    address: String,
    cut: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
}

impl Relay {
    async fn start(upstream: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let relay = Relay {
            address,
            cut: cut.clone(),
            cuts: cuts.clone(),
        };
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                let mut cutting = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cutting.changed() => {}
                    }
                });
            }
        });
        relay
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            self.cuts.send_modify(|n| *n += 1);
        }
    }
}

struct Candidate {
    service: InventoryService,
    role: watch::Receiver<Role>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _alive: Alive,
}

/// Answers every request on a port of its own with 200, as a Keel process answers
/// `GET /health` on its address, until dropped.
struct Alive {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Alive {
    fn start() -> Alive {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = conn.read(&mut request).await;
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        Alive { port, task }
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn keel_backend(address: &str) -> RegistryHandle {
    RegistryHandle::new(keel_rpc::Channel::with_config(
        address.to_owned(),
        keel_rpc::ChannelConfig::default(),
    ))
    .with_timeout(Duration::from_millis(500))
}

async fn etcd_backend(endpoint: &str) -> EtcdBackend {
    EtcdBackend::connect(&[endpoint.to_owned()], "/keel-test")
        .await
        .unwrap()
}

fn candidate<B: NamingBackend + Clone>(backend: B, stream: &StreamOptions) -> Candidate {
    let alive = Alive::start();
    let port = alive.port;
    let service = InventoryService::standby();
    let (tx, role) = watch::channel(Role::Standby);
    let stop = CancellationToken::new();
    let task = tokio::spawn(owner::run(
        backend,
        Ownership {
            shard: "inv-0".into(),
            target: LogTarget::Stream(stream.clone()),
            lease_ttl: TTL,
            address: format!("127.0.0.1:{port}").parse().unwrap(),
        },
        service.clone(),
        tx,
        stop.clone(),
    ));
    Candidate {
        service,
        role,
        stop,
        task,
        _alive: alive,
    }
}

/// Waits (up to 15 s) until `role` satisfies `want`; returns it.
async fn until(role: &mut watch::Receiver<Role>, want: impl Fn(&Role) -> bool) -> Role {
    let waited = tokio::time::timeout(Duration::from_secs(15), role.wait_for(|r| want(r)))
        .await
        .map(|r| r.unwrap().clone());
    match waited {
        Ok(r) => r,
        Err(_) => panic!("role stayed {:?}", *role.borrow()),
    }
}

fn token(role: &Role) -> u64 {
    match role {
        Role::Owner { token } => *token,
        Role::Standby => panic!("not the owner"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_keels_registry_a_partitioned_owner_steps_down_and_a_standby_takes_over() {
    if !nats_up("on_keels_registry_a_partitioned_owner_steps_down_and_a_standby_takes_over") {
        return;
    }
    let registry = common::serve_registry().await;
    let relay = Relay::start(registry.clone()).await;
    let a = keel_backend(&relay.address);
    let b = keel_backend(&registry);
    partition_and_handover(a, b, &relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_a_partitioned_owner_steps_down_and_a_standby_takes_over() {
    let test = "on_etcd_a_partitioned_owner_steps_down_and_a_standby_takes_over";
    if !nats_up(test) {
        return;
    }
    let Some(etcd) = keel_registry::testing::etcd(test).await else {
        return;
    };
    let relay = Relay::start(etcd.endpoint.trim_start_matches("http://").to_owned()).await;
    let a = etcd_backend(&format!("http://{}", relay.address)).await;
    let b = etcd_backend(&etcd.endpoint).await;
    partition_and_handover(a, b, &relay).await;
}

/// A (reaching the naming backend through `relay`) owns the shard and sells; the relay is
/// cut; A steps down and B takes over with everything A sold; the link comes back and A
/// stands by; B resigns and A takes over at once.
async fn partition_and_handover<B: NamingBackend + Clone>(a: B, b: B, relay: &Relay) {
    let name = unique_stream("ownership");
    let _delete = DeleteStreams::new(vec![name.clone()]);
    let stream = StreamOptions::parse(&nats_url(), name).unwrap();

    let mut a = candidate(a, &stream);
    let a_token = token(&until(&mut a.role, |r| *r != Role::Standby).await);
    let mut b = candidate(b, &stream);
    let a_inventory = a.service.current().expect("the owner serves");
    a_inventory.create_item("phone", vec![50], 1).await.unwrap();
    let mut sold = Vec::new();
    for u in 0..10 {
        sold.push(
            a_inventory
                .reserve("phone", &format!("u{u}"), "r1")
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // One owner at a time: B waits in the election.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(*b.role.borrow(), Role::Standby);
    assert!(b.service.current().is_none());

    // The link between A and the registry goes down: A steps down on its own once its lease
    // may have run out, and B is elected, replays and serves.
    relay.set_cut(true);
    until(&mut a.role, |r| *r == Role::Standby).await;
    assert!(a.service.current().is_none());
    let b_token = token(&until(&mut b.role, |r| *r != Role::Standby).await);
    assert!(b_token > a_token, "{b_token} after {a_token}");
    // What A had, A can no longer sell (its journal is closed or fenced).
    assert!(a_inventory.reserve("phone", "late", "r1").await.is_err());
    let b_inventory = b.service.current().unwrap();
    for r in &sold {
        let again = b_inventory
            .reserve("phone", &r.user_id, "r1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.reservation_id, r.reservation_id);
    }
    let fresh = b_inventory
        .reserve("phone", "u-new", "r1")
        .await
        .unwrap()
        .unwrap();
    assert!(fresh.reservation_id > sold.last().unwrap().reservation_id);
    assert_eq!(b_inventory.stock("phone").unwrap().left, 39);
    assert_eq!(b_inventory.owner().map(|o| o.1), Some(b_token));

    // The link comes back: A is a standby behind B.
    relay.set_cut(false);
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(*a.role.borrow(), Role::Standby);
    assert_eq!(*b.role.borrow(), Role::Owner { token: b_token });

    // B stops: it resigns, and A takes the shard over at once with everything B sold.
    b.stop.cancel();
    b.task.await.unwrap();
    let started = tokio::time::Instant::now();
    let a_again = token(&until(&mut a.role, |r| *r != Role::Standby).await);
    assert!(a_again > b_token);
    eprintln!(
        "handover after a resignation: {} ms",
        started.elapsed().as_millis()
    );
    let a_inventory = a.service.current().unwrap();
    assert_eq!(a_inventory.stock("phone").unwrap().left, 39);
    let known = a_inventory
        .reserve("phone", "u-new", "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(known.reservation_id, fresh.reservation_id);
    a.stop.cancel();
    a.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_keels_registry_an_owner_that_stops_answering_is_deposed() {
    if !nats_up("on_keels_registry_an_owner_that_stops_answering_is_deposed") {
        return;
    }
    let registry = common::serve_registry().await;
    deposed_when_silent(keel_backend(&registry)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_an_owner_that_stops_answering_is_deposed() {
    let test = "on_etcd_an_owner_that_stops_answering_is_deposed";
    if !nats_up(test) {
        return;
    }
    let Some(etcd) = keel_registry::testing::etcd(test).await else {
        return;
    };
    deposed_when_silent(etcd_backend(&etcd.endpoint).await).await;
}

/// An owner elected under a lease of 30 s (kept by the naming backend, as after a change of
/// etcd's leader) answers its health checks: the standby waits. It stops answering: the
/// standby revokes its lease well before the 30 s are up, and is elected.
async fn deposed_when_silent<B: NamingBackend + Clone>(backend: B) {
    let name = unique_stream("deposed");
    let _delete = DeleteStreams::new(vec![name.clone()]);
    let stream = StreamOptions::parse(&nats_url(), name).unwrap();

    let owner = Alive::start();
    let lease = backend.grant_lease(Duration::from_secs(30)).await.unwrap();
    backend
        .campaign(
            keel_seckill::peers::NAMESPACE,
            &owner::election("inv-0"),
            lease,
            format!("127.0.0.1:{}", owner.port).into(),
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    let mut b = candidate(backend.clone(), &stream);
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(
        *b.role.borrow(),
        Role::Standby,
        "an owner that answers keeps the shard"
    );
    backend.keep_alive(lease).await.unwrap();

    drop(owner);
    let silent = tokio::time::Instant::now();
    until(&mut b.role, |r| *r != Role::Standby).await;
    let took = silent.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "elected {took:?} after the owner went silent: its lease of 30 s ran out instead"
    );
    eprintln!("a silent owner deposed after {} ms", took.as_millis());
    let gone = backend.keep_alive(lease).await.unwrap_err();
    assert_eq!(gone.code(), keel_rpc::Code::NotFound, "{gone}");
    b.stop.cancel();
    b.task.await.unwrap();
}
