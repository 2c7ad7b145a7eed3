"""Worker: refuses hostile link traffic and keeps serving; unload frees its memory; assignments checked."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import httpx
import pytest
import test_pipeline
import trio
from test_pipeline import MODEL, cluster, deploy, generate, joined, local_answer

from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.qmatmul import kernels_available
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.engine.warm import DEFAULT_SECONDS, cpu_quota
from eldric_p2p.errors import AuthenticationError, PeerUnavailable, UsageError
from eldric_p2p.net.frames import HEADER_SIZE, Frame, FrameReader, FrameType, send_frame, token_frame
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import open_tcp_link
from eldric_p2p.pipeline.assignment import Assignment

MiB = 1 << 20
model_dir = test_pipeline.model_dir  # shared module fixtures: the synthetic model, its one-process run
local = test_pipeline.local


async def closed(reader: FrameReader) -> bool:
    """True when the other side closed the link (cleanly or not) instead of sending a frame."""
    try:
        return await reader.next() is None
    except PeerUnavailable:
        return True


GREEDY = SamplingParams.greedy(max_tokens=12)


def test_hostile_link_traffic_is_refused_and_the_pipeline_keeps_serving(
    tmp_path: Path,
    model_dir: Path,
    local: LocalModel,
) -> None:
    want = local_answer(local, "Hello world", GREEDY)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [100 * MiB, 100 * MiB]) as m, httpx.AsyncClient() as c:
            r = await deploy(c, m[0].url)
            assert r.status_code == 200, r.text
            dep_id = r.json()["id"]
            tail = m[1].node
            assert tail.worker is not None
            port = tail.worker.link_port

            # 1. not TLS at all: garbage bytes on the link port are dropped
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 4)
            with trio.fail_after(5):
                while await s.receive_some(4096):
                    pass  # the node closes the connection
            await s.aclose()

            # 2. a peer that cannot prove the id it claims is refused: expecting the tail's id from a node
            #    that is someone else fails on our side, and an unauthenticated client never gets frames in
            with pytest.raises(AuthenticationError):
                await open_tcp_link("127.0.0.1", port, Identity.generate(), m[0].node.identity.peer_id)

            # 3. an authenticated stranger (not the previous hop) is refused frame by frame, with reasons
            stranger = await open_tcp_link("127.0.0.1", port, Identity.generate(), tail.identity.peer_id)
            reader = FrameReader(stranger)
            await send_frame(
                stranger, Frame(FrameType.OPEN_SESSION, 77, ext={"deployment": dep_id, "params": {}})
            )
            err = await reader.next()
            assert (
                err is not None
                and err.type == FrameType.ERROR
                and "not the previous hop" in err.ext["message"]
            )
            await send_frame(stranger, token_frame(99, 3, [1]))  # tokens from a stranger are dropped silently
            await send_frame(stranger, Frame(FrameType.PING, 5))
            pong = await reader.next()
            assert pong is not None and pong.type == FrameType.PONG and pong.session_id == 5
            # an oversized frame: the header claims a payload over the limit -> ERROR, then the link is closed
            header = bytearray(HEADER_SIZE)
            struct.pack_into(
                "<2sBBHBBQII4IIIQ",
                header,
                0,
                b"EF",
                1,
                int(FrameType.HIDDEN),
                0,
                3,
                2,
                1,
                0,
                1 << 20,
                1 << 20,
                64,
                0,
                0,
                0,
                0,
                (1 << 20) * 64 * 4,
            )
            await stranger.send_all(bytes(header))
            err = await reader.next()
            assert err is not None and err.type == FrameType.ERROR and "bad frame" in err.ext["message"]
            with trio.fail_after(5):
                assert await closed(reader)
            await stranger.aclose()

            # 4. garbage inside an authenticated link: bad magic -> refused, link closed
            stranger = await open_tcp_link("127.0.0.1", port, Identity.generate(), tail.identity.peer_id)
            await stranger.send_all(b"\x00" * 100)
            reader = FrameReader(stranger)
            err = await reader.next()
            assert err is not None and "bad frame magic" in err.ext["message"]
            await stranger.aclose()

            assert tail.worker.frames_refused >= 3
            # through all of it the pipeline kept serving
            assert joined(await generate(c, m[0].url, "Hello world", GREEDY)) == want

    trio.run(main)


def test_status_unload_frees_memory_and_the_head_goes_away(tmp_path: Path, model_dir: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path, model_dir, [64 * MiB, 64 * MiB]) as m, httpx.AsyncClient() as c:
            st = (await c.get(f"{m[0].url}/api/v1/worker/status")).json()
            assert st["device"] == "cpu" and st["offered"] == st["free"] == 64 * MiB and st["link_port"] > 0
            dep = (await deploy(c, m[0].url)).json()
            st = (await c.get(f"{m[0].url}/api/v1/worker/status")).json()
            (shard,) = st["shards"]
            assert shard["state"] == "ready" and shard["role"] == "head" and shard["needed"] > 0
            assert st["free"] == 64 * MiB - shard["needed"]
            assert shard["progress"]["done"] == shard["progress"]["total"] > 0
            warm = st["keep_warm"]  # loading the stage computed, so the spinners have run (engine/warm.py)
            if kernels_available() and sys.platform == "linux" and cpu_quota() is None:
                assert warm["off"] is None and warm["seconds"] == DEFAULT_SECONDS and warm["spinners"] >= 1
            else:
                assert warm["off"] and warm["seconds"] == 0
            assert [b.model_id for b in m[0].node.backends()] == [MODEL]
            r = await c.post(f"{m[0].url}/api/v1/pipeline/undeploy", json={"deployment_id": dep["id"]})
            assert r.status_code == 200
            for node in m:
                st = (await c.get(f"{node.url}/api/v1/worker/status")).json()
                assert st["shards"] == [] and st["free"] == 64 * MiB
            assert m[0].node.backends() == []
            r = await generate(c, m[0].url, "Hello", GREEDY)
            assert r[0]["error"]["code"] == "model_not_found"
            status = (await c.get(f"{m[0].url}/api/v1/pipeline/status")).json()
            empty = {"deployments": [], "deploying": [], "recovered": [], "pending": [], "evicted": []}
            assert status == empty

    trio.run(main)


def test_assignment_parser_refuses_bad_fields() -> None:
    good = {
        "deployment_id": "d",
        "model_id": "m",
        "data_peers": ["http://127.0.0.1:1"],
        "stage_index": 1,
        "stages": [
            {
                "index": 0,
                "start": 0,
                "end": 2,
                "peer_id": Identity.generate().peer_id,
                "name": "a",
                "host": "127.0.0.1",
                "link_port": 5,
            },
            {
                "index": 1,
                "start": 2,
                "end": 4,
                "peer_id": Identity.generate().peer_id,
                "name": "b",
                "host": "127.0.0.1",
                "link_port": 6,
            },
        ],
    }
    a = Assignment.from_json_untrusted(good)
    assert (a.role, a.start, a.end, a.next.name, a.prev.name) == ("tail", 2, 4, "a", "a")
    assert Assignment.from_json_untrusted(a.to_json()) == a
    bad_cases = [
        {**good, "stage_index": 2},
        {**good, "data_peers": ["file:///etc/passwd"]},
        {**good, "model_id": "../x"},
        {**good, "stages": [good["stages"][0], {**good["stages"][1], "start": 3}]},  # not contiguous
        {**good, "stages": [{**good["stages"][0], "peer_id": "nope"}]},
        {**good, "max_ctx": 10**9},
        "not an object",
    ]
    for case in bad_cases:
        with pytest.raises(UsageError):
            Assignment.from_json_untrusted(case)


def test_a_second_step_before_the_first_was_answered_ends_only_that_session(
    tmp_path: Path, model_dir: Path, local: LocalModel
) -> None:
    """The previous hop sends one step of a session and waits for its answer; a peer that floods steps is
    cut off for that session (the work it can queue stays bounded) and the stage keeps serving."""
    import torch

    from eldric_p2p.net.frames import hidden_frame

    want = local_answer(local, "Hello world", GREEDY)

    async def main() -> None:
        async with cluster(tmp_path, model_dir, [100 * MiB, 100 * MiB]) as m, httpx.AsyncClient() as c:
            r = await deploy(c, m[0].url)
            assert r.status_code == 200, r.text
            dep_id = r.json()["id"]
            tail = m[1].node
            assert tail.worker is not None
            # the head's own identity: the tail takes it for the previous hop
            link = await open_tcp_link("127.0.0.1", tail.worker.link_port, m[0].node.identity,
                                       tail.identity.peer_id)  # fmt: skip
            sid = 12345
            await send_frame(link, Frame(FrameType.OPEN_SESSION, sid, ext={"deployment": dep_id, "params": {},
                                                                          "ctx": 64}))  # fmt: skip
            x = torch.zeros(1, 64)
            for pos in range(8):  # no waiting for answers
                await send_frame(link, hidden_frame(sid, pos, x))
            with trio.fail_after(10):
                while sid in tail.worker._stage_sessions:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await link.aclose()
            assert joined(await generate(c, m[0].url, "Hello world", GREEDY)) == want

    trio.run(main)
