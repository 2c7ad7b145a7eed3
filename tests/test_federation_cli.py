"""A federation made only with the CLI, as a user would: `federation init`, `invite`, `join`, then `deploy`
and `chat` (signed with `--data-dir` by themselves) equal to `run`, and a stranger's deploy refused.

Slow (Qwen in four processes): `pytest -m slow tests/test_federation_cli.py`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_multiprocess import CLI, Proc, cli, cli_json

pytestmark = [pytest.mark.slow, pytest.mark.models]


def node(tmp: Path, name: str, *extra: str) -> Proc:
    return Proc(name, [*CLI, "node", "--name", name, "--data-dir", str(tmp / name), "--listen", "127.0.0.1:0",
                       "--no-mdns", *extra], tmp / f"{name}.log")  # fmt: skip


def ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


def test_three_workers_joined_with_the_cli_deploy_and_chat_equal_to_run(
    tmp_path: Path, qwen_path: Path
) -> None:
    prompt = "Write a Python function that adds two numbers."
    ref = cli_json("run", str(qwen_path), prompt, "--max-tokens", "24", "--ctx", "512")
    model_id = qwen_path.stem
    admin_dir = str(tmp_path / "data")
    assert "created: id ef" in ok("federation", "init", "campus", "--data-dir", admin_dir)
    procs: dict[str, Proc] = {}
    try:
        procs["data"] = node(tmp_path, "data", "--models", str(qwen_path), "--no-worker")
        data_url = procs["data"].wait_url()
        for name in ("w1", "w2", "w3"):
            token = ok("federation", "invite", "--data-dir", admin_dir).strip()
            assert token.startswith("epi1.") and "\n" not in token
            out = ok("federation", "join", token, "--data-dir", str(tmp_path / name), "--name", name)
            assert "joined federation 'campus'" in out and "as a member" in out
            again = cli("federation", "join", token, "--data-dir", str(tmp_path / f"{name}-thief"))
            assert again.returncode == 1 and "no uses left" in again.stderr  # one use
        for name, mem in (("w1", "480MiB"), ("w2", "320MiB"), ("w3", "480MiB")):
            procs[name] = node(tmp_path, name, "--memory", mem, "--device", "cpu", "--peer",
                               data_url.removeprefix("http://"))  # fmt: skip
        for name in ("w1", "w2", "w3"):
            procs[name].wait_url()
            log = procs[name].log.read_text()
            assert "federation 'campus'" in log and ": member;" in log, log
        deadline = time.monotonic() + 60
        while True:  # the data node learns of the workers from their polls
            st = cli_json("status", "--node", data_url, "--data-dir", admin_dir)
            if {p["name"] for p in st["peers"]} >= {"w1", "w2", "w3"}:
                break
            assert time.monotonic() < deadline, st["peers"]
            time.sleep(0.5)

        # a stranger (no federation in its data dir) is refused, with what it lacks
        stranger = {**os.environ, "ELDRIC_P2P_HOME": str(tmp_path / "stranger")}
        r = subprocess.run([*CLI, "deploy", model_id, "--node", data_url], env=stranger,
                                         capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 1 and "admin" in r.stderr and "signed request" in r.stderr, r.stderr
        # a member is no admin
        r = cli("deploy", model_id, "--node", data_url, "--data-dir", str(tmp_path / "w1"))
        assert r.returncode == 1 and "not an admin" in r.stderr, r.stderr

        dep = cli_json("deploy", model_id, "--workers", "w1,w2,w3", "--node", data_url, "--ctx", "512",
                       "--data-dir", admin_dir)  # fmt: skip
        assert [(s["worker"], s["state"]) for s in dep["stages"]] == [
            (w, "ready") for w in ("w1", "w2", "w3")
        ]
        out = cli_json("chat", model_id, prompt, "--node", procs["w2"].url, "--max-tokens", "24",
                       "--data-dir", str(tmp_path / "w2"))  # fmt: skip
        assert out["token_ids"] == ref["token_ids"] and out["text"] == ref["text"]

        status = json.loads(ok("federation", "status", "--data-dir", admin_dir, "--json"))
        assert len(status["members"]) == 4 and status["admin"] and status["root_key"]
        w3 = next(pid for pid, m in status["members"].items() if m["name"] == "w3")
        ok("federation", "revoke", w3, "--data-dir", admin_dir)
        deadline = time.monotonic() + 20
        while True:  # the coordinator finds w3's stage lost and re-plans without it
            log = procs["data"].log.read_text()
            st = cli_json("status", "--node", data_url, "--data-dir", admin_dir)
            on = {s["worker"] for d in st["pipelines"] for s in d["stages"]}
            if re.search(r"lost stage 2 \(.*\) on w3: re-planning", log) and "w3" not in on:
                break
            assert time.monotonic() < deadline, (st["pipelines"], log[-3000:])
            time.sleep(0.5)
        assert "w3" not in {p["name"] for p in st["peers"]}
        assert w3 in json.loads(ok("federation", "status", "--data-dir", admin_dir, "--json"))["revoked"]
    finally:
        for p in procs.values():
            p.stop()
