#!/usr/bin/env bash
# Load and soak: scripts/soak.py for SECONDS (default 180) at CONCURRENCY (default 64) through
# PROXY (envoy, the default, or traefik).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
exec .venv/bin/python scripts/soak.py "${1:-180}" "${2:-64}" "${3:-envoy}"
