"""What every request meets before any route, in one ASGI layer in front of the FastAPI app: the
core's request envelope (serving/frontend/core/envelope.py: an id, the bearer token where one is
asked for, model control closed unless it is opened, shedding when the model's queue is full, a
span, a count of the answer in /metrics), the whole body read within its limits, and from SIGTERM
on (draining) Connection: close on every answer.

The hot routes (V1 predict, V2 infer, generate, a session's step: the table's routes with a
body) are then called directly with their validated body: FastAPI's routing, dependency solving
and middleware stack cost more than the route itself, and every chunk of a stream went through
three of its send wrappers (a profile under load when the layout was built; not kept). They are
the same handlers FastAPI routes to and documents at /docs (serving/frontend/routes/__init__.py).
"""
import asyncio
import logging
import os

import msgspec
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request

from serving.frontend.core import tensors
from serving.frontend.core.envelope import Outcome, begun, entered, named
from serving.frontend.core.front import Front
from serving.frontend.core.refused import Refused, busy, invalid, unexpected
from serving.frontend.responses import refuse, refused
from serving.frontend.routes import Route, inference_route

log = logging.getLogger(__name__)
CLOSE = [(b"connection", b"close")]  # while draining: the client opens a new connection, or learns the port closed
WANTED = {b"x-request-id", b"content-length", b"authorization", b"inference-header-content-length",
          b"traceparent", b"tracestate"}
CONTROL = "/v2/repository"
SHUT_DOWN = busy("the server shut down before answering; retry")  # a request cut off past the grace period


class FrontDoor:
    def __init__(self, app: FastAPI, front: Front):
        self.app, self.state, self.front, self.settings = app, app.state, front, front.settings
        self.served_by = (b"x-rnnserve-frontend", str(os.getpid()).encode())  # which front-end answered: they share a port
        self.guarded = (CONTROL, "/v1/models", "/v2/models", "/openai/") if self.settings.token_for_inference else (CONTROL,)

    async def __call__(self, scope, receive, send):
        """The request in its envelope (serving/frontend/core/envelope.py): an inference route's
        counted and traced; a refusal there answered here; a request the server cut off (a
        shutdown past its grace period) answered 503 if nothing was, and the cancellation goes on."""
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in scope["headers"] if k in WANTED}
        path = scope["path"]
        found = inference_route(scope["method"], path)
        route, params = found or (None, {})
        guard = "control" if path.startswith(CONTROL) else "inference" if path.startswith(self.guarded) else None
        outcome = begun(headers.get(b"x-request-id", b"").decode("latin-1"), route.endpoint if route else "")
        answer = self.answering(send, outcome)
        scope["rnnserve.outcome"] = outcome  # a stream renames its endpoint (generate_stream)
        attributes = {"http.route": route.path, "url.path": path} if route else {}
        if "name" in params:  # else a body names it (serving/frontend/core/envelope.py's named())
            attributes["rnnserve.model"] = params["name"]
        try:
            with entered(self.front, outcome, route.span if route else "", headers, headers.get(b"authorization", b""),
                         guard, params.get("name", ""), bool(route and route.queued), **attributes):
                try:
                    await self.enter(scope, receive, answer, headers, found)
                except asyncio.CancelledError:
                    if not outcome.answered:
                        await refused(SHUT_DOWN, path=path)(scope, receive, answer)
                    raise
        except Refused as e:  # refused at the door
            if not outcome.answered:
                await refused(e, path=path)(scope, receive, answer)

    def answering(self, send, outcome: Outcome):
        """send, adding the request id, the front-end's pid and (draining) Connection: close to the
        answer's headers, and noting its status."""
        async def answer(message):
            if message["type"] == "http.response.start":
                outcome.status, outcome.answered = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", outcome.request_id.encode()),
                                      self.served_by, *(CLOSE if self.front.draining else ())]
            await send(message)
        return answer

    async def enter(self, scope, receive, send, headers: dict, found: tuple[Route, dict] | None):
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
        limit, timeout_s, path = self.settings.max_body_bytes, self.settings.body_timeout_s, scope["path"]
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await refuse(413, f"body over {limit} bytes", path=path)(scope, receive, send)
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
                        await refuse(413, f"body over {limit} bytes", {"Connection": "close"}, path)(scope, receive, send)
                        return None
                    if not message.get("more_body", False):
                        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except TimeoutError:
            await refuse(408, f"the body did not arrive within {timeout_s:g}s", {"Connection": "close"},
                         path)(scope, receive, send)
            return None

    async def direct(self, scope, receive, send, body: bytes, headers: dict, found: tuple[Route, dict]):
        """A hot route's handler, called with its validated body and path parameters; a request
        whose model is named in its body (OpenAI's) counted under it, valid or not."""
        route, params = found
        scope["app"] = self.app  # as Starlette sets it: request.app
        try:
            header_length = headers.get(b"inference-header-content-length")
            if route.binary:
                body, scope["rnnserve.binary"] = tensors.split(body, header_length)
            try:
                parsed = route.body.model_validate_json(body)
            except ValidationError as e:
                if route.model_in_body:
                    named(self.front.engines, scope["rnnserve.outcome"], model_of(body))
                raise tensors.unsplit(e, body) if route.binary and header_length is None else invalid(e) from None
            if route.model_in_body:
                named(self.front.engines, scope["rnnserve.outcome"], parsed.model)
            response = await route.handler(request=Request(scope, receive), body=parsed, **params)
        except Refused as e:
            response = refused(e, path=scope["path"])
        except Exception as e:  # what the handler did not answer itself
            response = refused(unexpected(e), path=scope["path"])
        await response(scope, receive, send)


def model_of(body: bytes) -> str:
    """The model a JSON body names, "" where it names none (a body that did not validate)."""
    try:
        model = msgspec.json.decode(body).get("model")
    except (msgspec.DecodeError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""
