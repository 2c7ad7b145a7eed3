"""`eldric-p2p run MODEL PROMPT`: one process, no network — the reference path every pipeline must match."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(max) (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed: same seed, same output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from eldric_p2p.engine.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model locally in one process (the reference path)")
    p.add_argument("model", help="a .gguf file, or a reference model name (see `eldric-p2p models list`)")
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="tokenize the prompt as is, no chat template")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument(
        "--weights",
        default="auto",
        help="auto | native (GGUF blocks, CPU kernels) | f32 | bf16 | f16 "
        "(default auto: native on CPU, bf16 on CUDA)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence (benchmarks)"
    )
    p.add_argument(
        "--splits", default="", help="split into stages at these layers, e.g. 8,16 (tests split invariance)"
    )


def main(args: argparse.Namespace) -> int:
    import torch

    from eldric_p2p.data.refmodels import resolve_model
    from eldric_p2p.engine.generate import LocalModel, prompt_token_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    params = sampling_params(args)
    path = resolve_model(args.model)
    t0 = time.perf_counter()
    splits = [int(s) for s in args.splits.split(",") if s.strip()]
    model = LocalModel(path, device=args.device, weights=args.weights, max_ctx=args.ctx, splits=splits)
    load_s = time.perf_counter() - t0
    ids = prompt_token_ids(model.tokenizer, model.metadata, args.prompt, raw=args.raw)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = model.generate(ids, params, on_text=None if args.json else show, ignore_eos=args.ignore_eos)
    if args.json:
        out = result.as_json()
        out.update(
            load_s=round(load_s, 3),
            weights=model.stages[0].fmt,
            device=args.device,
            threads=torch.get_num_threads(),
        )
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(
            f"[{len(ids)} prompt tokens, prefill {result.prefill_s:.2f} s; {len(result.token_ids)} tokens, "
            f"{result.decode_tokens_per_s:.1f} tokens/s; {result.finish_reason}]",
            file=sys.stderr,
        )
    return 0
