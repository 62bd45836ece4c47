"""A short, bounded version of scripts/soak.py in every test run (10 s): Envoy with 64
concurrent clients, Traefik (deployed with the required one-at-a-time slot) with 8: no
unexpected status, no answer that belongs to another request (Traefik's 429s from the slot are
counted apart). The multi-minute soak with memory figures is `scripts/soak.sh` (README)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import ROOT


@pytest.mark.parametrize("proxy,concurrency", [("envoy", 64), ("traefik", 8)])
def test_short_mixed_load(proxy, concurrency):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "10", str(concurrency), proxy],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = r.stdout + r.stderr
    assert "unexpected statuses/errors: 0  mixed-up answers: 0" in out, out[-4000:]
    assert f"concurrency {concurrency}" in out
    assert r.returncode == 0, out[-4000:]
