#!/usr/bin/env bash
# The main job: build the filter, start real Envoy with envoy/envoy.yaml, a real Synapse and a
# fake LiveKit API on 127.0.0.1, get a Matrix OpenID token and exchange it for a LiveKit access
# token through /livekit-jwt-service/get_token, printing the decoded claims.
# `scripts/demo.sh traefik` does the same through real Traefik with the plugin and
# traefik/dynamic-token-service.yml.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
