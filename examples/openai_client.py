"""Talk to any eldric-p2p node with the official `openai` package (pip install openai).

    python examples/openai_client.py                          # node on 127.0.0.1:8470, first model it lists
    python examples/openai_client.py --base-url http://lab-gpu-1:8470/v1 --model MODEL
    ELDRIC_API_KEY=secret python examples/openai_client.py     # a node started with --api-key secret
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from openai import OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8470/v1")
    p.add_argument("--model", default=None, help="default: the first model the node lists")
    p.add_argument("--prompt", default="Write a haiku about peer-to-peer networks.")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()

    # Any non-empty key works when the node has no --api-key.
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("ELDRIC_API_KEY", "none"))
    models = [m.id for m in client.models.list().data]
    print("models in reach:", ", ".join(models) or "none (deploy one first: eldric-p2p deploy MODEL)")
    model = args.model or (models[0] if models else None)
    if model is None:
        return 1
    messages = [
        {"role": "system", "content": "You are concise."},
        {"role": "user", "content": args.prompt},
    ]

    # 1. One response with usage counts.
    t0 = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0
    )
    print(f"\n--- not streaming ({time.perf_counter() - t0:.2f} s) ---")
    print(reply.choices[0].message.content)
    print(f"[finish: {reply.choices[0].finish_reason}, usage: {reply.usage.prompt_tokens} prompt + "
          f"{reply.usage.completion_tokens} completion tokens]")  # fmt: skip

    # 2. The same request streamed token by token (same text: temperature 0 is greedy).
    print("\n--- streaming ---")
    t0 = time.perf_counter()
    first = None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
        if chunk.usage:
            n = chunk.usage.completion_tokens
            total = time.perf_counter() - t0
            print(f"\n[{n} tokens; first after {(first or t0) - t0:.2f} s; {total:.2f} s in all]")

    # 3. A stop string: the text ends right before it.
    cut = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stop=["\n"]
    )
    print(f"\n--- first line only (stop='\\n') ---\n{cut.choices[0].message.content}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
