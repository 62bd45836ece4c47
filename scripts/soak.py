"""Bounded load and soak test on loopback: real Envoy with the filter (or real Traefik with the
plugin, deployed as README "Traefik" requires), the recording fakes, CONCURRENCY client threads
mixing stripped pass-through requests and token requests (every token request for its own user
and room) for SECONDS. Checks every answer (status, the echoed path, the JWT's identity and
room) and samples the proxy's resident memory.

    .venv/bin/python scripts/soak.py [SECONDS=120] [CONCURRENCY=64] [envoy|traefik]

Exits non-zero on any unexpected status, any answer that belongs to another request, or
resident memory growing by more than 10 % + 8 MiB between the end of warm-up and the end.
Traefik: a 429 from the one-request-at-a-time slot is expected under concurrency and counted
apart, never as an error.
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import jwt as pyjwt  # noqa: E402

from checks import identity, room_alias  # noqa: E402
from conftest import PREFIX, standard_config  # noqa: E402
from conftest import start_proxy  # noqa: E402
from harness import LIVEKIT_SECRET, EchoUpstream, FakeHomeserver, FakeSfu, TestCA  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Stats:
    def __init__(self, allow_busy: bool = False):
        # Traefik: a 429 from the one-at-a-time slot is expected and counted apart.
        self.allow_busy = allow_busy
        self.lock = threading.Lock()
        self.latency = {"pass": [], "token": []}
        self.unexpected: list[str] = []
        self.mixups: list[str] = []
        self.busy = 0

    def add(self, kind, seconds, problem=None, mixup=None):
        with self.lock:
            self.latency[kind].append(seconds)
            if problem:
                self.unexpected.append(problem)
            if mixup:
                self.mixups.append(mixup)


def slot_busy(stats: Stats, status: int) -> bool:
    """`True` (and counted) for Traefik's 429 from the one-at-a-time slot."""
    if status != 429 or not stats.allow_busy:
        return False
    with stats.lock:
        stats.busy += 1
    return True


def worker(n: int, port: int, deadline: float, stats: Stats) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = 0
    while time.monotonic() < deadline:
        i += 1
        start = time.monotonic()
        try:
            if i % 2:
                target = f"{PREFIX}//echo/{n}/{i}?u=w{n}i{i}"
                conn.request("GET", target)
                resp = conn.getresponse()
                body = resp.read()
                took = time.monotonic() - start
                if slot_busy(stats, resp.status):
                    continue
                if resp.status != 200:
                    stats.add("pass", took, f"pass-through {resp.status}")
                    continue
                got = json.loads(body)["path"]
                want = f"/echo/{n}/{i}?u=w{n}i{i}"
                stats.add("pass", took, mixup=None if got == want else f"{want} got {got}")
            else:
                user = f"w{n}i{i}"
                room = f"!r{n}-{i}:example.org"
                body = json.dumps({
                    "room_id": room, "slot_id": "m.call#ROOM",
                    "openid_token": {"access_token": f"auto-{user}", "token_type": "Bearer",
                                     "matrix_server_name": "example.org", "expires_in": 3600},
                    "member": {"id": f"m{n}", "claimed_user_id": f"@{user}:example.org",
                               "claimed_device_id": f"D{n}"},
                }).encode()
                conn.request("POST", f"{PREFIX}/get_token", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                took = time.monotonic() - start
                if slot_busy(stats, resp.status):
                    continue
                if resp.status != 200:
                    stats.add("token", took, f"token {resp.status} {data[:80]!r}")
                    continue
                claims = pyjwt.decode(json.loads(data)["jwt"], LIVEKIT_SECRET, algorithms=["HS256"])
                ok = (claims["sub"] == identity(f"@{user}:example.org", f"D{n}", f"m{n}")
                      and claims["video"]["room"] == room_alias(room))
                stats.add("token", took, mixup=None if ok else f"{user} got {claims['sub']}")
        except (OSError, http.client.HTTPException) as e:
            stats.add("pass" if i % 2 else "token", time.monotonic() - start, f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()


def pct(values, q):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main(seconds: float = 120, concurrency: int = 64, proxy: str = "envoy") -> int:
    work = Path(tempfile.mkdtemp(prefix="matrixrtc-soak-"))
    ca = TestCA.create(work / "ca")
    hs, sfu, up = FakeHomeserver(tls=ca), FakeSfu(), EchoUpstream()
    envoy = start_proxy(proxy, work, standard_config(hs, sfu, calloutTimeoutMs=10000), up.port, ca,
                        quiet=True)
    try:
        envoy.start()
        pid = envoy.proc.pid
        # Warm-up: fill pools and caches, then take the baseline.
        warm = Stats(allow_busy=proxy == "traefik")
        threads = [threading.Thread(target=worker, args=(n, envoy.port, time.monotonic() + 5, warm))
                   for n in range(concurrency)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        rss_start = rss_kib(pid)
        stats = Stats(allow_busy=proxy == "traefik")
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=worker, args=(n, envoy.port, deadline, stats))
                   for n in range(concurrency)]
        t0 = time.monotonic()
        [t.start() for t in threads]
        samples = [rss_start]
        while any(t.is_alive() for t in threads):
            time.sleep(min(10, max(0.5, seconds / 12)))
            samples.append(rss_kib(pid))
        [t.join() for t in threads]
        elapsed = time.monotonic() - t0
        rss_end = rss_kib(pid)
        total = sum(len(v) for v in stats.latency.values())
        print(f"duration {elapsed:.0f} s, concurrency {concurrency}, requests {total} "
              f"({total / elapsed:.0f}/s; token {len(stats.latency['token']) / elapsed:.0f}/s)")
        for kind in ("pass", "token"):
            lat = stats.latency[kind]
            print(f"  {kind:5s} n={len(lat):6d} p50 {pct(lat, .5):6.1f} ms  p99 {pct(lat, .99):6.1f} ms"
                  f"  mean {statistics.fmean(lat) * 1000 if lat else 0:6.1f} ms")
        print(f"  unexpected statuses/errors: {len(stats.unexpected)}  mixed-up answers: {len(stats.mixups)}"
              + (f"  429 from the one-at-a-time slot: {stats.busy}" if stats.allow_busy else ""))
        for p in (stats.unexpected + stats.mixups)[:10]:
            print("   ", p)
        print(f"  {proxy} RSS after warm-up {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB, "
              f"max {max(samples) / 1024:.1f} MiB; samples (MiB): "
              + " ".join(f"{s / 1024:.1f}" for s in samples))
        print(f"  SFU CreateRoom calls: {len(sfu.create_room_calls())}")
        flat = rss_end <= rss_start * 1.10 + 8 * 1024
        print(f"  memory flat: {'yes' if flat else 'NO'}")
        return 0 if not stats.unexpected and not stats.mixups and flat else 1
    finally:
        envoy.stop()
        for fake in (hs, sfu, up):
            fake.stop()


if __name__ == "__main__":
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 120
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    proxy = sys.argv[3] if len(sys.argv) > 3 else "envoy"
    if proxy not in ("envoy", "traefik"):
        sys.exit("usage: soak.py [SECONDS] [CONCURRENCY] [envoy|traefik]")
    sys.exit(main(seconds, concurrency, proxy))
