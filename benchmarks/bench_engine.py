"""Engine speed beside llama.cpp: prefill and decode tokens/s on the same GGUF, same threads, one run.

    python benchmarks/bench_engine.py                      # both reference models, 2 threads
    python benchmarks/bench_engine.py --models qwen --threads 2 --tokens 64 --weights native
    python benchmarks/bench_engine.py --llama-native /tmp/llnative   # also a build for this CPU
    python benchmarks/bench_engine.py --prompt-repeat 13             # a ~480-token prompt
    python benchmarks/bench_engine.py --variant avx2=ELDRIC_KERNELS=avx2 \
        --variant glue=ELDRIC_KERNELS=avx2,ELDRIC_FUSED=0          # the engine as it was, in the same run

Each side runs in its own subprocess, one after the other, alternating `--rounds` times; the figure reported
is the best round of each (the machine is noisy), and the ratio eldric/llama.cpp. llama.cpp runs through
`llama-cpp-python` (pip install 'eldric-p2p[reference]'): greedy, flash attention off, f16 KV cache, the
defaults of `llama-cli`. A `--variant NAME=VAR=VALUE[,VAR=VALUE]` runs the engine once more per round with
those environment variables (ELDRIC_KERNELS=avx2|portable: a narrower kernel set; ELDRIC_FUSED=0: the layers
in torch glue instead of one C call), so an older configuration is measured beside the current one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from eldric_p2p.engine.qmatmul import simd
from eldric_p2p.paths import models_dir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pipeline import cpu_name  # noqa: E402

MODELS = {
    "qwen": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma": "gemma-3-270m-q4_k_m.gguf",
}
PROMPT = (
    "Write a Python function that parses an ISO 8601 date string and returns a datetime, "
    "with tests for leap years, time zones and invalid input. Explain each step briefly."
)

LLAMA_CPP = textwrap.dedent(
    """
    import json, sys, time, llama_cpp, numpy as np
    path, threads, n_gen, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                          verbose=False, flash_attn=False)
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
    out = []
    for _ in range(n_gen):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))  # greedy
        out.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    print(json.dumps({"prompt_tokens": len(ids), "prefill_s": t1 - t0, "decode_s": t2 - t1,
                      "decode_steps": n_gen, "token_ids": out}))
    """
)


def run_llama_cpp(
    path: str, threads: int, n_gen: int, pythonpath: str | None = None, prompt: str = PROMPT
) -> dict:
    """llama.cpp through llama-cpp-python: the installed build, or the one under `pythonpath`."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP, path, str(threads), str(n_gen), prompt],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["decode_tps"] = r["decode_steps"] / r["decode_s"]
    r["prefill_tps"] = r["prompt_tokens"] / r["prefill_s"]
    return r


def run_eldric(
    path: str, threads: int, n_gen: int, weights: str, env: dict[str, str] | None = None, prompt: str = PROMPT
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "eldric_p2p",
        "run",
        path,
        prompt,
        "--raw",
        "--json",
        "--max-tokens",
        str(n_gen),
        "--ignore-eos",
        "--threads",
        str(threads),
        "--weights",
        weights,
        "--ctx",
        "1024",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["decode_tps"] = r["decode_tokens_per_s"]
    r["prefill_tps"] = len(r["prompt_token_ids"]) / r["prefill_s"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen,gemma")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--prompt-repeat", type=int, default=1, metavar="K",
                    help="the prompt K times over (a longer prefill; 13: ~480 tokens)")  # fmt: skip
    ap.add_argument("--llama-native", default=None, metavar="DIR",
                    help="a llama-cpp-python built for this CPU (CMAKE_ARGS=-DGGML_NATIVE=ON pip install "
                         "--target DIR), measured beside the installed (AVX2) build")  # fmt: skip
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VAR=VALUE[,VAR=VALUE]",
                    help="the engine again with these environment variables (repeatable)")  # fmt: skip
    args = ap.parse_args()
    if not 1 <= args.prompt_repeat <= 13:
        raise SystemExit(f"--prompt-repeat {args.prompt_repeat}: 1 to 13 (the prompt and 64 steps fit 1024 "
                         "positions, the prompt one llama.cpp batch of at most 512)")  # fmt: skip
    prompt = " ".join([PROMPT] * args.prompt_repeat)
    variants: dict[str, dict[str, str]] = {}
    for spec in args.variant:
        vname, _, assigns = spec.partition("=")
        variants[vname] = dict(a.split("=", 1) for a in assigns.split(",") if a)
    rows = []
    sides = [("llama.cpp", lambda p: run_llama_cpp(p, args.threads, args.tokens, prompt=prompt))]
    if args.llama_native:
        sides.append(
            ("native", lambda p: run_llama_cpp(p, args.threads, args.tokens, args.llama_native, prompt))
        )
    sides.append(("eldric", lambda p: run_eldric(p, args.threads, args.tokens, args.weights, prompt=prompt)))
    for vname, venv in variants.items():
        sides.append(
            (vname, lambda p, e=venv: run_eldric(p, args.threads, args.tokens, args.weights, e, prompt))
        )
    for name in args.models.split(","):
        path = str(models_dir() / MODELS[name])
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for side, fn in sides:
                try:
                    r = fn(path)
                except subprocess.CalledProcessError as exc:  # a llama.cpp build that crashes on this CPU
                    why = f"signal {-exc.returncode}" if exc.returncode < 0 else f"exit {exc.returncode}"
                    print(f"{name}: {side} failed ({why}); left out")
                    continue
                if side not in best:
                    best[side] = r
                    continue
                b = best[side]  # each figure's best round (the greedy tokens are the same in every round)
                b["prefill_tps"] = max(b["prefill_tps"], r["prefill_tps"])
                b["decode_tps"] = max(b["decode_tps"], r["decode_tps"])
        e, ll = best["eldric"], best["llama.cpp"]
        a, b = e["token_ids"], ll["token_ids"]
        # the first step where the greedy tokens differ (None: identical)
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        rows.append((name, e, ll, same, best.get("native"), {v: best[v] for v in variants if v in best}))
    print(f"CPU {cpu_name()}, engine kernels {simd()}")  # the widest here (ELDRIC_KERNELS: narrower)
    print(f"threads={args.threads} decode steps={args.tokens} rounds={args.rounds} (best of each)")
    print(f"{'model':6} {'side':16} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, e, ll, same, nat, var in rows:
        print(f"{name:6} {'llama.cpp (AVX2)':16} {ll['prefill_tps']:14.1f} {ll['decode_tps']:13.1f}")
        if nat is not None:
            print(f"{name:6} {'llama.cpp native':16} {nat['prefill_tps']:14.1f} {nat['decode_tps']:13.1f}")
        print(
            f"{name:6} {'eldric':16} {e['prefill_tps']:14.1f} {e['decode_tps']:13.1f}"
            f"   weights={e.get('weights')}, {len(e['prompt_token_ids'])}-token prompt"
        )
        print(
            f"{name:6} {'ratio vs AVX2':16} {e['prefill_tps'] / ll['prefill_tps']:14.2f} "
            f"{e['decode_tps'] / ll['decode_tps']:13.2f}   greedy tokens "
            + ("identical" if same is None else f"identical for the first {same}")
        )
        if nat is not None:
            print(f"{name:6} {'ratio vs native':16} {e['prefill_tps'] / nat['prefill_tps']:14.2f} "
                  f"{e['decode_tps'] / nat['decode_tps']:13.2f}")  # fmt: skip
        for vname, v in var.items():
            same_v = v["token_ids"] == e["token_ids"]
            print(f"{name:6} {vname:16} {v['prefill_tps']:14.1f} {v['decode_tps']:13.1f}   "
                  f"{'same' if same_v else 'OTHER'} tokens as eldric")  # fmt: skip
            print(f"{name:6} {'eldric / ' + vname:16} {e['prefill_tps'] / v['prefill_tps']:14.2f} "
                  f"{e['decode_tps'] / v['decode_tps']:13.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
