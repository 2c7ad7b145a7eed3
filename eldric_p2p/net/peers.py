"""Peers reached over HTTP: static bootstrap addresses, polled for node info, fed into a `PeerTable`.

    --peer HOST:PORT  ->  PeerDirectory polls GET /api/v1/node (and GET /api/v1/peers, to learn the peers'
                          peers) every `interval` s; each answer upserts a PeerInfo (source "static").

Every poll carries our HTTP port in the `x-eldric-http-port` header, so a node that was only given our address
by someone else learns to poll us back: `--peer` on one side is enough. Addresses learned that way or from
another peer's list are bounded (`MAX_ADDRESSES`); a peer not heard from for `expiry` s leaves the table.

Also here: small JSON helpers for node-to-node HTTP calls, and `fetch_model_index`, which reads a model's GGUF
header from a data peer (a prefix of the file, never the whole file) for planning and fit checks.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import httpx
import trio

from eldric_p2p.data.gguf_index import MAX_HEADER_BYTES, GGUFIndex, TruncatedHeader, parse_gguf_untrusted
from eldric_p2p.errors import EldricError, GGUFFormatError, ModelNotFound, PeerUnavailable
from eldric_p2p.net.discovery import PeerInfo, PeerTable
from eldric_p2p.net.identity import Identity, is_peer_id
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

PORT_HEADER = "x-eldric-http-port"
MAX_ADDRESSES = 256
MAX_JSON_BYTES = 4 << 20


def node_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def split_url(url: str) -> tuple[str, int]:
    """`http://host:port` -> (host, port). Raises ValueError."""
    u = httpx.URL(url)
    if u.host == "" or u.port is None:
        raise ValueError(f"not an http://HOST:PORT url: {url!r}")
    return u.host, u.port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def get_json(client: httpx.AsyncClient, url: str, *, timeout: float = 5.0) -> Any:
    """GET a JSON document. Raises PeerUnavailable (no answer, error status, not JSON, too large)."""
    try:
        resp = await client.get(url, timeout=timeout)
    except (httpx.HTTPError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PeerUnavailable(f"{url}: {exc or type(exc).__name__}") from exc
    return _json_of(resp, url)


async def post_json(
    client: httpx.AsyncClient, url: str, body: Any, *, timeout: float = 30.0
) -> tuple[int, Any]:
    """POST JSON; returns (status, document). Raises PeerUnavailable when there is no JSON answer."""
    try:
        resp = await client.post(url, json=body, timeout=timeout)
    except (httpx.HTTPError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PeerUnavailable(f"{url}: {exc or type(exc).__name__}") from exc
    if len(resp.content) > MAX_JSON_BYTES:
        raise PeerUnavailable(f"{url}: answer of {len(resp.content)} bytes is too large")
    try:
        return resp.status_code, resp.json()
    except ValueError as exc:
        raise PeerUnavailable(f"{url} answered {resp.status_code} without JSON") from exc


def _json_of(resp: httpx.Response, url: str) -> Any:
    if len(resp.content) > MAX_JSON_BYTES:
        raise PeerUnavailable(f"{url}: answer of {len(resp.content)} bytes is too large")
    if resp.status_code != 200:
        raise PeerUnavailable(f"{url} answered {resp.status_code}: {resp.text[:300]}")
    try:
        return resp.json()
    except ValueError as exc:
        raise PeerUnavailable(f"{url} did not answer JSON") from exc


async def fetch_model_index(client: httpx.AsyncClient, data_peers: list[str], model_id: str) -> GGUFIndex:
    """The GGUF header of `model_id` from the first data peer that serves it (Range requests for a prefix).

    Raises ModelNotFound (no peer serves it), PeerUnavailable, GGUFFormatError.
    """
    failures: list[str] = []
    not_served = 0
    for peer in data_peers:
        base = f"{peer.rstrip('/')}/api/v1/models/{model_id}"
        try:
            resp = await client.get(f"{base}/metadata", timeout=10.0)
            if resp.status_code == 404:
                not_served += 1
                failures.append(f"{peer}: does not serve it")
                continue
            meta = _json_of(resp, f"{base}/metadata")
            offset = meta.get("data_offset") if isinstance(meta, dict) else None
            want = offset if isinstance(offset, int) and 0 < offset <= MAX_HEADER_BYTES else 1 << 20
            while True:
                resp = await client.get(
                    f"{base}/blob", headers={"range": f"bytes=0-{want - 1}"}, timeout=30.0
                )
                if resp.status_code != 206:
                    raise PeerUnavailable(f"{peer} answered {resp.status_code} to a header range request")
                total = resp.headers.get("content-range", "").rpartition("/")[2]
                size = int(total) if total.isdigit() else None
                try:
                    return parse_gguf_untrusted(resp.content, file_size=size)
                except TruncatedHeader as exc:
                    if want >= MAX_HEADER_BYTES or (size is not None and want >= size):
                        raise GGUFFormatError(f"{peer}: GGUF header of {model_id!r} is truncated") from exc
                    want = min(max(exc.needed, 2 * want), MAX_HEADER_BYTES)
        except (httpx.HTTPError, PeerUnavailable) as exc:
            failures.append(f"{peer}: {exc}")
    if not_served == len(data_peers):
        raise ModelNotFound(f"no data peer serves {model_id!r} (asked {', '.join(data_peers) or 'none'})")
    raise PeerUnavailable(f"could not read the header of {model_id!r}: {'; '.join(failures)}")


class PeerDirectory:
    """Polls known node addresses and keeps `table` (a discovery.PeerTable) current.

    `await nursery.start(directory.run)`; `await directory.refresh()` polls now (the coordinator does before
    planning).
    """

    def __init__(
        self,
        own_peer_id: str,
        bootstrap: list[tuple[str, int]] = (),  # type: ignore[assignment]
        *,
        interval: float = 2.0,
        expiry: float = 15.0,
        client: httpx.AsyncClient | None = None,
        identity: Identity | None = None,
    ) -> None:
        """`identity`: ours, when it may be in a federation. Polls are then signed, a polled node must show a
        membership of the same federation, and its URL is its peer URL (reached over a member-checked
        link)."""
        self.own_peer_id = own_peer_id
        self.identity = identity
        self.table = PeerTable(own_peer_id)
        self.interval = interval
        self.expiry = expiry
        self.own_port: int | None = None
        self._client = client
        self._addresses: dict[str, bool] = {}  # url -> configured by the operator (kept even when silent)
        self._self_urls: set[str] = set()
        for host, port in bootstrap:
            self._addresses[node_url(host, port)] = True

    def add_address(self, host: str, port: int, *, configured: bool = False) -> None:
        url = node_url(host, port)
        if url in self._addresses or url in self._self_urls:
            return
        if len(self._addresses) >= MAX_ADDRESSES:
            log.warning("peer address table full (%d); not adding %s", MAX_ADDRESSES, url)
            return
        self._addresses[url] = configured

    @property
    def federated(self) -> bool:
        return self.identity is not None and self.identity.federated

    def _auth(self) -> httpx.Auth | None:
        if self.identity is None:
            return None
        from eldric_p2p.net.federation.httpauth import SignedAuth

        return SignedAuth(self.identity)

    def url_for(self, info: PeerInfo) -> str | None:
        """A peer's HTTP base URL: the polled one for a static peer, else a peer URL naming it by id
        (`connector.peer_url`, resolved by the Connector: direct to its announced addresses, else relayed).
        In a federation always the peer URL: only the member holding that id can answer it."""
        url = info.fields.get("url") if info.source == "static" and not self.federated else None
        if isinstance(url, str):
            return url
        if info.http_port is None:
            return None
        from eldric_p2p.net.connector import peer_url

        return peer_url(info.peer_id, info.http_port)

    @staticmethod
    def _plain_url(info: PeerInfo) -> str | None:
        """An HTTP address to poll the peer at (what a bootstrap poll needs, where `url` is a peer URL)."""
        url = info.fields.get("url") if info.source == "static" else None
        if isinstance(url, str):
            return url
        if info.http_port is None or not info.addresses:
            return None
        return node_url(info.addresses[0], info.http_port)

    @staticmethod
    def heads_of(info: PeerInfo) -> list[str]:
        """Models whose pipeline head runs on that peer: `heads` (static) or `head:`/`single:` shards."""
        out: list[str] = []
        for head in info.fields.get("heads") or []:
            model = head.get("model") if isinstance(head, dict) else None
            if isinstance(model, str):
                out.append(model)
        for shard in info.fields.get("shards") or []:
            role, _, model = str(shard).partition(":")
            if role in ("head", "single") and model and model not in out:
                out.append(model)
        return out

    def listing(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        out = []
        for info in self.table.peers():
            f = info.fields
            out.append(
                {
                    "peer_id": info.peer_id,
                    "name": info.name,
                    "url": self.url_for(info),
                    "http": self._plain_url(info),
                    "source": info.source,
                    "roles": f.get("roles", []),
                    "models": f.get("models", []),
                    "worker": f.get("worker"),
                    "heads": f.get("heads", []),
                    "last_seen_s": round(now - info.last_seen, 1),
                }
            )
        return sorted(out, key=lambda p: (p["name"], p["peer_id"]))

    async def refresh(self) -> None:
        """Poll every known address once (concurrently, a few seconds at most)."""
        client = self._client
        own = client is None
        if client is None:
            client = httpx.AsyncClient(auth=self._auth())
        try:
            polled: set[str] = set()
            for _round in range(3):  # addresses learned from a peer's list are polled in the same refresh
                todo = [u for u in self._addresses if u not in polled]
                if not todo:
                    break
                polled.update(todo)
                async with open_nursery() as nursery:
                    for url in todo:
                        nursery.start_soon(self._poll, client, url)
        finally:
            if own:
                await client.aclose()
        now = trio.current_time()
        for info in self.table.peers("static"):  # mdns and relay entries have their own expiry
            if now - info.last_seen > self.expiry:
                self.table.remove(info.peer_id, info.source)
                gone = info.fields.get("url")
                if isinstance(gone, str) and gone in self._addresses and not self._addresses[gone]:
                    del self._addresses[gone]

    async def _poll(self, client: httpx.AsyncClient, url: str) -> None:
        headers = {PORT_HEADER: str(self.own_port)} if self.own_port else {}
        try:
            with trio.fail_after(3):
                resp = await client.get(f"{url}/api/v1/node", headers=headers, timeout=3.0)
                info = _json_of(resp, url)
                peer_id = info.get("peer_id") if isinstance(info, dict) else None
                if not isinstance(peer_id, str) or not is_peer_id(peer_id):
                    raise PeerUnavailable(f"{url} is not an eldric-p2p node")
                if peer_id == self.own_peer_id:
                    self._self_urls.add(url)
                    self._addresses.pop(url, None)
                    return
                if self.federated and not self._shows_membership(info, peer_id):
                    return
                listed = _json_of(await client.get(f"{url}/api/v1/peers", timeout=3.0), url)
        except (PeerUnavailable, httpx.HTTPError, trio.TooSlowError, AttributeError) as exc:
            log.debug("peer %s did not answer: %s", url, exc)
            return
        host, port = split_url(url)
        fields = {k: info.get(k) for k in ("name", "roles", "models", "worker", "heads", "version")}
        fields["url"] = url
        self.table.upsert(
            PeerInfo(peer_id, str(info.get("name", "")), (host,), port, fields, "static", trio.current_time())
        )
        from eldric_p2p.net.connector import peer_of_host

        for p in listed.get("peers", []) if isinstance(listed, dict) else []:
            other = (p.get("http") or p.get("url")) if isinstance(p, dict) else None
            if not isinstance(other, str) or p.get("peer_id") == self.own_peer_id:
                continue
            try:
                ohost, oport = split_url(other)
            except (ValueError, httpx.InvalidURL):
                continue
            if peer_of_host(ohost) is not None:
                continue  # a peer URL: only a Connector reaches it; its addresses come with "http"
            if _is_loopback(ohost) and not _is_loopback(host):
                ohost = host  # "127.0.0.1" as that peer sees it is the peer's own machine
            self.add_address(ohost, oport)

    def _shows_membership(self, info: dict[str, Any], peer_id: str) -> bool:
        from eldric_p2p.net.federation.certs import chain_from_text

        assert self.identity is not None and self.identity.membership is not None
        fed = info.get("federation")
        try:
            chain = chain_from_text(fed.get("chain", "") if isinstance(fed, dict) else "")
            self.identity.membership.verify_peer(chain, peer_id)
        except EldricError as exc:
            log.debug("ignoring %s: not a member: %s", peer_id, exc)
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll forever, every `interval` s."""
        async with httpx.AsyncClient(auth=self._auth()) as client:
            if self._client is None:
                self._client = client
            task_status.started()
            while True:
                await self.refresh()
                await trio.sleep(self.interval)
