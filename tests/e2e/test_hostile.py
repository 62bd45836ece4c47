"""Hostile requests and failing dependencies on real Envoy: each gets a clear answer within the
timeout, nothing crashes, and the next ordinary request still succeeds (the wasm VM is alive)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from checks import assert_matrix_error, get_token_body, new_token, post_json
from conftest import PREFIX, standard_config
from harness import Envoy, free_port, request

GET_TOKEN = PREFIX + "/get_token"


def assert_alive(envoy, homeserver):
    token = new_token()
    homeserver.tokens[token] = "@alive:example.org"
    r = post_json(envoy.port, GET_TOKEN, get_token_body(token, user="@alive:example.org"))
    assert r.status == 200, f"the VM must still work: {r.status} {r.body!r}"


def raw(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


@pytest.mark.parametrize("name,body,status", [
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 413),
    ("nested within limit", b'{"room_id":' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ("invalid utf-8", b'{"room_id":"\xc3\x28"}', 400),
    ("utf-16", '{"room_id":"x"}'.encode("utf-16"), 400),
    ("nul bytes", b"\x00" * 1000, 400),
    ("huge number", b'{"delay_timeout":1' + b"0" * 500 + b"}", 400),
])
def test_hostile_bodies(envoy, homeserver, name, body, status):
    r = post_json(envoy.port, GET_TOKEN, body)
    assert r.status == status, (name, r.status, r.body)
    assert r.json()["errcode"] in ("M_NOT_JSON", "M_BAD_JSON", "M_TOO_LARGE")
    assert homeserver.userinfo_calls() == []
    assert_alive(envoy, homeserver)


def test_body_that_never_ends(envoy, homeserver):
    """The client promises 1000 bytes, sends 10 and goes away: nothing is called, nothing
    hangs for the next client."""
    with socket.create_connection(("127.0.0.1", envoy.port)) as s:
        s.sendall(b"POST " + GET_TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"room_id\"")
        time.sleep(1.0)
    assert homeserver.userinfo_calls() == []
    assert_alive(envoy, homeserver)


@pytest.mark.parametrize("method", ["PROPFIND", "TRACE", "CONNECT-ISH", "BREW"])
def test_unknown_methods_on_token_paths(envoy, homeserver, method):
    r = request(envoy.port, method, GET_TOKEN)
    assert r.status in (400, 405), r.status
    if r.status == 405:
        assert_matrix_error(r, 405, "M_UNRECOGNIZED")
    assert_alive(envoy, homeserver)


@pytest.mark.parametrize("target,expect", [
    (b"http://evil.example/livekit-jwt-service/healthz", 200),  # absolute-form: Envoy uses the path
    (b"*", 404),
])
def test_odd_request_targets(envoy, homeserver, upstream, target, expect):
    out = raw(envoy.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status = int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1") else 0
    assert status == expect or (target == b"*" and status in (400, 404)), out[:200]
    assert_alive(envoy, homeserver)


def test_huge_header_value(envoy, homeserver):
    out = raw(envoy.port, b"POST " + GET_TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
              + b"\r\nContent-Length: 2\r\n\r\n{}")
    assert out.startswith(b"HTTP/1.1 431") or out == b"", out[:100]
    assert_alive(envoy, homeserver)


# ------------------------------------------------------------------ failing dependencies


@pytest.mark.parametrize("answer", ["hang", "reset", (200, b"x" * 5_000_000), (307, b""), (200, b"\xff\xfe")])
def test_homeserver_failures_then_alive(envoy, homeserver, sfu, answer):
    token = new_token()
    homeserver.tokens[token] = answer
    r = post_json(envoy.port, GET_TOKEN, get_token_body(token))
    assert_matrix_error(r, 401, "M_UNAUTHORIZED")
    assert r.elapsed < 6
    assert sfu.recorded() == []
    assert_alive(envoy, homeserver)


@pytest.mark.parametrize("status", [500, 503, "hang"])
def test_sfu_failures_then_alive(envoy, homeserver, sfu, status):
    sfu.status = status
    token = new_token()
    homeserver.tokens[token] = "@alice:example.org"
    r = post_json(envoy.port, GET_TOKEN, get_token_body(token))
    assert_matrix_error(r, 500, "M_UNKNOWN", "Unable to create room on SFU")
    assert r.elapsed < 6
    sfu.status = 200
    assert_alive(envoy, homeserver)


def test_sfu_refuses_connections(workdir, ca, homeserver, sfu, upstream):
    dead = free_port()
    cfg = standard_config(homeserver, sfu, livekitUrl=f"ws://127.0.0.1:{dead}")
    with Envoy(workdir, cfg, upstream_port=upstream.port, ca=ca) as e:
        token = new_token()
        homeserver.tokens[token] = "@alice:example.org"
        r = post_json(e.port, GET_TOKEN, get_token_body(token))
        assert_matrix_error(r, 500, "M_UNKNOWN", "Unable to create room on SFU")
        assert "CreateRoom for room" in e.log()
        r = request(e.port, "GET", PREFIX + "/healthz")
        assert r.status == 200
