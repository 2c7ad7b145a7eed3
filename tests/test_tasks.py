"""open_nursery: a lone error leaves as itself (trio >= 0.25 would wrap it in a group), several as a group."""

from __future__ import annotations

import pytest
import trio

from eldric_p2p.errors import PeerUnavailable, UsageError
from eldric_p2p.tasks import lone_error, open_nursery


async def fail(exc: BaseException) -> None:
    raise exc  # no checkpoint first: tasks started together all get to raise


def test_a_child_error_leaves_as_itself_with_its_cause() -> None:
    async def main() -> None:
        cause = OSError("connection refused")
        err = PeerUnavailable("peer x: connection refused")
        err.__cause__ = cause
        with pytest.raises(PeerUnavailable, match="peer x") as info:
            async with open_nursery() as nursery:
                nursery.start_soon(fail, err)
                await trio.sleep_forever()  # cancelled by the child's failure
        assert info.value is err and info.value.__cause__ is cause

    trio.run(main)


def test_an_error_of_the_body_and_of_nested_nurseries_leaves_as_itself() -> None:
    async def main() -> None:
        with pytest.raises(UsageError, match="bad flag"):
            async with open_nursery(), trio.open_nursery() as inner:  # the inner one wraps, the outer unwraps
                inner.start_soon(trio.sleep_forever)
                raise UsageError("bad flag")

    trio.run(main)


def test_several_errors_stay_a_group() -> None:
    async def main() -> None:
        async with open_nursery() as nursery:
            nursery.start_soon(fail, PeerUnavailable("a"))
            nursery.start_soon(fail, UsageError("b"))

    with pytest.raises(BaseExceptionGroup) as info:
        trio.run(main)
    assert {type(e) for e in info.value.exceptions} == {PeerUnavailable, UsageError}


def test_cancelling_the_nursery_is_not_an_error() -> None:
    async def main() -> None:
        async with open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_lone_error_of_groups() -> None:
    x = ValueError("x")
    assert lone_error(ExceptionGroup("g", [ExceptionGroup("h", [x])])) is x
    assert lone_error(ExceptionGroup("g", [x, KeyError("y")])) is None
