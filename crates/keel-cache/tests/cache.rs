//! The two-level cache: single-flight loads, invalidation that wins over a load in flight,
//! failed loads kept nowhere, cancellation, and two "processes" sharing a tier — in memory
//! and on the real Redis at 127.0.0.1:6379.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_cache::{CacheConfig, MemoryTier, RedisTier, SharedTier, TwoLevel};

fn config(name: &str) -> CacheConfig {
    CacheConfig {
        local_ttl: Duration::from_secs(30),
        shared_ttl: Duration::from_secs(30),
        ..CacheConfig::new(name)
    }
}

#[tokio::test]
async fn concurrent_misses_share_one_load_and_then_hit_locally() {
    let cache: TwoLevel<String> = TwoLevel::local(config("t"));
    let loads = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (cache, loads) = (cache.clone(), loads.clone());
        tasks.spawn(async move {
            cache
                .get_or_load("k", || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok("v".to_owned())
                })
                .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap(), "v");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().coalesced.load(Ordering::Relaxed), 99);
    let again = cache
        .get_or_load("k", || async { Err("must not load".to_owned()) })
        .await;
    assert_eq!(again.unwrap(), "v");
    assert_eq!(cache.stats().local_hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_invalidation_during_a_load_keeps_its_value_out_of_the_cache() {
    let cache: TwoLevel<u32> = TwoLevel::local(config("t"));
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load("k", || async move {
                    let _ = released.await;
                    Ok(1)
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The data changes while the first load runs.
    cache.invalidate("k").await;
    release.send(()).unwrap();
    assert_eq!(
        first.await.unwrap(),
        Ok(1),
        "the first caller gets its own load"
    );
    // A read after the invalidation does not get the value loaded before it.
    let second = cache.get_or_load("k", || async { Ok(2) }).await;
    assert_eq!(second, Ok(2));
    assert_eq!(cache.stats().loads.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_failed_load_is_shared_by_its_waiters_and_kept_nowhere() {
    let cache: TwoLevel<u32> = TwoLevel::local(config("t"));
    let (a, b) = tokio::join!(
        cache.get_or_load("k", || async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err("down".to_owned())
        }),
        async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            cache.get_or_load("k", || async { Ok(9) }).await
        }
    );
    assert_eq!((a, b), (Err("down".to_owned()), Err("down".to_owned())));
    assert_eq!(cache.get_or_load("k", || async { Ok(7) }).await, Ok(7));
}

#[tokio::test]
async fn a_cancelled_loader_is_taken_over_by_a_waiter() {
    let cache: TwoLevel<u32> = TwoLevel::local(config("t"));
    let first = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load("k", || async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(1)
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_or_load("k", || async { Ok(2) }).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    first.abort();
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the waiter took over")
        .unwrap();
    assert_eq!(second, Ok(2));
}

/// Two caches (two processes' worth) on one shared tier: the second reads what the first
/// loaded without loading, and an invalidation by the first reaches the second's local tier.
async fn two_processes_share_values_and_invalidations(
    shared: [Arc<dyn SharedTier>; 2],
    name: &str,
) {
    let [one, two] = shared;
    let a: TwoLevel<String> = TwoLevel::with_shared(config(name), one).await.unwrap();
    let b: TwoLevel<String> = TwoLevel::with_shared(config(name), two).await.unwrap();
    let loads = AtomicU64::new(0);
    let load = |v: &'static str| {
        let loads = &loads;
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(v.to_owned())
        }
    };
    assert_eq!(a.get_or_load("item", load("v1")).await.unwrap(), "v1");
    assert_eq!(b.get_or_load("item", load("other")).await.unwrap(), "v1");
    assert_eq!(loads.load(Ordering::SeqCst), 1, "b read the shared tier");
    assert_eq!(b.stats().shared_hits.load(Ordering::Relaxed), 1);
    // b now holds v1 locally; a changes the item and invalidates.
    a.invalidate("item").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let seen = b.get_or_load("item", load("v2")).await.unwrap();
        if seen == "v2" {
            break;
        }
        assert_eq!(seen, "v1");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the invalidation never reached b"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(b.stats().remote_invalidations.load(Ordering::Relaxed) >= 1);
    // a reads b's fresh value from the shared tier.
    assert_eq!(a.get_or_load("item", load("v3")).await.unwrap(), "v2");
}

#[tokio::test]
async fn processes_on_a_memory_tier_share_values_and_invalidations() {
    let tier = MemoryTier::new();
    two_processes_share_values_and_invalidations([tier.clone(), tier], "mem").await;
}

async fn redis() -> Option<(Arc<RedisTier>, Arc<RedisTier>)> {
    match RedisTier::connect("redis://127.0.0.1:6379/").await {
        Ok(one) => Some((
            one,
            RedisTier::connect("redis://127.0.0.1:6379/").await.unwrap(),
        )),
        Err(e) => {
            assert!(
                std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "Redis at 127.0.0.1:6379 is needed (KEEL_REQUIRE_SERVICES=1): {e}"
            );
            eprintln!("skipped: no Redis at 127.0.0.1:6379 ({e})");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

#[tokio::test]
async fn processes_on_redis_share_values_and_invalidations() {
    let Some((one, two)) = redis().await else {
        return;
    };
    two_processes_share_values_and_invalidations([one, two], &unique("test")).await;
}

#[tokio::test]
async fn redis_entries_expire_with_their_time_to_live() {
    let Some((tier, _)) = redis().await else {
        return;
    };
    let name = unique("ttl");
    assert!(
        tier.set_if_version(&name, "k", b"\"v\"".to_vec(), Duration::from_millis(100), 0)
            .await
            .unwrap()
    );
    assert_eq!(tier.get(&name, "k").await.unwrap(), Some(b"\"v\"".to_vec()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tier.get(&name, "k").await.unwrap(), None);
}

#[tokio::test]
async fn an_unreachable_redis_is_a_clear_error() {
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = RedisTier::connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("redis:"), "{err}");
    assert!(RedisTier::connect("not a url").await.is_err());
}

/// A value loaded before an invalidation never lands in the shared tier after it, even when
/// the invalidation comes from another process between the load and the write.
async fn a_stale_load_never_lands_in_the_shared_tier(shared: [Arc<dyn SharedTier>; 2], name: &str) {
    let [one, two] = shared;
    let a: TwoLevel<u32> = TwoLevel::with_shared(config(name), one.clone())
        .await
        .unwrap();
    let b: TwoLevel<u32> = TwoLevel::with_shared(config(name), two).await.unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let load = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_load("k", || async move {
                let _ = released.await;
                Ok::<_, String>(1)
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Another process changes the data while a's load runs.
    b.invalidate("k").await;
    release.send(()).unwrap();
    assert_eq!(load.await.unwrap(), Ok(1));
    assert_eq!(
        one.get(name, "k").await.unwrap(),
        None,
        "the stale value was not stored"
    );
    // The next load, after the invalidation, is stored.
    assert_eq!(a.get_or_load("k", || async { Ok(2) }).await, Ok(2));
    assert_eq!(one.get(name, "k").await.unwrap(), Some(b"2".to_vec()));
}

#[tokio::test]
async fn a_stale_load_never_lands_in_a_memory_tier() {
    let tier = MemoryTier::new();
    a_stale_load_never_lands_in_the_shared_tier([tier.clone(), tier], "mem-stale").await;
}

#[tokio::test]
async fn a_stale_load_never_lands_in_redis() {
    let Some((one, two)) = redis().await else {
        return;
    };
    a_stale_load_never_lands_in_the_shared_tier([one, two], &unique("stale")).await;
}
