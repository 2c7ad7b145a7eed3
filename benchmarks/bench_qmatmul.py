"""Quantized-block matmul kernels vs torch fp32 F.linear on dequantized weights, on reference model matrices.

    python benchmarks/bench_qmatmul.py [--model qwen|gemma|PATH] [--threads N] [--repeat N]
                                       [--simd avx512,avx2]

Part 1 times one call per matrix shape (the model's real weight type for that shape) at T=1 (a decode step)
and T=32 (a prefill chunk): Qwen2.5-0.5B's shapes, those the model has. Part 2 times every linear layer of the
model once at T=1 (the output head included, the token embedding when it is tied to it), which sums to the
matmul time of one decode step and bounds the decode speed from above (tokens/s = 1 / that time).
`--simd` times each named kernel set (which compute the same bits) in turn, in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine import qmatmul as qm
from eldric_p2p.engine.dequant import dequantize
from eldric_p2p.paths import models_dir

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import cpu_name  # noqa: E402

MODELS = {"qwen": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "gemma": "gemma-3-270m-q4_k_m.gguf"}
# ggml shape [in, out] -> a tensor of that shape in Qwen2.5-0.5B
SHAPES = {
    "896x896": "blk.0.attn_q.weight",
    "896x128": "blk.0.attn_k.weight",
    "896x4864": "blk.0.ffn_gate.weight",
    "4864x896 Q4_K": "blk.11.ffn_down.weight",
    "4864x896 Q6_K": "blk.0.ffn_down.weight",
    "151936x896": "output.weight",
}


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _quant_weight(gguf: GGUFFile, name: str) -> qm.QuantWeight:
    info = gguf.index.tensors[name]
    n_in, n_out = info.shape[0], info.shape[1]
    return qm.QuantWeight.from_raw(gguf.tensor_data(name), info.ggml_type, n_in, n_out)


def _dequantized(gguf: GGUFFile, name: str) -> torch.Tensor:
    info = gguf.index.tensors[name]
    w = dequantize(gguf.tensor_data(name), info.ggml_type, info.shape, dtype=torch.float32)
    return w.reshape(info.shape[1], info.shape[0]).contiguous()  # [out, in]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen", help="qwen, gemma or a GGUF path")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--simd", default=None, help="kernel sets to time side by side, e.g. avx512,avx2")
    args = ap.parse_args()
    if not qm.kernels_available():
        print("the _qkernels extension is not built: pip install -e .")
        return 1
    from eldric_p2p.engine import _qkernels

    levels = args.simd.split(",") if args.simd else [qm.simd()]
    torch.set_num_threads(args.threads)
    model = str(models_dir() / MODELS[args.model]) if args.model in MODELS else args.model
    gguf = GGUFFile(model)
    print(f"kernels: {', '.join(levels)}, threads: {args.threads}, model: {model}, CPU: {cpu_name()}")

    def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
        """Median seconds per call of fn under each kernel set, the sets taking turns."""
        out: dict[str, float] = {}
        for level in levels:
            if _qkernels.set_simd(level) != level:
                raise SystemExit(f"this CPU cannot run the {level} kernels")
            out[level] = _time(fn, repeat)
        _qkernels.set_simd(True)
        return out

    cols = "".join(f" {lv + ' ms':>11}" for lv in levels)
    print(f"{'shape [in x out]':<16} {'type':<5} {'T':>3}{cols} {'torch fp32 ms':>14} {'GB/s (q)':>9}")
    for shape, name in SHAPES.items():
        if name not in gguf.index.tensors:
            continue
        qw = _quant_weight(gguf, name)
        wf = _dequantized(gguf, name)
        for t in (1, 32):
            x = torch.randn(t, qw.in_features)
            tq = timed(lambda x=x, qw=qw: qm.qlinear(x, qw, n_threads=args.threads), args.repeat)
            tt = _time(lambda x=x, wf=wf: F.linear(x, wf), args.repeat)
            cells = "".join(f" {tq[lv] * 1e3:>11.3f}" for lv in levels)
            print(f"{shape.split()[0]:<16} {qw.ggml_type.name:<5} {t:>3}{cells} {tt * 1e3:>14.3f}"
                  f" {qw.nbytes / tq[levels[0]] / 1e9:>9.1f}")  # fmt: skip
        del wf

    tied_head = "output.weight" not in gguf.index.tensors  # the token embedding is the output head
    names = [
        n
        for n, info in gguf.index.tensors.items()
        if n.endswith(".weight") and len(info.shape) == 2 and (n != "token_embd.weight" or tied_head)
    ]
    weights = [_quant_weight(gguf, n) for n in names]
    total_bytes = sum(w.nbytes for w in weights)
    xs = {w.in_features: torch.randn(1, w.in_features) for w in weights}

    def step() -> None:
        for w in weights:
            qm.qlinear(xs[w.in_features], w, n_threads=args.threads)

    t_step = timed(step, max(3, args.repeat // 2))
    by_type: dict[str, int] = {}
    for w in weights:
        by_type[GGMLQuantizationType(w.ggml_type).name] = by_type.get(w.ggml_type.name, 0) + w.nbytes
    mb = total_bytes / 1e6
    print(f"\none decode step, all {len(weights)} linear layers at T=1 ({mb:.0f} MB of weights):")
    for lv, t in t_step.items():
        print(f"  {lv}: {t * 1e3:.1f} ms, {total_bytes / t / 1e9:.1f} GB/s -> at most {1 / t:.1f} tokens/s")
    print("weight bytes by type: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sorted(by_type.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
