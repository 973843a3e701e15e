"""The front-end's one request path, whatever the transport (Triton's core behind its HTTP and
gRPC front-ends): readiness, finding the engine and version that serve a model, sending rows
there within the request's deadline, V2 infer, model metadata, model control, and the count of
every answer. REST routes (routes/) and gRPC (grpc_v2.py) only translate to and from it.

Refusals are HTTPExceptions (status, detail, headers); gRPC maps their statuses to its codes.
"""
import asyncio
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException
from starlette.datastructures import State

from core.repository import MODEL_NAME, VERSION, Tensor, Version
from serving.common import metrics, tracing
from serving.common.logs import REQUEST_ID
from serving.common.messages import Control, Failed, Infer
from serving.common.settings import Settings
from serving.frontend import tensors
from serving.frontend.client import EngineClient, Link

log = logging.getLogger(__name__)
BUSY = {"Retry-After": "1"}
WATCH_AFTER_S = 0.05  # a request not answered by then also watches its client (most never need to)
LOAD_TIMEOUT_S = 600.0  # a version's load and warm-up
DATATYPES = {"int64": "INT64", "float32": "FP32"}
SERVER = {"name": "rnnserve", "version": "0.2.0", "extensions": ["model_repository", "binary_tensor_data", "generate"]}


# --- readiness and the engine that serves a model ---

def ready(state: State) -> bool:
    """The server is ready: this front-end is not starting or draining, and every engine has said
    what it serves and serves something."""
    return bool(state.ready and state.engines.ready)


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
        raise HTTPException(400, f"model {name!r} is a {deployed.task}: " + (
            "only language models generate or keep sessions" if task == "lm" else f"this route is for a {task}"))
    return link, client.version(name, deployed.version)


def stateless(sequence_id):
    """Triton's sequence_id on a call that keeps no state: a 400, not an answer that ignores it."""
    if sequence_id not in (None, 0, ""):
        raise HTTPException(400, "sequence_id: this call keeps no state; a language model's sequences are stepped on "
                                 "ModelStreamInfer with text_input, or as sessions at /v1/models/{name}/sessions")


def check_text(settings: Settings, text: str, what: str = "text"):
    limit = settings.max_text_chars
    if len(text) > limit:
        raise HTTPException(413, f"{what} has {len(text)} characters; at most {limit}")


# --- answers: the engine's, and every other ---

def refusal(reply: Failed) -> HTTPException:
    """The HTTP answer to an engine's refusal; a model that failed is logged here too, with the
    request id (the engine's own log line has the traceback)."""
    if reply.status == 500:
        log.error("the engine failed this request: %s", reply.error)
    return HTTPException(reply.status, reply.error, headers=BUSY if reply.status == 503 else None)


def unexpected(error: BaseException) -> HTTPException:
    """What anything unexpected becomes, on every route and transport: a 500 with the request id
    (the traceback in the log), or a 503 when a shutdown past its grace period cut the request."""
    if isinstance(error, asyncio.CancelledError):
        return HTTPException(503, "the server shut down before answering; retry", headers=BUSY)
    log.error("unhandled %s", type(error).__name__, exc_info=error)
    return HTTPException(500, f"internal error: {type(error).__name__}: {error}",
                         headers={"X-Request-ID": REQUEST_ID.get()})


@contextmanager
def answered():
    """Whatever a route raises becomes an answer (HTTPException)."""
    try:
        yield
    except HTTPException:
        raise
    except (Exception, asyncio.CancelledError) as error:
        raise unexpected(error) from None


@dataclass
class Outcome:
    endpoint: str
    status: int = 500  # the HTTP status it was answered with (gRPC: the status its code stands for)


@contextmanager
def counted(client: EngineClient | None, name: str, endpoint: str):
    """Every inference request counted once, however it is answered: in flight while it runs, then
    its status and latency in /metrics. Yields the Outcome whose status the transport sets."""
    model = name if client and client.deployed(name) else metrics.NOT_DEPLOYED
    in_flight, outcome, started = metrics.of(metrics.IN_FLIGHT, model), Outcome(endpoint), time.perf_counter()
    in_flight.inc()
    try:
        yield outcome
    finally:
        in_flight.dec()
        metrics.of(metrics.REQUESTS, model, outcome.endpoint, str(outcome.status)).inc()
        metrics.of(metrics.REQUEST_LATENCY, model, outcome.endpoint).observe(time.perf_counter() - started)


def shed(client: EngineClient | None, name: str) -> HTTPException | None:
    """A 503 for a model whose queue is full at every engine serving it, before its body is read."""
    if client and (limit := client.full(name)):
        return HTTPException(503, f"model {name!r} has {limit} or more requests waiting; retry shortly", headers=BUSY)
    return None


# --- inference ---

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
                receive=None, timeout_s: float | None = None) -> tuple[Version, object, np.ndarray]:
    """Rows through the engine that serves `name`: encode(version) gives (Rows, what the route
    wants back of the encoding) with that version's codec. A version swapped out between encoding
    and arrival (410) is encoded again with the new one, once. Returns the version, what encode
    gave back, and the outputs. receive: an HTTP request's, to watch its client (reply_of);
    timeout_s: a gRPC client's deadline when it is sooner than the server's own."""
    timeout = min(state.settings.request_timeout_s, float("inf") if timeout_s is None else timeout_s)
    client = state.engines
    for attempt in range(2):
        link, served_version = served(state, name, version, task)
        with tracing.span("tokenize"):
            rid, (rows, kept) = client.next_id(), encode(served_version)
        message = Infer(rid, name, served_version.number, rows.ids.data, rows.lengths.data, client.deadline(timeout),
                        tracing.traceparent())
        reply = await reply_of(client, link, client.request(link, message, timeout), rid, receive)
        if isinstance(reply, np.ndarray):
            return served_version, kept, reply
        if reply.status != 410 or attempt:
            raise refusal(reply)


async def infer_tensors(state: State, name: str, inputs: list[tensors.Input], outputs: list[str],
                        version: str | None = None, receive=None, timeout_s: float | None = None) -> tuple[Version, np.ndarray]:
    """V2 infer, for REST and gRPC alike: the inputs checked by the rules of every transport
    (tensors.rows_within), the logits of the version that ran them."""
    if outputs and outputs != ["logits"]:
        raise HTTPException(400, f"unknown outputs {outputs}; this model gives logits")
    settings = state.settings
    served_version, _, logits = await infer(
        state, name, lambda v: (tensors.rows_within(inputs, v, settings.max_instances, settings.max_response_bytes), None),
        version, receive=receive, timeout_s=timeout_s)
    return served_version, logits


# --- metadata ---

def tensor_metadata(tensor: Tensor) -> dict:
    return {"name": tensor.name, "datatype": DATATYPES[tensor.dtype],
            "shape": [d if isinstance(d, int) else -1 for d in tensor.shape]}


def v2_metadata(state: State, name: str, version: str | None = None) -> dict:
    """A model's V2 metadata: versions, platform, tensors, and where it runs."""
    link, served_version = served(state, name, version)
    manifest, deployed = served_version.manifest, link.catalog[name]
    return {"name": name, "versions": [str(served_version.number)], "platform": "onnxruntime_onnx",
            "inputs": [tensor_metadata(t) for t in manifest.inputs[:2]],
            "outputs": [tensor_metadata(t) for t in manifest.outputs[:1]],
            "parameters": {"provider": deployed.provider, "device": deployed.device}}


def v1_metadata(state: State, name: str) -> dict:
    """A model's V1 metadata: task, labels, vocabulary, where it runs, tensors."""
    link, version = served(state, name)
    m, deployed = version.manifest, link.catalog[name]
    return {"name": name, "version": str(version.number), "task": m.task, "arch": m.arch, "labels": m.labels,
            "max_len": m.max_len, "vocab_size": len(version.codec.vocab), "provider": deployed.provider,
            "device": deployed.device, "variant": deployed.variant, "inputs": [t.model_dump() for t in m.inputs],
            "outputs": [t.model_dump() for t in m.outputs]}


def served_names(state: State) -> list[str]:
    return sorted({name for link in engines(state).links for name in link.catalog or {}})


# --- model control (Triton's repository extension): every engine follows every call ---

async def every_engine(state: State, verb: str, name: str = "", version: int | None = None) -> list:
    """The verb on every engine; the first refusal, if any, is the answer."""
    client = engines(state, every=True)
    replies = await asyncio.gather(*(client.request(link, Control(client.next_id(), verb, name, version), LOAD_TIMEOUT_S)
                                     for link in client.links))
    if failed := next((r for r in replies if isinstance(r, Failed)), None):
        raise refusal(failed)
    return [r.body for r in replies]


async def index(state: State, ready_only: bool = False) -> list[dict]:
    """Every model version in the repository and its state; with several engines, a version is
    READY only where every engine serves it."""
    merged: dict[tuple[str, str], dict] = {}
    for rows in await every_engine(state, "index"):
        for row in rows:
            seen = merged.setdefault((row["name"], row["version"]), row)
            if seen["state"] != row["state"]:
                seen.update(state="UNLOADING", reason="engines differ: a load or unload is under way")
    return [r for r in merged.values() if r["state"] == "READY" or not ready_only]


async def load(state: State, name: str, version=None) -> dict:
    """Load `version` (pinned) or the latest on every engine."""
    if version is not None and not VERSION.fullmatch(str(version)):  # the repository's rule: 1, 2, ... (no "01")
        raise HTTPException(400, f"parameters.version must be a version folder's name (1, 2, ...), not {version!r}")
    if not MODEL_NAME.fullmatch(name):
        raise HTTPException(404, f"no model {name!r} in the repository")
    return (await every_engine(state, "load", name, version and int(version)))[0]


async def unload(state: State, name: str) -> dict:
    if not MODEL_NAME.fullmatch(name):
        raise HTTPException(404, f"no model {name!r} in the repository")
    return (await every_engine(state, "unload", name))[0]
