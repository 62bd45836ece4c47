"""Proxy benchmarks on loopback, each comparison measured in the same run (medians over
rounds, A and B interleaved):

1. strip-prefix: Envoy + filter vs Envoy's native route `prefix_rewrite` (no filter);
2. token requests (restricted and full-access users) through Envoy + filter vs Envoy proxying
   one POST to the same instant upstream (the limit for one upstream round trip);
3. token requests through Traefik + plugin vs Traefik proxying one POST, over one connection
   (the required inFlightReq lets one token request run at a time, README "Traefik");
4. footprint: `.wasm` sizes, Envoy resident memory with and without the filter.

The "instant" upstream, homeserver (userinfo) and LiveKit API (CreateRoom) are Envoy
`direct_response` listeners in a separate Envoy process. Load: Debian's `wrk` (closed loop).

    .venv/bin/python scripts/bench.py      (BENCH_SECONDS=8 BENCH_ROUNDS=3 BENCH_CONNECTIONS=32)
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import yaml  # noqa: E402

from harness import WASM, Envoy, envoy_binary, free_port, request  # noqa: E402
from traefik import TRAEFIK_WASM, Traefik  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
PREFIX = "/livekit-jwt-service"
BODY = json.dumps({
    "room_id": "!bench:example.org", "slot_id": "m.call#ROOM",
    "openid_token": {"access_token": "bench-token", "token_type": "Bearer",
                     "matrix_server_name": "example.org", "expires_in": 3600},
    "member": {"id": "m", "claimed_user_id": "@bench:example.org", "claimed_device_id": "D"},
})


def listener(name, port, status, body, content_type="application/json"):
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [{
                    "match": {"prefix": "/"},
                    "direct_response": {"status": status, "body": {"inline_string": body}},
                    "response_headers_to_add": [{"header": {"key": "content-type", "value": content_type}}],
                }]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }


def cluster(name, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


class Proc:
    def __init__(self, cfg: dict, work: Path, name: str, admin_port: int):
        self.path = work / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.admin_port = admin_port
        self.log = open(work / f"{name}.log", "wb")
        self.proc = subprocess.Popen([envoy_binary(), "-c", str(self.path), "--disable-hot-restart",
                                      "--concurrency", "1", "--log-level", "warning"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if request(admin_port, "GET", "/ready", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def to_us(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]


def wrk(port: int, path: str, post: bool, work: Path, connections: int = CONNECTIONS) -> tuple[float, float, float]:
    """Requests/s, p50 µs, p99 µs."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{SECONDS}s", "--latency"]
    if post:
        script = work / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          f"wrk.body = {json.dumps(BODY)}\n"
                          "local bad = 0\nresponse = function(status) if status ~= 200 then bad = bad + 1 end end\n"
                          'done = function() if bad > 0 then io.write("NON200 " .. bad .. "\\n") end end\n')
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                         timeout=SECONDS + 60).stdout
    if "NON200" in out or "Non-2xx" in out:
        raise RuntimeError(f"unexpected statuses:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_us(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_us(re.search(r"\s99%\s+(\S+)", out).group(1))
    return rps, p50, p99


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="matrixrtc-bench-"))
    up_port, hs_port, sfu_port, backend_admin = free_port(), free_port(), free_port(), free_port()
    backend_cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend_admin}}},
        "static_resources": {"listeners": [
            listener("upstream", up_port, 200, "ok", "text/plain"),
            listener("homeserver", hs_port, 200, '{"sub":"@bench:example.org"}'),
            listener("sfu", sfu_port, 200, "", "application/protobuf"),
        ]},
    }
    backend = Proc(backend_cfg, work, "backend", backend_admin)

    # B: Envoy without the filter, native prefix_rewrite to the same upstream.
    native_port, native_admin = free_port(), free_port()
    native_cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": native_admin}}},
        "static_resources": {
            "listeners": [{
                "name": "native",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": native_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "native",
                        "route_config": {"virtual_hosts": [{"name": "native", "domains": ["*"], "routes": [
                            {"match": {"prefix": PREFIX + "/"}, "route": {"cluster": "upstream", "prefix_rewrite": "/"}},
                            {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}},
                        ]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    }}]}],
            }],
            "clusters": [cluster("upstream", up_port)],
        },
    }
    try:
        native = Proc(native_cfg, work, "native", native_admin)
    except RuntimeError:
        backend.stop()
        raise

    def filtered(full_access: str, prefix: str = PREFIX):
        plugin = {
            "stripPrefixes": [prefix], "livekitUrl": f"ws://127.0.0.1:{sfu_port}", "livekitKey": "devkey",
            "livekitSecretEnv": "LIVEKIT_SECRET", "fullAccessHomeservers": [full_access],
            "homeservers": {"example.org": f"http://127.0.0.1:{hs_port}"},
        }

        return Envoy(work, plugin, upstream_port=up_port, ca=None, tls_mode="system",
                     log_level="warning", concurrency=1)

    with_filter = filtered("example.org")
    with_filter_restricted = filtered("other.example")
    # The same filter with a prefix that never matches: the cost of the proxy-wasm ABI alone.
    with_idle_filter = filtered("example.org", "/no-match")
    # Traefik with the plugin vs Traefik's native stripPrefix, same instant upstream.
    traefik_plugin = Traefik(work, {"stripPrefixes": [PREFIX]}, upstream_port=up_port, log_level="ERROR")
    traefik_native = Traefik(work, None, upstream_port=up_port, native_strip=[PREFIX], log_level="ERROR")
    traefik_token = Traefik(work, {
        "stripPrefixes": [PREFIX], "livekitUrl": f"ws://127.0.0.1:{sfu_port}", "livekitKey": "devkey",
        "livekitSecretEnv": "LIVEKIT_SECRET", "fullAccessHomeservers": ["other.example"],
        "homeservers": {"example.org": f"http://127.0.0.1:{hs_port}"},
    }, upstream_port=up_port, log_level="ERROR", serialize=True,
        env={"LIVEKIT_SECRET": "bench-secret-0123456789abcdef0123456789"})
    proxies = (with_filter, with_filter_restricted, with_idle_filter, traefik_plugin, traefik_native, traefik_token)
    for e in proxies:
        e.start()
    try:
        for e in (with_filter, with_filter_restricted, traefik_token):
            r = request(e.port, "POST", PREFIX + "/get_token", BODY.encode(), {"Content-Type": "application/json"})
            assert r.status == 200, (r.status, r.body)
        r = request(native_port, "GET", PREFIX + "/a/b")
        assert r.status == 200

        rss_before = {"filter": rss_mib(with_filter.proc.pid), "native": rss_mib(native.proc.pid),
                      "traefik_token": rss_mib(traefik_token.proc.pid)}
        results: dict[str, list] = {k: [] for k in ("strip_filter", "strip_native", "idle_filter",
                                                    "traefik_plugin", "traefik_native", "token_restricted",
                                                    "token_full", "one_round_trip", "traefik_token",
                                                    "traefik_round_trip")}
        for rnd in range(ROUNDS):
            print(f"round {rnd + 1}/{ROUNDS} …", file=sys.stderr, flush=True)
            results["strip_native"].append(wrk(native_port, PREFIX + "/a/b?x=1", False, work))
            results["strip_filter"].append(wrk(with_filter.port, PREFIX + "/a/b?x=1", False, work))
            results["idle_filter"].append(wrk(with_idle_filter.port, PREFIX + "/a/b?x=1", False, work))
            results["traefik_native"].append(wrk(traefik_native.port, PREFIX + "/a/b?x=1", False, work))
            results["traefik_plugin"].append(wrk(traefik_plugin.port, PREFIX + "/a/b?x=1", False, work))
            results["one_round_trip"].append(wrk(native_port, PREFIX + "/get_token", True, work))
            results["token_restricted"].append(wrk(with_filter_restricted.port, PREFIX + "/get_token", True, work))
            results["token_full"].append(wrk(with_filter.port, PREFIX + "/get_token", True, work))
            # Traefik's native stripPrefix router proxies the POST to the instant upstream.
            results["traefik_round_trip"].append(wrk(traefik_native.port, PREFIX + "/get_token", True, work, 1))
            results["traefik_token"].append(wrk(traefik_token.port, PREFIX + "/get_token", True, work, 1))
        rss_after = {"filter": rss_mib(with_filter.proc.pid), "native": rss_mib(native.proc.pid),
                     "traefik_token": rss_mib(traefik_token.proc.pid)}
    finally:
        for p in proxies:
            p.stop()
        native.stop()
        backend.stop()

    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in results.items()}

    def line(name, key):
        rps, p50, p99 = med[key]
        print(f"  {name:<44} {rps:>9.0f} req/s  p50 {p50:>7.0f} µs  p99 {p99:>7.0f} µs")

    print(f"\nproxy benchmarks: wrk -t1 -c{CONNECTIONS}, {SECONDS} s x {ROUNDS} rounds, medians;"
          " Envoy 1 worker; instant upstream/homeserver/SFU (Envoy direct_response)")
    line("strip-prefix, Envoy + filter", "strip_filter")
    line("strip-prefix, Envoy native prefix_rewrite", "strip_native")
    line("pass-through, Envoy + filter, prefix not matching", "idle_filter")
    ratio = med["strip_filter"][0] / med["strip_native"][0]
    idle = med["idle_filter"][0] / med["strip_native"][0]
    print(f"    throughput ratio idle filter/native {idle:.3f}  (the proxy-wasm ABI's own cost: the floor for any filter)")
    print(f"    throughput ratio filter/idle filter {med['strip_filter'][0] / med['idle_filter'][0]:.3f}  (what strip-prefix itself costs)")
    added = med["strip_filter"][2] - med["strip_native"][2]
    print(f"    throughput ratio filter/native {ratio:.3f}  (target ≥ 0.95: {'met' if ratio >= 0.95 else 'MISSED'})")
    print(f"    added p99 {added:.0f} µs  (target ≤ 100 µs: {'met' if added <= 100 else 'MISSED'}; "
          "closed loop: each proxy at its own saturation)")
    line("strip-prefix, Traefik + plugin", "traefik_plugin")
    line("strip-prefix, Traefik native stripPrefix", "traefik_native")
    tratio = med["traefik_plugin"][0] / med["traefik_native"][0]
    print(f"    throughput ratio plugin/native {tratio:.3f}  (Traefik; no target set)")
    line("token, restricted user (userinfo + CreateRoom)", "token_restricted")
    line("token, full-access user (userinfo + CreateRoom)", "token_full")
    line("one round trip: Envoy proxying the POST", "one_round_trip")
    tr = med["token_restricted"][0] / med["one_round_trip"][0]
    print(f"    throughput ratio restricted/one-round-trip {tr:.3f}  (target ≥ 0.8: {'met' if tr >= 0.8 else 'MISSED'})")
    line("token through Traefik + plugin, 1 connection", "traefik_token")
    line("one round trip: Traefik proxying the POST, 1 conn.", "traefik_round_trip")
    ttr = med["traefik_token"][0] / med["traefik_round_trip"][0]
    print(f"    throughput ratio token/one-round-trip {ttr:.3f}  (Traefik: two callouts over new connections; no target set)")
    size = WASM.stat().st_size
    print(f"\nfootprint\n  proxy-wasm .wasm {size / 1024:.0f} KiB = {size / 1000:.1f} KB  (target ≤ 400 KB: {'met' if size <= 400_000 else 'MISSED'})")
    tsize = TRAEFIK_WASM.stat().st_size
    print(f"  Traefik plugin .wasm {tsize / 1024:.0f} KiB (with TLS: rustls + ring, Mozilla roots; no target set)")
    print(f"  Envoy RSS with filter    after warm-up {rss_before['filter']:.1f} MiB, after load {rss_after['filter']:.1f} MiB")
    print(f"  Envoy RSS without filter after warm-up {rss_before['native']:.1f} MiB, after load {rss_after['native']:.1f} MiB")
    growth = rss_after["filter"] - rss_before["filter"]
    print(f"  growth with filter {growth:+.1f} MiB  (target: no growth beyond noise, ≤ 2 MiB: {'met' if growth <= 2 else 'MISSED'})")
    tgrowth = rss_after["traefik_token"] - rss_before["traefik_token"]
    print(f"  Traefik RSS with the token service after warm-up {rss_before['traefik_token']:.1f} MiB, "
          f"after {ROUNDS} rounds of token load {rss_after['traefik_token']:.1f} MiB ({tgrowth:+.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
