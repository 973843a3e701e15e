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
ModelInfer: one response. The last response of a request has the parameter triton_final_response
true; with triton_enable_empty_final_response (enable_empty_final_response=True) it is an empty one.
A request's error is a response with error_message, and the stream goes on; closing the stream
cancels what it was still generating.
"""
import asyncio
import json
import struct

from fastapi import HTTPException
from pydantic import ValidationError
from starlette.datastructures import State
from tritonclient.grpc import service_pb2 as pb

from serving.frontend import service
from serving.frontend.responses import problems
from serving.frontend.routes import lm, v2_generate
from serving.frontend.schemas import TritonGenerateRequest

LLM_INPUTS = {"text_input": "BYTES", "sampling_parameters": "BYTES", "stream": "BOOL", "exclude_input_in_output": "BOOL"}
NOT_SAMPLING = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                "triton_enable_empty_final_response"}  # request parameters that tritonclient sets itself


def element(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None):
    """The one element of a BYTES or BOOL input, from its raw bytes (BYTES: a 4-byte little-endian
    length, then the bytes) or its typed contents."""
    if LLM_INPUTS.get(t.name) != t.datatype:
        raise HTTPException(400, f"input {t.name}: a language model takes {sorted(LLM_INPUTS)}; "
                                 f"{t.name} must be {LLM_INPUTS.get(t.name, 'none of them')}")
    if [d for d in t.shape if d != 1]:
        raise HTTPException(400, f"input {t.name}: one element per request, not shape {list(t.shape)}")
    if t.datatype == "BOOL":
        if raw is None:
            return bool(t.contents.bool_contents[0]) if t.contents.bool_contents else None
        if len(raw) != 1:
            raise HTTPException(400, f"input {t.name}: one BOOL is 1 byte, not {len(raw)}")
        return raw != b"\0"
    if raw is None:
        value = t.contents.bytes_contents[0] if t.contents.bytes_contents else None
    elif len(raw) < 4 or len(raw) != 4 + struct.unpack_from("<I", raw)[0]:
        raise HTTPException(400, f"input {t.name}: one BYTES element is a 4-byte length and that many bytes")
    else:
        value = raw[4:]
    try:
        return None if value is None else value.decode()
    except UnicodeDecodeError:
        raise HTTPException(400, f"input {t.name} is not UTF-8 text") from None


def generation_request(request: pb.ModelInferRequest) -> TritonGenerateRequest:
    """A stream request's inputs and parameters as the REST generate extension's body."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise HTTPException(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    values = {t.name: element(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)}
    if "sequence_id" in request.parameters:
        raise HTTPException(400, "sequence_id: sequence sessions are served over REST (/v1/models/{name}/sessions), "
                                 "not yet over the stream")
    parameters = {name: getattr(p, p.WhichOneof("parameter_choice")) for name, p in request.parameters.items()
                  if name not in NOT_SAMPLING}
    try:
        sampling = json.loads(values.pop("sampling_parameters", None) or "{}")
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"sampling_parameters is not JSON: {e}") from None
    if not isinstance(sampling, dict):
        raise HTTPException(400, "sampling_parameters must be a JSON object")
    if twice := sorted(set(sampling) & set(parameters)):
        raise HTTPException(400, f"{twice} given both in sampling_parameters and as request parameters")
    flags = {"stream": bool(values.pop("stream", None))}  # one response unless asked, as Triton's LLM backends
    if (exclude := values.pop("exclude_input_in_output", None)) is not None:
        flags["exclude_input_in_output"] = exclude
    try:
        return TritonGenerateRequest.model_validate(values | {"parameters": sampling | parameters | flags})
    except ValidationError as e:
        raise HTTPException(400, f"invalid request: {problems(e, ())}") from None


def text_response(request: pb.ModelInferRequest, version: int, text: str | None, final: bool) -> pb.ModelStreamInferResponse:
    """One response of a generation: its text_output (none: the empty final response)."""
    final_flag = {"triton_final_response": pb.InferParameter(bool_param=final)}
    if text is None:
        return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(version), id=request.id, parameters=final_flag))
    data = text.encode()
    return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
        model_name=request.model_name, model_version=str(version), id=request.id, parameters=final_flag,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1])],
        raw_output_contents=[struct.pack("<I", len(data)) + data]))


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


async def answer(state: State, request: pb.ModelInferRequest, infer, send):
    """One request of the stream, answered through send(response): a language model's by
    generation(), any other's by infer(request) (ModelInfer's answer); a refusal as error_message."""
    name = request.model_name
    client = getattr(state, "engines", None)
    llm = any(t.name == "text_input" for t in request.inputs)
    with service.counted(client, name, "grpc_stream_generate" if llm else "grpc_stream_infer") as outcome:
        try:
            if llm:
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

    async def read():
        async for request in requests:
            task = asyncio.create_task(answer(state, request, infer, out.put_nowait))
            running.add(task)
            task.add_done_callback(running.discard)
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
