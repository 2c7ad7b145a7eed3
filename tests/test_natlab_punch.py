"""Hole punching across the NAT lab: direct paths through NATs with endpoint-independent mapping, the relay
behind symmetric ones.

Needs root, `ip`, `nft` and `ethtool`: `pytest -m root tests/test_natlab_punch.py` (the Qwen tests also
`-m slow` and the reference model). Each test builds its own lab (`tunnel/natlab.py`, 5 ms per WAN link) and
removes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tunnel"))
import natlab  # noqa: E402

pytestmark = pytest.mark.root

DELAY_MS = 5
RELAY_PORT = 4433
PREFIX = {"eim": "elpe", "symmetric": "elps"}

RELAY = """
import sys, trio
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay.server import run_relay

async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_relay("0.0.0.0", int(sys.argv[1]), Identity.generate(),
                                                          task_status=task_status))
        print("ready", flush=True)

trio.run(main)
"""

# A member with a connector: serves links (echo); opens one to the peer id read from stdin and reports.
MEMBER = """
import json, sys, time, trio
from eldric_p2p.net.connector import Connector
from eldric_p2p.net.discovery import PeerTable
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.relay.client import RelayMember

async def echo(link):
    while data := await link.receive_some():
        await link.send_all(data)

async def main():
    ident = Identity.generate()
    table = PeerTable(ident.peer_id)
    conn = Connector(ident, table)
    conn.frames_handler = echo
    member = RelayMember(ident, sys.argv[1], int(sys.argv[2]), table, lambda: {"name": sys.argv[3]},
                         conn.handle_relayed, punch_handler=conn.handle_punched)
    conn.members.append(member)
    async with trio.open_nursery() as nursery:
        await nursery.start(member.run)
        with trio.fail_after(20):
            await member.wait_registered()
        print("registered", ident.peer_id, flush=True)
        while True:
            target = (await trio.to_thread.run_sync(sys.stdin.readline)).strip()
            if not target:
                return
            with trio.fail_after(20):
                while target not in table:
                    await trio.sleep(0.05)
            t0 = time.perf_counter()
            link = await conn.open_link(target)
            open_s = time.perf_counter() - t0
            rtts = []
            for _ in range(20):
                t = time.perf_counter()
                await link.send_all(b"x" * 1800)
                got = 0
                while got < 1800:
                    got += len(await link.receive_some())
                rtts.append((time.perf_counter() - t) * 1000)
            s = member.puncher.stats
            print(json.dumps({"path": link.path, "peer": link.peer_id, "open_s": open_s,
                              "rtt_ms": sorted(rtts)[len(rtts) // 2], "punched": s.punched,
                              "failed": s.failed, "forwarded": s.forwarded,
                              "attempts": s.attempts, "punch_s": s.last_punch_s,
                              "lane": conn.stats["lane"], "tcp": conn.stats["tcp_punched"],
                              "transport": type(link.tls.transport_stream).__name__,
                              "tcp_peer": str(link.tls.transport_stream.socket.getpeername())
                                          if conn.stats["tcp_punched"] else None,
                              "remote": str(member.punched(target).remote_address)
                                        if member.punched(target) else None}), flush=True)

trio.run(main)
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


@pytest.fixture(params=["eim", "symmetric"])
def lab(request: pytest.FixtureRequest) -> Iterator[natlab.Lab]:
    why = natlab.missing_requirements()
    if why is not None:
        pytest.skip(why)
    prefix = PREFIX[request.param]
    with natlab.natlab(prefix=prefix, delay_ms=DELAY_MS, nat=request.param) as lab:
        yield lab
    assert natlab.lab_namespaces(prefix) == [], "the lab was not torn down"


def test_links_between_sites_punch_through_eim_nats_and_fall_back_to_the_relay_behind_symmetric_ones(
    lab: natlab.Lab,
) -> None:
    procs: list[subprocess.Popen[str]] = []

    def start(role: str, code: str, *args: str) -> subprocess.Popen[str]:
        proc = lab.popen(role, [sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)  # fmt: skip
        procs.append(proc)
        return proc

    def ask(proc: subprocess.Popen[str], target: str) -> dict[str, object]:
        assert proc.stdin is not None
        proc.stdin.write(target + "\n")
        proc.stdin.flush()
        return json.loads(_read_line(proc, "{", 60))  # type: ignore[no-any-return]

    try:
        relay = start("relay", RELAY, str(RELAY_PORT))
        _read_line(relay, "ready", 30)
        a1 = start("a1", MEMBER, lab.addr("relay"), str(RELAY_PORT), "a1")
        b1 = start("b1", MEMBER, lab.addr("relay"), str(RELAY_PORT), "b1")
        a_id = _read_line(a1, "registered", 30).split()[1]
        b_id = _read_line(b1, "registered", 30).split()[1]

        there = ask(a1, b_id)  # a1 -> b1
        back = ask(b1, a_id)  # b1 -> a1
        print(f"\n{lab.nat}: a1 -> b1 {there}\n{lab.nat}: b1 -> a1 {back}")
        assert there["peer"] == b_id and back["peer"] == a_id  # the link handshake proved both ids
        if lab.nat == "eim":
            assert there["path"] == back["path"] == "punched"
            assert there["punched"] == 1 and back["attempts"] == 1  # b1 reuses the connection a1 punched
            # straight to NAT B's public address (the mapping the relay saw), not to the relay
            assert str(there["remote"]).startswith(f"('{lab.addr('natb')}', ")
            assert str(back["remote"]).startswith(f"('{lab.addr('nata')}', ")
            assert isinstance(there["punch_s"], float) and there["punch_s"] < 1.0
            # and each link moved onto a TCP connection through both NATs, to the same public addresses
            assert there["transport"] == back["transport"] == "SocketStream"
            assert there["tcp"] == back["tcp"] == 1
            assert str(there["tcp_peer"]).startswith(f"('{lab.addr('natb')}', ")
            assert str(back["tcp_peer"]).startswith(f"('{lab.addr('nata')}', ")
        else:
            assert there["path"] == back["path"] == "relayed"
            # no probe got through; the punch fell back to a QUIC connection through the relay's forwarding
            # channel, and the links took the relay's TCP lane, the faster of the two
            assert there["punched"] == 0 and there["forwarded"] == 1
            relay_addr = f"('{lab.addr('relay')}', {RELAY_PORT})"
            assert there["remote"] == back["remote"] == relay_addr
            assert there["lane"] == back["lane"] == 1 and there["tcp"] == back["tcp"] == 0
            assert float(there["open_s"]) < 6.0  # type: ignore[arg-type]  # the punch timeout, then the relay
            # b1 took part in that attempt: it goes straight to the lane, no second punch
            assert back["attempts"] == 1 and float(back["open_s"]) < 1.5  # type: ignore[arg-type]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------- eldric-p2p nodes in the lab

PROMPT = "Write a Python function that reverses a string."
TOKENS = 12


def _json_out(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def reference(qwen_path: Path) -> dict[str, object]:
    """`eldric-p2p run` on this machine: what the pipeline across the sites must answer, token for token."""
    return _json_out(subprocess.run(
        [sys.executable, "-m", "eldric_p2p", "run", str(qwen_path), PROMPT, "--max-tokens", str(TOKENS),
         "--temperature", "0", "--json"], capture_output=True, text=True, timeout=600))  # fmt: skip


@pytest.mark.slow
@pytest.mark.models
def test_qwen_across_two_sites_goes_direct_through_punched_paths_or_relayed_and_equals_run(
    lab: natlab.Lab, qwen_path: Path, reference: dict[str, object], tmp_path: Path
) -> None:
    model = qwen_path.stem
    fed = natlab.Federation(lab, str(tmp_path), str(qwen_path.parent), workers=("a1", "b1"))
    try:
        fed.start()
        fed.wait_directory()
        data = fed.nodes["data"]
        dep = _json_out(fed.cli("data", "deploy", model, "--workers", "a1,b1", "--node", data.url,
                                "--ctx", "512", "--json"))  # fmt: skip
        stages = dep["stages"]
        assert isinstance(stages, list)
        assert [(s["worker"], s["state"]) for s in stages] == [("a1", "ready"), ("b1", "ready")]

        deadline = time.monotonic() + 60
        while True:  # greedy chat through the data peer (the head a1 is behind NAT A)
            chat = fed.cli("data", "chat", model, PROMPT, "--node", data.url, "--max-tokens", str(TOKENS),
                           "--temperature", "0", "--json", timeout=300)  # fmt: skip
            if chat.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        got = _json_out(chat)
        assert got["token_ids"] == reference["token_ids"] and got["text"] == reference["text"]

        want = "punched" if lab.nat == "eim" else "relayed"
        links = fed.stage_links()
        assert links == [("a1", want), ("b1", want)]  # a1 -> b1 and b1 -> a1 (the tokens back to the head)
        text = fed.cli("data", "status", "--node", data.url)
        assert text.returncode == 0, text.stderr
        # over TCP through the NATs (eim) or the relay's TCP lane (symmetric)
        assert text.stdout.count(f"link {want} over tcp") == 2, text.stdout
        nodes = [fed.get(r, f"{fed.nodes[r].url}/api/v1/node") for r in ("a1", "b1")]
        punch = [n["relays"][0]["punch"] for n in nodes]  # type: ignore[index]
        print(f"\n{lab.nat}: links {links}; a1 punch {punch[0]}; b1 punch {punch[1]}; "
              f"decode {got['decode_tokens_per_s']} tok/s")  # fmt: skip
        ids = fed.nodes["a1"].peer_id, fed.nodes["b1"].peer_id
        a1_b1 = ids[1] in punch[0]["connections"], ids[0] in punch[1]["connections"]
        tcp = [n["link_stats"]["tcp_punched"] for n in nodes]  # type: ignore[index]
        # the public data peer's links to the sites (the coordinator's HTTP) are punched and moved onto TCP
        # behind either NAT: a symmetric NAT's SYN reaches the public side's listener from a port of its own
        data_links = fed.get("data", f"{data.url}/api/v1/node")["link_stats"]  # type: ignore[index]
        assert data_links["punched"] >= 1 and data_links["tcp_punched"] == data_links["punched"], data_links
        carriers = [shard["link_transport"] for r in ("a1", "b1")
                    for shard in fed.get(r, f"{fed.nodes[r].url}/api/v1/worker/status")["shards"]]  # type: ignore[index]  # fmt: skip
        assert carriers == ["tcp", "tcp"]  # punched onto TCP (eim) or the relay's TCP lane (symmetric)
        if lab.nat == "eim":
            assert a1_b1 == (True, True)  # one punched connection, both ends
            assert tcp[0] >= 1 and tcp[1] >= 1, tcp  # and the stages' links moved onto TCP through the NATs
        else:
            # no punched connection between the sites: the punch fell back to the relay's channel and the
            # links took its TCP lane; the public data peer may well punch to a site (its probes answer a
            # symmetric NAT's new port, a peer-reflexive candidate), which is fine
            assert a1_b1 == (False, False) and punch[0]["forwarded"] + punch[1]["forwarded"] >= 1
            assert tcp == [0, 0]
            lanes = [n["relays"][0]["lane_streams"] for n in nodes]  # type: ignore[index]
            assert all(n >= 1 for n in lanes), lanes
            lane = fed.get("relay", f"{fed.nodes['relay'].url}/api/v1/node")["relay"]["lane"]  # type: ignore[index]
            assert lane["spliced"] >= 2 and lane["kernel"] == lane["spliced"], lane  # the kernel copies them
    finally:
        fed.stop()
