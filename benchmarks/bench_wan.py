"""Decode tokens/s of a pipeline spanning two NATed sites, beside the bound from compute plus hop latency.

    sudo python benchmarks/bench_wan.py [--model PATH] [--delay-ms 20] [--tokens 48] [--nat symmetric,eim]
                                        [--keep-warm 1,0] [--tcp-punch on,off] [--no-baseline] [--repeat N]

Builds the NAT lab (tunnel/natlab.py) once per NAT kind and delay (the given one, and 0 ms for comparison),
starts a relay, a public data peer and workers a1, a2 (site A) and b1 (site B) as `eldric-p2p node` processes,
deploys the model over a1 -> a2 -> b1 and chats greedily through the data peer. One decode step goes around
the ring: a1 -> a2 inside site A (direct), then a2 -> b1 and b1 -> a1 between the sites: relayed behind
symmetric NATs (site -> relay -> site), punched behind endpoint-independent ones (site -> site); either way
each of those two hops crosses two WAN links. The bound per token is the single-process compute time (the
fastest of three `eldric-p2p run`s, same machine, same run) plus the emulated one-way delays: 4 WAN crossings
x delay. Prints both, the ratio and the overhead per token beyond the bound; then, from the workers' status,
where a decode step's time went (each stage's compute, the links, the rest at the head) and the same bound
with the stages' compute as they measured it in the pipeline: a stage whose CPU idles between steps computes
slower than one process running back to back (benchmarks/bench_idle.py), which is the machine's doing, not the
network's. The workers run with each `--keep-warm` value in turn (`eldric-p2p node --keep-warm S`: spinners at
the lowest priority keep their CPUs from idling between steps, engine/warm.py), so the rows compare both in
one run; `--no-baseline` skips the 0 ms rows. Each row also says what carried each stage's link to the next
(`direct:tcp`, `punched:tcp` or `punched:quic`, `relayed:tcp` for the relay's TCP lane) and the CPU time every
process of the lab spent per token during the chats (the keep-warm spinners, at SCHED_IDLE, apart): on a
machine that hosts the whole lab, one process's work delays another's. `--repeat N` runs every row N times,
interleaved, and ends with each row's median, lowest and highest ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tunnel"))
import natlab  # noqa: E402

PROMPT = "def quicksort(items):"
WAN_CROSSINGS_PER_TOKEN = 4  # a2 -> relay -> b1, b1 -> relay -> a1
BASELINE_RUNS = 3  # one-process runs per row; the fastest is the bound (a slow one would flatter the ratio)


def run_json(argv: list[str], timeout: float = 900) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def pipeline(model: Path, delay_ms: float, tokens: int, nat: str, keep_warm: str, tcp_punch: bool) -> dict:
    lab_cm = natlab.natlab(prefix="elpb", delay_ms=delay_ms, nat=nat)
    with lab_cm as lab, tempfile.TemporaryDirectory() as tmp:
        worker_args = ("--keep-warm", keep_warm) + (() if tcp_punch else ("--no-tcp-punch",))
        fed = natlab.Federation(lab, tmp, str(model.parent), worker_args=worker_args)
        try:
            fed.start()
            fed.wait_directory()
            url = fed.nodes["data"].url
            t0 = time.perf_counter()
            dep = run_json(fed.lab.argv("data", [sys.executable, "-m", "eldric_p2p", "deploy", model.stem,
                           "--workers", "a1,a2,b1", "--node", url, "--ctx", "1024", "--json"]))  # fmt: skip
            deploy_s = time.perf_counter() - t0
            chat = [sys.executable, "-m", "eldric_p2p", "chat", model.stem, PROMPT, "--raw", "--node", url,
                    "--max-tokens", str(tokens), "--temperature", "0", "--json"]  # fmt: skip
            lab.reset_forwarder_stats()  # its report covers the chats, not the deploy's bulk transfer
            for _ in range(30):  # the head's announcement reaches the data peer through the relay
                proc = subprocess.run(fed.lab.argv("data", chat), capture_output=True, text=True)
                if proc.returncode == 0:
                    break
                time.sleep(1)
            pids = {role: node.proc.pid for role, node in fed.nodes.items()}
            pids["forwarder"] = lab.forwarder.pid  # type: ignore[union-attr]
            before = {role: cpu_seconds(pid) for role, pid in pids.items()}
            runs = [run_json(fed.lab.argv("data", chat)) for _ in range(2)]
            cpu = {role: [b - a for a, b in zip(before[role], cpu_seconds(pid), strict=True)]
                   for role, pid in pids.items()}  # fmt: skip
            steps = sum(len(r["token_ids"]) for r in runs)  # one forward step per token
            cpu_ms = {role: (b * 1e3 / steps, i * 1e3 / steps) for role, (b, i) in cpu.items()}
            statuses = {role: fed.get(role, f"{fed.nodes[role].url}/api/v1/worker/status")
                        for role in ("a1", "a2", "b1")}  # fmt: skip
            split = stage_times(statuses)
            opened = {role: fed.get(role, f"{fed.nodes[role].url}/api/v1/node").get("link_stats", {})
                      for role in ("data", "a1", "a2", "b1")}  # fmt: skip
            warm = [status["keep_warm"] for status in statuses.values()]  # type: ignore[index]
            paths = [link for _, link in fed.stage_links()]
            # what carried each stage's link to the next while the chats ran (punched: TCP or QUIC)
            carriers = [shard.get("link_transport") for st in statuses.values() for shard in st["shards"]]  # type: ignore[index]
            links = [f"{p}:{c}" if c else str(p) for p, c in zip(paths, carriers, strict=False)]
            ranges = [(s["worker"], s["start"], s["end"]) for s in dep["stages"]]
            best = max(runs, key=lambda r: r["decode_tokens_per_s"])
            result = {"delay_ms": delay_ms, "deploy_s": deploy_s, "links": links, "ranges": ranges,
                      "split": split, "warm": warm, "opened": opened, "cpu_ms": cpu_ms, **best}  # fmt: skip
        finally:
            fed.stop()
    result["forwarder"] = lab.forwarder_report  # said when the lab came down
    result["forwarder_kind"] = lab.forwarder_kind
    return result


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of process `pid` so far: (in all but the keep-warm spinners, in the spinners: the threads at
    SCHED_IDLE, which run only where a CPU would otherwise idle)."""
    tick = os.sysconf("SC_CLK_TCK")

    def times(stat: Path) -> tuple[float, int]:  # utime + stime (fields 14, 15), policy (field 41)
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick, int(fields[38])

    total, _ = times(Path(f"/proc/{pid}/stat"))  # every thread's, ended ones too
    idle = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            t, policy = times(task / "stat")
        except OSError:
            continue  # the thread ended
        idle += t if policy == os.SCHED_IDLE else 0.0
    return total - idle, idle


def stage_times(statuses: dict[str, Any]) -> dict[str, float | None]:
    """Each worker's median compute per decode step, and the head's median wait for the token (the ring
    beyond it: the other stages' compute plus every link), from their status."""
    out: dict[str, float | None] = {}
    for role, status in statuses.items():
        for shard in status["shards"]:
            out[role] = (shard.get("batching") or {}).get("recent_compute_ms")
            if shard.get("ring_ms") is not None:
                out["ring"] = shard["ring_ms"]
            if shard.get("hop_ms") is not None:
                out[f"{role} hop"] = shard["hop_ms"]
    return out


def main() -> int:
    default = Path.home() / ".local/share/eldric-p2p/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay per WAN link")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--nat", default="symmetric,eim", help="NAT kinds of the lab to run (natlab.NAT_KINDS)")
    ap.add_argument("--keep-warm", default="1,0", help="the workers' --keep-warm values to compare (seconds)")
    ap.add_argument("--tcp-punch", default="on", help="on,off: also run with punched links kept on QUIC "
                    "(the workers' --no-tcp-punch)")  # fmt: skip
    ap.add_argument("--no-baseline", action="store_true", help="skip the 0 ms rows")
    ap.add_argument("--forwarder", default="auto", help="the lab's delay forwarder: auto (C where it "
                    "builds), c, python, or c,python to compare them row by row")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1, help="run every row this many times (rows interleaved); "
                    "then a summary of each row's ratios")  # fmt: skip
    args = ap.parse_args()
    warms = [w for w in args.keep_warm.split(",") if w]
    if not warms or any(not w.replace(".", "", 1).isdigit() for w in warms):
        raise SystemExit(f"--keep-warm {args.keep_warm}: seconds, comma-separated, e.g. 1,0")
    nats = [n for n in args.nat.split(",") if n]
    tcps = [t for t in args.tcp_punch.split(",") if t]
    if not tcps or any(t not in ("on", "off") for t in tcps):
        raise SystemExit(f"--tcp-punch {args.tcp_punch}: on, off or on,off")
    if bad := [n for n in nats if n not in natlab.NAT_KINDS]:
        raise SystemExit(f"--nat {','.join(bad)}: use {', '.join(natlab.NAT_KINDS)}")
    if (why := natlab.missing_requirements()) is not None:
        raise SystemExit(why)

    def local() -> dict:
        return run_json([sys.executable, "-m", "eldric_p2p", "run", str(args.model), PROMPT, "--raw",
                         "--max-tokens", str(args.tokens), "--temperature", "0", "--json"])  # fmt: skip

    print(f"model {args.model.name}; the bound's compute is the fastest of {BASELINE_RUNS} one-process runs "
          "made just before each pipeline run (a noisy machine moves it)")  # fmt: skip
    print(f"{'NAT':>10} {'WAN delay':>10} {'warm':>5} {'links':>36} {'tok/s':>7} {'ms/tok':>7} "
          f"{'compute ms':>11} {'bound ms':>9} {'ratio':>6} {'overhead ms':>12} {'same ids':>9}")  # fmt: skip
    delays = (args.delay_ms,) if args.no_baseline else (0.0, args.delay_ms)
    if args.repeat < 1:
        raise SystemExit(f"--repeat {args.repeat}: at least 1")
    fwds = [f for f in args.forwarder.split(",") if f]
    if not fwds or any(f not in ("auto", "c", "python") for f in fwds):
        raise SystemExit(f"--forwarder {args.forwarder}: auto, c, python or c,python")
    if "c" in fwds and natlab.forwarder_binary() is None:
        raise SystemExit("--forwarder c: tunnel/forward.c does not build here (no C compiler?)")
    rows = [(n, d, w, t, f) for n in nats for d in delays for w in warms for t in tcps for f in fwds]
    rows = [row for row in rows if not (row[0] == "symmetric" and row[3] == "off" and "on" in tcps)]
    # (nothing is punched behind symmetric NATs: --tcp-punch off is the same as on there)
    ratios: dict[tuple[str, float, str, str, str], list[tuple[float, float]]] = {row: [] for row in rows}
    for nat, delay, warm, tcp, fwd in rows * args.repeat:
        os.environ["ELDRIC_NATLAB_FORWARDER"] = fwd  # natlab.forwarder_binary: "python" runs the Python one
        ref = max((local() for _ in range(BASELINE_RUNS)), key=lambda r: r["decode_tokens_per_s"])
        compute_ms = 1000 / ref["decode_tokens_per_s"]
        r = pipeline(args.model, delay, args.tokens, nat, warm, tcp == "on")
        ms = 1000 / r["decode_tokens_per_s"]
        bound_ms = compute_ms + WAN_CROSSINGS_PER_TOKEN * delay
        same = r["token_ids"] == ref["token_ids"][: len(r["token_ids"])]
        ratios[(nat, delay, warm, tcp, fwd)].append((bound_ms / ms, ms - bound_ms))
        print(f"{nat:>10} {delay:>8.0f}ms {warm:>5} {'/'.join(r['links']):>36} "
              f"{r['decode_tokens_per_s']:>7.2f} {ms:>7.1f} {compute_ms:>11.1f} {bound_ms:>9.1f} "
              f"{bound_ms / ms:>6.3f} {ms - bound_ms:>12.1f} {str(same):>9}")  # fmt: skip
        print(f"{'':22}ranges {r['ranges']}, deploy {r['deploy_s']:.1f} s, prefill {r['prefill_s']:.2f} s, "
              f"{len(r['token_ids'])} tokens")  # fmt: skip
        spinners = "/".join(str(w["spinners"]) for w in r["warm"])
        off = r["warm"][0]["off"]
        spun = sum(w["spun_s"] for w in r["warm"])
        print(f"{'':22}keep-warm spinners a1/a2/b1 {spinners}, spun {spun:.1f} s"
              + (f" (off: {off})" if off else ""))  # fmt: skip
        print(f"{'':22}links opened (direct/punched/of them onto TCP/relayed): "
              + ", ".join(f"{role} {o.get('direct', 0)}/{o.get('punched', 0)}/{o.get('tcp_punched', 0)}/"
                          f"{o.get('relayed', 0)}" for role, o in r["opened"].items()))  # fmt: skip
        cpu = r["cpu_ms"]
        print(f"{'':22}CPU per token (ms, all threads but the spinners): "
              + ", ".join(f"{role} {b:.1f}" for role, (b, _) in cpu.items())
              + f"; in all {sum(b for b, _ in cpu.values()):.1f} of {ms:.1f} ms on {os.cpu_count()} CPUs; "
              f"spinners {sum(i for _, i in cpu.values()):.1f}")  # fmt: skip
        kind = r["forwarder_kind"]
        for line in r["forwarder"].splitlines():
            print(f"{'':22}the lab's {line.replace('forwarder:', f'forwarder ({kind}):', 1)}")
        sp = r["split"]
        if all(sp.get(k) is not None for k in ("a1", "a2", "b1", "ring")):
            links = sp["ring"] - sp["a2"] - sp["b1"]  # the head's wait minus the other stages' compute
            wan = WAN_CROSSINGS_PER_TOKEN * delay
            print(f"{'':22}per decode step (medians): compute a1 {sp['a1']:.1f} + a2 {sp['a2']:.1f} + b1 "
                  f"{sp['b1']:.1f} ms; the three links {links:.1f} ms (WAN delay {wan:.0f} of it); the rest "
                  f"of a step at the head {ms - sp['ring'] - sp['a1']:.1f} ms")  # fmt: skip
            if sp.get("a2 hop") is not None and sp.get("b1 hop") is not None:
                wire = sp["ring"] - sp["a2 hop"] - sp["b1 hop"]
                print(f"{'':22}a decode step from frame in to frame out at a2 {sp['a2 hop']:.1f} ms, b1 "
                      f"{sp['b1 hop']:.1f} (beyond their compute {sp['a2 hop'] - sp['a2']:.1f}, "
                      f"{sp['b1 hop'] - sp['b1']:.1f}); on the wire (a1 -> a2 -> b1 -> a1, in the kernels, "
                      f"the lab's forwarder and the relay) {wire:.1f} ms, {wire - wan:.1f} beyond the WAN "
                      "delay")  # fmt: skip
            staged = sp["a1"] + sp["a2"] + sp["b1"]
            print(f"{'':22}with the stages' compute as measured in this run ({staged:.1f} ms): bound "
                  f"{staged + wan:.1f} ms, ratio {(staged + wan) / ms:.3f}, transport overhead "
                  f"{ms - staged - wan:.1f} ms/token")  # fmt: skip
    if args.repeat > 1:
        print(f"\nratio (bound / ms per token) over {args.repeat} runs of each row: median, lowest, highest; "
              "runs at or above 0.95; overhead ms/token median")  # fmt: skip
        for (nat, delay, warm, tcp, fwd), got in ratios.items():
            r = sorted(x for x, _ in got)
            print(f"{nat:>10} {delay:>8.0f}ms warm {warm:>3} TCP punch {tcp:>3} forwarder {fwd:>6}: "
                  f"{statistics.median(r):.3f}, "
                  f"{r[0]:.3f}, {r[-1]:.3f}; {sum(x >= 0.95 for x in r)} of {len(r)}; "
                  f"{statistics.median(o for _, o in got):.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
