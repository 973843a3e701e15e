"""Request ids: every request gets one (the client's X-Request-ID if it is sane, else a new one),
answers it in the X-Request-ID header and in error bodies, and every log line carries it
(serving/logs.py)."""
import re
import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class RequestIds:
    """ASGI middleware: sets REQUEST_ID for the request and adds X-Request-ID to its response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if SANE.fullmatch(given) else uuid.uuid4().hex
        REQUEST_ID.set(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
