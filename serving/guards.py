"""ASGI middleware that keeps bad clients and overload away from the models: inference calls
while their model's queue is full, bodies that are too large or too slow, and calls without the
bearer token where one is required."""
import asyncio
import secrets
import time

from fastapi.responses import JSONResponse

from serving.endpoints import QUEUED, endpoint_of
from serving.request_ids import REQUEST_ID


def refuse(status: int, error: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "request_id": REQUEST_ID.get()}, status, headers=headers)


class ShedLoad:
    """503 for an inference call whose model's queue is full at every engine (as the engines last
    said), before its body is read or parsed: under overload a refusal costs next to nothing. (The
    engine refuses too, for calls that pass here while the queue fills.)"""

    def __init__(self, app, max_queue_size: int):
        self.app, self.max_queue_size = app, max_queue_size

    async def __call__(self, scope, receive, send):
        found = endpoint_of(scope) if scope["type"] == "http" else None
        if found and found[0] in QUEUED and (client := getattr(scope["app"].state, "engines", None)):
            if client.full(found[1], self.max_queue_size):
                error = f"model {found[1]!r} has {self.max_queue_size} or more requests waiting; retry shortly"
                return await refuse(503, error, {"Retry-After": "1"})(scope, receive, send)
        await self.app(scope, receive, send)


class BodyGuard:
    """Reads each request body whole before the app sees it: 413 past max_bytes (counted as it
    arrives, so chunked bodies too), 408 if it has not all arrived within timeout_s (a slow or
    stalled client holds only its own connection, never a batcher or a route)."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await refuse(413, f"body over {self.max_bytes} bytes")(scope, receive, send)
        body, deadline = bytearray(), time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                error = f"the body did not arrive within {self.timeout_s:g}s"
                return await refuse(408, error, {"Connection": "close"})(scope, receive, send)
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await refuse(413, f"body over {self.max_bytes} bytes", {"Connection": "close"})(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():  # the whole body once, then the client's own messages (disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerToken:
    """401 unless `Authorization: Bearer <token>` on paths that start with one of `prefixes`."""

    def __init__(self, app, token: str, prefixes: tuple[str, ...]):
        self.app, self.token, self.prefixes = app, token.encode(), prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.token):
                error = "this endpoint needs Authorization: Bearer <RNNSERVE_CONTROL_TOKEN>"
                return await refuse(401, error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)
