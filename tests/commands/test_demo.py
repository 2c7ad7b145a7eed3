"""`eldric-p2p demo`: node processes on loopback, a deploy across them, one streamed answer, clean exit."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eldric_p2p.commands import demo
from eldric_p2p.engine.synthetic import write_synthetic_gguf
from eldric_p2p.errors import ModelNotFound, UsageError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["demo", *argv])


def test_bad_arguments_fail_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        demo.main(parse(["--model", "no-such-model"]))
    gguf = write_synthetic_gguf(tmp_path / "m.gguf", n_layers=2, hidden=32, ffn=64)
    with pytest.raises(UsageError):
        demo.main(parse(["--model", str(gguf), "--workers", "0"]))


def run_demo(argv: list[str], timeout: float) -> tuple[str, Path]:
    proc = subprocess.run([sys.executable, "-m", "eldric_p2p", "demo", "--no-wait", *argv],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    logs = re.search(r"logs:\s+(\S+)", out)
    assert logs, out
    return out, Path(logs.group(1))


def no_process_left(root: Path) -> bool:
    pids = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
    return not pids


@pytest.mark.slow
def test_demo_on_a_synthetic_model(tmp_path: Path) -> None:
    gguf = write_synthetic_gguf(tmp_path / "tiny-demo.gguf", arch="qwen2", n_layers=6, hidden=64, ffn=128)
    out, root = run_demo(["--model", str(gguf), "--max-tokens", "8"], timeout=300)
    assert re.search(r"pipeline ready in [\d.]+ s: demo-worker-\d layers 0-1, demo-worker-\d layers 2-3, "
                     r"demo-worker-\d layers 4-5", out), out  # fmt: skip
    assert re.search(r"\b8 tokens, first after", out), out
    assert "dashboard:  http://127.0.0.1:" in out and '/v1   (model "tiny-demo")' in out
    assert "stopping 4 nodes" in out
    assert no_process_left(root) and not root.exists()


@pytest.mark.slow
@pytest.mark.models
def test_demo_with_the_reference_model(qwen_path: Path) -> None:
    out, root = run_demo(["--model", "qwen", "--max-tokens", "24", "--prompt", "Say hello."], timeout=600)
    assert "pipeline ready" in out and re.search(r"\b\d+ tokens, first after", out), out
    assert no_process_left(root)


@pytest.mark.slow
def test_sigterm_stops_the_demo_and_every_node(tmp_path: Path) -> None:
    """`kill` or a closed terminal must not leave node processes behind."""
    import signal
    import time

    gguf = write_synthetic_gguf(tmp_path / "tiny-term.gguf", arch="llama", n_layers=3, hidden=64, ffn=128)
    proc = subprocess.Popen([sys.executable, "-m", "eldric_p2p", "demo", "--keep", "--workers", "2",
                             "--model", str(gguf), "--max-tokens", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out = ""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        while "press Ctrl-C" not in out and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
        assert "press Ctrl-C" in out, out
        root = Path(re.search(r"logs:\s+(\S+)", out).group(1))
        assert not no_process_left(root)
        proc.send_signal(signal.SIGTERM)
        out += proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "got SIGTERM" in out and "stopping 3 nodes" in out, out
    assert no_process_left(root)
