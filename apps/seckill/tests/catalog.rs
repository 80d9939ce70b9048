//! The catalog shared by several APIs in the naming service (a Keel registry served here):
//! what one API writes the others read, an item id is given once, and a catalog from a sale
//! that ran without a registry is copied in.

mod common;

use std::time::{Duration, Instant};

use keel_seckill::api::{Catalog, CatalogError, ItemDef, Transfer};

fn item(id: &str) -> ItemDef {
    ItemDef {
        item_id: id.into(),
        name: format!("Item {id}"),
        price_cents: 100,
        stock: 10,
        starts_at_ms: 0,
        per_user_limit: 1,
        shards: vec!["inv-0".into()],
    }
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apis_share_the_catalog_and_a_local_one_is_copied_in_once() {
    let registry = common::serve_registry().await;
    let naming = || keel_registry::Naming::connect(&registry);
    let dir = tempfile::tempdir().unwrap();
    let transfer = Transfer {
        id: "t1".into(),
        item_id: "item-1".into(),
        from: "inv-1".into(),
        to: "inv-0".into(),
        units: 2,
    };
    // A sale that ran without a registry: its catalog is in a local journal.
    let local = Catalog::open(dir.path()).unwrap();
    local.add(item("item-1")).await.unwrap();
    local.hide("item-1").await.unwrap();
    local.begin_transfer(&transfer).await.unwrap();

    let a = Catalog::shared(naming().await.unwrap()).await.unwrap();
    assert!(a.is_shared() && a.all().is_empty());
    assert_eq!(a.import(&local).await.unwrap(), 1);
    assert_eq!(a.get("item-1"), Some(item("item-1")));
    assert!(a.is_hidden("item-1"));
    assert_eq!(a.pending_transfers(), vec![transfer.clone()]);
    // Once the shared catalog has items, nothing is copied again.
    assert_eq!(a.import(&local).await.unwrap(), 0);

    // A second API reads it all at start, and cannot take an id that is given.
    let b = Catalog::shared(naming().await.unwrap()).await.unwrap();
    assert_eq!(b.all(), vec![item("item-1")]);
    assert!(b.is_hidden("item-1"));
    assert!(matches!(
        b.add(item("item-1")).await,
        Err(CatalogError::Taken(id)) if id == "item-1"
    ));
    // What one writes, it reads at once, and the other a moment later.
    b.add(item("item-2")).await.unwrap();
    assert!(b.get("item-2").is_some());
    eventually("item-2 on a", || a.get("item-2").is_some()).await;
    assert_eq!(
        a.all()
            .iter()
            .map(|i| i.item_id.as_str())
            .collect::<Vec<_>>(),
        ["item-1", "item-2"]
    );
    a.end_transfer("t1").await.unwrap();
    assert!(a.pending_transfers().is_empty());
    eventually("t1 done on b", || b.pending_transfers().is_empty()).await;
    // Ending it again (as the other API would) is no error.
    b.end_transfer("t1").await.unwrap();
    a.remove("item-2").await.unwrap();
    assert!(a.get("item-2").is_none());
    eventually("item-2 gone on b", || b.get("item-2").is_none()).await;
    // An item made elsewhere and not seen yet is looked up; a made-up id is not.
    let c = Catalog::shared(naming().await.unwrap()).await.unwrap();
    c.add(item("item-3")).await.unwrap();
    assert_eq!(a.find("item-3").await, Some(item("item-3")));
    assert_eq!(a.find("item-99").await, None);
    assert_eq!(a.find("../../etc").await, None);
}

#[tokio::test]
async fn an_unreachable_naming_service_is_a_clear_error() {
    // Nothing listens there: the catalog says so instead of serving an empty one.
    let naming = keel_registry::Naming::connect("127.0.0.1:1").await.unwrap();
    tokio::time::pause();
    let err = Catalog::shared(naming).await.unwrap_err().to_string();
    assert!(
        err.contains("no answer in 30 s reading the catalog"),
        "{err}"
    );
}
