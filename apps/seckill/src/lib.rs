//! Keel's flash-sale (seckill) reference application: thousands of buyers fighting over a few
//! items in a short burst, and the stock never oversold.
//!
//! This first slice is the inventory: [`inventory::Inventory`], one inventory instance's share
//! of the stock, whose every reservation is in its journal before it is acknowledged. The
//! services, the orders queue, the catalog and `keel up` build on it.

pub mod inventory;

pub use inventory::{Inventory, InventoryError, Refusal, Reservation};
