"""Runs last (file order): no OpenID access token, minted LiveKit access token or LiveKit
secret appears in any line of any Envoy or Traefik log written during this test run, including
the plugin's debug lines (Envoy runs with `wasm:debug`; some scenarios set `logLevel: debug`)."""

from __future__ import annotations

from checks import SEEN_SECRETS
from harness import ALL_ENVOYS, LIVEKIT_SECRET
from traefik import ALL_TRAEFIKS


def test_no_secret_in_any_proxy_log():
    envoy_logs = [(e.log_path, e.log()) for e in ALL_ENVOYS]
    traefik_logs = [(t.log_path, t.log()) for t in ALL_TRAEFIKS if t.log_path.exists()]
    assert envoy_logs and traefik_logs, "both proxies ran in this session"
    secrets = set(SEEN_SECRETS) | {LIVEKIT_SECRET}
    assert len(secrets) > 10, "the scan has something to look for"
    leaks = [(str(path), s[:12] + "…") for path, text in envoy_logs + traefik_logs
             for s in secrets if s and s in text]
    assert leaks == []
    # The plugin did log at debug level in these runs, so the scan covered its debug lines.
    assert any("wasm log" in text and "[debug]" in text for _, text in envoy_logs)
    assert any(" DBG " in line and "logs/wasm.go" in line and "reading the body" in line
               for _, text in traefik_logs for line in text.splitlines())
