"""Open Inference Protocol (KServe V2) REST: health, server and model metadata, readiness, infer.

V2 infer takes tensors input_ids (INT64 [-1, -1], right-padded) and lengths (INT64 [-1]) and
answers logits (FP32), as JSON or with the binary tensor extension (serving/frontend/tensors.py).
Its rows go to the engine with everyone else's.
"""
from fastapi import HTTPException, Request

from serving.frontend import service, tensors
from serving.frontend.schemas import InferRequest


async def live() -> dict:
    """The process is up."""
    return {"live": True}


async def ready(request: Request) -> dict:
    """Every engine has loaded and warmed up its models and serves at least one (503 until then,
    and while draining)."""
    if not service.ready(request.app.state):
        raise HTTPException(503, "not ready", headers=service.BUSY)
    return {"ready": True}


async def server_metadata() -> dict:
    """Server name, version and protocol extensions."""
    return service.SERVER


async def model_metadata(name: str, request: Request) -> dict:
    """A model's versions, platform, tensors, and where it runs."""
    return service.v2_metadata(request.app.state, name)


async def model_version_metadata(name: str, version: str, request: Request) -> dict:
    """A model version's platform and tensors (404 unless it is the version serving)."""
    return service.v2_metadata(request.app.state, name, version)


async def model_ready(name: str, request: Request) -> dict:
    """200 when the model is loaded and ready."""
    service.served(request.app.state, name)
    return {"name": name, "ready": True}


async def model_version_ready(name: str, version: str, request: Request) -> dict:
    """200 when this version is the one loaded and ready."""
    service.served(request.app.state, name, version)
    return {"name": name, "ready": True}


async def model_infer(name: str, body: InferRequest, request: Request):
    """Logits for right-padded token ids, batched with other requests."""
    return await infer(request, name, body)


async def model_version_infer(name: str, version: str, body: InferRequest, request: Request):
    """Logits from this version (404 unless it is the version serving)."""
    return await infer(request, name, body, version)


async def infer(request: Request, name: str, body: InferRequest, version: str | None = None):
    service.stateless((body.parameters or {}).get("sequence_id"))
    with service.answered():
        binary = request.scope.get("rnnserve.binary", b"")  # the body after its JSON header, as the front door split it
        served_version, logits = await service.infer_tensors(
            request.app.state, name, tensors.inputs_of(body.inputs, binary), [o.name for o in body.outputs or []],
            version, receive=request.receive)
        header = {"model_name": name, "model_version": str(served_version.number)}
        return tensors.answer(header if body.id is None else header | {"id": body.id}, "logits", logits,
                              tensors.wants_binary(body))
