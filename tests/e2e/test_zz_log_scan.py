"""Runs last (file order): with the filter's log level at debug (`wasm:debug`), no OpenID
access token, minted LiveKit access token or LiveKit secret appears in any line of any Envoy
log written during this test run."""

from __future__ import annotations

from checks import SEEN_SECRETS
from harness import ALL_ENVOYS, LIVEKIT_SECRET


def test_no_secret_in_any_proxy_log():
    logs = [(e.log_path, e.log()) for e in ALL_ENVOYS]
    assert logs, "no Envoy ran in this session"
    secrets = set(SEEN_SECRETS) | {LIVEKIT_SECRET}
    assert len(secrets) > 10, "the scan has something to look for"
    leaks = [(str(path), s[:12] + "…") for path, text in logs for s in secrets if s and s in text]
    assert leaks == []
    # The filter did log at debug level in these runs, so the scan covered its debug lines.
    assert any("wasm log" in text and "[debug]" in text for _, text in logs)
