"""Churn in the NAT lab: a worker behind NAT B dies mid-generation and a spare at site A takes its range.

Needs root, `ip`, `nft` and `ethtool`: `pytest -m root tests/test_natlab_recovery.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from eldric_p2p.engine.synthetic import write_synthetic_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tunnel"))
import natlab  # noqa: E402

pytestmark = pytest.mark.root

CLI = [sys.executable, "-m", "eldric_p2p"]
PROMPT = "the cat sat on"


@pytest.fixture
def lab() -> Iterator[natlab.Lab]:
    why = natlab.missing_requirements()
    if why is not None:
        pytest.skip(why)
    with natlab.natlab(prefix="elpr", delay_ms=5) as lab:
        yield lab
    assert natlab.lab_namespaces("elpr") == [], "the lab was not torn down"


def run_in(lab: natlab.Lab, role: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.argv(role, [*CLI, *argv]), capture_output=True, text=True, timeout=timeout)


def ok_in(lab: natlab.Lab, role: str, *argv: str, timeout: float = 300) -> str:
    r = run_in(lab, role, *argv, timeout=timeout)
    assert r.returncode == 0, (role, argv[:3], r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


STREAM = """
import json, sys, httpx
body = {"model": sys.argv[2], "prompt": sys.argv[3], "raw": True,
        "params": {"temperature": 0, "max_tokens": int(sys.argv[4])}}
with httpx.stream("POST", sys.argv[1] + "/api/v1/pipeline/generate", json=body, timeout=300) as resp:
    for line in resp.iter_lines():
        if line.strip():
            print(line, flush=True)
"""


def test_a_worker_at_site_b_killed_mid_generation_is_replaced_by_a_site_a_spare(
    lab: natlab.Lab, tmp_path: Path
) -> None:
    """No federation here: the relay lab of tests/test_natlab.py plus a spare worker at site A. b1 dies after
    3 of 96 tokens; the coordinator (the public data node) re-plans b1's range onto the spare, and the data
    node, which took the request, resumes it there: the tokens equal `run`'s."""
    models = tmp_path / "models"
    models.mkdir()
    gguf = write_synthetic_gguf(models / "tiny.gguf", arch="qwen2", n_layers=8, hidden=64, ffn=128, seed=3)
    tokens = 96
    ref = json.loads(subprocess.run([*CLI, "run", str(gguf), PROMPT, "--raw", "--max-tokens", str(tokens),
                                     "--temperature", "0", "--json"], capture_output=True, text=True,
                                    timeout=300, check=True).stdout)  # fmt: skip
    fed = natlab.Federation(lab, str(tmp_path), str(models))
    spare: natlab.Node | None = None
    try:
        fed.start()
        relay = f"{lab.addr('relay')}:{natlab.RELAY_PORT}"
        listen = f"{lab.addr('a1')}:8471"  # the spare shares a1's host at site A
        argv = [*CLI, "-v", "node", "--name", "a3", "--data-dir", f"{tmp_path}/a3", "--no-mdns",
                "--device", "cpu", "--memory", "1GiB", "--listen", listen, "--relay", relay]  # fmt: skip
        spare = natlab.Node(lab, "a1", argv, f"{tmp_path}/a3.log")
        spare.wait_serving()
        fed.wait_directory()
        data = fed.nodes["data"]
        dep = json.loads(ok_in(lab, "data", "deploy", "tiny", "--workers", "a1,a2,b1", "--node", data.url,
                               "--ctx", "256", "--json"))  # fmt: skip
        assert [s["worker"] for s in dep["stages"]] == ["a1", "a2", "b1"]
        proc = lab.popen("data", [sys.executable, "-c", STREAM, data.url, "tiny", PROMPT, str(tokens)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None
        events = []
        for line in proc.stdout:
            events.append(json.loads(line))
            if len(events) == 3:
                fed.nodes["b1"].stop()  # kill -9 behind NAT B
        proc.wait(timeout=120)
        assert "error" not in events[-1], events[-1]
        ids = [t for e in events for t in e.get("token_ids", [])]
        assert ids == ref["token_ids"] and "".join(e.get("text", "") for e in events) == ref["text"]
        assert events[-1]["timings"]["recoveries"] >= 1
        status = json.loads(ok_in(lab, "data", "status", "--node", data.url, "--json"))
        (pipe,) = status["pipelines"]
        assert [s["worker"] for s in pipe["stages"]] == ["a1", "a2", "a3"]
        print(f"NAT lab: b1 killed, replaced by a3 at site A; pause "
              f"{events[-1]['timings']['recovery_pause_s'] * 1000:.0f} ms")  # fmt: skip
    finally:
        if spare is not None:
            spare.stop()
        fed.stop()
