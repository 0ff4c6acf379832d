//! Fuzzes the artifact reader both ways it runs: checking (the controller at `release
//! create`) and unpacking into a fresh directory (the agent). The input is used raw and also
//! gzip-compressed, so the fuzzer reaches the tar layer without having to learn deflate.
//! Invariants: no panic; check and unpack agree; nothing is ever written outside the
//! destination (the sandbox directory holds only the destination afterwards).
#![no_main]

use fleet_proto::artifact::{read_artifact, Limits};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

const LIMITS: Limits = Limits {
    max_entry_bytes: 1 << 20,
    max_total_bytes: 4 << 20,
    max_entries: 1000,
};

fn check_both_ways(bytes: &[u8]) {
    let checked = read_artifact(bytes, None, LIMITS);
    let sandbox = tempfile::tempdir().expect("a temp dir");
    let dest = sandbox.path().join("release");
    let unpacked = read_artifact(bytes, Some(&dest), LIMITS);
    assert_eq!(
        checked.is_ok(),
        unpacked.is_ok(),
        "check and unpack disagree: {checked:?} vs {unpacked:?}"
    );
    let names: Vec<_> = std::fs::read_dir(sandbox.path())
        .expect("read the sandbox")
        .map(|e| e.expect("an entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("release")],
        "wrote outside"
    );
}

fuzz_target!(|data: &[u8]| {
    check_both_ways(data);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).expect("compress");
    check_both_ways(&gz.finish().expect("compress"));
});
