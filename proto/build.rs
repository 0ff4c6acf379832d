//! Compiles `fleet.proto` with protox (a protobuf compiler written in Rust), so the build needs
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fleet.proto");
    let descriptors = protox::compile(["fleet.proto"], ["."])?;
    // Every message serialises to JSON, which is what `fleetctl --output json` prints.
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        // In JSON an instance's state is its name ("running"), once: not a number beside the
        // legacy text field.
        .field_attribute(
            ".fleet.v1.InstanceReport.state",
            "#[serde(serialize_with = \"crate::instance_state::serialize_wire\")]",
        )
        .field_attribute(".fleet.v1.InstanceReport.legacy_state", "#[serde(skip)]")
        // Artifact bytes as `bytes::Bytes`: decoding slices the received buffer instead of
        // copying every chunk once more.
        .bytes(".fleet.v1.ArtifactChunk.data")
        .bytes(".fleet.v1.PeerChunk.data")
        .bytes(".fleet.v1.CreateReleaseRequest.chunk")
        .bytes(".fleet.v1.PushArtifactRequest.data")
        .compile_fds(descriptors)?;
    Ok(())
}
