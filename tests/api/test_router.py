"""Router: the healthy backend with the smallest queue, bounded admission, sources read on every call."""

from __future__ import annotations

import pytest
import trio
from gateway_helpers import FakeBackend

from eldric_p2p.api.backends.base import Overloaded
from eldric_p2p.api.router import Router
from eldric_p2p.errors import ModelNotFound, PeerUnavailable


def test_unknown_model_lists_what_is_available() -> None:
    router = Router([lambda: [FakeBackend("qwen"), FakeBackend("gemma")]])
    with pytest.raises(ModelNotFound, match="available: gemma, qwen"):
        router.pick("llama")
    with pytest.raises(ModelNotFound, match="available: none"):
        Router().pick("llama")


def test_picks_the_smallest_queue_and_skips_unhealthy() -> None:
    a, b, c = FakeBackend("m", name="a"), FakeBackend("m", name="b"), FakeBackend("m", name="c")
    a.active, b.active, c.active = 3, 1, 0
    c.healthy = False
    router = Router([lambda: [a, b, c]])
    assert router.pick("m") is b
    b.active = 5
    assert router.pick("m") is a
    a.healthy = False
    b.healthy = False
    with pytest.raises(PeerUnavailable, match="no healthy backend"):
        router.pick("m")


def test_equal_queues_take_turns() -> None:
    a, b = FakeBackend("m", name="a"), FakeBackend("m", name="b")
    router = Router([lambda: [a, b]])
    picks = {router.pick("m").name for _ in range(4)}
    assert picks == {"a", "b"}


def test_sources_are_read_each_time() -> None:
    live: list[FakeBackend] = []
    router = Router([lambda: live])
    assert router.model_ids() == []
    live.append(FakeBackend("late", context_length=2048))
    assert router.model_ids() == ["late"] and router.context_length("late") == 2048
    live.append(FakeBackend("late", name="other", context_length=1024))
    assert router.context_length("late") == 1024  # the smallest, so max_tokens fits every backend
    assert [len(m["backends"]) for m in router.models()] == [2]
    router.add(live[0])  # the same backend from two sources counts once
    assert len(router.backends("late")) == 2


def test_acquire_counts_in_flight_and_bounds_admission() -> None:
    a, b = FakeBackend("m", name="a"), FakeBackend("m", name="b", max_queue=1)
    router = Router([lambda: [a, b]], max_queue=2, retry_after=4.0)

    async def main() -> None:
        async with router.acquire("m") as first, router.acquire("m") as second:
            assert {first.name, second.name} == {"a", "b"}  # the in-flight count spreads the load
            async with router.acquire("m") as third:
                assert third is a  # b is at its own limit of 1
                with pytest.raises(Overloaded) as info:
                    async with router.acquire("m"):
                        pass
                assert info.value.retry_after == 4.0
            assert router.load(a) == 1
        assert router.load(a) == router.load(b) == 0
        assert {labels["backend"]: v for labels, v in router.queue_depths()} == {"a": 0, "b": 0}

    trio.run(main)


def test_a_broken_info_does_not_hide_other_models() -> None:
    class Broken(FakeBackend):
        def info(self) -> dict:
            raise RuntimeError("boom")

    router = Router([lambda: [Broken("x", name="x"), FakeBackend("y")]])
    assert [m["id"] for m in router.models()] == ["x", "y"]
    assert router.pick("x").model_id == "x"


def test_ensure_refreshes_once_when_a_model_is_unknown() -> None:
    found: list[FakeBackend] = []
    calls = 0

    async def refresh() -> None:
        nonlocal calls
        calls += 1
        found.append(FakeBackend("m"))  # a peer reports a pipeline deployed a moment ago

    router = Router([lambda: found], refresh=refresh)

    async def main() -> None:
        await router.ensure("m")
        assert router.pick("m") is found[0]
        await router.ensure("m")  # known now: no second round of polls

    trio.run(main)
    assert calls == 1


def test_route_choice_free_slot_first_then_fewest_hops_then_load_then_speed() -> None:
    """Replicas of a pipeline: a new session goes where a session slot is free, on the shortest path."""
    short, long_, unknown = (FakeBackend("m", name=n) for n in ("short", "long", "unknown"))
    short.hops, short.sessions = 2, 2  # type: ignore[attr-defined]
    long_.hops, long_.sessions = 3, 2  # type: ignore[attr-defined]
    router = Router([lambda: [long_, unknown, short]])
    assert router.pick("m") is short  # fewest hops; a backend that does not say ranks after
    short.active = 1
    assert router.pick("m") is short  # still a free slot there
    short.active = 2
    assert router.pick("m") is long_  # short is full: its next session would queue
    long_.active = 2
    assert router.pick("m") is unknown  # no slot is free anywhere that says: one that does not say
    unknown.active = 5
    assert router.pick("m") is short  # all would queue: fewest hops again
    fast, slow = FakeBackend("n", name="fast"), FakeBackend("n", name="slow")
    fast.hops = slow.hops = 2  # type: ignore[attr-defined]
    fast.token_s, slow.token_s = 0.01, 0.05  # type: ignore[attr-defined]
    router = Router([lambda: [slow, fast]])
    assert {router.pick("n").name for _ in range(4)} == {"fast"}  # equal hops and load: the faster
