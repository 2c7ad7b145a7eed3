"""Capture llama.cpp's intermediate tensors, to find where our arithmetic and llama.cpp's part ways.

    python benchmarks/llamacpp_tensors.py MODEL.gguf --steps "[[2, 818, 5279], [506]]" --out dump.pkl
    python benchmarks/llamacpp_tensors.py --ops-fixture tests/fixtures/llamacpp_ops.npz

llama.cpp (through llama-cpp-python, the `reference` extra) evaluates each step (a list of token ids, one
llama_decode call: several ids take its batched path, one id its single-token path) with an eval callback that
copies every float32/float16 tensor of the graph as it is computed. The pickle holds, per step,
{"tensors": [(name, ggml_op, ggml_type, ne, ndarray)], "logits": ndarray}. Tensor names are llama.cpp's
("attn_norm-3", "Qcur-3", "kq_soft_max-3", "ffn_out-3", ...); arrays have numpy's axis order (ne reversed).

`--ops-fixture` records small inputs/outputs of the operations `eldric_p2p.engine._ggmlops` reproduces
(RMS norm, rope, attention, GEGLU from Gemma 3; SwiGLU from Qwen2.5) for both of llama.cpp's paths, so a
fast test can check that they stay bit-exact without llama.cpp installed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_MAX_OP_PARAMS = 4, 10, 64, 64
_NUMPY = {0: np.float32, 1: np.float16}  # ggml type ids we copy


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml.h), enough of it to read a CPU tensor's name, shape, strides and data."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _copy(t: GGMLTensor) -> np.ndarray | None:
    dtype = _NUMPY.get(t.type)
    if dtype is None or not t.data:
        return None
    ne, nb = list(t.ne), list(t.nb)
    item = np.dtype(dtype).itemsize
    span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + item
    flat = np.frombuffer((ctypes.c_char * span).from_address(t.data), dtype=np.uint8)
    elems = flat[: span - span % item].view(dtype)
    view = np.lib.stride_tricks.as_strided(elems, shape=ne[::-1], strides=nb[::-1])
    return np.array(view, dtype=np.float32)


def capture(model: Path, steps: list[list[int]], *, threads: int = 2) -> list[dict[str, Any]]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp

    seen: list[tuple[str, int, int, tuple[int, ...], np.ndarray | None]] = []

    @ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
    def on_tensor(ptr: int, ask: bool, _user: int) -> bool:
        if not ask:
            t = GGMLTensor.from_address(ptr)
            seen.append((t.name.decode(errors="replace"), t.op, t.type, tuple(t.ne), _copy(t)))
        return True

    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=512,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    params = llm.context_params
    params.cb_eval = on_tensor
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    out, pos = [], 0
    try:
        for ids in steps:
            seen.clear()
            batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
            try:
                batch.n_tokens = len(ids)
                for i, tok in enumerate(ids):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos + i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, 1
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits(ctx), shape=(len(ids), n_vocab)
                ).copy()
            finally:
                llama_cpp.llama_batch_free(batch)
            out.append({"tensors": list(seen), "logits": logits})
            pos += len(ids)
    finally:
        llama_cpp.llama_free(ctx)
        llm.close()
    return out


def _get(step: dict[str, Any], name: str, op: int | None = None) -> np.ndarray:
    for n, o, _t, _ne, a in step["tensors"]:
        if n == name and (op is None or o == op) and a is not None:
            return a
    raise KeyError(name)


def ops_fixture(dest: Path) -> None:
    from eldric_p2p.paths import models_dir

    GGML_OP_ROPE = 48
    fixtures = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    arrays: dict[str, np.ndarray] = {}
    for name, fname, layer in (
        ("gemma", "gemma-3-270m-q4_k_m.gguf", 5),
        ("qwen", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 3),
    ):
        prompt = json.loads((fixtures / f"llamacpp_{name}.json").read_text())["prompts"][0]
        ids = prompt["prompt_ids"]
        steps = capture(models_dir() / fname, [ids, prompt["greedy_ids"][:1]])
        for si, step in enumerate(steps):  # 0: batched path, 1: single-token path
            key = f"{name}/{si}/"
            pos0 = 0 if si == 0 else len(ids)
            S = pos0 + len(step["logits"])
            q_in = "Qcur_normed" if name == "gemma" else "Qcur"
            arrays[key + "rope_in"] = np.ascontiguousarray(
                [a for n, o, _t, _ne, a in step["tensors"] if n == f"{q_in}-{layer}" and o != GGML_OP_ROPE][
                    -1
                ][0]
            )
            arrays[key + "rope_out"] = np.ascontiguousarray(_get(step, f"Qcur-{layer}", GGML_OP_ROPE)[0])
            names = [t[0] for t in step["tensors"]]
            i_kq = names.index(f"kq-{layer}")
            arrays[key + "q"] = np.ascontiguousarray(step["tensors"][i_kq - 1][4][0].transpose(1, 0, 2))
            arrays[key + "k"] = np.ascontiguousarray(
                step["tensors"][i_kq - 3][4][0][:, :S].astype(np.float16)
            )
            i_kqv = names.index(f"kqv-{layer}")
            v_t = [
                t for t in step["tensors"][:i_kqv] if t[0].startswith(f"cache_v_l{layer} (view) (permuted)")
            ][-1][4]
            arrays[key + "v"] = np.ascontiguousarray(v_t[0][:, :, :S].transpose(0, 2, 1).astype(np.float16))
            arrays[key + "attn_out"] = _get(step, f"kqv_out-{layer}").reshape(len(step["logits"]), -1)
            act = "ffn_geglu" if name == "gemma" else "ffn_swiglu"
            keep = slice(
                0, 4096
            )  # a slice keeps the fixture small; the tail of an odd length is tested elsewhere
            arrays[key + "gate"] = _get(step, f"ffn_gate-{layer}").reshape(-1)[keep]
            arrays[key + "up"] = _get(step, f"ffn_up-{layer}").reshape(-1)[keep]
            arrays[key + "act"] = _get(step, f"{act}-{layer}").reshape(-1)[keep]
            i_prev = names.index(f"l_out-{layer - 1}")  # the layer's input; RMS_NORM (op 25) of it follows
            arrays[key + "norm_in"] = step["tensors"][i_prev][4].reshape(len(step["logits"]), -1)
            arrays[key + "norm_out"] = next(t[4] for t in step["tensors"][i_prev:] if t[1] == 25).reshape(
                len(step["logits"]), -1
            )
            arrays[key + "meta"] = np.array([layer, pos0], dtype=np.int64)
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dest, **arrays)
    print(f"{dest}: {len(arrays)} arrays, {dest.stat().st_size / 1024:.0f} KiB", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--steps", default="[[2, 818, 5279, 529, 7001, 563], [506], [5279]]")
    ap.add_argument("--out", type=Path, default=Path("llamacpp_tensors.pkl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ops-fixture", type=Path, help="write the small bit-exactness fixture of _ggmlops here")
    args = ap.parse_args(argv)
    if args.ops_fixture:
        ops_fixture(args.ops_fixture)
        return 0
    if args.model is None:
        ap.error("give a MODEL.gguf or --ops-fixture")
    steps = json.loads(args.steps)
    result = capture(args.model, steps, threads=args.threads)
    with args.out.open("wb") as f:
        pickle.dump(result, f)
    print(f"{args.out}: {[len(s['tensors']) for s in result]} tensors per step", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
