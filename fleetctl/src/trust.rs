//! The trust verbs: `fleetctl join-token create [--ttl DUR]` (a one-time token a new host
//! joins with) and `fleetctl credentials create NAME --role admin|deployer --out DIR` (a
//! client credential for an operator or a CI job: the key is made here and never leaves this
//! machine; the controller signs a certificate request; `--ttl` sets how long it is valid),
//! `credentials list` (name, role, expiry, last use, renewed or revoked) and `credentials
//! revoke NAME`. All need the admin role. A credential renews itself: see `renewal`.

use crate::args::CredentialsCreateArgs;
use crate::client::{usage, CliError, CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};
use crate::commands::Context;
use crate::{init, output};
use fleet_proto::pb;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `fleetctl join-token create`: prints the token (text: the token alone on stdout).
pub async fn join_token_create(
    ctx: &Context,
    ttl: Duration,
    labels: &[(String, String)],
) -> Result<pb::CreateJoinTokenResponse, CliError> {
    let response = create_join_token(ctx, ttl, labels).await?;
    if ctx.output == output::OutputFormat::Json {
        output::print_json(&response);
    } else {
        println!("{}", response.token);
        eprintln!(
            "join token valid for {}, for one host: fleet-agent --join-token TOKEN --ca CA.pem --controller {} ...",
            fleet_proto::duration::format_duration(ttl),
            ctx.connection.url
        );
    }
    Ok(response)
}

/// Asks the controller for a join token without printing it (the demo and bootstrap use
/// this); the host that joins with it gets `labels` when they are not empty.
pub async fn create_join_token(
    ctx: &Context,
    ttl: Duration,
    labels: &[(String, String)],
) -> Result<pb::CreateJoinTokenResponse, CliError> {
    let ttl_ms = ttl.as_millis().min(u64::MAX as u128) as u64;
    if ttl_ms == 0 {
        return Err(usage("--ttl must be more than 0, e.g. 1h"));
    }
    let mut client = ctx.connection.client.clone();
    client
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_ms,
            labels: labels.iter().cloned().collect(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|status| ctx.connection.error(status))
}

/// What `credentials create` wrote.
#[derive(Debug, serde::Serialize)]
pub struct CredentialOutcome {
    pub name: String,
    pub role: String,
    pub dir: PathBuf,
    /// The first of `controller_urls`, the one the credential's holder dials.
    pub controller_url: String,
    /// What the credential's client.toml names.
    pub controller_urls: Vec<String>,
}

/// `fleetctl credentials create NAME --role ROLE --out DIR`.
pub async fn credentials_create(
    ctx: &Context,
    create: &CredentialsCreateArgs,
) -> Result<CredentialOutcome, CliError> {
    let out = &create.out;
    let key_path = out.join(CLIENT_KEY_FILE);
    if key_path.exists() {
        return Err(usage(format!(
            "{} already exists: pass --out with a new directory",
            key_path.display()
        )));
    }
    let (csr_pem, key_pem) = fleet_pki::request::new_key_and_request(&create.name)
        .map_err(|e| CliError::Failed(format!("cannot make a key: {e}")))?;
    let mut client = ctx.connection.client.clone();
    let response = client
        .issue_credential(pb::IssueCredentialRequest {
            name: create.name.clone(),
            role: create.role.as_str().to_string(),
            csr_pem,
            ttl_ms: create
                .ttl
                .map_or(0, |ttl| ttl.as_millis().min(u64::MAX as u128) as u64),
        })
        .await
        .map_err(|status| ctx.connection.error(status))?
        .into_inner();
    std::fs::create_dir_all(out).map_err(|e| {
        usage(format!(
            "cannot create {}: {e}; pass --out with a directory you can write",
            out.display()
        ))
    })?;
    write_private(&key_path, &key_pem)?;
    write_file(&out.join(CLIENT_CERT_FILE), &response.certificate_pem)?;
    write_file(&out.join(CA_FILE), &response.ca_pem)?;
    init::write_client_toml(&out.join("client.toml"), &ctx.connection.controller_urls)?;
    let outcome = CredentialOutcome {
        name: create.name.clone(),
        role: create.role.as_str().to_string(),
        dir: out.clone(),
        controller_url: ctx.connection.url.clone(),
        controller_urls: ctx.connection.controller_urls.clone(),
    };
    if ctx.output == output::OutputFormat::Json {
        output::print_json(&outcome);
    } else {
        println!(
            "wrote credential `{}` (role {}) to {}: use it with fleetctl --config-dir {}",
            outcome.name,
            outcome.role,
            out.display(),
            out.display()
        );
    }
    Ok(outcome)
}

/// `fleetctl credentials list`.
pub async fn credentials_list(ctx: &Context) -> Result<Vec<pb::Credential>, CliError> {
    let mut client = ctx.connection.client.clone();
    let credentials = client
        .list_credentials(pb::ListCredentialsRequest {})
        .await
        .map_err(|status| ctx.connection.error(status))?
        .into_inner()
        .credentials;
    if ctx.output == output::OutputFormat::Json {
        output::print_json(&credentials);
    } else {
        print!(
            "{}",
            credentials_table(&credentials, fleet_proto::now_unix_ms())
        );
    }
    Ok(credentials)
}

/// The table `credentials list` prints.
fn credentials_table(credentials: &[pb::Credential], now_unix_ms: i64) -> String {
    let mut table =
        output::Table::new(&["NAME", "ROLE", "EXPIRES", "LAST USED", "STATE", "SERIAL"]);
    for credential in credentials {
        let state = if credential.revoked_unix_ms > 0 {
            format!(
                "revoked {}",
                output::ago(credential.revoked_unix_ms, now_unix_ms)
            )
        } else if credential.not_after_unix_ms <= now_unix_ms {
            "expired".to_string()
        } else if !credential.renewed_by.is_empty() {
            format!("renewed ({})", short_serial(&credential.renewed_by))
        } else {
            "valid".to_string()
        };
        table.row(vec![
            credential.name.clone(),
            credential.role.clone(),
            output::utc_time(credential.not_after_unix_ms),
            output::ago(credential.last_used_unix_ms, now_unix_ms),
            state,
            credential.serial.clone(),
        ]);
    }
    table.render()
}

/// The first 8 hex digits of a serial, enough to tell certificates apart in a table.
fn short_serial(serial: &str) -> &str {
    serial.get(..8).unwrap_or(serial)
}

/// `fleetctl credentials revoke NAME`.
pub async fn credentials_revoke(
    ctx: &Context,
    name: &str,
) -> Result<pb::RevokeCredentialResponse, CliError> {
    let mut client = ctx.connection.client.clone();
    let response = client
        .revoke_credential(pb::RevokeCredentialRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|status| ctx.connection.error(status))?
        .into_inner();
    if ctx.output == output::OutputFormat::Json {
        output::print_json(&response);
    } else {
        let serials: Vec<&str> = response.revoked.iter().map(|c| c.serial.as_str()).collect();
        println!(
            "revoked credential `{name}` (certificate {}): every call with it is refused from now on",
            serials.join(", ")
        );
    }
    Ok(response)
}

/// What `ca rotate` did.
#[derive(Debug, serde::Serialize)]
pub struct RotateOutcome {
    pub finished: bool,
    pub message: String,
    /// Files of --config-dir rewritten (ca.pem; client.key and client.pem when starting).
    pub rewrote: Vec<PathBuf>,
    pub hosts_not_connected: Vec<String>,
}

/// `fleetctl ca rotate [--finish]`: starts or ends a CA rotation, and keeps this credential's
/// directory usable across it (the CA bundle; when starting, a key and certificate of the new
/// CA for the same name and role).
pub async fn ca_rotate(
    ctx: &Context,
    config_dir: &Path,
    finish: bool,
) -> Result<RotateOutcome, CliError> {
    let mut client = ctx.connection.client.clone();
    let (csr_pem, key_pem) = if finish {
        (String::new(), String::new())
    } else {
        fleet_pki::request::new_key_and_request("fleetctl")
            .map_err(|e| CliError::Failed(format!("cannot make a key: {e}")))?
    };
    let response = client
        .rotate_ca(pb::RotateCaRequest { finish, csr_pem })
        .await
        .map_err(|status| ctx.connection.error(status))?
        .into_inner();
    let mut rewrote = Vec::new();
    if !response.certificate_pem.is_empty() {
        let (key_path, cert_path) = (
            config_dir.join(CLIENT_KEY_FILE),
            config_dir.join(CLIENT_CERT_FILE),
        );
        replace_private(&key_path, &key_pem)?;
        replace_private(&cert_path, &response.certificate_pem)?;
        rewrote.extend([key_path, cert_path]);
    }
    let ca_path = config_dir.join(CA_FILE);
    replace_private(&ca_path, &response.ca_pem)?;
    rewrote.push(ca_path);
    let outcome = RotateOutcome {
        finished: finish,
        message: response.message,
        rewrote,
        hosts_not_connected: response.hosts_not_connected,
    };
    if ctx.output == output::OutputFormat::Json {
        output::print_json(&outcome);
    } else {
        println!("{}", outcome.message);
        for path in &outcome.rewrote {
            println!("rewrote {}", path.display());
        }
        if !outcome.hosts_not_connected.is_empty() {
            println!(
                "not connected: {}; a host that did not renew during the rotation must join again (`fleetctl remove HOST`, then bootstrap it)",
                outcome.hosts_not_connected.join(", ")
            );
        }
    }
    Ok(outcome)
}

/// Replaces a file (mode 0600) through a temporary file and a rename.
fn replace_private(path: &Path, text: &str) -> Result<(), CliError> {
    fleet_pki::files::write_private_atomically(path, text)
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))
}

fn write_private(path: &Path, text: &str) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|e| usage(format!("cannot write {}: {e}", path.display())))
}

fn write_file(path: &Path, text: &str) -> Result<(), CliError> {
    std::fs::write(path, text).map_err(|e| usage(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credentials_table_says_which_are_valid_expired_or_revoked() {
        let now = 10 * 86_400_000;
        let credential =
            |name: &str, not_after: i64, last_used: i64, revoked: i64| pb::Credential {
                name: name.to_string(),
                role: "deployer".to_string(),
                serial: "ab".to_string(),
                not_after_unix_ms: not_after,
                last_used_unix_ms: last_used,
                revoked_unix_ms: revoked,
                ..Default::default()
            };
        let table = credentials_table(
            &[
                credential("ci", now + 1, now - 90_000, 0),
                credential("old", now - 1, 0, 0),
                credential("gone", now + 1, 0, now - 7_200_000),
                pb::Credential {
                    renewed_by: "0123456789abcdef".to_string(),
                    ..credential("admin", now + 1, now - 60_000, 0)
                },
            ],
            now,
        );
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|line| {
                line.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect();
        assert_eq!(
            lines[0],
            ["NAME", "ROLE", "EXPIRES", "LAST USED", "STATE", "SERIAL"]
        );
        assert_eq!(
            (lines[1][0], lines[1][3], lines[1][4]),
            ("ci", "1m ago", "valid")
        );
        assert_eq!(
            (lines[2][0], lines[2][3], lines[2][4]),
            ("old", "-", "expired")
        );
        assert_eq!((lines[3][0], lines[3][4]), ("gone", "revoked 2h ago"));
        assert_eq!((lines[4][0], lines[4][4]), ("admin", "renewed (01234567)"));
    }
}
