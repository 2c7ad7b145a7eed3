"""How fast a pipeline stage computes a decode step when its CPU sat idle just before, in one process.

    python benchmarks/bench_idle.py [--model qwen2.5-coder-0.5b-instruct] [--steps 30]

In a pipeline across sites each stage waits for the others and for the WAN between its decode steps: with
20 ms per WAN link a stage of three idles ~100 ms per token. This runs the model's three stages (the split of
bench_wan.py) one after another in one process and times each stage's forward, with nothing between them
(as in one process), with a sleep before each (the CPU idles, as in a pipeline), with a busy wait of the same
length (the CPU never idles), with a sleep that ends in a few milliseconds of work on both cores, and with a
sleep while the keep-warm spinners of `eldric-p2p node` run (engine/warm.py: at SCHED_IDLE they take no time
from the work, but the CPUs never idle). The difference between the first rows is the machine's, not the
pipeline's: no network, no other process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from eldric_p2p.data.refmodels import resolve_model
from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.warm import KeepWarm


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def busy_both_cores(seconds: float) -> None:
    """Keep two CPUs busy (this process and a forked child; one Python thread holds one core)."""
    pid = os.fork()
    if pid == 0:
        busy(seconds)
        os._exit(0)
    busy(seconds)
    os.waitpid(pid, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = LocalModel(resolve_model(args.model), max_ctx=1024, splits=(8, 16))
    stages = model.stages
    for stage in stages:
        stage.open_session("s")
    h = torch.tensor([1, 2, 3, 4, 5])
    for stage in stages:
        h = stage.forward("s", h, 0, last_only=True)
    pos = 5

    def run(label: str, before: Callable[[], None]) -> None:
        nonlocal h, pos
        times: list[list[float]] = [[] for _ in stages]
        for _ in range(args.steps):
            h = torch.tensor([int(h[-1].argmax())])
            for k, stage in enumerate(stages):
                before()
                t = time.perf_counter()
                h = stage.forward("s", h, pos, last_only=True)
                times[k].append((time.perf_counter() - t) * 1000)
            pos += 1
        med = [statistics.median(t) for t in times]
        print(f"{label:44} " + " ".join(f"{m:6.1f}" for m in med) + f" {sum(med):8.1f}", flush=True)

    print(f"{args.model}, stages 0-8 / 8-16 / 16-end, {args.threads} threads, "
          f"{args.steps} decode steps each; medians in ms")  # fmt: skip
    print(f"{'before each stage':44} {'s1':>6} {'s2':>6} {'s3':>6} {'sum':>8}")
    run("nothing (back to back)", lambda: None)
    run("sleep 8 ms", lambda: time.sleep(0.008))
    run("sleep 33 ms (~100 ms idle per token)", lambda: time.sleep(0.033))
    run("busy wait 33 ms (the CPU never idles)", lambda: busy(0.033))
    run("sleep 25 ms, then 8 ms busy on both cores", lambda: (time.sleep(0.025), busy_both_cores(0.008)))
    kw = KeepWarm(1.0, cpus=args.threads + 1)
    if kw.on:  # what `eldric-p2p node` does between steps (--keep-warm, default 1 s)
        run("sleep 33 ms with keep-warm spinners", lambda: (kw.touch(), time.sleep(0.033)))
        time.sleep(1.5)  # their window ends before the next row
    else:
        print(f"(keep-warm spinners: off here, {kw.off})")
    run("nothing (back to back, again)", lambda: None)


if __name__ == "__main__":
    main()
