"""The README's main job (scripts/demo.py) works: real Envoy with the shipped envoy/envoy.yaml
unmodified, a real Synapse, a LiveKit access token minted through the filter; and the same
through real Traefik with the shipped traefik/dynamic-token-service.yml unmodified. With Envoy,
also delayed-leave delegation on a real Synapse's delayed events."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import ROOT


@pytest.mark.parametrize("proxy,name", [("envoy", "Envoy"), ("traefik", "Traefik")])
def test_demo_mints_a_token_through_shipped_config(proxy, name):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), proxy], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "HTTP 200" in out
    assert '"canPublish": true' in out
    assert "LiveKit's TokenVerifier accepts it: identity=" in out
    assert "upstream received GET /status?x=1 with X-Forwarded-Prefix ['/livekit-jwt-service']" in out
    assert f"OK: token minted inside {name}" in out
    if proxy == "envoy":
        assert "Synapse still has it pending; the filter last restarted it" in out
        assert "her leave event is in the room now: org.matrix.msc3401.call.member {}" in out
