"""Decode tokens/s of a pipeline spanning two NATed sites, beside the bound from compute plus hop latency.

    sudo python benchmarks/bench_wan.py [--model PATH] [--delay-ms 20] [--tokens 48]

Builds the NAT lab (tunnel/natlab.py) once per delay (the given one, and 0 ms for comparison), starts a relay,
a public data peer and workers a1, a2 (site A) and b1 (site B) as `eldric-p2p node` processes, deploys the
model over a1 -> a2 -> b1 and chats greedily through the data peer. One decode step goes around the ring:
a1 -> a2 inside site A (direct), a2 -> b1 and b1 -> a1 relayed (each crosses two WAN links: site -> relay ->
site). The bound per token is the single-process compute time (`eldric-p2p run`, same machine, same run) plus
the emulated one-way delays of the hops: 4 WAN crossings x delay. Prints both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tunnel"))
import natlab  # noqa: E402

PROMPT = "def quicksort(items):"
WAN_CROSSINGS_PER_TOKEN = 4  # a2 -> relay -> b1, b1 -> relay -> a1


def run_json(argv: list[str], timeout: float = 900) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def pipeline(model: Path, delay_ms: float, tokens: int) -> dict:
    with natlab.natlab(prefix="elpb", delay_ms=delay_ms) as lab, tempfile.TemporaryDirectory() as tmp:
        fed = natlab.Federation(lab, tmp, str(model.parent))
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
            for _ in range(30):  # the head's announcement reaches the data peer through the relay
                proc = subprocess.run(fed.lab.argv("data", chat), capture_output=True, text=True)
                if proc.returncode == 0:
                    break
                time.sleep(1)
            runs = [run_json(fed.lab.argv("data", chat)) for _ in range(2)]
            status = fed.get("data", f"{url}/api/v1/pipeline/status")
            links = [s["link"] for s in status["deployments"][0]["stages"]]  # type: ignore[index]
            ranges = [(s["worker"], s["start"], s["end"]) for s in dep["stages"]]
            best = max(runs, key=lambda r: r["decode_tokens_per_s"])
            return {"delay_ms": delay_ms, "deploy_s": deploy_s, "links": links, "ranges": ranges, **best}
        finally:
            fed.stop()


def main() -> int:
    default = Path.home() / ".local/share/eldric-p2p/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay per WAN link")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    if (why := natlab.missing_requirements()) is not None:
        raise SystemExit(why)

    local = run_json([sys.executable, "-m", "eldric_p2p", "run", str(args.model), PROMPT, "--raw",
                      "--max-tokens", str(args.tokens), "--temperature", "0", "--json"])  # fmt: skip
    compute_s = 1 / local["decode_tokens_per_s"]
    print(f"model {args.model.name}; one process: {local['decode_tokens_per_s']:.1f} tok/s "
          f"({compute_s * 1000:.1f} ms/token compute)")  # fmt: skip
    print(f"{'WAN delay':>10} {'links':>26} {'tok/s':>7} {'ms/tok':>7} {'bound tok/s':>12} {'bound ms':>9} "
          f"{'ratio':>6} {'overhead ms':>12} {'same ids':>9}")  # fmt: skip
    for delay in (0.0, args.delay_ms):
        r = pipeline(args.model, delay, args.tokens)
        ms = 1000 / r["decode_tokens_per_s"]
        bound_ms = compute_s * 1000 + WAN_CROSSINGS_PER_TOKEN * delay
        same = r["token_ids"] == local["token_ids"][: len(r["token_ids"])]
        print(f"{delay:>8.0f}ms {'/'.join(r['links']):>26} {r['decode_tokens_per_s']:>7.2f} {ms:>7.1f} "
              f"{1000 / bound_ms:>12.2f} {bound_ms:>9.1f} {1000 / bound_ms / r['decode_tokens_per_s']:>6.2f} "
              f"{ms - bound_ms:>12.1f} {str(same):>9}")  # fmt: skip
        print(f"{'':11}ranges {r['ranges']}, deploy {r['deploy_s']:.1f} s, prefill {r['prefill_s']:.2f} s, "
              f"{len(r['token_ids'])} tokens")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
