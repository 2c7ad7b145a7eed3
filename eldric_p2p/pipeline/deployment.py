"""A deployment as its coordinator tracks it: the plan's stages, each shard's state from its worker's
heartbeats, and (for the model cache, pipeline.cache) its TTL and last use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from eldric_p2p.pipeline.assignment import StageRef


@dataclass
class ShardState:
    stage: StageRef
    url: str
    needed: int
    state: str = "pushed"
    error: str | None = None
    bytes_fetched: int = 0
    progress: dict[str, int] = field(default_factory=dict)
    last_heartbeat: float = 0.0  # trio clock
    next_hop_ok: bool = True
    link: str | None = None  # path of the link to the next hop: "direct" | "relayed" (None: not open yet)
    link_transport: str | None = None  # what carries that link: "tcp" | "quic"
    draining: str | None = None  # its worker takes no new work and wants this shard moved (and why)


@dataclass
class Deployment:
    id: str
    model: str
    data_peers: list[str]
    strategy: str
    weights: str
    max_ctx: int
    sessions: int
    shards: list[ShardState]
    note: str = ""
    created: float = field(default_factory=time.time)
    workers_asked: list[str] | None = None
    ttl_s: float = 0.0  # unloaded after this long without a session (0: stays until undeployed)
    on_demand: bool = False  # loaded by a request for a model nothing served (`--on-demand`)
    last_used: float = field(default_factory=time.time)  # wall clock: the head's last session open or close
    active: int = 0  # sessions open at the head, at the last heartbeat
    known_workers: set[str] = field(default_factory=set)  # peer ids of the workers there were when planned

    @property
    def memory(self) -> int:
        return sum(s.needed for s in self.shards)

    def idle_s(self, wall: float) -> float:
        return 0.0 if self.active else max(0.0, wall - self.last_used)

    @property
    def state(self) -> str:
        states = {s.state for s in self.shards}
        if any(not s.next_hop_ok for s in self.shards):
            return "degraded"
        if states == {"ready"}:
            return "ready"
        if states & {"lost", "failed", "unloaded"}:
            return "degraded"
        return "loading"

    def as_json(self, now: float) -> dict[str, Any]:
        n = len(self.shards)
        return {
            "id": self.id,
            "model": self.model,
            "state": self.state,
            "strategy": self.strategy,
            "note": self.note,
            "data_peers": self.data_peers,
            "created": self.created,
            "max_ctx": self.max_ctx,
            "sessions": self.sessions,
            "n_layers": self.shards[-1].stage.end if self.shards else 0,
            "memory": self.memory,
            "ttl_s": self.ttl_s,
            "on_demand": self.on_demand,
            "last_used": round(self.last_used, 3),
            "sessions_active": self.active,
            "head": self.shards[0].url if n else None,
            "stages": [
                {
                    "index": s.stage.index,
                    "worker": s.stage.name,
                    "peer_id": s.stage.peer_id,
                    "url": s.url,
                    "role": "single" if n == 1 else "head" if i == 0 else "tail" if i == n - 1 else "middle",
                    "start": s.stage.start,
                    "end": s.stage.end,
                    "layers": s.stage.end - s.stage.start,
                    "state": s.state,
                    "error": s.error,
                    "memory": s.needed,
                    "bytes_fetched": s.bytes_fetched,
                    "progress": s.progress,
                    "next_hop_ok": s.next_hop_ok,
                    "link": s.link,
                    "link_transport": s.link_transport,
                    "draining": s.draining,
                    "last_heartbeat_s": round(now - s.last_heartbeat, 1) if s.last_heartbeat else None,
                }
                for i, s in enumerate(self.shards)
            ],
        }
