"""What the V1 and V2 inference routes share: model lookup, the batcher call, request metrics."""
import asyncio
import logging
import time

from fastapi import HTTPException, Request

from serving import metrics
from serving.batcher import QueueFull
from serving.model import ServedModel

log = logging.getLogger(__name__)


def served(request: Request, name: str, version: str | None = None, task: str | None = None) -> ServedModel:
    """The loaded model `name` (404 if unknown, or if `version` is given and not the loaded one)."""
    model = request.app.state.models.get(name) if request.app.state.ready else None
    if model is None:
        raise HTTPException(404, f"unknown model {name!r}")
    if version is not None and version != str(model.version):
        raise HTTPException(404, f"model {name!r} has no loaded version {version!r} (serving {model.version})")
    if task and model.task != task:
        raise HTTPException(400, f"model {name!r} is a {model.task}, not a {task}")
    return model


async def infer(request: Request, name: str, rows: list[list[int]]) -> list:
    """Rows through the model's batcher, within the request deadline. A request whose client
    disconnects while it waits is dropped before it runs."""
    timeout = request.app.state.settings.request_timeout_s
    try:
        future = request.app.state.batchers[name].enqueue(rows)
    except QueueFull as e:
        raise HTTPException(503, f"{e}; retry shortly", headers={"Retry-After": "1"}) from None
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if future in done:
        return future.result()
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
        status = 200 if error is None else getattr(error, "status_code", 500)
        metrics.REQUESTS.labels(self.name, self.endpoint, str(status)).inc()
        metrics.REQUEST_LATENCY.labels(self.name, self.endpoint).observe(time.perf_counter() - self.started)
        if error is not None and not isinstance(error, HTTPException):
            log.exception("%s %s failed", self.endpoint, self.name, exc_info=error)
            raise HTTPException(500, f"inference failed: {type(error).__name__}: {error}") from error
