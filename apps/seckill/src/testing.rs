//! Support for test suites that need PostgreSQL (hidden from the docs; not part of the API):
//! a database of their own on the server at `KEEL_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped when the test ends, also when it
//! fails; skipped with a message when no server answers, failed instead when
//! `KEEL_REQUIRE_SERVICES=1`.

use std::future::Future;

/// The server the suites use, as a URL to its administrative database.
pub fn postgres_url() -> String {
    std::env::var("KEEL_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database made for one test, dropped (with its connections) when this drops.
#[derive(Debug)]
pub struct TempDatabase {
    /// Its URL.
    pub url: String,
    name: String,
    admin: String,
}

/// Runs `f` on a thread and runtime of its own (so it works from synchronous tests, from
/// async ones and from `Drop`).
fn on_thread<T: Send + 'static, F: Future<Output = T>>(
    f: impl FnOnce() -> F + Send + 'static,
) -> Option<T> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        Some(rt.block_on(f()))
    })
    .join()
    .ok()
    .flatten()
}

/// A fresh database for `test`, or `None` (after saying the test is skipped) when no
/// PostgreSQL server answers; panics instead when `KEEL_REQUIRE_SERVICES=1`.
pub fn temp_database(test: &str) -> Option<TempDatabase> {
    use sqlx::Connection as _;
    let admin = postgres_url();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("keel_test_{}_{nanos}", std::process::id());
    let (url_admin, url_name) = (admin.clone(), name.clone());
    let made = on_thread(move || async move {
        let mut conn = sqlx::PgConnection::connect(&url_admin).await?;
        sqlx::query(&format!("CREATE DATABASE {url_name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await
    })
    .unwrap_or_else(|| Err(sqlx::Error::PoolClosed));
    if let Err(e) = made {
        assert!(
            std::env::var("KEEL_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{test}: PostgreSQL is required (KEEL_REQUIRE_SERVICES=1) but {admin} answered: {e}"
        );
        eprintln!("skipping {test}: no PostgreSQL at {admin} ({e})");
        return None;
    }
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    Some(TempDatabase {
        url: format!("{base}/{name}"),
        name,
        admin,
    })
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        use sqlx::Connection as _;
        let (admin, name) = (self.admin.clone(), self.name.clone());
        on_thread(move || async move {
            let mut conn = sqlx::PgConnection::connect(&admin).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await?;
            conn.close().await
        });
    }
}
