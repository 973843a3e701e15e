"""Open Inference Protocol (KServe V2) REST: health, server and model metadata, readiness, infer.

V2 infer takes tensors input_ids (INT64 [-1, -1], right-padded) and lengths (INT64 [-1]) and
answers logits (FP32). Its rows go to the engine with everyone else's.
"""
import numpy as np
from fastapi import APIRouter, HTTPException, Request

from core.repository import Tensor
from serving.inference import answered, infer, json_response, served
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
        raise HTTPException(503, "not ready")
    return {"ready": True}


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> dict:
    """Server name, version and protocol extensions."""
    return {"name": "rnnserve", "version": "0.2.0", "extensions": ["model_repository"]}


def tensor_metadata(tensor: Tensor) -> dict:
    return {"name": tensor.name, "datatype": DATATYPES[tensor.dtype],
            "shape": [d if isinstance(d, int) else -1 for d in tensor.shape]}


def metadata(request: Request, name: str, version: str | None = None) -> dict:
    _, served_version = served(request, name, version)
    manifest = served_version.manifest
    return {"name": name, "versions": [str(served_version.number)], "platform": "onnxruntime_onnx",
            "inputs": [tensor_metadata(t) for t in manifest.inputs[:2]],
            "outputs": [tensor_metadata(t) for t in manifest.outputs[:1]]}


@router.get("/models/{name}", response_model=ModelMetadata)
async def model_metadata(name: str, request: Request) -> dict:
    """A model's versions, platform and tensors."""
    return metadata(request, name)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata)
async def model_version_metadata(name: str, version: str, request: Request) -> dict:
    """A model version's platform and tensors (404 unless it is the version serving)."""
    return metadata(request, name, version)


@router.get("/models/{name}/ready")
async def model_ready(name: str, request: Request) -> dict:
    """200 when the model is loaded and ready."""
    served(request, name)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, request: Request) -> dict:
    """200 when this version is the one loaded and ready."""
    served(request, name, version)
    return {"name": name, "ready": True}


def flat(data: list) -> list:
    while data and isinstance(data[0], list):
        data = [x for row in data for x in row]
    return data


def rows_from(body: InferRequest, vocab_size: int, max_instances: int) -> list[list[int]]:
    """Validate the V2 tensors and cut input_ids into unpadded rows."""
    tensors = {t.name: t for t in body.inputs}
    if sorted(tensors) != ["input_ids", "lengths"] or len(body.inputs) != 2:
        raise HTTPException(400, f"expected inputs input_ids and lengths, got {[t.name for t in body.inputs]}")
    for t in body.inputs:
        if t.datatype != "INT64":
            raise HTTPException(400, f"input {t.name}: datatype must be INT64, not {t.datatype}")
    ids_t, len_t = tensors["input_ids"], tensors["lengths"]
    if len(ids_t.shape) != 2 or len(len_t.shape) != 1 or ids_t.shape[0] != len_t.shape[0]:
        raise HTTPException(400, f"shapes must be input_ids [B, T] and lengths [B], got {ids_t.shape} and {len_t.shape}")
    batch, seq = ids_t.shape
    if batch < 1 or seq < 1:
        raise HTTPException(400, f"empty input_ids shape {ids_t.shape}")
    if batch > max_instances:
        raise HTTPException(413, f"{batch} rows; at most {max_instances} per request")
    try:
        ids = np.asarray(flat(ids_t.data), dtype=np.int64)
        lengths = np.asarray(flat(len_t.data), dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise HTTPException(400, "tensor data must be integers") from None
    if ids.ndim != 1 or ids.size != batch * seq or lengths.ndim != 1 or lengths.size != batch:
        raise HTTPException(400, f"data lengths {ids.size} and {lengths.size} do not match shapes {ids_t.shape} and {len_t.shape}")
    if lengths.min() < 1 or lengths.max() > seq:
        raise HTTPException(400, f"lengths must be within 1..{seq}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise HTTPException(400, f"token ids must be within 0..{vocab_size - 1}")
    ids = ids.reshape(batch, seq)
    return [ids[i, :n].tolist() for i, n in enumerate(lengths)]


@router.post("/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True)
async def model_infer(name: str, body: InferRequest, request: Request):
    """Logits for right-padded token ids, batched with other requests."""
    return await infer_tensors(request, name, body)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, response_model_exclude_none=True)
async def model_version_infer(name: str, version: str, body: InferRequest, request: Request):
    """Logits from this version (404 unless it is the version serving)."""
    return await infer_tensors(request, name, body, version)


async def infer_tensors(request: Request, name: str, body: InferRequest, version: str | None = None):
    with answered(name, "v2_infer"):
        if body.outputs and [o.name for o in body.outputs] != ["logits"]:
            raise HTTPException(400, f"unknown outputs {[o.name for o in body.outputs]}; this model gives logits")
        limit = request.app.state.settings.max_instances
        served_version, _, logits = await infer(
            request, name, lambda v: [(row, False) for row in rows_from(body, len(v.codec.vocab), limit)], version)
        answer = {"model_name": name, "model_version": str(served_version.number),
                  "outputs": [{"name": "logits", "shape": list(logits.shape), "datatype": "FP32",
                               "data": logits.ravel().tolist()}]}
        return json_response(answer if body.id is None else answer | {"id": body.id})
