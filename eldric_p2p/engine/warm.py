"""Keeping the CPUs awake between a pipeline's steps, so each step computes at full speed.

    warm = KeepWarm(seconds=1.0, cpus=torch.get_num_threads() + 1)
    ... after each forward: warm.touch()
    warm.status()   # {"seconds": 1.0, "spinners": 2, "spun_s": 12.3, "off": None}

A stage across sites computes a few milliseconds per token and waits tens of milliseconds for the other
stages and the WAN. A CPU idle that long sinks into a deeper idle state (a virtual machine's vCPU halts and
its host core serves others), and the next step computes slower: `python benchmarks/bench_idle.py` shows a
Qwen2.5-Coder-0.5B decode step of 21 ms back to back taking 40 ms when each stage sleeps 33 ms first, and
22 ms when spinners keep the CPUs awake instead. For `seconds` after each forward, spinner threads of the C
kernels (engine/csrc/qk_warm.h) spin at SCHED_IDLE, the lowest priority Linux has: they run only where a CPU
would otherwise idle and yield to any other thread at once, so no work, ours or another program's, waits for
them. What they cost is power: the CPUs stay busy while a model is generating, and go idle `seconds` after
its last step. Off (`seconds=0`, `eldric-p2p node --keep-warm 0`), without the C kernels, where the OS has no
SCHED_IDLE, and by default under a cgroup CPU quota (a container limited to N CPUs), where spinning would
count against the quota the work needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    from eldric_p2p.engine import _qkernels
except ImportError:  # built without a C compiler
    _qkernels = None

DEFAULT_SECONDS = 1.0  # warm this long after the last step: a pipeline's step comes round well within it
CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP) -> float | None:
    """The CPUs a cgroup quota allows this process (cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`), or None
    when there is no quota (or no cgroup file to read)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((root / v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class KeepWarm:
    """Spinners that keep `cpus` CPUs awake for `seconds` after each `touch()` (see the module docstring).
    `seconds=None` is the default: DEFAULT_SECONDS, or off under a CPU quota."""

    def __init__(self, seconds: float | None = None, cpus: int = 2, *, quota: float | None = None) -> None:
        if seconds is not None and not 0 <= seconds <= 3600:
            raise ValueError("keep-warm seconds must be 0..3600")
        quota = cpu_quota() if quota is None else quota
        self.off: str | None = None  # why it is off, for the status
        if seconds == 0:
            self.off = "turned off"
        elif _qkernels is None:
            self.off = "the C kernels are not built"
        elif not hasattr(os, "SCHED_IDLE"):
            self.off = "no SCHED_IDLE on this OS"
        elif seconds is None and quota is not None:
            self.off = f"a CPU quota of {quota:g} CPUs (cgroup): spinning would count against it"
        self.seconds = DEFAULT_SECONDS if seconds is None else seconds
        self.cpus = max(1, min(cpus, usable_cpus(), 64))

    @property
    def on(self) -> bool:
        return self.off is None

    def touch(self) -> None:
        """A step just ran: keep the CPUs awake for the next `seconds`."""
        if self.off is None:
            _qkernels.keep_warm(self.seconds, self.cpus)

    def status(self) -> dict[str, Any]:
        stats = _qkernels.warm_stats() if _qkernels is not None else {}
        if self.off is None and stats.get("started") and not stats.get("idle_policy"):
            self.off = "the OS refused SCHED_IDLE"  # the spinners ended at once
        return {
            "seconds": self.seconds if self.off is None else 0,
            "spinners": stats.get("idle_policy", 0),
            "spun_s": round(stats.get("spun_s", 0.0), 3),
            "off": self.off,
        }
