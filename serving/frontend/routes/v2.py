"""Open Inference Protocol (KServe V2) REST: health, server and model metadata, readiness, infer,
and Triton's model configuration and statistics extensions.

V2 infer takes tensors input_ids (INT64 [-1, -1], right-padded) and lengths (INT64 [-1]) and
answers logits (FP32); a classifier also takes text_input (BYTES [-1]) and answers probabilities
(FP32) and label (BYTES) beside them; as JSON or with the binary tensor extension
(serving/frontend/core/tensors.py). Its rows go to the engine with everyone else's.
"""
from fastapi import Request
from fastapi.responses import Response

from serving.frontend.core import front as fronts, inference, metadata, statistics, tensors
from serving.frontend.core.front import SERVER
from serving.frontend.core.refused import Refused, busy
from serving.frontend.responses import json_encode, left
from serving.frontend.schemas import InferRequest


async def live() -> dict:
    """The process is up."""
    return {"live": True}


async def ready(request: Request) -> dict:
    """Every engine has loaded and warmed up its models and serves at least one (503 until then,
    and while draining)."""
    if not fronts.ready(request.app.state.front):
        raise busy("not ready")
    return {"ready": True}


async def server_metadata() -> dict:
    """Server name, version and protocol extensions."""
    return SERVER


async def model_metadata(name: str, request: Request) -> dict:
    """A model's versions, platform, tensors, and where it runs."""
    return metadata.v2_metadata(request.app.state.front, name)


async def model_version_metadata(name: str, version: str, request: Request) -> dict:
    """A model version's platform and tensors (404 unless it is the version serving)."""
    return metadata.v2_metadata(request.app.state.front, name, version)


async def model_config(name: str, request: Request) -> dict:
    """A model's configuration as Triton gives it: batching, tensors without the batch dimension,
    instances, and whether its responses are decoupled."""
    return metadata.model_config(request.app.state.front, name)


async def model_version_config(name: str, version: str, request: Request) -> dict:
    """A model version's configuration (404 unless it is the version serving)."""
    return metadata.model_config(request.app.state.front, name, version)


async def all_stats(request: Request) -> dict:
    """Every served model version's statistics, as Triton counts them."""
    return await statistics.statistics(request.app.state.front)


async def model_stats(name: str, request: Request) -> dict:
    """A model's statistics: requests, executions, and time queued and computing, per batch size too."""
    return await statistics.statistics(request.app.state.front, name)


async def model_version_stats(name: str, version: str, request: Request) -> dict:
    """A model version's statistics (404 unless it is the version serving)."""
    return await statistics.statistics(request.app.state.front, name, version)


async def model_ready(name: str, request: Request) -> dict:
    """200 when the model is loaded and ready; 400 saying why not (Triton's answer) otherwise."""
    return is_ready(request, name)


async def model_version_ready(name: str, version: str, request: Request) -> dict:
    """200 when this version is the one loaded and ready; 400 saying why not otherwise."""
    return is_ready(request, name, version)


def is_ready(request: Request, name: str, version: str | None = None) -> dict:
    if why := fronts.unready(request.app.state.front, name, version):
        raise Refused(400, f"not ready: {why}")
    return {"name": name, "ready": True}


async def model_infer(name: str, body: InferRequest, request: Request):
    """Logits for right-padded token ids or a classifier's texts, batched with other requests."""
    return await infer(request, name, body)


async def model_version_infer(name: str, version: str, body: InferRequest, request: Request):
    """Logits from this version (404 unless it is the version serving)."""
    return await infer(request, name, body, version)


async def infer(request: Request, name: str, body: InferRequest, version: str | None = None):
    fronts.stateless((body.parameters or {}).get("sequence_id"))
    binary = request.scope.get("rnnserve.binary", b"")  # the body after its JSON header, as the front door split it
    served_version, outputs = await inference.infer_tensors(
        request.app.state.front, name, tensors.inputs_of(body.inputs, binary), [o.name for o in body.outputs or []],
        version, left=left(request))
    header = {"model_name": name, "model_version": str(served_version.number)}
    return answer(header if body.id is None else header | {"id": body.id}, outputs,
                  tensors.wants_binary(body, [o.name for o in outputs]))


def answer(header: dict, outputs: list[tensors.Output], binary: list[bool]) -> Response:
    """A V2 REST answer: each output's JSON data, or its raw bytes after the JSON header (in the
    order the header lists them)."""
    described, raws = [], []
    for output, raw in zip(outputs, binary):
        tensor = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if raw:
            raws.append(output.raw())
            described.append(tensor | {"parameters": {"binary_data_size": len(raws[-1])}})
        else:
            described.append(tensor | {"data": output.data()})
    head = json_encode(header | {"outputs": described})
    if not raws:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(raws), media_type="application/octet-stream",
                    headers={tensors.HEADER_LENGTH: str(len(head))})
