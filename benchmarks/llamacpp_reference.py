"""Record llama.cpp's tokenization, greedy continuations and top logits as JSON fixtures for the tests.

    python benchmarks/llamacpp_reference.py [--models qwen gemma] [--out tests/fixtures]

Needs `llama-cpp-python` (the `reference` extra). For each reference model it writes
`tests/fixtures/llamacpp_<name>.json` holding:

- `tokenize`: the corpus below through `Llama.tokenize(text, add_bos=True, special=...)` (add_bos=True means
  "as the file asks", like `Tokenizer.encode(add_bos=None)`);
- `prompts`: for each prompt (raw text tokenized with add_bos=True, or messages rendered with `render_chat`,
  which writes BOS itself, tokenized with add_bos=False), the prompt ids, the greedy
  continuation of `--n-predict` tokens (argmax of llama.cpp's logits, not stopped at end-of-turn; `first_stop`
  says where the model's stop token came first), and teacher-forced top-5 logits (ids, values) at every
  position of prompt + continuation: entry i predicts token i+1.

The tests read these files, so they never need llama.cpp.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from eldric_p2p.data.gguf_index import read_index
from eldric_p2p.engine.chat import render_chat
from eldric_p2p.engine.tokenizer import Tokenizer
from eldric_p2p.paths import models_dir

REFERENCE = {
    "qwen": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma": "gemma-3-270m-q4_k_m.gguf",
}

CORPUS = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "   leading spaces and trailing   ",
    "hello\n\nworld\n",
    "\n\n\n\n\tindented\n\t\ttwice\r\n",
    "tabs\tbetween\t\twords\t",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\n#include <stdio.h>",
    "x = {'a': [1, 2, 3], \"b\": None}  # comment    with     runs",
    "1234567890 3.14159 1e-9 0x1F 1,000,000",
    "I'm sure they've said it's what we'd do, WE'LL SEE.",
    "日本語のテキストと中文文本混合。",
    "Привет, как дела? Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم، هذا نص عربي.",
    "emoji: 🤖🚀 👨‍👩‍👧‍👦 🇩🇪 ❤️ 😀😃",
    "Ünïcödé àccénts ñ ß ø å æ œ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after bos <eos>",
    '<tool_call>{"name": "f"}</tool_call>',
    "<table><tr><td>cell</td></tr></table>",
    "                                        forty spaces",
    "a\u00a0non-breaking\u2009thin\u3000ideographic space",
    "Mixed 😀 text\twith\n\nall of it: ελληνικά, עברית, हिन्दी, ไทย, 한국어",
]
SPECIAL_OFF = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>",
]

RAW_PROMPTS = [
    "The capital of France is",
    'def quicksort(arr):\n    """Sort a list with quicksort."""\n',
    "Once upon a time, in a small village by the sea,",
    "# A Python function that checks whether a number is prime\nimport math\n\n",
    "Translate to French: The weather is nice today, and we are going to the market.\nFrench:",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "Write a haiku about the ocean."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash table is in two sentences."}],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "List three colors of the rainbow."},
     {"role": "assistant", "content": "Red, orange, yellow."},
     {"role": "user", "content": "And the next three?"}],
    [{"role": "user", "content": "What is the difference between a list and a tuple in Python?"}],
]  # fmt: skip

TOP_K = 5


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def record(name: str, path: Path, *, n_predict: int, threads: int, seed: int) -> dict[str, Any]:
    # llama.cpp's OpenMP threads spin while they wait, which starves them when other processes share cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp

    metadata = read_index(path).metadata
    tok = Tokenizer.from_gguf_metadata(metadata)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
        logits_all=True, seed=seed, verbose=False,
    )  # fmt: skip
    tokenize = [
        {"text": t, "special": True, "ids": llm.tokenize(t.encode(), add_bos=True, special=True)}
        for t in CORPUS
    ]
    tokenize += [
        {"text": t, "special": False, "ids": llm.tokenize(t.encode(), add_bos=True, special=False)}
        for t in SPECIAL_OFF
    ]
    prompts = []
    for kind, prompt in [("raw", p) for p in RAW_PROMPTS] + [("chat", m) for m in CHAT_PROMPTS]:
        # raw: BOS as the file asks; chat: the template writes BOS itself (HF's convention)
        text, add_bos = (prompt, True) if kind == "raw" else (render_chat(metadata, prompt), False)
        ids = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        out: list[int] = []
        for _ in range(n_predict):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])  # also evaluates the last token, so every position has logits
        dt = time.perf_counter() - t0
        scores = np.asarray(llm.scores[: llm.n_tokens], dtype=np.float32)  # [T, vocab]
        assert scores.shape[0] == len(ids) + n_predict
        part = np.argpartition(-scores, TOP_K, axis=1)[:, :TOP_K]  # [T, 5], unordered
        pvals = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-pvals, axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)  # [T, 5], best first
        vals = np.take_along_axis(pvals, order, axis=1)
        first_stop = next((i for i, t in enumerate(out) if t in tok.stop_ids), None)
        prompts.append({
            "kind": kind,
            "prompt": prompt,
            "text": text,
            "add_bos": add_bos,
            "prompt_ids": ids,
            "greedy_ids": out,
            "greedy_text": llm.detokenize(out).decode("utf-8", errors="replace"),
            "first_stop": first_stop,
            "top_ids": top.tolist(),
            "top_logits": np.round(vals, 4).tolist(),
            "seconds": round(dt, 3),
        })  # fmt: skip
        print(f"{name}: {kind} prompt of {len(ids)} tokens -> {json.dumps(prompts[-1]['greedy_text'][:60])}",
              file=sys.stderr)  # fmt: skip
    llm.close()
    positions = sum(len(p["top_ids"]) for p in prompts)
    return {
        "model": path.name,
        "sha256": sha256_file(path),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "threads": threads,
        "seed": seed,
        "n_predict": n_predict,
        "positions": positions,
        "tokenize": tokenize,
        "prompts": prompts,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(REFERENCE), choices=list(REFERENCE))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    ap.add_argument("--n-predict", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        path = models_dir() / REFERENCE[name]
        if not path.exists():
            print(f"missing {path}: run `eldric-p2p models fetch`", file=sys.stderr)
            return 1
        data = record(name, path, n_predict=args.n_predict, threads=args.threads, seed=args.seed)
        dest = args.out / f"llamacpp_{name}.json"
        dest.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"{dest}: {data['positions']} positions, {dest.stat().st_size / 1024:.0f} KiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
