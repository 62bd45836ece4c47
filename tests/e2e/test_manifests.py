"""The Kubernetes manifests in envoy/ are well-formed and carry a plugin configuration the
filter accepts (their CRDs cannot be applied here; the JSON they pass to the filter can be
loaded by real Envoy)."""

from __future__ import annotations

import yaml

from harness import ROOT, Envoy


def manifest_configs():
    istio = yaml.safe_load((ROOT / "envoy" / "istio" / "wasmplugin.yaml").read_text())
    assert istio["kind"] == "WasmPlugin" and istio["spec"]["failStrategy"] == "FAIL_CLOSE"
    docs = list(yaml.safe_load_all((ROOT / "envoy" / "envoy-gateway" / "extension-policy.yaml").read_text()))
    policy = next(d for d in docs if d["kind"] == "EnvoyExtensionPolicy")
    route = next(d for d in docs if d["kind"] == "HTTPRoute")
    assert policy["spec"]["targetRefs"][0]["name"] == route["metadata"]["name"]
    assert policy["spec"]["wasm"][0]["failOpen"] is False
    return [istio["spec"]["pluginConfig"], policy["spec"]["wasm"][0]["config"]]


def test_manifest_plugin_configurations_load_in_envoy(workdir, upstream):
    for cfg in manifest_configs():
        e = Envoy(workdir, cfg, upstream_port=upstream.port, ca=None, tls_mode="system")
        r = e.validate()
        assert r.returncode == 0, r.stdout + r.stderr
        assert "configured: stripPrefixes" in r.stdout + r.stderr
