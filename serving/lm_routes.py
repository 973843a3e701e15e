"""Language-model routes: :generate (streamed or not) and stateful sequence sessions."""
import asyncio
import json
import logging
import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from serving import metrics
from serving.deployment import Deployment
from serving.generation import Generation, Session, top_k
from serving.inference import BUSY, answered, check_text, deployed, disconnected, infer, refusal
from serving.model import Step
from serving.request_ids import REQUEST_ID
from serving.schemas import GenerateRequest, GenerateResponse, SessionCreated, StepRequest, StepResponse

router = APIRouter(prefix="/v1/models", tags=["language models"])
log = logging.getLogger(__name__)


def language_model(request: Request, name: str) -> Deployment:
    deployment = deployed(request, name)
    if deployment.model.task != "lm":
        raise HTTPException(400, f"model {name!r} is a {deployment.model.task}: only language models generate or keep sessions")
    return deployment


class HeldStream(StreamingResponse):
    """A stream that calls `release` once it is over, however it ends: finished, failed, cut off
    by the client, or never started at all (the client left before the first byte)."""

    def __init__(self, content, release, **kw):
        super().__init__(content, **kw)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


@router.post("/{name}:generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def generate(name: str, body: GenerateRequest, request: Request):
    """Generate text after a prompt; with "stream": true, one server-sent event per token.

    The first token must come within RNNSERVE_REQUEST_TIMEOUT_S (504, or an error event when
    streaming), and so must each later one; the whole stream has no deadline of its own."""
    deployment = language_model(request, name)
    model, settings = deployment.model, request.app.state.settings
    check_text(request, body.prompt, "prompt")
    if body.max_new_tokens > settings.max_new_tokens:
        raise HTTPException(400, f"max_new_tokens is at most {settings.max_new_tokens}")
    if body.top_k > model.vocab_size:
        raise HTTPException(400, f"top_k is at most the vocabulary size {model.vocab_size}")
    if deployment.generations >= settings.max_generations:
        raise HTTPException(503, f"{settings.max_generations} generations already running; retry shortly", headers=BUSY)
    generation = Generation(model, deployment.stepper, body, settings.request_timeout_s)
    started = time.perf_counter()
    deployment.generations += 1
    deployment.acquire()  # until the last token is sent, also when streaming
    metrics.ACTIVE_GENERATIONS.labels(name).inc()
    released = False

    def release():
        nonlocal released
        if not released:
            released = True
            deployment.generations -= 1
            deployment.release()
            metrics.ACTIVE_GENERATIONS.labels(name).dec()

    async def pieces():
        async for piece in generation.pieces():
            if generation.tokens == 1:
                metrics.TIME_TO_FIRST_TOKEN.labels(name).observe(time.perf_counter() - started)
            metrics.TOKENS_GENERATED.labels(name).inc()
            yield piece

    def summary() -> dict:
        return {"text": generation.text, "tokens": generation.tokens, "finish_reason": generation.finish_reason,
                "prompt_tokens": len(generation.prompt_ids), "unknown_prompt_tokens": generation.unknown}

    if body.stream:
        request.scope["rnnserve.endpoint"] = "generate_stream"

        async def events():
            try:
                async for piece in pieces():
                    yield f"data: {json.dumps({'token': piece})}\n\n"
                yield f"data: {json.dumps(summary())}\n\n"
            except Exception as e:  # the headers are sent: the error goes in the stream
                refused = refusal(e)
                if refused is None:
                    log.exception("generate %s failed while streaming", name)
                error = refused.detail if refused else f"generation failed: {type(e).__name__}: {e}"
                yield f"data: {json.dumps({'error': error, 'request_id': REQUEST_ID.get()})}\n\n"
        return HeldStream(events(), release, media_type="text/event-stream")

    async def run():
        async for _ in pieces():
            pass

    with answered(name, "generate"):
        task, gone = asyncio.ensure_future(run()), asyncio.ensure_future(disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()  # the client went away: the generation leaves the batch at once
                raise HTTPException(499, "client closed the request")
            if refused := refusal(task.exception()) if task.exception() else None:
                raise refused
            task.result()
        finally:
            gone.cancel()
            release()
        return summary()


@router.post("/{name}/sessions", response_model=SessionCreated)
async def create_session(name: str, request: Request) -> dict:
    """Start a sequence session at the model's zero state."""
    sessions = language_model(request, name).sessions
    session = sessions.create()
    if session is None:
        raise HTTPException(503, f"{sessions.max_sessions} sessions are live; retry shortly", headers=BUSY)
    return {"session_id": session.id, "idle_expiry_s": sessions.idle_s}


def live_session(request: Request, name: str, sid: str) -> tuple[Deployment, Session]:
    """The session and the deployment it lives on (a session ends with its model version)."""
    deployment = language_model(request, name)
    session = deployment.sessions.get(sid)
    if session is None:
        raise HTTPException(404, f"no session {sid!r} for model {name!r} (ended, expired, or its version was replaced)")
    return deployment, session


@router.post("/{name}/sessions/{sid}:step", response_model=StepResponse)
async def step_session(name: str, sid: str, body: StepRequest, request: Request) -> dict:
    """Advance the session's state over more text; answers the next-token distribution's top k.
    Within the request deadline; a step whose client disconnects before it runs is dropped."""
    deployment, session = live_session(request, name, sid)
    model = deployment.model
    check_text(request, body.text)
    ids = model.codec.ids(body.text)
    with answered(name, "session_step"), deployment.hold():
        async with session.lock:  # one step at a time per session, in order
            (session.logits, session.state), = await infer(request, deployment.stepper, [Step(ids, session.state)])
            session.tokens += len(ids)
        return {"session_id": sid, "tokens": len(ids), "total_tokens": session.tokens,
                "unknown_tokens": ids.count(model.codec.vocab.unk_id), "next": top_k(model, session.logits, body.top_k)}


@router.delete("/{name}/sessions/{sid}")
async def end_session(name: str, sid: str, request: Request) -> dict:
    """End a session and free its state."""
    deployment, _ = live_session(request, name, sid)
    deployment.sessions.delete(sid)
    return {"session_id": sid, "ended": True}
