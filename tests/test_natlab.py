"""The NAT lab end to end: a relay on the public segment, members behind two NATs, a relayed stream.

The lab's NATs are symmetric here, so nothing punches through them and links between the sites stay relayed
(hole punching has tests/test_natlab_punch.py).

Needs root, `ip`, `nft` and `ethtool` (run with `pytest -m root tests/test_natlab.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tunnel"))
import natlab  # noqa: E402

pytestmark = pytest.mark.root

RELAY_PORT = 4433
LISTEN_PORT = 7000

RELAY = """
import sys, trio
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay.server import RelayLimits, run_relay

async def main():
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(lambda task_status: run_relay(
            "0.0.0.0", int(sys.argv[1]), Identity.generate(),
            limits=RelayLimits(keepalive_s=1, dead_after_s=4),
            task_status=task_status))
        print("ready", flush=True)
        seen = set()
        while True:
            for pid, m in list(relay.members.items()):
                if pid not in seen:
                    seen.add(pid)
                    print("member", pid, m.conn.remote_address[0], flush=True)
            await trio.sleep(0.1)

trio.run(main)
"""

MEMBER = """
import json, os, sys, time, trio
from eldric_p2p.net.discovery import PeerTable
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay.client import RelayMember

host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]

async def echo(stream, source):
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()

async def main():
    ident = Identity.generate()
    member = RelayMember(ident, host, port, PeerTable(ident.peer_id), lambda: {"name": mode},
                         echo if mode == "echo" else None)
    async with trio.open_nursery() as nursery:
        await nursery.start(member.run)
        with trio.fail_after(20):
            await member.wait_registered()
        print("registered", ident.peer_id, flush=True)
        if mode == "echo":
            await trio.sleep_forever()
        target = sys.argv[4]
        with trio.fail_after(20):
            while target not in member.table:
                await trio.sleep(0.05)
        stream = await member.open_stream(target)
        payload = os.urandom(200_000)
        got = bytearray()
        t = time.perf_counter()
        async def reader():
            while len(got) < len(payload):
                got.extend(await stream.receive_some())
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await stream.send_all(payload)
        t1 = time.perf_counter()
        await stream.send_all(b"x" * 1800)
        small = 0
        while small < 1800:
            small += len(await stream.receive_some())
        print(json.dumps({"echo_ok": bytes(got) == payload, "bulk_s": t1 - t,
                          "rtt_ms": (time.perf_counter() - t1) * 1000}), flush=True)
        nursery.cancel_scope.cancel()

trio.run(main)
"""

LISTENER = f"""
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {LISTEN_PORT})); s.listen(8)
print("listening", flush=True)
time.sleep(120)
"""


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process exited (rc={proc.poll()}) before printing {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} within {timeout} s")


@pytest.fixture
def lab() -> Iterator[natlab.Lab]:
    why = natlab.missing_requirements()
    if why is not None:
        pytest.skip(why)
    with natlab.natlab(prefix="elpt", delay_ms=5, nat="symmetric") as lab:  # no punching: the relayed path
        yield lab
    assert natlab.lab_namespaces("elpt") == [], "the lab was not torn down"


def test_the_delay_forwarder_runs_like_the_wire_it_stands_in_for(lab: natlab.Lab) -> None:
    """Real-time priority and (at most) a 1 ns timer slack: the emulated WAN does not wait for the CPU the
    nodes compute on, so a frame's delay is the one asked for (bench_wan prints how late frames went out)."""
    assert lab.forwarder is not None
    pid = lab.forwarder.pid
    assert os.sched_getscheduler(pid) == os.SCHED_FIFO
    assert int(Path(f"/proc/{pid}/timerslack_ns").read_text()) <= 1  # real-time tasks get 0


REFUSED_RTT = """
import socket, sys, time
best = 1e9
for _ in range(5):
    s = socket.socket(); s.settimeout(2); t = time.perf_counter()
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
    except ConnectionRefusedError:
        best = min(best, time.perf_counter() - t)
    s.close()
print(best * 1000)
"""


@pytest.mark.parametrize("kind", ["C", "Python"])
def test_either_forwarder_delays_each_wan_crossing_and_reports_how_late(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forward.c (built with the system's compiler) and the Python `forward` are the same bridge: a TCP SYN
    and its RST between a site and the public segment cross a WAN link each way (2 x delay), between two
    public hosts none; both run at real-time priority and report how late they sent the delayed frames."""
    if (why := natlab.missing_requirements()) is not None:
        pytest.skip(why)
    if kind == "Python":
        monkeypatch.setenv("ELDRIC_NATLAB_FORWARDER", "python")
    elif natlab.forwarder_binary() is None:
        pytest.skip("no C compiler: the lab runs the Python forwarder")
    with natlab.natlab(prefix="elpw", delay_ms=10, nat="eim") as lab:
        assert lab.forwarder is not None and lab.forwarder_kind == kind
        assert os.sched_getscheduler(lab.forwarder.pid) == os.SCHED_FIFO
        target = (lab.addr("data"), str(LISTEN_PORT))
        rtt = {role: float(lab.exec(role, sys.executable, "-c", REFUSED_RTT, *target).stdout)
               for role in ("a1", "b1", "relay")}  # fmt: skip
    assert 20 <= rtt["a1"] < 30 and 20 <= rtt["b1"] < 30, rtt
    assert rtt["relay"] < 5, rtt
    assert "delayed frames went out late by median" in lab.forwarder_report, lab.forwarder_report
    assert natlab.lab_namespaces("elpw") == []


def test_sites_reach_the_relay_only_outbound_and_talk_through_it(lab: natlab.Lab) -> None:
    procs: list[subprocess.Popen[str]] = []

    def start(role: str, code: str, *args: str) -> subprocess.Popen[str]:
        proc = lab.popen(role, [sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
        procs.append(proc)
        return proc

    try:
        relay = start("relay", RELAY, str(RELAY_PORT))
        _read_line(relay, "ready", 30)
        relay_addr = lab.addr("relay")

        # site B: a member that echoes relayed streams
        b1 = start("b1", MEMBER, relay_addr, str(RELAY_PORT), "echo")
        b_id = _read_line(b1, "registered", 30).split()[1]
        # the relay sees site B's member from the NAT's public address, not its private one
        assert _read_line(relay, "member", 10).split()[1:] == [b_id, lab.addr("natb")]

        # site A accepts no inbound connections: a listener on a1 is reachable from its own LAN only
        listener = start("a1", LISTENER)
        _read_line(listener, "listening", 10)
        assert lab.tcp_probe("a2", HOST_A1, LISTEN_PORT) == "connected"
        assert lab.tcp_probe("data", HOST_A1, LISTEN_PORT, timeout=1.5) == "timeout"
        assert lab.tcp_probe("relay", HOST_A1, LISTEN_PORT, timeout=1.5) == "timeout"
        # ...while outbound from site A works (the data peer answers, here with a refusal)
        assert lab.tcp_probe("a1", lab.addr("data"), LISTEN_PORT) == "refused"

        # site A -> relay -> site B
        a1 = start("a1", MEMBER, relay_addr, str(RELAY_PORT), "client", b_id)
        a_id = _read_line(a1, "registered", 30).split()[1]
        assert _read_line(relay, "member", 10).split()[1:] == [a_id, lab.addr("nata")]
        result = json.loads(_read_line(a1, "{", 60))
        assert result["echo_ok"] is True
        assert result["rtt_ms"] >= 4 * 5  # four WAN crossings of 5 ms each: the bytes did cross the relay
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


HOST_A1 = natlab.HOSTS["a1"][0]


# ------------------------------------------------------------------------------- eldric-p2p nodes in the lab

PROMPT = "Write a Python function that reverses a string."
TOKENS = 12


def _json_out(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _chat(fed: natlab.Federation, model: str, within: float) -> dict[str, object]:
    """Greedy chat through the data peer (the head is behind NAT A); retried while the pipeline comes back."""
    deadline = time.monotonic() + within
    while True:
        proc = fed.cli("data", "chat", model, PROMPT, "--node", fed.nodes["data"].url, "--max-tokens",
                       str(TOKENS), "--temperature", "0", "--json", timeout=300)  # fmt: skip
        if proc.returncode == 0 or time.monotonic() > deadline:
            return _json_out(proc)
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.models
def test_qwen_across_two_nated_sites_equals_run_and_survives_a_relay_restart(
    lab: natlab.Lab, qwen_path: Path, tmp_path: Path
) -> None:
    model = qwen_path.stem
    ref = _json_out(subprocess.run(
        [sys.executable, "-m", "eldric_p2p", "run", str(qwen_path), PROMPT, "--max-tokens", str(TOKENS),
         "--temperature", "0", "--json"], capture_output=True, text=True, timeout=600))  # fmt: skip
    fed = natlab.Federation(lab, str(tmp_path), str(qwen_path.parent))
    try:
        fed.start()
        fed.wait_directory()
        data = fed.nodes["data"]
        dep = _json_out(fed.cli("data", "deploy", model, "--workers", "a1,a2,b1", "--node", data.url,
                                "--ctx", "512", "--json"))  # fmt: skip
        stages = dep["stages"]
        assert isinstance(stages, list)
        assert [(s["worker"], s["state"]) for s in stages] == [(w, "ready") for w in ("a1", "a2", "b1")]
        assert all(s["bytes_fetched"] > 0 for s in stages)  # ranges fetched from the public data peer
        assert dep["data_peers"] == [data.url]

        # the sites accept no inbound connections: not from the public segment, only from their own LAN
        a1 = lab.addr("a1")
        assert lab.tcp_probe("data", a1, natlab.HTTP_PORT, timeout=1.5) == "timeout"
        assert lab.tcp_probe("relay", lab.addr("b1"), natlab.HTTP_PORT, timeout=1.5) == "timeout"
        assert lab.tcp_probe("a2", a1, natlab.HTTP_PORT) == "connected"

        got = _chat(fed, model, within=30)
        assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]

        links = fed.stage_links()
        # a1 -> a2 stays inside site A; a2 -> b1 and b1 -> a1 (the tokens back to the head) cross sites
        assert links == [("a1", "direct"), ("a2", "relayed"), ("b1", "relayed")]
        info = fed.get("data", f"{data.url}/api/v1/node")
        # the data peer is public: its punch to the head works even through a symmetric NAT (it answers the
        # port a1's probes come from), so its HTTP to a1 goes over a punched connection, never directly
        assert info["paths"][fed.nodes["a1"].peer_id] == "punched"  # type: ignore[index]

        # the relay restarts while idle: members reconnect by themselves and a later request works
        fed.nodes["relay"].stop()
        time.sleep(2)
        fed.start_relay()
        deadline = time.monotonic() + 60
        while True:
            infos = [fed.get(r, f"{fed.nodes[r].url}/api/v1/node") for r in ("data", *natlab.WORKERS)]
            relays = [i["relays"][0] for i in infos]  # type: ignore[index]
            if all(r["registered"] and r["connects"] >= 2 for r in relays):
                break
            assert time.monotonic() < deadline, f"members did not reconnect: {infos}"
            time.sleep(0.5)
        again = _chat(fed, model, within=60)
        assert again["token_ids"] == ref["token_ids"]
    finally:
        fed.stop()
