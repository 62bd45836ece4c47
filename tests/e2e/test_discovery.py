"""Homeserver discovery on real Envoy and real Traefik (every test runs on both):
`.well-known/matrix/server` delegation, caching, the 8448 fallback, explicit ports, IP literals,
and the protection against probing internal addresses. Names under `example.test` resolve
through the test's own DNS server (dnslib): Envoy's dynamic forward proxy clusters are pointed
at it, the Traefik plugin gets it as `dnsServer`. The `.well-known` fake listens on
127.0.0.2:443 and a fallback homeserver on 127.0.0.2:8448 (binding them needs root, as CI is)."""

from __future__ import annotations

import json
import os

import pytest

from checks import (assert_client_token, assert_matrix_error, get_token_body, identity,
                    new_token, post_json, room_alias)
from conftest import PREFIX, standard_config, start_proxy
from harness import (Envoy, FakeDns, FakeHomeserver, FakeWellKnown, free_port, use_test_resolver,
                     wait_for_log)
from synapse import Synapse

GET_TOKEN = PREFIX + "/get_token"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binds 127.0.0.2:443 and :8448")


@pytest.fixture(scope="module")
def well_known(ca):
    wk = FakeWellKnown(tls=ca, port=443, host="127.0.0.2")
    yield wk
    wk.stop()


@pytest.fixture(scope="module")
def fallback_hs(ca):
    hs = FakeHomeserver(tls=ca, port=8448, host="127.0.0.2")
    yield hs
    hs.stop()


@pytest.fixture(scope="module")
def dns():
    d = FakeDns({
        "deleg.example.test": "127.0.0.2",
        "nowk.example.test": "127.0.0.2",
        "garbage.example.test": "127.0.0.2",
        "slow.example.test": "127.0.0.2",
        "private.example.test": "127.0.0.2",
        "synapse.example.test": "127.0.0.2",
        "hs.example.test": "127.0.0.1",
        "matrix-fed.example.test": "127.0.0.1",
    })
    yield d
    d.stop()


def discovery_config(homeserver, sfu, **overrides):
    cfg = standard_config(homeserver, sfu, **overrides)
    cfg.pop("homeservers")
    cfg["fullAccessHomeservers"] = ["deleg.example.test"]
    return cfg


def discovery_proxy(kind, workdir, cfg, upstream, ca, dns):
    """A proxy whose callouts resolve names with the test's DNS server (not started)."""
    if kind == "envoy":
        return Envoy(workdir, cfg, upstream_port=upstream.port, ca=ca,
                     config_override=lambda c: use_test_resolver(c, dns.port))
    return start_proxy(kind, workdir, {**cfg, "dnsServer": f"127.0.0.1:{dns.port}"}, upstream.port, ca)


@pytest.fixture(scope="module")
def discovery_proxy_running(proxy_kind, workdir, ca, homeserver, sfu, upstream, dns):
    with discovery_proxy(proxy_kind, workdir, discovery_config(homeserver, sfu), upstream, ca, dns) as p:
        yield p


@pytest.fixture(autouse=True)
def _clear(request):
    for name in ("well_known", "fallback_hs"):
        if name in request.fixturenames:
            request.getfixturevalue(name).clear()
    yield


def exchange(envoy, hs, server, user_local="alice", **body):
    token = new_token()
    user = f"@{user_local}:{server}"
    hs.tokens[token] = user
    r = post_json(envoy.port, GET_TOKEN, get_token_body(token, server=server, user=user, **body))
    return token, user, r


def test_well_known_delegation_is_followed_and_cached(proxy_kind, discovery_proxy_running, well_known, homeserver, sfu):
    """Userinfo goes to the delegated host:port, `sub` is checked against the original server
    name, and later requests (new connections, any worker) do not fetch .well-known again."""
    well_known.answers["deleg.example.test"] = (
        200, json.dumps({"m.server": f"hs.example.test:{homeserver.port}"}).encode(),
        {"Cache-Control": "max-age=3600"})
    for i in range(4):
        token, user, r = exchange(discovery_proxy_running, homeserver, "deleg.example.test")
        assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu.port}", room=room_alias("!room:example.org"),
                            identity=identity(user, "DEVICE", "member-1"), full_access=True)
        [call] = homeserver.userinfo_calls(token)
        assert call.header("host") == [f"hs.example.test:{homeserver.port}"]
    calls = well_known.calls("deleg.example.test")
    if proxy_kind == "envoy":
        assert len(calls) == 1, "one cache for all workers (proxy-wasm shared data)"
    else:
        # One cache per plugin instance (http-wasm has no shared data); Traefik reuses pooled
        # instances, so later requests are served from a cache (measured: 2 fetches for 4).
        assert 1 <= len(calls) < 4, len(calls)
    wk = calls[0]
    assert wk.method == "GET" and wk.path == "/.well-known/matrix/server"
    assert wk.header("host") == ["deleg.example.test:443"]
    if proxy_kind == "traefik":
        return  # no metrics in Traefik
    from test_metrics import scrape

    metrics = scrape(discovery_proxy_running)
    assert metrics.get('matrixrtc_well_known_cache{result="hit"}', 0) >= 3, metrics
    assert metrics.get('matrixrtc_callouts{target="well_known",result="ok"}', 0) >= 1


def test_sub_must_match_original_server_name_not_delegate(discovery_proxy_running, well_known, homeserver):
    well_known.answers["deleg.example.test"] = (
        200, json.dumps({"m.server": f"hs.example.test:{homeserver.port}"}).encode(), {})
    token = new_token()
    homeserver.tokens[token] = f"@alice:hs.example.test:{homeserver.port}"
    r = post_json(discovery_proxy_running.port, GET_TOKEN, get_token_body(
        token, server="deleg.example.test", user=f"@alice:hs.example.test:{homeserver.port}"))
    assert_matrix_error(r, 401, "M_UNAUTHORIZED")
    assert len(homeserver.userinfo_calls(token)) == 1


def test_explicit_port_skips_well_known(discovery_proxy_running, well_known, homeserver):
    token, user, r = exchange(discovery_proxy_running, homeserver, f"hs.example.test:{homeserver.port}")
    assert r.status == 200, r.body
    assert well_known.recorded() == []
    [call] = homeserver.userinfo_calls(token)
    assert call.header("host") == [f"hs.example.test:{homeserver.port}"]


@pytest.mark.parametrize("server,answer", [
    ("nowk.example.test", None),  # 404
    ("garbage.example.test", (200, b"<html>not json</html>", {})),
])
def test_no_or_garbage_well_known_falls_back_to_8448(discovery_proxy_running, well_known, fallback_hs, server, answer):
    if answer:
        well_known.answers[server] = answer
    token, user, r = exchange(discovery_proxy_running, fallback_hs, server)
    assert r.status == 200, r.body
    assert len(well_known.calls(server)) == 1
    [call] = fallback_hs.userinfo_calls(token)
    assert call.header("host") == [f"{server}:8448"]


def test_well_known_timeout_falls_back_after_timeout(discovery_proxy_running, well_known, fallback_hs):
    well_known.answers["slow.example.test"] = "hang"
    token, user, r = exchange(discovery_proxy_running, fallback_hs, "slow.example.test")
    assert r.status == 200, r.body
    assert 1.3 < r.elapsed < 6, r.elapsed
    assert len(fallback_hs.userinfo_calls(token)) == 1


def test_delegation_to_internal_address_is_refused(discovery_proxy_running, well_known, homeserver):
    well_known.answers["private.example.test"] = (
        200, json.dumps({"m.server": f"127.0.0.1:{homeserver.port}"}).encode(), {})
    token, user, r = exchange(discovery_proxy_running, homeserver, "private.example.test")
    assert_matrix_error(r, 401, "M_UNAUTHORIZED")
    assert homeserver.userinfo_calls(token) == []


@pytest.mark.parametrize("server", ["127.0.0.1:{port}", "[::1]:{port}", "localhost:{port}", "10.1.2.3:8448",
                                    "169.254.169.254", "localhost"])
def test_internal_server_names_refused_by_default(discovery_proxy_running, homeserver, server):
    server = server.format(port=homeserver.port)
    token, user, r = exchange(discovery_proxy_running, homeserver, server)
    assert_matrix_error(r, 401, "M_UNAUTHORIZED")
    assert homeserver.userinfo_calls(token) == []
    wait_for_log(discovery_proxy_running, "allowPrivateAddresses")


@pytest.mark.parametrize("server", ["127.0.0.01:{port}", "127.000.000.001:{port}", "127.1:{port}",
                                    "2130706433:{port}", "0x7f.0.0.1:{port}", "vm:{port}", "localhost.:{port}"])
def test_disguised_internal_addresses_never_dial(discovery_proxy_running, homeserver, server):
    """Non-canonical IPv4 spellings that resolvers read as 127.0.0.1, and single-label names,
    are refused before any connection (found by the attack review)."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        token, user, r = exchange(discovery_proxy_running, homeserver, server.format(port=port))
        assert_matrix_error(r, 401, "M_UNAUTHORIZED")
        with pytest.raises(socket.timeout):
            listener.accept()


def test_allow_private_addresses_reaches_ip_literals(proxy_kind, workdir, ca, homeserver, sfu, upstream, dns):
    """With allowPrivateAddresses: IPv4 literal, IPv6 literal (Envoy; the Traefik plugin
    reaches IPv4 only) and DNS name with explicit ports are dialled directly over TLS."""
    hs6 = FakeHomeserver(tls=ca, host="::1")
    try:
        cfg = discovery_config(homeserver, sfu, allowPrivateAddresses=True)
        targets = [(homeserver, f"127.0.0.1:{homeserver.port}"),
                   (homeserver, f"localhost:{homeserver.port}")]
        if proxy_kind == "envoy":
            targets.append((hs6, f"[::1]:{hs6.port}"))
        with discovery_proxy(proxy_kind, workdir, cfg, upstream, ca, dns) as e:
            for hs, server in targets:
                token, user, r = exchange(e, hs, server)
                assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu.port}", room=room_alias("!room:example.org"),
                                    identity=identity(user, "DEVICE", "member-1"), full_access=False)
                [call] = hs.userinfo_calls(token)
                assert call.header("host") == [server]
    finally:
        hs6.stop()


def test_allow_list(proxy_kind, workdir, ca, homeserver, sfu, upstream, dns, well_known):
    well_known.answers["deleg.example.test"] = (
        200, json.dumps({"m.server": f"hs.example.test:{homeserver.port}"}).encode(), {})
    cfg = discovery_config(homeserver, sfu, allowedHomeservers=["*.example.test"])
    with discovery_proxy(proxy_kind, workdir, cfg, upstream, ca, dns) as e:
        _, user, r = exchange(e, homeserver, "deleg.example.test")
        assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu.port}", room=room_alias("!room:example.org"),
                            identity=identity(user, "DEVICE", "member-1"), full_access=True)
        token, _, r = exchange(e, homeserver, "example.org")
        assert_matrix_error(r, 401, "M_UNAUTHORIZED")
        assert homeserver.userinfo_calls(token) == []
        wait_for_log(e, "not in allowedHomeservers")


def test_real_synapse_over_tls_through_discovery(proxy_kind, workdir, ca, sfu, upstream, dns, well_known):
    """A real Synapse serving federation over TLS (certificate from the test CA, which the
    Envoy cluster trusts and the Traefik plugin gets as caFile), found through .well-known,
    mints a token end to end."""
    client_port, fed_port = free_port(), free_port()
    server = "synapse.example.test"
    well_known.answers[server] = (
        200, json.dumps({"m.server": f"matrix-fed.example.test:{fed_port}"}).encode(), {})
    with Synapse(workdir / f"synapse-tls-{proxy_kind}", client_port, server, tls=ca, tls_port=fed_port) as syn:
        syn.register("bob", "pw-bob-123456")
        session = syn.login("bob", "pw-bob-123456")
        openid = syn.openid_token(session)
        cfg = {
            "stripPrefixes": [PREFIX], "livekitUrl": f"ws://127.0.0.1:{sfu.port}", "livekitKey": "devkey",
            "livekitSecretEnv": "LIVEKIT_SECRET", "fullAccessHomeservers": [server],
        }
        with discovery_proxy(proxy_kind, workdir, cfg, upstream, ca, dns) as e:
            body = Synapse.get_token_body(session, openid, "!c:synapse.example.test", "m-bob")
            r = post_json(e.port, GET_TOKEN, body)
            assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu.port}", room=room_alias("!c:synapse.example.test"),
                                identity=identity("@bob:synapse.example.test", session["device_id"], "m-bob"),
                                full_access=True)
    assert len(well_known.calls(server)) == 1


def test_silent_dns_server_is_bounded_by_the_callout_timeout(workdir, ca, homeserver, sfu, upstream):
    """Traefik only (`dnsServer`): a DNS server that accepts and never answers costs at most the
    callout timeout per lookup (found by the attack review: the lookup blocked for minutes,
    holding the one token-request slot); the request ends in 401."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cfg = {**discovery_config(homeserver, sfu), "dnsServer": f"127.0.0.1:{silent.getsockname()[1]}"}
        with start_proxy("traefik", workdir, cfg, upstream.port, ca) as t:
            token, user, r = exchange(t, homeserver, "nowk.example.test")
            assert_matrix_error(r, 401, "M_UNAUTHORIZED")
            # .well-known host, then host:8448: two lookups of at most 1.5 s each.
            assert r.elapsed < 4.5, r.elapsed
            wait_for_log(t, "cannot resolve nowk.example.test")
