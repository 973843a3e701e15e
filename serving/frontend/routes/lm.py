"""Language-model routes: :generate (streamed or not) and stateful sequence sessions, over the
core's generation and sessions (serving/frontend/core/): the routes write the answers, JSON or
server-sent events."""
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from serving.common.logs import REQUEST_ID
from serving.frontend.core import sessions
from serving.frontend.core.generation import Generation, GenerationFailed, started, to_the_end
from serving.frontend.core.refused import Refused
from serving.frontend.responses import json_response, left
from serving.frontend.schemas import CarriedStepRequest, GenerateRequest, StepRequest

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=65536)
def event(piece: str) -> bytes:
    """One token's server-sent event (made once per piece of text)."""
    return sse({"token": piece})


def sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def token_events(generation: Generation) -> Callable[[list[str]], bytes]:
    """The events of the pieces that arrived together: one per token, {"token": its text}, and
    where logprobs were asked its log-probability and alternatives ({"token", "logprob", "top"})."""
    if generation.body.logprobs is None:
        return lambda new: b"".join(map(event, new))
    return lambda new: b"".join(sse(entry) for entry in generation.logprobs[len(generation.logprobs) - len(new):])


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


def error_event(e: Refused) -> bytes:
    return sse({"error": e.message, "request_id": REQUEST_ID.get()})


def event_stream(request: Request, name: str, pieces: AsyncIterator, cancel: Callable[[], None],
                 events_of: Callable[[list[str]], bytes], last: Callable[[], bytes], endpoint: str,
                 failed: Callable[[Refused], bytes] = error_event) -> OwnedStream:
    """Server-sent events: events_of(the pieces that arrived together), then last() once the
    generation ends; a failure after the headers is an error event, failed(why): {"error": ...}.
    Counted in /metrics under `endpoint`, apart from whole answers."""
    if outcome := request.scope.get("rnnserve.outcome"):
        outcome.endpoint = endpoint

    async def events():
        try:
            async for new in pieces:
                if event := events_of(new):  # none while a stop string may yet take the text back
                    yield event
            yield last()
        except Exception as e:  # the headers are sent: the error goes in the stream
            if not isinstance(e, GenerationFailed):
                log.exception("generate %s failed while streaming", name)
            yield failed(e if isinstance(e, GenerationFailed)
                         else GenerationFailed(500, f"generation failed: {type(e).__name__}: {e}"))
    return OwnedStream(events(), cancel, media_type="text/event-stream")


async def generate(name: str, body: GenerateRequest, request: Request):
    """Generate text after a prompt; with "stream": true, server-sent events, one per token.

    The first token must come within RNNSERVE_REQUEST_TIMEOUT_S (504), and so must each later one
    (an error event when streaming); the whole stream has no deadline of its own."""
    generation, pieces, cancel = await started(request.app.state.front, name, body)
    if body.stream:
        return event_stream(request, name, pieces, cancel, token_events(generation),
                            lambda: sse(generation.summary()), "generate_stream")
    await to_the_end(pieces, cancel, left(request))
    return json_response(generation.summary())


async def create_session(name: str, request: Request) -> dict:
    """Start a sequence session at the model's zero state (with a state key, its token too)."""
    front = request.app.state.front
    sid, token = await sessions.open_session(front, name, left(request))
    return {"session_id": sid, "idle_expiry_s": front.settings.session_idle_s} | ({"state": token} if token else {})


async def step_session(name: str, sid: str, body: StepRequest, request: Request):
    """Advance the session's state over more text; answers the next-token distribution's top k.
    With a state token, from its state on whichever replica this is. Within the request deadline;
    a step whose client disconnects before it runs is dropped."""
    return json_response({"session_id": sid} | await stepped(request, name, sid, body))


async def step(name: str, body: CarriedStepRequest, request: Request):
    """Advance the state a token carries (none: the zero state) over more text, on any replica;
    answers the next-token distribution's top k and the new state's token."""
    return json_response(await stepped(request, name, None, body))


async def stepped(request: Request, name: str, sid: str | None, body: StepRequest | CarriedStepRequest) -> dict:
    """A step's answer: of session `sid`, or of the state carried alone."""
    codec, ids, answer, token = await sessions.step_session(
        request.app.state.front, name, sid, body.text, body.top_k, body.state, getattr(body, "return_state", False),
        left(request))
    return {"tokens": len(ids), "total_tokens": answer.total_tokens, "unknown_tokens": ids.count(codec.vocab.unk_id),
            "next": [{"token": t, "probability": p} for t, p in sessions.most_likely(codec, answer)]} | (
        {"state": token} if token is not None else {})


async def end_session(name: str, sid: str, request: Request) -> dict:
    """End a session and free its state."""
    front = request.app.state.front
    link, _, session = sessions.session_of(front, name, sid)
    done = await sessions.close(front, link, session, sessions.no_session(sid, name), left(request))
    return done.body | {"session_id": sid}
