//! Generates the seckill services' code from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    keel_rpc_build::Builder::new()
        .compile(&["proto/inventory.proto", "proto/orders.proto"], &["proto"])?;
    Ok(())
}
