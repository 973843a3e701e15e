"""Language-model routes: :generate (streamed or not) and stateful sequence sessions."""
import asyncio
import json

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from serving import metrics
from serving.batcher import QueueFull
from serving.generation import Generation, Session, top_k
from serving.inference import disconnected, measured, served
from serving.model import Step
from serving.schemas import GenerateRequest, GenerateResponse, SessionCreated, StepRequest, StepResponse

router = APIRouter(prefix="/v1/models", tags=["language models"])
BUSY = {"Retry-After": "1"}


def language_model(request: Request, name: str):
    model = served(request, name)
    if model.task != "lm":
        raise HTTPException(400, f"model {name!r} is a {model.task}: only language models generate or keep sessions")
    return model


@router.post("/{name}:generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def generate(name: str, body: GenerateRequest, request: Request):
    """Generate text after a prompt; with "stream": true, one server-sent event per token."""
    model = language_model(request, name)
    settings, state = request.app.state.settings, request.app.state
    if body.max_new_tokens > settings.max_new_tokens:
        raise HTTPException(400, f"max_new_tokens is at most {settings.max_new_tokens}")
    if body.top_k > len(model.vocab):
        raise HTTPException(400, f"top_k is at most the vocabulary size {len(model.vocab)}")
    if state.generations[name] >= settings.max_generations:
        raise HTTPException(503, f"{settings.max_generations} generations already running; retry shortly", headers=BUSY)
    generation = Generation(model, state.steppers[name], body)
    state.generations[name] += 1
    metrics.ACTIVE_GENERATIONS.labels(name).inc()

    def finished():
        state.generations[name] -= 1
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
            except QueueFull as e:
                yield f"data: {json.dumps({'error': f'{e}; retry shortly'})}\n\n"
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
        except QueueFull as e:
            raise HTTPException(503, f"{e}; retry shortly", headers=BUSY) from None
        finally:
            gone.cancel()
            finished()
        return summary()


@router.post("/{name}/sessions", response_model=SessionCreated)
async def create_session(name: str, request: Request) -> dict:
    """Start a sequence session at the model's zero state."""
    language_model(request, name)
    sessions = request.app.state.sessions[name]
    session = sessions.create()
    if session is None:
        raise HTTPException(503, f"{sessions.max_sessions} sessions are live; retry shortly", headers=BUSY)
    metrics.LIVE_SESSIONS.labels(name).set(len(sessions.live))
    return {"session_id": session.id, "idle_expiry_s": sessions.idle_s}


def live_session(request: Request, name: str, sid: str) -> Session:
    language_model(request, name)
    session = request.app.state.sessions[name].get(sid)
    if session is None:
        raise HTTPException(404, f"no session {sid!r} for model {name!r} (ended or expired)")
    return session


@router.post("/{name}/sessions/{sid}:step", response_model=StepResponse)
async def step_session(name: str, sid: str, body: StepRequest, request: Request) -> dict:
    """Advance the session's state over more text; answers the next-token distribution's top k."""
    model = served(request, name)
    session = live_session(request, name, sid)
    ids = model.vocab.encode(model.tokenizer(body.text))
    with measured(name, "session_step"):
        async with session.lock:  # one step at a time per session, in order
            try:
                (session.logits, session.state), = await request.app.state.steppers[name].submit([Step(ids, session.state)])
            except QueueFull as e:
                raise HTTPException(503, f"{e}; retry shortly", headers=BUSY) from None
            session.tokens += len(ids)
        return {"session_id": sid, "tokens": len(ids), "total_tokens": session.tokens,
                "unknown_tokens": sum(i == 1 for i in ids), "next": top_k(model, session.logits, body.top_k)}


@router.delete("/{name}/sessions/{sid}")
async def end_session(name: str, sid: str, request: Request) -> dict:
    """End a session and free its state."""
    live_session(request, name, sid)
    request.app.state.sessions[name].delete(sid)
    metrics.LIVE_SESSIONS.labels(name).set(len(request.app.state.sessions[name].live))
    return {"session_id": sid, "ended": True}
