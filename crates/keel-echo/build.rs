//! Generates the echo service code from `proto/echo.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    keel_rpc_build::compile_protos(&["proto/echo.proto"], &["proto"])?;
    Ok(())
}
