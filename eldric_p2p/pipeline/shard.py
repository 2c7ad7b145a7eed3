"""A loaded assignment on a worker (`Shard`), its sessions at non-head stages, and its outgoing link.

Also what both ends of a pipeline use: ERROR frames, the wire dtype of hidden states, session ids.
"""

from __future__ import annotations

import secrets
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from eldric_p2p.errors import PeerUnavailable
from eldric_p2p.net.frames import DType, Frame, FrameType, FrameWriter
from eldric_p2p.net.links import Link
from eldric_p2p.pipeline.assignment import Assignment

if TYPE_CHECKING:
    from eldric_p2p.data.gguf_index import GGUFFile, GGUFIndex
    from eldric_p2p.engine.model import Stage
    from eldric_p2p.engine.sampling import Sampler
    from eldric_p2p.engine.tokenizer import Tokenizer
    from eldric_p2p.pipeline.batching import StepBatcher

RECENT_STEPS = 32  # decode steps whose times the status's medians cover


# --------------------------------------------------------------------------------------------- shards


@dataclass(eq=False)
class StageSession:
    """A session at a non-head stage: where its frames come from, and (tail) how it samples."""

    sid: int
    shard: Shard
    link: Link  # the inbound link it was opened on
    back: FrameWriter  # backward frames (ERROR) to the previous hop
    wire: DType = DType.F32
    sampler: Sampler | None = None
    history: list[int] = field(default_factory=list)
    busy: bool = False  # a step of it is being computed


class Downstream:
    """The outgoing link from a shard to its next hop: forward frames out, backward ERROR frames in."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.writer = FrameWriter(link)
        self.broken = False

    async def send(self, frame: Frame) -> None:
        if self.broken:
            raise PeerUnavailable("link to the next hop is closed")
        try:
            await self.writer.send(frame)
        except PeerUnavailable:
            self.broken = True
            raise
        except trio.ClosedResourceError as exc:  # closed by the reader task when the peer went away
            self.broken = True
            raise PeerUnavailable("link to the next hop is closed") from exc


class Shard:
    """One assignment on this worker: its loading state, its stage, its sessions."""

    def __init__(self, a: Assignment, needed: int, fmt: str) -> None:
        self.a = a
        self.needed = needed
        self.fmt = fmt
        self.state = "fetching"  # fetching -> loading -> ready | failed
        self.error: str | None = None
        self.progress = (0, 0)
        self.bytes_fetched = 0
        self.fetch_s = self.load_s = 0.0
        self.stage: Stage | None = None
        self.file: GGUFFile | None = None
        self.retiring = False  # a head that takes no new session (its pipeline moves to a new plan)
        self.index: GGUFIndex | None = None
        self.tokenizer: Tokenizer | None = None
        self.downstream: Downstream | None = None
        self.downstream_lock = trio.Lock()
        self.next_hop_ok = True  # False once the link to the next hop broke or could not be opened
        self.scopes: set[trio.CancelScope] = set()
        self.head_sessions: dict[int, trio.MemorySendChannel[Frame]] = {}
        # recent decode steps: the head's wait from hidden state out to token; other stages' frame in to out
        self.ring_ms: deque[float] = deque(maxlen=RECENT_STEPS)
        self.hop_ms: deque[float] = deque(maxlen=RECENT_STEPS)
        self.backend: Any = None  # pipeline.PipelineBackend, made on first use (head only)
        self.batcher: StepBatcher | None = None  # runs its sessions' steps, batched (set once loaded)
        self.created = time.time()
        self.last_used = self.created  # wall clock: a session opened or closed here (the TTL counts from it)

    def touch(self) -> None:
        self.last_used = time.time()

    @property
    def label(self) -> str:
        return self.a.me.label()

    def status(self) -> dict[str, Any]:
        a = self.a
        ds = self.downstream
        link = ds.link if ds is not None and not ds.broken else None  # to the next hop, while it is open
        return {
            "deployment_id": a.deployment_id,
            "model_id": a.model_id,
            "role": a.role,
            "stage_index": a.stage_index,
            "n_stages": len(a.stages),
            "start": a.start,
            "end": a.end,
            "state": self.state,
            "error": self.error,
            "needed": self.needed,
            "weights": self.fmt,
            "bytes_fetched": self.bytes_fetched,
            "progress": {"done": self.progress[0], "total": self.progress[1]},
            "fetch_s": round(self.fetch_s, 3),
            "load_s": round(self.load_s, 3),
            "next_hop_ok": self.next_hop_ok,
            "link": link.path if link is not None else None,
            "link_transport": link.transport if link is not None else None,
            "sessions": len(self.head_sessions) if a.stage_index == 0 else None,
            "last_used": round(self.last_used, 3),
            "batching": self.batcher.status() if self.batcher is not None else None,
            # head: the median wait for a decode step's token from the other stages (their compute + links)
            "ring_ms": round(statistics.median(self.ring_ms), 2) if self.ring_ms else None,
            # other stages: the median time from a decode step's frame in to its output sent (compute too)
            "hop_ms": round(statistics.median(self.hop_ms), 2) if self.hop_ms else None,
            "retiring": self.retiring,
        }


def error_frame(sid: int, stage: str, message: str) -> Frame:
    return Frame(FrameType.ERROR, sid, ext={"stage": stage[:200], "message": message[:1000]})


def error_text(frame: Frame) -> tuple[str, str]:
    ext = frame.ext or {}
    return str(ext.get("stage", "a stage"))[:200], str(ext.get("message", "failed"))[:1000]


def wire_dtype(wire: DType) -> Any:
    """The torch dtype hidden states travel in."""
    import torch

    return {DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.F32: torch.float32}[wire]


def new_session_id() -> int:
    return secrets.randbits(63) | 1
