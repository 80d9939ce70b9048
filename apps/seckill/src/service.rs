//! The inventory as a Keel RPC service (`keel.seckill.v1.Inventory`).

use std::sync::Arc;

use keel_rpc::{Context, Status};

use crate::inventory::{Inventory, InventoryError, Refusal};
use crate::proto;

/// Serves an [`Inventory`] over Keel RPC, or — in a standby that does not own its shard —
/// answers every call `unavailable`. Clones share the inventory they serve, so an ownership
/// loop can install and remove it while the server runs.
#[derive(Debug, Clone)]
pub struct InventoryService {
    inventory: Arc<arc_swap::ArcSwapOption<Inventory>>,
}

impl InventoryService {
    /// Serves `inventory`.
    pub fn new(inventory: Arc<Inventory>) -> InventoryService {
        InventoryService {
            inventory: Arc::new(arc_swap::ArcSwapOption::new(Some(inventory))),
        }
    }

    /// Serves nothing until [`InventoryService::install`] is called: a standby.
    pub fn standby() -> InventoryService {
        InventoryService {
            inventory: Arc::new(arc_swap::ArcSwapOption::empty()),
        }
    }

    /// Starts serving `inventory`, or with `None` stops (a standby again). Calls under way
    /// finish on the inventory they started with.
    pub fn install(&self, inventory: Option<Arc<Inventory>>) {
        self.inventory.store(inventory);
    }

    /// The inventory served now.
    pub fn current(&self) -> Option<Arc<Inventory>> {
        self.inventory.load_full()
    }

    fn serving(&self) -> Result<Arc<Inventory>, Status> {
        self.current().ok_or_else(|| {
            Status::unavailable("this inventory instance is a standby: it does not own its shard")
        })
    }
}

fn status(e: InventoryError) -> Status {
    match e {
        InventoryError::Exists(item) => {
            Status::already_exists(format!("item {item} exists with other settings"))
        }
        // The instance cannot decide: another instance (or a retry later) may.
        e @ (InventoryError::Journal(_) | InventoryError::Failed) => {
            Status::unavailable(e.to_string())
        }
        e @ InventoryError::BadRecord { .. } => Status::internal(e.to_string()),
        InventoryError::Invalid(why) => Status::invalid_argument(why),
    }
}

fn to_proto(r: crate::Reservation) -> proto::Reservation {
    proto::Reservation {
        reservation_id: r.reservation_id,
        item_id: r.item_id,
        user_id: r.user_id,
        request_id: r.request_id,
        bucket: r.bucket,
    }
}

fn need(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > 256 {
        return Err(Status::invalid_argument(format!(
            "{field} must have 1 to 256 bytes"
        )));
    }
    Ok(())
}

impl proto::Inventory for InventoryService {
    async fn create_item(
        &self,
        _ctx: Context,
        request: proto::CreateItemRequest,
    ) -> Result<proto::CreateItemReply, Status> {
        need("item_id", &request.item_id)?;
        if request.buckets.is_empty() || request.buckets.len() > 4096 {
            return Err(Status::invalid_argument(
                "buckets must have 1 to 4096 entries",
            ));
        }
        if request.per_user_limit == 0 {
            return Err(Status::invalid_argument("per_user_limit must be positive"));
        }
        self.serving()?
            .create_item(&request.item_id, request.buckets, request.per_user_limit)
            .await
            .map_err(status)?;
        Ok(proto::CreateItemReply {})
    }

    async fn reserve(
        &self,
        _ctx: Context,
        request: proto::ReserveRequest,
    ) -> Result<proto::ReserveReply, Status> {
        need("item_id", &request.item_id)?;
        need("user_id", &request.user_id)?;
        need("request_id", &request.request_id)?;
        let answer = self
            .serving()?
            .reserve(&request.item_id, &request.user_id, &request.request_id)
            .await
            .map_err(status)?;
        let (outcome, reservation) = match answer {
            Ok(r) => (proto::Outcome::Reserved, Some(to_proto(r))),
            Err(Refusal::SoldOut) => (proto::Outcome::SoldOut, None),
            Err(Refusal::LimitReached) => (proto::Outcome::LimitReached, None),
            Err(Refusal::NotFound) => (proto::Outcome::NotFound, None),
        };
        Ok(proto::ReserveReply {
            outcome: outcome as i32,
            reservation,
        })
    }

    async fn release(
        &self,
        _ctx: Context,
        request: proto::ReleaseRequest,
    ) -> Result<proto::ReleaseReply, Status> {
        let released = self
            .serving()?
            .release(request.reservation_id, &request.user_id)
            .await
            .map_err(status)?;
        Ok(proto::ReleaseReply { released })
    }

    async fn commit(
        &self,
        _ctx: Context,
        request: proto::CommitRequest,
    ) -> Result<proto::CommitReply, Status> {
        let committed = self
            .serving()?
            .commit(request.reservation_id)
            .await
            .map_err(status)?;
        Ok(proto::CommitReply { committed })
    }

    async fn stock(
        &self,
        _ctx: Context,
        request: proto::StockRequest,
    ) -> Result<proto::StockReply, Status> {
        Ok(match self.serving()?.stock(&request.item_id) {
            None => proto::StockReply::default(),
            Some(s) => proto::StockReply {
                found: true,
                initial: s.initial,
                left: s.left,
                reserved: s.reserved,
                sold_out: s.left == 0,
                moved_out: s.moved_out,
                moved_in: s.moved_in,
            },
        })
    }

    async fn reservations_after(
        &self,
        _ctx: Context,
        request: proto::ReservationsAfterRequest,
    ) -> Result<proto::ReservationsAfterReply, Status> {
        let limit = match request.limit {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let list = self
            .serving()?
            .reservations_after(request.after, limit)
            .await
            .map_err(status)?;
        Ok(proto::ReservationsAfterReply {
            reservations: list.into_iter().map(to_proto).collect(),
        })
    }

    async fn transfer_out(
        &self,
        _ctx: Context,
        request: proto::TransferOutRequest,
    ) -> Result<proto::TransferOutReply, Status> {
        need("item_id", &request.item_id)?;
        need("transfer_id", &request.transfer_id)?;
        let taken = self
            .serving()?
            .transfer_out(&request.item_id, &request.transfer_id, request.units)
            .await
            .map_err(status)?;
        Ok(proto::TransferOutReply {
            found: taken.is_some(),
            units: taken.unwrap_or(0),
        })
    }

    async fn transfer_in(
        &self,
        _ctx: Context,
        request: proto::TransferInRequest,
    ) -> Result<proto::TransferInReply, Status> {
        need("item_id", &request.item_id)?;
        need("transfer_id", &request.transfer_id)?;
        let found = self
            .serving()?
            .transfer_in(&request.item_id, &request.transfer_id, request.units)
            .await
            .map_err(status)?;
        Ok(proto::TransferInReply { found })
    }

    async fn holders(
        &self,
        _ctx: Context,
        request: proto::HoldersRequest,
    ) -> Result<proto::HoldersReply, Status> {
        let limit = match request.limit {
            0 => 100_000,
            n => n.min(1_000_000) as usize,
        };
        Ok(match self.serving()?.holders(&request.item_id, limit) {
            Some(list) => proto::HoldersReply {
                holders: list
                    .into_iter()
                    .map(|(user_id, request_id)| proto::Holder {
                        user_id,
                        request_id,
                    })
                    .collect(),
                complete: true,
            },
            None => proto::HoldersReply::default(),
        })
    }

    async fn get_reservation(
        &self,
        _ctx: Context,
        request: proto::GetReservationRequest,
    ) -> Result<proto::GetReservationReply, Status> {
        Ok(proto::GetReservationReply {
            reservation: self
                .serving()?
                .reservation(request.reservation_id)
                .map(to_proto),
        })
    }
}
