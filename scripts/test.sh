#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need, builds the
# binaries the end-to-end tests start as real processes, then runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests start fleet-controller, fleet-agent and the example app as processes;
# they find them in target/debug beside the test binaries.
cargo build --workspace --bins
cargo test --workspace -- --test-threads=2
