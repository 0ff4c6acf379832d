//! tonic clients for the parts of etcd's v3 gRPC API that fleet uses (KV, Lease, Maintenance
//! Status, Election), generated at build time from the protos in `proto/` with protox: no
//! system `protoc` is needed, unlike the `etcd-client` crate's build script.

#![allow(clippy::all, missing_docs)]

/// Package `mvccpb`: `KeyValue`.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// Package `etcdserverpb`: the KV, Lease and Maintenance clients and their messages.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// Package `v3electionpb`: the Election client.
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
