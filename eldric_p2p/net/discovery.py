"""Finding peers: the peer table, and LAN discovery over mDNS/DNS-SD (python-zeroconf).

`PeerTable` is the one place other code reads peers from. Each peer id may be known from several sources
("mdns", "static", "relay"); `get` prefers the most direct one. A node may be a member of several relays:
each relay's entries are kept apart by `via` (the relay's "HOST:PORT"), so one relay's directory update or
disconnect never touches what another relay said. The table is only touched from trio tasks.

`run_discovery` registers this node as `<peer id>._eldric-p2p._tcp.local.` with its announcement in TXT
properties, updates the record when the announcement changes, browses for other nodes, and keeps their
entries (source "mdns") until a goodbye packet or the record's TTL ends. Zeroconf runs its own threads:
its callbacks only post (state, name) pairs into a bounded trio channel via the trio token, and every blocking
zeroconf call runs in `trio.to_thread.run_sync` under a limiter.

mDNS is unauthenticated: a TXT record is a hint where to connect, never proof of a peer id. Links
authenticate the peer id end to end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ifaddr
import trio
from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from eldric_p2p.net.identity import is_peer_id
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

SERVICE_TYPE = "_eldric-p2p._tcp.local."
TXT_VERSION = "1"
MAX_TXT_VALUE = 200  # DNS-SD: one key=value string is at most 255 bytes
MAX_TXT_TOTAL = 1300  # DNS-SD: keep the whole TXT record within one packet
SOURCES = ("mdns", "static", "relay")  # most direct first: `PeerTable.get` prefers earlier sources
EVENT_QUEUE = 256


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Announcement:
    """What a node tells others about itself (over mDNS TXT and in its relay REGISTER)."""

    peer_id: str
    name: str
    http_port: int
    addresses: tuple[str, ...] = ()
    device: str = "cpu"
    memory_total: int = 0
    memory_free: int = 0
    roles: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    shards: tuple[str, ...] = ()
    link_port: int = 0  # where this node accepts links (0: none; in a federation HTTP to it goes over one)

    def to_fields(self) -> dict[str, Any]:
        """The announcement as a flat JSON object (the relay protocol's announcement)."""
        return {
            "name": self.name[:MAX_TXT_VALUE],
            "http_port": self.http_port,
            "addresses": list(self.addresses[:16]),
            "device": self.device[:64],
            "memory_total": self.memory_total,
            "memory_free": self.memory_free,
            "roles": _fit(self.roles, MAX_TXT_VALUE)[0],
            "models": _fit(self.models, MAX_TXT_VALUE)[0],
            "shards": _fit(self.shards, MAX_TXT_VALUE)[0],
            "link_port": self.link_port,
        }

    def txt_properties(self) -> dict[str, str]:
        """TXT key/values within DNS-SD's limits; lists that do not fit are cut (full count in `*_n`)."""
        props = {
            "v": TXT_VERSION,
            "id": self.peer_id,
            "name": _cut(self.name, MAX_TXT_VALUE),
            "http": str(self.http_port),
            "addr": ",".join(_fit(self.addresses, MAX_TXT_VALUE)[0]),
            "dev": _cut(self.device, 64),
            "mt": str(self.memory_total),
            "mf": str(self.memory_free),
            "lp": str(self.link_port),
        }
        budget = MAX_TXT_TOTAL - sum(len(k) + len(v) + 2 for k, v in props.items())
        for key, items in (("roles", self.roles), ("models", self.models), ("shards", self.shards)):
            kept, total = _fit(items, min(MAX_TXT_VALUE, max(0, budget - 16)))
            props[key] = ",".join(kept)
            if len(kept) < total:
                props[key + "_n"] = str(total)
            budget -= len(props[key]) + len(key) + 12
        return props


def _cut(text: str, limit: int) -> str:
    data = text.encode()[:limit]
    return data.decode("utf-8", errors="ignore")


def _fit(items: Sequence[str], limit: int) -> tuple[list[str], int]:
    """The leading items whose comma-joined UTF-8 length stays within `limit`, and how many there were."""
    kept: list[str] = []
    used = 0
    for item in items:
        item = item.replace(",", "_")
        size = len(item.encode()) + (1 if kept else 0)
        if used + size > limit:
            break
        kept.append(item)
        used += size
    return kept, len(items)


@dataclass
class PeerInfo:
    """One peer as seen from one source (and, for "relay", through one relay)."""

    peer_id: str
    name: str = ""
    addresses: tuple[str, ...] = ()
    http_port: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = "mdns"  # "mdns" | "static" | "relay": the kind of source
    last_seen: float = 0.0
    via: str = ""  # "relay" entries: the relay ("HOST:PORT") whose directory listed the peer; else ""


class PeerTable:
    """peer id -> what each source knows about it. Read anywhere; written from trio tasks only.

    Entries are keyed by (source, via): "mdns" and "static" have one entry per peer, "relay" one per relay
    that lists the peer. Wherever a method takes `via=None` it means every relay (or the one entry of a
    source that has no `via`); a "HOST:PORT" means only what that relay said.
    """

    def __init__(self, own_peer_id: str | None = None) -> None:
        self.own_peer_id = own_peer_id
        self._entries: dict[str, dict[tuple[str, str], PeerInfo]] = {}
        self.version = 0  # bumped on every change
        self._changed = trio.Event()
        self.excluded: Callable[[str], bool] = lambda peer_id: False  # e.g. revoked federation members

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, since: int) -> int:
        """Wait until the table's version differs from `since`; returns the new version."""
        while self.version == since:
            await self._changed.wait()
        return self.version

    @staticmethod
    def _check(source: str, via: str | None) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown peer source {source!r}")
        if via and source != "relay":
            raise ValueError(f"only relay entries come through a relay, not {source!r} (via {via!r})")

    @staticmethod
    def _keys(
        by_source: dict[tuple[str, str], PeerInfo], source: str, via: str | None
    ) -> list[tuple[str, str]]:
        return [k for k in by_source if k[0] == source and (via is None or k[1] == via)]

    def upsert(self, info: PeerInfo) -> None:
        self._check(info.source, info.via)
        if info.peer_id == self.own_peer_id or self.excluded(info.peer_id):
            return
        self._entries.setdefault(info.peer_id, {})[(info.source, info.via)] = info
        self._bump()

    def touch(self, peer_id: str, source: str, now: float, *, via: str | None = None) -> None:
        by_source = self._entries.get(peer_id, {})
        for key in self._keys(by_source, source, via):
            by_source[key].last_seen = now

    def remove(self, peer_id: str, source: str, *, via: str | None = None) -> bool:
        """Forget what `source` (through relay `via`; any relay when None) said about `peer_id`; True if
        there was something."""
        by_source = self._entries.get(peer_id)
        keys = self._keys(by_source, source, via) if by_source else []
        if not by_source or not keys:
            return False
        for key in keys:
            del by_source[key]
        if not by_source:
            del self._entries[peer_id]
        self._bump()
        return True

    def replace_source(self, source: str, infos: Iterable[PeerInfo], *, via: str | None = None) -> None:
        """Make `source`'s entries exactly `infos` (a full snapshot, e.g. a relay's directory).

        With `via` only the entries learned through that relay are replaced (`infos` are stored with that
        `via`), and every other relay's entries stay; with None, all of `source`'s entries are.
        """
        self._check(source, via)
        fresh: dict[tuple[str, str], PeerInfo] = {}
        for info in infos:
            if info.peer_id != self.own_peer_id and not self.excluded(info.peer_id):
                info = replace(info, source=source, via=info.via if via is None else via)
                fresh[(info.peer_id, info.via)] = info
        for peer_id, by_source in list(self._entries.items()):
            for key in self._keys(by_source, source, via):
                if (peer_id, key[1]) not in fresh:
                    del by_source[key]
            if not by_source:
                del self._entries[peer_id]
        for (peer_id, entry_via), info in fresh.items():
            self._entries.setdefault(peer_id, {})[(source, entry_via)] = info
        self._bump()

    def forget(self, peer_id: str) -> bool:
        """Drop every entry for `peer_id`, from every source; True if there was one."""
        if self._entries.pop(peer_id, None) is None:
            return False
        self._bump()
        return True

    def get(self, peer_id: str) -> PeerInfo | None:
        """The most direct source's entry for `peer_id` (mdns, then static, then relay); among several
        relays, the most recently seen entry (the freshest announcement)."""
        entries = self.entries(peer_id)
        if not entries:
            return None
        best = [i for i in entries if i.source == entries[0].source]
        return max(best, key=lambda i: i.last_seen)  # the first of equals: the relay that listed it first

    def entries(self, peer_id: str) -> list[PeerInfo]:
        """Every entry for `peer_id`, most direct source first (relays in the order they listed it)."""
        by_source = self._entries.get(peer_id, {})
        return [info for s in SOURCES for (source, _), info in by_source.items() if source == s]

    def sources(self, peer_id: str) -> list[str]:
        """The kinds of source that know `peer_id`, most direct first (each once, however many relays)."""
        by_source = self._entries.get(peer_id, {})
        return [s for s in SOURCES if any(source == s for source, _ in by_source)]

    def relays(self, peer_id: str) -> list[str]:
        """The relays ("HOST:PORT", the `via`s) whose directories list `peer_id`, in the order they did."""
        return [via for source, via in self._entries.get(peer_id, {}) if source == "relay"]

    def peers(self, source: str | None = None, *, via: str | None = None) -> list[PeerInfo]:
        """One entry per peer (the most direct, see `get`), or every entry from `source` (through relay
        `via` when given): a peer listed by two relays then appears once per relay."""
        if source is not None:
            return [by[k] for by in self._entries.values() for k in self._keys(by, source, via)]
        return [info for p in self._entries if (info := self.get(p)) is not None]

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def peer_info_from_fields(
    peer_id: str, fields: dict[str, Any], source: str, now: float, *, via: str = ""
) -> PeerInfo:
    """A PeerInfo from an announcement object (already checked by the relay protocol)."""
    port = fields.get("http_port")
    addrs = fields.get("addresses")
    return PeerInfo(
        peer_id=peer_id,
        name=str(fields.get("name", "")),
        addresses=tuple(a for a in addrs if isinstance(a, str)) if isinstance(addrs, list) else (),
        http_port=port if isinstance(port, int) and 0 < port < 65536 else None,
        fields=dict(fields),
        source=source,
        last_seen=now,
        via=via,
    )


# ---------------------------------------------------------------------------------------------- mDNS


def _int(text: str | None) -> int | None:
    if text is None or not text.isdigit() or len(text) > 20:
        return None
    return int(text)


def peer_info_from_service_untrusted(info: ServiceInfo, now: float) -> PeerInfo | None:
    """Parse a resolved DNS-SD service; None if it is not a well-formed eldric-p2p record."""
    props: dict[str, str] = {}
    for key, value in (info.properties or {}).items():
        if isinstance(key, bytes) and (value is None or isinstance(value, bytes)) and len(key) <= 32:
            props[key.decode("ascii", errors="replace")] = (value or b"").decode("utf-8", errors="replace")
    peer_id = props.get("id", "")
    instance = info.name[: -len(SERVICE_TYPE) - 1] if info.name.endswith("." + SERVICE_TYPE) else ""
    if not is_peer_id(peer_id) or instance != peer_id:
        return None
    http_port = _int(props.get("http"))
    fields: dict[str, Any] = {
        "name": props.get("name", ""),
        "http_port": http_port,
        "device": props.get("dev", ""),
        "memory_total": _int(props.get("mt")) or 0,
        "memory_free": _int(props.get("mf")) or 0,
        "link_port": lp if (lp := _int(props.get("lp"))) and lp < 65536 else 0,
    }
    for list_key in ("roles", "models", "shards"):
        fields[list_key] = [x for x in props.get(list_key, "").split(",") if x]
        if (n := _int(props.get(list_key + "_n"))) is not None:
            fields[list_key + "_n"] = n
    addresses = [a for a in info.parsed_addresses(IPVersion.V4Only)]
    addresses += [a for a in props.get("addr", "").split(",") if a and a not in addresses]
    fields["addresses"] = addresses[:16]
    return PeerInfo(
        peer_id=peer_id,
        name=fields["name"],
        addresses=tuple(addresses[:16]),
        http_port=http_port if http_port and http_port < 65536 else None,
        fields=fields,
        source="mdns",
        last_seen=now,
    )


def local_ipv4_addresses(include_loopback: bool = False) -> list[str]:
    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and (include_loopback or not ip.ip.startswith("127.")):
                out.append(ip.ip)
    return out


def _service_info(ann: Announcement, addresses: list[str], ttl: int) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"{ann.peer_id}.{SERVICE_TYPE}",
        parsed_addresses=addresses,
        port=ann.http_port,
        properties=ann.txt_properties(),
        server=f"{ann.peer_id}.local.",
        host_ttl=ttl,
        other_ttl=ttl,
    )


@dataclass
class DiscoveryStats:
    events: int = 0
    events_dropped: int = 0  # the bridge queue was full
    malformed: int = 0  # services under our type that are not well-formed records
    updates_sent: int = 0


async def run_discovery(
    table: PeerTable,
    announcement_fn: Callable[[], Announcement],
    *,
    interfaces: Sequence[str] | None = None,
    ttl: int = 60,
    poll_interval: float = 1.0,
    stats: DiscoveryStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce this node over mDNS and keep `table`'s "mdns" entries current, until cancelled.

    `interfaces`: IPv4 addresses to use (["127.0.0.1"] for loopback-only tests); all interfaces by default.
    `announcement_fn` is polled every `poll_interval` seconds; a changed TXT record is re-announced.
    Peers leave on a goodbye packet or when their records' `ttl` (seconds) runs out. Returns when
    cancelled, after sending goodbye packets and removing the "mdns" entries.
    """
    stats = stats if stats is not None else DiscoveryStats()
    limiter = trio.CapacityLimiter(2)
    token = trio.lowlevel.current_trio_token()
    send, recv = trio.open_memory_channel[tuple[ServiceStateChange, str]](EVENT_QUEUE)

    def post(item: tuple[ServiceStateChange, str]) -> None:  # runs in the trio thread
        try:
            send.send_nowait(item)
        except trio.WouldBlock:
            stats.events_dropped += 1
        except trio.ClosedResourceError:
            pass

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        try:  # runs in a zeroconf thread: never block it, never touch trio state from here
            token.run_sync_soon(post, (state_change, name))
        except trio.RunFinishedError:
            pass

    def addresses_of(ann: Announcement) -> list[str]:
        if ann.addresses:
            return list(ann.addresses)
        if interfaces is not None:
            return list(interfaces)
        return local_ipv4_addresses() or local_ipv4_addresses(include_loopback=True)

    zc = await trio.to_thread.run_sync(
        lambda: Zeroconf(
            interfaces=list(interfaces) if interfaces is not None else InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        ),
        limiter=limiter,
    )
    browser: ServiceBrowser | None = None
    try:
        table.own_peer_id = table.own_peer_id or announcement_fn().peer_id
        browser = await trio.to_thread.run_sync(
            lambda: ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change]), limiter=limiter
        )
        ann = announcement_fn()
        info = _service_info(ann, addresses_of(ann), ttl)
        await trio.to_thread.run_sync(zc.register_service, info, limiter=limiter)
        task_status.started()

        async def resolve(name: str) -> None:
            found = await trio.to_thread.run_sync(
                lambda: zc.get_service_info(SERVICE_TYPE, name, timeout=3000), limiter=limiter
            )
            if found is None:
                return
            peer = peer_info_from_service_untrusted(found, trio.current_time())
            if peer is None:
                stats.malformed += 1
            else:
                table.upsert(peer)

        async def reannounce() -> None:
            nonlocal info
            while True:
                await trio.sleep(poll_interval)
                ann = announcement_fn()
                new = _service_info(ann, addresses_of(ann), ttl)
                if new.properties != info.properties or new.port != info.port:
                    info = new
                    await trio.to_thread.run_sync(zc.update_service, info, limiter=limiter)
                    stats.updates_sent += 1

        async def sweep() -> None:
            """Drop peers whose records zeroconf no longer holds (a browser event can be lost)."""
            while True:
                await trio.sleep(max(1.0, ttl / 4))
                for peer in table.peers("mdns"):
                    probe = ServiceInfo(SERVICE_TYPE, f"{peer.peer_id}.{SERVICE_TYPE}")
                    held = await trio.to_thread.run_sync(probe.load_from_cache, zc, limiter=limiter)
                    if held:
                        table.touch(peer.peer_id, "mdns", trio.current_time())
                    elif trio.current_time() - peer.last_seen > ttl:
                        table.remove(peer.peer_id, "mdns")

        async with open_nursery() as nursery:
            nursery.start_soon(reannounce)
            nursery.start_soon(sweep)
            async for state, name in recv:
                stats.events += 1
                if state is ServiceStateChange.Removed:
                    instance = name[: -len(SERVICE_TYPE) - 1]
                    table.remove(instance, "mdns")
                elif name.endswith("." + SERVICE_TYPE):
                    nursery.start_soon(resolve, name)
    finally:
        send.close()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if browser is not None:
                await trio.to_thread.run_sync(browser.cancel)
            await trio.to_thread.run_sync(zc.unregister_all_services)
            await trio.to_thread.run_sync(zc.close)
        for peer in table.peers("mdns"):
            table.remove(peer.peer_id, "mdns")


__all__ = [
    "Announcement",
    "DiscoveryStats",
    "PeerInfo",
    "PeerTable",
    "SERVICE_TYPE",
    "local_ipv4_addresses",
    "peer_info_from_fields",
    "peer_info_from_service_untrusted",
    "run_discovery",
]
