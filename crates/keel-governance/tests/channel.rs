//! ServiceChannel against real Keel RPC servers on loopback: balancing, failover, ejection,
//! zones, consistent hashing, the retry budget and hedging.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use keel_echo::{EchoReply, EchoRequest};
use keel_governance::{
    Instance, OutlierConfig, RetryConfig, ServiceChannel, ServiceChannelConfig, StaticDiscover,
};
use keel_rpc::{CallOptions, Code, Server, ServiceDef, Status};
use tokio::net::TcpListener;

/// How a test instance answers.
const OK: u32 = 0;
const INTERNAL: u32 = 1;
const OVERLOADED: u32 = 2;
const SLOW: u32 = 3;

/// A server for `t.Who/Who` (replies with its name) on its own runtime thread, so dropping it
/// kills it at once: connections cut, calls in flight lost, like a crashed process.
struct Instance_ {
    name: String,
    addr: String,
    calls: Arc<AtomicUsize>,
    mode: Arc<AtomicU32>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Instance_ {
    fn start(name: &str) -> Instance_ {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let mode = Arc::new(AtomicU32::new(OK));
        let (c, m, n) = (calls.clone(), mode.clone(), name.to_owned());
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap().to_string();
        let listener = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(std_listener).unwrap()
        };
        let service = ServiceDef::new("t.Who").unary("Who", move |_ctx, _req: EchoRequest| {
            let (c, m, n) = (c.clone(), m.clone(), n.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                match m.load(Ordering::SeqCst) {
                    INTERNAL => Err(Status::internal("broken instance")),
                    OVERLOADED => Err(Status::overloaded("too busy")),
                    SLOW => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok(EchoReply {
                            message: n,
                            payload: Default::default(),
                        })
                    }
                    _ => Ok(EchoReply {
                        message: n,
                        payload: Default::default(),
                    }),
                }
            }
        });
        let server = Server::builder().add_service(service).build();
        runtime.spawn(server.serve(listener, std::future::pending::<()>()));
        Instance_ {
            name: name.to_owned(),
            addr,
            calls,
            mode,
            runtime: Some(runtime),
        }
    }

    fn instance(&self, zone: &str) -> Instance {
        let mut i = Instance::new(self.name.clone(), self.addr.clone());
        i.zone = zone.to_owned();
        i
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Stops the instance's runtime and waits until its threads are gone: from then on it
    /// answers nothing.
    async fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(5)))
                .await
                .unwrap();
        }
    }
}

impl Drop for Instance_ {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Instances i0, i1, ... answering OK.
fn start_instances(n: usize) -> Vec<Instance_> {
    (0..n).map(|i| Instance_::start(&format!("i{i}"))).collect()
}

async fn who(channel: &ServiceChannel, options: CallOptions) -> Result<String, Status> {
    let reply: EchoReply =
        keel_rpc::client::unary(channel, "t.Who", "Who", &EchoRequest::default(), options).await?;
    Ok(reply.message)
}

fn config(balancer: &str) -> ServiceChannelConfig {
    ServiceChannelConfig {
        balancer: balancer.parse().unwrap(),
        ..ServiceChannelConfig::default()
    }
}

async fn ready(channel: &ServiceChannel, n: usize) {
    for _ in 0..500 {
        let up = channel
            .endpoints()
            .iter()
            .filter(|e| e.channel.state() == keel_rpc::client::ConnectivityState::Ready)
            .count();
        if up >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("endpoints did not connect");
}

#[tokio::test]
async fn round_robin_spreads_evenly_and_follows_discovery() {
    let instances = start_instances(3);
    let discover = StaticDiscover::new();
    discover.set("who", instances.iter().map(|i| i.instance("")).collect());
    let channel = ServiceChannel::new(&discover, "who", config("round_robin")).unwrap();
    ready(&channel, 3).await;
    for _ in 0..300 {
        who(&channel, CallOptions::default()).await.unwrap();
    }
    for i in &instances {
        assert_eq!(i.calls(), 100, "{}", i.name);
    }
    // The list shrinks: calls follow.
    discover.set("who", vec![instances[0].instance("")]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..10 {
        assert_eq!(who(&channel, CallOptions::default()).await.unwrap(), "i0");
    }
}

#[tokio::test]
async fn p2c_and_weighted_balancers_serve_every_instance() {
    let instances = start_instances(3);
    let discover = StaticDiscover::new();
    let mut list: Vec<Instance> = instances.iter().map(|i| i.instance("")).collect();
    list[0].weight = 300;
    discover.set("who", list);
    let weighted = ServiceChannel::new(&discover, "who", config("weighted")).unwrap();
    ready(&weighted, 3).await;
    for _ in 0..500 {
        who(&weighted, CallOptions::default()).await.unwrap();
    }
    assert_eq!(
        (
            instances[0].calls(),
            instances[1].calls(),
            instances[2].calls()
        ),
        (300, 100, 100)
    );
    let p2c = ServiceChannel::new(&discover, "who", config("p2c")).unwrap();
    ready(&p2c, 3).await;
    for _ in 0..300 {
        who(&p2c, CallOptions::default()).await.unwrap();
    }
    assert!(
        instances.iter().all(|i| i.calls() > 100),
        "every instance got some"
    );
}

#[tokio::test]
async fn an_instance_that_dies_under_load_costs_no_failed_call() {
    let mut instances = start_instances(3);
    let discover = StaticDiscover::new();
    discover.set("who", instances.iter().map(|i| i.instance("")).collect());
    let channel = ServiceChannel::new(&discover, "who", config("p2c")).unwrap();
    ready(&channel, 3).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (channel, failures, done, stop) = (
            channel.clone(),
            failures.clone(),
            done.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match who(
                    &channel,
                    CallOptions::default().timeout(Duration::from_secs(5)),
                )
                .await
                {
                    Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failures.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    instances[1].kill().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "calls failed although two instances were up"
    );
    assert!(done.load(Ordering::SeqCst) > 100);
    // The dead instance's connection is down, so it is no longer picked.
    let dead = channel
        .endpoints()
        .iter()
        .find(|e| e.instance.id == "i1")
        .map(|e| e.channel.state())
        .unwrap();
    assert!(
        !matches!(dead, keel_rpc::client::ConnectivityState::Ready),
        "{dead:?}"
    );
}

#[tokio::test]
async fn a_failing_instance_is_ejected_then_probed_back() {
    let instances = start_instances(3);
    instances[2].mode.store(INTERNAL, Ordering::SeqCst);
    let discover = StaticDiscover::new();
    discover.set("who", instances.iter().map(|i| i.instance("")).collect());
    let channel = ServiceChannel::new(
        &discover,
        "who",
        ServiceChannelConfig {
            balancer: keel_governance::BalancerKind::RoundRobin,
            outlier: OutlierConfig {
                base_ejection: Duration::from_millis(300),
                ..OutlierConfig::default()
            },
            ..ServiceChannelConfig::default()
        },
    )
    .unwrap();
    ready(&channel, 3).await;
    let mut internal = 0;
    for _ in 0..60 {
        if let Err(e) = who(&channel, CallOptions::default()).await {
            assert_eq!(e.code(), Code::Internal);
            internal += 1;
        }
    }
    assert_eq!(internal, 5, "five failures in a row eject it");
    assert_eq!(instances[2].calls(), 5);
    assert_eq!(channel.stats().ejections.load(Ordering::SeqCst), 1);
    // Repaired; after the ejection time one probe brings it back.
    instances[2].mode.store(OK, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..30 {
        who(&channel, CallOptions::default()).await.unwrap();
    }
    assert!(
        instances[2].calls() > 10,
        "back in rotation: {}",
        instances[2].calls()
    );
}

#[tokio::test]
async fn the_callers_zone_is_preferred_while_it_can_serve() {
    let mut instances = start_instances(3);
    let discover = StaticDiscover::new();
    discover.set(
        "who",
        vec![
            instances[0].instance("a"),
            instances[1].instance("b"),
            instances[2].instance("b"),
        ],
    );
    let channel = ServiceChannel::new(
        &discover,
        "who",
        ServiceChannelConfig {
            zone: Some("a".into()),
            ..config("round_robin")
        },
    )
    .unwrap();
    ready(&channel, 3).await;
    for _ in 0..20 {
        assert_eq!(who(&channel, CallOptions::default()).await.unwrap(), "i0");
    }
    // The local instance dies: calls cross to the other zone, none fail.
    instances[0].kill().await;
    for _ in 0..20 {
        let w = who(&channel, CallOptions::default()).await.unwrap();
        assert_ne!(w, "i0");
    }
}

#[tokio::test]
async fn consistent_hashing_keeps_a_key_on_one_instance() {
    let instances = start_instances(4);
    let discover = StaticDiscover::new();
    discover.set("who", instances.iter().map(|i| i.instance("")).collect());
    let channel = ServiceChannel::new(&discover, "who", config("consistent_hash")).unwrap();
    ready(&channel, 4).await;
    let mut seen = std::collections::HashSet::new();
    for user in 0..40 {
        let key = format!("user-{user}");
        let first = who(&channel, CallOptions::default().hash_key(&key))
            .await
            .unwrap();
        for _ in 0..5 {
            assert_eq!(
                who(&channel, CallOptions::default().hash_key(&key))
                    .await
                    .unwrap(),
                first
            );
        }
        seen.insert(first);
    }
    assert!(seen.len() >= 3, "keys spread over the instances: {seen:?}");
}

#[tokio::test]
async fn retries_stay_within_the_budget() {
    let instances = start_instances(3);
    for i in &instances {
        i.mode.store(OVERLOADED, Ordering::SeqCst);
    }
    let discover = StaticDiscover::new();
    discover.set("who", instances.iter().map(|i| i.instance("")).collect());
    let channel = ServiceChannel::new(
        &discover,
        "who",
        ServiceChannelConfig {
            retry: RetryConfig {
                max_attempts: 3,
                budget_ratio: 0.1,
                min_retries_per_sec: 5,
            },
            ..config("round_robin")
        },
    )
    .unwrap();
    ready(&channel, 3).await;
    let calls = 500;
    for _ in 0..calls {
        let e = who(&channel, CallOptions::default()).await.unwrap_err();
        assert_eq!(e.code(), Code::Overloaded);
    }
    let attempts: usize = instances.iter().map(Instance_::calls).sum();
    // Without a budget, 3 attempts each: 1500. With it: 10% extra plus a small floor.
    assert!(
        attempts <= calls + calls / 10 + 10,
        "{attempts} attempts for {calls} calls"
    );
    assert!(attempts > calls, "some retries were allowed");
}

#[tokio::test]
async fn hedging_answers_from_the_fast_instance() {
    let instances = start_instances(2);
    instances[0].mode.store(SLOW, Ordering::SeqCst);
    let discover = StaticDiscover::new();
    discover.set("who", instances.iter().map(|i| i.instance("")).collect());
    let channel = ServiceChannel::new(
        &discover,
        "who",
        ServiceChannelConfig {
            hedge_after: Some(Duration::from_millis(30)),
            retry: RetryConfig {
                min_retries_per_sec: 100,
                ..RetryConfig::default()
            },
            ..config("round_robin")
        },
    )
    .unwrap();
    ready(&channel, 2).await;
    for _ in 0..10 {
        // Every call is answered by i1: directly, or as the backup of a call to slow i0.
        assert_eq!(who(&channel, CallOptions::default()).await.unwrap(), "i1");
    }
    assert!(channel.stats().hedges.load(Ordering::SeqCst) >= 4);
}
