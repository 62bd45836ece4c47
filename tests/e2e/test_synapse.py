"""The whole exchange with a real Synapse: register a user, request a Matrix OpenID token from
Synapse's client API, exchange it through the proxy (Envoy + filter, and Traefik + plugin: every
test runs on both), and check the LiveKit access token with LiveKit's own verifier."""

from __future__ import annotations

import json

import pytest

from checks import (SEEN_SECRETS, assert_client_token, assert_matrix_error, identity, post_json, room_alias)
from conftest import PREFIX, start_proxy
from harness import LIVEKIT_KEY, free_port, wait_for_log
from synapse import Synapse

SERVER = "matrix.localhost"


@pytest.fixture(scope="module")
def synapse(workdir):
    with Synapse(workdir / "synapse", free_port(), SERVER) as s:
        s.register("alice", "correct horse battery staple")
        yield s


@pytest.fixture(scope="module")
def synapse_proxy(proxy_kind, workdir, ca, synapse, sfu, upstream):
    cfg = {
        "stripPrefixes": [PREFIX],
        "livekitUrl": f"ws://127.0.0.1:{sfu.port}",
        "livekitKey": LIVEKIT_KEY,
        "livekitSecretEnv": "LIVEKIT_SECRET",
        "fullAccessHomeservers": [SERVER],
        "homeservers": {SERVER: f"http://127.0.0.1:{synapse.port}"},
    }
    with start_proxy(proxy_kind, workdir, cfg, upstream.port, ca, trust="system") as p:
        yield p


def test_real_synapse_openid_token_gets_livekit_token(synapse, synapse_proxy, sfu):
    session = synapse.login("alice", "correct horse battery staple")
    openid = synapse.openid_token(session)
    SEEN_SECRETS.add(openid["access_token"])
    assert openid["matrix_server_name"] == SERVER
    body = Synapse.get_token_body(session, openid, "!call:matrix.localhost", "member-a")
    r = post_json(synapse_proxy.port, PREFIX + "/get_token", body)
    assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu.port}",
                        room=room_alias("!call:matrix.localhost"),
                        identity=identity("@alice:matrix.localhost", session["device_id"], "member-a"),
                        full_access=True)
    [(_, req)] = sfu.create_room_calls()
    assert req.name == room_alias("!call:matrix.localhost")
    assert openid["access_token"] not in synapse_proxy.log()


def test_real_synapse_rejects_a_wrong_token(synapse, synapse_proxy, sfu):
    session = synapse.login("alice", "correct horse battery staple")
    openid = synapse.openid_token(session)
    openid["access_token"] = openid["access_token"][::-1]
    body = {"room": "!call:matrix.localhost", "openid_token": openid, "device_id": session["device_id"]}
    r = post_json(synapse_proxy.port, PREFIX + "/sfu/get", body)
    assert_matrix_error(r, 401, "M_UNAUTHORIZED", "The request could not be authorised.")
    assert sfu.recorded() == []


def test_real_synapse_unreachable_is_401(proxy_kind, workdir, ca, synapse, sfu, upstream):
    dead = free_port()
    cfg = {
        "stripPrefixes": [PREFIX], "livekitUrl": f"ws://127.0.0.1:{sfu.port}", "livekitKey": LIVEKIT_KEY,
        "livekitSecretEnv": "LIVEKIT_SECRET", "fullAccessHomeservers": [SERVER],
        "homeservers": {SERVER: f"http://127.0.0.1:{dead}"},
    }
    session = synapse.login("alice", "correct horse battery staple")
    openid = synapse.openid_token(session)
    with start_proxy(proxy_kind, workdir, cfg, upstream.port, ca, trust="system") as e:
        body = {"room": "!call:matrix.localhost", "openid_token": openid, "device_id": session["device_id"]}
        r = post_json(e.port, PREFIX + "/sfu/get", body)
        assert_matrix_error(r, 401, "M_UNAUTHORIZED")
        # Envoy answers its own callout with 503; the Traefik plugin sees the refused connection.
        wait_for_log(e, "status 503" if proxy_kind == "envoy" else "Connection refused")
