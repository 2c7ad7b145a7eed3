"""The engine's CUDA path: agreement with the CPU result, and decode speed against the HBM bound.

    python benchmarks/bench_gpu.py --write-reference ref.json     # on any machine: the CPU side (native)
    python benchmarks/bench_gpu.py --reference ref.json           # on a CUDA machine: compare and time

The reference file holds, for each reference model, a chat prompt's token ids, the greedy continuation of the
CPU engine with native weights (llama.cpp's arithmetic) and its top logits at every position, plus the top
logits of the CPU engine with dense f32 weights on the same tokens. On the GPU each dense format (f32, bf16,
f16) is fed the same tokens one decode step at a time (teacher forcing, so one early divergence does not hide
the rest) and compared: argmax agreement, largest logit difference over the CPU's top 8, and how long the
GPU's own greedy run stays equal to the CPU's.

Speed: greedy decode tokens/s on the GPU, one session and several batched (`Stage.forward_batch`), against
the bound a decode step cannot beat, (bytes of weights read per step) / (HBM bandwidth), with the bandwidth
measured in the same run by a device-to-device copy. A profile of a few steps says how much of a step the GPU
is busy and how many kernels it launches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from eldric_p2p.data.refmodels import resolve_model
from eldric_p2p.engine.generate import LocalModel, prompt_token_ids

MODELS = {"qwen": "qwen2.5-coder-0.5b-instruct", "gemma": "gemma-3-270m"}
PROMPT = "Write a Python function that checks whether a string is a palindrome, with a short docstring."
TOP = 8


def _steps(model: LocalModel, ids: list[int], n: int, teacher: list[int] | None = None):
    """Greedy decode (or teacher-forced on `teacher`) yielding the logits [vocab] of each position."""
    sid = "bench"
    for stage in model.stages:
        stage.open_session(sid)
    try:
        logits = model.forward(sid, ids, 0, last_only=True)[-1]
        history = list(ids)
        for i in range(n):
            yield logits
            token = teacher[i] if teacher is not None else int(torch.argmax(logits))
            history.append(token)
            if i + 1 < n:
                logits = model.forward(sid, [token], len(history) - 1, last_only=True)[-1]
    finally:
        for stage in model.stages:
            stage.close_session(sid)


def write_reference(path: Path, names: list[str], tokens: int) -> None:
    out: dict = {"prompt": PROMPT, "tokens": tokens, "models": {}}
    for name in names:
        file = resolve_model(MODELS[name])
        native = LocalModel(file, device="cpu", weights="native", max_ctx=1024)
        ids = prompt_token_ids(native.tokenizer, native.metadata, PROMPT, raw=False)
        greedy, top_native = [], []
        for logits in _steps(native, ids, tokens):
            v, i = torch.topk(logits.float(), TOP)
            greedy.append(int(i[0]))
            top_native.append([i.tolist(), v.tolist()])
        del native
        dense = LocalModel(file, device="cpu", weights="f32", max_ctx=1024)
        top_f32 = []
        for logits in _steps(dense, ids, tokens, teacher=greedy):
            v, i = torch.topk(logits.float(), TOP)
            top_f32.append([i.tolist(), v.tolist()])
        del dense
        out["models"][name] = {"file": file.name, "prompt_ids": ids, "greedy": greedy,
                               "top_native": top_native, "top_f32": top_f32}  # fmt: skip
        agree = sum(a[0][0] == b[0][0] for a, b in zip(top_native, top_f32, strict=True))
        print(f"{name}: {len(ids)} prompt tokens, {tokens} greedy; CPU f32 vs native argmax {agree}/{tokens}")
    path.write_text(json.dumps(out))


def compare(model: LocalModel, ref: dict) -> dict:
    """Teacher-forced logits on the reference tokens vs the CPU's top logits, and a free greedy run."""
    ids, greedy = ref["prompt_ids"], ref["greedy"]
    agree_native = agree_f32 = 0
    diff_native = diff_f32 = 0.0
    for logits, (ni, nv), (fi, fv) in zip(
        _steps(model, ids, len(greedy), teacher=greedy), ref["top_native"], ref["top_f32"], strict=True
    ):
        logits = logits.float().cpu()
        top = int(torch.argmax(logits))
        agree_native += top == ni[0]
        agree_f32 += top == fi[0]
        diff_native = max(diff_native, float((logits[ni] - torch.tensor(nv)).abs().max()))
        diff_f32 = max(diff_f32, float((logits[fi] - torch.tensor(fv)).abs().max()))
    free = [int(torch.argmax(lg)) for lg in _steps(model, ids, len(greedy))]
    same = next((i for i, (a, b) in enumerate(zip(free, greedy, strict=True)) if a != b), len(greedy))
    n = len(greedy)
    return {"argmax_vs_native": f"{agree_native}/{n}", "argmax_vs_cpu_f32": f"{agree_f32}/{n}",
            "max_diff_vs_native": round(diff_native, 4), "max_diff_vs_cpu_f32": round(diff_f32, 4),
            "greedy_equal_tokens": f"{same}/{n}"}  # fmt: skip


def hbm_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        torch.cuda.synchronize(device)
        best = max(best, 2 * 10 * a.numel() / (time.perf_counter() - t0))
    del a, b
    return best


def step_bytes(model: LocalModel) -> int:
    """Bytes a decode step reads: every matrix and bias of every stage (norms, embedding row: noise)."""
    total = 0
    for stage in model.stages:
        for lin in stage._linears():
            total += lin.nbytes + (lin.bias.numel() * lin.bias.element_size() if lin.bias is not None else 0)
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_speed(
    model: LocalModel, ids: list[int], tokens: int, batch: int, device: torch.device, *, graphs: bool = True
) -> float:
    """Aggregate greedy decode tokens/s of `batch` sessions stepped together (after their prompts); a lone
    session steps through its CUDA graph unless `graphs` is off (a batch always runs eagerly)."""
    stage = model.stages[0]
    assert len(model.stages) == 1
    saved = stage.graphs
    if not graphs:
        stage.graphs = None
    sids = [f"b{i}" for i in range(batch)]
    for sid in sids:
        stage.open_session(sid, max_ctx=len(ids) + tokens + 8)
    try:
        x = torch.tensor(ids, dtype=torch.int64)
        nxt = [int(torch.argmax(stage.forward(sid, x, 0, last_only=True)[-1])) for sid in sids]
        pos = len(ids)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            if batch == 1:
                out = [stage.forward(sids[0], torch.tensor([nxt[0]]), pos, last_only=True)]
            else:
                out = stage.forward_batch(
                    [(sid, torch.tensor([t]), pos) for sid, t in zip(sids, nxt, strict=True)], last_only=True
                )
            nxt = [int(torch.argmax(o[-1])) for o in out]  # the host needs the token: one sync per step
            pos += 1
        sync(device)
        return batch * tokens / (time.perf_counter() - t0)
    finally:
        for sid in sids:
            stage.close_session(sid)
        stage.graphs = saved


def profile_steps(model: LocalModel, ids: list[int], device: torch.device, steps: int = 8) -> dict:
    """GPU busy time and kernel launches per eager decode step, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    stage = model.stages[0]
    saved, stage.graphs = stage.graphs, None
    stage.open_session("prof")
    try:
        logits = stage.forward("prof", torch.tensor(ids), 0, last_only=True)[-1]
        tok, pos = int(torch.argmax(logits)), len(ids)
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = stage.forward("prof", torch.tensor([tok]), pos, last_only=True)[-1]
                tok, pos = int(torch.argmax(logits)), pos + 1
            sync(device)
            wall = time.perf_counter() - t0
    finally:
        stage.close_session("prof")
        stage.graphs = saved
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels)  # µs
    return {"kernels_per_step": round(len(kernels) / steps),
            "gpu_busy_ms_per_step": round(busy_us / steps / 1e3, 3),
            "wall_ms_per_step": round(wall / steps * 1e3, 3),
            "gpu_busy_share": round(busy_us / 1e6 / wall, 3)}  # fmt: skip


def run_device(ref_path: Path, names: list[str], device_name: str, formats: list[str], tokens: int,
               batches: list[int], speed_formats: list[str]) -> dict:  # fmt: skip
    ref = json.loads(ref_path.read_text())
    device = torch.device(device_name)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "models": {}}  # fmt: skip
    if device.type == "cuda":
        report["hbm_copy_GBps"] = round(hbm_bandwidth(device) / 1e9, 1)
        print(f"device {report['device']}, copy bandwidth {report['hbm_copy_GBps']} GB/s", flush=True)
    for name in names:
        r = ref["models"][name]
        file = resolve_model(MODELS[name])
        report["models"][name] = out = {}
        for fmt in formats:
            try:
                out[fmt] = measure(file, r, fmt, device, tokens, batches, report.get("hbm_copy_GBps"),
                                   fmt in speed_formats)  # fmt: skip
            except Exception as exc:  # a report with the other formats beats none
                out[fmt] = {"error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            print(f"{name} {fmt}: {json.dumps(out[fmt])}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return report


def measure(file: Path, r: dict, fmt: str, device: torch.device, tokens: int, batches: list[int],
            copy_GBps: float | None, speed: bool) -> dict:  # fmt: skip
    """One model in one weight format: agreement, decode speed per batch size, and on CUDA the bound."""
    t0 = time.perf_counter()
    model = LocalModel(file, device=str(device), weights=fmt, max_ctx=1024)
    sync(device)
    row: dict = {"load_s": round(time.perf_counter() - t0, 2)}
    row.update(compare(model, r))
    nbytes = step_bytes(model)
    row["weight_MB_per_step"] = round(nbytes / 1e6, 1)
    if not speed:
        return row
    runs = [(1, True), (1, False), *((b, False) for b in batches if b > 1)]
    for b, graphs in runs:
        if b == 1 and graphs and model.stages[0].graphs is None:
            continue  # no graphs here (CPU, or ELDRIC_CUDA_GRAPHS=0)
        key = f"decode_tok_s_B{b}" + ("_graph" if graphs else "_eager")
        decode_speed(model, r["prompt_ids"], 8, b, device, graphs=graphs)  # warm-up (allocator, cuBLAS)
        row[key] = round(decode_speed(model, r["prompt_ids"], tokens, b, device, graphs=graphs), 1)
    if device.type == "cuda" and copy_GBps:
        bound = copy_GBps * 1e9 / nbytes
        row["bound_tok_s"] = round(bound)
        for key in ("decode_tok_s_B1_graph", "decode_tok_s_B1_eager"):
            if key in row:
                row[key.replace("decode_tok_s", "vs_bound")] = round(row[key] / bound, 4)
        row.update(profile_steps(model, r["prompt_ids"], device))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-reference", type=Path, help="compute the CPU side into this JSON file")
    ap.add_argument("--reference", type=Path, help="the CPU side to compare against")
    ap.add_argument("--models", default="qwen,gemma")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--formats", default="bf16,f32", help="dense formats compared with the CPU")
    ap.add_argument("--speed-formats", default="bf16", help="of those, the ones timed")
    ap.add_argument("--tokens", type=int, default=64, help="reference continuation length")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens timed per decode measurement")
    ap.add_argument("--batches", default="1,8", help="sessions decoding together (beyond 1: eager)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args.write_reference:
        write_reference(args.write_reference, names, args.tokens)
        return
    if not args.reference:
        sys.exit("--reference FILE (from --write-reference) is required")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark compares the CUDA path with the CPU reference")
    report = run_device(args.reference, names, args.device, args.formats.split(","), args.decode_tokens,
                        [int(b) for b in args.batches.split(",")], args.speed_formats.split(","))  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
