//! Benchmarks of `fleet-bench` that live in modules of their own (the binary dispatches to
//! them): [`fanout`], artifact fan-out through peers against the direct fetch.

pub mod fanout;
