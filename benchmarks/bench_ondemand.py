"""On-demand load time: the first request for a model nobody serves, with the layers fetched over the network
vs read back from the worker's shard cache, side by side in one run.

    python benchmarks/bench_ondemand.py [--model PATH] [--rounds 3] [--memory 1500MiB]

Real `eldric-p2p node` processes on loopback: a data peer started with `--on-demand` (the node the client
asks, and the coordinator) and one worker. Each round asks `/v1/completions` for one token of a model that is
not loaded, twice: once after the worker's shard cache was emptied (its layers come over HTTP Range requests
from the data peer: "network"), once with the cache kept ("shard cache"); between the two the model is
unloaded with `DELETE /api/v1/cache/{model}`. A third request with the model loaded gives the baseline.
Prints per case the median time to the answer, the worker's fetch and load seconds, and the bytes fetched.
The network here is loopback: a real link adds its transfer time to the network row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import cpu_name, reference_model, start, stop  # noqa: E402


def ask(url: str, model: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", timeout=900,
                   json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})  # fmt: skip
    if r.status_code != 200:
        raise SystemExit(f"{r.status_code}: {r.text}")
    return time.perf_counter() - t0


def shard(worker_url: str, model: str) -> dict[str, Any]:
    st = httpx.get(f"{worker_url}/api/v1/worker/status", timeout=10).json()
    return next(s for s in st["shards"] if s["model_id"] == model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the Qwen reference model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", default="1500MiB", help="the worker's --memory")
    args = ap.parse_args()
    model = reference_model(args.model)
    cpu = cpu_name()
    print(f"model {model.name} ({model.stat().st_size / 2**20:.0f} MiB), CPU {cpu}, {os.cpu_count()} cores")
    model_id = model.stem
    rows: dict[str, list[tuple[float, float, float, int]]] = {"network": [], "shard cache": [], "loaded": []}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="eldric-bench-ondemand-") as td:
        tmp = Path(td)
        try:
            data, url = start("data", tmp, ["--models", str(model), "--no-worker", "--on-demand"])
            procs.append(data)
            worker, wurl = start("w1", tmp, ["--memory", args.memory, "--device", "cpu",
                                             "--peer", url.removeprefix("http://")])  # fmt: skip
            procs.append(worker)
            deadline = time.monotonic() + 60
            while not any("worker" in (p.get("roles") or []) for p in
                          httpx.get(f"{url}/api/v1/peers", timeout=10).json()["peers"]):  # fmt: skip
                if time.monotonic() > deadline:
                    raise SystemExit("the worker did not join")
                time.sleep(0.2)
            for _ in range(args.rounds):
                for case in ("network", "shard cache"):
                    if case == "network":
                        shutil.rmtree(tmp / "w1" / "shards", ignore_errors=True)
                    seconds = ask(url, model_id)
                    s = shard(wurl, model_id)
                    rows[case].append((seconds, s["fetch_s"], s["load_s"], s["bytes_fetched"]))
                    if case == "shard cache":
                        rows["loaded"].append((ask(url, model_id), 0.0, 0.0, 0))
                    r = httpx.delete(f"{url}/api/v1/cache/{model_id}", timeout=60)
                    if r.status_code != 200:
                        raise SystemExit(r.text)
        finally:
            stop(procs)
    head = f"{'first request':14} {'median s':>9} {'fetch s':>8} {'load s':>7} {'fetched MiB':>12}"
    print(f"{head}   (median of {args.rounds})")
    med = statistics.median
    for case, rs in rows.items():
        print(f"{case:14} {med(r[0] for r in rs):9.2f} {med(r[1] for r in rs):8.2f} "
              f"{med(r[2] for r in rs):7.2f} {med(r[3] for r in rs) / 2**20:12.1f}")  # fmt: skip
    net, cached = (statistics.median(r[0] for r in rows[c]) for c in ("network", "shard cache"))
    print(f"shard cache vs network: {net / cached:.2f}x faster")


if __name__ == "__main__":
    main()
