"""Pipeline decode speed: one stage in one process vs three stages in three processes, loopback, one run.

    python benchmarks/bench_pipeline.py [--model PATH] [--tokens 64] [--rounds 3]

Starts real `eldric-p2p node` processes: a data peer, a worker `solo` that holds the whole model (1 stage),
and workers `w1`, `w2`, `w3` holding a third each (3 stages, ring head -> middle -> tail -> head over TLS
links). Both pipelines are deployed at once and measured alternately with the same greedy request, so machine
noise hits both. Prints decode tokens/s of each (the head's own timing: from the first token to the last), the
ratio, and the per-hop overhead: (time per token with 3 stages - with 1) / 3 hops per token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from eldric_p2p.paths import models_dir

CLI = [sys.executable, "-m", "eldric_p2p"]


def start(name: str, tmp: Path, args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    log = tmp / f"{name}.log"
    argv = [
        *CLI,
        "node",
        "--name",
        name,
        "--data-dir",
        str(tmp / name),
        "--listen",
        "127.0.0.1:0",
        "--no-mdns",
        *args,
    ]
    p = subprocess.Popen(
        argv,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"serving on (http://\S+)", log.read_text())
        if m:
            return p, m.group(1)
        if p.poll() is not None:
            raise SystemExit(f"{name} exited: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit(f"{name} did not start")


def start_swarm(
    tmp: Path, model: Path, workers: list[str], procs: list[subprocess.Popen[bytes]]
) -> tuple[str, dict[str, str]]:
    """A data peer serving `model` (no worker) and CPU workers bootstrapped from it; their processes are
    appended to `procs` as they start. Returns (data peer URL, worker name -> URL)."""
    p, data = start("data", tmp, ["--models", str(model), "--no-worker"])
    procs.append(p)
    peer = ["--peer", data.removeprefix("http://"), "--device", "cpu"]
    urls = {}
    for name in workers:
        p, urls[name] = start(name, tmp, peer)
        procs.append(p)
    return data, urls


def reference_model(path: Path | None) -> Path:
    """`path`, or the Qwen reference model when None. Exits with a hint when there is neither."""
    model = path or next(iter(sorted(models_dir().glob("qwen*.gguf"))), None)
    if model is None:
        raise SystemExit("no --model and no Qwen reference model (eldric-p2p models fetch qwen)")
    return model


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (figures say which CPU gave them)."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
    except OSError:
        return "?"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name", "?")
    if "cpu family" in fields:  # a virtual machine's name may be just "AMD EPYC": say which one
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return name


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Ctrl-C every node, then wait (a node that does not exit in 10 s is killed)."""
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def generate(url: str, model: str, prompt: str, tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "raw": True,
        "local": True,
        "params": {"temperature": 0.0, "max_tokens": tokens},
    }
    last: dict[str, Any] = {}
    ids: list[int] = []
    with httpx.stream("POST", f"{url}/api/v1/pipeline/generate", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if line.strip():
                ev = json.loads(line)
                if "error" in ev:
                    raise SystemExit(f"{url}: {ev['error']['message']}")
                ids += ev.get("token_ids", [])
                last = ev
    return {**last["timings"], "token_ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=models_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    args = ap.parse_args()
    model = args.model.stem
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as d:
        tmp = Path(d)
        try:
            data, urls = start_swarm(tmp, args.model, ["solo", "w1", "w2", "w3"], procs)
            for workers in (["solo"], ["w1", "w2", "w3"]):
                r = httpx.post(
                    f"{data}/api/v1/pipeline/deploy",
                    timeout=900,
                    json={"model": model, "workers": workers, "max_ctx": 1024},
                )
                if r.status_code != 200:
                    raise SystemExit(f"deploy failed: {r.text}")
                print(
                    "deployed:",
                    ", ".join(
                        f"{s['worker']} layers {s['start']}-{s['end'] - 1}" for s in r.json()["stages"]
                    ),
                )
            heads = {"1 stage": urls["solo"], "3 stages": urls["w1"]}
            for url in heads.values():
                generate(url, model, args.prompt, 8)  # warm up: first forward, links opened
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in heads}
            for _ in range(args.rounds):
                for k, url in heads.items():
                    runs[k].append(generate(url, model, args.prompt, args.tokens))
        finally:
            stop(procs)
    tps = {k: statistics.median(r["decode_tokens_per_s"] for r in v) for k, v in runs.items()}
    same = runs["1 stage"][0]["token_ids"] == runs["3 stages"][0]["token_ids"]
    print(f"model {model}, {args.tokens} tokens greedy, {args.rounds} rounds, median decode tokens/s:")
    for k, v in tps.items():
        print(
            f"  {k:<9} {v:7.2f} tokens/s  ({1000 / v:6.2f} ms/token)   runs: "
            + ", ".join(f"{r['decode_tokens_per_s']:.2f}" for r in runs[k])
        )
    ratio = tps["3 stages"] / tps["1 stage"]
    hop_ms = (1000 / tps["3 stages"] - 1000 / tps["1 stage"]) / 3
    print(
        f"  ratio 3 stages / 1 stage: {ratio:.3f}   per-hop overhead: {hop_ms:.2f} ms   same tokens: {same}"
    )


if __name__ == "__main__":
    main()
