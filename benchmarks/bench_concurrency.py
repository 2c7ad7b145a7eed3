"""Aggregate decode throughput with 1, 2, 4, 8 concurrent streams: one stage in one process, a 3-stage
pipeline in three, and llama.cpp's server with as many parallel slots, in one run.

    python benchmarks/bench_concurrency.py [--model PATH] [--tokens 48] [--streams 1,2,4,8]
                                           [--llama-server PATH] [--rounds 3]

Real `eldric-p2p node` processes on loopback (a data peer, a worker `solo` for the 1-stage pipeline and
w1, w2, w3 for the 3-stage one), both deployed for 8 sessions. For each stream count N, N greedy
generations of `--tokens` tokens with different prompts start together on the head; the aggregate is all
their tokens over the wall time from the first request to the last token, the best of `--rounds` (the
machine is shared: each side's best round is the one least disturbed). Every stage batches the steps of
the sessions waiting at once into one forward (pipeline/batching.py); each stream's tokens are checked
against the same prompt run alone.

llama.cpp: with `--llama-server PATH` (llama.cpp's `llama-server` binary) it is started with `-np N` slots
(`-c` N x 512 tokens, 2 threads) for each N, and the same N requests go to its `/v1/completions`. Without
it, `llama_cpp.server` (llama-cpp-python) is used when installed, which serves one request at a time;
without either, the llama.cpp column is left out. All on the same cores, one after another.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from eldric_p2p.paths import models_dir

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import cpu_name, start_swarm, stop  # noqa: E402

PROMPTS = [f"Write a Python function number {i} that" for i in range(16)]


async def one_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int) -> list[int]:
    import json

    body = {"model": model, "prompt": prompt, "raw": True, "local": True,
            "params": {"temperature": 0.0, "max_tokens": tokens}}  # fmt: skip
    ids: list[int] = []
    async with client.stream("POST", f"{url}/api/v1/pipeline/generate", json=body, timeout=900) as resp:
        async for line in resp.aiter_lines():
            if line.strip():
                ev = json.loads(line)
                if "error" in ev:
                    raise SystemExit(f"{url}: {ev['error']['message']}")
                ids += ev.get("token_ids", [])
    return ids


async def one_completion(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> int:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stream": False}
    r = await client.post(f"{url}/v1/completions", json=body, timeout=900)
    if r.status_code != 200:
        raise SystemExit(f"{url}: {r.status_code} {r.text[:300]}")
    return int(r.json()["usage"]["completion_tokens"])


def concurrently(n: int, fn: Any) -> tuple[float, list[Any]]:
    """(wall seconds, results) of fn(client, i) for i < n started together."""

    async def main() -> tuple[float, list[Any]]:
        out: list[Any] = [None] * n
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(limits=limits) as client:
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):

                    async def run(i: int = i) -> None:
                        out[i] = await fn(client, i)

                    nursery.start_soon(run)
            return time.perf_counter() - t0, out

    return trio.run(main)


def wait_http(url: str, path: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the llama.cpp server exited ({proc.returncode})")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the llama.cpp server did not start")


def llama_rows(args: argparse.Namespace, streams: list[int], tmp: Path) -> dict[int, float]:
    binary = args.llama_server or shutil.which("llama-server")
    if binary and not os.access(binary, os.X_OK):
        raise SystemExit(f"--llama-server {binary}: not an executable file")
    rows: dict[int, float] = {}
    port = 18599
    for n in streams:
        if binary:
            argv = [binary, "-m", str(args.model), "-t", "2", "-np", str(n), "-c", str(512 * n),
                    "--port", str(port), "--host", "127.0.0.1", "-cb"]  # fmt: skip
        else:
            try:
                import llama_cpp.server  # noqa: F401
            except ImportError:
                return rows
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(args.model), "--n_threads", "2",
                    "--n_ctx", "1024", "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
        log = open(tmp / f"llama-{n}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url, "/v1/models", proc)
            concurrently(1, lambda c, i, url=url: one_completion(c, url, PROMPTS[0], 4))  # warm up
            for _ in range(args.rounds):
                wall, counts = concurrently(
                    n, lambda c, i, url=url: one_completion(c, url, PROMPTS[i], args.tokens)
                )
                rows[n] = max(rows.get(n, 0.0), sum(counts) / wall)
        finally:
            proc.terminate()
            proc.wait(30)
        port += 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=models_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (default: on PATH)")
    ap.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each configuration; the best is reported")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    model = args.model.stem
    print(f"model {model}, {args.tokens} greedy tokens per stream, CPU {cpu_name()}, {os.cpu_count()} cores, "
          f"best of {args.rounds}")  # fmt: skip
    ours: dict[str, dict[int, float]] = {"1 stage": {}, "3 stages": {}}
    same = True
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as d:
        tmp = Path(d)
        try:
            data, urls = start_swarm(tmp, args.model, ["solo", "w1", "w2", "w3"], procs)
            for workers in (["solo"], ["w1", "w2", "w3"]):
                ask = {"model": model, "workers": workers, "max_ctx": 512, "sessions": 8}
                r = httpx.post(f"{data}/api/v1/pipeline/deploy", timeout=900, json=ask)
                if r.status_code != 200:
                    raise SystemExit(f"deploy failed: {r.text}")
            heads = {"1 stage": urls["solo"], "3 stages": urls["w1"]}
            alone: dict[int, list[int]] = {}
            for i in range(max(streams)):  # each prompt alone, for the equality check (and a warm-up)
                _, (ids,) = concurrently(1, lambda c, _, i=i: one_stream(c, urls["solo"], model, PROMPTS[i],
                                                                        args.tokens))  # fmt: skip
                alone[i] = ids
            for n in [n for n in streams for _ in range(args.rounds)]:
                for k, url in heads.items():
                    wall, results = concurrently(
                        n, lambda c, i, url=url: one_stream(c, url, model, PROMPTS[i], args.tokens)
                    )
                    ours[k][n] = max(ours[k].get(n, 0.0), sum(len(r) for r in results) / wall)
                    bad = [i for i in range(n) if results[i] != alone[i]]
                    if bad:
                        same = False
                        print(f"{k}, {n} streams: streams {bad} differ from the same prompts run alone")
        finally:
            stop(procs)
        llama = {} if args.no_llama else llama_rows(args, streams, tmp)
    kind = "llama-server -np N" if (args.llama_server or shutil.which("llama-server")) else "llama_cpp.server"
    head = f"{'streams':>8} {'1 stage tok/s':>14} {'3 stages tok/s':>15}"
    if llama:
        head += f" {kind + ' tok/s':>28} {'1 stage / llama.cpp':>20}"
    print(head)
    for n in streams:
        row = f"{n:>8} {ours['1 stage'][n]:14.1f} {ours['3 stages'][n]:15.1f}"
        if n in llama:
            row += f" {llama[n]:28.1f} {ours['1 stage'][n] / llama[n]:20.2f}"
        print(row)
    for k in ours:
        print(f"{k}: {max(streams)} streams give {ours[k][max(streams)] / ours[k][min(streams)]:.2f}x the "
              f"aggregate of {min(streams)}")  # fmt: skip
    print(f"every stream's tokens equal its prompt run alone: {same}")


if __name__ == "__main__":
    main()
