//! Compiles the etcd v3 API protos in `proto/` with protox (a protobuf compiler written in
//! Rust), so the build needs no system `protoc`; tonic clients only, no servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in [
        "proto/rpc.proto",
        "proto/kv.proto",
        "proto/v3election.proto",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(["rpc.proto", "kv.proto", "v3election.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
