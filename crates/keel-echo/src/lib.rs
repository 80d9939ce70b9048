//! The example Keel service, written the way any Keel service is: a `.proto` file
//! (`proto/echo.proto`), compiled by `keel-rpc-build` in `build.rs`, and an implementation of
//! the generated [`proto::Echo`] trait.
//!
//! - [`proto`]: generated messages, the `Echo` trait, `EchoServer` and the typed `EchoClient`.
//! - [`EchoService`]: the implementation used by `keel serve`, `keel demo` and the benchmarks.

use std::time::Duration;

use futures_util::stream;
use keel_rpc::{Context, ResponseStream, Status};

/// Generated from `proto/echo.proto`.
#[allow(missing_docs)]
pub mod proto {
    keel_rpc::include_proto!("keel.echo.v1");
}

pub use proto::{CountReply, CountRequest, EchoClient, EchoReply, EchoRequest, EchoServer};

/// Most replies one `Count` call may ask for.
pub const MAX_COUNT: u32 = 100_000;

/// Echoes requests back; counts on request.
#[derive(Clone, Copy, Debug, Default)]
pub struct EchoService;

impl proto::Echo for EchoService {
    async fn echo(&self, _ctx: Context, request: EchoRequest) -> Result<EchoReply, Status> {
        Ok(EchoReply {
            message: request.message,
            payload: request.payload,
        })
    }

    async fn count(
        &self,
        _ctx: Context,
        request: CountRequest,
    ) -> Result<ResponseStream<CountReply>, Status> {
        if request.count > MAX_COUNT {
            return Err(Status::invalid_argument(format!(
                "count {} is over the limit of {MAX_COUNT}",
                request.count
            )));
        }
        let interval = Duration::from_millis(u64::from(request.interval_ms));
        let replies = stream::unfold(1u32, move |n| async move {
            if n > request.count {
                return None;
            }
            if n > 1 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok(CountReply { n }), n + 1))
        });
        Ok(Box::pin(replies))
    }
}
