//! What a controller that does not lead answers itself and what it sends to the leader. A
//! follower serves `fleetctl`'s reads that come whole from the shared store (releases, history,
//! a rollout's record, credentials, a store export, the controllers) and the artifact copies
//! other controllers push or pull (`crate::replicas`); everything
//! else (every write, the agents' calls, and the reads that show what only the leader knows
//! live: `status`, `hosts`, deployments, a watched rollout, events, logs) is answered with
//! the redirect of `fleet_proto::leader`, which fleetctl and the agent follow. The edge asks
//! [`refusal`] before it reads a byte of the call.

use crate::leader::Role;

/// Where a call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// By any controller: the store holds the whole answer.
    Any,
    /// By the leader only.
    Leader,
}

/// Where the call at gRPC `path` is answered. Pure.
pub fn route(path: &str) -> Route {
    const ANY: [&str; 7] = [
        "/fleet.v1.FleetService/ListReleases",
        "/fleet.v1.FleetService/History",
        "/fleet.v1.FleetService/GetRollout",
        "/fleet.v1.FleetService/ListCredentials",
        "/fleet.v1.FleetService/ExportStore",
        "/fleet.v1.FleetService/ListControllers",
        "/grpc.health.v1.Health/Check",
    ];
    // Artifact copies between controllers: every controller takes and gives them.
    if ANY.contains(&path) || path.starts_with("/fleet.v1.ReplicaService/") {
        Route::Any
    } else {
        Route::Leader
    }
}

/// The answer a controller in `role` gives at once to the call at `path`, if it does not
/// serve it: the redirect to the leader (or "no leader yet").
pub fn refusal(role: &Role, path: &str) -> Option<tonic::Status> {
    if role.is_leader() || route(path) == Route::Any {
        return None;
    }
    Some(fleet_proto::leader::not_leader_status(role.leader_url()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_serves_reads_of_the_store_and_sends_the_rest_to_the_leader() {
        let follower = Role::Follower {
            leader: Some("https://127.0.0.1:7701".into()),
        };
        let leader = Role::sole();
        for (path, served_by_follower) in [
            ("/fleet.v1.FleetService/ListReleases", true),
            ("/fleet.v1.FleetService/History", true),
            ("/fleet.v1.FleetService/ListControllers", true),
            ("/fleet.v1.FleetService/ExportStore", true),
            ("/fleet.v1.FleetService/GetRollout", true),
            ("/fleet.v1.FleetService/ListCredentials", true),
            ("/grpc.health.v1.Health/Check", true),
            ("/fleet.v1.FleetService/ListDeployments", false),
            ("/fleet.v1.FleetService/CreateRelease", false),
            ("/fleet.v1.FleetService/StartRollout", false),
            ("/fleet.v1.FleetService/Status", false),
            ("/fleet.v1.FleetService/ListHosts", false),
            ("/fleet.v1.FleetService/WatchRollout", false),
            ("/fleet.v1.FleetService/Events", false),
            ("/fleet.v1.FleetService/DrainHost", false),
            ("/fleet.v1.FleetService/CreateJoinToken", false),
            ("/fleet.v1.AgentService/Session", false),
            ("/fleet.v1.AgentService/Join", false),
            ("/fleet.v1.AgentService/FetchArtifact", false),
            ("/fleet.v1.FleetService/NoSuchCall", false),
            ("/fleet.v1.ReplicaService/PushArtifact", true),
            ("/fleet.v1.ReplicaService/PullArtifact", true),
        ] {
            assert_eq!(
                refusal(&follower, path).is_none(),
                served_by_follower,
                "{path}"
            );
            assert!(refusal(&leader, path).is_none(), "the leader serves {path}");
        }
        let redirect = refusal(&follower, "/fleet.v1.FleetService/StartRollout").unwrap();
        assert_eq!(
            fleet_proto::leader::leader_of(&redirect).as_deref(),
            Some("https://127.0.0.1:7701")
        );
        let unknown = refusal(
            &Role::Follower { leader: None },
            "/fleet.v1.FleetService/StartRollout",
        )
        .unwrap();
        assert_eq!(unknown.code(), tonic::Code::Unavailable);
        assert!(unknown.message().contains("no leader elected yet"));
    }
}
