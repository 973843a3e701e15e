"""What the inference routes share: model lookup, the batcher call within the request's deadline,
and turning what went wrong into the answer the client gets."""
import asyncio
import logging
from contextlib import contextmanager

from fastapi import HTTPException, Request

from serving.batcher import Batcher, QueueFull, Stopped
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


def refusal(error: Exception) -> HTTPException | None:
    """The answer for a request the batcher could not serve: full queue or stopped (503), deadline (504)."""
    if isinstance(error, (QueueFull, Stopped)):
        return HTTPException(503, f"{error}; retry shortly", headers=BUSY)
    if isinstance(error, TimeoutError):
        return HTTPException(504, f"no answer within the deadline: {error}")
    return None


async def infer(request: Request, batcher: Batcher, rows: list) -> list:
    """Rows through a batcher, within the request deadline. A request whose client disconnects
    while it waits is dropped before it runs."""
    timeout = request.app.state.settings.request_timeout_s
    try:
        future = batcher.enqueue(rows)
    except QueueFull as e:
        raise refusal(e) from None
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if future in done:
        try:
            return future.result()
        except Stopped as e:
            raise refusal(e) from None
    future.cancel()  # the batcher skips it
    if gone in done:
        raise HTTPException(499, "client closed the request")
    raise refusal(TimeoutError(f"{timeout}s"))


async def disconnected(request: Request):
    """Returns when the client goes away (the body has been read, so the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@contextmanager
def answered(name: str, endpoint: str):
    """Whatever a route raises becomes an answer: an unexpected error a 500 (logged with the
    request id), a shutdown past its grace period a 503."""
    try:
        yield
    except HTTPException:
        raise
    except asyncio.CancelledError:
        raise HTTPException(503, "the server shut down before answering; retry", headers=BUSY) from None
    except Exception as error:
        log.exception("%s %s failed", endpoint, name)
        raise HTTPException(500, f"inference failed: {type(error).__name__}: {error}") from error
