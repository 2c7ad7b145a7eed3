"""Federation authentication overhead on loopback, side by side in one run: plain vs federated.

    python benchmarks/bench_auth.py [--links 100] [--requests 300]

Everything runs in one trio process on 127.0.0.1, with/without trials interleaved (order alternating) so
drift hits both modes alike. Measured:
  link set-up   open_tcp_link + one 64-byte echo round trip + aclose; plain identities vs identities
                with a federation membership (the handshake then carries and checks both chains)
  signed HTTP   GET /api/v1/node on an in-process Node over one keep-alive httpx client; plain node vs
                federated node (FederationGate checks a SignedAuth signature + chain on every request)
  first token   a 2-stage pipeline of a synthetic model over two in-process nodes (stages linked over
                member-checked links when federated): time to the first streamed token of a generation
  primitives    Identity.sign, identity.verify, Federation.verify (cached and uncached) on a real chain
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.net.federation.certs import ROLE_ADMIN, ROLE_MEMBER, Federation, Issuer, create_root
from eldric_p2p.net.federation.httpauth import SignedAuth
from eldric_p2p.net.federation.store import Membership
from eldric_p2p.net.identity import Identity, verify
from eldric_p2p.net.links import Link, open_tcp_link, serve_tcp_links
from eldric_p2p.node import Node, NodeConfig

HOST = "127.0.0.1"
PAYLOAD = b"x" * 64


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def join(
    ident: Identity, data_dir: Path, key: Ed25519PrivateKey, root: x509.Certificate, roles: list[str]
) -> Identity:
    m = Membership(data_dir, ident)
    m.save(
        root.public_bytes(serialization.Encoding.PEM),
        Issuer(key, root).issue(ident.public_key, roles),
        root_key=key,
    )
    return ident.with_membership(m)


# --------------------------------------------------------------------------- link set-up


async def echo(link: Link) -> None:
    while data := await link.receive_some(65536):
        await link.send_all(data)


async def one_link(port: int, client: Identity, server_id: str) -> float:
    t0 = time.perf_counter()
    link = await open_tcp_link(HOST, port, client, server_id)
    assert (link.member is not None) == client.federated  # the federated handshake really checked a chain
    await link.send_all(PAYLOAD)
    got = b""
    while len(got) < len(PAYLOAD):
        got += await link.receive_some(65536)
    await link.aclose()
    return time.perf_counter() - t0


async def bench_links(
    tmp: Path, key: Ed25519PrivateKey, root: x509.Certificate, n: int
) -> dict[str, list[float]]:
    modes: dict[str, tuple[Identity, Identity]] = {
        "plain": (Identity.generate(), Identity.generate()),
        "federated": (
            join(Identity.generate(), tmp / "ls", key, root, ["admin"]),
            join(Identity.generate(), tmp / "lc", key, root, ["admin"]),
        ),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    async with trio.open_nursery() as nursery:
        ports = {}
        for mode, (server, _) in modes.items():
            listeners = await nursery.start(serve_tcp_links, server, HOST, 0, echo)
            ports[mode] = listeners[0].socket.getsockname()[1]
        order = list(modes)
        for i in range(n + 5):  # 5 warm-up trials per mode, not counted
            for mode in order if i % 2 == 0 else order[::-1]:
                server, client = modes[mode]
                dt = await one_link(ports[mode], client, server.peer_id)
                if i >= 5:
                    times[mode].append(dt)
        nursery.cancel_scope.cancel()
    return times


# --------------------------------------------------------------------------- signed HTTP


async def bench_http(
    tmp: Path, key: Ed25519PrivateKey, root: x509.Certificate, n: int
) -> dict[str, list[float]]:
    plain_dir, fed_dir = tmp / "hp", tmp / "hf"
    fed_ident = join(Identity.load_or_create(fed_dir), fed_dir, key, root, ["admin"])
    times: dict[str, list[float]] = {"plain": [], "federated": []}
    async with trio.open_nursery() as nursery:
        ports = {}
        for mode, d in (("plain", plain_dir), ("federated", fed_dir)):
            node = Node(
                NodeConfig(name="b", data_dir=d, listen_host=HOST, listen_port=0, mdns=False, worker=False)
            )
            ports[mode] = await nursery.start(node.run)
        assert fed_ident.federated
        clients = {
            "plain": httpx.AsyncClient(base_url=f"http://{HOST}:{ports['plain']}", timeout=10),
            "federated": httpx.AsyncClient(
                base_url=f"http://{HOST}:{ports['federated']}",
                timeout=10,
                auth=SignedAuth(fed_ident.with_membership(Membership(fed_dir, fed_ident))),
            ),
        }
        batch = 25
        order = list(clients)
        for c in clients.values():  # warm-up, and check the federated client is really admitted
            for _ in range(10):
                r = await c.get("/api/v1/node")
                r.raise_for_status()
        async with httpx.AsyncClient() as anon:  # the federated node does check: unsigned is refused
            r = await anon.get(f"http://{HOST}:{ports['federated']}/api/v1/node")
            assert r.status_code == 401, r.status_code
        for b in range((n + batch - 1) // batch):
            for mode in order if b % 2 == 0 else order[::-1]:
                c = clients[mode]
                for _ in range(min(batch, n - b * batch)):
                    t0 = time.perf_counter()
                    r = await c.get("/api/v1/node")
                    times[mode].append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
        for c in clients.values():
            await c.aclose()
        nursery.cancel_scope.cancel()
    return times


# --------------------------------------------------------------------------- first token through a pipeline


async def bench_first_token(
    tmp: Path, key: Ed25519PrivateKey, root: x509.Certificate, n: int
) -> dict[str, list[float]]:
    models = tmp / "models"
    models.mkdir()
    write_synthetic_gguf(models / "tiny.gguf", arch="qwen2", n_layers=8, hidden=64, ffn=128, seed=3)
    times: dict[str, list[float]] = {"plain": [], "federated": []}
    clients: dict[str, httpx.AsyncClient] = {}
    async with trio.open_nursery() as nursery:
        for mode in ("plain", "federated"):
            da, db = tmp / f"ft-{mode}-a", tmp / f"ft-{mode}-b"
            auth = None
            if mode == "federated":
                admin = join(Identity.load_or_create(da), da, key, root, [ROLE_ADMIN])
                join(Identity.load_or_create(db), db, key, root, [ROLE_MEMBER])
                auth = SignedAuth(admin.with_membership(Membership(da, admin)))
            a = Node(NodeConfig(name="a", data_dir=da, listen_host=HOST, listen_port=0, mdns=False,
                                models=[models], memory=64 << 20, peer_interval=0.2))  # fmt: skip
            port_a = await nursery.start(a.run)
            b = Node(NodeConfig(name="b", data_dir=db, listen_host=HOST, listen_port=0, mdns=False,
                                memory=64 << 20, peers=[(HOST, port_a)], peer_interval=0.2))  # fmt: skip
            await nursery.start(b.run)
            c = clients[mode] = httpx.AsyncClient(base_url=f"http://{HOST}:{port_a}", timeout=60, auth=auth)
            for _ in range(100):
                if "b" in {p.name for p in a.peers.table.peers()}:
                    break
                await trio.sleep(0.1)
            r = await c.post(
                "/api/v1/pipeline/deploy", json={"model": "tiny", "workers": ["a", "b"], "max_ctx": 256}
            )
            r.raise_for_status()
        body = {"model": "tiny", "prompt": "Hello world the cat", "raw": True,
                "params": {"temperature": 0.0, "max_tokens": 4}}  # fmt: skip
        order = list(clients)
        for i in range(n + 3):
            for mode in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                first = None
                async with clients[mode].stream("POST", "/api/v1/pipeline/generate", json=body) as resp:
                    assert resp.status_code == 200, await resp.aread()
                    async for line in resp.aiter_lines():
                        if line.strip() and first is None:
                            first = time.perf_counter() - t0
                assert first is not None
                if i >= 3:  # the first rounds warm both pipelines up
                    times[mode].append(first)
        for c in clients.values():
            await c.aclose()
        nursery.cancel_scope.cancel()
    return times


# --------------------------------------------------------------------------- primitives


def per_call(fn: Callable[[], Any], n: int) -> float:
    """Median seconds per call over 10 batches of n/10 calls."""
    fn()
    per = max(1, n // 10)
    samples = []
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        samples.append((time.perf_counter() - t0) / per)
    return statistics.median(samples)


def bench_primitives(tmp: Path, key: Ed25519PrivateKey, root: x509.Certificate, n: int) -> dict[str, float]:
    ident = join(Identity.generate(), tmp / "p", key, root, ["admin"])
    assert ident.membership is not None
    chain = ident.membership.chain
    msg = b"m" * 200
    sig = ident.sign(msg)
    pub = ident.public_key
    fed = Federation(root)

    def uncached() -> None:
        fed._cache.clear()
        fed.verify(chain, peer_id=ident.peer_id)

    return {
        "Identity.sign": per_call(lambda: ident.sign(msg), n),
        "identity.verify": per_call(lambda: verify(pub, sig, msg), n),
        "Federation.verify (cached)": per_call(lambda: fed.verify(chain, peer_id=ident.peer_id), n),
        "Federation.verify (uncached)": per_call(uncached, n),
    }


# --------------------------------------------------------------------------- main


def row(name: str, plain: float, fed: float, unit: str) -> str:
    return f"{name:<28} {plain:>12.3f} {fed:>12.3f} {fed / plain:>8.2f}x  {unit}"


async def main_async(args: argparse.Namespace) -> None:
    key, root = create_root("bench")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t_start = time.perf_counter()
        links = await bench_links(tmp, key, root, args.links)
        http = await bench_http(tmp, key, root, args.requests)
        first = await bench_first_token(tmp, key, root, args.generations)
        prim = bench_primitives(tmp, key, root, args.prims)
        elapsed = time.perf_counter() - t_start

    print(f"CPU: {cpu_model()}")
    print(
        f"links N={args.links} per mode, HTTP N={args.requests} per mode, "
        f"primitives {args.prims} calls each, {elapsed:.1f} s"
    )
    print()
    print(f"{'metric':<28} {'plain':>12} {'federated':>12} {'ratio':>9}  unit")
    print("-" * 72)
    lp, lf = (statistics.median(links[m]) * 1e3 for m in ("plain", "federated"))
    print(row("link set-up + 64 B RTT", lp, lf, "ms (median)"))
    hp, hf = (statistics.median(http[m]) * 1e3 for m in ("plain", "federated"))
    print(row("GET /api/v1/node latency", hp, hf, "ms (median)"))
    rp, rf = (len(http[m]) / sum(http[m]) for m in ("plain", "federated"))
    print(f"{'GET /api/v1/node rate':<28} {rp:>12.1f} {rf:>12.1f} {rf / rp:>8.2f}x  req/s (sequential)")
    fp, ff = (statistics.median(first[m]) * 1e3 for m in ("plain", "federated"))
    print(row("first token, 2 stages", fp, ff, f"ms (median of {len(first['plain'])})"))
    print()
    print(f"{'primitive':<28} {'us/call':>12}")
    print("-" * 42)
    for name, s in prim.items():
        print(f"{name:<28} {s * 1e6:>12.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", type=int, default=100, help="link set-ups per mode")
    p.add_argument("--requests", type=int, default=300, help="GET /api/v1/node per mode")
    p.add_argument("--generations", type=int, default=30, help="generations per mode (first-token latency)")
    p.add_argument("--prims", type=int, default=1000, help="calls per primitive")
    trio.run(main_async, p.parse_args())


if __name__ == "__main__":
    main()
