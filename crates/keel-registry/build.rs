//! Generates the registry's messages, service trait, server and client from its .proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    keel_rpc_build::Builder::new()
        .bytes(["."])
        .compile(&["proto/registry.proto"], &["proto"])?;
    Ok(())
}
