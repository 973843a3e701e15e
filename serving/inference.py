"""What the inference routes share: finding the engine and version that serve a model, sending
rows there within the request's deadline, and turning what came back into an answer."""
import asyncio
import logging
from contextlib import contextmanager

import msgspec
import numpy as np
from fastapi import HTTPException
from fastapi.responses import Response
from starlette.datastructures import State

from core.repository import Version
from serving import tracing
from serving.client import EngineClient, Link
from serving.messages import Failed, Infer, Result
from serving.settings import Settings

log = logging.getLogger(__name__)
BUSY = {"Retry-After": "1"}
WATCH_AFTER_S = 0.05  # a request not answered by then also watches its client (most never need to)
json_encode = msgspec.json.Encoder().encode


def engines(state: State, every: bool = False) -> EngineClient:
    """The front-end's engines (app.state.engines), or 503 while it starts or drains; every: also
    while an engine has not said what it serves (starting or restarting)."""
    if not state.ready or (every and not state.engines.connected):
        raise HTTPException(503, "the server is not ready (starting, shutting down, or an engine is restarting)",
                            headers=BUSY)
    return state.engines


def served(state: State, name: str, version: str | None = None, task: str | None = None,
           together: bool = False) -> tuple[Link, Version]:
    """The engine that will serve `name` and the version it serves (404 if none, or if `version` is
    given and is not the one deployed; 400 for the wrong task; 503 while starting or draining).
    together: the one engine every front-end sends this model's generations to."""
    client = engines(state)
    picked = client.pick(name, together)
    if picked is None and not client.connected:  # it may be served by the engine that is (re)starting
        raise HTTPException(503, f"model {name!r} is not served now: an engine is starting or restarting",
                            headers=BUSY)
    if picked is None:
        raise HTTPException(404, f"unknown model {name!r}")
    link, deployed = picked
    if version is not None and version != str(deployed.version):
        raise HTTPException(404, f"model {name!r} has no loaded version {version!r} (serving {deployed.version})")
    if task and deployed.task != task:
        raise HTTPException(400, f"model {name!r} is a {deployed.task}, not a {task}")
    return link, client.version(name, deployed.version)


def check_text(settings: Settings, text: str, what: str = "text"):
    limit = settings.max_text_chars
    if len(text) > limit:
        raise HTTPException(413, f"{what} has {len(text)} characters; at most {limit}")


def refusal(reply: Failed) -> HTTPException:
    """The HTTP answer to an engine's refusal; a model that failed is logged here too, with the
    request id (the engine's own log line has the traceback)."""
    if reply.status == 500:
        log.error("the engine failed this request: %s", reply.error)
    return HTTPException(reply.status, reply.error, headers=BUSY if reply.status == 503 else None)


async def reply_of(client: EngineClient, link: Link, future: asyncio.Future, rid: int, receive=None):
    """The engine's reply. An HTTP request (receive: its ASGI receive) not answered within
    WATCH_AFTER_S also watches its client: if it leaves, the engine drops the request before it
    runs. A gRPC call's task is cancelled when its client leaves: the engine is told the same."""
    loop = asyncio.get_running_loop()
    watcher = None
    gone = Failed(rid, 499, "client closed the request")

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        client.cancel(link, rid, gone)

    def start_watching():
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER_S, start_watching) if receive else None
    try:
        return await future
    except asyncio.CancelledError:
        client.cancel(link, rid, gone)
        raise
    finally:
        if timer:
            timer.cancel()
        if watcher:
            watcher.cancel()


async def infer(state: State, name: str, encode, version: str | None = None, task: str | None = None,
                receive=None, timeout_s: float | None = None) -> tuple[Version, list[tuple[list[int], bool]], np.ndarray]:
    """Rows through the engine that serves `name`: encode(version) gives (token ids, truncated)
    per row with that version's codec. A version swapped out between encoding and arrival (410) is
    encoded again with the new one, once. Returns the version, the encoded rows and the outputs.
    receive: an HTTP request's, to watch its client (reply_of); timeout_s: a gRPC client's deadline
    when it is sooner than the server's own."""
    timeout = min(state.settings.request_timeout_s, float("inf") if timeout_s is None else timeout_s)
    client = state.engines
    for attempt in range(2):
        link, served_version = served(state, name, version, task)
        with tracing.span("tokenize"):
            rid, encoded = client.next_id(), encode(served_version)
        message = Infer(rid, name, served_version.number, [ids for ids, _ in encoded], client.deadline(timeout),
                        tracing.traceparent())
        reply = await reply_of(client, link, client.request(link, message, timeout), rid, receive)
        if isinstance(reply, Result):
            return served_version, encoded, np.frombuffer(reply.data, np.float32).reshape(reply.shape)
        if reply.status != 410 or attempt:
            raise refusal(reply)


def json_response(body) -> Response:
    return Response(json_encode(body), media_type="application/json")


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
