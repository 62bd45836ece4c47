"""Plugin configuration on real Envoy: the shipped example validates, and an invalid plugin
configuration makes Envoy refuse the filter, with a log line naming the key (case 17)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import standard_config
from harness import ROOT, SHIPPED_ENVOY_YAML, Envoy, envoy_binary


def validate_shipped(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(SHIPPED_ENVOY_YAML), "--disable-hot-restart"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={"PATH": "/usr/bin:/bin", **env},
    )


def test_shipped_envoy_yaml_validates():
    r = validate_shipped({"LIVEKIT_KEY": "devkey", "LIVEKIT_SECRET": "secret"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    assert "token service on" in r.stdout + r.stderr


def test_shipped_envoy_yaml_without_secret_is_refused():
    r = validate_shipped({"LIVEKIT_KEY": "devkey"})
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "invalid plugin configuration: livekitSecretEnv: environment variable `LIVEKIT_SECRET` is not set" in out


BAD = [
    ("wrong type", {"calloutTimeoutMs": "5s"}, "calloutTimeoutMs: invalid type: string \"5s\""),
    ("unknown key", {"livekitURL": "wss://x"}, "livekitURL: unknown field `livekitURL`"),
    ("missing secret", {"livekitSecretEnv": None}, "livekitSecret: required when livekitUrl is set"),
    ("empty full access", {"fullAccessHomeservers": []}, "fullAccessHomeservers: must not be empty"),
    ("bad prefix", {"stripPrefixes": ["/"]}, "stripPrefixes[0]: `/` alone is not a prefix"),
    ("Traefik-only key", {"caFile": "/etc/ca.pem"}, "caFile: only used by the Traefik plugin"),
    ("Traefik-only dnsServer", {"dnsServer": "127.0.0.1:53"}, "dnsServer: only used by the Traefik plugin"),
]


@pytest.mark.parametrize("name,change,message", BAD, ids=[b[0] for b in BAD])
def test_invalid_plugin_configuration_refuses_to_load(workdir, homeserver, sfu, upstream, name, change, message):
    cfg = standard_config(homeserver, sfu)
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    e = Envoy(workdir, cfg, upstream_port=upstream.port, ca=None, tls_mode="system")
    code = e.run_until_exit(timeout=60)
    log = e.log()
    assert code != 0, "Envoy must not start with an invalid plugin configuration"
    assert f"invalid plugin configuration: {message}" in log, log[-3000:]


def test_secret_value_never_logged_on_refusal(workdir, homeserver, sfu, upstream):
    cfg = standard_config(homeserver, sfu, livekitSecret="hunter2-hunter2")  # both inline and env
    e = Envoy(workdir, cfg, upstream_port=upstream.port, ca=None, tls_mode="system")
    assert e.run_until_exit(timeout=60) != 0
    log = e.log()
    assert "livekitSecret: set either livekitSecret or livekitSecretEnv, not both" in log
    assert "hunter2" not in log
