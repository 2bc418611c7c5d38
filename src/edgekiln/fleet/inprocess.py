"""A synchronous httpx transport that calls an ASGI app in-process (tests, demos).

``httpx.ASGITransport`` only serves async clients; the operator client and the CLI are sync.
This adapter runs each request through ``ASGITransport`` on a private event loop, so
``client.publish(..., transport=InProcessTransport(app))`` exercises the real server app
without a socket.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx


class InProcessTransport(httpx.BaseTransport):
    def __init__(self, app: Any) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        copy = httpx.Request(request.method, request.url, headers=request.headers, content=body)

        async def call() -> tuple[int, Any, bytes]:
            resp = await self._asgi.handle_async_request(copy)
            content = b"".join([chunk async for chunk in resp.stream])
            return resp.status_code, resp.headers, content

        with self._lock:
            status, headers, content = self._loop.run_until_complete(call())
        return httpx.Response(status, headers=headers, content=content, request=request)

    def close(self) -> None:
        pass  # NOTE: several short-lived clients share one transport; the loop lives with it
