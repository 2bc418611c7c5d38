"""The split-computing server: runs the tail of a model on what devices send.

Devices authenticate with a bearer token; the server keeps only the tokens' SHA-256 hashes
(``token_hashes``; ``None`` turns authentication off, for a private network namespace or a
loopback-only test). Bodies are bounded while they stream (:class:`~edgekiln.runtime.http_limits.BodyLimit`)
and an npz's declared sizes are checked before any array is read (:func:`~edgekiln.runtime.split_exec.unpack`).

NOTE: no ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations
at run time, and this module imports fastapi at the top (it is only imported to serve).
"""

import hashlib
import hmac
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response

from edgekiln.runtime.http_limits import BodyLimit
from edgekiln.runtime.split_exec import NpzRefused, pack, session, unpack

MAX_BODY = 64 * 1024 * 1024   # requests larger than this are refused (bounded memory on the server)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_app(tail_path: str | Path, *, threads: int = 1, token_hashes: frozenset[str] | None,
               max_body: int = MAX_BODY) -> Any:
    """The server: ``POST /v1/tail`` with an npz of the cut tensors returns an npz of outputs.
    ``token_hashes`` (required: pass ``None`` explicitly to serve without authentication) are the
    SHA-256 hex digests of the accepted bearer tokens (:func:`token_hash`)."""
    sess = session(tail_path, threads)
    names = {i.name for i in sess.get_inputs()}
    app = FastAPI(title="edgekiln split server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body)

    def caller(authorization: Annotated[str | None, Header()] = None) -> None:
        if token_hashes is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        digest = token_hash(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""
        if not digest or not any(hmac.compare_digest(digest, known) for known in token_hashes):
            raise HTTPException(401, "missing or unknown bearer token", headers={"WWW-Authenticate": "Bearer"})

    Authorized = Annotated[None, Depends(caller)]

    @app.get("/v1/health")
    def health(_: Authorized) -> dict[str, Any]:
        return {"ok": True, "inputs": sorted(names)}

    @app.post("/v1/probe")
    async def probe(request: Request, _: Authorized) -> dict[str, int]:
        """Reads and discards the body: devices time it to measure the uplink (see probe_link)."""
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    @app.post("/v1/tail")
    async def tail(request: Request, _: Authorized) -> Response:
        body = await request.body()   # BodyLimit stops the stream past max_body
        try:
            feeds = unpack(body, max_bytes=max_body)
        except NpzRefused as exc:
            raise HTTPException(400, str(exc)) from None
        except Exception:  # noqa: BLE001 - anything that is not an npz
            raise HTTPException(400, "body is not an npz of arrays") from None
        if set(feeds) != names:
            raise HTTPException(400, f"expected tensors {sorted(names)}, got {sorted(feeds)[:16]}")
        try:
            outs = sess.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(400, f"tail failed: {str(exc).splitlines()[0][:200]}") from None
        return Response(pack({o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}),
                        media_type="application/octet-stream")

    return app
