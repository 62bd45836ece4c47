#!/usr/bin/env bash
# Release artifacts in dist/: the proxy-wasm filter, the Traefik plugin (.wasm, and the zip of
# plugin.wasm + .traefik.yml that Traefik's plugin catalogue and local-plugin mode expect), and
# SHA-256 checksums of all three. (No OCI image for Istio's `oci://` URLs yet: serve the .wasm
# over HTTPS with its sha256, as envoy/istio/wasmplugin.yaml shows.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
rm -rf dist && mkdir -p dist/traefik-plugin
cp target/envoy/matrixrtc_livekit_auth.wasm dist/
cp target/traefik/matrixrtc-traefik.wasm dist/
cp target/traefik/matrixrtc-traefik.wasm dist/traefik-plugin/plugin.wasm
cp traefik/.traefik.yml dist/traefik-plugin/
.venv/bin/python - <<'PY'
import zipfile
with zipfile.ZipFile("dist/matrixrtc-traefik-plugin.zip", "w", zipfile.ZIP_DEFLATED) as z:
    z.write("dist/traefik-plugin/plugin.wasm", "plugin.wasm")
    z.write("dist/traefik-plugin/.traefik.yml", ".traefik.yml")
PY
rm -rf dist/traefik-plugin
(cd dist && sha256sum matrixrtc_livekit_auth.wasm matrixrtc-traefik.wasm matrixrtc-traefik-plugin.zip > SHA256SUMS)
ls -l dist && cat dist/SHA256SUMS
