"""The Traefik plugin (http-wasm) on real Traefik 3.7.15: the strip-prefix cases, a side-by-side
with Traefik's native stripPrefix middleware, refusal of invalid configurations and the shipped
examples. The token service scenarios run on Traefik in test_token.py (one list, both proxies)."""

from __future__ import annotations

import json
import time

import pytest

from checks import assert_strip_case, send_strip_case, strip_rows
from conftest import PREFIX
from harness import request
from traefik import TRAEFIK_WASM, Traefik

ROWS = strip_rows()

TOKEN_OPTIONS = {"stripPrefixes": [PREFIX], "livekitUrl": "wss://sfu.example.org", "livekitKey": "k",
                 "livekitSecret": "s", "fullAccessHomeservers": ["*"]}

pytestmark = pytest.mark.skipif(not TRAEFIK_WASM.exists(), reason="Traefik plugin not built")


@pytest.fixture(scope="module", params=[PREFIX, PREFIX + "/"], ids=["prefix", "prefix-slash"])
def plugin_traefik(request, workdir, upstream):
    with Traefik(workdir, {"stripPrefixes": [request.param]}, upstream_port=upstream.port) as t:
        yield t


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['method']} {r['request_target']}")
def test_strip_prefix_case_through_traefik_plugin(plugin_traefik, upstream, row):
    response, body = send_strip_case(plugin_traefik.port, row)
    assert_strip_case(upstream, row, response, body, PREFIX)


# Traefik's own stripPrefix (with its default sanitizePath) for the same rows. Where it differs
# from the case file, the plugin's answer is the right one; README "Traefik: plugin vs native
# stripPrefix" explains each row.
NATIVE_DIFFERS = {
    ("/livekit-jwt-service", "/livekit-jwt-servicefoo/get_token"): "/foo/get_token",
    ("/livekit-jwt-service", "/livekit-jwt-service-old/healthz"): "/-old/healthz",
    ("/livekit-jwt-service/", "/livekit-jwt-service"): "/livekit-jwt-service",
    ("/livekit-jwt-service/", "/livekit-jwt-service?x=1"): "/livekit-jwt-service?x=1",
}


@pytest.mark.parametrize("configured", [PREFIX, PREFIX + "/"])
def test_side_by_side_with_native_strip_prefix(workdir, upstream, configured):
    with Traefik(workdir, None, upstream_port=upstream.port, native_strip=[configured]) as native:
        differing = {}
        for row in ROWS:
            upstream.clear()
            r, _ = send_strip_case(native.port, row)
            assert r.status == 200
            [got] = upstream.recorded()
            expected = row["request_target"] if row["expected_upstream_target"] == "UNTOUCHED" \
                else row["expected_upstream_target"]
            if got.path != expected:
                differing[(configured, row["request_target"])] = got.path
    assert differing == {k: v for k, v in NATIVE_DIFFERS.items() if k[0] == configured}


@pytest.mark.parametrize("options,message", [
    ({"stripPrefixes": ["/"]}, "stripPrefixes[0]: `/` alone is not a prefix"),
    ({"stripPrefixes": ["/p"], "typo": 1}, "typo: unknown field `typo`"),
    ({**TOKEN_OPTIONS, "envoyTlsCluster": "x"},
     "envoyTlsCluster: only used by the Envoy filter"),
    ({**TOKEN_OPTIONS, "caFile": "/nonexistent/ca.pem"},
     "caFile: cannot read /nonexistent/ca.pem"),
    ({**TOKEN_OPTIONS, "caFile": "ca.pem"}, "caFile: must be an absolute path"),
    ({**TOKEN_OPTIONS, "calloutTimeoutMs": "soon"}, "calloutTimeoutMs: invalid type: string"),
    ({**TOKEN_OPTIONS, "sanityCheckIntervalSecs": "5"},
     "sanityCheckIntervalSecs: only used by delayed-leave delegation, which runs in the Envoy filter only"),
])
def test_traefik_refuses_invalid_configuration(workdir, upstream, options, message):
    """The plugin refuses to load and logs the key; requests on its router never reach the
    upstream unfiltered."""
    t = Traefik(workdir, options, upstream_port=upstream.port)
    try:
        with pytest.raises((RuntimeError, TimeoutError)):
            t.start(timeout=15)
        assert f"invalid plugin configuration: {message}" in t.log()
        assert upstream.recorded() == []
    finally:
        t.stop()


def test_shipped_traefik_examples_load(workdir, upstream):
    """The middleware options of traefik/dynamic.yml and the manifest's testData load in
    Traefik and strip as documented."""
    import yaml

    from harness import ROOT

    dynamic = yaml.safe_load((ROOT / "traefik" / "dynamic.yml").read_text())
    manifest = yaml.safe_load((ROOT / "traefik" / ".traefik.yml").read_text())
    for options in (dynamic["http"]["middlewares"]["matrixrtc"]["plugin"]["matrixrtc"], manifest["testData"]):
        with Traefik(workdir, options, upstream_port=upstream.port) as t:
            upstream.clear()  # drop the readiness probe
            r = request(t.port, "GET", PREFIX + "//healthz?x=1")
            assert r.status == 200
            [got] = upstream.recorded()
            assert got.path == "/healthz?x=1"
            assert got.header("x-forwarded-prefix") == [PREFIX]


def test_shipped_token_service_example_serves_tokens(workdir, ca, homeserver, sfu, upstream):
    """traefik/dynamic-token-service.yml: a fixed lock header and inFlightReq (amount 1 per
    that header) before the plugin, and its plugin options, with only the addresses pointed at
    the fakes, issue a LiveKit access token in real Traefik."""
    import yaml

    from checks import (assert_client_token, get_token_body, identity, new_token, post_json,
                        room_alias)
    from harness import LIVEKIT_KEY, LIVEKIT_SECRET, ROOT

    dynamic = yaml.safe_load((ROOT / "traefik" / "dynamic-token-service.yml").read_text())["http"]
    [router] = dynamic["routers"].values()
    assert router["middlewares"][:3] == ["matrixrtc-buffer", "matrixrtc-lock-key", "matrixrtc-one-at-a-time"]
    assert dynamic["middlewares"]["matrixrtc-buffer"] == {"buffering": {"maxRequestBodyBytes": 1048576}}
    assert dynamic["middlewares"]["matrixrtc-lock-key"] == {
        "headers": {"customRequestHeaders": {"X-Matrixrtc-Lock": "1"}}}
    assert dynamic["middlewares"]["matrixrtc-one-at-a-time"] == {
        "inFlightReq": {"amount": 1, "sourceCriterion": {"requestHeaderName": "X-Matrixrtc-Lock"}}}
    options = dict(dynamic["middlewares"][router["middlewares"][3]]["plugin"]["matrixrtc"])
    options.update(livekitUrl=f"ws://127.0.0.1:{sfu.port}", caFile=str(ca.ca_pem),
                   homeservers={"matrix.localhost": f"https://localhost:{homeserver.port}"})
    token = new_token()
    homeserver.tokens[token] = "@alice:matrix.localhost"
    with Traefik(workdir, options, upstream_port=upstream.port, serialize=True,
                 mounts=[str(ca.ca_pem.parent)],
                 env={"LIVEKIT_KEY": LIVEKIT_KEY, "LIVEKIT_SECRET": LIVEKIT_SECRET}) as t:
        r = post_json(t.port, PREFIX + "/get_token", get_token_body(
            token, server="matrix.localhost", user="@alice:matrix.localhost"))
        assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu.port}",
                            room=room_alias("!room:example.org"),
                            identity=identity("@alice:matrix.localhost", "DEVICE", "member-1"),
                            full_access=True)


def test_one_token_request_at_a_time_whatever_the_host(workdir, ca, homeserver, sfu, upstream):
    """The required serialization cannot be sidestepped: while one token request waits for its
    homeserver, requests with other spellings of the Host (case, port) or a forged lock header
    get 429 and make no callout (found by the newcomer review: inFlightReq per Host was
    bypassable)."""
    import threading

    from checks import get_token_body, new_token, post_json
    from conftest import standard_config, start_proxy

    slow = new_token()
    homeserver.tokens[slow] = "hang"
    with start_proxy("traefik", workdir, standard_config(homeserver, sfu), upstream.port, ca) as t:
        first = threading.Thread(target=post_json, args=(t.port, PREFIX + "/get_token", get_token_body(slow)))
        first.start()
        deadline = time.monotonic() + 5
        while not homeserver.userinfo_calls(slow):
            assert time.monotonic() < deadline, "the first request never reached the homeserver"
            time.sleep(0.02)
        others = []
        for headers in ({"Host": "MATRIX.example.org"}, {"Host": "matrix.example.org:80"},
                        {"Host": "other.example"}, {"X-Matrixrtc-Lock": "2"}):
            token = new_token()
            homeserver.tokens[token] = "@alice:example.org"
            r = request(t.port, "POST", PREFIX + "/get_token", json.dumps(get_token_body(token)).encode(),
                        headers={"Content-Type": "application/json", **headers})
            assert r.status == 429, (headers, r.status, r.body)
            others.append(token)
        first.join()
        assert all(homeserver.userinfo_calls(token) == [] for token in others)


def test_slow_request_body_does_not_hold_the_slot(workdir, ca, homeserver, sfu, upstream):
    """A client dripping its body (found by the attack review: it held the one slot for up to
    Traefik's 60 s read timeout) waits in Traefik's buffering middleware, before the slot:
    other token requests meanwhile get their tokens."""
    import socket
    import threading

    from checks import assert_standard_token, get_token_body, new_token, post_json
    from conftest import standard_config, start_proxy

    with start_proxy("traefik", workdir, standard_config(homeserver, sfu), upstream.port, ca) as t:
        stop = threading.Event()

        def drip():
            with socket.create_connection(("127.0.0.1", t.port)) as s:
                s.sendall(b"POST " + PREFIX.encode() + b"/get_token HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
                while not stop.wait(0.1):
                    s.sendall(b" ")

        dripper = threading.Thread(target=drip)
        dripper.start()
        try:
            time.sleep(0.5)
            for _ in range(3):
                token = new_token()
                homeserver.tokens[token] = "@alice:example.org"
                r = post_json(t.port, PREFIX + "/get_token", get_token_body(token))
                assert_standard_token(r, sfu.port)
        finally:
            stop.set()
            dripper.join()


def test_lk_jwt_migrate_traefik_output_serves_tokens(workdir, ca, homeserver, sfu, upstream):
    """The Traefik part of `lk-jwt-migrate`'s output, used as it is (plus a router, as its
    comment says, and the test's homeserver and CA), runs in real Traefik: the one-at-a-time
    chain is in place and a token is issued. (`cargo test` builds the binary before these
    tests run in scripts/test.sh.)"""
    import subprocess

    import yaml

    from checks import assert_client_token, get_token_body, identity, new_token, post_json, room_alias
    from harness import LIVEKIT_KEY, LIVEKIT_SECRET, ROOT, free_port

    binary = ROOT / "target" / "debug" / "lk-jwt-migrate"
    if not binary.exists():
        pytest.skip("target/debug/lk-jwt-migrate not built (cargo test builds it)")
    out = subprocess.run([str(binary), "--prefix", PREFIX], capture_output=True, text=True, check=True, env={
        "LIVEKIT_URL": f"ws://127.0.0.1:{sfu.port}", "LIVEKIT_KEY": LIVEKIT_KEY,
        "LIVEKIT_SECRET": LIVEKIT_SECRET, "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.org",
    }).stdout
    dynamic = yaml.safe_load(out[out.index("# Traefik"):])
    chain = ["matrixrtc-buffer", "matrixrtc-lock-key", "matrixrtc-one-at-a-time", "matrixrtc-token"]
    assert f"router: middlewares: [{', '.join(chain)}]" in out
    plugin = dynamic["http"]["middlewares"]["matrixrtc-token"]["plugin"]["matrixrtc"]
    plugin.update(homeservers={"example.org": f"https://localhost:{homeserver.port}"}, caFile=str(ca.ca_pem))
    dynamic["http"]["routers"] = {"token": {"rule": f"PathPrefix(`{PREFIX}`)", "entryPoints": ["web"],
                                            "middlewares": chain, "service": "up"}}
    dynamic["http"]["services"] = {"up": {"loadBalancer": {"servers": [{"url": f"http://127.0.0.1:{upstream.port}"}]}}}
    path = workdir / f"migrated-{free_port()}.yml"
    path.write_text(yaml.safe_dump(dynamic))
    token = new_token()
    homeserver.tokens[token] = "@alice:example.org"
    with Traefik(workdir, None, upstream_port=upstream.port, dynamic_file=path, mounts=[str(ca.ca_pem.parent)],
                 env={"LIVEKIT_KEY": LIVEKIT_KEY, "LIVEKIT_SECRET": LIVEKIT_SECRET}) as t:
        r = post_json(t.port, PREFIX + "/get_token", get_token_body(token))
        assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu.port}", room=room_alias("!room:example.org"),
                            identity=identity("@alice:example.org", "DEVICE", "member-1"), full_access=True)
