"""The one place that turns a peer id into a byte stream: direct where it works, relayed otherwise.

    link = await connector.open_link(peer_id, port=link_port)   # pipeline frames: an authenticated Link
    stream = await connector.open_http(peer_id, http_port)      # HTTP to that peer's API (control, ranges)
    client = http_client_factory(connector)()                   # httpx that understands peer URLs (below)

Direct: every address the `PeerTable` holds for the peer (plus hints, e.g. the host a stage was given) is
tried with a short connect timeout, staggered like happy eyeballs, in one nursery; the first that connects
(and, for links, proves the peer id) wins and cancels the rest. Punched: a stream of a direct QUIC
connection that a relay helped open through both NATs (UDP hole punching, `RelayMember.punch`; an existing
one, made by either side, is reused), with the link handshake run over it (`path="punched"`). Relayed
(`path="relayed"`, the link handshake end to end: the relay forwards TLS records): the relay's TCP lane where
it has one; else a QUIC connection through its forwarding channel when a punch fell back to one; else a QUIC
stream it splices. What worked is remembered per peer (for `REMEMBER_S`) and tried first next time (a peer
that had to be relayed is not punched again until then); `paths` reports it.

Peer URLs: `http://<peer id>.peer.eldric:<http port>` names a node by its id. `http_client()` and
`fetch_connect` (the fetcher's `connect=`) send such a URL over `open_http`; other URLs go over TCP as usual.
So the coordinator, the worker's range fetcher and `RemotePipelineBackend` reach a node behind NAT by id.

HTTP over a link: the client sends the 4-byte tag `EHTP` right after the link handshake; the receiving node's
`dispatch` sees the tag and splices the link to its own HTTP port on loopback (the node's ASGI app answers as
for any client). A link without the tag carries pipeline frames (they start with `EF`) and goes to the worker.
Outside a federation direct HTTP is plain TCP to the peer's HTTP port, as for `--peer` bootstrap. In a
federation every HTTP stream to a peer id is a tagged link (direct to the peer's link port, else relayed), so
both ends are proven members and the bytes are encrypted; a guest link (a joiner's ticket) carries HTTP only.
"""

from __future__ import annotations

import functools
import logging
import ssl
import typing
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import httpx
import trio
from httpcore._backends.trio import TrioBackend, TrioStream

from eldric_p2p.errors import AuthenticationError, PeerUnavailable
from eldric_p2p.net.discovery import PeerTable
from eldric_p2p.net.identity import Identity, is_peer_id
from eldric_p2p.net.links import (
    HANDSHAKE_TIMEOUT_S,
    Link,
    LinkHandler,
    LinkPath,
    link_client,
    open_link_stream,
    serve_link_stream,
    splice,
)
from eldric_p2p.net.tcppunch import TCP_TAG, TcpPunches, accept_upgrade, upgrade
from eldric_p2p.tasks import open_nursery

if typing.TYPE_CHECKING:
    from eldric_p2p.net.relay.client import RelayMember

log = logging.getLogger(__name__)

_Worked = tuple[float, tuple[str, int] | None, LinkPath]  # when, the direct address (or None), the path
PEER_HOST_SUFFIX = ".peer.eldric"
HTTP_TAG = b"EHTP"
DIRECT_TIMEOUT_S = 1.5  # per direct connect attempt
STAGGER_S = 0.25  # happy-eyeballs delay between starting direct attempts
REMEMBER_S = 60.0  # how long a path that worked is tried first
MAX_CANDIDATES = 8


def peer_url(peer_id: str, http_port: int) -> str:
    """The URL naming a node by its peer id (resolved by `Connector.open_http`)."""
    return f"http://{peer_id}{PEER_HOST_SUFFIX}:{http_port}"


def peer_of_host(host: str) -> str | None:
    """The peer id a peer-URL host names, or None for an ordinary host."""
    if host.endswith(PEER_HOST_SUFFIX):
        pid = host[: -len(PEER_HOST_SUFFIX)]
        return pid if is_peer_id(pid) else None
    return None


class Connector:
    """Links and HTTP streams to peer ids. `members` are the relays this node is registered with."""

    def __init__(
        self,
        identity: Identity,
        table: PeerTable,
        *,
        direct_timeout: float = DIRECT_TIMEOUT_S,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.identity = identity
        self.table = table
        self.direct_timeout = direct_timeout
        self.handshake_timeout = handshake_timeout
        self.members: list[RelayMember] = []
        self.no_direct: set[str] = set()  # peer ids never tried directly (a firewall we know of; tests)
        self.paths: dict[str, LinkPath] = {}  # peer id -> the path the last link or HTTP stream took
        self._good: dict[tuple[str, str], _Worked] = {}  # (peer, kind) -> when, direct address, path
        self.frames_handler: LinkHandler | None = None  # pipeline frames (the worker)
        self.local_http: Callable[[], tuple[str, int] | None] = lambda: None  # our HTTP port (tagged links)
        # also counted in "relayed": "forwarded" (QUIC via a relay's channel), "lane" (a relay's TCP lane)
        self.stats = {"direct": 0, "punched": 0, "relayed": 0, "forwarded": 0, "lane": 0, "direct_failed": 0,
                      "punch_failed": 0, "tcp_punched": 0, "http_served": 0}  # fmt: skip
        self.tcp_punches = TcpPunches()  # punched links move onto TCP where the NATs let it (tcppunch.py)
        self.ticket: str | None = None  # a joiner's join ticket, presented on relayed links

    # ---- where a peer might be ----------------------------------------------------------------------------

    def addresses(self, peer_id: str) -> list[str]:
        """Every address any source gave for `peer_id` (most direct source first)."""
        out: list[str] = []
        for info in self.table.entries(peer_id):
            out += [a for a in info.addresses if a not in out]
            url = info.fields.get("url")
            if isinstance(url, str) and (host := httpx.URL(url).host) and host not in out:
                out.append(host)
        return out

    def _candidates(
        self, peer_id: str, port: int, hints: Iterable[tuple[str, int]], kind: str
    ) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        remembered = self._remembered(peer_id, kind)
        if remembered is not None and remembered[1] is not None:
            out.append(remembered[1])
        for host, p in hints:
            if host and peer_of_host(host) is None and (host, p) not in out:
                out.append((host, p))
        for host in self.addresses(peer_id):
            if (host, port) not in out:
                out.append((host, port))
        return out[:MAX_CANDIDATES]

    def _remembered(self, peer_id: str, kind: str) -> _Worked | None:
        got = self._good.get((peer_id, kind))
        if got is not None and trio.current_time() - got[0] > REMEMBER_S:
            del self._good[(peer_id, kind)]
            return None
        return got

    def _worked(self, peer_id: str, kind: str, path: LinkPath, addr: tuple[str, int] | None) -> None:
        self._good[(peer_id, kind)] = (trio.current_time(), addr, path)
        self.paths[peer_id] = path
        self.stats[path] += 1

    # ---- opening ------------------------------------------------------------------------------------------

    async def open_link(
        self, peer_id: str, *, port: int | None = None, hints: Iterable[tuple[str, int]] = ()
    ) -> Link:
        """An authenticated link to `peer_id` (direct to `port` on its addresses, else relayed).

        Raises PeerUnavailable when no path works, AuthenticationError when a path reaches the wrong peer.
        """

        async def attempt(host: str, p: int) -> Link:
            with trio.fail_after(self.direct_timeout):
                stream = await open_link_stream(host, p)
            return await link_client(
                stream, self.identity, peer_id, path="direct", handshake_timeout=self.handshake_timeout
            )

        link = await self._open(peer_id, "link", port, hints, attempt)
        if isinstance(link, Link):
            return link
        return await self._indirect_link(peer_id)

    def link_port_of(self, peer_id: str) -> int | None:
        """The link port any source announced for `peer_id`."""
        for info in self.table.entries(peer_id):
            worker = info.fields.get("worker")
            for port in (
                info.fields.get("link_port"),
                worker.get("link_port") if isinstance(worker, dict) else None,
            ):
                if isinstance(port, int) and 0 < port < 65536:
                    return port
        return None

    async def open_http(self, peer_id: str, port: int) -> trio.abc.Stream:
        """A byte stream to `peer_id`'s HTTP API: TCP to `port` on its addresses, else an HTTP-tagged relayed
        link. In a federation (or with a join ticket): always an HTTP-tagged link."""
        if self.identity.federated or self.ticket is not None:
            link_port = self.link_port_of(peer_id)
            if link_port is not None and self.ticket is None:
                link = await self.open_link(peer_id, port=link_port)
            else:
                link = await self._indirect_link(peer_id)
            return await self._tag_http(link, peer_id)

        async def attempt(host: str, p: int) -> trio.abc.Stream:
            with trio.fail_after(self.direct_timeout):
                return await trio.open_tcp_stream(host, p)

        stream = await self._open(peer_id, "http", port, (), attempt)
        if stream is not None:
            return stream
        return await self._tag_http(await self._indirect_link(peer_id), peer_id)

    async def _tag_http(self, link: Link, peer_id: str) -> Link:
        try:
            await link.send_all(HTTP_TAG)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(link)
            raise PeerUnavailable(f"{link.path} link to {peer_id} closed: {exc}") from exc
        return link

    async def _open(
        self,
        peer_id: str,
        kind: str,
        port: int | None,
        hints: Iterable[tuple[str, int]],
        attempt: Callable[[str, int], Awaitable[Any]],
    ) -> Any:
        """The direct race; None when no direct path works (or none is to be tried)."""
        if peer_id in self.no_direct:
            return None
        remembered = self._remembered(peer_id, kind)
        if remembered is not None and remembered[2] != "direct" and self.members:
            return None  # punched or relayed worked lately: skip the direct timeouts
        candidates = self._candidates(peer_id, port or 0, hints, kind) if port or hints else []
        candidates = [(h, p) for h, p in candidates if p]
        if not candidates:
            return None
        got = await self._race(candidates, attempt)
        if got is None:
            self.stats["direct_failed"] += 1
            return None
        stream, addr = got
        self._worked(peer_id, kind, "direct", addr)
        return stream

    async def _race(
        self, candidates: list[tuple[str, int]], attempt: Callable[[str, int], Awaitable[Any]]
    ) -> tuple[Any, tuple[str, int]] | None:
        """Happy eyeballs: start an attempt every STAGGER_S (or when one fails); the first success wins."""
        winner: tuple[Any, tuple[str, int]] | None = None
        failures: list[str] = []

        async with open_nursery() as nursery:
            for i, addr in enumerate(candidates):
                failed = trio.Event()

                async def one(addr: tuple[str, int] = addr, failed: trio.Event = failed) -> None:
                    nonlocal winner
                    try:
                        stream = await attempt(*addr)
                    except (OSError, trio.TooSlowError, PeerUnavailable, AuthenticationError) as exc:
                        failures.append(f"{addr[0]}:{addr[1]}: {exc}")
                        failed.set()
                        return
                    if winner is None:
                        winner = (stream, addr)
                        nursery.cancel_scope.cancel()
                    else:
                        await trio.aclose_forcefully(stream)

                nursery.start_soon(one)
                if i < len(candidates) - 1:
                    with trio.move_on_after(STAGGER_S):
                        await failed.wait()
        if winner is None:
            log.debug("no direct path: %s", "; ".join(failures))
        return winner

    def _by_listing(self, peer_id: str) -> list[RelayMember]:
        """Our relays, those whose directory lists `peer_id` first (a directory may lag behind a newcomer)."""
        listing = self.table.relays(peer_id)
        return sorted(self.members, key=lambda m: m.address not in listing)  # stable: keeps order

    async def _indirect_link(self, peer_id: str) -> Link:
        """A punched link where a punch works (or a punched connection exists), else a relayed one."""
        link = await self._punched_link(peer_id)
        return link if link is not None else await self._relayed_link(peer_id)

    async def _punched_link(self, peer_id: str) -> Link | None:
        """A link over a punched QUIC connection: a live one (either side made it) or a new punch through a
        relay that brokers them. None when none works, or a punch failed within REMEMBER_S."""
        if peer_id in self.no_direct or self.ticket is not None:  # a guest's relay brokers it nothing
            return None
        members = [m for m in self._by_listing(peer_id) if m.punched(peer_id) is not None or m.can_punch]
        members.sort(key=lambda m: m.punched(peer_id) is None)
        remembered = self._remembered(peer_id, "link")
        if not members or (remembered and remembered[2] == "relayed" and members[0].punched(peer_id) is None):
            return None
        lane = False
        for member in members:
            try:
                conn = member.punched(peer_id) or await member.punch(peer_id)
            except PeerUnavailable as exc:
                log.info("no punched path to %s through %s: %s", peer_id, member.address, exc)
                continue
            if conn.forwarded and member.tcp_lane:
                lane = True  # no direct path: the relay's TCP lane (_relayed_link) beats QUIC via its channel
                continue
            try:
                path: LinkPath = "relayed" if conn.forwarded else "punched"  # forwarded: the relay's channel
                tcp = None
                for _ in range(2):  # a TCP link through the NATs first where one may form, else QUIC
                    link = await link_client(conn.open_stream(), self.identity, peer_id, path=path,
                                             handshake_timeout=self.handshake_timeout)  # fmt: skip
                    if path == "relayed" or not self.tcp_punches.worth_trying(peer_id):
                        break
                    if tcp := await upgrade(link, self.identity, handshake_timeout=self.handshake_timeout):
                        self.tcp_punches.worked(peer_id)
                        link = tcp
                        break
                    self.tcp_punches.failed(peer_id)
            except (PeerUnavailable, AuthenticationError) as exc:
                log.info("no punched path to %s through %s: %s", peer_id, member.address, exc)
                continue
            self._worked(peer_id, "link", path, None)
            if conn.forwarded or tcp:
                self.stats["forwarded" if conn.forwarded else "tcp_punched"] += 1
            self._good[(peer_id, "http")] = self._good[(peer_id, "link")]
            return link
        if not lane:
            self.stats["punch_failed"] += 1
        return None

    async def _relayed_link(self, peer_id: str) -> Link:
        """Through the relays that list `peer_id` first (any of them will do), then the others."""
        errors: list[str] = []
        for member in self._by_listing(peer_id):
            if not member.registered:
                errors.append(f"relay {member.host}:{member.port}: not connected")
                continue
            try:
                stream = await member.open_stream(peer_id)
                link = await link_client(
                    stream,
                    self.identity,
                    peer_id,
                    path="relayed",
                    handshake_timeout=self.handshake_timeout,
                    ticket=self.ticket,
                )
            except PeerUnavailable as exc:
                errors.append(str(exc))
                continue
            self._worked(peer_id, "link", "relayed", None)
            if isinstance(stream, trio.SocketStream):  # the relay's TCP lane
                self.stats["lane"] += 1
            self._good[(peer_id, "http")] = self._good[(peer_id, "link")]
            return link
        why = "; ".join(errors) if errors else "no direct address answered and no relay is configured"
        raise PeerUnavailable(f"cannot reach peer {peer_id}: {why}")

    # ---- incoming -----------------------------------------------------------------------------------------

    async def handle_relayed(self, stream: trio.abc.Stream, source: str) -> None:
        """The RelayMember's stream handler: authenticate the stream as a link, then `dispatch` it."""
        await serve_link_stream(
            stream, self.identity, self.dispatch, path="relayed", handshake_timeout=self.handshake_timeout
        )

    async def handle_punched(self, stream: trio.abc.Stream, source: str) -> None:
        """The stream handler of punched connections: authenticate the stream as a link, then `dispatch` it.
        `source` is whom the relay brokered the punch with; the handshake proves who it really is."""
        path: LinkPath = "relayed" if getattr(stream, "forwarded", False) else "punched"  # relay's channel
        await serve_link_stream(
            stream, self.identity, self.dispatch, path=path, handshake_timeout=self.handshake_timeout
        )

    async def dispatch(self, link: Link) -> None:
        """An authenticated incoming link: HTTP (tagged) to our own HTTP port, anything else to the worker."""
        head = bytearray()
        while len(head) < len(HTTP_TAG) and (HTTP_TAG.startswith(head) or TCP_TAG.startswith(head)):
            data = await link.receive_some(len(HTTP_TAG) - len(head))
            if not data:
                return
            head += data
        if bytes(head) == HTTP_TAG:
            await self._serve_http(link)
            return
        if bytes(head) == TCP_TAG and link.path == "punched":  # move this punched link onto TCP
            self.tcp_punches.asked += 1
            await accept_upgrade(link, self.identity, self.dispatch, allow=self.tcp_punches.enabled,
                                 handshake_timeout=self.handshake_timeout)  # fmt: skip
            return
        link.unread(head)  # not ours: give the bytes back to the frame reader
        if link.guest:
            log.info(
                "dropping a non-HTTP link from guest %s: a joiner may only send its join request",
                link.peer_id,
            )
            return
        if self.frames_handler is None:
            log.info("dropping a frames link from %s: this node runs no worker", link.peer_id)
            return
        await self.frames_handler(link)

    async def _serve_http(self, link: Link) -> None:
        target = self.local_http()
        if target is None:
            return
        host, port = target
        try:
            local = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            log.warning("cannot reach our own HTTP port %s:%d: %s", host, port, exc)
            return
        self.stats["http_served"] += 1
        async with local:
            await splice(link, local)


# --------------------------------------------------------------------------------------------- HTTP clients


class _PeerStream(TrioStream):
    """httpcore's trio stream over any trio Stream (a Link has no socket to ask about readability)."""

    def get_extra_info(self, info: str) -> Any:
        if not isinstance(self._stream, trio.SocketStream):
            return None
        return super().get_extra_info(info)


class _PeerBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.tcp = TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        peer_id = peer_of_host(host)
        if peer_id is None:
            return await self.tcp.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            with trio.fail_after(max(timeout or 0, 20.0)):
                return _PeerStream(await self.connector.open_http(peer_id, port))
        except (PeerUnavailable, AuthenticationError, trio.TooSlowError) as exc:
            raise httpcore.ConnectError(str(exc)) from exc

    async def connect_unix_socket(self, *args: Any, **kw: Any) -> httpcore.AsyncNetworkStream:
        return await self.tcp.connect_unix_socket(*args, **kw)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class PeerTransport(httpx.AsyncHTTPTransport):
    """httpx transport whose connections to peer URLs go through a Connector."""

    def __init__(self, connector: Connector) -> None:
        super().__init__(verify=_https_context())  # not a CA store loaded per client (25 ms of CPU each)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_https_context(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_PeerBackend(connector),
        )


@functools.cache
def _https_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def http_client_factory(connector: Connector | None) -> Callable[..., httpx.AsyncClient]:
    """`factory(**httpx_kwargs)` -> an AsyncClient that reaches peer URLs through `connector` (if any) and
    signs its requests with the connector's identity when that is in a federation."""

    def make(**kw: Any) -> httpx.AsyncClient:
        if connector is None:
            return httpx.AsyncClient(**kw)
        from eldric_p2p.net.federation.httpauth import SignedAuth

        kw.setdefault("auth", SignedAuth(connector.identity))  # signs only once we are in a federation
        return httpx.AsyncClient(transport=PeerTransport(connector), trust_env=False, **kw)

    return make


def fetch_connect(connector: Connector) -> Callable[[str, int, bool], Awaitable[trio.abc.Stream]]:
    """The fetcher's `connect=`: peer URLs through `connector`, other hosts as the fetcher would."""
    from eldric_p2p.data.rangeclient import open_stream

    async def connect(host: str, port: int, tls: bool) -> trio.abc.Stream:
        peer_id = peer_of_host(host)
        if peer_id is None:
            return await open_stream(host, port, tls)
        return await connector.open_http(peer_id, port)

    return connect
