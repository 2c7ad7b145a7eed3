"""`eldric-p2p chat MODEL PROMPT`: one generation on a deployed pipeline, through any node."""

from __future__ import annotations

import argparse
import json
import sys
import time

from eldric_p2p.commands.deploy import add_node_arg, cli_auth, node_base, raise_for_error
from eldric_p2p.commands.run import add_sampling_args, sampling_params


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="send one chat prompt to a node")
    p.add_argument("model", help="model id of a deployed pipeline")
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="tokenize the prompt as is, no chat template")
    add_node_arg(p)
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def main(args: argparse.Namespace) -> int:
    import httpx

    from eldric_p2p.api.backends.remote import exception_of
    from eldric_p2p.errors import PeerUnavailable, RemoteProtocolError

    params = sampling_params(args)
    base = node_base(args.node)
    body = {"model": args.model, "prompt": args.prompt, "raw": args.raw, "params": params.to_dict()}
    text: list[str] = []
    token_ids: list[int] = []
    prompt_ids: list[int] = []
    last: dict = {}
    t0 = time.perf_counter()
    try:
        timeout = httpx.Timeout(connect=10.0, read=300.0, write=30.0, pool=10.0)
        url = f"{base}/api/v1/pipeline/generate"
        with httpx.stream("POST", url, json=body, timeout=timeout, auth=cli_auth(args)) as resp:
            if resp.status_code != 200:
                resp.read()
                raise_for_error(resp, base)
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                ev = json.loads(line)
                if "error" in ev:
                    raise exception_of(ev)
                text.append(ev.get("text", ""))
                token_ids += ev.get("token_ids", [])
                prompt_ids = ev.get("prompt_token_ids") or prompt_ids
                if not args.json and ev.get("text"):
                    sys.stdout.write(ev["text"])
                    sys.stdout.flush()
                if ev.get("finish_reason"):
                    last = ev
    except httpx.HTTPError as exc:
        raise PeerUnavailable(f"{base}: {exc}") from exc
    except ValueError as exc:
        raise RemoteProtocolError(f"{base} sent a malformed event: {exc}") from exc
    if not last:
        raise PeerUnavailable(f"{base} ended the stream before the generation finished")
    timings = last.get("timings") or {}
    if args.json:
        print(
            json.dumps(
                {
                    "text": "".join(text),
                    "token_ids": token_ids,
                    "prompt_token_ids": prompt_ids,
                    "finish_reason": last["finish_reason"],
                    "prefill_s": timings.get("prefill_s"),
                    "decode_s": timings.get("decode_s"),
                    "decode_tokens_per_s": timings.get("decode_tokens_per_s"),
                    "usage": last.get("usage"),
                    "wall_s": round(time.perf_counter() - t0, 3),
                    "node": base,
                },
                ensure_ascii=False,
            )
        )
    else:
        sys.stdout.write("\n")
        print(
            f"[{len(prompt_ids)} prompt tokens, prefill {timings.get('prefill_s', 0):.2f} s; "
            f"{len(token_ids)} "
            f"tokens, {timings.get('decode_tokens_per_s', 0):.1f} tokens/s; {last['finish_reason']}]",
            file=sys.stderr,
        )
    return 0
