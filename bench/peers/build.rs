//! Compiles the echo service's .proto for tonic, with protox (no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = "../../crates/keel-echo/proto";
    let proto = format!("{dir}/echo.proto");
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], [dir])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
