//! Generates the echo service code from `proto/echo.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Payloads are opaque blobs: share the received buffer instead of copying them.
    keel_rpc_build::Builder::new()
        .bytes(["."])
        .compile(&["proto/echo.proto"], &["proto"])?;
    Ok(())
}
