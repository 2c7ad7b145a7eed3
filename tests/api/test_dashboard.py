"""The dashboard page, its assets and live JSON; rendered in headless Chromium with a fake pipeline status."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_helpers import FakeBackend, app_of, serving
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from eldric_p2p.api import metrics
from eldric_p2p.api.dashboard import dashboard_json, dashboard_routes
from eldric_p2p.api.gateway import gateway_routes
from eldric_p2p.api.router import Router

GiB = 1 << 30
STATUS = {
    "deployments": [{
        "id": "qwen2.5-coder-0.5b-instruct-a1b2c3", "model": "qwen2.5-coder-0.5b-instruct", "state": "ready",
        "strategy": "proportional", "n_layers": 24, "note": "",
        "stages": [
            {"index": 0, "worker": "gaming-pc", "peer_id": "p0", "role": "head", "start": 0, "end": 10,
             "state": "ready", "memory": 260 << 20, "bytes_fetched": 180 << 20, "last_heartbeat_s": 0.8,
             "link": "direct", "link_transport": "tcp"},
            {"index": 1, "worker": "laptop", "peer_id": "p1", "role": "middle", "start": 10, "end": 17,
             "state": "ready", "memory": 90 << 20, "bytes_fetched": 70 << 20, "last_heartbeat_s": 1.1,
             "link": "punched", "link_transport": "tcp"},
            {"index": 2, "worker": "lab-gpu", "peer_id": "p2", "role": "tail", "start": 17, "end": 24,
             "state": "fetching", "memory": 240 << 20, "bytes_fetched": 20 << 20, "last_heartbeat_s": 0.4,
             "link": "relayed", "link_transport": "quic"},
        ],
    }]
}  # fmt: skip
PEERS = {
    "peers": [
        {"peer_id": "p0", "name": "gaming-pc", "source": "mdns", "roles": ["gateway", "worker"], "models": [],
         "worker": {"device": "cuda:0", "offered": 8 * GiB, "free": 5 * GiB}, "last_seen_s": 0.5},
        {"peer_id": "p1", "name": "laptop", "source": "mdns", "roles": ["gateway", "worker"], "models": [],
         "worker": {"device": "cpu", "offered": 2 * GiB, "free": GiB}, "last_seen_s": 1.0},
        {"peer_id": "p2", "name": "lab-gpu", "source": "relay", "roles": ["worker", "data-peer"],
         "models": ["qwen2.5-coder-0.5b-instruct"],
         "worker": {"device": "cuda:1", "offered": 24 * GiB, "free": 23 * GiB}, "last_seen_s": 2.1},
    ]
}  # fmt: skip


def fake_node(router: Router, *, with_pipeline: bool = True, peers_json: dict[str, Any] = PEERS) -> Any:
    async def node(request: Request) -> JSONResponse:
        return JSONResponse(
            {"name": "gaming-pc", "peer_id": "p0", "roles": ["gateway", "worker"], "version": "0.1"}
        )

    async def peers(request: Request) -> JSONResponse:
        return JSONResponse(peers_json)

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(STATUS)

    routes = [Route("/api/v1/node", node), Route("/api/v1/peers", peers)]
    if with_pipeline:
        routes.append(Route("/api/v1/pipeline/status", status))
    return app_of(routes + dashboard_routes(router) + gateway_routes(router))


def test_page_assets_and_live_json() -> None:
    router = Router()
    router.add(FakeBackend("qwen2.5-coder-0.5b-instruct", name="pipeline:qwen"))
    with serving(fake_node(router)) as url:
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert (
            '<script src="/static/dashboard.js">' in page.text and "http" not in page.text.split("<body>")[1]
        )
        js = httpx.get(url + "/static/dashboard.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "layer-map" in js.text
        assert "innerHTML" not in js.text  # peer-controlled names are never parsed as HTML
        assert httpx.get(url + "/static/dashboard.css").status_code == 200
        assert httpx.get(url + "/static/../dashboard.py").status_code == 404
        assert httpx.get(url + "/static/secret.txt").status_code == 404
        live = httpx.get(url + "/api/v1/dashboard").json()
        assert [m["id"] for m in live["models"]] == ["qwen2.5-coder-0.5b-instruct"]
        assert live["models"][0]["backends"][0]["id"] == "pipeline:qwen"


def test_live_json_follows_the_metrics() -> None:
    registry = metrics.Registry()
    rate = registry.rate(metrics.TOKENS_PER_S.name, "t", ("model",), window=10.0)
    active = registry.gauge(metrics.ACTIVE.name, "a", ("model",))
    ttft = registry.summary(metrics.TTFT.name, "f", ("model",))
    router = Router()
    router.add(FakeBackend("m"))
    rate.add(50, model="m")
    active.set(2, model="m")
    ttft.observe(0.2, model="m")
    ttft.observe(0.4, model="m")
    live = dashboard_json(router, registry)
    assert live["tokens_per_s"] == pytest.approx(5.0)
    assert live["per_model"]["m"] == {"tokens_per_s": pytest.approx(5.0), "active": 2.0}
    assert live["active_sessions"] == 2 and live["ttft_mean_s"] == pytest.approx(0.3)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no chromium: apt-get install -y chromium")
    return exe


def _chromium_run(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=6000"]  # fmt: skip
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_dashboard_renders_the_layer_map_in_chromium(tmp_path: Path) -> None:
    exe = _chromium()
    router = Router()
    router.add(FakeBackend("qwen2.5-coder-0.5b-instruct", name="pipeline:qwen"))
    metrics.TOKENS_PER_S.add(120, model="qwen2.5-coder-0.5b-instruct")
    with serving(fake_node(router)) as url:
        dom = _chromium_run(exe, tmp_path, "--dump-dom", url + "/").stdout
        assert 'class="layer-map"' in dom and 'data-layers="24"' in dom
        for worker, start, end, role in (("gaming-pc", 0, 10, "head"), ("laptop", 10, 17, "middle"),
                                         ("lab-gpu", 17, 24, "tail")):  # fmt: skip
            assert f'data-worker="{worker}" data-start="{start}" data-end="{end}" data-role="{role}"' in dom
        assert dom.count('title="layer ') == 24  # one tick per layer
        # each stage's own link, on the arrow after it: gaming-pc -> laptop direct, laptop -> lab-gpu punched,
        # and the tokens back from the tail to the head relayed
        links = re.findall(r'<div class="link (\w*)" title="([^"]*)">', dom)
        assert links == [("direct", "link direct over tcp"), ("punched", "link punched over tcp"),
                         ("relayed", "link relayed over quic")], links  # fmt: skip
        assert "<script>" not in dom.split("<body>")[1].replace(
            '<script src="/static/dashboard.js"></script>', ""
        )
        assert 'class="peer"' in dom and "cuda:1" in dom and "1.0 GiB / 24.0 GiB" in dom
        assert "pipeline:qwen" in dom  # the models panel from /api/v1/dashboard
        shot = tmp_path / "dashboard.png"
        _chromium_run(exe, tmp_path, f"--screenshot={shot}", "--window-size=1280,1000", "--hide-scrollbars",
                      url + "/")  # fmt: skip
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if os.environ.get("ELDRIC_UPDATE_SCREENSHOTS"):
            dest = Path(__file__).resolve().parents[2] / "docs" / "img" / "dashboard.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, dest)


@pytest.mark.slow
def test_dashboard_copes_with_missing_endpoints(tmp_path: Path) -> None:
    exe = _chromium()
    evil = {"peers": [{"peer_id": "p9", "name": "<img src=x onerror=alert(1)>", "roles": ["worker"]}]}
    with serving(fake_node(Router(), with_pipeline=False, peers_json=evil)) as url:
        dom = _chromium_run(exe, tmp_path, "--dump-dom", url + "/").stdout
    assert "pipeline status not available on this node" in dom
    assert 'class="peer"' in dom  # the other panels still render
    assert (
        "<img" not in dom and "&lt;img src=x onerror=alert(1)&gt;" in dom
    )  # a peer's name is text, not HTML
    assert "no model reachable yet" in dom
