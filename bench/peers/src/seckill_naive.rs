//! The flash sale as a user would write it first, for `bench/seckill.sh` to measure Keel
//! against: one PostgreSQL table of items and one of orders with a unique (user, item)
//! index; each buy is a transaction that locks the item's row (`SELECT … FOR UPDATE`),
//! inserts the order and decrements the stock (`UPDATE … WHERE stock > 0`). It serves the
//! same HTTP paths as Keel's API for what the bench uses: create an item, buy, read an order,
//! the audit.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sqlx::postgres::{PgPool, PgPoolOptions};

#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7500")]
    addr: SocketAddr,
    /// PostgreSQL URL.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database: String,
    /// Connections in the pool.
    #[arg(long, default_value_t = 64)]
    connections: u32,
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

fn fail(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": code }))
}

async fn handle(db: &PgPool, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result: Result<Response<Full<Bytes>>, sqlx::Error> = async {
        Ok(match (method, parts.as_slice()) {
            (Method::POST, ["api", "admin", "items"]) => {
                let stock = json["stock"].as_i64().unwrap_or(0);
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO items (name, stock, initial) VALUES ($1, $2, $2) RETURNING id",
                )
                .bind(json["name"].as_str().unwrap_or(""))
                .bind(stock)
                .fetch_one(db)
                .await?;
                reply(StatusCode::CREATED, json!({ "item_id": format!("item-{id}") }))
            }
            (Method::POST, ["api", "items", item, "buy"]) => {
                let Some(item) = item.strip_prefix("item-").and_then(|i| i.parse::<i64>().ok())
                else {
                    return Ok(fail(StatusCode::NOT_FOUND, "not_found"));
                };
                let Some(user) = json["user_id"].as_str() else {
                    return Ok(fail(StatusCode::BAD_REQUEST, "invalid_request"));
                };
                let mut tx = db.begin().await?;
                let stock: Option<i64> =
                    sqlx::query_scalar("SELECT stock FROM items WHERE id = $1 FOR UPDATE")
                        .bind(item)
                        .fetch_optional(&mut *tx)
                        .await?;
                match stock {
                    None => fail(StatusCode::NOT_FOUND, "not_found"),
                    Some(s) if s <= 0 => fail(StatusCode::CONFLICT, "sold_out"),
                    Some(_) => {
                        let order: Option<i64> = sqlx::query_scalar(
                            "INSERT INTO orders (item_id, user_id, status) VALUES ($1, $2, 'pending_payment') \
                             ON CONFLICT (user_id, item_id) DO NOTHING RETURNING id",
                        )
                        .bind(item)
                        .bind(user)
                        .fetch_optional(&mut *tx)
                        .await?;
                        match order {
                            None => fail(StatusCode::CONFLICT, "limit_reached"),
                            Some(order) => {
                                sqlx::query("UPDATE items SET stock = stock - 1 WHERE id = $1 AND stock > 0")
                                    .bind(item)
                                    .execute(&mut *tx)
                                    .await?;
                                tx.commit().await?;
                                return Ok(reply(
                                    StatusCode::OK,
                                    json!({ "order_id": format!("o-{order}"), "status": "pending_payment" }),
                                ));
                            }
                        }
                    }
                }
            }
            (Method::GET, ["api", "orders", order]) => {
                let id = order.strip_prefix("o-").and_then(|i| i.parse::<i64>().ok()).unwrap_or(-1);
                let row: Option<(i64, String, String)> =
                    sqlx::query_as("SELECT item_id, user_id, status FROM orders WHERE id = $1")
                        .bind(id)
                        .fetch_optional(db)
                        .await?;
                match row {
                    Some((item, user, status)) => reply(
                        StatusCode::OK,
                        json!({ "order_id": order, "item_id": format!("item-{item}"), "user_id": user, "status": status }),
                    ),
                    None => fail(StatusCode::NOT_FOUND, "not_found"),
                }
            }
            (Method::GET, ["api", "users", user, "orders"]) => {
                let rows: Vec<(i64, i64, String)> = sqlx::query_as(
                    "SELECT id, item_id, status FROM orders WHERE user_id = $1 ORDER BY id",
                )
                .bind(*user)
                .fetch_all(db)
                .await?;
                let list: Vec<Value> = rows
                    .into_iter()
                    .map(|(id, item, status)| {
                        json!({ "order_id": format!("o-{id}"), "item_id": format!("item-{item}"), "user_id": user, "status": status })
                    })
                    .collect();
                reply(StatusCode::OK, Value::from(list))
            }
            (Method::GET, ["api", "admin", "items", item, "audit"]) => {
                let id = item.strip_prefix("item-").and_then(|i| i.parse::<i64>().ok()).unwrap_or(-1);
                let (stock, initial): (i64, i64) =
                    sqlx::query_as("SELECT stock, initial FROM items WHERE id = $1")
                        .bind(id)
                        .fetch_one(db)
                        .await?;
                let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE item_id = $1")
                    .bind(id)
                    .fetch_one(db)
                    .await?;
                reply(
                    StatusCode::OK,
                    json!({
                        "initial_stock": initial, "stock_left": stock, "reserved": initial - stock,
                        "orders_by_status": { "pending_payment": orders }, "queue_backlog": 0,
                    }),
                )
            }
            _ => fail(StatusCode::NOT_FOUND, "not_found"),
        })
    }
    .await;
    result.unwrap_or_else(|e| {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "overloaded", "detail": e.to_string() }),
        )
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = PgPoolOptions::new()
        .max_connections(args.connections)
        .connect(&args.database)
        .await?;
    // A clean slate each run.
    for statement in [
        "DROP TABLE IF EXISTS orders",
        "DROP TABLE IF EXISTS items",
        "CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, stock bigint NOT NULL, initial bigint NOT NULL)",
        "CREATE TABLE orders (id bigserial PRIMARY KEY, item_id bigint NOT NULL, user_id text NOT NULL, status text NOT NULL)",
        "CREATE UNIQUE INDEX orders_user_item ON orders (user_id, item_id)",
    ] {
        sqlx::query(statement).execute(&db).await?;
    }
    let db = Arc::new(db);
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("seckill-naive on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let db = db.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let db = db.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&db, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
