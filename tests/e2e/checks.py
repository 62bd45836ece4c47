"""Assertion helpers shared by the end-to-end tests."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import uuid
from pathlib import Path

import jwt as pyjwt
from livekit.api import TokenVerifier

from harness import LIVEKIT_KEY, LIVEKIT_SECRET, Response

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST",
    "access-control-allow-headers": "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
}


def b64_sha256_json(items: list[str]) -> str:
    """lk-jwt-service's derivation, computed independently (Go json.Marshal is compact and
    HTML-escapes <, >, &; the test inputs avoid those)."""
    raw = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def room_alias(room_id: str, slot_id: str = "m.call#ROOM") -> str:
    return b64_sha256_json([room_id, slot_id])


def identity(user_id: str, device_id: str, member_id: str) -> str:
    return b64_sha256_json([user_id, device_id, member_id])


def assert_cors_once(r: Response) -> None:
    __tracebackhide__ = True
    for name, value in CORS.items():
        assert r.header(name) == [value], f"{name}: {r.header(name)} in {r.headers}"


def assert_matrix_error(r: Response, status: int, errcode: str, error: str | None = None) -> None:
    __tracebackhide__ = True
    assert r.status == status, f"status {r.status}, body {r.body!r}"
    assert r.header("content-type") == ["application/json"], r.headers
    body = r.json()
    assert body["errcode"] == errcode, body
    if error is not None:
        assert body["error"] == error, body
    assert "jwt" not in body
    assert_cors_once(r)


def assert_standard_token(r: Response, sfu_port: int, *, user: str = "@alice:example.org",
                          room_id: str = "!room:example.org", full_access: bool = True) -> dict:
    """The token answer for `get_token_body`'s defaults (device DEVICE, member member-1) of
    `user` in `room_id`, with the standard configuration's SFU URL. Returns the claims."""
    __tracebackhide__ = True
    return assert_client_token(r, livekit_url=f"ws://127.0.0.1:{sfu_port}", room=room_alias(room_id),
                               identity=identity(user, "DEVICE", "member-1"), full_access=full_access)


def assert_client_token(r: Response, *, livekit_url: str, room: str, identity: str,
                        full_access: bool, lifetime: int = 3600) -> dict:
    """A 200 token answer whose JWT LiveKit's own verifier accepts, with exactly the grants of
    SPEC section 4. Returns the claims."""
    __tracebackhide__ = True
    assert r.status == 200, f"status {r.status}, body {r.body!r}"
    assert_cors_once(r)
    body = r.json()
    assert set(body) == {"url", "jwt"}, body
    assert body["url"] == livekit_url
    token = body["jwt"]
    SEEN_SECRETS.add(token)
    header = pyjwt.get_unverified_header(token)
    assert header["alg"] == "HS256", header
    claims = pyjwt.decode(token, LIVEKIT_SECRET, algorithms=["HS256"], options={"verify_aud": False})
    assert claims["iss"] == LIVEKIT_KEY
    assert claims["sub"] == identity
    assert isinstance(claims["nbf"], int) and isinstance(claims["exp"], int)
    assert claims["exp"] - claims["nbf"] == lifetime
    assert claims["video"] == {
        "room": room, "roomJoin": True, "canPublish": full_access,
        "canSubscribe": True, "canUpdateOwnMetadata": True,
    }, claims["video"]
    verified = TokenVerifier(LIVEKIT_KEY, LIVEKIT_SECRET).verify(token)
    assert verified.identity == identity
    assert verified.video.room == room
    assert verified.video.room_join is True
    assert verified.video.can_publish is full_access
    assert not verified.video.room_create
    # Signed with the configured secret only.
    try:
        TokenVerifier(LIVEKIT_KEY, "wrong-secret-wrong-secret-wrong-secret").verify(token)
    except Exception:
        pass
    else:
        raise AssertionError("token verified with a wrong secret")
    return claims


# Every access token and LiveKit access token the tests sent or received, for the final scan of
# all proxy logs (test_zz_log_scan.py).
SEEN_SECRETS: set[str] = set()


def new_token() -> str:
    token = "tok_" + uuid.uuid4().hex
    SEEN_SECRETS.add(token)
    return token


def openid(token: str, server: str = "example.org") -> dict:
    return {"access_token": token, "token_type": "Bearer", "matrix_server_name": server, "expires_in": 3600}


def get_token_body(token: str, *, server: str = "example.org", user: str = "@alice:example.org",
                   room_id: str = "!room:example.org", slot_id: str = "m.call#ROOM",
                   device: str = "DEVICE", member_id: str = "member-1", **extra) -> dict:
    body = {
        "room_id": room_id, "slot_id": slot_id, "openid_token": openid(token, server),
        "member": {"id": member_id, "claimed_user_id": user, "claimed_device_id": device},
    }
    body.update(extra)
    return body


def sfu_get_body(token: str, *, server: str = "example.org", room: str = "!room:example.org",
                 device: str = "DEVICE", **extra) -> dict:
    body = {"room": room, "openid_token": openid(token, server), "device_id": device}
    body.update(extra)
    return body


def post_json(port: int, target: str, body, **kw) -> Response:
    from harness import request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(port, "POST", target, data, headers={"Content-Type": "application/json"}, **kw)


# ------------------------------------------------------------------ strip-prefix scenarios
# One scenario list and one check for both proxies (Envoy filter, Traefik plugin), so the two
# builds cannot drift apart.

STRIP_CASES = Path(__file__).resolve().parents[1] / "cases" / "strip-prefix.tsv"


def strip_rows() -> list[dict]:
    with STRIP_CASES.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def send_strip_case(port: int, row: dict):
    """Sends one row of the case file (POST rows with a JSON body); returns (response, body)."""
    from harness import request

    body = b'{"room_id":"!r:example.org"}' if row["method"] == "POST" else None
    headers = {"Content-Type": "application/json"} if body else {}
    return request(port, row["method"], row["request_target"], body, headers=headers), body


def assert_strip_case(upstream, row: dict, response: Response, body: bytes | None, prefix: str) -> None:
    """The upstream received exactly the expected target, `X-Forwarded-Prefix` once (or not at
    all for untouched requests), the same method, body and Content-Type; no redirect."""
    __tracebackhide__ = True
    assert response.status == 200, f"no redirect, no error: {response.status} {response.body!r}"
    [got] = upstream.recorded()
    assert got.method == row["method"]
    if row["expected_upstream_target"] == "UNTOUCHED":
        assert got.path == row["request_target"]
        assert got.header("x-forwarded-prefix") == []
    else:
        assert got.path == row["expected_upstream_target"]
        assert got.header("x-forwarded-prefix") == [prefix]
    assert got.body == (body or b"")
    if body:
        assert got.header("content-type") == ["application/json"]
        assert base64.b64decode(response.json()["body_b64"]) == body
