"""The relay's data streams: an OPEN from a member, answered with a spliced QUIC stream to the target or with
tickets for the TCP lane (tcplane.py). Split from server.py, which keeps the members and their control
streams; `Relay._accept_streams` starts `serve_open` for each stream a member opens after its control stream.
"""

from __future__ import annotations

import typing

import trio

from eldric_p2p.errors import EldricError, PeerUnavailable
from eldric_p2p.net.relay import protocol as p
from eldric_p2p.net.relay.framing import read_message, splice, write_message
from eldric_p2p.net.relay.quic import QuicStream
from eldric_p2p.net.relay.state import MemberState as _Member
from eldric_p2p.net.relay.tcplane import TcpLane

if typing.TYPE_CHECKING:
    from eldric_p2p.net.relay.server import Relay


async def refuse(relay: Relay, stream: QuicStream, code: str, reason: str) -> None:
    relay.stats.streams_refused += 1
    with trio.move_on_after(2):
        try:
            await write_message(stream, p.Refuse(code, reason))
        except PeerUnavailable:
            pass
    await stream.aclose()


async def serve_open(relay: Relay, member: _Member, stream: QuicStream) -> None:
    lim = relay.limits
    with trio.move_on_after(lim.open_timeout_s) as cs:
        try:
            request = await read_message(stream)
        except EldricError:
            request = None
    if cs.cancelled_caught or not isinstance(request, p.Open):
        stream.abort()
        return
    if member.guest_of is not None and request.target != member.guest_of:
        relay.stats.streams_forbidden += 1
        return await refuse(
            relay, stream, p.RefuseCode.FORBIDDEN, "a guest may open streams only to its inviter"
        )
    target = relay.members.get(request.target)
    if target is None:
        return await refuse(relay, stream, p.RefuseCode.UNKNOWN_PEER, f"{request.target} is not connected")
    if target is member:
        return await refuse(relay, stream, p.RefuseCode.SELF, "cannot open a stream to yourself")
    if member.streams >= lim.max_streams_per_member or target.streams >= lim.max_streams_per_member:
        return await refuse(
            relay,
            stream,
            p.RefuseCode.TOO_MANY_STREAMS,
            f"limit {lim.max_streams_per_member} streams per member",
        )
    member.streams += 1
    target.streams += 1
    try:
        if request.tcp and relay.lane is not None and member.control.tcp and target.control.tcp:
            await _splice_tcp(relay, member, stream, target, relay.lane)
        else:
            await _splice_quic(relay, member, stream, target)
    finally:
        member.streams -= 1
        target.streams -= 1


async def _ask_target(
    relay: Relay, member: _Member, stream: QuicStream, target: _Member, ticket: bytes = b""
) -> QuicStream | None:
    """INCOMING to the target on a new stream; that stream once it ACCEPTs, else None with the opener's
    `stream` refused (the target's REFUSE passed on, or left, or no answer in time)."""
    try:
        onward = target.conn.open_stream()
    except PeerUnavailable:
        await refuse(relay, stream, p.RefuseCode.UNKNOWN_PEER, "target just left")
        return None
    reply: p.Message | None = None
    with trio.move_on_after(relay.limits.open_timeout_s):
        try:
            await write_message(onward, p.Incoming(member.peer_id, ticket))
            reply = await read_message(onward)
        except EldricError:
            reply = None
    if isinstance(reply, p.Accept):
        return onward
    onward.abort()
    if isinstance(reply, p.Refuse):
        await refuse(relay, stream, reply.code, reply.reason)
    else:
        await refuse(relay, stream, p.RefuseCode.TIMEOUT, "target did not answer")
    return None


async def _splice_quic(relay: Relay, member: _Member, stream: QuicStream, target: _Member) -> None:
    onward = await _ask_target(relay, member, stream, target)
    if onward is None:
        return
    done = False
    try:
        await write_message(stream, p.Accept())
        relay.stats.streams_spliced += 1
        relay.stats.bytes_spliced += await splice(stream, onward, relay.limits.stream_window)
        done = True
    except PeerUnavailable:
        pass
    finally:
        if done:
            await stream.aclose()
            await onward.aclose()
        else:  # cancelled (a member left) or broken: both ends see a reset, not a silent hang
            stream.abort()
            onward.abort()


async def _splice_tcp(
    relay: Relay, member: _Member, stream: QuicStream, target: _Member, lane: TcpLane
) -> None:
    """The TCP lane: tickets to the target (INCOMING) and, once it accepted, to the opener (ACCEPT); then
    hold the two members' stream slots until the splice of their TCP connections ends."""
    pair = lane.expect()
    if pair is None:
        return await refuse(relay, stream, p.RefuseCode.TCP_FAILED, "too many TCP lane splices pending")
    try:
        onward = await _ask_target(relay, member, stream, target, pair.tickets[1])
        if onward is None:
            return
        await onward.aclose()  # the target has dialed the lane: this stream has done its job
        try:
            await write_message(stream, p.Accept(pair.tickets[0]))
        except PeerUnavailable:
            return
        await stream.aclose()
        with trio.move_on_after(relay.limits.open_timeout_s):
            await pair.settled.wait()
        if pair.spliced:
            relay.stats.streams_spliced += 1
            await pair.done.wait()
            relay.stats.bytes_spliced += pair.moved
    finally:
        lane.cancel(pair)  # also when the member leaves (its tasks are cancelled): the splice stops
