"""A real Synapse homeserver (PyPI matrix-synapse) on 127.0.0.1 with SQLite, for end-to-end
tests and the demo: generate a config, start it, register a user, log in and request a Matrix
OpenID token from the client-server API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import yaml

from harness import ManagedProcess, request


class Synapse(ManagedProcess):
    stop_timeout = 15.0

    """`Synapse(dir, port, server_name)`: a context manager that runs Synapse listening on
    127.0.0.1:`port` with the client and federation resources over plain HTTP."""

    def __init__(self, directory: Path, port: int, server_name: str = "matrix.localhost",
                 tls=None, tls_port: int | None = None):
        """`tls` (a harness.TestCA) and `tls_port` add a federation listener over TLS."""
        self.tls = tls
        self.tls_port = tls_port
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.server_name = server_name
        self.config = self.dir / "homeserver.yaml"
        self.proc: subprocess.Popen | None = None

    def _generate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "synapse.app.homeserver", "--server-name", self.server_name,
             "--config-path", str(self.config), "--generate-config", "--report-stats=no",
             "--data-directory", str(self.dir)],
            check=True, capture_output=True, cwd=self.dir, timeout=120,
        )
        cfg = yaml.safe_load(self.config.read_text())
        cfg["listeners"] = [{
            "port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
            "x_forwarded": False, "resources": [{"names": ["client", "federation"], "compress": False}],
        }]
        if self.tls is not None:
            cfg["listeners"].append({
                "port": self.tls_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": True,
                "x_forwarded": False, "resources": [{"names": ["federation"], "compress": False}],
            })
            cfg["tls_certificate_path"] = str(self.tls.cert_pem)
            cfg["tls_private_key_path"] = str(self.tls.key_pem)
        cfg["trusted_key_servers"] = []  # no network here; nothing to fetch keys from
        cfg["suppress_key_server_warning"] = True
        cfg["enable_registration"] = False
        cfg["rc_login"] = {"address": {"per_second": 100, "burst_count": 100},
                           "account": {"per_second": 100, "burst_count": 100}}
        # MSC4140 delayed events (the delayed-leave tests): on, with room for frequent restarts.
        cfg["max_event_delay_duration"] = "24h"
        cfg["rc_delayed_event_mgmt"] = {"per_second": 100, "burst_count": 100}
        self.config.write_text(yaml.safe_dump(cfg))

    def start(self, timeout: float = 120.0) -> "Synapse":
        self._generate()
        self._log = open(self.dir / "stdout.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "--config-path", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("Synapse exited:\n" + self.log())
            try:
                if request(self.port, "GET", "/_matrix/client/versions", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("Synapse did not start:\n" + self.log())

    def log(self) -> str:
        out = ""
        for name in ("stdout.log", "homeserver.log"):
            p = self.dir / name
            if p.exists():
                out += p.read_text(errors="replace")[-8000:]
        return out


    # ------------------------------------------------------------------ client-server API

    def register(self, localpart: str, password: str) -> None:
        """Registers a user with the shared secret (Synapse's register_new_matrix_user)."""
        tool = Path(sys.executable).parent / "register_new_matrix_user"
        subprocess.run(
            [str(tool), "-u", localpart, "-p", password, "--no-admin", "-c", str(self.config),
             f"http://127.0.0.1:{self.port}"],
            check=True, capture_output=True, timeout=60,
        )

    def _post(self, path: str, body: dict, token: str | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        r = request(self.port, "POST", path, json.dumps(body).encode(), headers=headers)
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {r.body!r}")
        return r.json()

    def login(self, localpart: str, password: str) -> dict:
        """Password login; returns `{user_id, access_token, device_id, …}`."""
        return self._post("/_matrix/client/v3/login", {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        })

    @staticmethod
    def get_token_body(session: dict, openid: dict, room_id: str, member_id: str) -> dict:
        """A `/get_token` body as Element Call sends it for this session and OpenID token."""
        return {
            "room_id": room_id,
            "slot_id": "m.call#ROOM",
            "openid_token": openid,
            "member": {"id": member_id, "claimed_user_id": session["user_id"],
                       "claimed_device_id": session["device_id"]},
        }

    def _call(self, method: str, path: str, session: dict, body: dict | None = None):
        headers = {"Authorization": f"Bearer {session['access_token']}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        return request(self.port, method, path, data, headers=headers)

    def create_room(self, session: dict) -> str:
        """A new private room of the session's user; returns its room ID."""
        return self._post("/_matrix/client/v3/createRoom", {}, session["access_token"])["room_id"]

    def put_delayed_state(self, session: dict, room_id: str, event_type: str, state_key: str,
                          content: dict, delay_ms: int) -> str:
        """Schedules a state event as an MSC4140 delayed event; returns its `delay_id`."""
        path = (f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/state/{event_type}/"
                f"{urllib.parse.quote(state_key, safe='')}?org.matrix.msc4140.delay={delay_ms}")
        r = self._call("PUT", path, session, content)
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {r.body!r}")
        return r.json()["delay_id"]

    def state(self, session: dict, room_id: str, event_type: str, state_key: str):
        """The room's current state event content, `None` when there is none."""
        path = (f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/state/{event_type}/"
                f"{urllib.parse.quote(state_key, safe='')}")
        r = self._call("GET", path, session)
        return r.json() if r.status == 200 else None

    def delayed_events(self, session: dict) -> list[dict]:
        """The session user's scheduled delayed events."""
        r = self._call("GET", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events", session)
        return r.json()["delayed_events"]

    def openid_token(self, session: dict) -> dict:
        """`POST /_matrix/client/v3/user/{userId}/openid/request_token`: the Matrix OpenID token
        `{access_token, token_type, matrix_server_name, expires_in}` a MatrixRTC client sends."""
        user = urllib.parse.quote(session["user_id"], safe="")
        return self._post(f"/_matrix/client/v3/user/{user}/openid/request_token", {}, session["access_token"])
