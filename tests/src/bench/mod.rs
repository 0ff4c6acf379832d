//! fleet-bench's benchmarks that live in modules of their own (so that several can be added
//! without editing one file together); `fleet-bench.rs` dispatches to them. Each uses the
//! binary's shared pieces (`Row`, `CpuSplit`, `timed_bootstrap`) through `crate::`.

pub mod bootstrap_ansible;
