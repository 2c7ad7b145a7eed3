"""A shard assignment: which layers of which model a worker runs, and where its neighbours in the ring are.

The coordinator sends one to each worker (`POST /api/v1/pipeline/load`); the worker parses it with
`Assignment.from_json_untrusted`, which checks every field and bound and raises `UsageError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eldric_p2p.errors import UsageError
from eldric_p2p.net.identity import is_peer_id

MAX_STAGES = 64
MAX_DATA_PEERS = 16


@dataclass(frozen=True)
class StageRef:
    """One stage of a deployment's plan, as every stage sees it (for routing and for naming failures)."""

    index: int
    start: int
    end: int
    peer_id: str
    name: str
    host: str
    link_port: int

    def label(self) -> str:
        return f"stage {self.index} (layers {self.start}-{self.end - 1}) on {self.name}"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Assignment:
    """What a worker is asked to load: stage `stage_index` of the plan `stages`."""

    deployment_id: str
    model_id: str
    data_peers: tuple[str, ...]
    stage_index: int
    stages: tuple[StageRef, ...]
    weights: str = "auto"
    max_ctx: int = 4096
    sessions: int = 4

    @property
    def me(self) -> StageRef:
        return self.stages[self.stage_index]

    @property
    def start(self) -> int:
        return self.me.start

    @property
    def end(self) -> int:
        return self.me.end

    @property
    def single(self) -> bool:
        return len(self.stages) == 1

    @property
    def role(self) -> str:
        if self.single:
            return "single"
        return (
            "head"
            if self.stage_index == 0
            else "tail"
            if self.stage_index == len(self.stages) - 1
            else "middle"
        )

    @property
    def prev(self) -> StageRef:
        """The previous hop in the ring (the tail, for the head: it sends the tokens)."""
        return self.stages[self.stage_index - 1]

    @property
    def next(self) -> StageRef:
        """The next hop in the ring (the head, for the tail)."""
        return self.stages[(self.stage_index + 1) % len(self.stages)]

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment_id": self.deployment_id,
            "model_id": self.model_id,
            "data_peers": list(self.data_peers),
            "stage_index": self.stage_index,
            "stages": [s.to_json() for s in self.stages],
            "weights": self.weights,
            "max_ctx": self.max_ctx,
            "sessions": self.sessions,
            # derived, for people reading it:
            "start": self.start,
            "end": self.end,
            "role": self.role,
            "next_hop": None if self.single else self.next.to_json(),
        }

    @classmethod
    def from_json_untrusted(cls, obj: Any) -> Assignment:
        """Parse and check an assignment from a coordinator. Raises UsageError naming the bad field."""

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise UsageError(f"bad assignment: {what}")

        need(isinstance(obj, dict), "not a JSON object")
        dep, model = obj.get("deployment_id"), obj.get("model_id")
        need(isinstance(dep, str) and 0 < len(dep) <= 128, "deployment_id")
        need(isinstance(model, str) and 0 < len(model) <= 256 and "/" not in model, "model_id")
        peers = obj.get("data_peers")
        need(
            isinstance(peers, list)
            and 0 < len(peers) <= MAX_DATA_PEERS
            and all(isinstance(p, str) and p.startswith(("http://", "https://")) for p in peers),
            "data_peers",
        )
        raw = obj.get("stages")
        need(isinstance(raw, list) and 0 < len(raw) <= MAX_STAGES, "stages")
        stages: list[StageRef] = []
        for i, s in enumerate(raw):
            need(isinstance(s, dict), f"stages[{i}]")
            try:
                ref = StageRef(
                    int(s["index"]),
                    int(s["start"]),
                    int(s["end"]),
                    str(s["peer_id"]),
                    str(s["name"])[:64],
                    str(s["host"])[:255],
                    int(s["link_port"]),
                )
            except (KeyError, TypeError, ValueError):
                need(False, f"stages[{i}] fields")
            need(
                ref.index == i
                and 0 <= ref.start < ref.end
                and is_peer_id(ref.peer_id)
                and 0 < ref.link_port < 65536,
                f"stages[{i}] values",
            )
            need(
                i == 0 and ref.start == 0 or i > 0 and ref.start == stages[-1].end,
                f"stages[{i}] not contiguous",
            )
            stages.append(ref)
        idx = obj.get("stage_index")
        need(isinstance(idx, int) and 0 <= idx < len(stages), "stage_index")
        weights = obj.get("weights", "auto")
        need(weights in ("auto", "native", "f32", "bf16", "f16"), "weights")
        max_ctx, sessions = obj.get("max_ctx", 4096), obj.get("sessions", 4)
        need(isinstance(max_ctx, int) and 16 <= max_ctx <= 1 << 20, "max_ctx")
        need(isinstance(sessions, int) and 1 <= sessions <= 1024, "sessions")
        return cls(dep, model, tuple(peers), idx, tuple(stages), weights, max_ctx, sessions)
