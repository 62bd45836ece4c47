"""Fixtures for the end-to-end tests: the built filter, one test CA, the recording fakes and a
shared Envoy with the standard plugin configuration. The Envoy logs of a failed test are
printed with its report."""

from __future__ import annotations

import pytest

from harness import (ALL_ENVOYS, LIVEKIT_KEY, LIVEKIT_SECRET, WASM, EchoUpstream, Envoy,
                     FakeHomeserver, FakeSfu, TestCA)
from traefik import ALL_TRAEFIKS, TRAEFIK_WASM, Traefik


def pytest_configure(config):
    for artifact in (WASM, TRAEFIK_WASM):
        if not artifact.exists():
            raise pytest.UsageError(f"{artifact} is missing: build it first (scripts/test.sh does)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for envoy in ALL_ENVOYS:
            if envoy.proc is not None:
                report.sections.append((f"envoy log {envoy.config_path}", envoy.log()[-20000:]))
        for traefik in ALL_TRAEFIKS:
            if traefik.proc is not None and traefik.proc.poll() is None:
                report.sections.append((f"traefik log {traefik.dir}", traefik.log()[-20000:]))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def ca(workdir):
    return TestCA.create(workdir / "ca")


@pytest.fixture(scope="session")
def homeserver(ca):
    hs = FakeHomeserver(tls=ca)
    yield hs
    hs.stop()


@pytest.fixture(scope="session")
def sfu():
    s = FakeSfu()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def upstream():
    u = EchoUpstream()
    yield u
    u.stop()


@pytest.fixture(autouse=True)
def _fresh_fakes(request):
    """Each test starts with empty recordings and a healthy SFU."""
    for name in ("homeserver", "sfu", "upstream"):
        if name in request.fixturenames:
            fake = request.getfixturevalue(name)
            fake.clear()
    if "sfu" in request.fixturenames:
        request.getfixturevalue("sfu").status = 200
    yield


PREFIX = "/livekit-jwt-service"


def standard_config(homeserver: FakeHomeserver, sfu: FakeSfu, **overrides) -> dict:
    """The plugin configuration most scenarios use. Server names `example.org`,
    `other.example`, `Example.org` and `example.org:8448` are pointed at the fake homeserver
    (https, test CA) by `homeservers` overrides."""
    hs = f"https://localhost:{homeserver.port}"
    cfg = {
        "stripPrefixes": [PREFIX],
        "livekitUrl": f"ws://127.0.0.1:{sfu.port}",
        "livekitKey": LIVEKIT_KEY,
        "livekitSecretEnv": "LIVEKIT_SECRET",
        "fullAccessHomeservers": ["example.org"],
        "homeservers": {"example.org": hs, "other.example": hs, "Example.org": hs, "example.org:8448": hs},
        "calloutTimeoutMs": 1500,
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def envoy(workdir, ca, homeserver, sfu, upstream):
    """A running Envoy with the filter and the standard plugin configuration."""
    with Envoy(workdir, standard_config(homeserver, sfu), upstream_port=upstream.port, ca=ca) as e:
        yield e


# ---------------------------------------------------------------- both proxies, one scenario list

PROXIES = ["envoy", "traefik"]


def start_proxy(kind: str, workdir, plugin_config: dict, upstream_port: int, ca: TestCA, *,
                trust: str = "ca", quiet: bool = False):
    """The proxy `kind` ("envoy" or "traefik") with the plugin and `plugin_config`, not yet
    started (use as a context manager). `trust`: which certificates callouts accept: "ca" (the
    system roots and the test CA: Envoy's callout clusters trust it, Traefik gets `caFile`
    through `settings.mounts`), "system" (system roots only), "insecure" (Envoy: the insecure
    cluster exists; both: only with `insecureSkipVerify` in the plugin configuration)."""
    if kind == "envoy":
        return Envoy(workdir, plugin_config, upstream_port=upstream_port, ca=ca,
                     tls_mode={"ca": "ca", "system": "system", "insecure": "insecure"}[trust],
                     log_level="warning" if quiet else "info")
    config = dict(plugin_config)
    mounts = []
    if trust == "ca":
        config["caFile"] = str(ca.ca_pem)
        mounts.append(str(ca.ca_pem.parent))
    return Traefik(workdir, config, upstream_port=upstream_port, mounts=mounts,
                   env={"LIVEKIT_SECRET": LIVEKIT_SECRET, "LIVEKIT_KEY": LIVEKIT_KEY},
                   serialize="livekitUrl" in config, log_level="WARN" if quiet else "DEBUG")


@pytest.fixture(scope="module", params=PROXIES)
def proxy_kind(request):
    return request.param


@pytest.fixture(scope="module")
def proxy(proxy_kind, workdir, ca, homeserver, sfu, upstream):
    """A running Envoy or Traefik (each test runs on both) with the standard plugin
    configuration."""
    with start_proxy(proxy_kind, workdir, standard_config(homeserver, sfu), upstream.port, ca) as p:
        yield p


@pytest.fixture
def make_proxy(proxy_kind, workdir, ca, upstream):
    """`make_proxy(plugin_config, trust="ca")`: a proxy of this test's kind, to use in `with`."""
    def make(plugin_config: dict, trust: str = "ca"):
        return start_proxy(proxy_kind, workdir, plugin_config, upstream.port, ca, trust=trust)
    return make
