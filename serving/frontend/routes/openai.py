"""OpenAI's API for the language models, at /openai/v1 (KServe's Hugging Face runtime prefixes it so,
apart from KServe V1's /v1/models): GET /openai/v1/models[/{model}], POST .../completions and
.../chat/completions, answered as OpenAI answers them, streamed as server-sent events ending with
data: [DONE]. Each choice is one generation of the core (serving/frontend/core/generation.py),
the same as :generate's for the same fields: engine, deadlines, cancellation when the client
leaves, metrics (under the openai_* endpoints) and tracing. A chat's messages become one prompt by
the model's chat template (core/repository.py's ChatTemplate, in its config.json). A refusal is
OpenAI's error shape (serving/frontend/responses.py).
"""
import asyncio
import datetime
import functools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import Request
from pydantic import ValidationError

from core.repository import ChatTemplate, Version, read_config
from serving.common.logs import REQUEST_ID
from serving.frontend.core.front import Front, served
from serving.frontend.core.generation import Deltas, Generation, started, to_the_end
from serving.frontend.core.metadata import served_names
from serving.frontend.core.refused import Refused, invalid
from serving.frontend.openai_schemas import MAX_CHOICES, ChatRequest, CompletionRequest, Sampling
from serving.frontend.responses import json_encode, json_response, left, openai_error
from serving.frontend.routes import lm
from serving.frontend.schemas import GenerateRequest

DONE = b"data: [DONE]\n\n"
NOT_YET = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_tokens": 0}


async def list_models(request: Request) -> dict:
    """The language models served (classifiers are not: they do not complete text)."""
    front = request.app.state.front
    return {"object": "list", "data": [card(version) for name in served_names(front)
                                       if (version := served(front, name)[1]).manifest.task == "lm"]}


async def model_card(model: str, request: Request) -> dict:
    """One language model."""
    return card(language_model(request.app.state.front, model))


def card(version: Version) -> dict:
    created = datetime.datetime.fromisoformat(version.manifest.exported_at).timestamp()
    return {"id": version.name, "object": "model", "created": int(created), "owned_by": "rnnserve"}


def language_model(front: Front, name: str) -> Version:
    """The version serving `name`; a refusal names the model as its param (404: model_not_found)."""
    try:
        return served(front, name, task="lm")[1]
    except Refused as e:
        e.param = "model" if e.status in (400, 404) else e.param
        raise


@functools.lru_cache(maxsize=256)
def chat_template(repository: Path, name: str, version: int) -> ChatTemplate:
    """The model's chat template, read once for each version served (the engine checked its
    config.json when it loaded that version)."""
    return read_config(repository / name).chat_template


async def completions(body: CompletionRequest, request: Request):
    """Complete a prompt (or each of a list of prompts) n times: OpenAI's completions."""
    front = request.app.state.front
    language_model(front, body.model)
    if isinstance(body.prompt, str):
        prompts = [body.prompt]
    elif all(isinstance(p, str) for p in body.prompt):
        prompts = body.prompt
    else:
        raise Refused(400, "token-id prompts are not served: send the prompt as text", param="prompt")
    if not prompts:
        raise Refused(400, "prompt is an empty list", param="prompt")
    not_served(body, logprobs=body.logprobs is not None)
    if body.suffix is not None:
        raise Refused(400, "suffix is not served: a language model here only continues a text", param="suffix")
    if body.best_of not in (None, 1, body.n):
        raise Refused(400, "best_of is not served: each choice is its own generation (use n)", param="best_of")
    asked = [choice(front, body, prompt, i, stops(body.stop)) for prompt in prompts for i in range(body.n or 1)]
    echoed = [(p if body.echo else "") for p in prompts for _ in range(body.n or 1)]
    runs = await started_all(front, body.model, asked)
    head = {"id": f"cmpl-{REQUEST_ID.get()}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    generations = [g for g, _, _ in runs]
    if not body.stream:
        await to_the_end(merged(runs), cancel_all(runs), left(request))
        return json_response(head | {"choices": [
            {"index": i, "text": echo + g.text, "logprobs": None, "finish_reason": g.finish_reason}
            for i, (g, echo) in enumerate(zip(generations, echoed))], "usage": usage(generations, body.n)})

    chunks = [Chunk(head, i, "text", b'"logprobs":null,') for i in range(len(runs))]
    opening = b"".join(chunk.part(echo) for chunk, echo in zip(chunks, echoed) if echo)
    return stream(request, body, runs, chunks, opening, "openai_completions_stream")


async def chat_completions(body: ChatRequest, request: Request):
    """Answer a chat, its messages joined into one prompt by the model's chat template: OpenAI's
    chat completions."""
    front = request.app.state.front
    version = language_model(front, body.model)
    not_served(body, logprobs=bool(body.logprobs) or body.top_logprobs is not None)
    if body.tools:
        raise Refused(400, "tools are not served: a language model here only continues a text", param="tools")
    template = chat_template(front.settings.repository, body.model, version.number)
    prompt = template.prompt([(m.role, m.content if isinstance(m.content, str) else
                               "".join(part.text for part in m.content or ())) for m in body.messages])
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    asked = [choice(front, body, prompt, i, stops(body.stop) + template.stop) for i in range(body.n or 1)]
    runs = await started_all(front, body.model, asked)
    head = {"id": f"chatcmpl-{REQUEST_ID.get()}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model}
    generations = [g for g, _, _ in runs]
    if not body.stream:
        await to_the_end(merged(runs), cancel_all(runs), left(request))
        return json_response(head | {"choices": [
            {"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
             "finish_reason": g.finish_reason} for i, g in enumerate(generations)],
            "usage": usage(generations, len(generations))})

    head["object"] = "chat.completion.chunk"
    chunks = [Chunk(head, i, "delta", b'"logprobs":null,') for i in range(len(runs))]
    opening = b"".join(chunk.event({"role": "assistant", "content": ""}) for chunk in chunks)
    return stream(request, body, runs, chunks, opening, "openai_chat_stream")


def not_served(body: Sampling, logprobs: bool):
    """A 400 for the fields that ask for what the engine does not do yet, never silently ignored."""
    for field, default in NOT_YET.items():
        if getattr(body, field) not in (None, default):
            raise Refused(400, f"{field} is not served yet", param=field)
    if logprobs:
        raise Refused(400, "logprobs are not served yet", param="logprobs")
    if body.logit_bias:
        raise Refused(400, "logit_bias is not served", param="logit_bias")


def stops(stop: str | list[str] | None) -> list[str]:
    """OpenAI's stop: a string or up to 4 of them; the empty ones stop nothing."""
    stop = [stop] if isinstance(stop, str) else stop or []
    if len(stop) > 4:
        raise Refused(400, f"stop has {len(stop)} strings; at most 4", param="stop")
    return [s for s in stop if s]


def choice(front: Front, body: Sampling, prompt: str, index: int, stop: list[str]) -> GenerateRequest:
    """One choice's generation as :generate's body: choice `index` of n samples with seed + index."""
    limit = front.settings.max_new_tokens
    if body.max_tokens is not None and body.max_tokens > limit:
        raise Refused(400, f"max_tokens is at most {limit}", param="max_tokens")
    if body.max_tokens == 0:
        raise Refused(400, "max_tokens 0 scores a prompt (echo with logprobs), which is not served yet",
                      param="max_tokens")
    if not prompt:
        raise Refused(400, "the prompt is empty: the model needs a first token", param="prompt")
    try:
        return GenerateRequest(prompt=prompt, max_new_tokens=limit if body.max_tokens is None else body.max_tokens,
                               temperature=1.0 if body.temperature is None else body.temperature,
                               top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
                               seed=None if body.seed is None else body.seed + index, stop=stop)
    except ValidationError as e:
        raise invalid(e, where=()) from None


Run = tuple[Generation, AsyncIterator[list[str]], Callable[[], None]]


async def started_all(front: Front, name: str, asked: list[GenerateRequest]) -> list[Run]:
    """Every choice's generation under way (the core's started()); if one is refused, or the
    client leaves meanwhile, those already started are cancelled."""
    if len(asked) > MAX_CHOICES:
        raise Refused(400, f"{len(asked)} choices (prompts x n); at most {MAX_CHOICES}", param="n")
    if len(asked) == 1:
        return [await started(front, name, asked[0], length_name="max_tokens")]
    tasks = [asyncio.ensure_future(started(front, name, one, length_name="max_tokens")) for one in asked]
    try:
        await asyncio.wait(tasks)
    finally:  # cancelled: stop every start and cancel what started
        for task in tasks:
            task.cancel()
        ran = [task.result() for task in tasks if task.done() and not task.cancelled() and not task.exception()]
        if len(ran) < len(tasks):
            for _, _, cancel in ran:
                cancel()
    for task in tasks:
        task.result()  # the first refusal is the request's
    return ran


async def merged(runs: list[Run]) -> AsyncIterator[tuple[int, list[str]]]:
    """Every choice's pieces of text as they arrive, (its index, the pieces), until every choice
    has ended; one choice is read directly, several through a queue."""
    if len(runs) == 1:
        async for pieces in runs[0][1]:
            yield 0, pieces
        return
    queue = asyncio.Queue()

    async def read(index: int, pieces: AsyncIterator[list[str]]):
        try:
            async for new in pieces:
                queue.put_nowait((index, new))
            queue.put_nowait((index, None))
        except Exception as e:
            queue.put_nowait((index, e))

    readers = [asyncio.ensure_future(read(i, pieces)) for i, (_, pieces, _) in enumerate(runs)]
    try:
        ended = 0
        while ended < len(runs):
            index, new = await queue.get()
            if isinstance(new, Exception):
                raise new
            if new is None:
                ended += 1
            else:
                yield index, new
    finally:
        for reader in readers:
            reader.cancel()


def cancel_all(runs: list[Run]) -> Callable[[], None]:
    def cancel():
        for _, _, each in runs:
            each()
    return cancel


def usage(generations: list[Generation], n: int | None) -> dict:
    """Tokens read (each prompt once, whatever n) and generated (every choice's)."""
    prompt = sum(len(g.prompt_ids) for g in generations[:: n or 1])
    completion = sum(g.tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Chunk:
    """One choice's stream chunks, their JSON written around the text: the part that never
    changes is encoded once per stream."""

    def __init__(self, head: dict, index: int, field: str, logprobs: bytes):
        self.head, self.index, self.field = head, index, field
        opening = json_encode(head)[:-1] + b',"choices":[{"index":%d,%s' % (index, logprobs)
        self.before, self.after = b"data: " + opening + b'"%s":' % field.encode(), b',"finish_reason":null}]}\n\n'

    def event(self, delta) -> bytes:
        return self.before + json_encode(delta) + self.after

    def part(self, text: str) -> bytes:
        """A chunk of text (completions: the text; chat: a delta of content)."""
        return self.event(text if self.field == "text" else {"content": text})

    def last(self, text: str, finish_reason: str) -> bytes:
        choice = {"index": self.index, self.field: text if self.field == "text" else ({"content": text} if text else {}),
                  "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + json_encode(self.head | {"choices": [choice]}) + b"\n\n"


def stream(request: Request, body: Sampling, runs: list[Run], chunks: list[Chunk], opening: bytes, endpoint: str):
    """Server-sent chunks: `opening`, then each choice's text as it arrives (less what a stop
    string may yet take back); once every choice has ended, in one write, each one's last chunk
    (the rest of its text and its finish_reason), with stream_options.include_usage a chunk of
    the usage and no choices, and [DONE]."""
    deltas = [Deltas(g) for g, _, _ in runs]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    opened = [opening]

    def events_of(item: tuple[int, list[str]]) -> bytes:
        index, _ = item
        first = opened.pop() if opened else b""
        return first + chunks[index].part(part) if (part := deltas[index].next()) else first

    def last() -> bytes:
        ends = (opened.pop() if opened else b"") + b"".join(
            chunk.last(d.next(True), g.finish_reason) for chunk, d, (g, _, _) in zip(chunks, deltas, runs))
        if include_usage:
            totals = usage([g for g, _, _ in runs], body.n if isinstance(body, CompletionRequest) else len(runs))
            ends += b"data: " + json_encode(chunks[0].head | {"choices": [], "usage": totals}) + b"\n\n"
        return ends + DONE

    return lm.event_stream(request, body.model, merged(runs), cancel_all(runs), events_of, last, endpoint,
                           lambda e: lm.sse(openai_error(e)) + DONE)
