"""Triton's decoupled streaming over gRPC (ModelStreamInfer), as tritonclient.grpc's start_stream /
async_stream_infer speak it: on one stream, each request's responses as they come, in any order
between requests (each names its request's id).

A language model's request carries Triton's LLM inputs: text_input (BYTES), stream and
exclude_input_in_output (BOOL), sampling_parameters (BYTES, a JSON object: max_tokens,
temperature, top_k, top_p, seed, stop); the sampling parameters may also come as the request's
parameters. It answers text_output (BYTES): with stream true, one response per part of the text
as it arrives; else one response, the prompt and the text (without the prompt if
exclude_input_in_output). It is the generation of :generate and of the REST generate extension
(serving/frontend/routes/lm.py), checked by the same schema. Any other model's request is a
ModelInfer: one response. A request with a sequence_id steps that sequence of a language model
(grpc_sequence.py): one response; a stream runs its requests of one sequence in the order they
came, the others beside them. The last response of a request has the parameter
triton_final_response true; with triton_enable_empty_final_response (enable_empty_final_response=True)
it is an empty one. A request's error is a response with error_message, and the stream goes on;
closing the stream cancels what it was still generating.
"""
import asyncio

from fastapi import HTTPException
from pydantic import ValidationError
from starlette.datastructures import State
from tritonclient.grpc import service_pb2 as pb

from serving.frontend import grpc_sequence, service, triton_inputs
from serving.frontend.responses import problems
from serving.frontend.routes import lm, v2_generate
from serving.frontend.schemas import TritonGenerateRequest


def generation_request(request: pb.ModelInferRequest) -> TritonGenerateRequest:
    """A stream request's inputs and parameters as the REST generate extension's body."""
    values = triton_inputs.inputs(request)
    parameters = triton_inputs.sampling(request, values)
    flags = {"stream": bool(values.pop("stream", None))}  # one response unless asked, as Triton's LLM backends
    if (exclude := values.pop("exclude_input_in_output", None)) is not None:
        flags["exclude_input_in_output"] = exclude
    try:
        return TritonGenerateRequest.model_validate(values | {"parameters": parameters | flags})
    except ValidationError as e:
        raise HTTPException(400, f"invalid request: {problems(e, ())}") from None


def text_response(request: pb.ModelInferRequest, version: int, text: str | None, final: bool) -> pb.ModelStreamInferResponse:
    """One response of a generation: its text_output (none: the empty final response)."""
    final_flag = {"triton_final_response": pb.InferParameter(bool_param=final)}
    if text is None:
        return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(version), id=request.id, parameters=final_flag))
    return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
        model_name=request.model_name, model_version=str(version), id=request.id, parameters=final_flag,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1])],
        raw_output_contents=[triton_inputs.strings([text])]))


async def generation(state: State, request: pb.ModelInferRequest, send):
    """A language model's request: its responses through send(response) as the text arrives."""
    body = generation_request(request)
    empty_final = request.parameters["triton_enable_empty_final_response"].bool_param \
        if "triton_enable_empty_final_response" in request.parameters else False
    generation_, pieces, cancel = await lm.started(state, request.model_name, v2_generate.asked(body),
                                                   request.model_version or None)
    version = generation_.version
    try:
        if body.parameters.stream:
            deltas = lm.Deltas(generation_)
            async for _ in pieces:
                if part := deltas.next():
                    send(text_response(request, version, part, False))
            last = deltas.next(final=True)
        else:
            async for _ in pieces:
                pass
            last = v2_generate.whole(body, generation_)
    except lm.GenerationFailed as e:
        raise HTTPException(500 if "deadline" not in str(e) else 504, str(e)) from None
    finally:
        cancel()
    if empty_final:
        if last:
            send(text_response(request, version, last, False))
        send(text_response(request, version, None, True))
    else:
        send(text_response(request, version, last, True))


async def answer(state: State, request: pb.ModelInferRequest, infer, send, after: asyncio.Task | None = None):
    """One request of the stream, answered through send(response): a sequence's step by
    grpc_sequence (once `after`, the stream's request before it in that sequence, is answered), a
    language model's by generation(), any other's by infer(request) (ModelInfer's answer); a
    refusal as error_message."""
    name = request.model_name
    client = getattr(state, "engines", None)
    llm = any(t.name == "text_input" for t in request.inputs)
    sequence = grpc_sequence.sequence_id(request)
    endpoint = "grpc_stream_sequence" if sequence else "grpc_stream_generate" if llm else "grpc_stream_infer"
    if after:
        await asyncio.wait({after})
    with service.counted(client, name, endpoint) as outcome:
        try:
            if sequence:
                await grpc_sequence.step(state, request, sequence, send)
            elif grpc_sequence.flag(request, "sequence_start") or grpc_sequence.flag(request, "sequence_end"):
                raise HTTPException(400, "sequence_start and sequence_end need a sequence_id")
            elif llm:
                await generation(state, request, send)
            else:
                response = await infer(request)
                response.parameters["triton_final_response"].bool_param = True
                send(pb.ModelStreamInferResponse(infer_response=response))
            outcome.status = 200
        except HTTPException as e:
            outcome.status = e.status_code
            send(pb.ModelStreamInferResponse(error_message=f"{e.detail}", infer_response=pb.ModelInferResponse(
                model_name=name, id=request.id)))
        except asyncio.CancelledError:
            outcome.status = 499
            raise
        except Exception as e:
            error = service.unexpected(e)
            outcome.status = error.status_code
            send(pb.ModelStreamInferResponse(error_message=f"{error.detail}", infer_response=pb.ModelInferResponse(
                model_name=name, id=request.id)))


async def serve(state: State, requests, infer):
    """The responses of a stream: each request answered as it comes, beside the others; when the
    client closes the stream (or the server stops), what is still running is cancelled."""
    out: asyncio.Queue = asyncio.Queue()
    running: set[asyncio.Task] = set()
    last: dict[tuple[str, str], asyncio.Task] = {}  # (model, sequence_id) -> its latest request

    async def read():
        async for request in requests:
            sequence = (request.model_name, grpc_sequence.sequence_id(request))
            after = last.get(sequence) if sequence[1] else None
            task = asyncio.create_task(answer(state, request, infer, out.put_nowait, after))
            running.add(task)
            task.add_done_callback(running.discard)
            if sequence[1]:
                last[sequence] = task
                task.add_done_callback(lambda done, key=sequence: last.pop(key) if last.get(key) is done else None)
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
