//! Fuzzes `fleet.toml` parsing: any bytes must give a manifest or an error, never a panic,
//! and a manifest that parses must satisfy what hosts rely on (a non-empty command).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = fleet_proto::manifest::Manifest::parse(text) {
        assert!(!manifest.process.command.is_empty());
        assert!(!manifest.process.command[0].trim().is_empty());
        assert!(manifest.process.command.iter().all(|a| !a.contains('\0')));
    }
});
