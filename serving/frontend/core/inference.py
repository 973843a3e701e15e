"""Rows through the engine that serves a model, within the request's deadline: V1's texts and V2's
tensors alike. A client that leaves is told to the engine, which drops its request."""
import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from core.codec import TextCodec
from core.repository import Version
from serving.common import tracing
from serving.common.messages import Failed, Infer, Rows
from serving.frontend.client import EngineClient, Link, Lost
from serving.frontend.core import tensors
from serving.frontend.core.front import Front, check_texts, served
from serving.frontend.core.refused import Refused, refusal

WATCH_AFTER_S = 0.05  # a request not answered by then also watches its client (most never need to)
Left = Callable[[], Awaitable[None]]  # returns when the client has left (HTTP: its disconnect)
GONE = "client closed the request"


async def reply_of(client: EngineClient, link: Link, future: asyncio.Future, rid: int, left: Left | None = None):
    """The engine's reply. A request not answered within WATCH_AFTER_S also waits for left(): if
    the client leaves, the engine drops the request before it runs (a 499). A cancelled request
    (a gRPC client that left) is dropped the same way, and the cancellation goes on."""
    loop = asyncio.get_running_loop()
    watcher = None
    gone = Failed(rid, 499, GONE)

    async def watch():
        await left()
        client.cancel(link, rid, gone)

    def start_watching():
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER_S, start_watching) if left else None
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


async def on_the_current_version(front: Front, name: str, attempt: Callable[[], Awaitable]):
    """attempt() once more if the version it was encoded for was swapped out meanwhile (a Failed
    410: the engine serves a newer one now), or if its engine went before answering (Lost) while
    another engine serves `name`: nothing of it reached the client. Any other Failed, or a second
    one, is refused."""
    for tries_left in (1, 0):
        reply = await attempt()
        if not isinstance(reply, Failed):
            return reply
        again = reply.status == 410 or (isinstance(reply, Lost) and front.engines.deployed(name))
        if not again or not tries_left:
            raise refusal(reply)


async def infer(front: Front, name: str, encode, version: str | None = None, task: str | None = None,
                left: Left | None = None, timeout_s: float | None = None) -> tuple[Version, object, np.ndarray]:
    """Rows through the engine that serves `name`: encode(version) gives (Rows, what the caller
    wants back of the encoding) with that version's codec. Returns the version, what encode gave
    back, and the outputs. left: see reply_of; timeout_s: a gRPC client's deadline when it is
    sooner than the server's own."""
    timeout = min(front.settings.request_timeout_s, float("inf") if timeout_s is None else timeout_s)
    client = front.engines
    ran = {}

    async def attempt():
        link, ran["version"] = served(front, name, version, task)
        with tracing.span("tokenize"):
            rid, (rows, ran["kept"]) = client.next_id(), encode(ran["version"])
        message = Infer(rid, name, ran["version"].number, rows.ids.data, rows.lengths.data, client.deadline(timeout),
                        tracing.traceparent(), alone=front.in_flight == 1)
        return await reply_of(client, link, client.request(link, message, timeout), rid, left)

    outputs = await on_the_current_version(front, name, attempt)
    return ran["version"], ran["kept"], outputs


def encoded(codec: TextCodec, texts: list[str]) -> tuple[Rows, list[bool]]:
    """The texts' rows, and which were cut at max_len: V1's rule, for V1's instances and V2's text_input."""
    each = [codec.encode(text) for text in texts]
    return Rows.of([ids for ids, _ in each]), [cut for _, cut in each]


async def infer_tensors(front: Front, name: str, inputs: list[tensors.Input], outputs: list[str],
                        version: str | None = None, left: Left | None = None,
                        timeout_s: float | None = None) -> tuple[Version, list[tensors.Output]]:
    """V2 infer, for REST and gRPC alike: token ids checked by the rules of every transport
    (tensors.rows_within), or a classifier's texts encoded as V1 encodes them; the outputs asked
    for (tensors.outputs_named) from the logits of the version that ran them."""
    settings = front.settings
    text = tensors.text_of(inputs)
    if text is not None:
        texts = tensors.texts(text)
        check_texts(front, texts, tensors.TEXT)

    def encode(v: Version) -> tuple[Rows, list[str]]:
        names = tensors.outputs_named(v.manifest, outputs, text is not None)
        if text is None:
            return tensors.rows_within(inputs, v, settings.max_instances, settings.max_response_bytes), names
        if v.manifest.task != "classifier":
            raise Refused(400, f"{tensors.TEXT}: model {name!r} is a language model: it takes input_ids and "
                               "lengths here; its text is generated from on :generate, the generate extension "
                               "or ModelStreamInfer")
        return encoded(v.codec, texts)[0], names

    served_version, names, logits = await infer(front, name, encode, version, left=left, timeout_s=timeout_s)
    return served_version, tensors.outputs_of(served_version.manifest, logits, names)
