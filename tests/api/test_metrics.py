"""Metrics registry and the Prometheus text format of GET /metrics."""

from __future__ import annotations

import re

import httpx
import pytest
from gateway_helpers import FakeBackend, app_of, serving

from eldric_p2p.api import metrics
from eldric_p2p.api.gateway import gateway_routes
from eldric_p2p.api.metrics import Registry, metrics_routes
from eldric_p2p.api.router import Router

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? [^ ]+$')


def test_text_format() -> None:
    r = Registry()
    c = r.counter("x_total", "things", ("peer",))
    c.inc(peer='we"ird\\name\n')
    c.inc(2, peer="b")
    g = r.gauge("depth", "queue")
    g.set(3)
    s = r.summary("step_seconds", "step", ("stage",))
    s.observe(0.5, stage="0-8")
    s.observe(1.5, stage="0-8")
    text = r.render()
    assert "# TYPE x_total counter" in text and "# HELP depth queue" in text
    assert 'x_total{peer="we\\"ird\\\\name\\n"} 1' in text and 'x_total{peer="b"} 2' in text
    assert "depth 3" in text
    assert 'step_seconds_sum{stage="0-8"} 2' in text and 'step_seconds_count{stage="0-8"} 2' in text
    assert 'step_seconds_last{stage="0-8"} 1.5' in text
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), line
    assert s.mean(stage="0-8") == 1.0


def test_misuse_and_limits() -> None:
    r = Registry()
    c = r.counter("c", "c", ("a",))
    assert r.counter("c", "c", ("a",)) is c
    with pytest.raises(ValueError):
        r.gauge("c", "c", ("a",))
    with pytest.raises(ValueError):
        c.inc(b="x")
    with pytest.raises(ValueError):
        c.inc(-1, a="x")
    for i in range(metrics.MAX_SERIES + 50):
        c.inc(a=str(i))
    assert len(c.samples()) == metrics.MAX_SERIES + 1 and c.value(a="_other") == 50


def test_rate_window() -> None:
    now = [100.0]
    rate = metrics.Rate("r", "r", ("m",), window=10.0, clock=lambda: now[0])
    rate.add(30, m="a")
    now[0] += 5
    rate.add(20, m="a")
    assert rate.rate(m="a") == pytest.approx(5.0)
    now[0] += 6  # the first 30 fell out of the window
    assert rate.rate(m="a") == pytest.approx(2.0)
    now[0] += 20
    assert rate.total_rate() == 0.0


def test_gateway_requests_show_in_metrics() -> None:
    router = Router()
    router.add(FakeBackend("mx", name="fake-mx"))
    before = metrics.REQUESTS.value(endpoint="chat", model="mx", status="200")
    with serving(app_of(gateway_routes(router) + metrics_routes())) as url:
        body = {"model": "mx", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
        r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metrics.REQUESTS.value(endpoint="chat", model="mx", status="200") == before + 1
    assert 'eldric_queue_depth{model="mx",backend="fake-mx"} 0' in r.text
    names = ["eldric_requests_total", "eldric_tokens_total", "eldric_tokens_per_second", "eldric_queue_depth",
             "eldric_stage_step_seconds", "eldric_link_rtt_seconds", "eldric_fetch_bytes_total"]  # fmt: skip
    for name in names:
        assert f"# TYPE {name} " in r.text
    assert metrics.TOKENS.value(model="mx", kind="completion") >= 2  # counted by the gateway for any backend
