"""The whole exchange with a real Synapse: register a user, request a Matrix OpenID token from
Synapse's client API, exchange it through the proxy (Envoy + filter, and Traefik + plugin: every
test runs on both), and check the LiveKit access token with LiveKit's own verifier."""

from __future__ import annotations

import json
import time

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


# ------------------------------------------------------ delayed-leave delegation with real Synapse


class DelegatedCall:
    """Alice's call in a new room of the real Synapse: her leave event (a call membership state
    event) scheduled as an MSC4140 delayed event of 3 s and delegated through Envoy's
    /get_token; `webhook(event)` tells the proxy what LiveKit saw; `leave_event()` reads the
    room state."""

    EVENT_TYPE = "org.matrix.msc3401.call.member"

    def __init__(self, envoy, synapse, sfu, session: dict):
        from harness import request, signed_webhook

        self.envoy, self.synapse, self.sfu, self.session = envoy, synapse, sfu, session
        self.room_id = synapse.create_room(session)
        self.state_key = f"_{session['user_id']}_{session['device_id']}_m.call"
        self.delay_id = synapse.put_delayed_state(session, self.room_id, self.EVENT_TYPE,
                                                  self.state_key, {}, 3000)
        openid = synapse.openid_token(session)
        SEEN_SECRETS.add(openid["access_token"])
        body = Synapse.get_token_body(session, openid, self.room_id, "member-a")
        body.update(delay_id=self.delay_id, delay_timeout=3000)
        self.room = room_alias(self.room_id)
        self.identity = identity(session["user_id"], session["device_id"], "member-a")
        r = post_json(envoy.port, PREFIX + "/get_token", body)
        assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu.port}", room=self.room,
                            identity=self.identity, full_access=True)
        self._request, self._signed = request, signed_webhook

    def webhook(self, event: str) -> None:
        present = event == "participant_joined"
        (self.sfu.participants.add if present else self.sfu.participants.discard)((self.room, self.identity))
        data, token = self._signed(event, self.room, self.identity)
        r = self._request(self.envoy.port, "POST", PREFIX + "/sfu_webhook", data, headers={"Authorization": token})
        assert r.status == 200

    def leave_event(self):
        return self.synapse.state(self.session, self.room_id, self.EVENT_TYPE, self.state_key)


@pytest.fixture(scope="module")
def delegation_envoy(workdir, ca, synapse, sfu, upstream):
    from harness import Envoy

    cfg = {
        "stripPrefixes": [PREFIX], "livekitUrl": f"ws://127.0.0.1:{sfu.port}", "livekitKey": LIVEKIT_KEY,
        "livekitSecretEnv": "LIVEKIT_SECRET", "fullAccessHomeservers": [SERVER],
        "homeservers": {SERVER: f"http://127.0.0.1:{synapse.port}"},
        "csApiUrls": {SERVER: f"http://127.0.0.1:{synapse.port}"},
    }
    with Envoy(workdir, cfg, upstream_port=upstream.port, ca=ca) as e:
        yield e


def test_real_synapse_delayed_leave_kept_alive_then_sent(delegation_envoy, synapse, sfu):
    """While LiveKit says the participant is connected, the job keeps restarting the delayed
    event, so it is still pending long after its 3 s; when LiveKit reports the departure the
    job sends it and the leave event is in the room."""
    call = DelegatedCall(delegation_envoy, synapse, sfu, synapse.login("alice", "correct horse battery staple"))
    call.webhook("participant_joined")
    time.sleep(7)  # more than twice the delay
    assert call.leave_event() is None, "the leave event fired while connected"
    assert [d["delay_id"] for d in synapse.delayed_events(call.session)] == [call.delay_id]
    call.webhook("participant_left")
    deadline = time.monotonic() + 5
    while call.leave_event() is None:
        assert time.monotonic() < deadline, "the leave event was not sent"
        time.sleep(0.1)
    assert synapse.delayed_events(call.session) == []
    wait_for_log(delegation_envoy, "ended: Sent")
    assert call.delay_id not in delegation_envoy.log(), "the delay_id (a capability) was logged"


def test_real_synapse_cancelled_delayed_event_ends_the_job(delegation_envoy, synapse, sfu):
    """The client cancels its own delayed event: the next restart gets Synapse's 404, the job
    ends without sending, and a later departure sends nothing."""
    session = synapse.login("alice", "correct horse battery staple")
    call = DelegatedCall(delegation_envoy, synapse, sfu, session)
    call.webhook("participant_joined")
    time.sleep(1)
    r = synapse._call("POST", f"/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{call.delay_id}/cancel",
                      session, {})
    assert r.status == 200, r.body
    wait_for_log(delegation_envoy, "ended: Gone", timeout=5)
    call.webhook("participant_left")
    time.sleep(4)  # past the delay: nothing may fire now
    assert call.leave_event() is None
