#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need, builds the
# binaries the end-to-end tests start as real processes, then runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# The SSH bootstrap tests start a real OpenSSH sshd on loopback (tests/src/sshd.rs); the unit
# test checks packaging/systemd with systemd-analyze; the status page test loads the page in a
# headless Chromium; the contrib/ alert rules are checked with promtool (Debian's prometheus);
# the store's tests and the etcd end-to-end tests start real etcd servers on loopback (Debian's
# etcd-server, /usr/bin/etcd; etcd-harness/). Install whichever is missing.
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
# The --agent-deb bootstrap test runs sshd and the real dpkg -i in a disposable root made with
# util-linux's unshare and entered with its nsenter (tests/src/disposable_root.rs).
command -v unshare >/dev/null && command -v nsenter >/dev/null || missing+=(util-linux)
command -v dpkg >/dev/null || missing+=(dpkg)
command -v etcd >/dev/null || missing+=(etcd-server)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
  # The package starts a system etcd on 2379; the tests start their own on free ports.
  if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null; then
    $SUDO systemctl disable --now etcd 2>/dev/null || true
  fi
fi
# Without etcd the etcd tests would skip; here they must run.
export FLEET_REQUIRE_ETCD=1

# The end-to-end tests start fleet-controller, fleet-agent and the example app as processes;
# they find them in target/debug beside the test binaries.
cargo build --workspace --bins
# The agent of the previous release, for tests/tests/previous_agent.rs.
bash scripts/build-previous-agent.sh
cargo test --workspace -- --test-threads=2
