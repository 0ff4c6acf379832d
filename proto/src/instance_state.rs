//! [`InstanceState`]: where one instance of an app is in its lifecycle, the one enum every
//! component matches on (the agent's supervisor sets it, the controller's rollout engine and
//! fleetctl read it), so a new state is a compile error wherever it must be handled.
//!
//! On the wire it is the `InstanceState` enum of `fleet.proto`; agents before that enum sent
//! only the text in `legacy_state`, which [`InstanceState::from_report`] still reads: the
//! controller accepts agents one version behind it.

use crate::pb;
use serde::{Deserialize, Serialize};

/// The lifecycle of one instance: fetching → unpacking → starting → checking → running, then
/// stopping → stopped on the way out; failed (it never became healthy) and crashed (it exited
/// after it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstanceState {
    Fetching,
    Unpacking,
    Starting,
    Checking,
    Running,
    Stopping,
    Stopped,
    Failed,
    Crashed,
}

impl InstanceState {
    pub const ALL: [InstanceState; 9] = [
        InstanceState::Fetching,
        InstanceState::Unpacking,
        InstanceState::Starting,
        InstanceState::Checking,
        InstanceState::Running,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::Failed,
        InstanceState::Crashed,
    ];

    /// The name people and JSON see (`running`), also the legacy wire text.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Fetching => "fetching",
            InstanceState::Unpacking => "unpacking",
            InstanceState::Starting => "starting",
            InstanceState::Checking => "checking",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
            InstanceState::Crashed => "crashed",
        }
    }

    /// The state named `text` ([`InstanceState::as_str`]).
    pub fn parse(text: &str) -> Option<InstanceState> {
        InstanceState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn to_wire(self) -> pb::InstanceState {
        match self {
            InstanceState::Fetching => pb::InstanceState::Fetching,
            InstanceState::Unpacking => pb::InstanceState::Unpacking,
            InstanceState::Starting => pb::InstanceState::Starting,
            InstanceState::Checking => pb::InstanceState::Checking,
            InstanceState::Running => pb::InstanceState::Running,
            InstanceState::Stopping => pb::InstanceState::Stopping,
            InstanceState::Stopped => pb::InstanceState::Stopped,
            InstanceState::Failed => pb::InstanceState::Failed,
            InstanceState::Crashed => pb::InstanceState::Crashed,
        }
    }

    /// The state a wire value names; `None` for UNSPECIFIED (or a number this build does not
    /// know, which prost reads as UNSPECIFIED).
    pub fn from_wire(state: pb::InstanceState) -> Option<InstanceState> {
        match state {
            pb::InstanceState::Unspecified => None,
            pb::InstanceState::Fetching => Some(InstanceState::Fetching),
            pb::InstanceState::Unpacking => Some(InstanceState::Unpacking),
            pb::InstanceState::Starting => Some(InstanceState::Starting),
            pb::InstanceState::Checking => Some(InstanceState::Checking),
            pb::InstanceState::Running => Some(InstanceState::Running),
            pb::InstanceState::Stopping => Some(InstanceState::Stopping),
            pb::InstanceState::Stopped => Some(InstanceState::Stopped),
            pb::InstanceState::Failed => Some(InstanceState::Failed),
            pb::InstanceState::Crashed => Some(InstanceState::Crashed),
        }
    }

    /// The state a report carries: the enum, or, from an agent that sends only the text
    /// (one version older), the text. `None` when neither names a state.
    pub fn from_report(report: &pb::InstanceReport) -> Option<InstanceState> {
        InstanceState::from_wire(report.state())
            .or_else(|| InstanceState::parse(&report.legacy_state))
    }

    /// Sets both wire fields of `report` to this state (the text for controllers one version
    /// older).
    pub fn write_to(self, report: &mut pb::InstanceReport) {
        report.set_state(self.to_wire());
        report.legacy_state = self.as_str().to_string();
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serialises the wire enum field of `InstanceReport` as the state's name, for `--output json`.
pub fn serialize_wire<S: serde::Serializer>(state: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    let name = pb::InstanceState::try_from(*state)
        .ok()
        .and_then(InstanceState::from_wire)
        .map_or("unknown", InstanceState::as_str);
    serializer.serialize_str(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_the_wire_and_its_name() {
        for state in InstanceState::ALL {
            assert_eq!(InstanceState::from_wire(state.to_wire()), Some(state));
            assert_eq!(InstanceState::parse(state.as_str()), Some(state));
            let mut report = pb::InstanceReport::default();
            state.write_to(&mut report);
            assert_eq!(InstanceState::from_report(&report), Some(state));
        }
        assert_eq!(
            InstanceState::from_wire(pb::InstanceState::Unspecified),
            None
        );
        assert_eq!(InstanceState::parse("Running"), None);
    }

    #[test]
    fn a_report_from_an_agent_one_version_older_is_read_from_its_text() {
        let older = pb::InstanceReport {
            legacy_state: "crashed".into(),
            ..Default::default()
        };
        assert_eq!(
            InstanceState::from_report(&older),
            Some(InstanceState::Crashed)
        );
        // The enum wins when both are there.
        let mut newer = older.clone();
        newer.set_state(pb::InstanceState::Running);
        assert_eq!(
            InstanceState::from_report(&newer),
            Some(InstanceState::Running)
        );
        // Neither: no state at all.
        let neither = pb::InstanceReport {
            legacy_state: "exploded".into(),
            ..Default::default()
        };
        assert_eq!(InstanceState::from_report(&neither), None);
        // A number this build does not know is not a state either.
        let unknown = pb::InstanceReport {
            state: 42,
            ..Default::default()
        };
        assert_eq!(InstanceState::from_report(&unknown), None);
    }

    #[test]
    fn json_names_the_state() {
        let mut report = pb::InstanceReport::default();
        InstanceState::Checking.write_to(&mut report);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["state"], "checking");
        assert!(json.get("legacy_state").is_none());
    }
}
