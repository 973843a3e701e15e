"""A front-end's side of the engines: one Unix stream connection per engine, requests sent in one
frame per event-loop turn (serving/common/frames.py), replies matched to their futures, generation
tokens to their streams.

It knows what each engine serves (its catalog), how full each model's queue is there (for
shedding), and reads each deployed version's codec and manifest from the repository, so that
texts are encoded with the vocabulary of the version that will run them. When an engine dies,
everything waiting on it is answered at once (its connection closes) with Lost, a 503 the core
sends to another engine where one serves the model; the front-end connects
again every RECONNECT_S until it is back (the server restarts it), says hello again and is ready
once it has the catalog.
"""
import asyncio
import itertools
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.repository import Version, read_version
from serving.common.frames import Frames, pack, socket_path
from serving.common.messages import (Cancel, Catalog, Deployed, Depths, Failed, Generate, Hello, Logprobs,
                                     PromptLogprobs, Result, Results, Tokens, decode_replies, encode)

log = logging.getLogger(__name__)
COALESCE_S = 0.0005
RECONNECT_S = 0.05  # how often a front-end tries an engine that is not (or no longer) there
# Choosing an engine for a classifier request, a stream of this front-end there counts as this many
# requests waiting: the engine running a model's generations takes classifier batches only when the
# others have far more waiting, since its steps wait behind each classifier call. Counted as one,
# 16 streams beside 64 classifier users ran at 48 streams/s (373 alone); counted as 8, at 279, the
# classifier answering 1,016 requests/s instead of 2,431 (python -m loadtest mixed, runs minutes
# apart: docs/benchmarks.md).
STREAM_WEIGHT = 8


class Stream:
    """The tokens of one generation as the engine sends them, step by step (and, where it asked,
    their log-probabilities, which arrive just before them, and its prompt's)."""

    def __init__(self, rid: int):
        self.id = rid
        self.tokens: list[int] = []
        self.last = False
        self.failed: Failed | None = None
        self.waiter: asyncio.Future | None = None
        self.logprobs: list[tuple[float, list]] = []  # (log-probability, alternatives) of tokens not yet taken
        self.prompt_logprobs: list[float | None] | None = None

    def scored(self, prompt_logprobs: list[float | None], last: bool):
        """The prompt's log-probabilities; last: the generation has no tokens (it scored its prompt)."""
        self.prompt_logprobs = prompt_logprobs
        if last:
            self.last = True
            self.wake()

    def take_logprobs(self, n: int) -> list[tuple[float, list]]:
        """The log-probabilities of the next n tokens taken."""
        taken, self.logprobs = self.logprobs[:n], self.logprobs[n:]
        return taken

    def push(self, token: int, last: bool):
        self.tokens.append(token)
        self.last = last
        self.wake()

    def fail(self, failed: Failed):
        self.failed, self.last = failed, True
        self.wake()

    def wake(self):
        if self.waiter and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self, timeout_s: float) -> list[int]:
        """Every token that arrived since the last call (waiting at most timeout_s for one);
        TimeoutError if none came."""
        if not self.tokens and not self.last:
            waiter = self.waiter = asyncio.get_running_loop().create_future()
            timer = asyncio.get_running_loop().call_later(
                timeout_s, lambda: waiter.done() or waiter.set_exception(TimeoutError()))
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        tokens, self.tokens = self.tokens, []
        return tokens


@dataclass(eq=False)
class Link:
    """One engine as this front-end sees it."""
    index: int
    address: str
    transport: asyncio.Transport | None = None  # None while not connected: what is sent waits in outbox
    catalog: dict[str, Deployed] | None = None  # None until the engine has said what it serves
    queued: dict[str, int] = field(default_factory=dict)
    waiting: dict[int, asyncio.Future] = field(default_factory=dict)
    streams: dict[int, Stream] = field(default_factory=dict)
    outbox: list = field(default_factory=list)
    flushed: float = 0.0


class Lost(Failed):
    """The reply to a request whose engine went before answering it (made here, never sent)."""


def answer(link: Link, rid: int, reply):
    """The waiting request's future gets its reply: its outputs (an array), or a message."""
    future = link.waiting.pop(rid, None)
    if future is not None and not future.done():
        future.set_result(reply)


class Connection(asyncio.Protocol):
    """One connection to an engine: each whole frame that arrives is read as it comes."""

    def __init__(self, client: "EngineClient", link: Link):
        self.client, self.link = client, link
        self.frames = Frames()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.Transport):
        self.transport = transport
        self.client.connected_to(self.link, transport)

    def data_received(self, data: bytes):
        for frame in self.frames.feed(data):
            self.client.received(self.link, frame)

    def connection_lost(self, exc: Exception | None):
        if self.link.transport is self.transport:  # the engine went (close() lets go of it first)
            self.client.disconnected(self.link)
        if not self.lost.done():
            self.lost.set_result(None)


class EngineClient:
    def __init__(self, addresses: list[str], repository: Path):
        self.repository = Path(repository)
        self.links = [Link(i, socket_path(a)) for i, a in enumerate(addresses)]
        self.ids = itertools.count(1)
        self.versions: dict[tuple[str, int], Version] = {}
        self.tasks: list[asyncio.Task] = []
        self.heard = asyncio.Event()  # every engine has sent its catalog once
        self.serving: dict[str, list[tuple[Link, Deployed]]] = {}  # model -> the engines serving it

    async def start(self):
        self.tasks += [asyncio.create_task(self.connect(link), name=f"engine-{link.index}") for link in self.links]

    async def wait_for_engines(self, timeout_s: float):
        """Until every engine has said what it serves (each has loaded and warmed up its models):
        a front-end takes connections only then, so that no request meets one that knows nothing."""
        try:
            await asyncio.wait_for(self.heard.wait(), timeout_s)
        except TimeoutError:
            log.error("engines %s have not answered within %gs: taking requests without them",
                      [link.index for link in self.links if link.catalog is None], timeout_s)

    async def close(self):
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for link in self.links:
            if (transport := link.transport) is not None:
                link.transport = None
                transport.close()

    @property
    def connected(self) -> bool:
        """Every engine has said what it serves (model control needs each of them)."""
        return all(link.catalog is not None for link in self.links)

    @property
    def ready(self) -> bool:
        """Every engine has said what it serves, and serves something: an engine with no model (none
        could be loaded, or all were unloaded) keeps the server unready, and its index says why."""
        return all(link.catalog for link in self.links)

    # --- what is served where ---

    def deployed(self, name: str) -> list[tuple[Link, Deployed]]:
        """The engines serving `name` and what each serves of it (kept as catalogs change)."""
        return self.serving.get(name, [])

    def catalogued(self, link: Link, catalog: dict[str, Deployed] | None):
        """An engine said what it serves (None: it is gone): who serves what, made again."""
        link.catalog = catalog
        self.serving = {}
        for each in self.links:
            for name, deployed in (each.catalog or {}).items():
                self.serving.setdefault(name, []).append((each, deployed))
        if self.connected:
            self.heard.set()

    def pick(self, name: str, together: bool = False) -> tuple[Link, Deployed] | None:
        """The engine serving `name` with the least work waiting from this front-end (a stream
        weighs STREAM_WEIGHT requests); together: the same one for every front-end (a model's
        generations share its steps there, and one step of 64 rows costs far less than two of 32)."""
        serving = self.deployed(name)
        if not serving:
            return None
        if together:
            return serving[zlib.crc32(name.encode()) % len(serving)]
        return min(serving, key=lambda ld: len(ld[0].waiting) + STREAM_WEIGHT * len(ld[0].streams))

    def version(self, name: str, number: int) -> Version:
        """A deployed version's codec and manifest, read once through the repository contract."""
        key = (name, number)
        if key not in self.versions:
            self.versions[key] = read_version(self.repository / name / str(number))
        return self.versions[key]

    def full(self, name: str) -> int | None:
        """The model's queue limit if every engine serving `name` last said its queue has reached
        it (a request would be shed there), else None."""
        serving = self.deployed(name)
        if serving and all(link.queued.get(name, 0) >= d.max_queue_size for link, d in serving):
            return serving[0][1].max_queue_size
        return None

    # --- requests ---

    def next_id(self) -> int:
        return next(self.ids)

    def send(self, link: Link, message):
        """Queue a message; everything queued in one turn of the event loop goes in one frame."""
        if not link.outbox:
            loop = asyncio.get_running_loop()
            if loop.time() - link.flushed < COALESCE_S:
                loop.call_later(COALESCE_S, self.flush, link)
            else:
                loop.call_soon(self.flush, link)
        link.outbox.append(message)

    def flush(self, link: Link):
        if link.transport is None or not link.outbox:  # it waits for the connection (Hello goes first)
            return
        frame, link.outbox = encode(link.outbox), []
        link.flushed = asyncio.get_running_loop().time()
        link.transport.write(pack(frame))

    def request(self, link: Link, message, timeout_s: float) -> asyncio.Future:
        """Send a message that has one reply (Result, Failed, Done, SessionOpened); the future gets
        that reply, or Failed 504 after timeout_s (and the engine is told to drop the request)."""
        loop = asyncio.get_running_loop()
        future = link.waiting[message.id] = loop.create_future()
        timer = loop.call_later(timeout_s, self.expire, link, message.id, timeout_s)
        future.add_done_callback(lambda _: timer.cancel())
        self.send(link, message)
        return future

    def expire(self, link: Link, rid: int, timeout_s: float):
        future = link.waiting.pop(rid, None)
        if future and not future.done():
            future.set_result(Failed(rid, 504, f"no answer within the deadline of {timeout_s:g}s"))
            self.send(link, Cancel([rid]))

    def cancel(self, link: Link, rid: int, reply: Failed | None = None):
        """The client left (or a stream ended early): answer the request with `reply`, forget it,
        and tell the engine to drop it."""
        future = link.waiting.pop(rid, None)
        if future and not future.done():
            future.set_result(reply)
        if link.streams.pop(rid, None) is not None or future is not None:
            self.send(link, Cancel([rid]))

    def generate(self, link: Link, message: Generate) -> Stream:
        stream = link.streams[message.id] = Stream(message.id)
        self.send(link, message)
        return stream

    @staticmethod
    def deadline(timeout_s: float) -> float:
        return time.monotonic() + timeout_s

    # --- replies and the engines' comings and goings ---

    async def connect(self, link: Link):
        """Connect to the engine, and again whenever it is gone, until it is back."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                _, connection = await loop.create_unix_connection(lambda: Connection(self, link), link.address)
            except OSError:  # not listening yet, or restarting: its socket file is missing or refuses
                await asyncio.sleep(RECONNECT_S)
                continue
            await connection.lost

    def connected_to(self, link: Link, transport: asyncio.Transport):
        """Say hello first on every (re)connection; what waited for the connection follows it."""
        link.transport = transport
        link.outbox.insert(0, Hello())
        self.flush(link)

    def disconnected(self, link: Link):
        """A lost engine: everything waiting on it is answered Lost at once, and it serves nothing
        until it says its catalog again."""
        log.error("engine %d (%s) is gone with %d requests and %d streams: each goes to another engine serving "
                  "its model, else is answered 503",
                  link.index, link.address, len(link.waiting), len(link.streams))
        link.transport, link.outbox = None, []  # what it did not take is answered below
        self.catalogued(link, None)
        gone = Lost(0, 503, f"engine {link.index} stopped before answering; retry")
        for rid, future in link.waiting.items():
            if not future.done():
                future.set_result(Lost(rid, gone.status, gone.error))
        for stream in link.streams.values():
            stream.fail(gone)
        link.waiting, link.streams = {}, {}

    def received(self, link: Link, frame: memoryview):
        """A frame of replies from the engine, each to its request or stream."""
        for reply in decode_replies(frame):
            if isinstance(reply, Tokens):
                for rid, token, last in zip(reply.ids, reply.tokens, reply.last):
                    if stream := link.streams.get(rid):
                        stream.push(token, last)
                        if last:
                            del link.streams[rid]
            elif isinstance(reply, Depths):
                link.queued = reply.queued
            elif isinstance(reply, Logprobs):
                for rid, logprob, top in zip(reply.ids, reply.logprobs, reply.top):
                    if stream := link.streams.get(rid):
                        stream.logprobs.append((logprob, top))
            elif isinstance(reply, PromptLogprobs):
                if stream := link.streams.get(reply.id):
                    stream.scored(reply.logprobs, reply.last)
                    if reply.last:
                        del link.streams[reply.id]
            elif isinstance(reply, Catalog):
                self.catalogued(link, {d.name: d for d in reply.models})
            elif isinstance(reply, Results):  # a batch's answers: each request's rows, a view of one buffer
                outputs, start = np.frombuffer(reply.data, np.float32).reshape(-1, reply.width), 0
                for rid, n in zip(reply.ids, reply.rows):
                    answer(link, rid, outputs[start: start + n])
                    start += n
            elif isinstance(reply, Result):
                answer(link, reply.id, np.frombuffer(reply.data, np.float32).reshape(reply.shape))
            elif link.waiting.get(reply.id) is not None:
                answer(link, reply.id, reply)
            elif isinstance(reply, Failed) and (stream := link.streams.pop(reply.id, None)):
                stream.fail(reply)
