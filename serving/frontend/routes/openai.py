"""OpenAI's API for the language models, at /openai/v1 (KServe's Hugging Face runtime prefixes it so,
apart from KServe V1's /v1/models): GET /openai/v1/models[/{model}], POST .../completions and
.../chat/completions, answered as OpenAI answers them, streamed as server-sent events ending with
data: [DONE]. Each choice is one generation of the core (serving/frontend/core/generation.py),
the same as :generate's for the same fields: engine, deadlines, cancellation when the client
leaves, metrics (under the openai_* endpoints) and tracing; serving/frontend/routes/openai_choices.py
starts, reads and writes them. A chat's messages become one prompt by the model's chat template
(core/repository.py's ChatTemplate, in its config.json). A refusal is OpenAI's error shape
(serving/frontend/responses.py). Scoring: echo with max_tokens 0 and logprobs answers each prompt
token's log-probability (a text's perplexity).
"""
import datetime
import functools
import time
from pathlib import Path

from fastapi import Request
from pydantic import ValidationError

from core.repository import ChatTemplate, Version, read_config
from serving.common.logs import REQUEST_ID
from serving.frontend.core.front import Front, served
from serving.frontend.core.generation import to_the_end
from serving.frontend.core.metadata import served_names
from serving.frontend.core.refused import Refused, invalid
from serving.frontend.openai_schemas import ChatRequest, CompletionRequest, Sampling
from serving.frontend.responses import json_response, left
from serving.frontend.routes.openai_choices import (Chunk, Legacy, cancel_all, chat_logprobs, merged, prompt_entries,
                                                    started_all, stream, usage)
from serving.frontend.schemas import GenerateRequest


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
    """Complete a prompt (or each of a list of prompts) n times: OpenAI's completions; with echo,
    max_tokens 0 and logprobs, score the prompt."""
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
    if body.suffix is not None:
        raise Refused(400, "suffix is not served: a language model here only continues a text", param="suffix")
    if body.best_of not in (None, 1, body.n):
        raise Refused(400, "best_of is not served: each choice is its own generation (use n)", param="best_of")
    if body.max_tokens == 0 and not (body.echo and body.logprobs is not None):
        raise Refused(400, "max_tokens 0 only scores a prompt: with echo and logprobs", param="max_tokens")
    n, scored = body.n or 1, bool(body.echo and body.logprobs is not None)
    asked = [choice(front, body, prompt, i, stops(body.stop), body.logprobs, scored) for prompt in prompts
             for i in range(n)]
    echoed = [(p if body.echo else "") for p in prompts for _ in range(n)]
    runs = await started_all(front, body.model, asked)
    head = {"id": f"cmpl-{REQUEST_ID.get()}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    generations = [g for g, _, _ in runs]
    if not body.stream:
        await to_the_end(merged(runs), cancel_all(runs), left(request))
        return json_response(head | {"choices": [
            {"index": i, "text": echo + g.text, "finish_reason": g.finish_reason,
             "logprobs": None if body.logprobs is None else Legacy()((prompt_entries(g) if scored else []) + g.logprobs)}
            for i, (g, echo) in enumerate(zip(generations, echoed))], "usage": usage(generations, n)})

    chunks = [Chunk(head, i, "text") for i in range(len(runs))]
    shapes = None if body.logprobs is None else [Legacy() for _ in runs]
    opening = b"".join(chunk.part(echo, shapes[i](prompt_entries(generations[i])) if scored else None)
                       for i, (chunk, echo) in enumerate(zip(chunks, echoed)) if echo)
    return stream(request, body.model, runs, chunks, opening, n, include_usage(body), shapes,
                  "openai_completions_stream")


async def chat_completions(body: ChatRequest, request: Request):
    """Answer a chat, its messages joined into one prompt by the model's chat template: OpenAI's
    chat completions."""
    front = request.app.state.front
    version = language_model(front, body.model)
    if body.tools:
        raise Refused(400, "tools are not served: a language model here only continues a text", param="tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise Refused(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    template = chat_template(front.settings.repository, body.model, version.number)
    prompt = template.prompt([(m.role, m.content if isinstance(m.content, str) else
                               "".join(part.text for part in m.content or ())) for m in body.messages])
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    if body.max_tokens == 0:
        raise Refused(400, "max_tokens is at least 1", param="max_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    asked = [choice(front, body, prompt, i, stops(body.stop) + template.stop, logprobs) for i in range(body.n or 1)]
    runs = await started_all(front, body.model, asked)
    head = {"id": f"chatcmpl-{REQUEST_ID.get()}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model}
    generations = [g for g, _, _ in runs]
    if not body.stream:
        await to_the_end(merged(runs), cancel_all(runs), left(request))
        return json_response(head | {"choices": [
            {"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason,
             "logprobs": None if logprobs is None else chat_logprobs(g.logprobs)} for i, g in enumerate(generations)],
            "usage": usage(generations, len(generations))})

    head["object"] = "chat.completion.chunk"
    chunks = [Chunk(head, i, "delta") for i in range(len(runs))]
    opening = b"".join(chunk.event({"role": "assistant", "content": ""}) for chunk in chunks)
    return stream(request, body.model, runs, chunks, opening, len(runs), include_usage(body),
                  None if logprobs is None else [chat_logprobs] * len(runs), "openai_chat_stream")


def include_usage(body: Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def stops(stop: str | list[str] | None) -> list[str]:
    """OpenAI's stop: a string or up to 4 of them; the empty ones stop nothing."""
    stop = [stop] if isinstance(stop, str) else stop or []
    if len(stop) > 4:
        raise Refused(400, f"stop has {len(stop)} strings; at most 4", param="stop")
    return [s for s in stop if s]


def choice(front: Front, body: Sampling, prompt: str, index: int, stop: list[str], logprobs: int | None,
           scored: bool = False) -> GenerateRequest:
    """One choice's generation as :generate's body: choice `index` of n samples with seed + index;
    scored: with the prompt's log-probabilities."""
    limit = front.settings.max_new_tokens
    max_tokens = limit if body.max_tokens is None else body.max_tokens
    if max_tokens > limit:
        raise Refused(400, f"max_tokens is at most {limit}", param="max_tokens")
    if (body.min_tokens or 0) > max_tokens:
        raise Refused(400, f"min_tokens ({body.min_tokens}) is at most max_tokens ({max_tokens})", param="min_tokens")
    if not prompt:
        raise Refused(400, "the prompt is empty: the model needs a first token", param="prompt")
    if body.logit_bias:
        raise Refused(400, "logit_bias is not served", param="logit_bias")
    try:
        return GenerateRequest(
            prompt=prompt, max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
            seed=None if body.seed is None else body.seed + index, stop=stop,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            min_tokens=body.min_tokens or 0, logprobs=logprobs, prompt_logprobs=scored)
    except ValidationError as e:
        raise invalid(e, where=()) from None
