"""Triton's decoupled streaming over gRPC (ModelStreamInfer), as tritonclient.grpc's start_stream /
async_stream_infer speak it: on one stream, each request's responses as they come, in any order
between requests (each names its request's id).

A language model's request carries Triton's LLM inputs: text_input (BYTES), stream and
exclude_input_in_output (BOOL), sampling_parameters (BYTES, a JSON object: max_tokens,
temperature, top_k, top_p, seed, stop); the sampling parameters may also come as the request's
parameters (and presence_penalty, frequency_penalty, repetition_penalty, min_tokens, logprobs,
prompt_logprobs: :generate's). It answers text_output (BYTES), and where asked logprobs and
prompt_logprobs (BYTES, JSON as :generate's answer has them: of the tokens since the response
before; the prompt's in the first response): with stream true, one response per part of the text
as it arrives; else one response, the prompt and the text (without the prompt if
exclude_input_in_output). It is the generation of :generate and of the REST generate extension
(serving/frontend/core/generation.py), checked by the same schema. Any other model's request is a
ModelInfer: one response. A request with a sequence_id steps that sequence of a language model
(sequence.py): one response; a stream runs its requests of one sequence in the order they
came, the others beside them. The last response of a request has the parameter
triton_final_response true; with triton_enable_empty_final_response (enable_empty_final_response=True)
it is an empty one. A request's error is a response with error_message, and the stream goes on;
closing the stream cancels what it was still generating.
"""
import asyncio
import json

from pydantic import ValidationError
from tritonclient.grpc import service_pb2 as pb

from serving.frontend.core.envelope import Outcome, counted
from serving.frontend.core.front import Front
from serving.frontend.core.generation import Deltas, started_triton, to_the_end, whole
from serving.frontend.core.refused import Refused, invalid, unexpected
from serving.frontend.grpc import inputs, sequence, status
from serving.frontend.schemas import TritonGenerateRequest


def generation_request(request: pb.ModelInferRequest) -> TritonGenerateRequest:
    """A stream request's inputs and parameters as the REST generate extension's body."""
    values = inputs.inputs(request)
    parameters = inputs.sampling(request, values)
    flags = {"stream": bool(values.pop("stream", None))}  # one response unless asked, as Triton's LLM backends
    if (exclude := values.pop("exclude_input_in_output", None)) is not None:
        flags["exclude_input_in_output"] = exclude
    try:
        return TritonGenerateRequest.model_validate(values | {"parameters": parameters | flags})
    except ValidationError as e:
        raise invalid(e, ()) from None


def text_response(request: pb.ModelInferRequest, version: int, text: str | None, final: bool,
                  scores: dict | None = None) -> pb.ModelStreamInferResponse:
    """One response of a generation: its text_output (none: the empty final response) and the
    log-probabilities it carries (each a BYTES output of one JSON element)."""
    final_flag = {"triton_final_response": pb.InferParameter(bool_param=final)}
    if text is None:
        return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(version), id=request.id, parameters=final_flag))
    outputs = {"text_output": text} | {name: json.dumps(value) for name, value in (scores or {}).items()}
    return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
        model_name=request.model_name, model_version=str(version), id=request.id, parameters=final_flag,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=name, datatype="BYTES", shape=[1]) for name in outputs],
        raw_output_contents=[inputs.strings([value]) for value in outputs.values()]))


async def generation(front: Front, request: pb.ModelInferRequest, send):
    """A language model's request: its responses through send(response) as the text arrives."""
    body = generation_request(request)
    empty_final = request.parameters["triton_enable_empty_final_response"].bool_param \
        if "triton_enable_empty_final_response" in request.parameters else False
    generation_, pieces, cancel = await started_triton(front, request.model_name, body, request.model_version or None)
    version = generation_.version
    if body.parameters.stream:
        try:
            deltas = Deltas(generation_)
            async for _ in pieces:
                part, scores = deltas.next(), deltas.scores()
                if part or scores:
                    send(text_response(request, version, part, False, scores))
            last, scores = deltas.next(final=True), deltas.scores()
        finally:
            cancel()
    else:
        await to_the_end(pieces, cancel)
        last, scores = whole(body, generation_), generation_.scores()
    if empty_final:
        if last or scores:
            send(text_response(request, version, last, False, scores))
        send(text_response(request, version, None, True))
    else:
        send(text_response(request, version, last, True, scores))


async def answer(front: Front, request: pb.ModelInferRequest, infer, send, request_id: str,
                 after: asyncio.Task | None = None):
    """One request of the stream, answered through send(response): a sequence's step by
    sequence.step (once `after`, the stream's request before it in that sequence, is answered), a
    language model's by generation(), any other's by infer(request) (ModelInfer's answer); a
    refusal as error_message. Counted in /metrics as ModelInfer is, with the status its code
    stands for (499 when the stream closed before it was answered)."""
    name = request.model_name
    llm = any(t.name == "text_input" for t in request.inputs)
    sid = sequence.sequence_id(request)
    endpoint = "grpc_stream_sequence" if sid else "grpc_stream_generate" if llm else "grpc_stream_infer"
    if after:
        await asyncio.wait({after})
    with counted(front.engines, name, Outcome(request_id, endpoint)) as outcome:
        try:
            inputs.within(request, front.settings.max_body_bytes)
            if sid:
                await sequence.step(front, request, sid, send)
            elif sequence.flag(request, "sequence_start") or sequence.flag(request, "sequence_end"):
                raise Refused(400, "sequence_start and sequence_end need a sequence_id")
            elif llm:
                await generation(front, request, send)
            else:
                response = await infer(request)
                response.parameters["triton_final_response"].bool_param = True
                send(pb.ModelStreamInferResponse(infer_response=response))
            outcome.status = 200
        except asyncio.CancelledError:
            outcome.status = status.counted(499)
            raise
        except Exception as e:
            refused = e if isinstance(e, Refused) else unexpected(e)
            outcome.status = status.counted(refused.status)
            send(pb.ModelStreamInferResponse(error_message=refused.message,
                                             infer_response=pb.ModelInferResponse(model_name=name, id=request.id)))


async def serve(front: Front, requests, infer, request_id: str):
    """The responses of a stream: each request answered as it comes, beside the others; when the
    client closes the stream (or the server stops), what is still running is cancelled."""
    out: asyncio.Queue = asyncio.Queue()
    running: set[asyncio.Task] = set()
    last: dict[tuple[str, str], asyncio.Task] = {}  # (model, sequence_id) -> its latest request

    async def read():
        async for request in requests:
            key = (request.model_name, sequence.sequence_id(request))
            after = last.get(key) if key[1] else None
            task = asyncio.create_task(answer(front, request, infer, out.put_nowait, request_id, after))
            running.add(task)
            task.add_done_callback(running.discard)
            if key[1]:
                last[key] = task
                task.add_done_callback(lambda done, key=key: last.pop(key) if last.get(key) is done else None)
        if running:
            await asyncio.wait(set(running))
        out.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (response := await out.get()) is not None:
            yield response
        await reader  # a failure to read the stream is the stream's
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
