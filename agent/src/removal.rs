//! What the agent does when the controller answers that its host was removed (the explicit
//! revoked answer of `fleet_proto::refusal`, never any other refusal): the supervisor stops
//! every instance, then, when the removal was `--purge`, the host's releases, secrets and state
//! are wiped here ([`purge`]), the systemd unit the agent runs under is disabled
//! ([`disable_unit`]), and the agent exits with [`EXIT_REVOKED`], which the shipped unit lists
//! in `RestartPreventExitStatus=`, so it is not restarted.
//!
//! The agent's key and revoked certificate (`tls/`) and its logs stay: a copy started by hand
//! is refused as revoked again at once and exits, rather than trying to join.

use crate::model::DataLayout;
use std::path::PathBuf;

/// The exit status of an agent whose host was removed (78, `EX_CONFIG` of sysexits.h: its
/// credential is no longer valid, and restarting cannot fix that).
pub const EXIT_REVOKED: u8 = 78;

/// The environment variable naming the systemd unit the agent runs under (the shipped unit
/// sets it to `%n`); unset, no unit is disabled.
pub const UNIT_ENV: &str = "FLEET_AGENT_UNIT";

/// What `--purge` wipes: the releases, instances (working directories), each app's lasting
/// directory (`FLEET_STATE_DIR`), the release hooks' directories, the artifacts, and
/// `state.json` (which holds the release environments and secrets). Pure.
pub fn purge_targets(layout: &DataLayout) -> Vec<PathBuf> {
    let root = layout.root();
    vec![
        root.join("releases"),
        root.join("instances"),
        root.join("app-state"),
        root.join("hooks"),
        layout.artifacts_dir(),
        layout.state_file(),
    ]
}

/// Wipes [`purge_targets`]; says what could not be removed.
pub async fn purge(layout: &DataLayout) {
    for target in purge_targets(layout) {
        let removed = match tokio::fs::symlink_metadata(&target).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(e),
            Ok(meta) if meta.is_dir() => tokio::fs::remove_dir_all(&target).await,
            Ok(_) => tokio::fs::remove_file(&target).await,
        };
        match removed {
            Ok(()) => tracing::info!(path = %target.display(), "purged"),
            Err(e) => tracing::error!(path = %target.display(), "cannot purge: {e}"),
        }
    }
}

/// The unit to disable, from [`UNIT_ENV`]'s value: a plain unit name only (no path, no
/// option), else none. Pure.
pub fn unit_to_disable(value: Option<&str>) -> Option<String> {
    let unit = value?.trim();
    let valid = unit.ends_with(".service")
        && !unit.starts_with('-')
        && unit
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._-:".contains(c));
    valid.then(|| unit.to_string())
}

/// Disables the systemd unit the agent runs under, if it runs under one, so that a reboot
/// does not start it again. `systemctl disable` asks systemd over D-Bus, which changes the
/// unit's links in /etc itself, so it works from inside the unit's read-only sandbox. Not
/// `--now`: the agent exits on its own with [`EXIT_REVOKED`], which the unit does not restart.
pub async fn disable_unit() {
    let Some(unit) = unit_to_disable(std::env::var(UNIT_ENV).ok().as_deref()) else {
        return;
    };
    let output = tokio::process::Command::new("systemctl")
        .arg("disable")
        .arg(&unit)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match output {
        Ok(output) if output.status.success() => {
            tracing::info!(%unit, "disabled the unit: it does not start again at boot")
        }
        Ok(output) => tracing::error!(
            %unit,
            "cannot disable the unit ({}): {}; run `systemctl disable {unit}` on this host",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => tracing::error!(
            %unit,
            "cannot run systemctl to disable the unit: {e}; run `systemctl disable {unit}` on this host"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_unit_name_is_disabled() {
        for (value, expect) in [
            (None, None),
            (Some(""), None),
            (Some("fleet-agent.service"), Some("fleet-agent.service")),
            (
                Some(" fleet-agent@web.service\n"),
                Some("fleet-agent@web.service"),
            ),
            (Some("fleet-agent"), None),
            (Some("--now.service"), None),
            (Some("../x.service"), None),
            (Some("a b.service"), None),
        ] {
            assert_eq!(unit_to_disable(value).as_deref(), expect, "{value:?}");
        }
    }

    #[test]
    fn purge_wipes_releases_secrets_and_state_but_not_the_identity_or_logs() {
        let layout = DataLayout::new(std::path::Path::new("/data"));
        let targets: Vec<String> = purge_targets(&layout)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            targets,
            [
                "/data/releases",
                "/data/instances",
                "/data/app-state",
                "/data/hooks",
                "/data/artifacts",
                "/data/state.json"
            ]
        );
    }
}
