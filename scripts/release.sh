#!/usr/bin/env bash
# Release artifacts in dist/: the proxy-wasm filter, the Traefik plugin zip (plugin.wasm +
# .traefik.yml, the layout Traefik's plugin catalogue and local-plugin mode expect), and
# SHA-256 checksums.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
rm -rf dist && mkdir -p dist/traefik-plugin
cp target/wasm32-wasip1/release/matrixrtc_livekit_auth.wasm dist/
cp target/wasm32-wasip1/release/matrixrtc-traefik.wasm dist/traefik-plugin/plugin.wasm
cp traefik/.traefik.yml dist/traefik-plugin/
.venv/bin/python - <<'PY'
import zipfile
with zipfile.ZipFile("dist/matrixrtc-traefik-plugin.zip", "w", zipfile.ZIP_DEFLATED) as z:
    z.write("dist/traefik-plugin/plugin.wasm", "plugin.wasm")
    z.write("dist/traefik-plugin/.traefik.yml", ".traefik.yml")
PY
rm -rf dist/traefik-plugin
(cd dist && sha256sum matrixrtc_livekit_auth.wasm matrixrtc-traefik-plugin.zip > SHA256SUMS)
ls -l dist && cat dist/SHA256SUMS
