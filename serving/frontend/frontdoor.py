"""What every request meets before any route, in one ASGI layer in front of the FastAPI app:
an id, the bearer token where one is asked for (and model control closed unless it is opened),
shedding when the model's queue is full, the whole body read within its limits, a count of the
answer in /metrics, and from SIGTERM on (draining) Connection: close on every answer.

The hot routes (V1 predict, V2 infer, generate, a session's step: the table's routes with a
body) are then called directly with their validated body: FastAPI's routing, dependency solving
and middleware stack cost more than the route itself, and every chunk of a stream went through
three of its send wrappers (a profile under load when the layout was built; not kept). They are
the same handlers FastAPI routes to and documents at /docs (serving/frontend/routes/__init__.py).
"""
import asyncio
import logging
import os

from fastapi import FastAPI, HTTPException
from pydantic import ValidationError
from starlette.requests import Request

from serving.common import tracing
from serving.common.logs import start_request
from serving.common.settings import Settings
from serving.frontend import service, tensors
from serving.frontend.access import NEEDS_TOKEN, bearer_matches, control_closed, token_of
from serving.frontend.responses import invalid, refuse, refused
from serving.frontend.routes import Route, inference_route

log = logging.getLogger(__name__)
CLOSE = [(b"connection", b"close")]  # while draining: the client opens a new connection, or learns the port closed
WANTED = {b"x-request-id", b"content-length", b"authorization", b"inference-header-content-length",
          b"traceparent", b"tracestate"}
CONTROL = "/v2/repository"


class FrontDoor:
    def __init__(self, app: FastAPI, settings: Settings):
        self.app, self.state, self.settings = app, app.state, settings
        self.served_by = (b"x-rnnserve-frontend", str(os.getpid()).encode())  # which front-end answered: they share a port
        self.token = token_of(settings)
        self.guarded = (CONTROL, "/v1/models", "/v2/models") if settings.token_for_inference else (CONTROL,)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in scope["headers"] if k in WANTED}
        request_id = start_request(headers.get(b"x-request-id", b"").decode("latin-1"))
        found = inference_route(scope["method"], scope["path"])
        if found is None:
            return await self.enter(scope, receive, self.answering(send, request_id), headers, None)
        route, params = found
        with service.counted(getattr(self.state, "engines", None), params["name"], route.endpoint) as outcome:
            scope["rnnserve.outcome"] = outcome  # a stream renames its endpoint (generate_stream)
            with tracing.server_span(route.span, headers, **{
                    "http.route": route.path, "url.path": scope["path"], "rnnserve.model": params["name"],
                    "rnnserve.request_id": request_id}):
                await self.enter(scope, receive, self.answering(send, request_id, outcome), headers, found)
                tracing.set_attributes(**{"http.response.status_code": outcome.status})

    def answering(self, send, request_id: str, outcome: service.Outcome | None = None):
        """send, adding the request id, the front-end's pid and (draining) Connection: close to the
        answer's headers, and noting its status."""
        async def answer(message):
            if message["type"] == "http.response.start":
                if outcome:
                    outcome.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      self.served_by, *(CLOSE if self.state.draining else ())]
            await send(message)
        return answer

    async def enter(self, scope, receive, send, headers: dict, found: tuple[Route, dict] | None):
        if scope["path"].startswith(CONTROL) and (closed := control_closed(self.settings)):
            return await refuse(403, closed)(scope, receive, send)
        if self.token and scope["path"].startswith(self.guarded):
            if not bearer_matches(self.token, headers.get(b"authorization", b"")):
                return await refuse(401, NEEDS_TOKEN, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if found and found[0].queued and (full := service.shed(getattr(self.state, "engines", None), found[1]["name"])):
            return await refused(full)(scope, receive, send)
        body = await self.body(scope, receive, send, headers)
        if body is None:
            return
        replayed = False

        async def replay():  # the whole body once, then the client's own messages (disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if found and found[0].body:
            return await self.direct(scope, replay, send, body, headers, found)
        await self.app(scope, replay, send)

    async def body(self, scope, receive, send, headers: dict) -> bytes | None:
        """The whole body: 413 past max_body_bytes (counted as it arrives, so chunked bodies too),
        408 if it has not all arrived within body_timeout_s (a slow or stalled client holds only
        its own connection); None when refused or the client left."""
        limit, timeout_s = self.settings.max_body_bytes, self.settings.body_timeout_s
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await refuse(413, f"body over {limit} bytes")(scope, receive, send)
            return None
        chunks, size = [], 0
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None  # the client left before sending its body: nothing to answer
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        await refuse(413, f"body over {limit} bytes", {"Connection": "close"})(scope, receive, send)
                        return None
                    if not message.get("more_body", False):
                        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except TimeoutError:
            await refuse(408, f"the body did not arrive within {timeout_s:g}s", {"Connection": "close"})(scope, receive, send)
            return None

    async def direct(self, scope, receive, send, body: bytes, headers: dict, found: tuple[Route, dict]):
        """A hot route's handler, called with its validated body and path parameters."""
        route, params = found
        scope["app"] = self.app  # as Starlette sets it: request.app
        try:
            if route.binary:
                body, scope["rnnserve.binary"] = tensors.split(body, headers.get(b"inference-header-content-length"))
            parsed = route.body.model_validate_json(body)
            response = await route.handler(request=Request(scope, receive), body=parsed, **params)
        except ValidationError as e:
            response = invalid(e)
        except HTTPException as e:
            response = refused(e)
        except Exception as e:  # what the handler did not answer itself
            response = refused(service.unexpected(e))
        await response(scope, receive, send)
