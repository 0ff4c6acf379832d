#!/usr/bin/env bash
# Builds the .deb packages into target/debian/ with cargo-deb:
#   fleet-controller  /usr/bin/fleet-controller, its systemd unit, a system user, /var/lib/fleet-controller
#   fleet-agent       /usr/bin/fleet-agent, its systemd unit, /var/lib/fleet-agent
#   fleetctl          /usr/bin/fleetctl, bash/zsh/fish completions, manual pages
#
#   bash scripts/package.sh           from a release build
#   bash scripts/package.sh --debug   from the dev profile (faster to build; what the test uses)
#
# cargo-deb is installed with `cargo install cargo-deb --locked --version 3.8.0` when it is
# missing (minutes; a version that still builds from the dev profile, which --debug needs).
# `fleetctl bootstrap ssh://root@HOST --agent-deb target/debian/fleet-agent_*.deb` installs the
# agent package on a host with dpkg, writes its agent.toml and starts it (README, "From packages").
# The units are made from packaging/systemd/ (one source for bootstrap and the packages);
# the completions and manual pages from the fleetctl just built. Exit 3: cargo-deb could not be
# installed.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
profile_dir=release
deb_flags=()
case "${1:-}" in
    "") ;;
    --debug) profile=dev; profile_dir=debug; deb_flags=(--fast) ;;
    *) echo "usage: bash scripts/package.sh [--debug]" >&2; exit 2 ;;
esac
target="${CARGO_TARGET_DIR:-target}"

if ! cargo deb --version >/dev/null 2>&1; then
    echo "package.sh: installing cargo-deb (cargo install cargo-deb --locked --version 3.8.0); this takes minutes" >&2
    if ! cargo install cargo-deb --locked --version 3.8.0; then
        echo "package.sh: cargo-deb cannot be installed (see above); no package was built" >&2
        exit 3
    fi
fi

# The whole workspace, as the tests build it: the same features, so nothing is built twice.
cargo build --profile "$profile" --workspace --bins
bin="$target/$profile_dir"

# What the packages hold beside the binaries, made fresh each time, beside the binaries (the
# assets' `target/release/` prefix stands for this profile's directory in cargo-deb).
assets="$bin/package"
rm -rf "$assets"
mkdir -p "$assets/systemd" "$assets/completions" "$assets/man"

# The agent's unit as bootstrap installs it, with its directory /var/lib/fleet-agent and the
# binary in /usr/bin.
{
    echo "# The fleet-agent package's unit, made from packaging/systemd/fleet-agent.service by"
    echo "# scripts/package.sh: the remote dir is /var/lib/fleet-agent, the binary /usr/bin/fleet-agent."
    sed -e 's|@REMOTE_DIR@/bin/fleet-agent|/usr/bin/fleet-agent|g' \
        -e 's|@REMOTE_DIR@|/var/lib/fleet-agent|g' \
        packaging/systemd/fleet-agent.service
} > "$assets/systemd/fleet-agent.service"
# The controller's unit with a system user of its own (made by the package's postinst)
# instead of a dynamic one, its state in /var/lib/fleet-controller, the binary in /usr/bin.
{
    echo "# The fleet-controller package's unit, made from packaging/systemd/fleet-controller.service"
    echo "# by scripts/package.sh: user fleet-controller, state in /var/lib/fleet-controller."
    sed -e 's|/usr/local/bin/fleet-controller|/usr/bin/fleet-controller|g' \
        -e 's|/var/lib/fleet\b|/var/lib/fleet-controller|g' \
        -e 's|^StateDirectory=fleet$|StateDirectory=fleet-controller|' \
        -e 's|^DynamicUser=yes$|User=fleet-controller\nGroup=fleet-controller|' \
        packaging/systemd/fleet-controller.service
} > "$assets/systemd/fleet-controller.service"
for check in "@REMOTE_DIR@" "/usr/local/bin" "DynamicUser"; do
    if grep -q "$check" "$assets/systemd/"*.service; then
        echo "package.sh: a packaged unit still says $check: update the sed lines above" >&2
        exit 1
    fi
done

"$bin/fleetctl" completions bash > "$assets/completions/fleetctl.bash"
"$bin/fleetctl" completions zsh > "$assets/completions/_fleetctl"
"$bin/fleetctl" completions fish > "$assets/completions/fleetctl.fish"
"$bin/fleetctl" man --dir "$assets/man" 2>/dev/null
gzip -9nf "$assets/man/"*.1

mkdir -p "$target/debian"
for package in fleet-controller fleet-agent fleetctl; do
    cargo deb -p "$package" --no-build --profile "$profile" "${deb_flags[@]}" -o "$target/debian/"
done
ls -l "$target/debian/"*.deb
