//! Compiles `fleet.proto` with protox (a protobuf compiler written in Rust), so the build needs
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fleet.proto");
    let descriptors = protox::compile(["fleet.proto"], ["."])?;
    // Every message serialises to JSON, which is what `fleetctl --output json` prints.
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
