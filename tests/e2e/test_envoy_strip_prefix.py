"""Strip-prefix through the real Envoy: every row of shared/cases/strip-prefix.tsv (copy in
tests/cases/), for both spellings of the configured prefix, against an upstream that echoes
what it received."""

from __future__ import annotations

from pathlib import Path

import pytest

from checks import STRIP_CASES, assert_strip_case, send_strip_case, strip_rows
from conftest import PREFIX
from harness import Envoy, request

SHARED = Path(__file__).resolve().parents[3] / "shared" / "cases"


@pytest.mark.parametrize("name", ["strip-prefix.tsv", "token-endpoints.md"])
def test_case_files_match_shared_copies(name):
    """tests/cases/ is a copy of shared/cases/ (so the repository stands alone); keep them equal."""
    if not (SHARED / name).exists():
        pytest.skip("shared/ is not beside the checkout")
    assert (STRIP_CASES.parent / name).read_bytes() == (SHARED / name).read_bytes()


@pytest.fixture(scope="module", params=[PREFIX, PREFIX + "/"], ids=["prefix", "prefix-slash"])
def strip_envoy(request, workdir, upstream):
    with Envoy(workdir, {"stripPrefixes": [request.param]}, upstream_port=upstream.port, ca=None,
               tls_mode="system") as e:
        yield e


@pytest.mark.parametrize("row", strip_rows(), ids=lambda r: f"{r['method']} {r['request_target']}")
def test_strip_prefix_case(strip_envoy, upstream, row):
    response, body = send_strip_case(strip_envoy.port, row)
    assert_strip_case(upstream, row, response, body, PREFIX)


def test_client_forwarded_prefix_is_replaced(strip_envoy, upstream):
    r = request(strip_envoy.port, "GET", PREFIX + "/x", headers={"X-Forwarded-Prefix": "/evil"})
    assert r.status == 200
    [got] = upstream.recorded()
    assert got.path == "/x"
    assert got.header("x-forwarded-prefix") == [PREFIX]


def test_large_body_passes_through_identical(strip_envoy, upstream):
    """Case 18: a 5 KB body to a pass-through path reaches upstream identical."""
    body = bytes(range(256)) * 20
    r = request(strip_envoy.port, "PUT", PREFIX + "/upload", body,
                headers={"Content-Type": "application/octet-stream"})
    assert r.status == 200
    [got] = upstream.recorded()
    assert got.path == "/upload"
    assert got.body == body
    assert got.header("content-length") == [str(len(body))]


def test_strip_only_filter_never_answers_token_paths(strip_envoy, upstream):
    """Without livekitUrl, /get_token under the prefix is forwarded, not answered."""
    r = request(strip_envoy.port, "POST", PREFIX + "//get_token?x=1", b"{}")
    assert r.status == 200
    [got] = upstream.recorded()
    assert (got.method, got.path, got.body) == ("POST", "/get_token?x=1", b"{}")
