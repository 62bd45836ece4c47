"""Metrics on real Envoy: the filter's counters and histograms, with the labels the shipped
envoy.yaml's stats_tags extract, scraped from the admin endpoint's /stats/prometheus."""

from __future__ import annotations

import re
import time

from checks import get_token_body, new_token, post_json
from conftest import PREFIX, standard_config
from harness import Envoy, request

GET_TOKEN = PREFIX + "/get_token"


def scrape(envoy) -> dict[str, float]:
    text = request(envoy.admin_port, "GET", "/stats/prometheus").body.decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(matrixrtc_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_prometheus_metrics(workdir, ca, homeserver, sfu, upstream):
    with Envoy(workdir, standard_config(homeserver, sfu), upstream_port=upstream.port, ca=ca) as e:
        for server, user in (("example.org", "@alice:example.org"), ("other.example", "@bob:other.example")):
            token = new_token()
            homeserver.tokens[token] = user
            assert post_json(e.port, GET_TOKEN, get_token_body(token, server=server, user=user)).status == 200
        assert post_json(e.port, GET_TOKEN, get_token_body(new_token())).status == 401
        assert post_json(e.port, GET_TOKEN, b"nope").status == 400
        assert post_json(e.port, PREFIX + "/sfu/get", b"{" + b" " * 70_000 + b"}").status == 413
        sfu.status = 502
        token = new_token()
        homeserver.tokens[token] = "@carol:example.org"
        assert post_json(e.port, GET_TOKEN, get_token_body(token, user="@carol:example.org")).status == 500
        sfu.status = 200
        for _ in range(3):
            assert request(e.port, "GET", PREFIX + "//x?y=1").status == 200
        time.sleep(1.5)  # histograms are flushed with the stats flush
        m = scrape(e)
    want = {
        'matrixrtc_token_requests{endpoint="get_token",outcome="issued_full"}': 1,
        'matrixrtc_token_requests{endpoint="get_token",outcome="issued_restricted"}': 1,
        'matrixrtc_token_requests{endpoint="get_token",outcome="unauthorized"}': 1,
        'matrixrtc_token_requests{endpoint="get_token",outcome="bad_request"}': 1,
        'matrixrtc_token_requests{endpoint="get_token",outcome="sfu_error"}': 1,
        'matrixrtc_token_requests{endpoint="sfu_get",outcome="too_large"}': 1,
        'matrixrtc_callouts{target="homeserver",result="ok"}': 3,
        'matrixrtc_callouts{target="homeserver",result="status_4xx"}': 1,
        'matrixrtc_callouts{target="livekit",result="ok"}': 2,
        'matrixrtc_callouts{target="livekit",result="status_5xx"}': 1,
        "matrixrtc_strip_prefix_rewrites{}": 3,
    }
    for name, value in want.items():
        assert m.get(name) == value, (name, " ".join(sorted(k for k in m if "bucket" not in k)))
    assert any(k.startswith('matrixrtc_callout_duration_ms_count{target="homeserver"}') for k in m), sorted(m)[:40]
