//! The controller's address, end to end: `fleetctl init --url` records the address hosts,
//! operators and CI dial; a fleetctl with only client.toml reaches the controller there, the
//! credential `credentials create` writes carries it, a host dialling it joins, and the
//! controller's certificate verifies under the URL's host. An unspecified listen address
//! without `--url`, or a URL that is not https, is refused before anything is written.

use fleet_proto::pb;
use fleet_tests::fleet::Fleet;
use fleet_tests::grpc::{admin_identity, runtime};
use fleet_tests::process;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::transport::Channel;

/// client.toml's `controller`, as written.
fn client_toml_controller(config_dir: &Path) -> toml::Value {
    let text = std::fs::read_to_string(config_dir.join("client.toml")).expect("client.toml");
    let table: toml::Table = toml::from_str(&text).expect("client.toml is TOML");
    table["controller"].clone()
}

/// A mutual-TLS channel to `url` that verifies the controller's certificate under
/// `server_name`, presenting the admin credential.
async fn channel_verifying(
    fleet: &Fleet,
    url: &str,
    server_name: &str,
) -> Result<Channel, tonic::transport::Error> {
    fleet_tests::grpc::channel_to(fleet, url, server_name, Some(admin_identity(fleet))).await
}

#[test]
fn operators_ci_and_hosts_dial_the_url_init_recorded() {
    // The controller listens on 127.0.0.1 and picks its port; hosts and people dial it by name.
    let mut fleet = Fleet::start_with_init_args(0, &["--url", "https://localhost:0"]);
    let config_dir = fleet.config_dir();
    assert_eq!(
        client_toml_controller(&config_dir).as_str(),
        Some("https://localhost:0")
    );
    let port = fleet
        .controller_url()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let url = format!("https://localhost:{port}");

    // An operator with nothing but the config dir reaches the controller at the URL, and the
    // CI credential made that way names the URL too.
    let ci_dir = fleet.dir().join("ci");
    let created = fleet
        .ctl_in(
            &config_dir,
            &[
                "credentials",
                "create",
                "ci",
                "--role",
                "deployer",
                "--out",
                &ci_dir.display().to_string(),
            ],
        )
        .expect_code(0);
    assert_eq!(created.json["controller_url"].as_str(), Some(url.as_str()));
    assert_eq!(client_toml_controller(&ci_dir).as_str(), Some(url.as_str()));
    let hosts = fleet.ctl_in(&ci_dir, &["hosts"]).expect_code(0);
    assert!(hosts.json["hosts"].as_array().is_none_or(Vec::is_empty));

    // A host dialling the URL joins and shows as ready.
    fleet.set_agent_controller_url(&url);
    fleet.start_agent("h1");
    fleet.wait_hosts_ready(1);
    let hosts = fleet.ctl_in(&ci_dir, &["hosts"]).expect_code(0);
    assert_eq!(hosts.json["hosts"][0]["name"].as_str(), Some("h1"));

    // The controller's certificate verifies under the URL's host (and verification is real:
    // a name the certificate does not carry is refused).
    runtime().block_on(async {
        let channel = channel_verifying(&fleet, &url, "localhost")
            .await
            .expect("the certificate verifies as localhost");
        let hosts = pb::fleet_service_client::FleetServiceClient::new(channel)
            .list_hosts(pb::ListHostsRequest::default())
            .await
            .expect("list hosts over the URL")
            .into_inner();
        assert_eq!(hosts.hosts[0].name, "h1");
        let wrong = channel_verifying(&fleet, &url, "not-the-controller.example").await;
        assert!(
            wrong.is_err(),
            "a name the certificate lacks must not verify"
        );
    });
}

#[test]
fn init_refuses_an_address_nobody_can_dial() {
    let fleetctl = fleet_tests::bins::Bins::locate().fleetctl;
    let tmp = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            &["--listen", "0.0.0.0:7700"][..],
            "--url https://controller.example.com:7700",
        ),
        (&["--listen", "[::]:7700"][..], "--url https://"),
        (
            &[
                "--listen",
                "0.0.0.0:7700",
                "--url",
                "http://controller.example.com:7700",
            ][..],
            "not https",
        ),
        (
            &["--listen", "0.0.0.0:7700", "--url", "https://:7700"][..],
            "has no host",
        ),
    ] {
        let dir = tmp.path().join("fleet");
        let mut command = Command::new(&fleetctl);
        command
            .arg("init")
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .env("HOME", tmp.path())
            .env_remove("FLEET_CONFIG_DIR")
            .env_remove("FLEET_CONTROLLER");
        let out = process::run_with_deadline(command, Duration::from_secs(30));
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
        assert!(!dir.exists(), "{args:?} wrote {}", dir.display());
    }
}
