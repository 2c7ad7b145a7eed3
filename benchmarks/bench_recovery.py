"""Recovery pause: a stage killed (SIGKILL) mid-generation, the stream goes on; how long did the client wait?

    python benchmarks/bench_recovery.py [--model PATH] [--tokens 64] [--victims middle,tail]
    python benchmarks/bench_recovery.py --victims replica

Real `eldric-p2p node` processes on loopback with the default heartbeat (2 s): a data peer (the coordinator,
and the node the client asks), workers w1, w2, w3 in the pipeline and a spare w4. For each victim a fresh
deployment on w1-w3 is made, a greedy generation is streamed from the data node, and after the third token the
victim's process is killed. Prints, per victim: the pause the client saw (from the final event's
`timings.recovery_pause_s`: the failure to the next token), the coordinator's re-plan time, whether the tokens
equal an uninterrupted run of the same request, and where the stages went. `replica`: the model is deployed
as two 2-stage replicas over the four workers instead, and the tail of the replica the session is on is
killed: the session resumes on the other replica (nothing to fetch) while the broken one is re-planned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import cpu_name, reference_model, start, stop  # noqa: E402


def stream(url: str, model: str, prompt: str, tokens: int, kill: Any = None) -> list[dict[str, Any]]:
    body = {
        "model": model,
        "prompt": prompt,
        "raw": True,
        "params": {"temperature": 0.0, "max_tokens": tokens},
    }
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{url}/api/v1/pipeline/generate", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if line.strip():
                events.append(json.loads(line))
                if kill is not None and len(events) == 3:
                    kill()
    if "error" in events[-1]:
        raise SystemExit(f"the stream failed: {events[-1]['error']}")
    return events


def wait_workers(url: str, names: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = httpx.get(f"{url}/api/v1/peers", timeout=5).json()["peers"]
        if names <= {p["name"] for p in peers}:
            return
        time.sleep(0.3)
    raise SystemExit(f"workers {sorted(names)} not all seen")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the Qwen reference model)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--victims", default="middle,tail")
    ap.add_argument("--memory", default="600MiB", help="each worker's --memory")
    args = ap.parse_args()
    model = reference_model(args.model)
    cpu = cpu_name()
    print(f"model {model.name}, {args.tokens} tokens, CPU {cpu}, {os.cpu_count()} cores")
    model_id, prompt = model.stem, "Write a Python function that adds two numbers."
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="eldric-bench-recovery-") as td:
        tmp = Path(td)
        try:
            data, url = start("data", tmp, ["--models", str(model), "--no-worker"])
            procs.append(data)
            workers: dict[str, subprocess.Popen[bytes]] = {}
            for name in ("w1", "w2", "w3", "w4"):
                workers[name], _ = start(name, tmp, ["--memory", args.memory, "--device", "cpu", "--peer",
                                                     url.removeprefix("http://")])  # fmt: skip
                procs.append(workers[name])
            wait_workers(url, set(workers))
            rows = []
            for victim in args.victims.split(","):
                while httpx.post(
                    f"{url}/api/v1/pipeline/undeploy", json={"model": model_id}, timeout=60
                ).is_success:
                    pass  # the previous round's (recovered) pipeline
                names = [n for n in ("w1", "w2", "w3", "w4") if workers[n].poll() is None][:3]
                ask = {"model": model_id, "workers": names, "max_ctx": 512}
                if victim == "replica":  # two 2-stage replicas over the four workers
                    ask = {"model": model_id, "replicas": 2, "max_ctx": 512}
                r = httpx.post(f"{url}/api/v1/pipeline/deploy", timeout=600, json=ask)
                if r.status_code != 200:
                    raise SystemExit(r.text)
                reps = r.json().get("replicas") or [r.json()]
                want = [t for e in stream(url, model_id, prompt, args.tokens) for t in e.get("token_ids", [])]
                killed: list[str] = []

                def kill_serving_tail(reps: list[Any] = reps, killed: list[str] = killed) -> None:
                    for rep in reps:  # the tail of the replica the session is on
                        st = httpx.get(f"{rep['stages'][0]['url']}/api/v1/worker/status", timeout=5).json()
                        if any(sh.get("sessions") for sh in st["shards"]):
                            killed.append(rep["stages"][-1]["worker"])
                            workers[killed[0]].kill()
                            return

                if victim == "replica":
                    kill = kill_serving_tail
                else:
                    killed.append(names[{"head": 0, "middle": 1, "tail": 2}[victim]])
                    kill = workers[killed[0]].kill
                events = stream(url, model_id, prompt, args.tokens, kill=kill)
                target = killed[0] if killed else "?"
                got = [t for e in events for t in e.get("token_ids", [])]
                timings = events[-1]["timings"]
                st = httpx.get(f"{url}/api/v1/pipeline/status", timeout=10).json()
                deadline = time.monotonic() + 30
                while victim == "replica" and not st["recovered"] and time.monotonic() < deadline:
                    time.sleep(0.5)  # the session went on at once; the broken replica is re-planned after
                    st = httpx.get(f"{url}/api/v1/pipeline/status", timeout=10).json()
                rec = st["recovered"][-1] if st["recovered"] else {}
                stages = ["".join(s["worker"] for s in d["stages"]) for d in st["deployments"]]
                rows.append((victim, target, timings.get("recovery_pause_s", float("nan")) * 1000,
                             rec.get("seconds", float("nan")), got == want, " + ".join(stages)))  # fmt: skip
            print(f"{'killed':8} {'worker':6} {'pause ms':>9} {'re-plan s':>10} {'same tokens':>12}  now on")
            for victim, target, pause, replan, same, stages in rows:
                print(f"{victim:8} {target:6} {pause:9.0f} {replan:10.2f} {str(same):>12}  {stages}")
        finally:
            stop(procs)


if __name__ == "__main__":
    main()
