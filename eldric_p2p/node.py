"""The node: one trio process running every role this machine is configured for, behind one HTTP app.

Each role contributes Starlette routes and background services; `Node.run` assembles them into one app and
serves it. Roles: gateway (always: `GET /api/v1/node`, `POST /api/v1/pipeline/generate`), data peer
(`--models`), worker (unless `--no-worker`: load/unload/status and a link listener for pipeline frames),
coordinator (always: deploy/status/models/undeploy/rebalance, peers from `--peer` bootstrap), edge relay
(`--relay-listen`).

Finding peers: `--peer` bootstrap (HTTP polling), mDNS on the LAN (unless `--no-mdns`) and the directory of
each `--relay`; all three feed one `PeerTable` (`node.peers.table`), read by the coordinator and the gateway.
Reaching them: `node.connector` (eldric_p2p.net.connector) gives links and HTTP streams by peer id, direct where
an address answers and relayed otherwise; incoming relayed streams go through the same link dispatch as
direct links (pipeline frames to the worker, HTTP-tagged links to this node's own HTTP port).

`node.backends()` lists what the gateway can route a generation to: a `PipelineBackend` for each pipeline
whose head stage runs here, and a `RemotePipelineBackend` for each head a peer reports.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from eldric_p2p import __version__
from eldric_p2p.api.backends.base import Backend
from eldric_p2p.api.backends.pipeline import MAX_QUEUE, PipelineBackend
from eldric_p2p.api.backends.remote import RemotePipelineBackend, pipeline_routes
from eldric_p2p.api.backends.upstream import UpstreamBackend
from eldric_p2p.api.dashboard import dashboard_routes
from eldric_p2p.api.gateway import gateway_routes
from eldric_p2p.api.metrics import metrics_routes
from eldric_p2p.api.router import Router
from eldric_p2p.data.datapeer import Catalog, datapeer_routes
from eldric_p2p.errors import UsageError
from eldric_p2p.http_server import EXCEPTION_HANDLERS, serve_app
from eldric_p2p.net.connector import Connector, http_client_factory
from eldric_p2p.net.discovery import Announcement, local_ipv4_addresses, run_discovery
from eldric_p2p.net.federation.certs import chain_to_text
from eldric_p2p.net.federation.httpauth import FederationGate
from eldric_p2p.net.federation.service import FederationService
from eldric_p2p.net.federation.store import Membership, write_private
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import serve_tcp_links
from eldric_p2p.net.peers import PORT_HEADER, PeerDirectory, node_url
from eldric_p2p.net.relay.client import RelayMember
from eldric_p2p.net.relay.server import Relay, run_relay
from eldric_p2p.paths import default_data_dir
from eldric_p2p.pipeline.cache import MODEL_TTL_S, cache_routes
from eldric_p2p.pipeline.coordinator import HEARTBEAT_S, Coordinator
from eldric_p2p.pipeline.coordinator_routes import coordinator_routes
from eldric_p2p.pipeline.owner import OwnerPolicy, yield_to_owner
from eldric_p2p.pipeline.worker import Worker
from eldric_p2p.pipeline.worker_routes import worker_routes
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

DEFAULT_PORT = 8470


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """`'0.0.0.0:8470'`, `'[::1]:8470'`, `':8470'` (all addresses) or `'host'` (with `default_port`).

    Raises UsageError.
    """
    host, sep, port = text.rpartition(":")
    if not sep or (text.startswith("[") and not host.endswith("]")):
        host, port = text, ""
    host = host.strip("[]") or "0.0.0.0"
    if not port:
        if default_port is None:
            raise UsageError(f"{text!r}: expected HOST:PORT")
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{text!r}: port must be a number 0-65535")
    return host, int(port)


def _punch_summary(member: RelayMember) -> dict[str, Any] | None:
    """Hole punching through one relay, for /api/v1/node: counts and times to punch (seconds)."""
    puncher = member.puncher
    if puncher is None:
        return None
    s = puncher.stats
    live = {pid: c for pid, c in puncher.conns.items() if puncher.live(pid)}
    return {
        "brokered": member.can_punch,  # this relay brokers punches for us
        "attempts": s.attempts,
        "punched": s.punched,
        "forwarded": s.forwarded,  # punch failed; QUIC through the relay's forwarding channel instead
        "failed": s.failed,
        "connections": sorted(pid for pid in live if not live[pid].forwarded),
        "channels": sorted(pid for pid in live if live[pid].forwarded),  # through the relay's channel
        "last_s": round(s.last_punch_s, 4) if s.last_punch_s is not None else None,
        "times_s": [round(t, 4) for t in s.times_s],
    }


@dataclass
class NodeConfig:
    """Everything `eldric-p2p node` was asked for; roles not built yet keep their settings here."""

    name: str = ""
    data_dir: Path = field(default_factory=default_data_dir)
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_PORT
    models: list[Path] = field(default_factory=list)
    memory: int | None = None  # bytes the worker offers; None = what the device has
    device: str = "auto"
    worker: bool = True
    peers: list[tuple[str, int]] = field(default_factory=list)
    mdns: bool = True
    relays: list[tuple[str, int]] = field(default_factory=list)
    relay_listen: tuple[str, int] | None = None
    punch: bool = True  # take part in UDP hole punching through our relays (direct paths across NATs)
    tcp_punch: bool = True  # move punched links onto TCP through the NATs where it forms (net/tcppunch.py)
    link_port: int = 0  # pipeline links (TLS over TCP) on listen_host; 0 picks a free port
    peer_interval: float = 2.0  # seconds between polls of the bootstrap peers
    api_keys: list[str] = field(default_factory=list)  # required as `Authorization: Bearer KEY` on /v1
    # /v1 in a federation: open | api-key | member (None: api-key if keys are given, else member). A node in
    # no federation checks only the API keys, if any.
    v1_auth: str | None = None
    upstreams: list[tuple[str, str]] = field(default_factory=list)  # (model name, OpenAI-compatible base URL)
    relay_options: dict[str, Any] = field(default_factory=dict)  # RelayMember options (tests: backoff)
    owner: OwnerPolicy | None = None  # owner first: when this machine's owner needs it, its stages move away
    on_demand: bool = False  # a /v1 request for a model no pipeline serves deploys it (pipeline.cache)
    model_ttl: float = MODEL_TTL_S  # on-demand models unload after this long unused (0: never)
    on_demand_options: dict[str, Any] = field(default_factory=dict)  # deploy options of on-demand loads
    rebalance: bool = True  # move a running model onto fewer stages when a worker that allows it joins
    heartbeat_s: float = HEARTBEAT_S  # how often the coordinator polls the workers of its deployments
    max_queue: int = MAX_QUEUE  # requests that may wait for a pipeline headed here beyond its sessions
    keep_warm: float | None = None  # s the CPUs stay awake after a step (engine/warm.py); None: the default

    @property
    def roles(self) -> list[str]:
        roles = ["gateway"]
        if self.models:
            roles.append("data-peer")
        if self.worker:
            roles.append("worker")
        if self.relay_listen is not None:
            roles.append("relay")
        return roles


class Node:
    """One node. `await nursery.start(node.run)` returns the bound port once it serves."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        identity = Identity.load_or_create(config.data_dir)
        self.identity = identity.with_membership(Membership(config.data_dir, identity))
        self.membership: Membership = self.identity.membership  # type: ignore[assignment]
        self.name = config.name or self.identity.peer_id[:10]
        self.catalog: Catalog | None = None
        self.port: int | None = None
        self.link_port = 0  # a federated node without a worker still accepts links (HTTP over them)
        self.peers = PeerDirectory(
            self.identity.peer_id, config.peers, interval=config.peer_interval, identity=self.identity
        )
        self.peers.table.excluded = lambda peer_id: peer_id in self.membership.revocations
        self.membership.on_revoked.append(self.peers.table.forget)  # a revoked member leaves the table
        self.connector = Connector(self.identity, self.peers.table)
        self.connector.tcp_punches.enabled = config.tcp_punch
        self.connector.local_http = self._local_http
        self.client_factory = http_client_factory(self.connector)
        self.relay: Relay | None = None
        self.members: list[RelayMember] = []
        self.worker: Worker | None = None
        if config.worker:
            self.worker = Worker(
                self.identity,
                name=self.name,
                data_dir=config.data_dir,
                device=config.device,
                memory=config.memory,
                link_host=config.listen_host,
                link_port=config.link_port,
                connector=self.connector,
                keep_warm=config.keep_warm,
            )
            self.connector.frames_handler = self.worker.serve_link
        self.coordinator = Coordinator(
            self.peers,
            own_url=lambda: self.url,
            own_models=lambda: sorted(self.catalog.models) if self.catalog else [],
            own_is_worker=self.worker is not None,
            client_factory=self.client_factory,
            revoked=lambda peer_id: peer_id in self.membership.revocations,
            heartbeat_s=config.heartbeat_s,
        )
        self.coordinator.on_demand = config.on_demand
        self.coordinator.auto_rebalance = config.rebalance
        self.coordinator.model_ttl = config.model_ttl
        self.coordinator.on_demand_options = dict(config.on_demand_options)
        self.federation = FederationService(
            self.identity, peer_urls=self._peer_urls, client_factory=self.client_factory
        )
        self._remote: dict[tuple[str, str], RemotePipelineBackend] = {}
        self.upstreams = [UpstreamBackend(name, url) for name, url in config.upstreams]
        self.router = Router(
            [self.backends, lambda: self.upstreams],
            refresh=self.peers.refresh,
            max_queue=config.max_queue,
            load=self.coordinator.load_on_demand if config.on_demand else None,
        )

    @property
    def url(self) -> str | None:
        return node_url(self.config.listen_host, self.port) if self.port is not None else None

    def info(self) -> dict[str, Any]:
        w = self.worker
        return {
            "name": self.name,
            "peer_id": self.identity.peer_id,
            "version": __version__,
            "roles": self.config.roles,
            "models": sorted(self.catalog.models) if self.catalog else [],
            "worker": w.summary() if w is not None else None,
            "heads": [{"model": s.a.model_id, "deployment_id": s.a.deployment_id} for s in w.heads()]
            if w
            else [],
            "relay": {
                "peer_id": self.identity.peer_id,
                "members": len(self.relay.members),
                "tcp_port": self.relay.tcp_port or None,  # its TCP lane
                # splices of the lane, how many the kernel copied (the rest: the event loop), bytes moved
                "lane": asdict(self.relay.lane.stats) if self.relay.lane is not None else None,
            }
            if self.relay is not None
            else None,
            "relays": [
                {
                    "relay": m.address,
                    "registered": m.registered,
                    "relay_id": m.relay_id,
                    "connects": m.connects,
                    "peers": len(self.peers.table.peers("relay", via=m.address)),  # listed by this relay
                    "punch": _punch_summary(m),
                    "tcp_lane": m.tcp_lane,  # relayed streams go over the relay's TCP lane
                    "lane_streams": m.lane_streams,
                }
                for m in self.members
            ],
            "paths": dict(self.connector.paths),
            "link_stats": dict(self.connector.stats),  # how links went: direct, punched (onto TCP), relayed
            "federation": {
                "id": self.membership.id,
                "admin": self.membership.is_admin,
                "chain": chain_to_text(self.membership.chain),
            }
            if self.membership.active
            else None,
        }

    def _peer_urls(self) -> list[str]:
        """One URL per known peer (revocations are pushed to each)."""
        urls = {}
        for info in self.peers.table.peers():
            url = self.peers.url_for(info)
            if url is not None:
                urls.setdefault(info.peer_id, url)
        return list(urls.values())

    @property
    def v1_mode(self) -> str:
        if self.config.v1_auth is not None:
            return self.config.v1_auth
        return "api-key" if self.config.api_keys else "member"

    def _local_http(self) -> tuple[str, int] | None:
        """Where HTTP-tagged links are spliced to: our own HTTP port."""
        if self.port is None:
            return None
        host = self.config.listen_host
        return ("127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host), self.port

    def addresses(self) -> tuple[str, ...]:
        """The addresses we announce (where our HTTP and link ports listen)."""
        host = self.config.listen_host
        if host in ("0.0.0.0", "::", ""):
            return tuple(local_ipv4_addresses() or ["127.0.0.1"])
        return (host,)

    def announcement(self) -> Announcement:
        """What mDNS and the relays tell other nodes about us (re-read every second; changes re-announced)."""
        w = self.worker
        heads = set(id(s) for s in w.heads()) if w is not None else set()
        held = w.shards.values() if w is not None else ()
        shards = tuple(f"{'head' if id(s) in heads else 'stage'}:{s.a.model_id}" for s in held)
        return Announcement(
            peer_id=self.identity.peer_id,
            name=self.name,
            http_port=self.port or 0,
            addresses=self.addresses(),
            device=w.device if w is not None else "",
            memory_total=w.offered if w is not None else 0,
            memory_free=w.free if w is not None else 0,
            roles=tuple(self.config.roles),
            models=tuple(sorted(self.catalog.models)) if self.catalog else (),
            shards=shards,
            link_port=w.link_port if w is not None else self.link_port,
        )

    @staticmethod
    def _own_relay(relay: Relay) -> tuple[str, int]:
        """Where this node reaches its own relay. A relay host that also serves models or runs a worker is a
        member of its own directory like any other, or the members behind NAT would never learn of it."""
        assert relay.address is not None
        host, port = relay.address[:2]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return host, port

    def relay_announcement(self) -> dict[str, Any]:
        fields = self.announcement().to_fields()
        fields["link_port"] = self.worker.link_port if self.worker is not None else self.link_port
        return fields

    def backends(self) -> list[Backend]:
        """Where a generation can go: pipelines headed here first, then heads on peers."""
        out: list[Backend] = []
        if self.worker is not None:
            for shard in self.worker.heads():
                if shard.backend is None:
                    shard.backend = PipelineBackend(self.worker, shard, max_queue=self.config.max_queue)
                out.append(shard.backend)
        for info in self.peers.table.peers():
            url = self.peers.url_for(info)
            if url is None:
                continue
            for model in self.peers.heads_of(info):
                key = (url, model)
                if key not in self._remote:
                    self._remote[key] = RemotePipelineBackend(
                        url, model, info={"peer": info.name}, client_factory=self.client_factory
                    )
                out.append(self._remote[key])
        # pipelines this node's coordinator deployed, before any peer poll reported their heads
        served = {b.model_id for b in out}
        for dep in self.coordinator.deployments.values():
            head = dep.shards[0].url if dep.shards else None
            if dep.state != "ready" or dep.model in served or not head or head == self.url:
                continue
            key = (head, dep.model)
            if key not in self._remote:
                peer = {"peer": dep.shards[0].stage.name}
                self._remote[key] = RemotePipelineBackend(
                    head, dep.model, info=peer, client_factory=self.client_factory
                )
            out.append(self._remote[key])
        return out

    def routes(self) -> list[Route]:
        async def node_info(request: Request) -> JSONResponse:
            port = request.headers.get(PORT_HEADER, "")
            if port.isdigit() and 0 < int(port) < 65536 and request.client is not None:
                self.peers.add_address(request.client.host, int(port))  # a node that polls us: poll it back
            return JSONResponse(self.info())

        routes = [Route("/api/v1/node", node_info, methods=["GET"])]
        if self.catalog is not None:
            routes += datapeer_routes(self.catalog)
        if self.worker is not None:
            routes += worker_routes(self.worker)
        routes += coordinator_routes(self.coordinator)
        routes += cache_routes(self.coordinator, self.worker)
        routes += self.federation.routes()
        routes += pipeline_routes(self.backends, self.peers.refresh)
        routes += gateway_routes(self.router, api_keys=self.config.api_keys)
        routes += metrics_routes()
        routes += dashboard_routes(self.router)
        return routes

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Index the models, serve every role's routes, hash the models in the background; until cancelled."""
        cfg = self.config
        if cfg.models:
            self.catalog = await trio.to_thread.run_sync(
                lambda: Catalog.scan(cfg.models, data_dir=cfg.data_dir)
            )
            if not self.catalog.models:
                log.warning("--models given but no valid GGUF file found")
        app = FederationGate(
            Starlette(routes=self.routes(), exception_handlers=EXCEPTION_HANDLERS),
            self.identity,
            v1_mode=self.v1_mode,
            api_keys=cfg.api_keys,
        )
        async with open_nursery() as nursery:
            if self.worker is not None:
                await nursery.start(self.worker.run)
                if cfg.owner is not None and cfg.owner.active:
                    await nursery.start(yield_to_owner, self.worker, cfg.owner)
            elif self.membership.active:
                listeners = await nursery.start(
                    serve_tcp_links, self.identity, cfg.listen_host, cfg.link_port, self.connector.dispatch
                )
                self.link_port = listeners[0].socket.getsockname()[1]
            await nursery.start(self.federation.run)
            self.port = await nursery.start(serve_app, app, cfg.listen_host, cfg.listen_port)
            self.peers.own_port = self.port
            if self.catalog is not None:
                nursery.start_soon(self.catalog.hash_all)
            await nursery.start(self.peers.run)
            await nursery.start(self.coordinator.run)
            relays = list(dict.fromkeys(cfg.relays))  # one membership per relay: its entries' `via`
            if cfg.relay_listen is not None:
                host, port = cfg.relay_listen
                self.relay = await nursery.start(run_relay, host, port, self.identity)
                if self.catalog is not None or self.worker is not None:
                    relays.insert(0, self._own_relay(self.relay))
            for host, port in relays:
                member = RelayMember(
                    self.identity,
                    host,
                    port,
                    self.peers.table,
                    self.relay_announcement,
                    self.connector.handle_relayed,
                    punch_handler=self.connector.handle_punched if cfg.punch else None,
                    **cfg.relay_options,
                )
                self.members.append(member)
                self.connector.members.append(member)
                await nursery.start(member.run)
            if cfg.mdns:
                lan = None if cfg.listen_host in ("0.0.0.0", "::", "") else [cfg.listen_host]
                await nursery.start(
                    lambda task_status: run_discovery(
                        self.peers.table, self.announcement, interfaces=lan, task_status=task_status
                    )
                )
            self._write_state()
            task_status.started(self.port)

    def _write_state(self) -> None:
        """Where this node can be reached, for `eldric-p2p federation invite` to put in its tokens."""
        import json

        relays = [m.address for m in self.members if not m.host.startswith("127.") and m.host != "::1"]
        if self.relay is not None and self.relay.address is not None:
            rhost, rport = self.relay.address[:2]
            hosts = self.addresses() if rhost in ("0.0.0.0", "::", "") else (rhost,)
            relays = [f"{h}:{rport}" for h in hosts] + relays
        state = {
            "peer_id": self.identity.peer_id,
            "http": [f"{h}:{self.port}" for h in self.addresses()],
            "relays": relays,
        }
        try:
            write_private(Path(self.config.data_dir) / "node.json", json.dumps(state).encode(), mode=0o644)
        except OSError as exc:
            log.warning("cannot write %s/node.json: %s", self.config.data_dir, exc)
