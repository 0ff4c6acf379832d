//! Parts of `fleet-bench` that live in modules of their own (the binary only dispatches to
//! them), so that benchmarks added side by side do not all edit one file.

pub mod waves;
