#!/usr/bin/env bash
# Benchmarks: the core's micro-benchmarks (cargo bench) and the proxy benchmarks on loopback
# (scripts/bench.py: real Envoy with and without the filter, wrk). Installs Debian's wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
fi
cargo bench -q --bench core
.venv/bin/python scripts/bench.py
