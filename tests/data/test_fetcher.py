from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from starlette.applications import Starlette

import eldric_p2p.data.fetcher as fetcher
from eldric_p2p.data.datapeer import Catalog, datapeer_routes
from eldric_p2p.data.fetcher import fetch_assignment, plan_chunks
from eldric_p2p.data.gguf_index import GGUFFile, read_index
from eldric_p2p.data.shardcache import ShardCache, forget_parsed_headers
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import IntegrityError, ModelNotFound, PeerUnavailable, RemoteProtocolError, UsageError
from eldric_p2p.http_server import EXCEPTION_HANDLERS, serve_app


class Faulty:
    """ASGI wrapper around the data peer that misbehaves on blob requests, and counts them."""

    def __init__(self, app: Any, *, cut_after: int | None = None, cuts: int = 0, ignore_range: bool = False):
        self.app = app
        self.cut_after = cut_after
        self.cuts = cuts
        self.ignore_range = ignore_range
        self.blob_requests = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/blob"):
            return await self.app(scope, receive, send)
        self.blob_requests += 1
        if self.ignore_range:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        if self.cuts <= 0 or self.cut_after is None:
            return await self.app(scope, receive, send)
        self.cuts -= 1
        sent = 0
        limit = self.cut_after

        async def cutting_send(message: dict) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if sent + len(body) > limit:
                    await send({**message, "body": body[: limit - sent], "more_body": True})
                    raise ConnectionAbortedError("test: connection cut mid-transfer")
                sent += len(body)
            await send(message)

        await self.app(scope, receive, cutting_send)


def make_app(*paths: Path, data_dir: Path | None = None) -> Any:
    return Starlette(routes=datapeer_routes(Catalog.scan(paths, data_dir=data_dir)), exception_handlers=EXCEPTION_HANDLERS)


def run_with_peers(apps: list[Any], fn: Callable[[list[str]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            peers = [f"http://127.0.0.1:{await nursery.start(serve_app, app, '127.0.0.1', 0)}" for app in apps]
            await fn(peers)
            nursery.cancel_scope.cancel()

    trio.run(main)


def dead_peer() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when we return: connection refused


def assert_same_tensors(cache_path: Path, source: Path, names: list[str]) -> None:
    with GGUFFile(cache_path) as got, GGUFFile(source) as want:
        assert got.index.tensors.keys() == want.index.tensors.keys()
        for n in names:
            assert bytes(got.tensor_data(n)) == bytes(want.tensor_data(n)), n


@pytest.mark.parametrize(
    "kw",
    [dict(arch="llama"), dict(arch="qwen2", output_first=True), dict(arch="gemma3", tied_embeddings=True)],
    ids=["llama", "qwen2-output-first", "gemma3-tied"],
)
def test_every_layer_exact_bytes(tmp_path: Path, kw: dict) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", n_layers=5, hidden=256, ffn=512, **kw)
    ix = read_index(src)

    async def go(peers: list[str]) -> None:
        for layer in range(ix.n_layers):
            root = tmp_path / f"cache{layer}"
            r = await fetch_assignment(peers, "m", layer, layer + 1, cache_root=root, chunk_size=64 << 10)
            assert not r.from_cache
            expected = [t.name for t in ix.assignment_tensors(layer, layer + 1)]
            assert r.tensors == expected
            assert_same_tensors(r.path, src, expected)
            assert r.path.stat().st_size == src.stat().st_size
            # bytes fetched: the header prefix, the tensor table and the assignment's ranges, no more
            ranges = sum(b - a for a, b in ix.assignment_ranges(layer, layer + 1))
            assert ranges <= r.bytes_fetched < ranges + 2 * ix.data_offset + (1 << 20) + 64 * len(ix.tensors) * 3
            assert set(ShardCache(root, "m").verified) == set(expected)

    run_with_peers([make_app(src)], go)


def test_cache_reload_needs_no_network(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2")
    root = tmp_path / "shards"

    async def first(peers: list[str]) -> None:
        r = await fetch_assignment(peers, "m", 0, 2, cache_root=root)
        assert r.bytes_fetched > 0

    run_with_peers([make_app(src)], first)
    assert ShardCache(root, "m").covers(0, 2) and ShardCache(root, "m").covers(1, 2)
    assert not ShardCache(root, "m").covers(0, 3)

    async def offline() -> None:
        r = await fetch_assignment([dead_peer()], "m", 0, 2, cache_root=root)
        assert r.from_cache and r.bytes_fetched == 0
        assert_same_tensors(r.path, src, r.tensors)
        with pytest.raises(PeerUnavailable):
            await fetch_assignment([dead_peer()], "m", 2, 4, cache_root=root, retries=0, backoff=0)

    trio.run(offline)


def test_second_assignment_fills_same_cache(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama")
    root = tmp_path / "shards"

    async def go(peers: list[str]) -> None:
        a = await fetch_assignment(peers, "m", 0, 2, cache_root=root)
        b = await fetch_assignment(peers, "m", 1, 4, cache_root=root)  # layer 1 already there
        assert a.path == b.path
        assert ShardCache(root, "m").covers(0, 4)
        assert_same_tensors(b.path, src, list(read_index(src).tensors))

    run_with_peers([make_app(src)], go)


def test_resumes_after_connection_cut(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama", hidden=256, ffn=512)
    app = Faulty(make_app(src), cut_after=50_000, cuts=3)

    async def go(peers: list[str]) -> None:
        r = await fetch_assignment(peers, "m", 0, 4, cache_root=tmp_path / "c", max_in_flight=1, backoff=0.01)
        assert_same_tensors(r.path, src, r.tensors)

    run_with_peers([app], go)
    assert app.cuts == 0  # every cut happened and was survived


def test_retries_are_bounded(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama", hidden=256, ffn=512)
    app = Faulty(make_app(src), cut_after=0, cuts=1000)

    async def go(peers: list[str]) -> None:
        with pytest.raises(PeerUnavailable, match="giving up"):
            await fetch_assignment(peers, "m", 0, 1, cache_root=tmp_path / "c", retries=2, backoff=0.001)

    run_with_peers([app], go)
    assert app.blob_requests <= 3


def test_server_answering_200_is_an_error(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama")
    app = Faulty(make_app(src), ignore_range=True)

    async def go(peers: list[str]) -> None:
        with pytest.raises(RemoteProtocolError, match="200"):
            await fetch_assignment(peers, "m", 0, 2, cache_root=tmp_path / "c")

    run_with_peers([app], go)
    assert app.blob_requests == 1  # refused at once, the full body was not read and not retried


def test_corrupted_byte_names_the_tensor(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2")
    ix = read_index(src)
    victim = ix.tensors["blk.1.ffn_down.weight"]
    data_dir = tmp_path / "data"
    app = make_app(src, data_dir=data_dir)
    root = tmp_path / "c"

    async def hash_then_corrupt(peers: list[str]) -> None:
        await fetch_assignment(peers, "m", 3, 4, cache_root=tmp_path / "warm")  # publishes the hashes
        st = os.stat(src)
        with open(src, "r+b") as f:  # bit rot: same size, inode and mtime, so the published hash is stale
            f.seek(victim.offset + 7)
            b = f.read(1)
            f.seek(victim.offset + 7)
            f.write(bytes([b[0] ^ 0x40]))
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(IntegrityError, match="blk.1.ffn_down.weight"):
            await fetch_assignment(peers, "m", 0, 2, cache_root=root)

    run_with_peers([app], hash_then_corrupt)
    verified = ShardCache(root, "m").verified
    assert "blk.1.ffn_down.weight" not in verified
    assert "blk.1.attn_q.weight" in verified  # the good tensors are kept
    assert not ShardCache(root, "m").covers(0, 2)


def test_corrupted_cache_is_refetched(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama")
    root = tmp_path / "c"
    victim = read_index(src).tensors["blk.0.attn_k.weight"]

    async def go(peers: list[str]) -> None:
        await fetch_assignment(peers, "m", 0, 1, cache_root=root)
        with open(root / "m" / "model.gguf", "r+b") as f:
            f.seek(victim.offset)
            f.write(b"\xff\xff")
        r = await fetch_assignment(peers, "m", 0, 1, cache_root=root)
        assert not r.from_cache and r.bytes_fetched > 0
        assert_same_tensors(r.path, src, r.tensors)

    run_with_peers([make_app(src)], go)


def test_ranges_spread_over_peers_and_fall_back(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama", hidden=256, ffn=512)
    a, b = Faulty(make_app(src)), Faulty(make_app(src))

    async def go(peers: list[str]) -> None:
        r = await fetch_assignment([dead_peer(), *peers], "m", 0, 4, cache_root=tmp_path / "c",
                                   chunk_size=32 << 10, backoff=0.001)  # fmt: skip
        assert_same_tensors(r.path, src, r.tensors)

    run_with_peers([a, b], go)
    assert a.blob_requests > 2 and b.blob_requests > 2


def test_header_prefix_grows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fetcher, "HEADER_FIRST", 64)
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="gemma3")
    app = Faulty(make_app(src))
    real = fetcher._fetch_header
    monkeypatch.setattr(fetcher, "_fetch_header", lambda s, hint=None: real(s, None))  # a peer giving no hint

    async def go(peers: list[str]) -> None:
        r = await fetch_assignment(peers, "m", 0, 1, cache_root=tmp_path / "c")
        assert r.index.data_offset == read_index(src).data_offset

    run_with_peers([app], go)
    assert app.blob_requests >= 5  # 64, 128, ... bytes until the header parses, then the tensors


def test_header_is_one_request_with_the_peers_offset(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="gemma3")
    app = Faulty(make_app(src))

    async def go(peers: list[str]) -> None:
        r = await fetch_assignment(peers, "m", 1, 2, cache_root=tmp_path / "c")
        ranges = sum(b - a for a, b in read_index(src).assignment_ranges(1, 2))
        assert r.bytes_fetched < ranges + r.index.data_offset + 20_000  # header + tensors + the JSON table

    run_with_peers([app], go)
    assert app.blob_requests == 2  # the header, then one coalesced range


def test_progress_callback_reaches_total(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama")
    seen: list[tuple[int, int]] = []

    async def go(peers: list[str]) -> None:
        await fetch_assignment(peers, "m", 0, 4, cache_root=tmp_path / "c", progress=lambda d, t: seen.append((d, t)))

    run_with_peers([make_app(src)], go)
    total = seen[-1][1]
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert total == sum(b - a for a, b in read_index(src).assignment_ranges(0, 4))


def test_bad_requests(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama")

    async def go(peers: list[str]) -> None:
        with pytest.raises(UsageError):
            await fetch_assignment(peers, "../m", 0, 1, cache_root=tmp_path / "c")
        with pytest.raises(UsageError, match="layer range"):
            await fetch_assignment(peers, "m", 2, 9, cache_root=tmp_path / "c")
        with pytest.raises(ModelNotFound, match="other"):
            await fetch_assignment(peers, "other", 0, 1, cache_root=tmp_path / "c", backoff=0)

    run_with_peers([make_app(src)], go)


def test_plan_chunks_coalesces_and_splits() -> None:
    ix = read_index(write_synthetic_gguf(Path(os.environ.get("TMPDIR", "/tmp")) / f"plan-{os.getpid()}.gguf"))
    tensors = ix.assignment_tensors(1, 3)
    chunks = plan_chunks(tensors, gap=ix.alignment, chunk=1000)
    assert all(b - a <= 1000 for a, b in chunks)
    assert sum(b - a for a, b in chunks) == sum(b - a for a, b in ix.assignment_ranges(1, 3))
    covered = sorted(chunks)
    for t in tensors:
        assert any(a <= t.offset and t.end <= b for a, b in ix.assignment_ranges(1, 3))
    assert covered == chunks


def test_manifest_hashes_are_the_tensor_hashes(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="gemma3")

    async def go(peers: list[str]) -> None:
        await fetch_assignment(peers, "m", 0, 4, cache_root=tmp_path / "c")

    run_with_peers([make_app(src)], go)
    with GGUFFile(src) as f:
        for name, sha in ShardCache(tmp_path / "c", "m").verified.items():
            assert sha == hashlib.sha256(f.tensor_data(name)).hexdigest()


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.parametrize("which", ["qwen", "gemma"])
def test_reference_model_every_layer(which: str, request, tmp_path: Path) -> None:
    import shutil

    src: Path = request.getfixturevalue(f"{which}_path")
    ix = read_index(src)
    root = tmp_path / "c"

    async def go(peers: list[str]) -> None:
        for layer in range(ix.n_layers):
            r = await fetch_assignment(peers, src.stem, layer, layer + 1, cache_root=root)
            assert_same_tensors(r.path, src, r.tensors)
            ranges = sum(b - a for a, b in ix.assignment_ranges(layer, layer + 1))
            assert ranges <= r.bytes_fetched <= ranges + ix.data_offset + (1 << 20)
            offline = await fetch_assignment([dead_peer()], src.stem, layer, layer + 1, cache_root=root)
            assert offline.from_cache and offline.bytes_fetched == 0
            shutil.rmtree(root)

    run_with_peers([make_app(src, data_dir=tmp_path / "data")], go)


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.parametrize("which", ["qwen", "gemma"])
def test_reference_model_three_way_split(which: str, request, tmp_path: Path) -> None:
    src: Path = request.getfixturevalue(f"{which}_path")
    ix = read_index(src)
    size = src.stat().st_size
    n = ix.n_layers
    bounds = [0, round(n / 3), round(2 * n / 3), n]
    layer_bytes = ix.layer_bytes()

    async def go(peers: list[str]) -> None:
        for w in range(3):
            a, b = bounds[w], bounds[w + 1]
            r = await fetch_assignment(peers, src.stem, a, b, cache_root=tmp_path / f"w{w}")
            assert_same_tensors(r.path, src, r.tensors)
            share = sum(layer_bytes[a:b]) / sum(layer_bytes)
            print(f"{src.stem} worker {w} layers [{a},{b}): fetched {r.bytes_fetched / 1e6:.1f} MB = "
                  f"{r.bytes_fetched / size:.1%} of the file; its layers are {share:.1%} of the layer bytes")
            ends = sum(t.nbytes for t in r.index.assignment_tensors(a, b) if not t.name.startswith("blk."))
            assert r.bytes_fetched <= sum(layer_bytes[a:b]) + ends + ix.data_offset + (1 << 20)

    run_with_peers([make_app(src, data_dir=tmp_path / "data")], go)


class CountingStreams:
    """`connect=` for fetch_assignment: TCP wrapped in a plain trio Stream (so the generic receive path runs,
    not `recv_into` on the socket); counts the connections opened."""

    def __init__(self) -> None:
        self.opened = 0

    async def __call__(self, host: str, port: int, tls: bool) -> trio.abc.Stream:
        self.opened += 1
        inner = await trio.open_tcp_stream(host, port)

        class Wrapped(trio.abc.Stream):
            async def send_all(self, data: bytes | bytearray | memoryview) -> None:
                await inner.send_all(data)

            async def wait_send_all_might_not_block(self) -> None:
                await inner.wait_send_all_might_not_block()

            async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
                return await inner.receive_some(max_bytes)

            async def aclose(self) -> None:
                await inner.aclose()

        return Wrapped()


def test_any_byte_stream_and_connections_are_reused(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="qwen2", output_first=True, hidden=256, ffn=512)
    app = Faulty(make_app(src))
    streams = CountingStreams()

    async def go(peers: list[str]) -> None:
        r = await fetch_assignment(peers, "m", 0, 4, cache_root=tmp_path / "c", connect=streams,
                                   chunk_size=16 << 10, max_in_flight=2)  # fmt: skip
        assert_same_tensors(r.path, src, r.tensors)

    run_with_peers([app], go)
    assert app.blob_requests > 10
    assert streams.opened <= 3  # keep-alive: the table, the header and every chunk over at most 3 connections


def test_table_disagreeing_with_header_is_refused(tmp_path: Path) -> None:
    """The transfer is planned from the peer's tensor table while the header parses; a table that does not
    match the header it serves is a protocol error and nothing is recorded as verified."""
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama")
    inner = make_app(src)

    async def lying_table(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/tensors"):
            return await inner(scope, receive, send)
        body = bytearray()

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    doc = json.loads(body)
                    doc["n_layers"] += 1  # claims a layer the header does not have
                    data = json.dumps(doc).encode()
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(data)).encode())]})  # fmt: skip
                    await send({"type": "http.response.body", "body": data})

        await inner(scope, receive, capture)

    async def go(peers: list[str]) -> None:
        forget_parsed_headers()  # parse alongside the transfer, not from this process's cache
        with pytest.raises(RemoteProtocolError, match="disagrees"):
            await fetch_assignment(peers, "m", 0, 2, cache_root=tmp_path / "c")

    run_with_peers([lying_table], go)
    assert ShardCache(tmp_path / "c", "m").verified == {}


def test_header_parsed_once_per_process(tmp_path: Path, monkeypatch) -> None:
    import eldric_p2p.data.shardcache as shardcache

    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="gemma3", tied_embeddings=True)
    calls = []
    real = shardcache.parse_gguf_untrusted
    monkeypatch.setattr(shardcache, "parse_gguf_untrusted", lambda *a, **k: calls.append(1) or real(*a, **k))
    forget_parsed_headers()

    async def go(peers: list[str]) -> None:
        for w, (a, b) in enumerate([(0, 2), (2, 4), (1, 3)]):
            r = await fetch_assignment(peers, "m", a, b, cache_root=tmp_path / f"w{w}")
            assert_same_tensors(r.path, src, r.tensors)
            assert r.index.n_layers == 4 and r.index.architecture == "gemma3"  # the parsed header, not the table
        assert ShardCache(tmp_path / "w0", "m").covers(0, 2)  # the cache's own index comes from the same parse

    run_with_peers([make_app(src)], go)
    assert len(calls) == 1
