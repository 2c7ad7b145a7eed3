"""Keep-warm spinners (engine/warm.py, csrc/qk_warm.h): at SCHED_IDLE, for as long as asked, then asleep."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from eldric_p2p.engine import warm
from eldric_p2p.engine.qmatmul import kernels_available
from eldric_p2p.engine.warm import KeepWarm, cpu_quota

needs_spinners = pytest.mark.skipif(
    not (kernels_available() and sys.platform == "linux"), reason="spinners need the C kernels and SCHED_IDLE"
)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path) is None  # no cgroup files: no quota known
    write(tmp_path / "v2" / "cpu.max", "max 100000\n")
    assert cpu_quota(tmp_path / "v2") is None
    write(tmp_path / "v2" / "cpu.max", "250000 100000\n")
    assert cpu_quota(tmp_path / "v2") == 2.5
    write(tmp_path / "v1" / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "v1" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path / "v1") is None
    write(tmp_path / "v1" / "cpu,cpuacct" / "cpu.cfs_quota_us", "50000\n")
    assert cpu_quota(tmp_path / "v1") == 0.5
    write(tmp_path / "bad" / "cpu.max", "lots\n")
    assert cpu_quota(tmp_path / "bad") is None


def test_off_and_why() -> None:
    assert KeepWarm(0, quota=None).off == "turned off"
    with pytest.raises(ValueError):
        KeepWarm(-1)
    with pytest.raises(ValueError):
        KeepWarm(float("nan"))
    off = KeepWarm(0)
    off.touch()  # nothing to do, no error
    assert off.status()["seconds"] == 0 and off.status()["off"] == "turned off"
    if kernels_available() and hasattr(os, "SCHED_IDLE"):
        # under a CPU quota the default is off (spinning would count against it); asked for, it is on
        assert "quota" in (KeepWarm(None, quota=2.0).off or "")
        assert KeepWarm(1.0, quota=2.0).on
        assert KeepWarm(None, quota=None).on and KeepWarm(None, quota=None).seconds == warm.DEFAULT_SECONDS


def spinner_policies() -> list[int]:
    """The scheduling policy of every thread of this process that is at SCHED_IDLE."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            policy = os.sched_getscheduler(int(tid))
        except OSError:
            continue
        if policy == os.SCHED_IDLE:
            out.append(policy)
    return out


@needs_spinners
def test_spinners_spin_at_sched_idle_while_warm_then_sleep() -> None:
    kw = KeepWarm(0.4, cpus=2, quota=None)
    assert kw.on
    before = kw.status()["spun_s"]
    kw.touch()
    time.sleep(0.1)
    st = kw.status()
    assert st["spinners"] >= 1 and st["off"] is None and st["seconds"] == 0.4
    assert len(spinner_policies()) >= st["spinners"]  # they run at the lowest priority there is
    assert warm._qkernels.warm_stats()["warm_for_s"] > 0.2
    time.sleep(0.5)  # the window has ended
    spun = kw.status()["spun_s"]
    assert warm._qkernels.warm_stats()["warm_for_s"] == 0
    assert spun - before >= 0.3  # they spun through the window (at least one of them, most of it)
    time.sleep(0.2)
    assert kw.status()["spun_s"] == spun  # ... and now sleep: no CPU used between generations
    kw.touch()  # a new step wakes them again
    time.sleep(0.5)
    assert kw.status()["spun_s"] - spun >= 0.3


@needs_spinners
def test_spinners_do_not_survive_fork() -> None:
    KeepWarm(0.2, cpus=1, quota=None).touch()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child has no spinners until it asks for its own
        os.close(r)
        stats = warm._qkernels.warm_stats()
        os.write(w, f"{stats['started']} {stats['warm_for_s']}".encode())
        os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    assert got == "0 0.0"


@needs_spinners
def test_keep_warm_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        warm._qkernels.keep_warm(-1.0, 1)
    with pytest.raises(ValueError):
        warm._qkernels.keep_warm(1.0, 1000)
    with pytest.raises(TypeError):
        warm._qkernels.keep_warm("1", 1)
