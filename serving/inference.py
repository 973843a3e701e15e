"""What the V1 and V2 inference routes share: model lookup, the batcher call, request metrics."""
import asyncio
import logging
import time

from fastapi import HTTPException, Request

from serving import metrics
from serving.batcher import QueueFull, Stopped
from serving.deployment import Deployment

log = logging.getLogger(__name__)
BUSY = {"Retry-After": "1"}


def deployed(request: Request, name: str, version: str | None = None, task: str | None = None) -> Deployment:
    """The deployment serving `name` now (404 if none, or if `version` is given and is not the one
    deployed; 503 while the server starts or drains). Hold it while the request uses it."""
    if not request.app.state.ready:
        raise HTTPException(503, "the server is not ready (starting or shutting down)", headers=BUSY)
    deployment = request.app.state.repository.deployed.get(name)
    if deployment is None:
        raise HTTPException(404, f"unknown model {name!r}")
    model = deployment.model
    if version is not None and version != str(model.version):
        raise HTTPException(404, f"model {name!r} has no loaded version {version!r} (serving {model.version})")
    if task and model.task != task:
        raise HTTPException(400, f"model {name!r} is a {model.task}, not a {task}")
    return deployment


def check_text(request: Request, text: str, what: str = "text"):
    limit = request.app.state.settings.max_text_chars
    if len(text) > limit:
        raise HTTPException(413, f"{what} has {len(text)} characters; at most {limit}")


async def infer(request: Request, deployment: Deployment, rows: list[list[int]]) -> list:
    """Rows through the deployment's batcher, within the request deadline. A request whose client
    disconnects while it waits is dropped before it runs."""
    timeout = request.app.state.settings.request_timeout_s
    try:
        future = deployment.batcher.enqueue(rows)
    except QueueFull as e:
        raise HTTPException(503, f"{e}; retry shortly", headers=BUSY) from None
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if future in done:
        try:
            return future.result()
        except Stopped as e:
            raise HTTPException(503, f"{e}; retry", headers=BUSY) from None
    future.cancel()  # the batcher skips it
    if gone in done:
        raise HTTPException(499, "client closed the request")
    raise HTTPException(504, f"no answer within {timeout}s")


async def disconnected(request: Request):
    """Returns when the client goes away (the body has been read, so the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class measured:
    """Counts a request by model, endpoint and status, and times it."""

    def __init__(self, name: str, endpoint: str):
        self.name, self.endpoint = name, endpoint

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, kind, error, tb):
        answer = error
        if isinstance(error, asyncio.CancelledError):  # shutdown past its grace period: say so
            answer = HTTPException(503, "the server shut down before answering; retry", headers=BUSY)
        elif error is not None and not isinstance(error, HTTPException):
            log.exception("%s %s failed", self.endpoint, self.name, exc_info=error)
            answer = HTTPException(500, f"inference failed: {type(error).__name__}: {error}")
        status = 200 if answer is None else answer.status_code
        metrics.REQUESTS.labels(self.name, self.endpoint, str(status)).inc()
        metrics.REQUEST_LATENCY.labels(self.name, self.endpoint).observe(time.perf_counter() - self.started)
        if answer is not error:
            raise answer from error
