"""Language-model routes: :generate (streamed or not) and stateful sequence sessions. The engine
advances the states and samples; the front-end encodes prompts, decodes tokens, finds stop
strings and writes the answers."""
import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import State

from core.codec import TextCodec
from serving.common import metrics, tracing
from serving.common.logs import REQUEST_ID
from serving.common.messages import CloseSession, Done, Failed, Generate, OpenSession, SessionOpened, Step, Stepped
from serving.frontend.client import EngineClient, Link, Stream
from serving.frontend.responses import json_response
from serving.frontend.schemas import GenerateRequest, StepRequest
from serving.frontend.service import answered, check_text, engines, refusal, reply_of, served

log = logging.getLogger(__name__)


def language_model(request: Request, name: str):
    return served(request.app.state, name, task="lm")


@dataclass
class Generation:
    """One generate request as the front-end follows it: the text so far and why it ended."""
    codec: TextCodec
    body: GenerateRequest
    prompt_ids: list[int]
    version: int  # the model version generating
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    pieces: list[str] = field(default_factory=list)

    def add(self, tokens: list[int], last: bool) -> list[str]:
        """The pieces of text these tokens make, up to a stop string or the last token."""
        new = []
        for token in tokens:
            piece = self.codec.piece(token)
            self.tokens += 1
            self.text += piece
            new.append(piece)
            stop = next((s for s in self.body.stop if s and s in self.text[-(len(piece) + len(s)):]), None)
            if stop:
                self.text, self.finish_reason = self.text[: self.text.index(stop)], "stop"
                break
        if last and not self.finish_reason:
            self.finish_reason = "length"
        return new

    def summary(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
                "prompt_tokens": len(self.prompt_ids),
                "unknown_prompt_tokens": self.prompt_ids.count(self.codec.vocab.unk_id)}


class Deltas:
    """A generation's text in parts, each what arrived since the part before, less the end that a
    stop string may yet take back: the parts add up to the whole text exactly (Triton's streams)."""

    def __init__(self, generation: Generation):
        self.generation, self.sent = generation, 0
        self.held = max(map(len, generation.body.stop), default=1) - 1

    def next(self, final: bool = False) -> str:
        text = self.generation.text
        end = len(text) if final or self.generation.finish_reason else max(self.sent, len(text) - self.held)
        part, self.sent = text[self.sent: end], end
        return part


async def first_tokens(state: State, name: str, body: GenerateRequest,
                       asked_version: str | None = None) -> tuple[Link, Stream, Generation, list[int]]:
    """Start the generation on an engine and wait for its first token(s): until then a refusal or
    the deadline is still an HTTP status. A version swapped out meanwhile (410) is tried once more
    (unless the client asked for that version)."""
    client, settings = engines(state), state.settings
    started = time.perf_counter()
    for attempt in range(2):
        link, version = served(state, name, asked_version, task="lm", together=True)
        if body.top_k > len(version.codec.vocab):
            raise HTTPException(400, f"top_k is at most the vocabulary size {len(version.codec.vocab)}")
        with tracing.span("tokenize"):
            prompt = version.codec.ids(body.prompt)
        if not prompt:
            raise HTTPException(400, "the prompt has no tokens")
        rid = client.next_id()
        stream = client.generate(link, Generate(rid, name, version.number, prompt, body.max_new_tokens,
                                                body.temperature, body.top_k, body.top_p, body.seed))
        try:
            tokens = await stream.next(settings.request_timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            client.cancel(link, rid)
            raise HTTPException(504, f"no first token within the deadline of {settings.request_timeout_s:g}s") from None
        if tokens:  # a failure after them goes in the stream
            metrics.TIME_TO_FIRST_TOKEN.labels(name).observe(time.perf_counter() - started)
            return link, stream, Generation(version.codec, body, prompt, version.number), tokens
        if stream.failed.status != 410 or attempt:
            raise refusal(stream.failed)


@functools.lru_cache(maxsize=65536)
def event(piece: str) -> bytes:
    """One token's server-sent event (made once per piece of text)."""
    return sse({"token": piece})


class GenerationFailed(Exception):
    """The engine failed a generation after its first token, or the next token did not come."""


async def rest(client: EngineClient, link: Link, stream: Stream, generation: Generation, tokens: list[int],
               timeout_s: float, interval_s: float):
    """Yields the text pieces of the tokens that arrived, the first ones at once, then at most
    every interval_s (what arrives meanwhile goes together: one write for several tokens), until
    the generation ends; each token must come within timeout_s of the one before."""
    loop = asyncio.get_running_loop()
    span = tracing.start("generation")
    try:
        while True:
            pieces = generation.add(tokens, stream.last and not stream.tokens and not stream.failed)  # none waits
            if generation.finish_reason == "stop":
                client.cancel(link, stream.id)
            written = loop.time()
            yield pieces
            if stream.failed:
                raise GenerationFailed(stream.failed.error)
            if generation.finish_reason:
                return
            if (pause := written + interval_s - loop.time()) > 0 and not stream.last:
                await asyncio.sleep(pause)
            try:
                tokens = await stream.next(timeout_s)
            except TimeoutError:
                client.cancel(link, stream.id)
                raise GenerationFailed(f"no next token within the deadline of {timeout_s:g}s") from None
    finally:
        if span:
            span.set_attributes({"rnnserve.tokens": generation.tokens, "rnnserve.finish_reason": generation.finish_reason or "cut off"})
            span.end()


class OwnedStream(StreamingResponse):
    """A stream that calls `end` once it is over, however it ends: finished, failed, cut off by
    the client, or never started at all (the client left before the first byte)."""

    def __init__(self, content, end, **kw):
        super().__init__(content, **kw)
        self.end = end

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.end()


async def started(state: State, name: str, body: GenerateRequest, version: str | None = None
                  ) -> tuple[Generation, AsyncIterator[list[str]], Callable[[], None]]:
    """A generation checked and under way: its first tokens arrived (until then a refusal is an
    HTTP status), the pieces of text to come, and how to cancel it. For HTTP and gRPC alike."""
    settings, client = state.settings, engines(state)
    check_text(settings, body.prompt, "prompt")
    if body.max_new_tokens > settings.max_new_tokens:
        raise HTTPException(400, f"max_new_tokens is at most {settings.max_new_tokens}")
    with answered():
        link, stream, generation, tokens = await first_tokens(state, name, body, version)
    pieces = rest(client, link, stream, generation, tokens, settings.request_timeout_s,
                  settings.stream_interval_ms / 1000)
    return generation, pieces, lambda: client.cancel(link, stream.id)


def sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def event_stream(request: Request, name: str, pieces: AsyncIterator[list[str]], cancel: Callable[[], None],
                 events_of: Callable[[list[str]], bytes], last: Callable[[], bytes], endpoint: str) -> OwnedStream:
    """Server-sent events: events_of(the pieces that arrived together), then last() once the
    generation ends; a failure after the headers is an error event, {"error": ...}. Counted in
    /metrics under `endpoint`, apart from whole answers."""
    if outcome := request.scope.get("rnnserve.outcome"):
        outcome.endpoint = endpoint

    async def events():
        try:
            async for new in pieces:
                yield events_of(new)
            yield last()
        except Exception as e:  # the headers are sent: the error goes in the stream
            error = str(e) if isinstance(e, GenerationFailed) else f"generation failed: {type(e).__name__}: {e}"
            if not isinstance(e, GenerationFailed):
                log.exception("generate %s failed while streaming", name)
            yield sse({"error": error, "request_id": REQUEST_ID.get()})
    return OwnedStream(events(), cancel, media_type="text/event-stream")


async def to_the_end(request: Request, pieces: AsyncIterator[list[str]], cancel: Callable[[], None]):
    """Run a generation to its end for one whole answer: 499 if the client leaves first, 504 if a
    token misses its deadline, 500 if the engine fails it."""
    async def run():
        async for _ in pieces:
            pass

    with answered():
        task = asyncio.ensure_future(run())
        gone = asyncio.ensure_future(watch_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()
                raise HTTPException(499, "client closed the request")
            if isinstance(task.exception(), GenerationFailed):
                raise HTTPException(500 if "deadline" not in str(task.exception()) else 504, str(task.exception()))
            task.result()
        finally:
            gone.cancel()
            cancel()


async def generate(name: str, body: GenerateRequest, request: Request):
    """Generate text after a prompt; with "stream": true, server-sent events, one per token.

    The first token must come within RNNSERVE_REQUEST_TIMEOUT_S (504), and so must each later one
    (an error event when streaming); the whole stream has no deadline of its own."""
    generation, pieces, cancel = await started(request.app.state, name, body)
    if body.stream:
        return event_stream(request, name, pieces, cancel, lambda new: b"".join(map(event, new)),
                            lambda: sse(generation.summary()), "generate_stream")
    await to_the_end(request, pieces, cancel)
    return json_response(generation.summary())


async def watch_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def session_id(link: Link, opened: SessionOpened) -> str:
    """What the client holds: the engine, the version (whose codec encodes its text) and the id."""
    return f"{link.index}.{opened.version}.{opened.session}"


def session_of(request: Request, name: str, sid: str) -> tuple[Link, TextCodec, str]:
    client = engines(request.app.state)
    engine, _, rest_ = sid.partition(".")
    version, _, session = rest_.partition(".")
    if not (engine.isdigit() and version.isdigit() and int(engine) < len(client.links) and session):
        raise HTTPException(404, f"no session {sid!r} for model {name!r}")
    language_model(request, name)
    try:
        codec = client.version(name, int(version)).codec
    except (OSError, ValueError):
        raise HTTPException(404, f"no session {sid!r} for model {name!r}") from None
    return client.links[int(engine)], codec, session


async def ask(state: State, link: Link, message, missing: str = "", receive=None) -> object:
    """A session message's reply within the request deadline; a refusal raises its status (a
    session the engine does not have: 404 saying `missing`, which names it as the client does).
    receive: an HTTP request's, to drop the message if its client leaves."""
    client = state.engines
    future = client.request(link, message, state.settings.request_timeout_s)
    reply = await reply_of(client, link, future, message.id, receive)
    if isinstance(reply, Failed) and reply.status == 404 and missing:
        raise HTTPException(404, missing)
    if isinstance(reply, Failed):
        raise refusal(reply)
    return reply


def no_session(sid: str) -> str:
    return f"no session {sid!r} (ended, expired, or its version was replaced)"


def most_likely(codec: TextCodec, stepped: Stepped) -> list[tuple[str, float]]:
    """The step's top_k most likely next tokens (the engine's), with their probabilities, most likely first."""
    return [(codec.vocab.itos[i], p) for i, p in zip(stepped.tokens, stepped.probabilities)]


async def create_session(name: str, request: Request) -> dict:
    """Start a sequence session at the model's zero state."""
    link, _ = language_model(request, name)
    opened = await ask(request.app.state, link, OpenSession(engines(request.app.state).next_id(), name),
                       receive=request.receive)
    return {"session_id": session_id(link, opened), "idle_expiry_s": request.app.state.settings.session_idle_s}


async def step_session(name: str, sid: str, body: StepRequest, request: Request):
    """Advance the session's state over more text; answers the next-token distribution's top k.
    Within the request deadline; a step whose client disconnects before it runs is dropped."""
    link, codec, session = session_of(request, name, sid)
    check_text(request.app.state.settings, body.text)
    ids = codec.ids(body.text)
    if not ids:
        raise HTTPException(400, "the text has no tokens")
    with answered():
        client, timeout = engines(request.app.state), request.app.state.settings.request_timeout_s
        stepped: Stepped = await ask(request.app.state, link, Step(client.next_id(), session, ids,
                                                                   client.deadline(timeout), body.top_k),
                                     no_session(sid), request.receive)
        return json_response({"session_id": sid, "tokens": len(ids), "total_tokens": stepped.total_tokens,
                              "unknown_tokens": ids.count(codec.vocab.unk_id),
                              "next": [{"token": token, "probability": p}
                                       for token, p in most_likely(codec, stepped)]})


async def end_session(name: str, sid: str, request: Request) -> dict:
    """End a session and free its state."""
    link, _, session = session_of(request, name, sid)
    done: Done = await ask(request.app.state, link, CloseSession(engines(request.app.state).next_id(), session),
                           no_session(sid), request.receive)
    return done.body | {"session_id": sid}
