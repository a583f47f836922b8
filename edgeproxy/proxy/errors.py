"""The one JSON error shape every status the proxy itself answers with uses."""

from __future__ import annotations

import json

from aiohttp import web
from multidict import CIMultiDict


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A JSON error: {"error": {"status", "code", "message", "request_id"}}."""
    body = json.dumps(
        {"error": {"status": status, "code": code, "message": message, "request_id": request_id}}
    ).encode()
    hdrs: CIMultiDict[str] = CIMultiDict(headers or {})
    hdrs["Content-Type"] = "application/json"
    hdrs["X-Request-ID"] = request_id
    hdrs["Cache-Control"] = "no-store"
    return web.Response(status=status, body=body, headers=hdrs)
