"""Gateway overhead: time to first token and decode tokens/s through `/v1` beside `eldric-p2p chat`, one run.

    python benchmarks/bench_gateway.py [--tokens 64] [--rounds 3]

Starts a data peer and three workers as real `eldric-p2p node` processes on loopback, deploys the Qwen
reference model across the workers, and then asks the data peer's node (which hosts no stage, so both paths
are routed to the head) the same greedy chat question alternately:

- the request `eldric-p2p chat` makes (`POST /api/v1/pipeline/generate`, NDJSON events);
- `/v1/chat/completions` streamed (SSE chunks) read with httpx, as light a client as the chat path's;
- the official `openai` client on the same endpoint (it builds objects for every chunk: on a 2-core machine
  that client-side work competes with the nodes, so this row measures client cost too).

Time to first token is measured by the client in both cases (chat: the first event with text), decode
tokens/s from the first token to the last. Prints medians and the differences in percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import start, stop  # noqa: E402

from eldric_p2p.paths import models_dir  # noqa: E402

QUESTION = "Write a Python function that checks whether a number is prime."


def via_chat(url: str, model: str, tokens: int) -> tuple[float, float, list[int]]:
    """What `eldric-p2p chat` does: NDJSON events from the node; the first token counts on its line."""
    body = {"model": model, "prompt": QUESTION, "params": {"temperature": 0.0, "max_tokens": tokens}}
    t0 = time.perf_counter()
    first = None
    ids: list[int] = []
    with httpx.stream("POST", f"{url}/api/v1/pipeline/generate", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if not line.strip():
                continue
            ev = json.loads(line)
            if "error" in ev:
                raise SystemExit(ev["error"]["message"])
            if ev.get("token_ids"):
                ids += ev["token_ids"]
                first = first or time.perf_counter()
    t1 = time.perf_counter()
    assert first is not None
    return first - t0, (len(ids) - 1) / (t1 - first), ids


def via_sse(url: str, model: str, tokens: int) -> tuple[float, float, int]:
    """`/v1/chat/completions` streamed, read with httpx like the chat path (no objects built per chunk)."""
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    n = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    t1 = time.perf_counter()
    assert first is not None
    return first - t0, (n - 1) / (t1 - first), n


def via_openai(client: openai.OpenAI, model: str, tokens: int) -> tuple[float, float, str, int]:
    t0 = time.perf_counter()
    first = None
    text, n = "", 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            first = first or time.perf_counter()
        if chunk.usage:
            n = chunk.usage.completion_tokens
    t1 = time.perf_counter()
    assert first is not None
    return first - t0, (n - 1) / (t1 - first), text, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=models_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = args.model.stem
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as d:
        tmp = Path(d)
        try:
            p, data = start("data", tmp, ["--models", str(args.model), "--no-worker"])
            procs.append(p)
            for name in ("w1", "w2", "w3"):
                p, _ = start(name, tmp, ["--peer", data.removeprefix("http://"), "--device", "cpu"])
                procs.append(p)
            r = httpx.post(f"{data}/api/v1/pipeline/deploy", timeout=900,
                           json={"model": model, "workers": ["w1", "w2", "w3"], "max_ctx": 1024})  # fmt: skip
            if r.status_code != 200:
                raise SystemExit(f"deploy failed: {r.text}")
            client = openai.OpenAI(base_url=f"{data}/v1", api_key="-")
            via_chat(data, model, 8)  # warm up both paths: first forwards, links opened
            via_openai(client, model, 8)
            chat, sse, oai = [], [], []
            for _ in range(args.rounds):
                chat.append(via_chat(data, model, args.tokens))
                sse.append(via_sse(data, model, args.tokens))
                oai.append(via_openai(client, model, args.tokens))
        finally:
            stop(procs)

    def med(rows: list, i: int) -> float:
        return statistics.median(r[i] for r in rows)

    c_ttft, c_tps = med(chat, 0), med(chat, 1)
    same = len(chat[0][2]) == oai[0][3] == sse[0][2]
    print(f"model {model}, 3-stage pipeline, {args.tokens} tokens greedy, {args.rounds} rounds (medians)")
    print(f"  {'eldric chat API':26} ttft {c_ttft * 1000:7.1f} ms   decode {c_tps:6.2f} tokens/s")
    for label, rows in (("/v1 SSE read with httpx", sse), ("/v1 with the openai client", oai)):
        ttft, tps = med(rows, 0), med(rows, 1)
        print(
            f"  {label:26} ttft {ttft * 1000:7.1f} ms   decode {tps:6.2f} tokens/s"
            f"   vs chat: ttft {100 * (ttft / c_ttft - 1):+.1f}%, decode {100 * (tps / c_tps - 1):+.1f}%"
        )
    print(f"  same token count on every path: {same}")


if __name__ == "__main__":
    main()
