"""Owner first: a volunteer's machine serves the swarm only while its owner does not need it.

    --yield-when gpu-busy    other processes use the GPU (NVML via nvidia-ml-py: their memory, or utilisation
                             while we run nothing); on a machine without NVML, as user-active
    --yield-when user-active other processes keep the CPUs busy (from /proc: their share of all CPU time)
    --yield-when never       (default)
    --share-hours 18-08      serve only from 18:00 to 08:00 local time (wraps midnight)

`yield_to_owner(worker, policy)` checks every `check_s`: when the owner is active or the hours are over the
worker *drains* (free memory 0, no new assignment; the coordinators move its stages away at their next
heartbeat, sessions finishing on the old plan: `pipeline.recovery.move`), and offers its memory again once
the owner has been idle for `idle_s`. Tests pass their own `probe` (a callable returning why the owner is
active, or None).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from eldric_p2p.errors import UsageError

log = logging.getLogger(__name__)

YIELD_MODES = ("never", "user-active", "gpu-busy")


def parse_share_hours(text: str) -> tuple[int, int]:
    """`'18-08'` -> (18, 8). Raises UsageError."""
    start, sep, end = text.partition("-")
    if (
        not sep
        or not start.isdigit()
        or not end.isdigit()
        or not (0 <= int(start) < 24 and 0 <= int(end) <= 24)
    ):
        raise UsageError(f"--share-hours {text!r}: expected START-END in hours, e.g. 18-08")
    if int(start) == int(end):
        raise UsageError(f"--share-hours {text!r}: start and end are the same hour")
    return int(start), int(end)


def in_share_hours(hours: tuple[int, int], hour: int) -> bool:
    start, end = hours
    return start <= hour < end if start < end else hour >= start or hour < end


class CpuOthers:
    """Share of the machine's CPU time used by processes other than this one, between two calls."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        total = sum(int(x) for x in fields[:8])  # user nice system idle iowait irq softirq steal
        idle = int(fields[3]) + int(fields[4])
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
        own = int(mine[11]) + int(mine[12])  # utime, stime (all threads), in clock ticks like /proc/stat
        return total - idle - own, total

    def __call__(self) -> float | None:
        try:
            busy, total = self._sample()
        except (OSError, ValueError, IndexError):
            return None
        last, self._last = self._last, (busy, total)
        if last is None or total <= last[1]:
            return None
        return max(0.0, (busy - last[0]) / (total - last[1]))


def gpu_others() -> float | None:
    """The largest share of any GPU's memory held by other processes (NVML), or None without NVML."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        worst = 0.0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            procs += pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
            used = sum(p.usedGpuMemory or 0 for p in procs if p.pid != os.getpid())
            worst = max(worst, used / total if total else 0.0)
        return worst
    except pynvml.NVMLError:
        return None


@dataclass
class OwnerPolicy:
    yield_when: str = "never"
    share_hours: tuple[int, int] | None = None
    busy_share: float = 0.5  # other processes' share of CPU (or GPU memory) that counts as the owner's use
    check_s: float = 1.0
    idle_s: float = 30.0  # the owner must be idle this long before we offer memory again
    drain_timeout_s: float = 120.0
    probe: Callable[[], str | None] | None = None  # tests: why the owner is active now, or None

    def __post_init__(self) -> None:
        if self.yield_when not in YIELD_MODES:
            raise UsageError(f"--yield-when {self.yield_when!r}: one of {', '.join(YIELD_MODES)}")

    @property
    def active(self) -> bool:
        return self.yield_when != "never" or self.share_hours is not None or self.probe is not None


class OwnerWatch:
    """Why the owner wants the machine now (None: it does not), by the policy."""

    def __init__(self, policy: OwnerPolicy, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.clock = clock
        self.cpu = CpuOthers()

    def reason(self) -> str | None:
        p = self.policy
        if p.probe is not None and (why := p.probe()):
            return why
        if p.share_hours is not None and not in_share_hours(
            p.share_hours, time.localtime(self.clock()).tm_hour
        ):
            return f"outside the share hours {p.share_hours[0]:02d}-{p.share_hours[1]:02d}"
        if p.yield_when == "gpu-busy" and (gpu := gpu_others()) is not None:
            return f"other processes hold {gpu:.0%} of a GPU's memory" if gpu >= p.busy_share else None
        if p.yield_when in ("user-active", "gpu-busy"):
            cpu = self.cpu()
            if cpu is not None and cpu >= p.busy_share:
                return f"other processes use {cpu:.0%} of the CPUs"
        return None


async def yield_to_owner(
    worker: object, policy: OwnerPolicy, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Drain `worker` while its owner is active; offer it again after `idle_s` of quiet. Until cancelled."""
    from eldric_p2p.pipeline.worker import Worker

    assert isinstance(worker, Worker)
    watch = OwnerWatch(policy)
    quiet_since: float | None = None
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            why = watch.reason()
            now = trio.current_time()
            if why is not None:
                quiet_since = None
                if worker.draining is None:
                    log.warning("the owner wants this machine (%s): moving our stages away", why)
                    nursery.start_soon(worker.drain, f"owner first: {why}", policy.drain_timeout_s)
            elif worker.draining is not None and worker.draining.startswith("owner first"):
                quiet_since = now if quiet_since is None else quiet_since
                if now - quiet_since >= policy.idle_s:
                    worker.undrain()
                    quiet_since = None
            await trio.sleep(policy.check_s)
