"""Dequantization speed: eldric_p2p.engine.dequant (torch) against gguf-py's numpy reference.

Prints, per block type, the input MB/s of both on synthetic tensors, then the time to dequantize every tensor
of each reference model (ours to --dtype, gguf-py to float32) and the ratio. Best of --repeat runs.

    python benchmarks/bench_dequant.py [--threads N] [--dtype bfloat16] [--device cpu] [--skip-files]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from eldric_p2p.data.gguf_index import GGUFFile
from eldric_p2p.engine.dequant import dequantize
from eldric_p2p.engine.synthetic import F16_FIELDS
from eldric_p2p.paths import models_dir

T = GGMLQuantizationType
FILES = ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "gemma-3-270m-q4_k_m.gguf")


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def synthetic(qtype: GGMLQuantizationType, n_elements: int) -> tuple[np.ndarray, tuple[int, int]]:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row = 4096 if block_size == 32 else 4096 // 256 * 256
    rows = n_elements // row
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows * row // block_size, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = np.full((raw.shape[0], 1), 0.01, dtype=np.float16).view(np.uint8)
    return raw.reshape(rows, -1), (row, rows)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_types(args: argparse.Namespace, dtype: torch.dtype) -> None:
    print(f"{'type':6} {'ours MB/s':>10} {'gguf-py MB/s':>13} {'ratio':>7}")
    for qtype in F16_FIELDS:
        raw, shape = synthetic(qtype, args.elements)

        def ours(raw: np.ndarray = raw, qtype: T = qtype, shape: tuple[int, int] = shape) -> None:
            dequantize(raw, qtype, shape, dtype=dtype, device=args.device)
            sync(args.device)

        t_ours = best_of(args.repeat, ours)
        t_ref = best_of(1, lambda raw=raw, qtype=qtype: gguf_quants.dequantize(raw, qtype))
        mb = raw.nbytes / 1e6
        print(f"{qtype.name:6} {mb / t_ours:10.0f} {mb / t_ref:13.0f} {t_ref / t_ours:7.1f}")


def bench_file(path: Path, args: argparse.Namespace, dtype: torch.dtype) -> None:
    with GGUFFile(path) as f:
        tensors = list(f.index.tensors.values())

        def ours() -> None:
            for t in tensors:
                raw = f.tensor_data(t.name)
                dequantize(raw, t.ggml_type, t.shape, name=t.name, dtype=dtype, device=args.device)
            sync(args.device)

        def reference() -> None:
            for t in tensors:
                raw = np.frombuffer(f.tensor_data(t.name), dtype=np.uint8)
                gguf_quants.dequantize(raw.reshape(*reversed(t.shape[1:]), -1), t.ggml_type)

        ours()  # page in the file
        t_ours = best_of(args.repeat, ours)
        t_ref = best_of(1, reference)
        size = sum(t.nbytes for t in tensors) / 1e6
        print(
            f"{path.name}: {size:.0f} MB, ours {t_ours:.2f} s ({size / t_ours:.0f} MB/s, {dtype}), "
            f"gguf-py {t_ref:.2f} s (float32), ratio {t_ref / t_ours:.1f}x"
        )


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--elements", type=int, default=1 << 24, help="elements per synthetic tensor")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-files", action="store_true", help="only the synthetic per-type figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    bench_types(args, dtype)
    if not args.skip_files:
        for name in FILES:
            path = models_dir() / name
            if path.exists():
                bench_file(path, args, dtype)
            else:
                print(f"{name}: missing (eldric-p2p models fetch)")


if __name__ == "__main__":
    main()
