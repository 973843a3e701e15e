"""What every request meets before any route, in one ASGI layer in front of the FastAPI app:
an id, the bearer token where one is asked for, shedding when the model's queue is full, the
whole body read within its limits, a count of the answer in /metrics, and from SIGTERM on
(draining) Connection: close on every answer.

The hot routes (V1 predict, V2 infer, generate, a session's step) are then called directly with
their validated body: FastAPI's routing, dependency solving and middleware stack cost more than
the route itself, and every chunk of a stream went through three of its send wrappers (a profile
under load when the layout was built; not kept). They stay FastAPI routes, documented at /docs and
answering the same way.
"""
import asyncio
import logging
import os
import time

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import Request

from serving import metrics, tensors, tracing
from serving.access import NEEDS_TOKEN, bearer_matches, token_of
from serving.endpoints import ROUTES, endpoint_of
from serving.logs import REQUEST_ID, start_request
from serving.routes import lm, v1, v2
from serving.schemas import GenerateRequest, InferRequest, PredictRequest, StepRequest
from serving.settings import Settings

log = logging.getLogger(__name__)
DIRECT = {"v1_predict": (PredictRequest, v1.predict), "v2_infer": (InferRequest, v2.infer_tensors),  # schema, route
          "generate": (GenerateRequest, lm.generate), "session_step": (StepRequest, lm.step_session)}
QUEUED = {"v1_predict", "v2_infer"}  # the endpoints whose requests wait in the model's queue
BINARY = {"v2_infer"}  # a JSON header, then raw tensor bytes (serving/tensors.py)
CLOSE = [(b"connection", b"close")]  # while draining: the client opens a new connection, or learns the port closed
WANTED = {b"x-request-id", b"content-length", b"authorization", b"inference-header-content-length",
          b"traceparent", b"tracestate"}


def refuse(status: int, error: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "request_id": REQUEST_ID.get()}, status, headers=headers)


def invalid(error: ValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, ('body', *e['loc'])))}: {e['msg']}" for e in error.errors()[:5])
    return refuse(400, f"invalid request: {problems}")


class FrontDoor:
    def __init__(self, app: FastAPI, settings: Settings):
        self.app, self.state, self.settings = app, app.state, settings
        self.served_by = (b"x-rnnserve-frontend", str(os.getpid()).encode())  # which front-end answered: they share a port
        self.token = token_of(settings)
        self.guarded = ("/v2/repository", "/v1/models", "/v2/models") if settings.token_for_inference else ("/v2/repository",)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in scope["headers"] if k in WANTED}
        request_id = start_request(headers.get(b"x-request-id", b"").decode("latin-1"))
        found = endpoint_of(scope)
        status, started = 500, time.perf_counter()

        async def answer(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      self.served_by, *(CLOSE if self.state.draining else ())]
            await send(message)

        if found is None:
            return await self.enter(scope, receive, answer, headers, None)
        client, name = getattr(self.state, "engines", None), found[1]["name"]
        model = name if client and client.deployed(name) else metrics.NOT_DEPLOYED
        in_flight = metrics.of(metrics.IN_FLIGHT, model)
        in_flight.inc()
        try:
            with tracing.server_span(f"{scope['method']} {ROUTES[found[0]]}", headers, **{
                    "http.route": ROUTES[found[0]], "url.path": scope["path"], "rnnserve.model": name, "rnnserve.request_id": request_id}):
                await self.enter(scope, receive, answer, headers, found)
                tracing.set_attributes(**{"http.response.status_code": status})
        finally:
            in_flight.dec()
            endpoint = scope.get("rnnserve.endpoint", found[0])
            metrics.of(metrics.REQUESTS, model, endpoint, str(status)).inc()
            metrics.of(metrics.REQUEST_LATENCY, model, endpoint).observe(time.perf_counter() - started)

    async def enter(self, scope, receive, send, headers: dict, found: tuple | None):
        if self.token and scope["path"].startswith(self.guarded):
            if not bearer_matches(self.token, headers.get(b"authorization", b"")):
                return await refuse(401, NEEDS_TOKEN, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        client = getattr(self.state, "engines", None)
        if found and found[0] in QUEUED and client and (limit := client.full(found[1]["name"])):
            error = f"model {found[1]['name']!r} has {limit} or more requests waiting; retry shortly"
            return await refuse(503, error, {"Retry-After": "1"})(scope, receive, send)
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

        if found and found[0] in DIRECT:
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

    async def direct(self, scope, receive, send, body: bytes, headers: dict, found: tuple):
        """A hot route's function, called with its validated body and path parameters."""
        endpoint, params = found
        schema, route = DIRECT[endpoint]
        scope["app"] = self.app  # as Starlette sets it: request.app
        try:
            if endpoint in BINARY:
                body, params["binary"] = tensors.split(body, headers.get(b"inference-header-content-length"))
            parsed = schema.model_validate_json(body)
            response = await route(request=Request(scope, receive), body=parsed, **params)
        except ValidationError as e:
            response = invalid(e)
        except HTTPException as e:
            response = refuse(e.status_code, e.detail, e.headers)
        except Exception as e:  # as FastAPI would: 500 with the request id, the traceback in the log
            log.error("unhandled %s", type(e).__name__, exc_info=e)
            response = refuse(500, f"internal error: {type(e).__name__}")
        await response(scope, receive, send)
