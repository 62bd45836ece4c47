"""Fixtures for the end-to-end tests: the built filter, one test CA, the recording fakes and a
shared Envoy with the standard plugin configuration. The Envoy logs of a failed test are
printed with its report."""

from __future__ import annotations

import pytest

from harness import (ALL_ENVOYS, LIVEKIT_KEY, WASM, EchoUpstream, Envoy, FakeHomeserver,
                     FakeSfu, TestCA)


def pytest_configure(config):
    if not WASM.exists():
        raise pytest.UsageError(f"{WASM} is missing: build it first (scripts/test.sh does)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for envoy in ALL_ENVOYS:
            if envoy.proc is not None:
                report.sections.append((f"envoy log {envoy.config_path}", envoy.log()[-20000:]))


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
