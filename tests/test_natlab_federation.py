"""A federation in the NAT lab: the public host is relay + data peer + root; one member behind each NAT and a
second at site A join through the relay with relay-only invites; the admin behind NAT A deploys, a member
behind NAT B chats, equal to `run`; a stranger at site B is refused at the relay and at the public node.

Needs root, `ip`, `nft` and `ethtool`: `pytest -m root tests/test_natlab_federation.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eldric_p2p.engine.synthetic import write_synthetic_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tunnel"))
import natlab  # noqa: E402

pytestmark = pytest.mark.root

CLI = [sys.executable, "-m", "eldric_p2p"]
PROMPT = "the cat sat on"
TOKENS = 12


@pytest.fixture
def lab() -> Iterator[natlab.Lab]:
    why = natlab.missing_requirements()
    if why is not None:
        pytest.skip(why)
    with natlab.natlab(prefix="elpf", delay_ms=5) as lab:
        yield lab
    assert natlab.lab_namespaces("elpf") == [], "the lab was not torn down"


def run_in(lab: natlab.Lab, role: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.argv(role, [*CLI, *argv]), capture_output=True, text=True, timeout=timeout)


def ok_in(lab: natlab.Lab, role: str, *argv: str, timeout: float = 300) -> str:
    r = run_in(lab, role, *argv, timeout=timeout)
    assert r.returncode == 0, (role, argv[:3], r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


def test_members_behind_each_nat_join_through_the_relay_deploy_and_chat_equal_run(
    lab: natlab.Lab, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    gguf = write_synthetic_gguf(models / "tiny.gguf", arch="qwen2", n_layers=8, hidden=64, ffn=128, seed=3)
    ref = json.loads(subprocess.run([*CLI, "run", str(gguf), PROMPT, "--raw", "--max-tokens", str(TOKENS),
                                     "--temperature", "0", "--json"], capture_output=True, text=True,
                                    timeout=300, check=True).stdout)  # fmt: skip
    relay = f"{lab.addr('data')}:{natlab.RELAY_PORT}"
    d = {role: str(tmp_path / role) for role in ("data", *natlab.WORKERS, "stranger")}
    nodes: dict[str, natlab.Node] = {}
    try:
        ok_in(lab, "data", "federation", "init", "campus", "--data-dir", d["data"])
        argv = natlab.node_argv(lab, "data", d["data"], "--no-worker", "--models", str(models),
                                "--relay-listen", f"0.0.0.0:{natlab.RELAY_PORT}")  # fmt: skip
        nodes["data"] = natlab.Node(lab, "data", argv, f"{tmp_path}/data.log")
        nodes["data"].wait_serving()
        for role in natlab.WORKERS:  # a1 is invited as an admin: it deploys from behind its NAT
            extra = ["--admin"] if role == "a1" else []
            token = ok_in(
                lab, "data", "federation", "invite", "--relay-only", *extra, "--data-dir", d["data"]
            )
            assert json.dumps(relay) in _token_body(token)  # the relay is all a joiner needs
            out = ok_in(lab, role, "federation", "join", token.strip(), "--data-dir", d[role], "--name", role)
            assert f"as {'an admin' if role == 'a1' else 'a member'}" in out
            argv = natlab.node_argv(
                lab, role, d[role], "--device", "cpu", "--memory", "1GiB", "--relay", relay
            )
            nodes[role] = natlab.Node(lab, role, argv, f"{tmp_path}/{role}.log")
        for role in natlab.WORKERS:
            nodes[role].wait_serving()
        _wait_peers(lab, "a1", nodes["a1"].url, d["a1"], {"data", "a2", "b1"})

        # a stranger at site B: its own identity, pointed at the relay and at the public node
        public = f"{lab.addr('data')}:{natlab.HTTP_PORT}"
        argv = [*CLI, "-v", "node", "--name", "stranger", "--data-dir", d["stranger"], "--no-mdns",
                "--listen", f"{lab.addr('b1')}:8471", "--relay", relay, "--peer", public]  # fmt: skip
        nodes["stranger"] = natlab.Node(lab, "b1", argv, f"{tmp_path}/stranger.log")
        nodes["stranger"].wait_serving()
        r = run_in(lab, "b1", "status", "--node", nodes["data"].url, "--data-dir", d["stranger"])
        assert r.returncode == 1 and "signed request" in r.stderr, r.stderr

        dep = json.loads(ok_in(lab, "a1", "deploy", "tiny", "--workers", "a1,a2,b1", "--node",
                               nodes["a1"].url, "--ctx", "256", "--data-dir", d["a1"], "--json"))  # fmt: skip
        assert [(s["worker"], s["state"]) for s in dep["stages"]] == [(w, "ready") for w in natlab.WORKERS]
        got = json.loads(ok_in(lab, "b1", "chat", "tiny", PROMPT, "--raw", "--node", nodes["b1"].url,
                               "--max-tokens", str(TOKENS), "--temperature", "0", "--data-dir", d["b1"],
                               "--json"))  # fmt: skip
        assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]

        log = Path(f"{tmp_path}/stranger.log").read_text()
        assert "relay refused registration" in log and "not_member" in log, log[-3000:]
        st = json.loads(
            ok_in(lab, "a1", "status", "--node", nodes["a1"].url, "--data-dir", d["a1"], "--json")
        )
        assert "stranger" not in {p["name"] for p in st["peers"]}
    finally:
        for node in nodes.values():
            node.stop()


def _token_body(token: str) -> str:
    import base64

    body = token.strip().removeprefix("epi1.")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def _wait_peers(
    lab: natlab.Lab, role: str, url: str, data_dir: str, names: set[str], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        r = run_in(lab, role, "status", "--node", url, "--data-dir", data_dir, "--json", timeout=30)
        if r.returncode == 0:
            seen = {p["name"] for p in json.loads(r.stdout)["peers"]}
            if seen >= names:
                return
        time.sleep(0.5)
    raise AssertionError(f"{role} sees only {sorted(seen)} after {timeout} s")
