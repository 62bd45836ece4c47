#!/usr/bin/env bash
# All tests: formatting and lints (native and wasm32, unwrap/expect/panic denied outside tests),
# the core's unit tests, and the end-to-end tests against real Envoy and a real Synapse.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy (native, all targets; wasm32-wasip1 filter and Traefik plugin)"
cargo clippy -q --all-targets -- -D warnings
cargo clippy -q --release --target wasm32-wasip1 --lib -- -D warnings
cargo clippy -q --release --target wasm32-wasip1 --target-dir target/traefik-build \
  --no-default-features --features traefik --bin matrixrtc-traefik -- -D warnings
echo "==> cargo test (core unit tests)"
cargo test -q
echo "==> pytest (end to end: real Envoy, real Synapse, recording fakes)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e "$@"
