"""Open Inference Protocol (KServe V2) REST: health, server and model metadata, readiness, infer.

V2 infer takes tensors input_ids (INT64 [-1, -1], right-padded) and lengths (INT64 [-1]) and
answers logits (FP32), as JSON or with the binary tensor extension (serving/tensors.py). Its rows
go to the engine with everyone else's.
"""
from fastapi import APIRouter, HTTPException, Request
from starlette.datastructures import State

from core.repository import Tensor
from serving import tensors
from serving.inference import answered, infer, served
from serving.schemas import InferRequest, InferResponse, ModelMetadata, ServerMetadata

router = APIRouter(prefix="/v2", tags=["v2"])
DATATYPES = {"int64": "INT64", "float32": "FP32"}


@router.get("/health/live")
async def live() -> dict:
    """The process is up."""
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request):
    """Every engine has loaded and warmed up its models (503 until then, and while draining)."""
    if not request.app.state.ready or not request.app.state.engines.ready:
        raise HTTPException(503, "not ready", headers={"Retry-After": "1"})
    return {"ready": True}


SERVER = {"name": "rnnserve", "version": "0.2.0", "extensions": ["model_repository", "binary_tensor_data"]}


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> dict:
    """Server name, version and protocol extensions."""
    return SERVER


def tensor_metadata(tensor: Tensor) -> dict:
    return {"name": tensor.name, "datatype": DATATYPES[tensor.dtype],
            "shape": [d if isinstance(d, int) else -1 for d in tensor.shape]}


def metadata(state: State, name: str, version: str | None = None) -> dict:
    link, served_version = served(state, name, version)
    manifest, deployed = served_version.manifest, link.catalog[name]
    return {"name": name, "versions": [str(served_version.number)], "platform": "onnxruntime_onnx",
            "inputs": [tensor_metadata(t) for t in manifest.inputs[:2]],
            "outputs": [tensor_metadata(t) for t in manifest.outputs[:1]],
            "parameters": {"provider": deployed.provider, "device": deployed.device}}


@router.get("/models/{name}", response_model=ModelMetadata)
async def model_metadata(name: str, request: Request) -> dict:
    """A model's versions, platform and tensors."""
    return metadata(request.app.state, name)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata)
async def model_version_metadata(name: str, version: str, request: Request) -> dict:
    """A model version's platform and tensors (404 unless it is the version serving)."""
    return metadata(request.app.state, name, version)


@router.get("/models/{name}/ready")
async def model_ready(name: str, request: Request) -> dict:
    """200 when the model is loaded and ready."""
    served(request.app.state, name)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, request: Request) -> dict:
    """200 when this version is the one loaded and ready."""
    served(request.app.state, name, version)
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True)
async def model_infer(name: str, body: InferRequest, request: Request):
    """Logits for right-padded token ids, batched with other requests."""
    return await infer_tensors(request, name, body)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, response_model_exclude_none=True)
async def model_version_infer(name: str, version: str, body: InferRequest, request: Request):
    """Logits from this version (404 unless it is the version serving)."""
    return await infer_tensors(request, name, body, version)


async def infer_tensors(request: Request, name: str, body: InferRequest, version: str | None = None,
                        binary: bytes = b""):
    """binary: the body's bytes after the JSON header (the binary tensor extension)."""
    with answered(name, "v2_infer"):
        if body.outputs and [o.name for o in body.outputs] != ["logits"]:
            raise HTTPException(400, f"unknown outputs {[o.name for o in body.outputs]}; this model gives logits")
        inputs, settings = tensors.inputs_of(body.inputs, binary), request.app.state.settings
        served_version, _, logits = await infer(
            request.app.state, name, lambda v: [(row, False) for row in tensors.rows_within(
                inputs, v, settings.max_instances, settings.max_response_bytes)], version, receive=request.receive)
        header = {"model_name": name, "model_version": str(served_version.number)}
        return tensors.answer(header if body.id is None else header | {"id": body.id}, "logits", logits,
                              tensors.wants_binary(body))
