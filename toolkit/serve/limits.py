"""Request body size limit, enforced while the body streams in.

Written by hand because neither Starlette, FastAPI nor uvicorn limits body size: a client could otherwise
make the server buffer any amount before validation runs. Checks Content-Length up front and counts the bytes
of chunked bodies as they arrive (an error raised inside FastAPI's body reading would become a vague 400);
beyond the limit the client gets 413 in the OpenAI error envelope.
"""

from __future__ import annotations

from typing import Any

from toolkit.serve.errors import error_response


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        mib = self.max_bytes / 2**20
        message = f"request body exceeds the limit of {self.max_bytes} bytes ({mib:.3g} MiB)"
        await error_response(413, message, code="request_too_large")(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        # Read the whole body here (FastAPI buffers it for JSON anyway), refusing as soon as it is too long;
        # then replay it, and hand later receive() calls (disconnect detection) to the server.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
