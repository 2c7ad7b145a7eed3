"""The node: one trio process running every role this machine is configured for, behind one HTTP app.

Each role contributes Starlette routes (and, later, background services); `Node.run` assembles them into
one app and serves it. Roles so far: gateway (always: `GET /api/v1/node`) and data peer (`--models`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from eldric_p2p import __version__
from eldric_p2p.datapeer import Catalog, datapeer_routes
from eldric_p2p.errors import UsageError
from eldric_p2p.http_server import EXCEPTION_HANDLERS, serve_app
from eldric_p2p.identity import Identity
from eldric_p2p.paths import default_data_dir

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
        self.identity = Identity.load_or_create(config.data_dir)
        self.name = config.name or self.identity.peer_id[:10]
        self.catalog: Catalog | None = None
        self.port: int | None = None

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peer_id": self.identity.peer_id,
            "version": __version__,
            "roles": self.config.roles,
            "models": sorted(self.catalog.models) if self.catalog else [],
        }

    def routes(self) -> list[Route]:
        async def node_info(request: Request) -> JSONResponse:
            return JSONResponse(self.info())

        routes = [Route("/api/v1/node", node_info, methods=["GET"])]
        if self.catalog is not None:
            routes += datapeer_routes(self.catalog)
        return routes

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Index the models, serve every role's routes, hash the models in the background; until cancelled."""
        cfg = self.config
        if cfg.models:
            self.catalog = await trio.to_thread.run_sync(lambda: Catalog.scan(cfg.models, data_dir=cfg.data_dir))
            if not self.catalog.models:
                log.warning("--models given but no valid GGUF file found")
        app = Starlette(routes=self.routes(), exception_handlers=EXCEPTION_HANDLERS)
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve_app, app, cfg.listen_host, cfg.listen_port)
            if self.catalog is not None:
                nursery.start_soon(self.catalog.hash_all)
            task_status.started(self.port)
