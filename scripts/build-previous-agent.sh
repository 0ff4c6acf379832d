#!/usr/bin/env bash
# Builds the fleet-agent of the previous release (the commit named in compat/previous-agent.rev)
# into target/previous-agent/fleet-agent, for tests/tests/previous_agent.rs: the controller
# accepts agents one version behind it. Idempotent; skips (exit 0, with a message) when the
# commit is not in this clone (a shallow clone), and then that test says it was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

rev=$(tr -d '[:space:]' < compat/previous-agent.rev)
out=target/previous-agent
if [ -x "$out/fleet-agent" ] && [ "$(cat "$out/rev" 2>/dev/null)" = "$rev" ]; then
  exit 0
fi
if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
  echo "build-previous-agent: commit $rev is not in this clone (shallow?): skipping" >&2
  exit 0
fi
src=$(mktemp -d)
cleanup() { git worktree remove --force "$src" >/dev/null 2>&1 || rm -rf "$src"; }
trap cleanup EXIT
git worktree add --detach "$src" "$rev" >/dev/null
cargo build --manifest-path "$src/Cargo.toml" -p fleet-agent --bins --target-dir "$PWD/$out/target"
cp "$out/target/debug/fleet-agent" "$out/fleet-agent"
echo "$rev" > "$out/rev"
