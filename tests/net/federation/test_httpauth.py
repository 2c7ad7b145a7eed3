"""Signed HTTP requests between members: what `FederationGate` lets through and what it refuses, and why."""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from eldric_p2p.errors import UsageError
from eldric_p2p.http_server import EXCEPTION_HANDLERS
from eldric_p2p.net.federation import httpauth
from eldric_p2p.net.federation.certs import MAX_SKEW_S, Issuer, create_root
from eldric_p2p.net.federation.httpauth import (
    MAX_SIGNED_BODY,
    FederationGate,
    NonceCache,
    SignedAuth,
    auth_headers_for,
    level_of,
    sign_headers,
)
from eldric_p2p.net.federation.store import Membership
from eldric_p2p.net.identity import Identity

BASE = "http://node.test"
HOST = "node.test"


# --------------------------------------------------------------------------- a federation and an app


@dataclass
class Fed:
    """A federation: the node behind the gate (root holder), an admin, two members, and their memberships."""

    tmp: Path
    root_key: Any
    root_pem: bytes
    issuer: Issuer
    node: Identity
    admin: Identity
    member: Identity
    member2: Identity  # certificate issued by the admin: a chain of two

    @property
    def id(self) -> str:
        assert self.node.membership is not None and self.node.membership.id is not None
        return self.node.membership.id


def _join(
    tmp: Path, name: str, root_pem: bytes, chain: tuple[bytes, ...], ident: Identity, **kw: Any
) -> Identity:
    membership = Membership(tmp / name, ident)
    membership.save(root_pem, chain, **kw)
    assert membership.active
    return ident.with_membership(membership)


def make_fed(tmp: Path, name: str = "lab") -> Fed:
    from cryptography.hazmat.primitives import serialization

    root_key, root_cert = create_root(name)
    root_pem = root_cert.public_bytes(serialization.Encoding.PEM)
    issuer = Issuer(root_key, root_cert)
    node, admin, member, member2 = (Identity.generate() for _ in range(4))
    node = _join(tmp, "node", root_pem, issuer.issue(node.public_key, ("admin",)), node, root_key=root_key)
    admin_chain = issuer.issue(admin.public_key, ("admin",))
    admin = _join(tmp, "admin", root_pem, admin_chain, admin)
    member = _join(tmp, "member", root_pem, issuer.issue(member.public_key), member)
    chain2 = Issuer.for_admin(admin, admin_chain).issue(member2.public_key)
    assert len(chain2) == 2
    member2 = _join(tmp, "member2", root_pem, chain2, member2)
    return Fed(tmp, root_key, root_pem, issuer, node, admin, member, member2)


@pytest.fixture
def fed(tmp_path: Path) -> Fed:
    return make_fed(tmp_path)


async def _echo(request: Request) -> JSONResponse:
    member = request.scope.get("eldric.member")
    body = await request.body()
    return JSONResponse(
        {"member": member.peer_id if member else None, "body": len(body), "path": request.url.path}
    )


ROUTES = [
    Route("/", _echo, methods=["GET"]),
    Route("/static/{name}", _echo, methods=["GET"]),
    Route("/api/v1/federation/join", _echo, methods=["POST"]),
    Route("/api/v1/node", _echo, methods=["GET"]),
    Route("/api/v1/pipeline/generate", _echo, methods=["POST"]),
    Route("/api/v1/pipeline/deploy", _echo, methods=["POST"]),
    Route("/api/v1/peers", _echo, methods=["GET"]),
    Route("/v1/models", _echo, methods=["GET"]),
    Route("/v1/chat/completions", _echo, methods=["POST"]),
]


def gate_for(node: Identity, **kw: Any) -> FederationGate:
    return FederationGate(Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS), node, **kw)


def call(
    gate: FederationGate, method: str, path: str, *, auth: httpx.Auth | None = None, **kw: Any
) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url=BASE, auth=auth) as client:
            return await client.request(method, path, **kw)

    return trio.run(main)


def signed(ident: Identity, method: str, target: str, body: bytes = b"", **kw: Any) -> dict[str, str]:
    """Headers as SignedAuth would send them, for tests that then alter the request."""
    m = ident.membership
    assert m is not None and m.id is not None
    return sign_headers(ident, m.chain, m.id, method, target, HOST, body, **kw)


def error_of(resp: httpx.Response) -> dict[str, str]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    return body["error"]


def refused(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    err = error_of(resp)
    assert err["code"] == code, err
    return err["message"]


# --------------------------------------------------------------------------- levels


@pytest.mark.parametrize(
    ("method", "path", "level"),
    [
        ("GET", "/", "open"),
        ("HEAD", "/", "open"),
        ("GET", "/static/app.js", "open"),
        ("GET", "/static/../api/v1/peers", "member"),
        ("GET", "/static/a/b", "member"),
        ("POST", "/api/v1/federation/join", "open"),
        ("GET", "/api/v1/federation/join", "member"),
        ("POST", "/", "member"),
        ("POST", "/api/v1/pipeline/deploy", "admin"),
        ("POST", "/api/v1/pipeline/deploy/", "admin"),
        ("POST", "/api/v1/pipeline/unload", "admin"),
        ("HEAD", "/api/v1/pipeline/deploy", "admin"),
        ("GET", "/api/v1/peers", "member"),  # members' peer directories poll it
        ("POST", "/api/v1/federation/revoke", "admin"),
        ("POST", "/api/v1/federation/invite", "admin"),
        ("GET", "/v1/models", "v1"),
        ("POST", "/v1/chat/completions", "v1"),
        ("GET", "/v1", "v1"),
        ("GET", "/v1x", "member"),
        ("GET", "/api/v1/node", "member"),
        ("GET", "/api/v1/models/m/blob", "member"),
        ("POST", "/api/v1/pipeline/generate", "member"),
        ("GET", "/metrics", "member"),
        ("POST", "/api/v1/federation/renew", "member"),
        ("GET", "/no/such/path", "member"),
    ],
)
def test_level_of(method: str, path: str, level: str) -> None:
    assert level_of(method, path) == level


# --------------------------------------------------------------------------- who gets through


def test_a_node_in_no_federation_passes_everything(tmp_path: Path) -> None:
    plain = Identity.generate()
    for node in (plain, plain.with_membership(Membership(tmp_path, plain))):
        gate = gate_for(node)
        resp = call(gate, "POST", "/api/v1/pipeline/deploy", content=b"{}")
        assert resp.status_code == 200 and resp.json()["member"] is None
        assert call(gate, "GET", "/api/v1/node", auth=SignedAuth(plain)).json()["member"] is None
        assert not gate.stats
    assert auth_headers_for(plain, "GET", "/x", HOST) == []


def test_signed_member_requests_pass_and_say_who_called(fed: Fed) -> None:
    gate = gate_for(fed.node)
    for ident in (fed.member, fed.member2, fed.admin):
        resp = call(gate, "GET", "/api/v1/node?x=1&y=%20", auth=SignedAuth(ident))
        assert resp.status_code == 200, resp.text
        assert resp.json()["member"] == ident.peer_id
    resp = call(gate, "POST", "/api/v1/pipeline/generate", auth=SignedAuth(fed.member), content=b"x" * 70_000)
    assert resp.json() == {"member": fed.member.peer_id, "body": 70_000, "path": "/api/v1/pipeline/generate"}
    assert call(gate, "GET", "/").json()["member"] is None
    assert call(gate, "GET", "/", auth=SignedAuth(fed.member)).json()["member"] is None  # open: not checked
    assert call(gate, "POST", "/api/v1/federation/join", content=b"{}").status_code == 200
    assert not gate.stats


def test_admin_paths_need_an_admin(fed: Fed) -> None:
    gate = gate_for(fed.node)
    resp = call(gate, "POST", "/api/v1/pipeline/deploy", auth=SignedAuth(fed.admin), json={"model": "m"})
    assert resp.status_code == 200 and resp.json()["member"] == fed.admin.peer_id
    for ident in (fed.member, fed.member2):
        message = refused(
            call(gate, "POST", "/api/v1/pipeline/deploy", auth=SignedAuth(ident)), 403, "not_admin"
        )
        assert ident.peer_id in message and "/api/v1/pipeline/deploy" in message
    assert (
        error_of(call(gate, "POST", "/api/v1/federation/revoke", auth=SignedAuth(fed.member)))["type"]
        == "permission_error"
    )
    assert gate.stats["not_admin"] == 3


def test_no_credential_is_401_saying_what_is_missing(fed: Fed) -> None:
    gate = gate_for(fed.node)
    resp = call(gate, "POST", "/api/v1/pipeline/deploy", content=b"{}")
    message = refused(resp, 401, "missing_credential")
    assert error_of(resp)["type"] == "authentication_error"
    assert "POST /api/v1/pipeline/deploy" in message and "admin" in message and "--data-dir" in message
    message = refused(call(gate, "GET", "/api/v1/node"), 401, "missing_credential")
    assert "a member's signed request" in message and fed.id in message
    refused(call(gate, "GET", "/no/such/path"), 401, "missing_credential")  # deny by default, before routing
    assert gate.stats["missing_credential"] == 3


def test_a_stranger_from_another_federation_is_refused(fed: Fed, tmp_path: Path) -> None:
    other = make_fed(tmp_path / "other", "elsewhere")
    resp = call(gate_for(fed.node), "GET", "/api/v1/node", auth=SignedAuth(other.admin))
    message = refused(resp, 401, "other_federation")
    assert fed.id in message


def test_a_forged_signature_is_refused(fed: Fed) -> None:
    gate = gate_for(fed.node)
    headers = signed(fed.member, "GET", "/api/v1/node")
    auth = headers["X-Eldric-Auth"]
    sig = auth.rsplit("sig=", 1)[1]
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[10] ^= 1
    headers["X-Eldric-Auth"] = auth.replace(sig, base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="))
    refused(call(gate, "GET", "/api/v1/node", headers=headers), 401, "bad_signature")
    # someone else's key with the member's certificate, and the member's claim with another member's chain
    impostor = Identity.generate()
    m = fed.member.membership
    assert m is not None
    fake = sign_headers(impostor, m.chain, fed.id, "GET", "/api/v1/node", HOST, b"")
    refused(call(gate, "GET", "/api/v1/node", headers=fake), 401, "wrong_peer")
    mixed = signed(fed.member, "GET", "/api/v1/node")
    mixed["X-Eldric-Cert"] = signed(fed.member2, "GET", "/")["X-Eldric-Cert"]
    refused(call(gate, "GET", "/api/v1/node", headers=mixed), 401, "wrong_peer")


def test_a_request_altered_after_signing_is_refused(fed: Fed) -> None:
    gate = gate_for(fed.node)
    headers = signed(fed.member, "POST", "/api/v1/pipeline/generate", b'{"prompt": "hi"}')
    resp = call(gate, "POST", "/api/v1/pipeline/generate", headers=headers, content=b'{"prompt": "rm"}')
    refused(resp, 401, "bad_signature")
    headers = signed(fed.member, "GET", "/api/v1/node?x=1")
    refused(call(gate, "GET", "/api/v1/node?x=2", headers=headers), 401, "bad_signature")
    headers = signed(fed.member, "GET", "/api/v1/node")
    refused(
        call(gate, "GET", "/api/v1/node", headers={**headers, "Host": "other.test"}), 401, "bad_signature"
    )
    headers = signed(fed.member, "GET", "/api/v1/node")
    refused(call(gate, "DELETE", "/api/v1/node", headers=headers), 401, "bad_signature")


def test_a_replayed_request_is_refused(fed: Fed) -> None:
    gate = gate_for(fed.node)
    headers = signed(fed.member, "GET", "/api/v1/node")
    assert call(gate, "GET", "/api/v1/node", headers=headers).status_code == 200
    message = refused(call(gate, "GET", "/api/v1/node", headers=headers), 401, "replayed")
    assert fed.member.peer_id in message
    assert call(gate, "GET", "/api/v1/node", auth=SignedAuth(fed.member)).status_code == 200  # fresh nonce


def test_clock_skew(fed: Fed) -> None:
    now = time.time()
    ahead = gate_for(fed.node, clock=lambda: now + MAX_SKEW_S + 30)
    message = refused(call(ahead, "GET", "/api/v1/node", auth=SignedAuth(fed.member)), 401, "clock_skew")
    assert str(int(now + MAX_SKEW_S + 30)) in message and f"{MAX_SKEW_S:.0f} s" in message
    behind = gate_for(fed.node, clock=lambda: now - MAX_SKEW_S - 30)
    refused(call(behind, "GET", "/api/v1/node", auth=SignedAuth(fed.member)), 401, "clock_skew")
    for delta in (MAX_SKEW_S - 20, -(MAX_SKEW_S - 20)):
        near = gate_for(fed.node, clock=lambda d=delta: now + d)  # type: ignore[misc]
        assert call(near, "GET", "/api/v1/node", auth=SignedAuth(fed.member)).status_code == 200


def test_expired_and_revoked_members_are_refused(fed: Fed) -> None:
    gate = gate_for(fed.node)
    late = Identity.generate()
    chain = fed.issuer.issue(late.public_key, ttl_s=3600, now=time.time() - 2 * 3600)
    headers = sign_headers(late, chain, fed.id, "GET", "/api/v1/node", HOST, b"")
    assert "expired" in refused(call(gate, "GET", "/api/v1/node", headers=headers), 401, "expired")

    assert call(gate, "GET", "/api/v1/node", auth=SignedAuth(fed.member)).status_code == 200
    assert fed.node.membership is not None
    fed.node.membership.revoke(fed.member.peer_id)
    refused(call(gate, "GET", "/api/v1/node", auth=SignedAuth(fed.member)), 401, "revoked")
    fed.node.membership.revoke(fed.admin.peer_id)  # member2's certificate was issued by that admin
    assert "admin" in refused(call(gate, "GET", "/api/v1/node", auth=SignedAuth(fed.member2)), 401, "revoked")


def test_malformed_and_oversized_credentials(fed: Fed) -> None:
    gate = gate_for(fed.node)
    good = signed(fed.member, "GET", "/api/v1/node")
    cases = [
        {**good, "X-Eldric-Cert": good["X-Eldric-Cert"][:-10]},
        {**good, "X-Eldric-Cert": good["X-Eldric-Cert"] + "A"},
        {**good, "X-Eldric-Cert": "A" * 9000},
        {**good, "X-Eldric-Auth": good["X-Eldric-Auth"] + " " * 9000},
        {**good, "X-Eldric-Auth": good["X-Eldric-Auth"].replace("; ", ";")},
        {**good, "X-Eldric-Auth": good["X-Eldric-Auth"].replace("n=", "nonce=")},
        {**good, "X-Eldric-Auth": "Bearer abc"},
        {**good, "X-Eldric-Auth": _non_canonical_sig(good["X-Eldric-Auth"])},  # same bytes, other text
    ]
    for headers in cases:
        refused(call(gate, "GET", "/api/v1/node", headers=headers), 401, "malformed")
    no_cert = {"X-Eldric-Auth": good["X-Eldric-Auth"]}
    refused(call(gate, "GET", "/api/v1/node", headers=no_cert), 401, "not_member")
    dup = [("X-Eldric-Auth", good["X-Eldric-Auth"])] * 2 + [("X-Eldric-Cert", good["X-Eldric-Cert"])]
    refused(call(gate, "GET", "/api/v1/node", headers=dup), 401, "malformed")


def _non_canonical_sig(auth: str) -> str:
    """The same signature bytes with the 4 unused low bits of the last base64url character set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(auth[-1])
    assert last % 16 == 0
    out = auth[:-1] + alphabet[last + 1]
    assert base64.urlsafe_b64decode(out.rsplit("sig=")[1] + "==") == base64.urlsafe_b64decode(
        auth.rsplit("sig=")[1] + "=="
    )
    return out


def test_oversized_bodies_are_413(fed: Fed) -> None:
    gate = gate_for(fed.node)
    big = b"x" * (MAX_SIGNED_BODY + 1)
    resp = call(gate, "POST", "/api/v1/pipeline/generate", auth=SignedAuth(fed.member), content=big)
    refused(resp, 413, "body_too_large")
    exact = b"x" * MAX_SIGNED_BODY
    resp = call(gate, "POST", "/api/v1/pipeline/generate", auth=SignedAuth(fed.member), content=exact)
    assert resp.json()["body"] == MAX_SIGNED_BODY

    async def chunks() -> Any:  # no Content-Length: counted while read
        for _ in range(3):
            yield b"y" * (MAX_SIGNED_BODY // 2)

    headers = signed(fed.member, "POST", "/api/v1/pipeline/generate", b"")
    resp = call(gate, "POST", "/api/v1/pipeline/generate", headers=headers, content=chunks())
    refused(resp, 413, "body_too_large")
    # a stranger is refused for who it is before its body is read
    resp = call(gate, "POST", "/api/v1/pipeline/generate", content=big)
    refused(resp, 401, "missing_credential")


def test_v1_modes(fed: Fed) -> None:
    path = "/v1/models"
    member = SignedAuth(fed.member)
    bearer = {"Authorization": "Bearer k2"}
    assert call(gate_for(fed.node, v1_mode="open"), "GET", path).status_code == 200

    keyed = gate_for(fed.node, v1_mode="api-key", api_keys=["k1", "k2"])
    assert "Bearer" in refused(call(keyed, "GET", path), 401, "missing_credential")
    assert call(keyed, "GET", path, headers=bearer).json()["member"] is None
    refused(call(keyed, "GET", path, headers={"Authorization": "Bearer k3"}), 401, "invalid_api_key")
    assert call(keyed, "GET", path, auth=member).json()["member"] == fed.member.peer_id
    refused(
        call(keyed, "GET", "/api/v1/node", headers=bearer), 401, "missing_credential"
    )  # keys open /v1 only

    members = gate_for(fed.node, v1_mode="member")
    refused(call(members, "GET", path), 401, "missing_credential")
    refused(call(members, "GET", path, headers=bearer), 401, "missing_credential")
    resp = call(members, "POST", "/v1/chat/completions", auth=member, json={"messages": []})
    assert resp.json()["member"] == fed.member.peer_id
    either = gate_for(fed.node, v1_mode="member", api_keys=["k2"])
    assert call(either, "GET", path, headers=bearer).status_code == 200
    assert call(either, "GET", path, auth=member).status_code == 200

    with pytest.raises(UsageError):
        gate_for(fed.node, v1_mode="api-key")
    with pytest.raises(UsageError):
        gate_for(fed.node, v1_mode="closed")


def test_sync_client_flow_and_hand_written_headers(fed: Fed) -> None:
    gate = gate_for(fed.node)

    def handler(request: httpx.Request) -> httpx.Response:  # the gate, behind a sync transport
        headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]
        target = request.url.raw_path.decode()
        status, body = trio.run(asgi_call, gate, request.method, target, headers, request.content)
        return httpx.Response(status, content=body)

    with httpx.Client(
        transport=httpx.MockTransport(handler), base_url=BASE, auth=SignedAuth(fed.admin)
    ) as client:
        resp = client.post("/api/v1/pipeline/deploy?dry=1", json={"model": "m"})
        assert resp.status_code == 200, resp.text
        assert json.loads(resp.content)["member"] == fed.admin.peer_id
        streamed = client.post("/api/v1/pipeline/generate", content=iter([b"a" * 10, b"b" * 5]))
        assert json.loads(streamed.content)["body"] == 15

    flow = SignedAuth(fed.member).auth_flow(httpx.Request("GET", f"{BASE}/api/v1/node?q=1"))
    sent = next(flow)
    assert {"x-eldric-auth", "x-eldric-cert"} <= set(sent.headers)
    headers = [(k.lower().encode(), v.encode()) for k, v in sent.headers.items()]
    status, _ = trio.run(asgi_call, gate, "GET", "/api/v1/node?q=1", headers, b"")
    assert status == 200
    outsider = Identity.generate()
    unsigned = next(SignedAuth(outsider).auth_flow(httpx.Request("GET", f"{BASE}/api/v1/node")))
    assert "x-eldric-auth" not in unsigned.headers and "x-eldric-cert" not in unsigned.headers

    # the range client's way: its own Host (authority) and target, empty body
    pairs = auth_headers_for(fed.member, "GET", "/api/v1/models/m/blob", "10.0.0.5:8080")
    headers = [(b"host", b"10.0.0.5:8080")] + [(k.lower().encode(), v.encode()) for k, v in pairs]
    assert (
        trio.run(asgi_call, gate, "GET", "/api/v1/models/m/blob", headers, b"")[0] == 404
    )  # passed the gate


def test_refusals_are_counted_and_logged_sparingly(fed: Fed, caplog: pytest.LogCaptureFixture) -> None:
    gate = gate_for(fed.node)
    with caplog.at_level(logging.INFO, logger=httpauth.__name__):
        for _ in range(20):
            call(gate, "GET", "/api/v1/node")
        call(gate, "POST", "/api/v1/pipeline/deploy", auth=SignedAuth(fed.member))
        call(gate, "POST", "/api/v1/pipeline/deploy", auth=SignedAuth(fed.member))
    assert gate.stats == {"missing_credential": 20, "not_admin": 2}
    lines = [r.getMessage() for r in caplog.records if r.name == httpauth.__name__]
    assert len(lines) == 2, lines
    assert "/api/v1/node" in lines[0] and "missing_credential" in lines[0]
    assert fed.member.peer_id in lines[1] and "/api/v1/pipeline/deploy" in lines[1]


def test_non_http_scopes_pass_through(fed: Fed) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    gate = FederationGate(app, fed.node)

    async def main() -> None:
        for kind in ("lifespan", "websocket"):
            await gate({"type": kind, "path": "/api/v1/peers", "headers": []}, _no_receive, _no_send)

    trio.run(main)
    assert seen == ["lifespan", "websocket"]


def test_nonce_cache_forgets_by_time_and_never_lets_a_forgotten_nonce_through() -> None:
    cache = NonceCache(window_s=240, max_entries=3)
    assert cache.remember("ep1", "a", 1000, now=1000) is None
    assert cache.remember("ep1", "a", 1000, now=1001) is not None
    assert cache.remember("ep2", "a", 1000, now=1001) is None  # per peer
    assert cache.remember("ep1", "a", 1000, now=1241) is None  # forgotten after the window
    for i, n in enumerate("bcd"):
        assert cache.remember("ep3", n, 1100 + i, now=1242) is None
    assert len(cache) == 3 and cache.evicted >= 1
    assert cache.horizon >= 1000
    assert cache.replay_reason("ep1", "a", 1000) is not None  # evicted, so refused by time instead
    assert cache.replay_reason("ep1", "z", cache.horizon + 1) is None


# --------------------------------------------------------------------------- hostile input


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


async def _no_send(message: Any) -> None:
    pass


async def asgi_call(
    app: Any, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, bytes]:
    path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": headers,
        "client": ("203.0.113.9", 5555),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def _mutate(rng: random.Random, text: str) -> str:
    """A random change to `text` (never the same text): flip, drop, insert, truncate, repeat, or replace."""
    while True:
        pos = rng.randrange(len(text) + 1)
        kind = rng.randrange(7)
        if kind == 0 and pos < len(text):
            out = text[:pos] + chr(ord(text[pos]) ^ (1 << rng.randrange(7))) + text[pos + 1 :]
        elif kind == 1:
            out = text[:pos] + text[pos + 1 :]
        elif kind == 2:
            out = text[:pos] + rng.choice("=; ,\x00\xffé-_aZ09") + text[pos:]
        elif kind == 3:
            out = text[:pos]
        elif kind == 4:
            out = text * rng.randrange(2, 4)
        elif kind == 5:
            out = "".join(rng.choice("abcdef0123456789=;_- ") for _ in range(rng.randrange(200)))
        else:
            out = (
                text[:pos]
                + "".join(chr(rng.randrange(32, 0x250)) for _ in range(rng.randrange(1, 5)))
                + text[pos:]
            )
        if out != text:
            return out


def test_fuzzed_credentials_never_escape_the_gate(fed: Fed) -> None:
    gate = gate_for(fed.node)
    rng = random.Random(1234)
    path = "/api/v1/pipeline/generate"

    async def main() -> None:
        for i in range(3000):
            body = b"{}" if i % 2 else b""
            good = signed(fed.member2 if i % 3 else fed.member, "POST", path, body)
            auth, cert = good["X-Eldric-Auth"], good["X-Eldric-Cert"]
            choice = rng.randrange(4)
            if choice in (0, 2):
                auth = _mutate(rng, auth)
            if choice in (1, 2):
                cert = _mutate(rng, cert)
            sent_body = body + b"!" if choice == 3 else body
            headers = [(b"host", HOST.encode()), (b"x-eldric-auth", auth.encode())]
            headers.append((b"x-eldric-cert", cert.encode()))
            status, raw = await asgi_call(gate, "POST", path, headers, sent_body)
            assert status in (401, 413), (status, auth, cert)
            assert json.loads(raw)["error"]["code"]

    trio.run(main)
    assert sum(gate.stats.values()) == 3000


def test_random_bytes_in_every_header_never_escape_the_gate(fed: Fed) -> None:
    gate = gate_for(fed.node, v1_mode="api-key", api_keys=["k"])
    rng = random.Random(99)
    names = [b"x-eldric-auth", b"x-eldric-cert", b"authorization", b"content-length", b"host"]

    async def main() -> None:
        for _ in range(1500):
            headers = [
                (rng.choice(names), rng.randbytes(rng.randrange(0, 300))) for _ in range(rng.randrange(4))
            ]
            path = rng.choice(["/api/v1/node", "/v1/models", "/api/v1/peers"])
            status, _ = await asgi_call(gate, rng.choice(["GET", "POST"]), path, headers, rng.randbytes(10))
            assert status in (401, 413)

    trio.run(main)


def test_through_a_real_server(fed: Fed) -> None:
    """hypercorn's raw_path, query string and Host header are what the client signed."""
    from eldric_p2p.http_server import serve_app

    gate = gate_for(fed.node)

    async def main() -> None:
        with trio.fail_after(10):
            await serve_and_call()

    async def serve_and_call() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_app, gate, "127.0.0.1", 0)
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(
                base_url=base, auth=SignedAuth(fed.admin), trust_env=False
            ) as client:
                resp = await client.get("/api/v1/node", params={"q": "a b/é"})
                assert resp.status_code == 200 and resp.json()["member"] == fed.admin.peer_id, resp.text
                resp = await client.post("/api/v1/pipeline/deploy", json={"model": "x" * 100_000})
                assert resp.status_code == 200 and resp.json()["body"] > 100_000
            async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
                assert (await client.get("/api/v1/node")).status_code == 401
            nursery.cancel_scope.cancel()

    trio.run(main)
