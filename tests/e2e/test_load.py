"""A short, bounded version of scripts/soak.py in every test run (10 s, 64 concurrent clients):
no unexpected status, no answer that belongs to another request. The multi-minute soak with
memory figures is `scripts/soak.sh` (figures in the README)."""

from __future__ import annotations

import subprocess
import sys

from harness import ROOT


def test_short_mixed_load_at_concurrency_64():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "10", "64"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = r.stdout + r.stderr
    assert "unexpected statuses/errors: 0  mixed-up answers: 0" in out, out[-4000:]
    assert "concurrency 64" in out
