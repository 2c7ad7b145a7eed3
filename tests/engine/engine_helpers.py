"""Helpers shared by the engine tests (imported as `engine_helpers`: pytest puts this folder on sys.path)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

import pytest
import torch

from eldric_p2p.engine.model import Stage


@contextmanager
def simd_set(ext: ModuleType, level: bool | str, missing: str) -> Iterator[None]:
    """Run the body on C extension `ext`'s SIMD code (`level` True, or a kernel set's name such as
    "avx512") or on its portable code (False); the widest SIMD code is on again after.

    Skips the test with `missing` when SIMD code was asked for and this CPU cannot run it."""
    got = ext.set_simd(level)
    try:
        if level and (not got or got == "portable" or (isinstance(level, str) and got != level)):
            pytest.skip(missing)
        yield
    finally:
        ext.set_simd(True)


def greedy_logits(
    stages: Sequence[Stage], prompt: list[int], steps: int, sid: str = "s"
) -> list[torch.Tensor]:
    """Logits of a prefill of `prompt` plus `steps` greedy decode steps through `stages` in order, in session
    `sid` (opened on every stage first, closed after)."""
    for s in stages:
        s.open_session(sid)
    outs, ids, pos = [], torch.tensor(prompt), 0
    try:
        for _ in range(steps + 1):
            x = ids
            for s in stages:
                x = s.forward(sid, x, pos)
            outs.append(x)
            pos += len(ids)
            ids = x[-1:].argmax(-1)
    finally:
        for s in stages:
            s.close_session(sid)
    return outs
