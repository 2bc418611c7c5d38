"""Bounded request bodies for every ASGI server edgekiln runs (update server, split server).

:class:`BodyLimit` answers 413 when the declared ``Content-Length`` is over the limit, and stops
reading a streamed body as soon as it passes the limit: the app never holds more than the limit
plus one chunk of the server's receive buffer. Standard library only.

    >>> import asyncio
    >>> async def app(scope, receive, send):  # reads the whole body, like ``await request.body()``
    ...     while (await receive()).get("more_body"):
    ...         pass
    >>> sent = []
    >>> async def send(message):
    ...     sent.append(message)
    >>> async def receive():
    ...     return {"type": "http.request", "body": b"x" * 1000, "more_body": True}
    >>> asyncio.run(BodyLimit(app, limit=4096)({"type": "http", "path": "/", "headers": []}, receive, send))
    >>> sent[0]["status"]
    413
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware refusing request bodies above ``limit`` bytes (413), declared or streamed.
    ``per_path`` gives other limits to the paths matching a pattern (e.g. bundle uploads)."""

    def __init__(self, app: Any, *, limit: int, per_path: Sequence[tuple[re.Pattern[str], int]] = ()) -> None:
        self.app, self.limit, self.per_path = app, limit, tuple(per_path)

    def limit_for(self, path: str) -> int:
        return next((limit for pattern, limit in self.per_path if pattern.match(path)), self.limit)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await send_413(send, limit)
            return
        seen, started = 0, False

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await send_413(send, limit)


async def send_413(send: Any, limit: int) -> None:
    body = b'{"detail": "request body larger than the limit of %d bytes"}' % limit
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
