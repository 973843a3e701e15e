"""Triton's generate extension, for clients of Triton's LLM backends: POST
/v2/models/{name}[/versions/{version}]/generate answers {"model_name", "model_version",
"text_output"} (and, where asked, "logprobs" and "prompt_logprobs" as :generate's answer has
them); .../generate_stream answers the same objects as server-sent events, each with the text
that arrived since the one before (and the log-probabilities of the tokens since).
{"text_input", "parameters": {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
"stream", "exclude_input_in_output", "presence_penalty", "frequency_penalty",
"repetition_penalty", "min_tokens", "logprobs", "prompt_logprobs"}} in, as vLLM's backend takes
them. The same generation as :generate (serving/frontend/core/generation.py): engine, deadlines,
cancellation when the client leaves, metrics, and, for a seed, text. An error before the first
token is its HTTP status and {"error": ...}; after it, an event {"error": ...}, as Triton sends it.
"""
from fastapi import Request

from serving.frontend.core.generation import Deltas, started_triton, to_the_end, whole
from serving.frontend.core.refused import Refused
from serving.frontend.responses import json_response, left
from serving.frontend.routes import lm
from serving.frontend.schemas import TritonGenerateRequest


async def answer(request: Request, name: str, body: TritonGenerateRequest, version: str | None, streaming: bool):
    """One JSON answer, or server-sent events: the whole answer in one (stream false) or a part of
    the text in each."""
    p = body.parameters
    if p.stream and not streaming:
        raise Refused(400, f"stream: true answers server-sent events: POST /v2/models/{name}/generate_stream")
    generation, pieces, cancel = await started_triton(request.app.state.front, name, body, version)
    head = {"model_name": name, "model_version": str(generation.version)}
    if not streaming:
        await to_the_end(pieces, cancel, left(request))
        return json_response(head | {"text_output": whole(body, generation)} | generation.scores())
    if p.stream is False:
        return lm.event_stream(request, name, pieces, cancel, lambda new: b"",
                               lambda: lm.sse(head | {"text_output": whole(body, generation)} | generation.scores()),
                               "v2_generate_stream")
    deltas = Deltas(generation)

    def since(final: bool) -> bytes:
        part, scores = deltas.next(final), deltas.scores()
        return lm.sse(head | {"text_output": part} | scores) if part or scores else b""
    return lm.event_stream(request, name, pieces, cancel, lambda new: since(False), lambda: since(True),
                           "v2_generate_stream")


async def generate(name: str, body: TritonGenerateRequest, request: Request):
    """Generate text after text_input; one JSON answer (Triton's generate extension)."""
    return await answer(request, name, body, None, streaming=False)


async def generate_version(name: str, version: str, body: TritonGenerateRequest, request: Request):
    """Generate with this version of the model, which must be the one loaded."""
    return await answer(request, name, body, version, streaming=False)


async def generate_stream(name: str, body: TritonGenerateRequest, request: Request):
    """Generate text after text_input as server-sent events (Triton's generate extension)."""
    return await answer(request, name, body, None, streaming=True)


async def generate_stream_version(name: str, version: str, body: TritonGenerateRequest, request: Request):
    """Stream from this version of the model, which must be the one loaded."""
    return await answer(request, name, body, version, streaming=True)
