"""The split-computing server: runs the tail of a model on what devices send.

NOTE: no ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations
at run time, and this module imports fastapi at the top (it is only imported to serve).
"""

from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response

from edgekiln.runtime.split_exec import pack, session, unpack

MAX_BODY = 64 * 1024 * 1024   # requests larger than this are refused (bounded memory on the server)


def create_app(tail_path: str | Path, *, threads: int = 1) -> Any:
    """The server: ``POST /v1/tail`` with an npz of the cut tensors returns an npz of outputs."""
    sess = session(tail_path, threads)
    names = {i.name for i in sess.get_inputs()}
    app = FastAPI(title="edgekiln split server")

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "inputs": sorted(names)}

    @app.post("/v1/probe")
    async def probe(request: Request) -> dict[str, int]:
        """Reads and discards the body: devices time it to measure the uplink (see probe_link)."""
        body = await request.body()
        if len(body) > MAX_BODY:
            raise HTTPException(413, "request too large")
        return {"bytes": len(body)}

    @app.post("/v1/tail")
    async def tail(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise HTTPException(413, "request too large")
        try:
            feeds = unpack(body)
        except Exception:  # noqa: BLE001 - anything that is not an npz
            raise HTTPException(400, "body is not an npz of arrays") from None
        if set(feeds) != names:
            raise HTTPException(400, f"expected tensors {sorted(names)}, got {sorted(feeds)}")
        try:
            outs = sess.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(400, f"tail failed: {str(exc).splitlines()[0][:200]}") from None
        return Response(pack({o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}),
                        media_type="application/octet-stream")

    return app
