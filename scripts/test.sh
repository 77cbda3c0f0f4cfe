#!/usr/bin/env bash
# The test command: everything CI checks, runnable on a fresh machine.
#   formatting, clippy with warnings as errors, rustdoc with warnings as errors, every
#   test and doc-test, and every example run to completion (the examples check their own
#   limits), the README's first command, and the official openai Python package against
#   the gateway.
# Tests that need a server start their own; this script installs what they need
# (redis-server with apt, the openai package with pip).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust from https://rustup.rs" >&2
  exit 1
fi

# The Redis tests start their own redis-server on a free port; install it when missing.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server (the Redis store's tests start their own servers)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  # Tests start their own servers; the packaged service is not needed.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
fi
redis-server --version

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo doc (warnings are errors: broken links, missing docs)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "== cargo test"
cargo test --workspace
echo "== examples"
# Built first, so the timeout below covers each example's run, never its compiling on a
# loaded machine.
cargo build --quiet -p tollgate --examples
for example in crates/tollgate/examples/*.rs; do
  name=$(basename "$example" .rs)
  echo "-- $name"
  status=0
  timeout 120 "target/debug/examples/$name" >/dev/null || status=$?
  if [ "$status" -ne 0 ]; then
    if [ "$status" -eq 124 ]; then
      echo "example $name did not finish within 120 s" >&2
    else
      echo "example $name failed (exit $status)" >&2
    fi
    exit 1
  fi
done
echo "== the README's first command: tollgate batch against tollgate sim"
./scripts/demo.sh >/dev/null
echo "== the official openai Python package against tollgate serve"
if ! command -v python3 >/dev/null 2>&1; then
  echo "python3 is missing: the gateway's SDK test needs it (apt-get install -y python3-pip)" >&2
  exit 1
fi
if ! python3 -c 'import openai' 2>/dev/null; then
  python3 -m pip install --quiet openai
fi
cargo build --quiet -p tollgate-cli
python3 scripts/gateway_openai.py target/debug/tollgate
echo "== the official openai Python package through tollgate serve --upstream (a pacing proxy)"
python3 scripts/gateway_pacing.py target/debug/tollgate
echo "all checks passed"
