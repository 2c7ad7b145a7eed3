from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio
from starlette.applications import Starlette

from eldric_p2p.data.datapeer import (
    HASH_CACHE_FILE,
    Catalog,
    RangeError,
    datapeer_routes,
    parse_range_untrusted,
)
from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.http_server import EXCEPTION_HANDLERS, serve_app

Client = Callable[[httpx.AsyncClient], Awaitable[None]]


def run_served(catalog: Catalog, fn: Client) -> None:
    """Serve the catalog on a real loopback port and run `fn` with a client based at /api/v1/models."""
    app = Starlette(routes=datapeer_routes(catalog), exception_handlers=EXCEPTION_HANDLERS)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_app, app, "127.0.0.1", 0)
            base = f"http://127.0.0.1:{port}/api/v1/models"
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                await fn(client)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    write_synthetic_gguf(d / "tiny-llama.gguf", arch="llama")
    write_synthetic_gguf(d / "tiny-qwen.gguf", arch="qwen2", output_first=True)
    full = write_synthetic_gguf(tmp_path / "full.gguf", arch="gemma3").read_bytes()
    (d / "truncated.gguf").write_bytes(full[: len(full) // 2])
    (d / "notes.gguf").write_bytes(b"this is not a model\n" * 10)
    (d / "empty.gguf").write_bytes(b"")
    return d


def test_bad_files_skipped_with_warning_others_served(models: Path, tmp_path: Path, caplog) -> None:
    cat = Catalog.scan([models], data_dir=tmp_path / "data")
    assert sorted(cat.models) == ["tiny-llama", "tiny-qwen"]
    skipped = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for name in ("truncated.gguf", "notes.gguf", "empty.gguf"):
        assert name in skipped

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/registry")
        assert r.status_code == 200
        reg = {m["id"]: m for m in r.json()["models"]}
        assert set(reg) == {"tiny-llama", "tiny-qwen"}
        assert reg["tiny-qwen"]["architecture"] == "qwen2"
        assert reg["tiny-qwen"]["n_layers"] == 4 and reg["tiny-qwen"]["hidden_size"] == 64
        assert reg["tiny-qwen"]["size"] == (models / "tiny-qwen.gguf").stat().st_size

    run_served(cat, check)


def test_metadata_omits_big_arrays_unless_asked(models: Path) -> None:
    cat = Catalog.scan([models / "tiny-qwen.gguf"])

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/tiny-qwen/metadata")
        md = r.json()
        assert md["metadata"]["general.architecture"] == "qwen2"
        assert md["metadata"]["qwen2.block_count"] == 4
        assert "tokenizer.ggml.tokens" not in md["metadata"]
        assert md["omitted_arrays"]["tokenizer.ggml.tokens"] == 288
        full = (await c.get("/tiny-qwen/metadata?arrays=1")).json()
        assert len(full["metadata"]["tokenizer.ggml.tokens"]) == 288
        assert full["metadata"]["tokenizer.ggml.merges"][0] == "Ġ t"

    run_served(cat, check)


def test_tensor_table_hashes_match_file(models: Path, tmp_path: Path) -> None:
    path = models / "tiny-llama.gguf"
    cat = Catalog.scan([path], data_dir=tmp_path / "data")

    async def check(c: httpx.AsyncClient) -> None:
        doc = (await c.get("/tiny-llama/tensors")).json()
        assert doc["file_size"] == path.stat().st_size
        assert doc["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        with GGUFFile(path) as f:
            assert [t["name"] for t in doc["tensors"]] == list(f.index.tensors)
            for row in doc["tensors"]:
                t = f.index.tensors[row["name"]]
                assert (row["offset"], row["size"], row["type"], row["type_id"]) == (
                    t.offset, t.nbytes, t.ggml_type.name, int(t.ggml_type))  # fmt: skip
                assert row["shape"] == list(t.shape)
                assert row["sha256"] == hashlib.sha256(f.tensor_data(row["name"])).hexdigest()

    run_served(cat, check)
    cache = json.loads((tmp_path / "data" / HASH_CACHE_FILE).read_text())
    assert len(cache) == 1 and str(path) in next(iter(cache))


def test_hash_cache_reused_and_invalidated_by_change(models: Path, tmp_path: Path, monkeypatch) -> None:
    path = models / "tiny-llama.gguf"
    data = tmp_path / "data"
    calls = []
    import eldric_p2p.data.datapeer as dp

    real = dp.hash_tensors
    monkeypatch.setattr(dp, "hash_tensors", lambda p, ix: calls.append(p) or real(p, ix))

    def table() -> dict[str, str]:
        out: dict[str, str] = {}

        async def get(c: httpx.AsyncClient) -> None:
            out.update({t["name"]: t["sha256"] for t in (await c.get("/tiny-llama/tensors")).json()["tensors"]})

        run_served(Catalog.scan([path], data_dir=data), get)
        return out

    first = table()
    assert len(calls) == 1
    assert table() == first and len(calls) == 1  # a new process reads the cache
    write_synthetic_gguf(path, arch="llama", seed=9)  # same layout, other bytes
    changed = table()
    assert len(calls) == 2
    assert changed["blk.0.attn_q.weight"] != first["blk.0.attn_q.weight"]


def test_blob_ranges(models: Path) -> None:
    path = models / "tiny-llama.gguf"
    body = path.read_bytes()
    size = len(body)
    cat = Catalog.scan([path])

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/tiny-llama/blob")
        assert r.status_code == 200 and r.content == body
        etag = r.headers["etag"]
        assert r.headers["accept-ranges"] == "bytes"

        async def rng(h: str, **extra: str) -> httpx.Response:
            return await c.get("/tiny-llama/blob", headers={"range": h, **extra})

        r = await rng("bytes=10-19")
        assert r.status_code == 206 and r.content == body[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{size}"
        r = await rng("bytes=-100")
        assert r.status_code == 206 and r.content == body[-100:]
        assert r.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
        r = await rng(f"bytes={size - 5}-")
        assert r.content == body[-5:]
        r = await rng(f"bytes=0-{size * 2}")  # end past the file: clipped
        assert r.status_code == 206 and r.content == body
        r = await rng(f"bytes=-{size * 2}")
        assert r.status_code == 206 and r.content == body
        for h in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
            r = await rng(h)
            assert r.status_code == 416, h
            assert r.headers["content-range"] == f"bytes */{size}"
            assert r.json()["error"]["code"] == "range_not_satisfiable"
        for h in ("bytes=abc", "bytes=5-3", "bytes=0-1,5-6", "items=0-5", "bytes=", "bytes=--5", "bytes=1-2-3"):
            r = await rng(h)
            assert r.status_code == 400, h
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await rng("bytes=0-3", **{"if-range": etag})
        assert r.status_code == 206 and r.content == body[:4]
        r = await rng("bytes=0-3", **{"if-range": '"stale"'})
        assert r.status_code == 200 and r.content == body
        r = await c.head("/tiny-llama/blob", headers={"range": "bytes=0-99"})
        assert r.status_code == 206 and r.headers["content-length"] == "100"

    run_served(cat, check)


def test_unknown_and_path_like_ids_are_404(models: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.gguf"
    write_synthetic_gguf(secret)
    cat = Catalog.scan([models / "tiny-llama.gguf"])

    async def check(c: httpx.AsyncClient) -> None:
        for path in ("/nope/blob", "/nope/tensors", "/nope/metadata", "/secret/blob", "/../secret/blob",
                     "/..%2Fsecret/blob", "/%2E%2E/blob", "/tiny-llama%2F..%2F..%2Fsecret/blob",
                     f"/{secret}/blob", "/tiny-llama/other"):  # fmt: skip
            r = await c.get(path)
            assert r.status_code == 404, path
            err = r.json()["error"]
            assert err["type"] == "not_found_error" and err["message"], path
        r = await c.post("/tiny-llama/blob")
        assert r.status_code == 405 and "error" in r.json()

    run_served(cat, check)


def test_node_keeps_serving_after_bad_requests(models: Path) -> None:
    cat = Catalog.scan([models])

    async def check(c: httpx.AsyncClient) -> None:
        for _ in range(3):
            assert (await c.get("/tiny-llama/blob", headers={"range": "bytes=zz"})).status_code == 400
            assert (await c.get("/../../etc/passwd")).status_code == 404
        assert (await c.get("/tiny-llama/blob", headers={"range": "bytes=0-3"})).content[:4] == b"GGUF"

    run_served(cat, check)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=9-", 10, (9, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("BYTES = 2-4", 10, (2, 5)),
        ("bytes=0-999", 10, (0, 10)),
    ],
)
def test_parse_range(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range_untrusted(header, size) == expected


@pytest.mark.parametrize(
    ("header", "status"),
    [("bytes=10-", 416), ("bytes=-0", 416), ("bytes=3-2", 400), ("bytes=x-", 400), ("bytes=1-2,4-5", 400),
     ("bytes=" + "9" * 300, 400), ("bytes=+1-2", 400), ("bytes=١-٢", 400)],
)  # fmt: skip
def test_parse_range_rejects(header: str, status: int) -> None:
    with pytest.raises(RangeError) as info:
        parse_range_untrusted(header, 10)
    assert info.value.status == status


def test_file_removed_after_scan_is_404(models: Path) -> None:
    path = models / "tiny-llama.gguf"
    cat = Catalog.scan([path])
    os.unlink(path)

    async def check(c: httpx.AsyncClient) -> None:
        assert (await c.get("/tiny-llama/blob")).status_code == 404
        assert (await c.get("/tiny-llama/tensors")).status_code == 404

    run_served(cat, check)

