"""Serve an ASGI app with hypercorn's trio worker; report the bound address; stop on cancellation."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)


def _config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    config.backlog = 256
    return config


def port_of(bind: str) -> int:
    """`'http://127.0.0.1:8080'` or `'http://[::1]:8080'` -> 8080."""
    return int(bind.rsplit(":", 1)[1])


async def serve_app(
    app: Any,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on host:port (port 0 picks a free one) until cancelled.

    `await nursery.start(serve_app, app, host, 0)` returns the bound port. Cancel the enclosing scope to stop;
    open connections get no grace period beyond the cancellation.
    """
    config = _config(host, port)

    async def _serve(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status, mode="asgi")

    async with open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve)
        bound = port_of(binds[0])
        log.info("serving on %s", ", ".join(binds))
        task_status.started(bound)


def error_response(status: int, message: str, type_: str, code: str) -> JSONResponse:
    """The one error shape of the HTTP API: `{"error": {"message", "type", "code"}}`."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, str(exc.status_code))
    return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind, code)


# Pass to `Starlette(exception_handlers=...)` so unknown paths and methods answer in the JSON error shape.
EXCEPTION_HANDLERS: dict[Any, Any] = {HTTPException: _http_exception}
