"""The one error tree of eldric-p2p.

    EldricError
    ├── UsageError              we (or the user) asked for something invalid: bad flag, bad argument
    │   ├── ModelNotFound       no such model id / file
    │   └── DoesNotFit          an assignment or deploy does not fit the offered memory
    ├── LocalProtocolError      our own code broke a protocol rule (a bug on this side)
    ├── RemoteProtocolError     a peer (or a file from a peer) sent something invalid
    │   ├── GGUFFormatError     a GGUF header / tensor table that is malformed, truncated or over a limit
    │   ├── FrameError          a pipeline frame that is malformed or over a limit
    │   └── IntegrityError      bytes whose hash differs from the published one (names the tensor)
    ├── PeerUnavailable         a peer did not answer, closed a link, or answered with an error status
    │   └── StageFailed         a pipeline stage failed during a request (names the stage)
    ├── AuthenticationError     a peer could not prove the peer id it claims
    └── EngineError             the inference engine refused an input
        ├── UnsupportedModel    architecture or tensor type this engine does not run
        └── InvalidInput        token id out of range, skipped positions, context overflow, wrong shape/dtype

Foreign exceptions (httpx, OSError, ssl, aioquic) are converted at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class EldricError(Exception):
    """Base of every error eldric-p2p raises on purpose."""


class UsageError(EldricError):
    """The caller asked for something invalid."""


class ModelNotFound(UsageError):
    """No model with that id or path."""


class DoesNotFit(UsageError):
    """An assignment or deploy needs more memory than is offered."""


class LocalProtocolError(EldricError):
    """This side broke a protocol rule."""


class RemoteProtocolError(EldricError):
    """A peer sent bytes that break the protocol or exceed a limit."""


class GGUFFormatError(RemoteProtocolError):
    """A GGUF header or tensor table is malformed, truncated, or over a limit."""


class FrameError(RemoteProtocolError):
    """A pipeline frame is malformed or over a limit."""


class IntegrityError(RemoteProtocolError):
    """Fetched bytes do not match the published hash."""


class PeerUnavailable(EldricError):
    """A peer did not answer, closed the link, or answered with an error."""


class StageFailed(PeerUnavailable):
    """A pipeline stage failed while serving a request."""


class AuthenticationError(EldricError):
    """A peer could not prove the peer id it claims."""


class EngineError(EldricError):
    """The inference engine refused an input or a model."""


class UnsupportedModel(EngineError):
    """An architecture or tensor type this engine does not run."""


class InvalidInput(EngineError):
    """A token id, position, shape or dtype the engine cannot accept."""
