//! The example app as a library: only its `fleet.toml`, so `fleetctl demo` can deploy the app
//! with the manifest that ships beside it, without a path into this folder.

/// The example app's `fleet.toml`.
pub const MANIFEST: &str = include_str!("../fleet.toml");
