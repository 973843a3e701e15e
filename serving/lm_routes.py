"""Language-model routes: :generate (streamed or not) and stateful sequence sessions."""
import asyncio
import json
import logging

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from serving import metrics
from serving.batcher import QueueFull, Stopped
from serving.generation import Generation, Session, top_k
from serving.deployment import Deployment
from serving.inference import BUSY, check_text, deployed, disconnected, measured
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


@router.post("/{name}:generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def generate(name: str, body: GenerateRequest, request: Request):
    """Generate text after a prompt; with "stream": true, one server-sent event per token."""
    deployment = language_model(request, name)
    model, settings = deployment.model, request.app.state.settings
    check_text(request, body.prompt, "prompt")
    if body.max_new_tokens > settings.max_new_tokens:
        raise HTTPException(400, f"max_new_tokens is at most {settings.max_new_tokens}")
    if body.top_k > len(model.vocab):
        raise HTTPException(400, f"top_k is at most the vocabulary size {len(model.vocab)}")
    if deployment.generations >= settings.max_generations:
        raise HTTPException(503, f"{settings.max_generations} generations already running; retry shortly", headers=BUSY)
    generation = Generation(model, deployment.stepper, body)
    deployment.generations += 1
    deployment.acquire()  # until the last token is sent, also when streaming
    metrics.ACTIVE_GENERATIONS.labels(name).inc()

    def finished():
        deployment.generations -= 1
        deployment.release()
        metrics.ACTIVE_GENERATIONS.labels(name).dec()

    def summary() -> dict:
        return {"text": generation.text, "tokens": generation.tokens, "finish_reason": generation.finish_reason,
                "prompt_tokens": len(generation.prompt_ids), "unknown_prompt_tokens": generation.unknown}

    if body.stream:
        async def events():
            try:
                async for piece in generation.pieces():
                    metrics.TOKENS_GENERATED.labels(name).inc()
                    yield f"data: {json.dumps({'token': piece})}\n\n"
                yield f"data: {json.dumps(summary())}\n\n"
            except (QueueFull, Stopped) as e:
                yield f"data: {json.dumps({'error': f'{e}; retry shortly', 'request_id': REQUEST_ID.get()})}\n\n"
            except Exception as e:  # the headers are sent: the error goes in the stream
                log.exception("generate %s failed while streaming", name)
                error = f"generation failed: {type(e).__name__}: {e}"
                yield f"data: {json.dumps({'error': error, 'request_id': REQUEST_ID.get()})}\n\n"
            finally:  # also when the client disconnects: Starlette cancels this generator
                finished()
        return StreamingResponse(events(), media_type="text/event-stream")

    async def run():
        async for _ in generation.pieces():
            metrics.TOKENS_GENERATED.labels(name).inc()

    with measured(name, "generate"):
        task, gone = asyncio.ensure_future(run()), asyncio.ensure_future(disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()  # the client went away: the generation leaves the batch at once
                raise HTTPException(499, "client closed the request")
            task.result()
        except (QueueFull, Stopped) as e:
            raise HTTPException(503, f"{e}; retry shortly", headers=BUSY) from None
        finally:
            gone.cancel()
            finished()
        return summary()


@router.post("/{name}/sessions", response_model=SessionCreated)
async def create_session(name: str, request: Request) -> dict:
    """Start a sequence session at the model's zero state."""
    sessions = language_model(request, name).sessions
    session = sessions.create()
    if session is None:
        raise HTTPException(503, f"{sessions.max_sessions} sessions are live; retry shortly", headers=BUSY)
    metrics.LIVE_SESSIONS.labels(name).set(len(sessions.live))
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
    """Advance the session's state over more text; answers the next-token distribution's top k."""
    deployment, session = live_session(request, name, sid)
    model = deployment.model
    check_text(request, body.text)
    ids = model.vocab.encode(model.tokenizer(body.text))
    with measured(name, "session_step"), deployment.hold():
        async with session.lock:  # one step at a time per session, in order
            try:
                (session.logits, session.state), = await deployment.stepper.submit([Step(ids, session.state)])
            except (QueueFull, Stopped) as e:
                raise HTTPException(503, f"{e}; retry shortly", headers=BUSY) from None
            session.tokens += len(ids)
        return {"session_id": sid, "tokens": len(ids), "total_tokens": session.tokens,
                "unknown_tokens": sum(i == 1 for i in ids), "next": top_k(model, session.logits, body.top_k)}


@router.delete("/{name}/sessions/{sid}")
async def end_session(name: str, sid: str, request: Request) -> dict:
    """End a session and free its state."""
    deployment, _ = live_session(request, name, sid)
    deployment.sessions.delete(sid)
    metrics.LIVE_SESSIONS.labels(name).set(len(deployment.sessions.live))
    return {"session_id": sid, "ended": True}
