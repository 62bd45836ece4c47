"""The main job: real Envoy running the shipped envoy/envoy.yaml unmodified with the filter
(or, with the argument `traefik`, real Traefik running the shipped
traefik/dynamic-token-service.yml unmodified with the plugin), a real Synapse for the server
name `matrix.localhost`, a Matrix user who obtains an OpenID token, and a LiveKit access token
minted through /livekit-jwt-service/get_token. With Envoy it then shows delayed-leave
delegation (MSC4140) on Synapse's own delayed events: Alice's leave event stays pending while
LiveKit has her in the call and lands in the room when LiveKit reports that she left.

Ports (all 127.0.0.1, as in the shipped files): the proxy 8080 (Envoy admin 9901), Synapse
8008, LiveKit API 7880 (a recording fake: no LiveKit server is available from the package
registries here), upstream 8081 (an echo server, to show strip-prefix on pass-through traffic).
Run it with scripts/demo.sh [traefik], which builds both artifacts and installs what it needs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import jwt as pyjwt  # noqa: E402
from livekit.api import TokenVerifier  # noqa: E402

from checks import identity, room_alias  # noqa: E402
from harness import EchoUpstream, Envoy, FakeSfu, request, signed_webhook  # noqa: E402
from synapse import Synapse  # noqa: E402
from traefik import Traefik  # noqa: E402

KEY, SECRET = "devkey", "demo-secret-change-me-0123456789abcdef"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main(proxy: str = "envoy") -> int:
    work = Path(tempfile.mkdtemp(prefix="matrixrtc-demo-"))
    sfu = upstream = synapse = envoy = None
    name = "Envoy" if proxy == "envoy" else "Traefik"
    try:
        step("starting a fake LiveKit API on 127.0.0.1:7880 and an echo upstream on 127.0.0.1:8081")
        sfu = FakeSfu(port=7880)
        upstream = EchoUpstream(port=8081)

        step("starting Synapse (server name matrix.localhost) on 127.0.0.1:8008")
        synapse = Synapse(work / "synapse", 8008, "matrix.localhost").start()
        synapse.register("alice", "demo-password")
        session = synapse.login("alice", "demo-password")
        print(f"    logged in as {session['user_id']} on device {session['device_id']}")

        secrets = {"LIVEKIT_KEY": KEY, "LIVEKIT_SECRET": SECRET}
        if proxy == "envoy":
            step("starting Envoy with envoy/envoy.yaml (listener 127.0.0.1:8080)")
            envoy = Envoy(work, config_file=ROOT / "envoy" / "envoy.yaml", cwd=ROOT, env=secrets).start()
        else:
            step("starting Traefik 3.7 with traefik/dynamic-token-service.yml (entry point 127.0.0.1:8080)")
            envoy = Traefik(work, None, upstream_port=8081, env=secrets, port=8080,
                            dynamic_file=ROOT / "traefik" / "dynamic-token-service.yml",
                            log_level="INFO").start()

        step("requesting a Matrix OpenID token from Synapse")
        openid = synapse.openid_token(session)
        print(f"    matrix_server_name={openid['matrix_server_name']} expires_in={openid['expires_in']}")

        step("POST http://127.0.0.1:8080/livekit-jwt-service/get_token")
        body = Synapse.get_token_body(session, openid, "!demo:matrix.localhost", "demo-member")
        r = request(8080, "POST", "/livekit-jwt-service/get_token", json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"})
        print(f"    HTTP {r.status}")
        if r.status != 200:
            print(r.body.decode(errors="replace"))
            print(envoy.log()[-3000:])
            return 1
        answer = r.json()
        print(f"    url: {answer['url']}")
        claims = pyjwt.decode(answer["jwt"], options={"verify_signature": False})
        print("    LiveKit access token claims:")
        print("      " + json.dumps(claims, indent=2).replace("\n", "\n      "))
        verified = TokenVerifier(KEY, SECRET).verify(answer["jwt"])
        print(f"    LiveKit's TokenVerifier accepts it: identity={verified.identity} room={verified.video.room}")
        [(call, req)] = sfu.create_room_calls()
        print(f"    the SFU got CreateRoom {call.path} name={req.name} empty_timeout={req.empty_timeout}"
              f" departure_timeout={req.departure_timeout}")

        step("strip-prefix on pass-through traffic: GET /livekit-jwt-service//status?x=1")
        r = request(8080, "GET", "/livekit-jwt-service//status?x=1")
        echo = r.json()
        fwd = [v for k, v in echo["headers"] if k.lower() == "x-forwarded-prefix"]
        print(f"    upstream received {echo['method']} {echo['path']} with X-Forwarded-Prefix {fwd}")
        if proxy == "envoy" and not delayed_leave(synapse, session, sfu, envoy):
            return 1
        print(f"\nOK: token minted inside {name}; no lk-jwt-service involved.")
        return 0
    finally:
        for thing in (envoy, synapse):
            if thing is not None:
                thing.stop()
        for fake in (sfu, upstream):
            if fake is not None:
                fake.stop()


def delayed_leave(synapse, session: dict, sfu, envoy) -> bool:
    """MSC4140 delegation through the shipped envoy/envoy.yaml's job service."""
    step("delayed leave (MSC4140): Alice schedules her leave event in Synapse with a 4 s delay "
         "and hands it over with POST /livekit-jwt-service/delegate_delayed_leave")
    room_id = synapse.create_room(session)
    event_type, state_key = "org.matrix.msc3401.call.member", f"_{session['user_id']}_{session['device_id']}_m.call"
    delay_id = synapse.put_delayed_state(session, room_id, event_type, state_key, {}, 4000)
    body = Synapse.get_token_body(session, synapse.openid_token(session), room_id, "demo-member")
    body.update(delay_id=delay_id, delay_timeout=4000)
    room, ident = room_alias(room_id), identity(session["user_id"], session["device_id"], "demo-member")
    sfu.participants.add((room, ident))  # she is in the LiveKit room
    r = request(8080, "POST", "/livekit-jwt-service/delegate_delayed_leave", json.dumps(body).encode(),
                headers={"Content-Type": "application/json"})
    print(f"    HTTP {r.status} {r.body.decode(errors='replace')}")
    if r.status != 200:
        print(envoy.log()[-3000:])
        return False
    time.sleep(9)
    pending = [d for d in synapse.delayed_events(session) if d["delay_id"] == delay_id]
    if not pending:
        print("    the leave event fired while Alice was still in the call")
        return False
    restarted = time.time() - pending[0]["running_since"] / 1000
    print(f"    after 9 s (over twice the delay) Synapse still has it pending; the filter last"
          f" restarted it {restarted:.1f} s ago")
    step("LiveKit reports that Alice left: a signed webhook to /livekit-jwt-service/sfu_webhook")
    sfu.participants.discard((room, ident))
    data, token = signed_webhook("participant_left", room, ident, secret=SECRET, key=KEY)
    r = request(8080, "POST", "/livekit-jwt-service/sfu_webhook", data, headers={"Authorization": token})
    print(f"    HTTP {r.status}")
    deadline = time.monotonic() + 5
    while (event := synapse.state(session, room_id, event_type, state_key)) is None:
        if time.monotonic() > deadline:
            print("    the leave event did not arrive")
            print(envoy.log()[-3000:])
            return False
        time.sleep(0.1)
    print(f"    her leave event is in the room now: {event_type} {json.dumps(event)}")
    return True


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["envoy"], ["traefik"]):
        sys.exit("usage: demo.py [envoy|traefik]")
    sys.exit(main(*sys.argv[1:]))
