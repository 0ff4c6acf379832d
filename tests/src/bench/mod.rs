//! Benchmarks of `fleet-bench` that live in modules of their own (the dispatch stays in
//! `src/bin/fleet-bench.rs`): [`scale`], many simulated agents on one controller; [`fanout`],
//! artifact fan-out through peers against the direct fetch; [`waves`], where a wave's time goes;
//! [`failover`], the leader of three controllers on etcd killed mid-rollout.

pub mod failover;
pub mod fanout;
pub mod scale;
pub mod waves;
