"""Real `eldric-p2p node` processes on loopback: a data peer and several workers, driven by the CLI.

Slow (each test loads a reference model in several processes): `pytest -m slow tests/test_multiprocess.py`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from eldric_p2p.data.gguf_index import read_index

pytestmark = [pytest.mark.slow, pytest.mark.models]

CLI = [sys.executable, "-m", "eldric_p2p"]
MiB = 1 << 20


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self.f = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            argv, stdout=self.f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.url = ""

    def wait_url(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"serving on (http://\S+)", self.log.read_text())
            if m:
                self.url = m.group(1)
                return self.url
            if self.p.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.f.close()


@contextmanager
def swarm(tmp: Path, model: Path, memories: dict[str, str]) -> Iterator[dict[str, Proc]]:
    """A data peer serving `model` (no worker) and one worker per `memories` entry, bootstrapped from it."""
    procs: dict[str, Proc] = {}
    try:
        data = Proc(
            "data",
            [
                *CLI,
                "node",
                "--name",
                "data",
                "--data-dir",
                str(tmp / "data"),
                "--listen",
                "127.0.0.1:0",
                "--models",
                str(model),
                "--no-worker",
                "--no-mdns",
            ],
            tmp / "data.log",
        )
        procs["data"] = data
        host_port = data.wait_url().removeprefix("http://")
        for name, mem in memories.items():
            procs[name] = Proc(
                name,
                [
                    *CLI,
                    "node",
                    "--name",
                    name,
                    "--data-dir",
                    str(tmp / name),
                    "--listen",
                    "127.0.0.1:0",
                    "--memory",
                    mem,
                    "--peer",
                    host_port,
                    "--no-mdns",
                    "--device",
                    "cpu",
                ],
                tmp / f"{name}.log",
            )
        for name in memories:
            procs[name].wait_url()
        wait_until_all_know_each_other(procs)
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def wait_until_all_know_each_other(procs: dict[str, Proc], timeout: float = 60) -> None:
    """Workers learn of each other through the data peer's listing, a poll or two after they start: a
    deploy asked of a worker before then would not know the others yet."""
    import httpx

    deadline = time.monotonic() + timeout
    for name, proc in procs.items():
        others = set(procs) - {name}
        while True:
            try:
                peers = httpx.get(f"{proc.url}/api/v1/peers", timeout=5).json()["peers"]
                seen = {p.get("name") for p in peers}
            except (httpx.HTTPError, ValueError, KeyError):
                seen = set()
            if others <= seen:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} knows only {sorted(seen)} after {timeout:.0f} s")
            time.sleep(0.2)


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def cli_json(*args: str, timeout: float = 600) -> Any:
    r = cli(*args, "--json", timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def check_fetched_only_own_layers(model: Path, dep: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Each worker fetched its tensors' bytes plus the header and the table, not the file."""
    index = read_index(model)
    assert index.file_size is not None
    report = []
    for s in dep["stages"]:
        own = sum(t.nbytes for t in index.assignment_tensors(s["start"], s["end"]))
        overhead = index.data_offset + 2 * MiB  # header, tensor table JSON, alignment padding
        assert own <= s["bytes_fetched"] <= own + overhead, (s, own)
        report.append((s["worker"], s["bytes_fetched"], own))
    return report


def test_qwen_three_workers_3_2_3_split_and_chat_equals_run(tmp_path: Path, qwen_path: Path) -> None:
    prompt = "Write a Python function that adds two numbers."
    ref = cli_json("run", str(qwen_path), prompt, "--max-tokens", "40", "--ctx", "1024")
    with swarm(tmp_path, qwen_path, {"w1": "480MiB", "w2": "320MiB", "w3": "480MiB"}) as procs:
        model_id = qwen_path.stem
        dep = cli_json(
            "deploy", model_id, "--workers", "w1,w2,w3", "--node", procs["data"].url, "--ctx", "1024"
        )
        assert [(s["worker"], s["start"], s["end"]) for s in dep["stages"]] == [
            ("w1", 0, 9),
            ("w2", 9, 15),
            ("w3", 15, 24),
        ]
        report = check_fetched_only_own_layers(qwen_path, dep)
        print("bytes fetched per worker (fetched, own tensors):", report)
        # through the data peer's node (no worker there: it routes to the head over HTTP) and the head's own
        for node in (procs["data"].url, procs["w1"].url):
            out = cli_json("chat", model_id, prompt, "--node", node, "--max-tokens", "40")
            assert out["token_ids"] == ref["token_ids"] and out["text"] == ref["text"]
            assert out["prompt_token_ids"] == ref["prompt_token_ids"]
            assert out["decode_tokens_per_s"] > 0
        st = cli_json("status", "--node", procs["data"].url)
        assert st["node"]["name"] == "data" and {p["name"] for p in st["peers"]} == {"w1", "w2", "w3"}
        (pipe,) = st["pipelines"]
        assert pipe["state"] == "ready" and [s["layers"] for s in pipe["stages"]] == [9, 6, 9]


def test_gemma_two_workers_and_a_deploy_that_does_not_fit(tmp_path: Path, gemma_path: Path) -> None:
    prompt = "The capital of France is"
    ref = cli_json("run", str(gemma_path), prompt, "--raw", "--max-tokens", "30", "--ctx", "512")
    with swarm(tmp_path, gemma_path, {"g1": "600MiB", "g2": "600MiB", "tiny": "64MiB"}) as procs:
        model_id = gemma_path.stem
        r = cli("deploy", model_id, "--workers", "g1,tiny", "--node", procs["g1"].url, "--ctx", "512")
        assert r.returncode == 1
        assert "does not fit" in r.stderr and "MiB free in total" in r.stderr and "tiny layers" in r.stderr, (
            r.stderr
        )
        dep = cli_json("deploy", model_id, "--workers", "g1,g2", "--node", procs["g1"].url, "--ctx", "512")
        assert [(s["worker"], s["start"], s["end"]) for s in dep["stages"]] == [("g1", 0, 9), ("g2", 9, 18)]
        print("bytes fetched per worker:", check_fetched_only_own_layers(gemma_path, dep))
        out = cli_json("chat", model_id, prompt, "--raw", "--node", procs["tiny"].url, "--max-tokens", "30")
        assert out["token_ids"] == ref["token_ids"] and out["text"] == ref["text"]


def test_killing_a_middle_worker_mid_generation(tmp_path: Path, qwen_path: Path) -> None:
    """w2 is killed (SIGKILL) while `chat` streams: the coordinator finds its stage lost, re-plans onto the
    survivors w1 and w3, and the data node resumes the request there. The client sees a pause, no error, and
    the same text as one process."""
    prompt, tokens = "Count from 1 to 500, one number per line.", 80
    ref = cli_json("run", str(qwen_path), prompt, "--max-tokens", str(tokens), "--ctx", "1024")
    with swarm(tmp_path, qwen_path, {"w1": "480MiB", "w2": "320MiB", "w3": "480MiB"}) as procs:
        model_id = qwen_path.stem
        cli_json("deploy", model_id, "--workers", "w1,w2,w3", "--node", procs["data"].url, "--ctx", "1024")
        chat = subprocess.Popen(
            [*CLI, "chat", model_id, prompt, "--node", procs["data"].url, "--max-tokens", str(tokens)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert chat.stdout is not None
        head = chat.stdout.read(12)  # it is generating
        procs["w2"].p.kill()
        rest, err = chat.communicate(timeout=240)
        assert chat.returncode == 0, err
        assert (head + rest).strip() == ref["text"].strip()
        for name in ("data", "w1", "w3"):
            assert procs[name].p.poll() is None, f"{name} died"
        st = cli_json("status", "--node", procs["data"].url)
        (pipe,) = st["pipelines"]
        assert [s["worker"] for s in pipe["stages"]] == ["w1", "w3"]
        assert "recovered from" in procs["data"].log.read_text()
        # the new pipeline serves fresh requests through any node, equal to one process
        ref = cli_json("run", str(qwen_path), "Say hello.", "--max-tokens", "16", "--ctx", "1024")
        out = cli_json("chat", model_id, "Say hello.", "--node", procs["w3"].url, "--max-tokens", "16")
        assert out["token_ids"] == ref["token_ids"]


@pytest.mark.parametrize("victim", ["w2", "w3"], ids=["middle", "tail"])
def test_a_stage_killed_during_a_streamed_chat_is_replaced_by_the_spare(
    tmp_path: Path, qwen_path: Path, victim: str
) -> None:
    """Qwen in 3 stages (w1, w2, w3) plus a spare w4; `kill -9` of the middle (or the tail) while
    /v1/chat/completions streams 128 tokens: the stream ends with no error event, and its text and token
    count equal `eldric-p2p run`'s; the spare took the lost stage."""
    import httpx

    prompt, tokens = "Count from 1 to 500, one number per line.", 128
    ref = cli_json("run", str(qwen_path), prompt, "--max-tokens", str(tokens), "--ctx", "1024")
    mem = {"w1": "480MiB", "w2": "480MiB", "w3": "480MiB", "w4": "480MiB"}
    with swarm(tmp_path, qwen_path, mem) as procs:
        model_id = qwen_path.stem
        cli_json("deploy", model_id, "--workers", "w1,w2,w3", "--node", procs["data"].url, "--ctx", "1024")
        ask = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        chunks: list[dict[str, Any]] = []
        with httpx.stream("POST", f"{procs['data'].url}/v1/chat/completions", json=ask, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 4:
                        procs[victim].p.kill()
        assert not any("error" in ch for ch in chunks), chunks[-1]
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        assert text == ref["text"]
        assert chunks[-1]["usage"]["completion_tokens"] == len(ref["token_ids"])
        timings = next(ch["timings"] for ch in chunks if ch.get("timings"))
        assert timings["recoveries"] >= 1  # a retry onto the old head before the re-plan lands counts too
        print(f"{victim} killed: pause {timings['recovery_pause_s'] * 1000:.0f} ms, "
              f"{timings['recoveries']} resume(s)")  # fmt: skip
        st = cli_json("status", "--node", procs["data"].url)
        (pipe,) = st["pipelines"]
        want = ["w1", "w4", "w3"] if victim == "w2" else ["w1", "w2", "w4"]
        assert [s["worker"] for s in pipe["stages"]] == want
